"""Tokenizer built from GGUF metadata or a Hugging Face tokenizer directory.

Both paths end in one :class:`Tokenizer` wrapping a ``tokenizers.Tokenizer`` (the Rust backend),
plus the facts the server needs around it: BOS/EOS, the set of token ids that end a turn, whether
BOS is prepended, and the chat template.

The GGUF byte-level BPE ("gpt2") path reproduces what ``transformers`` builds for the same file
(``transformers/integrations/gguf/gguf_tokenizer_mapping.py``: ``byte_level_tokenizer``,
``add_gguf_special_tokens``, ``set_split_regex``) with ``tokenizers`` building blocks, so encodings
match ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` token for token.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from shardserve.transformers_utils.chat_template import render_chat_template

logger = logging.getLogger(__name__)

# GGUF token types (llama.cpp ``llama_token_type``).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Special tokens that end a turn; llama.cpp's ``special_eog_ids`` heuristic (src/llama-vocab.cpp).
# Counted only when the token is in the vocabulary and marked special.
END_OF_TURN_TOKENS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)

# Pre-tokenizer split regexes by GGUF ``tokenizer.ggml.pre``, as transformers maps them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        (
            "llama3",
            "llama-v3",
            "llama-bpe",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
            "dbrx",
            "smaug-bpe",
        ),
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
"""``tokenizer.ggml.pre`` -> split regex; other values (e.g. "smollm", "gpt2") use GPT-2's ByteLevel regex."""


