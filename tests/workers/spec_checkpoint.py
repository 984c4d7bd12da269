"""Worker: policy checkpoints load across layer specs (local <-> Transformer Engine checkpoint keys).

Only the local spec can be built on CPU, so the TE side is the TE spec's checkpoint layout: the same tensor
keys and linear-layer ``_extra_state`` objects (megatron-core's local linears save them too), plus TE's
attention ``core_attention._extra_state`` (FP8 state), which a local-spec checkpoint lacks.
Prints one JSON line.
"""

import argparse
import io
import json
from pathlib import Path

import torch

from nemo_viper.errors import CheckpointError
from nemo_viper.models.checkpoint import load_model_weights, match_checkpoint_keys, save_policy
from nemo_viper.models.checkpoint_dir import FILES_KEY, METADATA_FILE, file_hashes
from nemo_viper.models.policy import PolicyConfig, build_policy

EXTRA = "language_model.decoder.layers.self_attention.core_attention._extra_state"


def te_layout(sharded: dict, layers: int) -> dict:
    """``sharded`` as the TE spec lays it out: plus TE attention's per-layer ``_extra_state`` object."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for layer in range(layers):
        sharded[f"language_model.decoder.layers.{layer}.self_attention.core_attention._extra_state"] = ShardedObject(
            EXTRA, io.BytesIO(b"fp8 scaling state"), (layers,), (layer,), replica_id=0)
    return sharded


def max_difference(policy, reference: dict) -> float:
    return max((p.detach() - reference[n]).abs().max().item() for n, p in policy.chunks[0].named_parameters())


def main():
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    parser = argparse.ArgumentParser()
    parser.add_argument("--hf", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    policy = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32", layer_spec="local"))
    weights = {n: p.detach().clone() for n, p in policy.chunks[0].named_parameters()}
    local_ckpt = save_policy(policy, out / "local")
    te_ckpt = out / "te"
    save_policy(policy, te_ckpt)  # metadata and HF assets; the weights are then rewritten in the TE layout
    model_dir = te_ckpt / "model"
    for file in model_dir.iterdir():
        file.unlink()
    layers = len(policy.chunks[0].language_model.decoder.layers)
    dist_checkpointing.save(te_layout(policy.chunks[0].sharded_state_dict(), layers), str(model_dir),
                            async_sharded_save=False)
    metadata = json.loads((te_ckpt / METADATA_FILE).read_text())  # the manifest a TE-spec save would write
    metadata[FILES_KEY] = file_hashes(te_ckpt)
    (te_ckpt / METADATA_FILE).write_text(json.dumps(metadata))
    te_keys = {k.split("/shard_")[0] for k in load_sharded_metadata(str(model_dir))}
    local_keys = {k.split("/shard_")[0] for k in load_sharded_metadata(str(local_ckpt / "model"))}

    report = {"local_only_keys": sorted(local_keys - te_keys), "te_only_keys": sorted(te_keys - local_keys),
              "norm_keys": sorted(k for k in local_keys if "norm" in k)}
    fresh = build_policy(PolicyConfig(hf_path=args.hf, precision="fp32", layer_spec="local", seed=7), load_weights=False)
    report["random_init_difference"] = max_difference(fresh, weights)
    load_model_weights(fresh, te_ckpt)  # TE checkpoint -> local model
    report["te_to_local_difference"] = max_difference(fresh, weights)

    # Local checkpoint -> a model with the TE layout: keys matched back, _extra_state left fresh.
    sharded = te_layout(build_policy(PolicyConfig(hf_path=args.hf, precision="fp32", seed=8), load_weights=False)
                        .chunks[0].sharded_state_dict(), layers)
    report["fresh_extra_state"] = sorted(match_checkpoint_keys(sharded, local_keys, local_ckpt))
    loaded = dist_checkpointing.load(sharded, str(local_ckpt / "model"))
    report["local_to_te_difference"] = max((loaded[n] - w).abs().max().item() for n, w in weights.items())

    broken = local_keys - {"language_model.decoder.final_layernorm.weight"}
    try:
        match_checkpoint_keys(policy.chunks[0].sharded_state_dict(), broken, local_ckpt)
        report["missing_key_error"] = None
    except CheckpointError as error:
        report["missing_key_error"] = str(error)
    print(json.dumps(report))


if __name__ == "__main__":
    from nemo_viper.runtime import cpu_mode

    with cpu_mode.unless_cuda():
        main()
