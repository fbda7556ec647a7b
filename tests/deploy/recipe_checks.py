"""Helpers for the deploy/ recipe tests: run ``shardserve serve --dry-run`` in a given environment, read its report,
and validate manifests against vendored CRD schemas the way ``kubectl apply`` (strict field validation) does."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


@dataclass
class DryRun:
    """What ``shardserve serve --dry-run`` printed for one node."""

    returncode: int
    output: str
    source: str
    nnodes: int
    node_rank: int
    is_head: bool
    world_size: int
    master: str
    ranks: tuple[int, int] | None
    """First and last global rank of this node; None when the report shows a topology problem."""
    problems: list[str]


def local_model(model: str, root: Path) -> Path:
    """A stand-in for a recipe's model directory (``/models/Llama-3.1-70B-Instruct``, absent in CI): ``root/NAME``
    holding the real model's ``config.json`` from shardserve's table of known models, which is all that
    ``--dry-run`` reads (it checks that the layout splits the model)."""
    import json

    from shardserve.tools.known_models import find_known_model

    name = Path(model).name
    known = find_known_model(name)
    assert known is not None, f"{name} is not in shardserve.tools.known_models"
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **known.hf_config}
    (path / "config.json").write_text(json.dumps(config))
    return path


def dry_run(argv: list[str], env: dict[str, str], timeout: float = 60) -> DryRun:
    """Run ``python -m shardserve <argv> --dry-run`` with exactly ``env`` (plus PATH and this checkout on PYTHONPATH).

    ``argv`` starts after the program name, e.g. ``["serve", "MODEL", "-tp", "8"]``.
    """
    full_env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": os.environ.get("HOME", "/tmp"), **env}
    done = subprocess.run([sys.executable, "-m", "shardserve", *argv, "--dry-run"], env=full_env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    return parse_report(done.returncode, done.stdout + done.stderr)


def parse_report(returncode: int, text: str) -> DryRun:
    """The fields of a dry-run report (see ``shardserve/distributed/dry_run.py``)."""

    def field(pattern: str) -> re.Match:
        match = re.search(pattern, text, re.MULTILINE)
        assert match is not None, f"no {pattern!r} in the dry-run report:\n{text}"
        return match

    nodes = field(r"^\s+nodes:\s+(\d+) \(this node: rank (\d+)(, head, serves HTTP)?\)")
    world = field(r"^\s+world size:\s+(\d+) = TP \d+ x PP \d+")
    ranks = re.search(r"^\s+this node's ranks: (\d+)\.\.(\d+)", text, re.MULTILINE)
    return DryRun(
        returncode=returncode,
        output=text,
        source=field(r"^\s+source:\s+(\S+)").group(1),
        nnodes=int(nodes.group(1)),
        node_rank=int(nodes.group(2)),
        is_head=nodes.group(3) is not None,
        world_size=int(world.group(1)),
        master=field(r"^\s+master:\s+(\S+)").group(1),
        ranks=(int(ranks.group(1)), int(ranks.group(2))) if ranks else None,
        problems=re.findall(r"^PROBLEM: (.*)$", text, re.MULTILINE),
    )


# ----------------------------------------------------------------------------------- Kubernetes

_K8S_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand_k8s(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion in ``command``/``args``: a defined variable is replaced, ``$$`` is a
    literal ``$``, an undefined reference stays as written
    (``k8s.io/kubernetes/third_party/forked/golang/expansion``)."""

    def sub(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        return env.get(name, match.group(0))

    return _K8S_VAR.sub(sub, value)


def container_env(container: dict[str, Any], injected: dict[str, str], secrets: dict[str, str]) -> dict[str, str]:
    """The environment a container gets: ``injected`` first (as admission webhooks add it), then its ``env``
    list in order (each value may refer to earlier ones), ``secretKeyRef`` values taken from ``secrets``."""
    env = dict(injected)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = expand_k8s(item["value"], env)
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = secrets[f"{ref['name']}/{ref['key']}"]
    return env


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.Validator:
    """A JSON-schema validator for one version of a CRD, as strict as the API server's field validation.

    The CRD's ``openAPIV3Schema`` is used as written, except: an object schema with ``properties`` and
    neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` rejects unknown fields
    (``kubectl apply`` validates strictly); ``x-kubernetes-int-or-string`` accepts an integer or a string;
    ``nullable`` accepts null. CEL rules (``x-kubernetes-validations``) are not evaluated.

    Raises:
        KeyError: the CRD has no such version.
    """
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema = _strict(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
            return jsonschema.Draft7Validator(schema)
    raise KeyError(f"{crd['metadata']['name']} has no version {version}")


def _strict(node: dict[str, Any]) -> dict[str, Any]:
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.pop("nullable", False) and "type" in node:
        node["type"] = [node["type"], "null"]
    if "properties" in node:
        node["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if node.get("x-kubernetes-embedded-resource"):
            for key in ("apiVersion", "kind", "metadata"):
                node["properties"].setdefault(key, {})
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _strict(node["additionalProperties"])
    if isinstance(node.get("items"), dict):
        node["items"] = _strict(node["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in node:
            node[key] = [_strict(sub) for sub in node[key]]
    return node


def schema_errors(validator: jsonschema.Validator, doc: dict[str, Any]) -> list[str]:
    """Every violation, as ``path: message`` lines."""
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(doc)]
