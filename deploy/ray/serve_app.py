"""shardserve behind Ray Serve: one replica owns the model's every rank, on as many Ray nodes as it needs.

Run on any node of a running Ray cluster (``ray start --head`` on one node, ``ray start --address HEAD:6379``
on the others, shardserve installed on each with ``pip install -e ".[ray]"``):

    python deploy/ray/serve_app.py /models/Llama-3.1-405B-Instruct -tp 8 -pp 4 --port 8000

The OpenAI API is then served by Ray Serve's proxy on the head node (``http://HEAD:8000/v1``); Ctrl-C or
SIGTERM deletes the application (its ranks and placement groups go with it). ``--set KEY=VALUE`` passes any
other engine or server field (``--set max_model_len=8192 --set api_key=...``). The same application from
Serve's own tools: ``serve run deploy/ray/serve_config.yaml`` (or ``serve deploy`` it; KubeRay:
``deploy/kubernetes/rayservice.yaml``). See ``shardserve/entrypoints/ray_serve.py`` for how a failure
restarts the whole group.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading


def parse_args(argv: list[str]) -> tuple[dict, dict]:
    """(application args for ``build_app``, Serve HTTP options) from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model path or hub id (default: the embedded model)")
    parser.add_argument("-tp", "--tensor-parallel-size", type=int, default=1)
    parser.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1)
    parser.add_argument("--host", default="0.0.0.0", help="address of Serve's HTTP proxy")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--name", default="shardserve", help="Serve application name")
    parser.add_argument(
        "--health-check-period-s",
        type=float,
        default=10.0,
        help="seconds between Serve's health checks of the replica (it is replaced after 3 failures)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="another config field")
    ns = parser.parse_args(argv)
    args = {
        "model": ns.model,
        "tensor_parallel_size": ns.tensor_parallel_size,
        "pipeline_parallel_size": ns.pipeline_parallel_size,
    }
    for item in ns.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set wants KEY=VALUE, got {item!r}")
        args[key.replace("-", "_")] = value
    return args, {"host": ns.host, "port": ns.port, "name": ns.name, "health_check_period_s": ns.health_check_period_s}


def main(argv: list[str] | None = None) -> int:
    import ray
    from ray import serve

    from shardserve.entrypoints.ray_serve import build_app

    args, http = parse_args(sys.argv[1:] if argv is None else argv)
    name, period = http.pop("name"), http.pop("health_check_period_s")
    try:
        app = build_app(args, {"health_check_period_s": period})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ray.init(address="auto")
    serve.start(proxy_location="HeadOnly", http_options=http)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.run(app, name=name, route_prefix="/")
        print(f"serving {args['model'] or 'the embedded model'} at http://{http['host']}:{http['port']}/v1", flush=True)
        stop.wait()
    finally:
        serve.delete(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
