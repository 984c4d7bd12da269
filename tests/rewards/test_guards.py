"""Reward-hacking guards: the contradiction rules, the coverage term, the precision/recall alert, and their
measured effect on the hack cases of benchmarks/reward_hacking.py with the packaged MiniLM."""

import logging
import sys
from pathlib import Path

import pytest

from nemo_viper.rewards import RewardConfig, ViperReward
from nemo_viper.rewards.guards import contradicts, operation

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize(
    "answer,truth",
    [
        ("Replace the cat with a dog.", "Replace the dog with a cat."),
        ("Change the car from blue to red.", "Change the car from red to blue."),
        ("Turn the sign into green.", "Turn the sign into red."),
        ("The lamp changes from off to on.", "The lamp changes from on to off."),
        ("Move the cup to the left.", "Move the cup to the right."),
        ("The car is not red.", "The car is red."),
        ("There aren't two dogs.", "There are two dogs."),
    ],
)
def test_contradictions(answer, truth):
    assert contradicts(answer, truth) and contradicts(truth, answer)


@pytest.mark.parametrize(
    "answer,truth",
    [
        ("Replace the dog with a cat.", "Replace the dog with a cat."),
        ("Replace the dog with a kitten.", "Remove the dog."),  # different operations: left to the embedding
        ("Change the car to blue.", "Change the car from red to blue."),  # no 'from' on one side
        ("The car is red.", "The car is red, not blue."),  # the truth negates something else
        ("Two dogs sit on the grass.", "There are two dogs on the grass."),
    ],
)
def test_no_contradiction(answer, truth):
    assert not contradicts(answer, truth)


def test_operation_arguments_are_ordered_and_normalised():
    assert operation("Replace the red car with a blue bus.") == ("replace", ("red car", "blue bus"))
    assert operation("Paint the colour of the door from white to black.") == ("change", ("door", "white", "black"))


def test_min_coverage_scales_by_recall():
    from test_semantic import AUTO, DOGS, RED, TableEmbedder, respond

    [plain] = ViperReward(RewardConfig(), embedder=TableEmbedder()).score([respond(AUTO)], [[RED, DOGS]], ["s"])
    [cov] = ViperReward(RewardConfig(min_coverage=0.8), embedder=TableEmbedder()).score([respond(AUTO)], [[RED, DOGS]],
                                                                                         ["s"])
    assert plain.correctness == 1.0 and plain.recall < 0.8
    assert cov.correctness == pytest.approx(plain.recall / 0.8)


def test_precision_recall_gap_is_counted_and_logged_once(caplog):
    from test_semantic import AUTO, DOGS, RED, TableEmbedder, respond

    reward = ViperReward(RewardConfig(alert_gap=0.3), embedder=TableEmbedder())
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            reward.score([respond(AUTO)], [[RED, DOGS]], [f"s{i}"])  # precision 1, recall ~0.5
    assert reward.warnings["precision_recall_gap"] == 3
    assert caplog.text.count("mean precision exceeds mean recall") == 1


def test_measured_effect_of_each_guard_on_the_hack_cases():
    """The numbers documented in docs/rewards.md (packaged MiniLM)."""
    from reward_hacking import measure

    table, cosines = measure()
    default, f1 = "precision (default)", "f1"
    assert table["safe-1"][default] == 1.0 > table["honest-4"][default]  # the hack the guards address
    assert table["safe-1"][f1] < table["honest-4"][f1]
    assert table["safe-1"]["precision + min_coverage 0.5"] < table["honest-4"]["precision + min_coverage 0.5"]
    for case in ("negation", "reversed-edit", "reversed-colour"):
        assert cosines[case] > 0.85 and table[case][default] == 1.0  # an embedding alone pays for the reversal
        assert table[case]["precision + contradiction_guard"] == 0.0
    assert table["honest-4"]["precision + contradiction_guard"] == table["honest-4"][default]  # no honest loss
