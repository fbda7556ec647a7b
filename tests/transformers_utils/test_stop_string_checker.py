"""StopStringChecker: stop strings split over chunks are caught and never partly emitted."""

from __future__ import annotations

import random

import pytest

from shardserve.transformers_utils.detokenizer import StopStringChecker


def _run(stops: list[str], chunks: list[str]) -> tuple[list[str], str | None, str]:
    checker = StopStringChecker(stops)
    emitted: list[str] = []
    for chunk in chunks:
        text, stop = checker.process(chunk)
        emitted.append(text)
        if stop is not None:
            return emitted, stop, checker.flush()
    return emitted, None, checker.flush()


def test_stop_split_across_chunks() -> None:
    emitted, stop, rest = _run(["###"], ["Hello #", "#", "# world"])
    assert stop == "###"
    assert "".join(emitted) == "Hello "
    assert all("#" not in e for e in emitted)
    assert rest == ""


def test_false_start_is_released() -> None:
    emitted, stop, rest = _run(["STOP"], ["abc ST", "ORM and more"])
    assert stop is None
    assert "".join(emitted) + rest == "abc STORM and more"
    assert emitted[0] == "abc "  # "ST" held back until the next chunk decided it


def test_held_text_flushed_at_end() -> None:
    emitted, stop, rest = _run(["</end>"], ["value </e"])
    assert stop is None
    assert emitted == ["value "]
    assert rest == "</e"


def test_earliest_of_several_stops_wins() -> None:
    emitted, stop, _ = _run(["world", "lo w"], ["hel", "lo wor", "ld"])
    assert stop == "lo w"
    assert "".join(emitted) == "hel"


def test_no_stops_passes_through() -> None:
    emitted, stop, rest = _run([], ["a", "b"])
    assert (emitted, stop, rest) == (["a", "b"], None, "")


@pytest.mark.parametrize("seed", range(20))
def test_random_chunking_never_leaks_stop(seed: int) -> None:
    rng = random.Random(seed)
    stops = ["<|end|>", "\n\nUser:", "xyz"]
    body = "".join(rng.choice(["a", "b", "<", "|", "e", "\n", "U", "x", "y", " "]) for _ in range(60))
    text = body + rng.choice(stops) + "tail that must not appear"
    cuts = sorted(rng.sample(range(1, len(text)), 12))
    chunks = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
    emitted, stop, rest = _run(stops, chunks)
    first = min((text.find(s), s) for s in stops if s in text)
    assert stop == first[1]
    assert "".join(emitted) + rest == text[: first[0]]  # nothing of the stop or after it leaked
