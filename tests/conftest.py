"""Shared fixtures: the tiny preset, one training run and one model repository per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.logs import quiet_libraries

quiet_libraries()
ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="session")
def tiny_cfg():
    from common.config import load_config

    return load_config(TINY, environ={})


def _train(cfg, root: Path) -> dict:
    from train.pipeline import run_training

    run = run_training(cfg, root / "work", root / "artifacts")
    return {"run": run, "work": root / "work", "artifacts": root / "artifacts", "cfg": cfg}


@pytest.fixture(scope="session")
def trained(tmp_path_factory, tiny_cfg):
    """One tiny training run (data, ETL, training, evaluation, export) for the whole session."""
    return _train(tiny_cfg, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def repository(tmp_path_factory, trained):
    """The Triton model repository built from the session's artifacts."""
    from ensemble.build import build_repository

    return build_repository(trained["artifacts"], tmp_path_factory.mktemp("repo") / "model_repository")


@pytest.fixture(scope="session")
def executor(repository, trained):
    """The request path loaded in-process from the exported repository (no server)."""
    from ensemble.loader import load_model_in_process

    return load_model_in_process(repository)


HISTORY_LENGTH = 5  # the history-aware variant's train.history_length


@pytest.fixture(scope="session")
def hist_trained(tmp_path_factory, tiny_cfg):
    """The tiny preset trained with a history input (train.history_length 5): about 20 s here."""
    import dataclasses

    cfg = dataclasses.replace(tiny_cfg, train=dataclasses.replace(tiny_cfg.train, history_length=HISTORY_LENGTH))
    return _train(cfg, tmp_path_factory.mktemp("hist_trained"))


@pytest.fixture(scope="session")
def hist_repository(tmp_path_factory, hist_trained):
    from ensemble.build import build_repository

    return build_repository(hist_trained["artifacts"], tmp_path_factory.mktemp("hist_repo") / "model_repository")


@pytest.fixture(scope="session")
def hist_executor(hist_repository):
    from ensemble.loader import load_model_in_process

    return load_model_in_process(hist_repository)
