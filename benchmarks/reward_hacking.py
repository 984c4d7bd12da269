"""What each reward-hacking guard does to the hack cases below, with the packaged all-MiniLM-L6-v2.

Cases (ground truth -> response):

- ``safe-1``: four caption corrections -> one of them, copied (the "state one safe fact" hack);
- ``honest-4``: the same four -> a paraphrase of each (what an honest answer looks like);
- ``negation``: "The car is red." -> "The car is not red.";
- ``reversed-edit``: "Replace the dog with a cat." -> "Replace the cat with a dog.";
- ``reversed-colour``: "Change the car from red to blue." -> "Change the car from blue to red.".

Columns: the correctness reward ``R_correct`` (before the 0.95 weight) under the default (precision), ``f1``,
precision with ``min_coverage=0.5``, and precision with ``contradiction_guard``; plus the best cosine of the
single-sentence cases. Prints a Markdown table (the one in ``docs/rewards.md``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/reward_hacking.py
"""

from __future__ import annotations

from nemo_viper.rewards import RewardConfig, SentenceTransformerEmbedder, ViperReward

CORRECTIONS = ["The car is red, not blue.", "There are two dogs on the grass.", "The sign above the door reads OPEN.",
               "A woman holds a yellow umbrella."]
CASES = {
    "safe-1": (CORRECTIONS, ["There are two dogs on the grass."]),
    "honest-4": (CORRECTIONS, ["The car is red.", "Two dogs lie on the grass.", "The sign over the door says OPEN.",
                               "The woman is holding an umbrella that is yellow."]),
    "negation": (["The car is red."], ["The car is not red."]),
    "reversed-edit": (["Replace the dog with a cat."], ["Replace the cat with a dog."]),
    "reversed-colour": (["Change the car from red to blue."], ["Change the car from blue to red."]),
}
SETTINGS = {
    "precision (default)": {},
    "f1": {"mode": "f1"},
    "precision + min_coverage 0.5": {"min_coverage": 0.5},
    "precision + contradiction_guard": {"contradiction_guard": True},
}


def respond(sentences: list[str]) -> str:
    return "<think>I compare the image with the caption.</think><answer>" + "\n".join(sentences) + "</answer>"


def measure() -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    embedder = SentenceTransformerEmbedder(RewardConfig().embedding_model_path(), device="cpu")
    table, cosines = {}, {}
    for setting, overrides in SETTINGS.items():
        reward = ViperReward(RewardConfig(**overrides), embedder=embedder)
        for case, (truth, answer) in CASES.items():
            [out] = reward.score([respond(answer)], [truth], [case])
            table.setdefault(case, {})[setting] = out.correctness
            if setting == "precision (default)" and len(answer) == 1:
                cosines[case] = max(out.best_similarity)
    return table, cosines


def main() -> None:
    table, cosines = measure()
    print("| case | best cosine | " + " | ".join(SETTINGS) + " |")
    print("|---|---|" + "---|" * len(SETTINGS))
    for case, row in table.items():
        cosine = f"{cosines[case]:.3f}" if case in cosines else "–"
        print(f"| {case} | {cosine} | " + " | ".join(f"{row[s]:.3f}" for s in SETTINGS) + " |")


if __name__ == "__main__":
    main()
