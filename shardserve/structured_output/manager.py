"""Grammars compiled against the model's vocabulary, per-request matchers, and the batch token bitmask.

The bitmask of a batch is an int32 tensor of shape ``(num_rows, ceil(vocab_size / 32))``: bit ``j % 32`` of
word ``j // 32`` of a row is 1 when token ``j`` may be sampled next (xgrammar's layout). Only the rows of
requests with a grammar are filled and applied; a batch without grammars never touches this module.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xgrammar as xgr

from shardserve.model_executor.device_copy import to_device
from shardserve.structured_output.spec import InvalidStructuredOutputError, StructuredOutputSpec, xgrammar_message

logger = logging.getLogger(__name__)

MAX_WHITESPACE = 16
"""Longest whitespace run a JSON grammar allows between tokens (characters): enough for pretty-printed JSON,
and it stops a small model from emitting whitespace until ``max_tokens`` (xgrammar's ``max_whitespace_cnt``)."""


def build_tokenizer_info(tokenizer: Any, vocab_size: int | None = None) -> xgr.TokenizerInfo:
    """xgrammar's view of a :class:`~shardserve.transformers_utils.tokenizer.Tokenizer`'s vocabulary.

    Args:
        tokenizer: the serving tokenizer (``backend`` is a ``tokenizers.Tokenizer``; ``eos_token_ids``
            are the stop tokens a completed grammar allows).
        vocab_size: the model's logits width (embedding rows), which may exceed the tokenizer's
            vocabulary (padded rows, e.g. Qwen2.5's 152064 vs 151665 tokens); the extra ids are never
            allowed. None uses the tokenizer's size.

    Special tokens other than the stop tokens are never allowed inside a grammar (they are given to
    xgrammar as empty strings, which it treats as special).
    """
    backend = tokenizer.backend
    size = max(tokenizer.vocab_size, vocab_size or 0)
    encoded = [""] * size
    for token, token_id in backend.get_vocab(with_added_tokens=True).items():
        if token_id < size and not tokenizer.is_special(token_id):
            encoded[token_id] = token
    # The vocabulary encoding (byte-level BPE "Ġ", byte fallback "<0x0A>", raw) and prefix-space handling,
    # read from the tokenizer.json the way xgrammar's own TokenizerInfo.from_huggingface does.
    meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
    stop = sorted(i for i in tokenizer.eos_token_ids if i < size) or None
    return xgr.TokenizerInfo(
        encoded, meta["vocab_type"], vocab_size=size, stop_token_ids=stop, add_prefix_space=meta["add_prefix_space"]
    )


class GrammarMatcher:
    """One sequence's position in its grammar (one per output sequence: ``n > 1`` gets ``n`` of them).

    With ``reasoning_end_ids`` the grammar starts only after the model has produced that token sequence
    (``</think>``): tokens before it are accepted unchecked and the sequence's bitmask row is not applied.
    """

    def __init__(self, compiled: xgr.CompiledGrammar, reasoning_end_ids: Sequence[int] | None = None) -> None:
        self._matcher = xgr.GrammarMatcher(compiled)
        self._reasoning_end = list(reasoning_end_ids or [])
        self._reasoning_tokens: list[int] = []
        """Tokens accepted while reasoning, the end sequence included."""
        self._in_reasoning = bool(self._reasoning_end)
        self._num_grammar_tokens = 0
        self._filling = False

    @property
    def in_reasoning(self) -> bool:
        """The grammar has not started yet (the reasoning section is still open)."""
        return self._in_reasoning

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token.

        Returns:
            False when the token breaks the grammar (the state is unchanged; the engine should finish the
            request), or when the matcher has already terminated.

        Raises:
            RuntimeError: called while a background fill of this matcher's bitmask row is running (wait
                for :meth:`StructuredOutputManager.submit_fill`'s future first).
        """
        if self._filling:
            raise RuntimeError("accept_token while this matcher's bitmask is being filled; wait for the fill first")
        if self._in_reasoning:
            self._reasoning_tokens.append(int(token_id))
            end = self._reasoning_end
            self._in_reasoning = self._reasoning_tokens[-len(end) :] != end
            return True
        accepted = self._matcher.accept_token(int(token_id))
        self._num_grammar_tokens += accepted
        return accepted

    def accept_tokens(self, token_ids: Sequence[int]) -> bool:
        """Accept tokens in order; stops at (and returns False for) the first one the grammar rejects."""
        return all(self.accept_token(t) for t in token_ids)

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> bool:
        """Write the allowed next tokens into ``bitmask[row]`` (``(num_rows, ceil(vocab / 32))`` int32, CPU).

        Returns:
            True when the row must be applied; False while reasoning (the row is left as it was).
        """
        if self._in_reasoning:
            return False
        self._matcher.fill_next_token_bitmask(bitmask, row)
        return True

    def is_terminated(self) -> bool:
        """The grammar is complete and a stop token was accepted: nothing more may follow."""
        return self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a complete match (a stop token is allowed next)."""
        return not self._in_reasoning and self._matcher.is_completed()

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` accepted tokens (speculative decoding, jump-forward, stop strings).

        Raises:
            ValueError: more tokens than were accepted.
        """
        total = self._num_grammar_tokens + len(self._reasoning_tokens)
        if not 0 <= num_tokens <= total:
            raise ValueError(f"cannot roll back {num_tokens} tokens; {total} were accepted")
        from_grammar = min(num_tokens, self._num_grammar_tokens)
        if from_grammar:
            self._matcher.rollback(from_grammar)
            self._num_grammar_tokens -= from_grammar
        rest = num_tokens - from_grammar
        if rest:  # back inside the reasoning section
            del self._reasoning_tokens[len(self._reasoning_tokens) - rest :]
            self._in_reasoning = True


@dataclass
class GrammarBitmask:
    """A filled batch bitmask: ``bitmask`` ``(num_rows, ceil(vocab_size / 32))`` int32 on the CPU (pinned
    when CUDA is present) and the ``rows`` to apply it to (the others hold stale data)."""

    bitmask: torch.Tensor
    rows: list[int]


class StructuredOutputManager:
    """Compiles specs for one tokenizer (with a cache), makes matchers and fills batch bitmasks.

    Args:
        tokenizer: the serving tokenizer (see :func:`build_tokenizer_info`).
        vocab_size: the model's logits width; None uses the tokenizer's.
        cache_size: compiled grammars kept (least recently used are dropped).
        compile_threads: threads xgrammar uses to compile one grammar.
        fill_threads: threads xgrammar uses to fill the rows of one batch.
    """

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int | None = None,
        *,
        cache_size: int = 256,
        compile_threads: int = 2,
        fill_threads: int | None = None,
    ) -> None:
        self.tokenizer_info = build_tokenizer_info(tokenizer, vocab_size)
        self.vocab_size: int = self.tokenizer_info.vocab_size
        """Tokens per bitmask row (the model's logits width, or the tokenizer's when larger)."""
        self._compiler = xgr.GrammarCompiler(self.tokenizer_info, max_threads=compile_threads)
        self._cache: OrderedDict[StructuredOutputSpec, xgr.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0
        threads = fill_threads or max(1, min(8, (os.cpu_count() or 2) // 2))
        self._batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-grammar-fill")
        # Compiles get their own thread: a large schema (up to ~1 s) must not hold up a step's fill.
        self._compile_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shardserve-grammar-compile")
        self._buffers: list[torch.Tensor | None] = [None, None]
        self._next_buffer = 0

    @property
    def bitmask_width(self) -> int:
        """int32 words per bitmask row: ``ceil(vocab_size / 32)``."""
        return (self.vocab_size + 31) // 32

    # --------------------------------------------------------------------------------- compile

    def compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        """The compiled grammar of ``spec`` (cached; a JSON schema takes milliseconds to seconds).

        Raises:
            InvalidStructuredOutputError: the payload does not compile (a spec from :mod:`.spec` has been
                validated already, so this is rare).
        """
        with self._cache_lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                self.cache_hits += 1
                return compiled
        compiled = self._compile(spec)
        with self._cache_lock:
            self.cache_misses += 1
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def compile_async(self, spec: StructuredOutputSpec) -> Future[xgr.CompiledGrammar]:
        """:meth:`compile` on the manager's compile thread, so a request waits for its grammar off the step loop."""
        return self._compile_pool.submit(self.compile, spec)

    def _compile(self, spec: StructuredOutputSpec) -> xgr.CompiledGrammar:
        c = self._compiler
        try:
            if spec.kind == "json":
                return c.compile_json_schema(
                    spec.payload,  # type: ignore[arg-type]
                    any_whitespace=spec.any_whitespace,
                    max_whitespace_cnt=MAX_WHITESPACE if spec.any_whitespace else None,
                )
            if spec.kind == "json_object":
                # Any JSON object: strict_mode off so properties are not limited to the (empty) list.
                schema = '{"type": "object"}'
                ws = MAX_WHITESPACE if spec.any_whitespace else None
                return c.compile_json_schema(
                    schema, any_whitespace=spec.any_whitespace, strict_mode=False, max_whitespace_cnt=ws
                )
            if spec.kind == "regex":
                return c.compile_regex(spec.payload)  # type: ignore[arg-type]
            if spec.kind == "lark":
                return c.compile_lark(spec.payload)  # type: ignore[arg-type]
            return c.compile_grammar(spec.ebnf())  # type: ignore[arg-type]
        except RuntimeError as exc:
            where = spec.param or spec.kind
            raise InvalidStructuredOutputError(f"{where}: {xgrammar_message(exc)}", where) from exc

    def matcher(self, spec: StructuredOutputSpec, reasoning_end_ids: Sequence[int] | None = None) -> GrammarMatcher:
        """A fresh matcher for one output sequence of a request with ``spec``.

        Args:
            reasoning_end_ids: token ids that end the reasoning section (``</think>``), for requests
                served with a reasoning parser: the grammar applies only after them.
        """
        return GrammarMatcher(self.compile(spec), reasoning_end_ids)

    # --------------------------------------------------------------------------------- bitmask

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """A ``(num_rows, bitmask_width)`` int32 CPU tensor with every token allowed."""
        return xgr.allocate_token_bitmask(num_rows, self.vocab_size)

    def fill_bitmask(self, matchers: Sequence[GrammarMatcher | None], bitmask: torch.Tensor) -> list[int]:
        """Fill ``bitmask[i]`` for each ``matchers[i]`` that has a grammar to apply now.

        Args:
            matchers: one entry per batch row; None for rows without a grammar.
            bitmask: ``(>= len(matchers), bitmask_width)`` int32 on the CPU.

        Returns:
            The rows to apply (grammar rows that are not reasoning and not terminated).
        """
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.in_reasoning and not m.is_terminated()]
        if rows:
            self._batch.batch_fill_next_token_bitmask([matchers[i]._matcher for i in rows], bitmask, rows)  # type: ignore[union-attr]
        return rows

    def submit_fill(self, matchers: Sequence[GrammarMatcher | None]) -> Future[GrammarBitmask] | None:
        """Fill the batch bitmask on the manager's thread; None when no row has a grammar (costs nothing).

        Call it once the previous step's tokens were accepted, while the device runs the forward pass,
        and wait for the future just before sampling. Until then the matchers must not accept tokens
        (:meth:`GrammarMatcher.accept_token` raises). Two buffers alternate, so a bitmask stays valid
        until the fill after next.
        """
        active = [m for m in matchers if m is not None]
        if not active:
            return None
        buffer = self._buffer(len(matchers))

        def release() -> None:
            for m in active:
                m._filling = False

        def work() -> GrammarBitmask:
            try:
                return GrammarBitmask(buffer, self.fill_bitmask(matchers, buffer))
            finally:
                release()

        for m in active:
            m._filling = True
        try:
            return self._pool.submit(work)
        except BaseException:  # e.g. after shutdown(): the matchers stay usable
            release()
            raise

    def fill_packed(self, matchers: Sequence[GrammarMatcher | None]) -> tuple[list[int], bytes]:
        """:meth:`fill_bitmask` on the calling thread into a reused buffer, packed for the ranks: ``(rows,
        bitmask[rows] as bytes)`` (``4 * bitmask_width`` bytes a row, in ``rows`` order); ``([], b"")`` when
        no row has a grammar to apply.

        This is what the engine calls once a step's tokens are accepted (the next step's forward is already
        running on the device). xgrammar fills the rows on its own C++ threads without the GIL; a hop to
        the manager's Python thread would only add its wake-up to the wait (the engine needs the bitmask
        at once, and a Python thread cannot run beside the engine's own Python work anyway).
        """
        if not any(m is not None for m in matchers):
            return [], b""
        buffer = self._buffer(len(matchers))
        return _pack_rows(buffer, self.fill_bitmask(matchers, buffer))

    def _buffer(self, num_rows: int) -> torch.Tensor:
        index = self._next_buffer
        self._next_buffer = 1 - index
        buf = self._buffers[index]
        if buf is None or buf.shape[0] < num_rows:
            pin = torch.cuda.is_available()  # pinned, so the copy to the device is asynchronous
            buf = torch.empty((max(num_rows, 64), self.bitmask_width), dtype=torch.int32, pin_memory=pin)
            self._buffers[index] = buf
        return buf[:num_rows]

    def shutdown(self) -> None:
        """Stop the background threads (pending fills and compiles finish first)."""
        self._pool.shutdown(wait=True)
        self._compile_pool.shutdown(wait=True)


def _pack_rows(buffer: torch.Tensor, rows: list[int]) -> tuple[list[int], bytes]:
    """``(rows, buffer[rows] as bytes)``; a contiguous run of rows is one slice (no gather)."""
    if not rows:
        return rows, b""
    if rows[-1] - rows[0] + 1 == len(rows):
        return rows, buffer[rows[0] : rows[-1] + 1].numpy().tobytes()
    return rows, buffer[rows].numpy().tobytes()


def apply_bitmask(
    logits: torch.Tensor, bitmask: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None
) -> None:
    """Set the logits of disallowed tokens to ``-inf`` in place, on the logits' device.

    Nothing here waits for the device: the kernels are queued behind the work already on its stream.

    Args:
        logits: ``(num_rows, vocab_size)`` float32/bf16/fp16 on any device (xgrammar's Triton kernel on
            CUDA, its C++ kernel on the CPU).
        bitmask: ``(num_rows, ceil(bitmask_vocab / 32))`` int32, best on the logits' device already; a CPU
            one is copied there without blocking (asynchronous only if it is pinned).
        rows: the rows to mask (a sequence, or an int tensor, best on the logits' device); the others are
            untouched. Empty returns at once; None masks every row.

    Logit columns beyond the bitmask's tokens (a vocabulary padded past the tokenizer's) are set to
    ``-inf`` in the masked rows: they are not tokens.
    """
    indices: list[int] | torch.Tensor | None
    if rows is None:
        indices = None
    elif isinstance(rows, torch.Tensor):
        if not rows.numel():
            return
        indices = rows.to(device=logits.device, dtype=torch.int32, non_blocking=True)
    else:
        if not len(rows):
            return
        indices = list(rows)
        if logits.is_cuda:  # a list becomes a pageable host tensor in xgrammar: copy it from pinned memory
            indices = to_device(np.asarray(indices, dtype=np.int32), logits.device)
    mask = bitmask if bitmask.device == logits.device else bitmask.to(logits.device, non_blocking=True)
    covered = mask.shape[-1] * 32
    xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=min(covered, logits.shape[-1]), indices=indices)
    if logits.shape[-1] > covered:
        if indices is None:
            logits[:, covered:] = float("-inf")
        else:
            index = indices if isinstance(indices, torch.Tensor) else torch.tensor(indices)
            logits[index.to(device=logits.device, dtype=torch.long), covered:] = float("-inf")
