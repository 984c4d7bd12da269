"""Worker: stage-1 synthesis with the fake policy and painter (tests/workers/synth_fakes.py), in its own
process so that the test can SIGKILL it mid-run. ``--delay`` slows every policy call down."""

import argparse

from synth_fakes import FakePainter, FakeVLMBackend

from nemo_viper.models.processor import load_processor
from nemo_viper.synthesis.config import load_config
from nemo_viper.synthesis.run import Components, run_synthesis
from nemo_viper.synthesis.vlm import VLM


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    config = load_config(None, ["chunk_size=2", "batch_size=1"], stage=1, out=args.out, images=args.images,
                         **{"vlm.policy": args.hf})
    processor = load_processor(args.hf)
    vlm = VLM(FakeVLMBackend(processor.tokenizer, delay=args.delay), processor, config.vlm)
    run_synthesis(config, Components(vlm, painter=FakePainter()))


if __name__ == "__main__":
    main()