class Tokenizer:
    """A ``tokenizers.Tokenizer`` plus BOS/EOS facts and the chat template.

    Attributes:
        backend: the Rust tokenizer; its post-processor adds BOS (and EOS) exactly when
            ``add_bos_token`` (``add_eos_token``) is set.
        vocab_size: tokens the tokenizer knows, added tokens included (may be below the model's
            embedding rows, which are padded).
        bos_token / bos_token_id, eos_token / eos_token_id: None when the model has none.
        eos_token_ids: ids that end generation: EOS, the end-of-turn tokens of the vocabulary
            (:data:`END_OF_TURN_TOKENS`, GGUF ``eot``/``eom`` ids) and ``generation_config`` EOS ids.
        add_bos_token: ``encode(..., add_special_tokens=True)`` prepends BOS.
        chat_template: default Jinja2 chat template, or None.
        chat_templates: named templates (e.g. ``tool_use``), default under ``"default"``.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos_token: bool,
        chat_template: str | None = None,
        chat_templates: Mapping[str, str] | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        extra_eos_token_ids: Iterable[int] = (),
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.bos_token_id: int | None = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_id: int | None = backend.token_to_id(eos_token) if eos_token is not None else None
        self.add_bos_token = bool(add_bos_token and self.bos_token_id is not None)
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates.setdefault("default", chat_template)
        self.chat_template: str | None = self.chat_templates.get("default")
        self._special_ids: frozenset[int] = frozenset(
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        )
        self.eos_token_ids: set[int] = self._collect_eos_ids(extra_eos_token_ids)

    def _collect_eos_ids(self, extra: Iterable[int]) -> set[int]:
        ids = {int(i) for i in extra if i is not None and i >= 0}
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        for text in END_OF_TURN_TOKENS:
            token_id = self.backend.token_to_id(text)
            if token_id is not None and token_id in self._special_ids:
                ids.add(token_id)
        return ids

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"eos_token_ids={sorted(self.eos_token_ids)}, add_bos_token={self.add_bos_token})"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<|im_start|>``) become their ids.

        With ``add_special_tokens`` BOS is prepended only if ``add_bos_token`` (as transformers does).
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut multi-byte character) shows as U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary strings of ``ids`` (byte-level spelling, e.g. ``"Ġhello"``)."""
        return [self.backend.id_to_token(int(i)) for i in ids]

    def id_to_piece_text(self, token_id: int) -> str:
        """Decoded text of one token, special tokens included (for logprobs); a partial UTF-8
        character decodes to U+FFFD."""
        return self.backend.decode([int(token_id)], skip_special_tokens=False)

    def is_special(self, token_id: int) -> bool:
        """The token is an added special token (control token in GGUF terms)."""
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to prompt text, as ``transformers`` ``apply_chat_template(tokenize=False)``.

        Uses the ``tool_use`` template when ``tools`` are given and the model has one.

        Raises:
            ValueError: the model has no chat template, or the template fails (see
                :func:`render_chat_template`).
        """
        template = self.chat_templates.get("tool_use") if tools else None
        template = template or self.chat_template
        if template is None:
            raise ValueError(
                "this model has no chat template (no tokenizer.chat_template in the GGUF, no chat_template in "
                "tokenizer_config.json or chat_template.jinja); use the completions API with a raw prompt"
            )
        special = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "unk_token": self.unk_token,
            "pad_token": self.pad_token,
        }
        return render_chat_template(
            template,
            messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            special_tokens=special,
            **kwargs,
        )


def load_tokenizer(path: str | Path, format: str, generation_config: dict | None = None) -> Tokenizer:
    """Load the tokenizer of a model.

    Args:
        path: a ``.gguf`` file (``format="gguf"``), or a directory holding ``tokenizer.json``
            (``format="hf"``); for "gguf" a directory with exactly one ``.gguf`` file is accepted.
        format: "gguf" or "hf".
        generation_config: parsed ``generation_config.json``; its ``eos_token_id`` (int or list)
            joins :attr:`Tokenizer.eos_token_ids`.

    Raises:
        ValueError: unknown format, missing files, or a GGUF tokenizer model this code cannot build.
    """
    path = Path(path)
    extra_eos = _generation_config_eos(generation_config)
    if format == "gguf":
        tokenizer = load_gguf_tokenizer(_resolve_gguf(path), extra_eos)
    elif format == "hf":
        tokenizer = load_hf_tokenizer(path, extra_eos)
    else:
        raise ValueError(f"unknown tokenizer format {format!r}; expected 'gguf' or 'hf'")
    logger.info("loaded %s tokenizer from %s: %r", format, path, tokenizer)
    return tokenizer


def _generation_config_eos(generation_config: dict | None) -> list[int]:
    eos = (generation_config or {}).get("eos_token_id")
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(i) for i in eos]


def _resolve_gguf(path: Path) -> Path:
    if path.is_dir():
        files = sorted(path.glob("*.gguf"))
        if len(files) != 1:
            raise ValueError(f"expected exactly one .gguf file in {path}, found {len(files)}")
        return files[0]
    if not path.is_file():
        raise ValueError(f"GGUF file not found: {path}")
    return path


# ---------------------------------------------------------------------------------------------- GGUF


def read_gguf_tokenizer_metadata(reader: Any) -> dict[str, Any]:
    """The ``tokenizer.*`` and ``general.architecture`` fields of an open ``gguf.GGUFReader``.

    Values are Python scalars, ``str`` or lists of them.
    """
    meta: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("tokenizer.") or name == "general.architecture":
            meta[name] = _gguf_field_value(field)
    return meta


def _gguf_field_value(field: Any) -> Any:
    from gguf import GGUFValueType

    def one(part: Any, value_type: Any) -> Any:
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8", errors="replace")
        return part.tolist()[0]

    if field.types[0] == GGUFValueType.ARRAY:
        return [one(field.parts[i], field.types[-1]) for i in field.data]
    return one(field.parts[field.data[0]], field.types[0])


def load_gguf_tokenizer(gguf_path: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
    """Tokenizer from a GGUF file's metadata (reads the header with ``gguf.GGUFReader``).

    Raises:
        ValueError: the file has no tokenizer, or a model type other than "gpt2" while
            ``transformers`` (the fallback converter) is not importable.
    """
    from gguf import GGUFReader

    meta = read_gguf_tokenizer_metadata(GGUFReader(str(gguf_path), "r"))
    return tokenizer_from_gguf_metadata(meta, gguf_path=gguf_path, extra_eos_token_ids=extra_eos_token_ids)


def tokenizer_from_gguf_metadata(
    meta: Mapping[str, Any], gguf_path: str | Path | None = None, extra_eos_token_ids: Iterable[int] = ()
) -> Tokenizer:
    """Tokenizer from already-read GGUF metadata (see :func:`read_gguf_tokenizer_metadata`).

    ``gguf_path`` is needed only for the transformers fallback (SentencePiece and other non-BPE models).
    """
    model_type = meta.get("tokenizer.ggml.model")
    if model_type is None or "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"GGUF file {gguf_path} holds no tokenizer (no tokenizer.ggml.model/tokens)")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    named = _gguf_named_tokens(meta, tokens)
    if model_type == "gpt2":
        backend = _byte_level_bpe_backend(meta)
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        _set_post_processor(backend, named["bos_token"] if add_bos else None, named["eos_token"] if add_eos else None)
    else:
        backend, add_bos = _transformers_gguf_backend(model_type, gguf_path)
    templates = {"default": meta.get("tokenizer.chat_template")}
    prefix = "tokenizer.chat_template."
    templates.update({k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)})
    extra = list(extra_eos_token_ids)
    extra += [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return Tokenizer(
        backend,
        add_bos_token=add_bos,
        chat_templates={k: v for k, v in templates.items() if v},
        extra_eos_token_ids=extra,
        **named,
    )


def _gguf_named_tokens(meta: Mapping[str, Any], tokens: list[str]) -> dict[str, str | None]:
    keys = {
        "bos_token": "bos_token_id",
        "eos_token": "eos_token_id",
        "unk_token": "unknown_token_id",
        "pad_token": "padding_token_id",
    }
    named: dict[str, str | None] = {}
    for name, key in keys.items():
        token_id = meta.get(f"tokenizer.ggml.{key}")
        named[name] = tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None
    return named


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (openai/gpt-2 encoder.py)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _byte_level_bpe_backend(meta: Mapping[str, Any]) -> BackendTokenizer:
    """Byte-level BPE with GPT-2's ByteLevel pre-tokenizer/decoder, the file's split regex and its
    control/user-defined tokens added whole (transformers' ``byte_level_tokenizer`` +
    ``add_gguf_special_tokens`` + ``set_split_regex``)."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    # A token stored as raw text (outside the byte alphabet) is respelled in it, as the merges are.
    vocab = {
        tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8")): i
        for i, tok in enumerate(tokens)
    }
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    backend = BackendTokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    split = GGUF_PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    _add_gguf_added_tokens(backend, meta, alphabet)
    return backend


