"""SamplingParams refuses what the engine cannot take, for the offline API too."""

from __future__ import annotations

import math

import pytest

from shardserve.sampling_params import SamplingParams


@pytest.mark.parametrize(
    "kw, name",
    [({"seed": 2**63}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 2**63 - 2, "n": 3}, "seed"),
     ({"temperature": math.nan}, "temperature"), ({"top_p": math.nan}, "top_p"),
     ({"repetition_penalty": math.inf}, "repetition_penalty"), ({"min_p": math.nan}, "min_p"),
     ({"presence_penalty": -math.inf}, "presence_penalty"), ({"frequency_penalty": math.nan}, "frequency_penalty")],
)  # fmt: skip
def test_out_of_range_values_raise_naming_the_field(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        SamplingParams(**kw)


def test_int64_seeds_are_accepted():
    assert SamplingParams(seed=2**63 - 1).seed == 2**63 - 1
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    assert SamplingParams(seed=2**63 - 3, n=3).n == 3
