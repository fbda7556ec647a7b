"""Cost of a JSON-schema grammar per generated token: the bitmask fill alone, and the engine's decode rate.

    python benchmarks/bench_structured_output.py [--rows 1 16 64] [--repeats 5]          # fill, CPU
    python benchmarks/bench_structured_output.py --engine [--model Llama-3.1-8B] [--requests 64]   # GPU
    python benchmarks/bench_structured_output.py --engine --tiny       # the same on a tiny shape, CPU
    python benchmarks/bench_structured_output.py --engine --embedded   # SmolLM2-135M, one request, CPU

``--engine`` runs the engine (``LLM.generate``, in process, async scheduling as configured) on ``--requests``
concurrent requests with the JSON schema below and on the same number without it, and prints decode tokens/s
of both and their ratio (issue 14's target: within 10% on nvidia-h200 for the Llama-3.1-8B shape with 64
requests; within 15% for the embedded model's single request on the CPU). The model has random weights
(``--load-format dummy``, the shape from ``benchmarks/model_shapes.py``); its tokenizer is the shape's
synthetic word-level vocabulary with the printable ASCII characters as its first tokens, so that xgrammar can
spell JSON with it. Prompts are 16 random ids; outputs are sampled at temperature 1 up to ``--output-len``
tokens. The run without a grammar generates exactly as many tokens per request as the grammar run did
(``max_tokens`` = that length, EOS ignored), so both do the same work but for the grammar. The figure of each
is the median of ``--rounds`` rounds after a warm-up of each (the warm-up compiles the grammar). Completed
outputs are checked against the schema (jsonschema), every output token by token against a fresh matcher.

Fill mode:

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
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
    ap.add_argument("--engine", action="store_true", help="decode tok/s of the engine with and without a schema")
    ap.add_argument("--model", default="Llama-3.1-8B", help="--engine: a shape of benchmarks/model_shapes.py")
    ap.add_argument("--tiny", action="store_true", help="--engine: a tiny random shape (CPU)")
    ap.add_argument("--embedded", action="store_true", help="--engine: the embedded SmolLM2-135M, one request")
    ap.add_argument("--requests", type=int, default=64, help="--engine: concurrent requests")
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-async-scheduling", action="store_true")
    args = ap.parse_args()
    if args.engine:
        bench_engine(args)
        return
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


# ------------------------------------------------------------------------------------------- engine mode

TINY_SHAPE = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 8, "num_key_value_heads": 8, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "model_type": "llama",
}  # fmt: skip
PROMPT_LEN = 16


def write_grammar_tokenizer(path: Path, vocab_size: int) -> None:
    """The shape's word-level tokenizer (``<s> </s> <unk>``, then words ``t{id}``) with the printable ASCII
    characters as ids 3 .. 100, so that a grammar can spell any JSON; tokens are joined without spaces."""
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for c in string.printable:
        if c not in "\x0b\x0c":
            vocab.setdefault(c, len(vocab))
    vocab |= {f"t{i}": i for i in range(len(vocab), vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    )


def engine_model(args) -> tuple[str | None, dict]:
    """The model path (None: the embedded model) and the LLM keyword arguments."""
    if args.embedded:
        return None, {"max_num_seqs": 8}
    import tempfile

    from model_shapes import write_model_dir

    name = "tiny" if args.tiny else args.model
    path = Path(tempfile.mkdtemp()) / name
    write_model_dir(name, path, hf_config=TINY_SHAPE if args.tiny else None)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    write_grammar_tokenizer(path, vocab)
    kw = {"load_format": "dummy", "max_num_seqs": max(args.requests, 1), "max_model_len": 4096}
    if not args.tiny:
        kw["dtype"] = "bfloat16"
    return str(path), kw


def run_round(llm, prompts, params) -> tuple[float, list]:
    """Seconds of one ``generate`` and its outputs."""
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, outs


def bench_engine(args) -> None:
    import jsonschema

    from shardserve import LLM, SamplingParams

    model, kw = engine_model(args)
    llm = LLM(model, async_scheduling=not args.no_async_scheduling, **kw)
    requests = 1 if args.embedded else args.requests
    vocab = llm.engine.source.arch.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, vocab, (requests, PROMPT_LEN), generator=gen).tolist()
    spec = from_response_format({"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})
    grammar = SamplingParams(temperature=1.0, max_tokens=args.output_len, structured_outputs=spec)
    rounds: dict[str, list[float]] = {"schema": [], "none": []}
    valid = completed = followed = total = 0
    name = model or "embedded SmolLM2-135M"
    print(f"model {name} (dtype {llm.engine.config.model.dtype}), {requests} concurrent requests, "
          f"{PROMPT_LEN}-token prompts, up to {args.output_len} output tokens")  # fmt: skip
    for r in range(args.rounds + 1):  # round 0 warms up (compiles the grammar, captures graphs)
        dt, outs = run_round(llm, prompts, grammar)
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        plain = [SamplingParams(temperature=1.0, max_tokens=max(n, 1), ignore_eos=True) for n in lengths]
        dt_plain, plain_outs = run_round(llm, prompts, plain)
        assert [len(o.outputs[0].token_ids) for o in plain_outs] == [max(n, 1) for n in lengths]
        if r == 0:
            continue
        tokens = sum(lengths)
        rounds["schema"].append(tokens / dt)
        rounds["none"].append(tokens / dt_plain)
        manager = llm.engine.grammar.manager
        for o in outs:
            c = o.outputs[0]
            matcher = manager.matcher(spec)
            followed += all(matcher.accept_token(t) for t in c.token_ids)
            total += 1
            if c.finish_reason == "stop":
                completed += 1
                try:
                    jsonschema.validate(json.loads(c.text), SCHEMA)
                    valid += 1
                except (ValueError, jsonschema.ValidationError):
                    pass
        print(f"round {r}: {tokens} tokens; schema {tokens / dt:.0f} tok/s, none {tokens / dt_plain:.0f} tok/s")
    llm.shutdown()
    with_schema, without = statistics.median(rounds["schema"]), statistics.median(rounds["none"])
    print(f"decode with a JSON schema {with_schema:.1f} tok/s, without {without:.1f} tok/s: "
          f"ratio {with_schema / without:.3f} (median of {args.rounds} rounds)")  # fmt: skip
    print(f"outputs the grammar accepts token by token: {followed}/{total}; completed outputs valid against the "
          f"schema: {valid}/{completed} (the others stopped at --output-len {args.output_len})")  # fmt: skip


if __name__ == "__main__":
    main()
