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


@pytest.mark.parametrize(
    "kw, name",
    [({"logit_bias": {5: 100.5}}, "logit_bias"), ({"logit_bias": {5: math.nan}}, "logit_bias"),
     ({"logit_bias": {"x": 1.0}}, "logit_bias"), ({"logit_bias": {-1: 1.0}}, "logit_bias"),
     ({"allowed_token_ids": []}, "allowed_token_ids"), ({"allowed_token_ids": [-3]}, "allowed_token_ids"),
     ({"bad_words": [""]}, "bad_words"), ({"prompt_logprobs": -2}, "prompt_logprobs"), ({"logprobs": -2}, "logprobs"),
     ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"structured_outputs": {"json": {}}}, "structured_outputs"),
     ({"reasoning_end_ids": []}, "reasoning_end_ids")],
)  # fmt: skip
def test_new_fields_are_validated_naming_the_field(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} "):
        SamplingParams(**kw)


def test_logit_bias_keys_may_be_json_strings_and_whole_vocabulary_logprobs_are_minus_one():
    p = SamplingParams(logit_bias={"17": -100, 3: 2.5}, logprobs=-1, prompt_logprobs=-1)
    assert p.logit_bias == {17: -100, 3: 2.5}
    assert p.token_ids_outside(18) is None and p.token_ids_outside(17) == ("logit_bias", 17)
