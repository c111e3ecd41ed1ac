"""The names every stage must agree on: model names, tensor names, dtypes and default ports.

The ensemble writes config.pbtxt from these, the client builds requests from them and the tests
import them, so the server and its callers cannot drift apart.
"""

from __future__ import annotations

# Entry model of the Triton repository: the merlin-systems executor that runs the whole graph.
MODEL_NAME = "retrieval"

# Request tensors. With dynamic batching every tensor carries the batch as its first dimension.
INPUT_USER_ID = "user_id"  # INT64 [batch, 1], raw user ids as in the interaction data
INPUT_EXCLUDE = "exclude_item_ids"  # INT64 [batch, n], raw item ids to leave out, padded with -1
EXCLUDE_PAD = -1
# Optional: the user's latest interactions, INT64 [batch, n] raw item ids, oldest first, padded with
# HISTORY_PAD. They are appended to the user's stored history (the latest `history_length` kept);
# ids the catalogue does not know are ignored and counted. Declared only by models with a history input.
INPUT_HISTORY = "history_item_ids"
HISTORY_PAD = -1
# Optional inputs named after the user features (user_age, ...): INT64 [batch, 1] raw values that
# replace the stored ones; FEATURE_NOT_GIVEN leaves a row's stored (or, for a new user, null) value.
FEATURE_NOT_GIVEN = -1

# Request parameter (Triton "parameters" map): how many items to return per user.
PARAM_TOP_K = "top_k"
PARAM_EXCLUDE_SEEN = "exclude_seen"  # bool: leave out what each user clicked in training

# Response tensors.
OUTPUT_ITEM_IDS = "item_ids"  # INT64 [batch, k], raw item ids, best first
OUTPUT_SCORES = "scores"  # FP32 [batch, k], dot products, non-increasing along k
OUTPUT_UNKNOWN = "unknown_user"  # BOOL [batch, 1], true where the user id was not in training

# Triton data types of those tensors.
DTYPES = {
    INPUT_USER_ID: "INT64",
    INPUT_EXCLUDE: "INT64",
    INPUT_HISTORY: "INT64",
    OUTPUT_ITEM_IDS: "INT64",
    OUTPUT_SCORES: "FP32",
    OUTPUT_UNKNOWN: "BOOL",
}

# Loopback by default; exposing the server is an explicit choice.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_HTTP_PORT = 8000
DEFAULT_GRPC_PORT = 8001
DEFAULT_METRICS_PORT = 8002
DEFAULT_HEALTH_PORT = 8003  # the supervisor's /live and /ready (a canary through the model)

# The restricted admin APIs (shared memory, model repository, logging, trace) answer only requests
# carrying this header with the value of $RETRIEVAL_ADMIN_KEY (the server's and the caller's).
ADMIN_KEY_ENV = "RETRIEVAL_ADMIN_KEY"
ADMIN_KEY_HEADER = "admin-key"  # HTTP header
GRPC_ADMIN_KEY_HEADER = f"triton-grpc-protocol-{ADMIN_KEY_HEADER}"  # gRPC metadata key: Triton prefixes it

# Artifact file names inside the artifacts folder written by `train` and read by `ensemble`.
ARTIFACT_WORKFLOW = "workflow"
ARTIFACT_QUERY_TOWER = "query_tower"
ARTIFACT_QUERY_TOWER_COMPILED = "query_tower.npz"
ARTIFACT_ITEM_EMBEDDINGS = "item_embeddings.npy"
ARTIFACT_ITEM_IDS = "item_ids.npy"
ARTIFACT_USER_FEATURES = "user_features.parquet"
ARTIFACT_ITEM_FEATURES = "item_features.parquet"
ARTIFACT_INDEX = "items.faiss"
ARTIFACT_SEEN = "seen_items.npz"
ARTIFACT_METRICS = "metrics.json"
MANIFEST = "manifest.json"
