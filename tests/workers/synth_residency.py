"""Worker: stage-1 synthesis with the real tiny Megatron policy and tiny diffusers pipeline, built once with
``residency=alternate``; runs the stage into ``OUT/alternate`` through the residency wrappers and into
``OUT/together`` with the same models unwrapped, and writes the residency's swap log to ``OUT/swaps.json``."""

import argparse
import json
from pathlib import Path

from nemo_viper.synthesis.config import load_config
from nemo_viper.synthesis.run import Components, build_components, run_synthesis


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--images", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    common = ["vlm.precision=fp32", "filters.language=null", "chunk_size=2", "batch_size=2",
              "vlm.caption_tokens=12", "vlm.critique_tokens=12", "vlm.rewrite_tokens=12"]

    def config(name, residency):
        return load_config(None, [*common, f"residency={residency}"], stage=1, out=str(out / name),
                           images=args.images, **{"vlm.policy": args.hf})

    alternate = build_components(config("alternate", "alternate"))
    run_synthesis(config("alternate", "alternate"), alternate)
    residency = alternate.vlm._residency
    together = Components(alternate.vlm._target, painter=alternate.painter._target)
    run_synthesis(config("together", "together"), together)
    (out / "swaps.json").write_text(json.dumps(residency.swaps))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
