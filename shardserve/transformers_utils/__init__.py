"""Tokenizer, chat templates and detokenization."""

from shardserve.transformers_utils.detokenizer import IncrementalDetokenizer, StopStringChecker
from shardserve.transformers_utils.tokenizer import Tokenizer, load_tokenizer

__all__ = ["IncrementalDetokenizer", "StopStringChecker", "Tokenizer", "load_tokenizer"]
