"""Logging set-up for entry points (called once, in each CLI)."""

import logging
import os
import warnings


def setup_logging(level: str | int | None = None) -> None:
    """Configures the root logger once and quiets the noisy libraries underneath.

    Args:
        level: a logging level name or number; default from $RETRIEVAL_LOG_LEVEL or INFO.
    """
    level = level or os.environ.get("RETRIEVAL_LOG_LEVEL", "INFO")
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_libraries()


def quiet_libraries() -> None:
    """Silences TensorFlow's C++ banner and the known-harmless warnings of the Merlin stack."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("tensorflow", "merlin", "numba", "distributed", "absl", "h5py"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*PyTorch dtype mappings.*")
    warnings.filterwarnings("ignore", message=".*Please fix your imports.*")
    warnings.filterwarnings("ignore", message=".*Initializing an NVTabular Dataset in CPU mode.*")  # every CPU Dataset
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
