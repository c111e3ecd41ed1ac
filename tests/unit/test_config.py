"""common.config: defaults, precedence, unknown keys and validation."""

import pytest

from common.config import IndexConfig, DataConfig, EvalConfig, PipelineConfig, ServeConfig, TrainConfig, config_from_dict, load_config
from common.errors import ConfigError


def test_defaults_are_valid_and_loopback():
    cfg = PipelineConfig()
    assert cfg.serve.host == "127.0.0.1"
    assert (cfg.serve.http_port, cfg.serve.grpc_port, cfg.serve.metrics_port) == (8000, 8001, 8002)
    assert cfg.train.query_mlp == (128, 64)


def test_precedence_file_then_env_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 3\n  batch_size: 64\ndata:\n  num_users: 50\n")
    env = {"RETRIEVAL_TRAIN__EPOCHS": "4", "RETRIEVAL_DATA__SEED": "7"}
    cfg = load_config(path, ["train.epochs=5"], environ=env)
    assert cfg.train.epochs == 5  # override beats environment beats file
    assert cfg.train.batch_size == 64  # from the file
    assert cfg.data.seed == 7  # from the environment
    assert cfg.data.num_users == 50


def test_tuple_and_optional_values_are_coerced():
    cfg = load_config(overrides=["train.query_mlp=[64,32]", "train.item_mlp=64,32", "data.aliccp_max_rows=none"], environ={})
    assert cfg.train.query_mlp == (64, 32) and cfg.train.item_mlp == (64, 32)
    assert cfg.data.aliccp_max_rows is None


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key train\.epoch .*valid: .*'epochs'"):
        load_config(overrides=["train.epoch=3"], environ={})


def test_unknown_section_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config section 'trian'.*valid: \['data', 'eval', 'index', 'serve', 'train'\]"):
        load_config(path, environ={})


