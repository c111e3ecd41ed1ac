"""The project's exception hierarchy: one base, one subclass per kind of failure."""


class RetrievalError(Exception):
    """Base of every error this project raises on purpose."""


class ConfigError(RetrievalError):
    """A configuration value, file or override is invalid."""


class DataError(RetrievalError):
    """Input data is missing, malformed or does not match the declared dataset."""


class ArtifactError(RetrievalError):
    """An artifacts folder or model repository is missing files or fails its manifest check."""


class IndexQualityError(ArtifactError):
    """The approximate index's recall against exact search is below the configured floor."""


class ServerError(RetrievalError):
    """tritonserver could not be started, or stopped unexpectedly."""


class RequestError(RetrievalError):
    """A request is invalid; the message says what was expected and what arrived."""


class ClientError(RetrievalError):
    """The client could not get an answer: unreachable server, unknown model, bad reply."""


class FeatureStoreError(RetrievalError):
    """The online feature store did not answer in time, or lacks this export's features."""
