"""Per-request sampling parameters, as vLLM and the OpenAI API name them."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from shardserve.structured_output.spec import StructuredOutputSpec

_GREEDY_EPS = 1e-5


class RequestOutputKind(enum.Enum):
    """What each output of a request carries (vLLM's names)."""

    DELTA = enum.auto()
    """Only what is new since the previous output (streaming)."""
    FINAL_ONLY = enum.auto()
    """One output when the request ends, with the whole text, tokens and logprobs."""


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Raises:
        ValueError: a parameter is out of range (the message names it).
    """

    n: int = 1
    """Completions per prompt."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy."""
    top_p: float = 1.0
    """Nucleus sampling: smallest set of tokens whose probability sums to at least top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Per-request seed for reproducible sampling."""
    repetition_penalty: float = 1.0
    """CTRL penalty (arXiv:1909.05858) on tokens of the prompt and output: >1 discourages repeats."""
    presence_penalty: float = 0.0
    """OpenAI presence penalty, subtracted once from every token already generated."""
    frequency_penalty: float = 0.0
    """OpenAI frequency penalty, subtracted per occurrence of a generated token."""
    max_tokens: int | None = 16
    """Tokens to generate at most; None runs to the context length."""
    min_tokens: int = 0
    """Tokens generated before EOS or stop token ids may end the request."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion; they are not included in the text."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the completion, in addition to EOS."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    logprobs: int | None = None
    """Return the log-probability of each sampled token and this many top alternatives; -1 is the whole
    vocabulary (the engine caps it at ``--max-logprobs`` and stores the number it returns)."""
    prompt_logprobs: int | None = None
    """Return the log-probability of each prompt token given its prefix, and this many top alternatives
    (vLLM's ``prompt_logprobs``; -1 is the whole vocabulary, capped like ``logprobs``)."""
    logit_bias: dict[int, float] | None = None
    """Token id -> value in [-100, 100] added to its logit before sampling (OpenAI's ``logit_bias``)."""
    allowed_token_ids: list[int] | None = None
    """Only these token ids may be sampled (vLLM's ``allowed_token_ids``)."""
    bad_words: list[str] | None = None
    """Words never generated: the last token of a word is banned where the tokens before it were just
    generated (each word is tokenized with and without a leading space, as vLLM does)."""
    structured_outputs: StructuredOutputSpec | None = None
    """The grammar the output must match (JSON schema, regex, choice, EBNF); see :mod:`shardserve.structured_output`."""
    reasoning_end_ids: list[int] | None = None
    """With ``structured_outputs``: token ids that close the reasoning section (``</think>``); the grammar
    applies only after the model produced them (the API layer sets it when a reasoning parser is on)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the detokenized text."""
    output_kind: RequestOutputKind = RequestOutputKind.DELTA
    """What each output carries: deltas (streams) or one final output."""

    MAX_LOGPROBS = 20
    SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
    """Seeds are int64, as in vLLM (``torch.Generator.manual_seed`` refuses values past 2**64)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.logit_bias is not None:
            self.logit_bias = {_token_id(k, "logit_bias"): v for k, v in self.logit_bias.items()}
        if self.bad_words is not None:
            self.bad_words = list(self.bad_words)
        if self.top_k == 0:
            self.top_k = -1
        self._validate()

    def _validate(self) -> None:
        floats = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
        for name in floats:
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        seed_ok = self.seed is None or self.SEED_MIN <= self.seed <= self.SEED_MAX - (self.n - 1)
        checks = [
            (seed_ok, "seed", f"must be in [-2**63, 2**63 - n] (int64; completion i uses seed + i), got {self.seed}"),
            (self.n >= 1, "n", f"must be at least 1, got {self.n}"),
            (self.temperature >= 0.0, "temperature", f"must be non-negative, got {self.temperature}"),
            (0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}"),
            (self.top_k == -1 or self.top_k >= 1, "top_k", f"must be -1 (all) or at least 1, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0.0, "repetition_penalty", f"must be positive, got {self.repetition_penalty}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                f"must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                f"must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens",
                f"must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, "min_tokens", f"must be non-negative, got {self.min_tokens}"),
            (
                self.logprobs is None or self.logprobs >= -1,
                "logprobs",
                f"must be -1 (whole vocabulary) or non-negative, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or self.prompt_logprobs >= -1,
                "prompt_logprobs",
                f"must be -1 (whole vocabulary) or non-negative, got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
            (all(_is_token_id(t) for t in self.stop_token_ids), "stop_token_ids", "must be non-negative token ids"),
            (
                self.bad_words is None or all(isinstance(w, str) and w.strip() for w in self.bad_words),
                "bad_words",
                "must be non-empty strings",
            ),
            (
                self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputSpec),
                "structured_outputs",
                "must be a StructuredOutputSpec (parse the request with shardserve.structured_output)",
            ),
            (
                self.reasoning_end_ids is None or (bool(self.reasoning_end_ids)
                                                   and all(_is_token_id(t) for t in self.reasoning_end_ids)),
                "reasoning_end_ids",
                "must be a non-empty list of token ids",
            ),
        ]  # fmt: skip
        for ok, name, message in checks:
            if not ok:
                raise ValueError(f"{name} {message}")
        self._validate_token_lists()

    def _validate_token_lists(self) -> None:
        for token, value in (self.logit_bias or {}).items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and -100.0 <= value <= 100.0):
                raise ValueError(f"logit_bias value for token {token} must be in [-100, 100], got {value!r}")
        allowed = self.allowed_token_ids
        if allowed is not None and (not allowed or not all(_is_token_id(t) for t in allowed)):
            raise ValueError("allowed_token_ids must be a non-empty list of non-negative token ids")

    @property
    def greedy(self) -> bool:
        """Temperature is (close to) zero: take the argmax."""
        return self.temperature < _GREEDY_EPS

    def token_ids_outside(self, vocab_size: int) -> tuple[str, int] | None:
        """The first (field, token id) of ``logit_bias``, ``allowed_token_ids`` or ``stop_token_ids`` that is
        not below ``vocab_size``, None when all are."""
        fields = (("logit_bias", self.logit_bias or ()), ("allowed_token_ids", self.allowed_token_ids or ()),
                  ("stop_token_ids", self.stop_token_ids))  # fmt: skip
        for name, ids in fields:
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                return name, bad
        return None

    @property
    def has_penalties(self) -> bool:
        """Any of the repetition, presence or frequency penalties is active."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def _is_token_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _token_id(key: object, name: str) -> int:
    """A token id given as an int or a decimal string (JSON object keys are strings).

    Raises:
        ValueError: not a non-negative integer.
    """
    try:
        token = int(key) if isinstance(key, (int, str)) and not isinstance(key, bool) else -1
    except ValueError:
        token = -1
    if token < 0:
        raise ValueError(f"{name} keys must be non-negative token ids, got {key!r}")
    return token