def test_wrong_type_names_field_and_value():
    with pytest.raises(ConfigError, match=r"train\.epochs expects int, got 'three'"):
        load_config(overrides=["train.epochs=three"], environ={})
    with pytest.raises(ConfigError, match=r"train\.epochs expects int, got 2\.5"):
        config_from_dict({"train": {"epochs": 2.5}})


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="must look like section.field=value"):
        load_config(overrides=["epochs=3"], environ={})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, environ={})
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(listy, environ={})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(query_mlp=(64, 32), item_mlp=(64, 16)), "towers must end in the same size"),
        (lambda: TrainConfig(batch_size=1), "in-batch negatives"),
        (lambda: TrainConfig(temperature=0), "temperature must be > 0"),
        (lambda: DataConfig(source="csv"), "data.source must be one of"),
        (lambda: DataConfig(source="aliccp"), "needs data.aliccp_dir"),
        (lambda: DataConfig(valid_fraction=1.0), "valid_fraction"),
        (lambda: DataConfig(user_features=("user_id",)), "contract's names \\['user_id'\\]"),
        (lambda: DataConfig(user_id="customer", user_features=("top_k",)), "contract's names \\['top_k'\\]"),
        (lambda: DataConfig(user_id="customer", user_features=("customer",)), "repeated: \\['customer'\\]"),
        (lambda: DataConfig(source="files"), "needs data.interactions"),
        (lambda: DataConfig(holdout="clicks"), "^data.holdout must be all or positives, got 'clicks'$"),
        (lambda: DataConfig(holdout_by="oldest"), "^data.holdout_by must be auto, time or random, got 'oldest'$"),
        (lambda: DataConfig(holdout_min=-1), "^data.holdout_min must be >= 0, got -1$"),
        (lambda: DataConfig(seen="clicked"), "^data.seen must be positives or all, got 'clicked'$"),
        (lambda: TrainConfig(optimizer="sgd"), "^train.optimizer must be adam or adagrad, got 'sgd'$"),
        (lambda: EvalConfig(seeds=0), "^eval.seeds must be >= 1, got 0$"),
        (lambda: EvalConfig(max_users=0), "^eval.max_users must be >= 1 or null, got 0$"),
        (lambda: EvalConfig(tune_fraction=1.0), r"^eval.tune_fraction must be in \(0, 1\), got 1.0$"),
        (lambda: EvalConfig(max_tune_users=0), "^eval.max_tune_users must be >= 1, got 0$"),
        (lambda: EvalConfig(bootstrap=10), "^eval.bootstrap must be >= 100, got 10$"),
        (lambda: EvalConfig(confidence=0.3), r"^eval.confidence must be in \(0.5, 1\), got 0.3$"),
        (lambda: EvalConfig(als_budget_s=0), "^eval.als_budget_s must be > 0, got 0$"),
        (lambda: ServeConfig(http_port=8001), "ports must differ"),
        (lambda: ServeConfig(default_top_k=2000), "default_top_k must be in 1..max_top_k=1000"),
        (lambda: ServeConfig(http_port=70000), "ports must be in 1..65535"),
        (lambda: ServeConfig(health_port=8000), r"serve ports must differ, got \(8000, 8001, 8002, 8000\)"),
        (lambda: ServeConfig(feature_store_timeout_s=0), r"serve.feature_store_timeout_s must be in \(0, 30\], got 0"),
        (lambda: ServeConfig(index_device="tpu"), "serve.index_device must be cpu, gpu or auto, got 'tpu'"),
        (lambda: ServeConfig(query_cache_mb=-1), r"^serve.query_cache_mb must be >= 0 \(0: off\), got -1$"),
        (lambda: ServeConfig(probe_split_min_codes=-1), r"^serve.probe_split_min_codes must be >= 0 \(0: off\), got -1$"),
        (lambda: ServeConfig(canary_interval_s=0), "serve.canary_interval_s must be > 0, got 0"),
        (lambda: ServeConfig(canary_timeout_s=-1), "serve.canary_timeout_s must be > 0, got -1"),
        (lambda: ServeConfig(recover_after_failures=0), "serve.recover_after_failures must be >= 1, got 0"),
        (lambda: ServeConfig(max_restarts=0), "serve.max_restarts must be >= 1, got 0"),
        (lambda: ServeConfig(restart_window_s=0), "serve.restart_window_s must be > 0, got 0"),
        (lambda: ServeConfig(max_request_bytes=10), "serve.max_request_bytes must be >= 1024, got 10"),
        (lambda: IndexConfig(kind="lsh"), r"index.kind must be one of \('auto', 'flat', 'ivf', 'ivf_sq', 'ivf_pq', 'hnsw'\), got 'lsh'"),
        (lambda: IndexConfig(nlist=0), "index.nlist must be >= 1, got 0"),
        (lambda: IndexConfig(nlist=8, nprobe=9), "index.nprobe must be in 1..nlist=8, got 9"),
        (lambda: IndexConfig(nprobe=0), "index.nprobe must be in 1..nlist=1024, got 0"),
        (lambda: IndexConfig(flat_max_items=0), "index.flat_max_items must be >= 1, got 0"),
        (lambda: IndexConfig(hnsw_m=1), "index.hnsw_m must be >= 2, got 1"),
        (lambda: IndexConfig(ef_construction=0), "index.ef_construction must be >= 1, got 0"),
        (lambda: IndexConfig(ef_search=0), "index.ef_search must be >= 1, got 0"),
        (lambda: IndexConfig(min_recall_at_10=5.0), r"index.min_recall_at_10 must be in \[0, 1\], got 5.0"),
        (lambda: IndexConfig(recall_sample=0), "index.recall_sample must be >= 1, got 0"),
        (lambda: IndexConfig(ivf_max_items=100), "^index.ivf_max_items must be >= flat_max_items=20000, got 100$"),
        (lambda: IndexConfig(sq_nlist=0), "^index.sq_nlist must be >= 1, got 0$"),
        (lambda: IndexConfig(sq_nlist=8, sq_nprobe=9), "^index.sq_nprobe must be in 1..sq_nlist=8, got 9$"),
        (lambda: IndexConfig(sq_type="PQ8"), r"^index.sq_type must be one of \('SQ8', 'SQ6', 'SQ4', 'SQfp16'\), got 'PQ8'$"),
        (lambda: IndexConfig(train_points_per_cell=10), "^index.train_points_per_cell must be >= 39, got 10$"),
        (lambda: IndexConfig(add_chunk=0), "^index.add_chunk must be >= 1, got 0$"),
        (lambda: IndexConfig(pq_nlist=-1), r"^index.pq_nlist must be >= 0 \(0: the power of two at or above the square root of the catalogue size\), got -1$"),
        (lambda: IndexConfig(pq_nlist=8, pq_nprobe=9), "^index.pq_nprobe must be in 1..pq_nlist=8, got 9$"),
        (lambda: IndexConfig(pq_nprobe=0), "^index.pq_nprobe must be >= 1, got 0$"),
        (lambda: IndexConfig(pq_m=7), r"^index.pq_m must be 0 \(the embedding size\) or a positive even number, got 7$"),
        (lambda: IndexConfig(pq_m=-2), r"^index.pq_m must be 0 \(the embedding size\) or a positive even number, got -2$"),
        (lambda: IndexConfig(refine="PQ"), r"^index.refine must be one of \('none', 'SQfp16', 'SQ8', 'Flat'\), got 'PQ'$"),
        (lambda: IndexConfig(refine_k_factor=0.5), "^index.refine_k_factor must be >= 1, got 0.5$"),
        (lambda: IndexConfig(pq_hnsw_cells=-1), r"^index.pq_hnsw_cells must be >= 0 \(0: never\), got -1$"),
        (lambda: IndexConfig(pq_quantizer_ef=0), "^index.pq_quantizer_ef must be >= 1, got 0$"),
    ],
)
def test_validation_errors(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_auto_index_kind_follows_the_catalogue_size():
    cfg = IndexConfig(flat_max_items=100, ivf_max_items=1000)
    assert [cfg.resolved_kind(n) for n in (100, 101, 1000, 1001)] == ["flat", "ivf", "ivf", "ivf_pq"]
    assert IndexConfig(kind="hnsw").resolved_kind(10**8) == "hnsw"


def test_round_trip_through_dict():
    cfg = load_config(overrides=["train.epochs=3", "index.kind=hnsw"], environ={})
    assert config_from_dict(cfg.to_dict()) == cfg
