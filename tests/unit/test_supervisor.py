"""ensemble.supervisor, without a server: what its canary asks for."""


def test_the_supervisor_asks_the_users_of_the_version_config_pbtxt_serves(repository, tmp_path):
    """A deploy replaces config.pbtxt with the new version's, whose export may store other users:
    the supervisor's canary follows it (the old stored user could come back unknown)."""
    import shutil

    from common.config import ServeConfig
    from ensemble import deploy
    from ensemble.server import TritonServer
    from ensemble.supervisor import Supervisor

    repo = tmp_path / "repo"
    shutil.copytree(repository, repo)
    supervisor = Supervisor(TritonServer(repo, ServeConfig()), ServeConfig())
    before = supervisor._canary_users()
    assert before[1] and before[2] is not None
    config = deploy.read_config(repo)
    config.parameters["canary_user_id"].string_value = str(before[0] + 1000)
    config.parameters["canary_cold_user_id"].string_value = str(before[2] + 1000)
    deploy.write_config(repo, config, 1)
    assert supervisor._canary_users() == (before[0] + 1000, True, before[2] + 1000)
    assert (supervisor.canary_user, supervisor.canary_cold_user) == (before[0] + 1000, before[2] + 1000)
