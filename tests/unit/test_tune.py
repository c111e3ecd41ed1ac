"""train.tune: bounded, seeded, tuning users only; the chosen configuration loads as it was written."""

import json

import pytest

from common.config import load_config
from train.tune import SPACE, draw_trials, run_tuning


def test_trials_start_as_configured_then_draw_distinct_settings():
    trials = draw_trials(6, seed=3)
    assert trials[0] == {} and len(trials) == 6
    drawn = [tuple(sorted(t.items())) for t in trials[1:]]
    assert len(set(drawn)) == 5
    assert all(t[name] in SPACE[name] for t in trials[1:] for name in t)
    assert draw_trials(6, seed=3) == trials and draw_trials(6, seed=4) != trials


def test_a_two_trial_search_writes_a_config_that_loads(tmp_path, tiny_cfg):
    out = tmp_path / "chosen.yaml"
    report = run_tuning(tiny_cfg, tmp_path / "work", out, trials=2, budget_s=600, seed=1)
    assert len(report["trials"]) == 2 and report["trials"][0]["settings"] == {}
    chosen = load_config(out, environ={})
    best = report["trials"][report["best"]]
    for name, value in best["settings"].items():
        section, field = name.split(".")
        assert getattr(getattr(chosen, section), field) == pytest.approx(value)
    assert chosen.data == tiny_cfg.data
    assert json.loads(out.with_suffix(".json").read_text())["tuning_users"] > 0
    assert "**chosen**" in out.with_suffix(".md").read_text()
