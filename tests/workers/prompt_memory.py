"""Resident memory while a ShardPromptSource streams many epochs of a dataset far larger than its prefetch bound.

Writes ``--samples`` caption_refine samples (distinct 640x480 JPEG photo crops) and draws ``--prompts``
prompts, 4 per step like the loop, dropping each step's prompts before the next. Prints one JSON line:
the RSS after the first step and its peak afterwards (bytes, from /proc/self/status), and how many bytes
of ``pixel_values`` were served in total (what would be resident if prompts accumulated).
"""

import argparse
import json
import tempfile

import numpy as np
import skimage.data
from PIL import Image

from nemo_viper.data import CaptionRefineRecord, ShardDataset, ShardWriter
from nemo_viper.data.images import ImageProcessingConfig, QwenImagePreprocessor
from nemo_viper.data.prompt_source import ShardPromptSource


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_dataset(directory: str, samples: int) -> None:
    canvas = np.tile(skimage.data.astronaut(), (2, 2, 1))  # 1024x1024
    writer = ShardWriter(directory, "mem", 16, task="caption_refine")
    for i in range(samples):
        top, left = (37 * i) % 500, (53 * i) % 380
        image = Image.fromarray(canvas[top : top + 480, left : left + 640])
        record = CaptionRefineRecord(id=f"m-{i}", images=["x"], initial_caption="A photo.",
                                     refinements=["The photo shows a person."], refined_caption="A photo.",
                                     source="skimage:astronaut", synth_ckpt="ckpt_0")
        writer.write(record, [image])
    writer.finalize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=400)
    parser.add_argument("--prefetch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        write_dataset(directory, args.samples)
        preprocessor = QwenImagePreprocessor(ImageProcessingConfig(), "dali", device="cpu")
        served = 0
        with ShardPromptSource(ShardDataset(directory), preprocessor, seed=0, prefetch=args.prefetch,
                               decode_batch=4) as source:
            first = None
            peak = 0
            for step in range(args.prompts // 4):
                prompts = source.next_prompts(4)
                served += sum(p.images.pixel_values.nbytes for p in prompts)
                del prompts
                if first is None:
                    first = resident_bytes()
                peak = max(peak, resident_bytes())
    print(json.dumps({"rss_after_first_step": first, "rss_peak": peak, "served_pixel_bytes": served}))


if __name__ == "__main__":
    main()