def _add_gguf_added_tokens(backend: BackendTokenizer, meta: Mapping[str, Any], alphabet: set[str]) -> None:
    """Control tokens become special added tokens; user-defined ones (``<think>``) plain added tokens;
    BOS/EOS/UNK/PAD are special too. All are matched whole in the text."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or []
    # A "control" token spelled outside the byte alphabet is a llama.cpp mislabel: skip it, as transformers does.
    control = [t for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_CONTROL and set(t) <= alphabet]
    vocab = backend.get_vocab(with_added_tokens=False)
    user = [t for t, kind in zip(tokens, types) if kind == _TOKEN_TYPE_USER_DEFINED and t in vocab]
    named = _gguf_named_tokens(meta, tokens)
    control = list(dict.fromkeys(control + [t for t in named.values() if t is not None and t not in user]))
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])


def _set_post_processor(backend: BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """``[BOS] $A [EOS]`` with each part present only when given (transformers' ``update_post_processor``)."""
    single = " ".join([f"{bos}:0"] * (bos is not None) + ["$A:0"] + [f"{eos}:0"] * (eos is not None))
    pair = single + " " + " ".join([f"{bos}:1"] * (bos is not None) + ["$B:1"] + [f"{eos}:1"] * (eos is not None))
    special = [(t, backend.token_to_id(t)) for t in (bos, eos) if t is not None]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def _transformers_gguf_backend(model_type: str, gguf_path: str | Path | None) -> tuple[BackendTokenizer, bool]:
    """Non-BPE GGUF tokenizers (SentencePiece "llama", "t5", ...) through transformers' converter."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:
        raise ValueError(
            f"GGUF tokenizer model {model_type!r} is built only through transformers' converter, and transformers "
            "is not importable; install transformers (and sentencepiece) or use a byte-level BPE ('gpt2') model"
        ) from e
    if gguf_path is None:
        raise ValueError(f"GGUF tokenizer model {model_type!r} needs the GGUF file path for transformers' converter")
    gguf_path = Path(gguf_path)
    hf = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, local_files_only=True)
    return hf.backend_tokenizer, bool(getattr(hf, "add_bos_token", False))


# ------------------------------------------------------------------------------------------ HF dir


def load_hf_tokenizer(directory: str | Path, extra_eos_token_ids: Iterable[int] = ()) -> Tokenizer:
    """Tokenizer from a Hugging Face directory: ``tokenizer.json`` + ``tokenizer_config.json``
    (+ ``chat_template.jinja`` / ``chat_template.json`` when present).

    ``tokenizer.json``'s post-processor decides what ``encode`` adds (transformers >= 5 ignores
    ``add_bos_token``/``add_eos_token`` of tokenizer_config.json when tokenizer.json exists);
    ``add_bos_token`` reports whether it prepends BOS.

    Raises:
        ValueError: ``tokenizer.json`` is missing.
    """
    directory = Path(directory)
    tokenizer_file = directory / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ValueError(f"no tokenizer.json in {directory}; a Hugging Face tokenizer directory needs one")
    backend = BackendTokenizer.from_file(str(tokenizer_file))
    config = _read_json(directory / "tokenizer_config.json")
    _mark_config_special_tokens(backend, config)
    named = {k: _token_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    bos_id = backend.token_to_id(named["bos_token"]) if named["bos_token"] else None
    add_bos = bos_id is not None and backend.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return Tokenizer(
        backend,
        add_bos_token=add_bos,
        chat_templates=_hf_chat_templates(directory, config),
        extra_eos_token_ids=extra_eos_token_ids,
        **named,
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_content(value: Any) -> str | None:
    """``"<s>"`` or ``{"content": "<s>", ...}`` (serialized AddedToken) -> ``"<s>"``."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _mark_config_special_tokens(backend: BackendTokenizer, config: Mapping[str, Any]) -> None:
    """Add ``added_tokens_decoder`` entries of tokenizer_config.json that tokenizer.json lacks, and
    make the named BOS/EOS/UNK/PAD tokens special added tokens (as transformers does)."""
    known = backend.get_added_tokens_decoder()
    added = {tok.content for tok in known.values()}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        content = _token_content(config.get(key))
        if content is not None and content not in added:
            backend.add_special_tokens([AddedToken(content, normalized=False, special=True)])
            added.add(content)
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        if int(index) in known or not isinstance(entry, dict):
            continue
        token = AddedToken(
            entry["content"],
            single_word=entry.get("single_word", False),
            lstrip=entry.get("lstrip", False),
            rstrip=entry.get("rstrip", False),
            normalized=entry.get("normalized", not entry.get("special", False)),
            special=entry.get("special", False),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])


def _hf_chat_templates(directory: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named chat templates; ``chat_template.jinja`` > ``chat_template.json`` > tokenizer_config.json."""
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # [{"name": ..., "template": ...}, ...]
        templates.update({t["name"]: t["template"] for t in raw})
    json_template = _read_json(directory / "chat_template.json").get("chat_template")
    if isinstance(json_template, str):
        templates["default"] = json_template
    for extra in sorted((directory / "additional_chat_templates").glob("*.jinja")):
        templates[extra.stem] = extra.read_text(encoding="utf-8")
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    return templates
