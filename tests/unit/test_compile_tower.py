"""train.compile_tower: refuses what it does not recognise."""

import merlin.models.tf as mm
import pandas as pd
import pytest
from merlin.io import Dataset
from merlin.schema import Tags

from common.errors import ArtifactError
from train import etl
from train.compile_tower import compile_query_tower
from train.model import tower_schemas


@pytest.fixture(scope="module")
def user_schema_and_probe(trained):
    train = Dataset(str(trained["work"] / "etl" / etl.TRAIN_DIR), engine="parquet")
    user_schema, _ = tower_schemas(train.schema)
    users = pd.read_parquet(trained["work"] / "etl" / etl.USERS_ENCODED).head(16)
    return user_schema, {c: users[c].to_numpy() for c in users.columns}


def _encoder(schema, **mlp):
    inputs = mm.InputBlockV2(schema, categorical=mm.Embeddings(schema.select_by_tag(Tags.CATEGORICAL), dim=4))
    return mm.Encoder(inputs, mm.MLPBlock([8, 4], no_activation_last_layer=True, **mlp), post=mm.L2Norm())


def test_a_plain_tower_compiles_and_matches(user_schema_and_probe):
    schema, probe = user_schema_and_probe
    encoder = _encoder(schema)
    encoder(probe)  # build
    arrays = compile_query_tower(encoder, probe)
    assert float(arrays["max_abs_error"]) < 1e-5 and bool(arrays["l2_norm"])
    assert [str(a) for a in arrays["activations"]] == ["relu", "linear"]


def test_unknown_activation_is_refused(user_schema_and_probe):
    schema, probe = user_schema_and_probe
    encoder = _encoder(schema, activation="tanh")
    encoder(probe)
    with pytest.raises(ArtifactError, match="activation 'tanh' is not one of"):
        compile_query_tower(encoder, probe)


def test_probe_must_cover_the_tables(user_schema_and_probe):
    schema, probe = user_schema_and_probe
    encoder = _encoder(schema)
    encoder(probe)
    with pytest.raises(ArtifactError, match="do not match its inputs"):
        compile_query_tower(encoder, {k: v for k, v in probe.items() if k != "user_age"})
