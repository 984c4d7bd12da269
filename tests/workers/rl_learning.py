"""Worker: RL on a verifiable toy task with the real loop, generator and trainer on the tiny policy.

Task: "answer with colour words". Reward (same interface as ViPER's ``score``): the fraction of words of
the response that are colour names, so it is verifiable and starts near 0 for a random policy.
Prints one JSON line per step with the mean reward, and the run directory holds metrics and checkpoints.
"""

import argparse
import json

from PIL import Image
from skimage import data

from nemo_viper.models.policy import PolicyConfig
from nemo_viper.models.processor import load_processor
from nemo_viper.rewards import RewardBreakdown
from nemo_viper.rollout import SamplingParams
from nemo_viper.rollout.megatron_backend import MegatronGenerationBackend, MegatronGenerationConfig
from nemo_viper.models.config import OptimizerSettings
from nemo_viper.training.grpo import GRPOConfig
from nemo_viper.training.stage import build_trainer
from nemo_viper.data.task_prompt import TaskPrompt
from nemo_viper.training.loop import RLConfig, run_rl

COLOURS = {"red", "blue", "green", "yellow", "white", "black", "brown", "grey", "orange", "purple"}


class ColourWordsReward:
    """Verifiable toy reward with ViPER's reward interface."""

    def score(self, responses, ground_truths, sample_ids, truncated=None):
        results = []
        for text in responses:
            words = [w.strip(".,").lower() for w in text.split()]
            value = sum(w in COLOURS for w in words) / max(len(words), 1)
            results.append(RewardBreakdown(total=value, format=0.0, correctness=value, precision=value, recall=value,
                                           num_answer_sentences=0, best_similarity=[], truncated=False, note=None))
        return results


class PhotoPrompts:
    """Cycles through a few scikit-image photos; position is checkpointed."""

    def __init__(self):
        self.photos = [Image.fromarray(p).resize((56, 56)) for p in (data.astronaut(), data.coffee(), data.chelsea())]
        self.position = 0

    def next_prompts(self, count):
        prompts = []
        for _ in range(count):
            i = self.position % len(self.photos)
            prompts.append(TaskPrompt(
                sample_id=f"photo{i}",
                messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Name the colours."}]}],
                images=[self.photos[i]], ground_truth=["colours"]))
            self.position += 1
        return prompts

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    config = RLConfig(
        steps=args.steps, prompts_per_step=4, n=8, save_every=10,
        sampling=SamplingParams(temperature=1.0, max_new_tokens=8, seed=0),
        grpo=GRPOConfig(optimizer=OptimizerSettings(lr=args.lr, weight_decay=0.0), num_minibatches=1, micro_batch_size=16),
    )
    trainer = build_trainer(PolicyConfig(hf_path=args.hf, precision="fp32"), config.grpo, config.sampling)
    generator = MegatronGenerationBackend(trainer.policy.model, MegatronGenerationConfig(max_batch_size=32))
    processor = load_processor(args.hf)

    def report(step, metrics):
        print(json.dumps({"step": step, "reward": metrics["reward/mean"]}), flush=True)

    run_rl(trainer, generator, ColourWordsReward(), PhotoPrompts(), processor, config, args.run_dir, progress=report)


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
