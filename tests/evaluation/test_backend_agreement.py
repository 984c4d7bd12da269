"""``backend_agreement``: the first cause of a disagreement between two backends' traces of one document."""

import dataclasses

import pytest
import torch

from nemo_viper.evaluation.backend_agreement import compare_document, first_difference, logprob_margin
from nemo_viper.evaluation.backend_trace import Trace


def _trace(**changes) -> Trace:
    base = Trace(doc_id=0, prompt_ids=[1, 2, 3, 9, 9, 4], pixel_values=torch.linspace(-1, 1, 12).reshape(2, 6),
                 image_grid_thw=[[1, 2, 2]], dtype="bfloat16", stop_ids=[7], max_new_tokens=8,
                 generated_ids=[5, 6, 5, 7], top_logprobs=[{5: -0.1, 6: -2.5}, {6: -0.2, 5: -1.9},
                                                          {5: -0.69, 6: -0.70, 8: -4.0}, {7: -0.01}])
    return dataclasses.replace(base, **changes)


def _sample(response="5 6 5", score=1.0):
    return {"response": response, "score": score}


@pytest.mark.parametrize("changes, cause", [
    ({}, ""),
    ({"prompt_ids": [1, 2, 3, 9, 9, 9, 4]}, "prompt"),
    ({"image_grid_thw": [[1, 2, 4]], "pixel_values": torch.zeros(4, 6)}, "image size"),
    ({"pixel_values": torch.linspace(-1, 1, 12).reshape(2, 6) + 0.01}, "image pixels"),
    ({"pixel_values": None}, "image pixels"),
    ({"dtype": "float32"}, "dtype"),
    ({"stop_ids": [7, 8]}, "stopping settings"),
    ({"max_new_tokens": 4096}, "stopping settings"),
    ({"repetition_penalty": 1.05}, "repetition penalty"),
    ({"generated_ids": [5, 6, 6, 7]}, "numerics"),
    ({"generated_ids": [5, 6, 5]}, "stopping"),
])
def test_the_first_differing_input_is_the_cause(changes, cause):
    result = compare_document(0, _trace(**changes), _trace(), _sample(), _sample())
    assert result.cause == cause
    assert result.answers_equal and result.verdicts_equal


def test_equal_tokens_with_other_text_are_a_detokenization_difference():
    result = compare_document(0, _trace(), _trace(), _sample("5 6 5"), _sample("565", score=0.0))
    assert result.cause == "detokenization" and not result.answers_equal and not result.verdicts_equal


def test_divergence_position_and_vllm_margin():
    result = compare_document(3, _trace(generated_ids=[5, 6, 6, 7]), _trace(), _sample(), _sample())
    assert (result.doc_id, result.diverge_at, result.prompt_diff_at) == (3, 2, None)
    assert result.margin_b == pytest.approx(0.01)  # b: a near-tie, -0.69 vs -0.70
    assert result.margin_a == pytest.approx(-0.01)  # a's log-probs here rank b's token first: negative
    flipped = compare_document(3, _trace(generated_ids=[5, 6, 6, 7], top_logprobs=[{}, {}, {6: -0.3, 5: -1.5}]),
                               _trace(), _sample(), _sample())
    assert flipped.margin_a == pytest.approx(1.2) and flipped.margin_b == pytest.approx(0.01)
    assert result.pixel_max_abs_diff == 0.0
    prompt = compare_document(0, _trace(prompt_ids=[1, 2, 3, 9, 4]), _trace(), _sample(), _sample())
    assert prompt.prompt_diff_at == 4


def test_margin_to_a_token_outside_the_top_k_is_the_gap_to_the_kth():
    top = [{5: -0.1, 6: -2.5}]
    assert logprob_margin(top, 0, chosen=5, other=6) == pytest.approx(2.4)
    assert logprob_margin(top, 0, chosen=5, other=99) == pytest.approx(2.4)  # a lower bound
    assert logprob_margin(top, 1, chosen=5, other=6) is None
    assert logprob_margin(top, 0, chosen=99, other=5) is None


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 4, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
