"""Cost of a JSON-schema grammar per generated token on the embedded SmolLM2 tokenizer (49152 tokens), CPU.

    python benchmarks/bench_structured_output.py [--rows 1 16 64] [--repeats 5]

Replays the tokens of a valid JSON document through matchers and, per token, times the bitmask fill
(``StructuredOutputManager.fill_bitmask``, batch rows filled by xgrammar's C++ threads), ``accept_token``
and ``apply_bitmask`` on float32 logits. The baseline measured in the same run is what every decode step
does anyway for those rows: the LM-head matmul (hidden 576 x vocab 49152, SmolLM2-135M's shape) plus a
softmax. It also checks the overlap the engine relies on: while the device runs step N+1 (stood in for by
the host waiting ``--device-step-ms``, as it waits on a GPU), the fill runs on the manager's background
thread (xgrammar's calls release the GIL); printed as the step time with the fill before it (serial)
against the fill submitted before it (overlapped), and the share of the fill that the overlap hides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardserve.model_executor.loader.resolve import default_model_path
from shardserve.structured_output import StructuredOutputManager, apply_bitmask, from_response_format
from shardserve.transformers_utils.tokenizer import load_gguf_tokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city"],
        },
        "score": {"type": "number"},
    },
    "required": ["name", "age", "tags", "address"],
}
DOCUMENT = {
    "name": "Ada Lovelace, Countess of Lovelace",
    "age": 36,
    "email": "ada@example.org",
    "tags": ["admin", "user", "user", "guest"],
    "address": {"city": "London, Marylebone", "zip": "12345"},
    "score": 98.25,
}
HIDDEN = 576
"""SmolLM2-135M's hidden size."""


def per_token_us(fn, repeats: int) -> float:
    """Best of ``repeats`` of ``fn()``'s seconds divided by the tokens it covered, in microseconds (the best,
    since other processes on a shared host only ever add time)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        samples.append((time.perf_counter() - start) / tokens * 1e6)
    return min(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 16, 64], help="batch rows with the grammar")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device-step-ms", type=float, default=5.0, help="stand-in device step for the overlap")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    tokenizer = load_gguf_tokenizer(default_model_path())
    start = time.perf_counter()
    manager = StructuredOutputManager(tokenizer)
    setup_s = time.perf_counter() - start
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    start = time.perf_counter()
    manager.compile(spec)
    compile_s = time.perf_counter() - start
    ids = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    print(f"vocab {manager.vocab_size} tokens, bitmask row {manager.bitmask_width * 4} bytes; "
          f"tokenizer info {setup_s * 1e3:.0f} ms, schema compile {compile_s * 1e3:.1f} ms; "
          f"document {len(ids)} tokens")  # fmt: skip

    header = ("rows", "fill us/tok", "accept", "apply", "grammar", "lm_head+softmax", "ratio", "fill ms/step",
              "serial ms", "overlap ms", "hidden")  # fmt: skip
    print(" ".join(f"{h:>{max(len(h), 6)}}" for h in header))
    for rows in args.rows:
        figures = measure(manager, spec, ids, rows, args.repeats, args.device_step_ms / 1e3)
        print(" ".join(f"{v:>{max(len(h), 6)}{f}}" for h, v, f in zip(header, figures, FORMATS)))
    print("us/tok: microseconds per generated token per row; ratio = grammar / (lm_head + softmax) of the same rows;")
    print(f"serial / overlap: ms per step of fill then a {args.device_step_ms} ms device step, vs the fill on the "
          "background thread during it; hidden = share of the fill time the overlap removes")  # fmt: skip
    manager.shutdown()


FORMATS = ("d", ".1f", ".1f", ".1f", ".1f", ".1f", ".3f", ".3f", ".3f", ".3f", ".0%")


def measure(manager, spec, ids: list[int], rows: int, repeats: int, device_s: float) -> tuple:
    """One table row: per-token costs, the baseline, their ratio and the overlap figures."""
    bitmask = manager.allocate_bitmask(rows)
    logits = torch.randn(rows, manager.vocab_size)
    weight = torch.randn(manager.vocab_size, HIDDEN)
    hidden = torch.randn(rows, HIDDEN)

    def replay(fill: bool, apply: bool) -> int:
        matchers = [manager.matcher(spec) for _ in range(rows)]
        for token in ids:
            if fill:
                manager.fill_bitmask(matchers, bitmask)
            if apply:
                apply_bitmask(logits, bitmask, range(rows))  # type: ignore[arg-type]
            for m in matchers:
                m.accept_token(token)
        return len(ids) * rows

    def baseline() -> int:
        for _ in ids:
            torch.softmax(torch.nn.functional.linear(hidden, weight), dim=-1)
        return len(ids) * rows

    accept_us = per_token_us(lambda: replay(False, False), repeats)
    fill_us = per_token_us(lambda: replay(True, False), repeats) - accept_us
    apply_us = per_token_us(lambda: replay(False, True), repeats) - accept_us
    base_us = per_token_us(baseline, repeats)
    fill_ms, serial_ms, overlap_ms = overlap(manager, spec, ids, rows, device_s)
    grammar = fill_us + accept_us + apply_us
    hidden_share = (serial_ms - overlap_ms) / fill_ms if fill_ms > 0 else float("nan")
    return (rows, fill_us, accept_us, apply_us, grammar, base_us, grammar / base_us, fill_ms, serial_ms, overlap_ms,
            hidden_share)  # fmt: skip


def overlap(manager, spec, ids, rows: int, device_s: float) -> tuple[float, float, float]:
    """Median ms per step of: the fill alone, fill then device step, fill submitted before the device step."""
    matchers = [manager.matcher(spec) for _ in range(rows)]
    bitmask = manager.allocate_bitmask(rows)
    fill, serial, overlapped = [], [], []
    for token in ids:
        start = time.perf_counter()
        manager.fill_bitmask(matchers, bitmask)
        fill.append(time.perf_counter() - start)
        time.sleep(device_s)  # the host waits for the device
        serial.append(time.perf_counter() - start)
        start = time.perf_counter()
        future = manager.submit_fill(matchers)
        time.sleep(device_s)
        future.result()
        overlapped.append(time.perf_counter() - start)
        for m in matchers:
            m.accept_token(token)
    return statistics.median(fill) * 1e3, statistics.median(serial) * 1e3, statistics.median(overlapped) * 1e3


if __name__ == "__main__":
    main()
