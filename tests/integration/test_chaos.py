"""The short form of `make chaos`: every fault on the real tritonserver and a real redis-server,
each ending with good answers again within its bound, readiness telling the truth, no wrong answer."""

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture(scope="module")
def chaos_report(repository, trained, tmp_path_factory):
    from client.chaos import run_chaos

    return run_chaos(repository, trained["artifacts"], tmp_path_factory.mktemp("chaos"), short=True)


FAULTS = ["hostile_http", "refused_memory", "grpc_stub_killer", "kill_stub", "kill_tritonserver", "freeze_tritonserver",
          "redis_stopped",
          "redis_frozen", "redis_flushed", "failed_deploy", "corrupted_artifact"]


def test_every_fault_was_run(chaos_report):
    assert [r["fault"] for r in chaos_report["faults"]] == FAULTS


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_survived_within_its_bounds(chaos_report, fault):
    result = next(r for r in chaos_report["faults"] if r["fault"] == fault)
    assert result["problems"] == [], result
