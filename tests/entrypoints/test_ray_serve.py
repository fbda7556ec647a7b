"""shardserve behind Ray Serve (``deploy/ray/serve_app.py``) on a real two-node Ray cluster.

The documented script is run as a user would, on the head node; a chat request through Serve's proxy must
answer, and a rank that dies with no restart left must bring a new replica, with every rank new (the whole
group, on both nodes), not one actor restarted alone.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from procs import REPO, TINY
from ray_cluster import ray_cluster

DRIVER = str(REPO / "tests" / "ray_driver.py")
SERVE_APP = REPO / "deploy" / "ray" / "serve_app.py"
SERVE_CONFIG = REPO / "deploy" / "ray" / "serve_config.yaml"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a second Ray node, 2 CPUs each, for the module: the replica (1 CPU) lands on either node
    and leaves room on both for a rank, so the two pipeline stages spread over the nodes wherever it is."""
    with ray_cluster(tmp_path_factory.mktemp("ray-cluster"), cpus=(2, 2)) as c:
        yield c


def serve_app_argv(port: int) -> list[str]:
    """``deploy/ray/serve_app.py`` for the embedded model, PP 2 on CPUs, no restart left inside the replica, and
    Serve's health checks every 2 s (a dead replica is replaced after 3 failed checks)."""
    sets = [f"--set={k.lstrip('-').replace('-', '_')}={v}" for k, v in zip(TINY[::2], TINY[1::2]) if k != "--log-level"]
    return [sys.executable, str(SERVE_APP), "-pp", "2", "--host", "127.0.0.1", "--port", str(port), *sets,
            "--set", "max_restarts=0", "--set", "rendezvous_timeout=60", "--health-check-period-s", "2"]  # fmt: skip


def test_serve_config_is_a_valid_serve_config_with_valid_args():
    from ray.serve.schema import ServeDeploySchema

    from shardserve.entrypoints.ray_serve import configs_from_args

    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.read_text()))
    (app,) = config.applications
    assert app.import_path == "shardserve.entrypoints.ray_serve:build_app"
    engine, _ = configs_from_args(app.args)
    assert engine.parallel.distributed_executor_backend == "ray"
    assert [d.name for d in app.deployments] == ["ShardServe"]
    assert app.deployments[0].num_replicas == 1


def test_serve_app_rejects_an_unknown_argument():
    from shardserve.entrypoints.ray_serve import configs_from_args

    with pytest.raises(ValueError, match="unknown shardserve Ray Serve argument 'tensor_paralel_size'"):
        configs_from_args({"tensor_paralel_size": 2})
    with pytest.raises(ValueError, match="max_model_len"):
        configs_from_args({"max_model_len": "many"})


@pytest.mark.slow
def test_ray_serve_app_answers_and_a_dead_rank_replaces_the_whole_group(cluster, tmp_path):
    port = 8131
    app = cluster.popen(serve_app_argv(port), tmp_path / "serve_app.log")
    url = f"http://127.0.0.1:{port}"
    try:
        chat = cluster.run_json([sys.executable, DRIVER, "chat", url], timeout=420)
        assert "Paris" in chat["answer"], chat["answer"]
        ranks = sorted(chat["status"]["ranks"], key=lambda r: r["rank"])
        # one replica, its ranks on both Ray nodes (stage 0 on the replica's node, which Serve picks)
        assert sorted(r["node_ip"] for r in ranks) == sorted(cluster.node_ips)
        out = cluster.run_json([sys.executable, DRIVER, "failover", url, "1"], timeout=420)
        assert out["after"] is not None, f"no new replica answered: {out}"
        before = {r["rank"]: r["pid"] for r in out["before"]["ranks"]}
        after = {r["rank"]: r["pid"] for r in out["after"]["ranks"]}
        assert set(before) == set(after) == {0, 1}
        assert all(after[r] != before[r] for r in before), "every rank must be new, not only the dead one"
        assert out["after"]["head"]["pid"] != out["before"]["head"]["pid"]  # a new replica
        assert out["same_text"]
        assert app.poll() is None
    finally:
        app.terminate()
        try:
            code = app.wait(60)
        except subprocess.TimeoutExpired:
            app.kill()
            code = app.wait(10)
        log = (tmp_path / "serve_app.log").read_text()
    assert code == 0, log[-3000:]
