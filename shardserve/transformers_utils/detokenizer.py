"""Streaming text out of generated token ids: incremental detokenization and stop strings."""

from __future__ import annotations

import logging

from shardserve.transformers_utils.tokenizer import Tokenizer

try:  # tokenizers >= 0.21.1: the same algorithm in Rust, one call per token
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python form below
    DecodeStream = None

logger = logging.getLogger(__name__)

# Prompt tokens kept as left context for the first decode window (vLLM's
# INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET, vllm/transformers_utils/detokenizer_utils.py).
_INITIAL_PREFIX_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turn generated token ids into text a few tokens at a time.

    The prefix/read-offset algorithm of vLLM's ``detokenize_incrementally``: keep two offsets into
    the token ids; ``ids[prefix_offset:read_offset]`` were already emitted and serve as left context.
    Each new token decodes the window ``ids[prefix_offset:]`` and emits only what it adds beyond the
    decoded context. Decoding with left context keeps SentencePiece/byte-level leading spaces right,
    and a window that ends in U+FFFD (an unfinished multi-byte character) emits nothing until the
    character completes. The window is the tokens since the last emission, so each token costs O(1)
    in the output length.

    With a :class:`Tokenizer` and ``tokenizers`` >= 0.21.1 the same algorithm runs in Rust
    (``tokenizers.decoders.DecodeStream``, as vLLM's ``FastIncrementalDetokenizer``): one call per token
    instead of two decodes and the list work around them, about 4x less host time per token, which
    the engine pays for every streamed token of every running request. The stream is primed with the
    prompt tail (its text is not emitted). If the stream gives up on a window (``Invalid prefix``: a
    decode that does not extend the previous one), the request continues on the Python form with the
    last tokens as context.

    Args:
        tokenizer: the model's tokenizer.
        prompt_token_ids: the prompt; its last tokens are the left context of the first output token.
        skip_special_tokens: leave special tokens (``<|im_end|>``) out of the text.
    """

    _KEEP = _INITIAL_PREFIX_TOKENS + 2
    """Prompt or output tokens kept as context (vLLM keeps ``_INITIAL_PREFIX_TOKENS`` + 2)."""

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        # Only the prompt tail matters.
        self._ids: list[int] = [int(t) for t in prompt_token_ids[-self._KEEP :]]
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - _INITIAL_PREFIX_TOKENS, 0)
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        backend = getattr(tokenizer, "backend", None)
        self._backend = backend
        self._stream = None
        self._unemitted = 0
        """Tokens the stream holds back (an unfinished character)."""
        if DecodeStream is not None and backend is not None:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
            for t in self._ids:
                self._stream.step(backend, t)

    @property
    def output_text(self) -> str:
        """All text emitted so far (held-back unfinished characters excluded)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
        return self._text_cache

    def add(self, token_ids: list[int]) -> str:
        """Append generated ``token_ids`` and return the text they complete ("" if none yet)."""
        if len(token_ids) == 1:
            new = self._add_one(int(token_ids[0]))
        else:
            new = "".join([self._add_one(int(t)) for t in token_ids])
        if new:
            self._chunks.append(new)
            self._text_cache = None
        return new

    def _add_one(self, token_id: int) -> str:
        ids = self._ids
        if self._stream is not None:
            try:
                text = self._stream.step(self._backend, token_id)
            except Exception as e:  # noqa: BLE001 (tokenizers raises a plain Exception: "Invalid prefix encountered")
                logger.debug("incremental detokenization falls back to the Python form: %s", e)
                self._stream = None
                del ids[: -(self._KEEP + self._unemitted)]
                self._read_offset = len(ids) - self._unemitted  # tokens the stream held back come out next
                self._prefix_offset = max(self._read_offset - _INITIAL_PREFIX_TOKENS, 0)
            else:
                ids.append(token_id)  # context for that fallback, bounded
                self._unemitted = 0 if text else self._unemitted + 1
                if len(ids) > 8 * self._KEEP + self._unemitted:
                    del ids[: -(self._KEEP + self._unemitted)]
                return text or ""
        ids.append(token_id)
        decode = self.tokenizer.decode
        window = ids[self._prefix_offset :]
        prefix_text = decode(window[: self._read_offset - self._prefix_offset], self.skip_special_tokens)
        new_text = decode(window, self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR):
            return ""
        # Drop ids left of the new prefix so the list (and the window) stays bounded.
        del ids[: self._read_offset]
        self._prefix_offset, self._read_offset = 0, len(ids)
        return new_text[len(prefix_text) :]


def decode_completion(
    tokenizer: Tokenizer, prompt_token_ids: list[int], token_ids: list[int], skip_special_tokens: bool = True
) -> str:
    """The text of a whole completion in one decode, as :class:`IncrementalDetokenizer` would emit it.

    The last prompt tokens are the left context (so leading spaces come out right) and an unfinished
    multi-byte character at the end is left out, as the incremental form holds it back.
    """
    context = list(prompt_token_ids[-_INITIAL_PREFIX_TOKENS:])
    prefix = tokenizer.decode(context, skip_special_tokens) if context else ""
    text = tokenizer.decode(context + list(token_ids), skip_special_tokens)
    if not text.startswith(prefix):  # a tokenizer whose decode is not prefix-stable: decode the output alone
        text, prefix = tokenizer.decode(list(token_ids), skip_special_tokens), ""
    return text[len(prefix) :].rstrip(_REPLACEMENT_CHAR)


class StopStringChecker:
    """Cut streamed text at the first stop string, never emitting any part of one.

    Text that could be the start of a stop string is held back until the next chunk decides it.
    The stop string itself is not emitted (OpenAI semantics).

    Args:
        stops: stop strings; empty strings are ignored.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """A stop string was found; later calls emit nothing."""
        return self._stopped

    def process(self, new_text: str) -> tuple[str, str | None]:
        """Feed the next chunk of text.

        Returns:
            ``(text safe to emit now, matched stop string or None)``. On a match the text is
            everything before the stop string; after a match every call returns ``("", None)``.
        """
        if self._stopped:
            return "", None
        if not self.stops:
            return new_text, None
        text = self._held + new_text
        hit = self._first_stop(text)
        if hit is not None:
            index, stop = hit
            self._held, self._stopped = "", True
            return text[:index], stop
        keep = self._partial_stop_len(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], None

    def flush(self) -> str:
        """Held-back text, to emit when generation ends without a stop string."""
        held, self._held = self._held, ""
        return "" if self._stopped else held

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self.stops:
            index = text.find(stop)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        return best

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        longest = min(len(text), max(len(s) for s in self.stops) - 1)
        for k in range(longest, 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0
