"""deploy/kubernetes: the manifests pass their schemas offline, and each pod's environment gives the right launch.

LeaderWorkerSet: every pod of a group is fed to ``shardserve serve --dry-run`` with the variables the LWS
webhook injects (``pkg/utils/pod/pod_utils.go`` ``AddLWSVariables`` at lws v0.10.0) and Kubernetes'
``$(VAR)`` expansion of its arguments; the report must give the pod's node rank, the world size and the
leader as master.
"""

from __future__ import annotations

import copy
import hashlib
import re

import pytest
import yaml
from recipe_checks import DEPLOY, container_env, crd_validator, dry_run, expand_k8s, local_model, schema_errors

K8S = DEPLOY / "kubernetes"
SCHEMAS = K8S / "schemas"
NAMESPACE = "default"
SECRETS = {"shardserve-api-key/key": "test-key"}
# What every pod gets from the kubelet (the API server's service), which the Kubeflow heuristics look at.
KUBELET_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def load_all(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def crd(file: str) -> dict:
    return yaml.safe_load((SCHEMAS / file).read_text())


def test_vendored_crds_are_the_upstream_files():
    table = (SCHEMAS / "README.md").read_text()
    rows = re.findall(r"^\| `([^`]+\.yaml)` \|.*\| ([0-9a-f]{64}) \|$", table, re.MULTILINE)
    assert len(rows) == 2, table
    for file, sha in rows:
        assert hashlib.sha256((SCHEMAS / file).read_bytes()).hexdigest() == sha, f"{file} differs from upstream"


# --------------------------------------------------------------------------------- LeaderWorkerSet


@pytest.fixture(scope="module")
def lws_docs():
    docs = load_all("lws.yaml")
    lws = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    others = [d for d in docs if d is not lws]
    return lws, others


def test_lws_manifest_passes_the_crd_schema_and_the_core_schemas(lws_docs):
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    lws, others = lws_docs
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    validator = crd_validator(crd("leaderworkerset.x-k8s.io_leaderworkersets.yaml"), "v1")
    assert schema_errors(validator, lws) == []
    assert [d["kind"] for d in others] == ["Service"]
    for doc in others:
        kubernetes_validate.validate(doc, latest_version(), strict=True)


def test_lws_schema_check_rejects_a_typo_and_a_wrong_type(lws_docs):
    lws, _ = lws_docs
    validator = crd_validator(crd("leaderworkerset.x-k8s.io_leaderworkersets.yaml"), "v1")
    typo = copy.deepcopy(lws)
    typo["spec"]["leaderWorkerTemplate"]["sise"] = typo["spec"]["leaderWorkerTemplate"].pop("size")
    assert any("sise" in e for e in schema_errors(validator, typo))
    wrong = copy.deepcopy(lws)
    wrong["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["args"] = "not a list"
    assert any("not a list" in e for e in schema_errors(validator, wrong))


def test_lws_layout_gpus_shm_and_rdma_agree(lws_docs):
    lws, others = lws_docs
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    size = tmpl["size"]
    assert tmpl["restartPolicy"] == "RecreateGroupOnPodRestart"  # a dead rank restarts the whole group
    leader, worker = tmpl["leaderTemplate"], tmpl["workerTemplate"]
    layouts = []
    for pod in (leader, worker):
        (container,) = pod["spec"]["containers"]
        args = container["args"]
        tp = int(args[args.index("--tensor-parallel-size") + 1])
        pp = int(args[args.index("--pipeline-parallel-size") + 1])
        gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert tp * pp == size * gpus, "TP x PP must be the GPUs of the whole group"
        assert gpus % tp == 0 or tp % gpus == 0
        layouts.append((args[0], tp, pp))
        # RDMA as in the RunAI/RCP guide: the Multus RoCE network and one rdma/rdma device per pod.
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "kube-system/roce"
        assert container["resources"]["limits"]["rdma/rdma"] == "1"
        assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
        shm = {v["name"]: v for v in pod["spec"]["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert shm[mount["name"]]["emptyDir"]["medium"] == "Memory"
    assert layouts[0] == layouts[1], "leader and workers must serve the same model with the same layout"
    # Only the leader serves HTTP; the Service selects it by the labels LWS and the template put on it.
    (lead_container,) = leader["spec"]["containers"]
    assert "--port" in lead_container["args"] and lead_container["readinessProbe"]["httpGet"]["path"] == "/health"
    (work_container,) = worker["spec"]["containers"]
    assert "--port" not in work_container["args"] and "readinessProbe" not in work_container
    (service,) = others
    selector = service["spec"]["selector"]
    assert selector["leaderworkerset.sigs.k8s.io/name"] == lws["metadata"]["name"]
    assert all(
        leader["metadata"]["labels"][k] == v for k, v in selector.items() if k != "leaderworkerset.sigs.k8s.io/name"
    )
    port = int(lead_container["args"][lead_container["args"].index("--port") + 1])
    assert service["spec"]["ports"][0]["targetPort"] == port


def lws_pods(lws: dict, group: int = 0) -> list[tuple[str, dict, dict[str, str]]]:
    """(pod name, container, environment) of every pod of group ``group``, as LWS creates them."""
    name = lws["metadata"]["name"]
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    pods = []
    for index in range(tmpl["size"]):
        pod_tmpl = tmpl["leaderTemplate"] if index == 0 else tmpl["workerTemplate"]
        (container,) = pod_tmpl["spec"]["containers"]
        pod_name = f"{name}-{group}" if index == 0 else f"{name}-{group}-{index}"
        injected = {
            # Shared subdomain policy: the headless service is named after the LWS.
            "LWS_LEADER_ADDRESS": f"{name}-{group}.{name}.{NAMESPACE}",
            "LWS_GROUP_SIZE": str(tmpl["size"]),
            "LWS_WORKER_INDEX": str(index),
            "HOSTNAME": pod_name,
            **KUBELET_ENV,
        }
        pods.append((pod_name, container, container_env(container, injected, SECRETS)))
    return pods


def pod_argv(container: dict, env: dict[str, str]) -> list[str]:
    command = [expand_k8s(a, env) for a in container["command"] + container.get("args", [])]
    assert command[:2] == ["shardserve", "serve"], command
    return command[1:]


def test_lws_each_pod_finds_its_node_rank_world_and_leader(lws_docs, tmp_path):
    lws, _ = lws_docs
    name, size = lws["metadata"]["name"], lws["spec"]["leaderWorkerTemplate"]["size"]
    for index, (pod, container, env) in enumerate(lws_pods(lws)):
        argv = pod_argv(container, env)
        assert "$(" not in " ".join(argv), f"{pod}: an unexpanded variable in {argv}"
        assert argv[1] == "/models/Llama-3.1-70B-Instruct", argv  # on the models volume; here a stand-in
        argv[1] = str(local_model(argv[1], tmp_path))
        tp = int(argv[argv.index("--tensor-parallel-size") + 1])
        pp = int(argv[argv.index("--pipeline-parallel-size") + 1])
        report = dry_run(argv, env)
        assert report.returncode == 0, report.output
        assert report.problems == [], report.output
        assert report.source == "lws"
        assert (report.nnodes, report.node_rank, report.is_head) == (size, index, index == 0), report.output
        assert report.world_size == tp * pp
        assert report.master == f"{name}-0.{name}.{NAMESPACE}:29500"
        rpn = tp * pp // size
        assert report.ranks == (index * rpn, (index + 1) * rpn - 1), report.output


def test_lws_group_too_large_for_tp_fails_the_dry_run(lws_docs):
    """Four pods of 4 GPUs for TP 8 x PP 2: a TP group would span two pods. The dry run names it and fails."""
    lws, _ = lws_docs
    lws = copy.deepcopy(lws)
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    tmpl["size"] = 4
    _, container, env = lws_pods(lws)[1]
    report = dry_run(pod_argv(container, env), env)
    assert any("inside a node" in p for p in report.problems), report.output
    assert report.returncode != 0, "a dry run that prints a PROBLEM must exit non-zero"


# --------------------------------------------------------------------------------- KubeRay RayService


@pytest.fixture(scope="module")
def rayservice():
    (doc,) = load_all("rayservice.yaml")
    return doc


def kuberay_nodes(rayservice: dict) -> list:
    """The Ray nodes KubeRay would start, with the resources ``ray start`` gets: ``num-cpus`` from the
    container's CPU limit (else request) and ``num-gpus`` from its GPU limit unless ``rayStartParams`` sets
    them (``generateRayStartCommand``/``addWellKnownAcceleratorResources``, kuberay v1.7.0 pod.go)."""
    from shardserve.executor.ray_utils import RayNode

    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", 1, cluster["headGroupSpec"])]
    groups += [(g["groupName"], g["replicas"], g) for g in cluster["workerGroupSpecs"]]
    nodes = []
    for name, replicas, group in groups:
        (container,) = group["template"]["spec"]["containers"]
        params = group.get("rayStartParams", {})
        res = container["resources"]
        cpus = float(params.get("num-cpus", res.get("limits", {}).get("cpu") or res["requests"]["cpu"]))
        gpus = float(params.get("num-gpus", res.get("limits", {}).get("nvidia.com/gpu", 0)))
        for i in range(replicas):
            total = {"CPU": cpus, "GPU": gpus}
            nodes.append(RayNode(f"{name}-{i}", f"10.0.0.{len(nodes) + 1}", total, dict(total)))
    return nodes


def test_rayservice_passes_the_crd_schema(rayservice):
    validator = crd_validator(crd("ray.io_rayservices.yaml"), "v1")
    assert schema_errors(validator, rayservice) == []
    broken = copy.deepcopy(rayservice)
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["replica"] = 2
    assert any("replica" in e for e in schema_errors(validator, broken))


def test_rayservice_serve_config_is_valid_and_runs_shardserve_with_the_ray_backend(rayservice):
    from ray.serve.schema import ServeDeploySchema

    from shardserve.entrypoints.ray_serve import configs_from_args

    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(rayservice["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "shardserve.entrypoints.ray_serve:build_app"
    engine, _ = configs_from_args(app.args)
    assert engine.parallel.distributed_executor_backend == "ray"
    (deployment,) = app.deployments
    assert deployment.name == "ShardServe" and deployment.num_replicas == 1  # one replica owns every rank


def test_rayservice_pods_hold_the_layout_with_a_tp_group_per_gpu_pod(rayservice):
    """The placement planner on the pods KubeRay creates: each stage's TP group on its own GPU pod, none on
    the head, and nothing missing."""
    from shardserve.entrypoints.ray_serve import configs_from_args
    from shardserve.executor.ray_utils import plan_placement, rank_bundle

    args = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"]
    par = configs_from_args(args)[0].parallel
    nodes = kuberay_nodes(rayservice)
    plan = plan_placement(par.tensor_parallel_size, par.pipeline_parallel_size, nodes, rank_bundle("cuda"))
    used = [s.node_id for s in plan]
    assert len(set(used)) == par.pipeline_parallel_size and not any(n.startswith("head") for n in used)
    assert sum(n.total["GPU"] for n in nodes) == par.world_size  # no GPU idle
    # The worker pods carry /dev/shm in memory and the RDMA network, as the LWS recipe.
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        pod = group["template"]
        (container,) = pod["spec"]["containers"]
        assert pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"] == "kube-system/roce"
        assert container["resources"]["limits"]["rdma/rdma"] == "1"
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
        assert {v["name"]: v for v in pod["spec"]["volumes"]}[mount["name"]]["emptyDir"]["medium"] == "Memory"
