"""Policy checkpoints: megatron-core distributed checkpoints, and conversion from/to Hugging Face.

Layout of a policy checkpoint directory::

    CKPT/
      nemo_viper_checkpoint.json   format, parallel layout it was saved at, source, extra metadata
      hf/                          the HF config, tokenizer, processor and chat template (no weights):
                                   everything needed to rebuild the architecture and to export
      model/                       megatron-core ``torch_dist`` distributed checkpoint of the weights
      optimizer/                   (training checkpoints) the Megatron optimizer's sharded state
      trainer_state.json           (training checkpoints) step, data position, ...

**Checkpoints are code**: every load first checks the directory with
:func:`~nemo_viper.models.checkpoint_dir.read_checkpoint_metadata` (format, file manifest; see
:mod:`nemo_viper.models.checkpoint_dir`, which holds the checks that need no torch or Megatron).

The weights are stored as sharded tensors with global shapes, so a checkpoint saved at one TP/PP
layout loads at any other (megatron-core reshards on load). The directory is written under a temporary
name and renamed when complete, so a killed job never leaves a half-written checkpoint under ``CKPT``.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_viper.errors import CheckpointError
from nemo_viper.models.checkpoint_dir import (FILES_KEY, FORMAT, METADATA_FILE, file_hashes, forget_verified,
                                              no_space_error, out_of_space, read_checkpoint_metadata,
                                              resolve_checkpoint)
from nemo_viper.models.hf_checkpoint import read_qwen25_vl_config
from nemo_viper.models.policy import MegatronPolicy, PolicyConfig, build_policy
from nemo_viper.runtime import collectives

DEFAULT_SHARD_BYTES = 2 * 2**30  # HF export: bytes per safetensors shard (bounds the exporter's host memory)
TRAINER_STATE_FILE = "trainer_state.json"
# Files of an HF checkpoint dir that are not weights; copied into CKPT/hf and back out on export.
HF_ASSET_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.*",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)


def _hf_assets(src: Path) -> list[Path]:
    return [file for pattern in HF_ASSET_PATTERNS for file in src.glob(pattern) if file.is_file()]


def _copy_hf_assets(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for file in _hf_assets(src):
        shutil.copy2(file, dst / file.name)


def saved_tensor_bytes(sharded_state_dict) -> int:
    """Bytes of the tensors a sharded state dict saves: each key's global shape times its element size, once
    per key, factories (e.g. the gated MLP's split ``linear_fc1``) counted as the tensors they build (this
    rank's view: under pipeline parallelism, its stage's tensors)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    sizes = {}
    for value in nested_values(sharded_state_dict):
        built = nested_values(value.build()) if isinstance(value, ShardedTensorFactory) else [value]
        sizes.update({tensor.key: math.prod(tensor.global_shape) * tensor.dtype.itemsize
                      for tensor in built if isinstance(tensor, ShardedTensor)})
    return sum(sizes.values())


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


# Optimizer state saved fully reshardable: a training checkpoint resumes at another TP/PP/DP layout.
OPTIMIZER_SHARDING = {
    "distrib_optim_sharding_type": "fully_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


def _bare_model(policy: MegatronPolicy):
    """The model without DDP / Float16Module wrappers: the same state-dict keys for every checkpoint."""
    from megatron.core.utils import unwrap_model

    (chunk,) = policy.chunks
    return unwrap_model(chunk)


def _model_state_dict(policy: MegatronPolicy, **kwargs):
    return _bare_model(policy).sharded_state_dict(**kwargs)


def optimizer_has_stepped(optimizer) -> bool:
    """Whether a Megatron optimizer holds any state (its first step creates it). All ranks agree: they step
    together."""
    parts = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return any(len(part.optimizer.state) > 0 for part in parts)


def _optimizer_state_dict(policy: MegatronPolicy, optimizer, is_loading: bool):
    model_state = _model_state_dict(policy, metadata=OPTIMIZER_SHARDING)
    return optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=OPTIMIZER_SHARDING)


def save_policy(
    policy: MegatronPolicy,
    out_dir: str | Path,
    metadata: dict | None = None,
    optimizer=None,
    trainer_state: dict | None = None,
) -> Path:
    """Save the policy weights (and, for training, the optimizer and trainer state) as a distributed
    checkpoint. Collective: every rank calls it.

    The files are written under ``.<name>.partial`` and renamed to ``out_dir`` once complete. A failed write
    removes the partial directory; when the disk is full (:func:`~nemo_viper.models.checkpoint_dir.out_of_space`,
    against the tensors to save plus the HF assets) it is the one-line :class:`CheckpointError`
    ``no space left on <dir> (needs ~N GB, M GB free)`` instead of torch's writer error."""
    from torch.distributed.checkpoint.api import CheckpointException

    from nemo_viper.runtime.lifetime import keep_checkpoint_writes_in_process

    keep_checkpoint_writes_in_process()  # no helper process that a killed save would leave behind
    out = Path(out_dir)
    forget_verified(out)
    tmp = out.with_name(f".{out.name}.partial")
    model_state = _model_state_dict(policy)
    stepped = optimizer is not None and optimizer_has_stepped(optimizer)
    optimizer_state = _optimizer_state_dict(policy, optimizer, is_loading=False) if stepped else None
    needed = (saved_tensor_bytes(model_state) + saved_tensor_bytes(optimizer_state or {})
              + sum(f.stat().st_size for f in _hf_assets(Path(policy.config.hf_path))))
    try:
        _write_checkpoint(policy, tmp, model_state, optimizer is not None, optimizer_state, metadata, trainer_state)
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is a BaseException
        shutil.rmtree(tmp, ignore_errors=True)  # never resumed from; removing it frees what it took
        if out_of_space(error, out.parent, needed):
            raise no_space_error(out.parent, needed) from error
        raise
    if _rank() == 0:
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    collectives.barrier()
    return out


def _write_checkpoint(policy: MegatronPolicy, tmp: Path, model_state, training: bool, optimizer_state,
                      metadata: dict | None, trainer_state: dict | None) -> None:
    """Write the checkpoint's files into ``tmp`` (all of them: the manifest last). Collective."""
    from megatron.core import dist_checkpointing

    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / "model").mkdir(parents=True)
        if training:  # empty until the first step, which then creates the state
            (tmp / "optimizer").mkdir()
        _copy_hf_assets(Path(policy.config.hf_path), tmp / "hf")
    collectives.barrier()
    dist_checkpointing.save(model_state, str(tmp / "model"), async_sharded_save=False)
    if optimizer_state is not None:  # a never-stepped optimizer has no state to save: resuming builds the same one
        dist_checkpointing.save(optimizer_state, str(tmp / "optimizer"), async_sharded_save=False)
    collectives.barrier()
    if _rank() == 0:
        record = {
            "format": FORMAT,
            "saved_with": {
                "tensor_parallel": policy.config.tensor_parallel,
                "pipeline_parallel": policy.config.pipeline_parallel,
                "precision": policy.config.precision,
                "layer_spec": policy.layer_spec,
            },
            **(metadata or {}),
        }
        if trainer_state is not None:
            (tmp / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
        record[FILES_KEY] = file_hashes(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(record, indent=2) + "\n")
    collectives.barrier()


def load_training_state(policy: MegatronPolicy, optimizer, ckpt_dir: str | Path) -> dict:
    """Load weights and optimizer state of a training checkpoint into a built policy + optimizer.

    Returns the trainer state saved with it. Collective.
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(ckpt_dir)
    saved_spec = read_checkpoint_metadata(ckpt)["saved_with"].get("layer_spec", "local")
    if not (ckpt / "optimizer").is_dir() or not (ckpt / TRAINER_STATE_FILE).is_file():
        raise CheckpointError(f"{ckpt} is not a training checkpoint (no optimizer/ or {TRAINER_STATE_FILE})")
    if saved_spec != policy.layer_spec:
        raise CheckpointError(
            f"{ckpt}: training state saved with layer_spec={saved_spec!r} cannot resume with {policy.layer_spec!r} "
            f"(optimizer state is per spec): set layer_spec={saved_spec!r}, or start a new run from this checkpoint "
            "(its weights load with either spec)"
        )
    load_model_weights(policy, ckpt)
    if any((ckpt / "optimizer").iterdir()):  # empty: saved before the optimizer's first step (fresh state)
        optimizer_state = _optimizer_state_dict(policy, optimizer, is_loading=True)
        optimizer.load_state_dict(dist_checkpointing.load(optimizer_state, str(ckpt / "optimizer")))
    return json.loads((ckpt / TRAINER_STATE_FILE).read_text())


def load_policy(ckpt_dir: str | Path, **policy_overrides) -> MegatronPolicy:
    """Build the policy at the layout given by ``policy_overrides`` and load the checkpoint's weights.

    ``ckpt_dir`` is a policy checkpoint, or an RL run dir (its latest checkpoint is used)."""
    ckpt = resolve_checkpoint(ckpt_dir)
    read_checkpoint_metadata(ckpt)
    policy = build_policy(PolicyConfig(hf_path=str(ckpt / "hf"), **policy_overrides), load_weights=False,
                          initialize=False)
    load_model_weights(policy, ckpt)
    return policy


_EXTRA_STATE = "_extra_state"


def match_checkpoint_keys(sharded_state_dict: dict, checkpoint_keys: set[str], ckpt_dir) -> set[str]:
    """Make a model's sharded state dict loadable from a checkpoint saved with either layer spec.

    Both specs save the same tensor keys (megatron-core's local spec maps its separate RMSNorm modules
    onto the Transformer Engine names ``linear_qkv.layer_norm_weight`` / ``linear_fc1.layer_norm_weight``,
    and its linears save empty ``_extra_state`` objects under TE's keys); they differ in the
    ``_extra_state`` of TE-only modules, e.g. ``self_attention.core_attention._extra_state`` (FP8 state of
    TE's attention). Those a checkpoint lacks (saved with the local spec, e.g. imported on CPU) are
    removed from ``sharded_state_dict`` and returned by state-dict name: TE starts them fresh, as for a
    new model. Those a checkpoint has and the model does
    not (saved with TE, loaded with the local spec) are simply not read. Any other absent key is a
    one-line :class:`CheckpointError`. ``checkpoint_keys``: the checkpoint's tensor and object keys
    (objects without their ``/shard_...`` suffix)."""
    fresh, missing = set(), []
    for name, entry in list(sharded_state_dict.items()):
        if entry.key in checkpoint_keys:
            continue
        if entry.key.endswith(_EXTRA_STATE):
            fresh.add(name)
            del sharded_state_dict[name]
        else:
            missing.append(entry.key)
    if missing:
        raise CheckpointError(
            f"{ckpt_dir}: the checkpoint has no {missing[0]!r} ({len(missing)} model keys missing): it was not "
            "saved from this architecture; import the HF checkpoint again (nemo-viper convert import)"
        )
    return fresh


def load_model_weights(policy: MegatronPolicy, ckpt_dir: str | Path) -> None:
    """Load a policy checkpoint's weights into an already built policy (any layout, either layer spec:
    a checkpoint imported on CPU with the local spec loads into the Transformer Engine spec and back,
    see :func:`match_checkpoint_keys`). Collective."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import load_sharded_metadata

    read_checkpoint_metadata(ckpt_dir)  # verified before anything is unpickled
    model = _bare_model(policy)
    directory = str(Path(ckpt_dir) / "model")
    checkpoint_keys = {key.split("/shard_")[0] for key in load_sharded_metadata(directory)}
    sharded = model.sharded_state_dict()
    fresh = match_checkpoint_keys(sharded, checkpoint_keys, ckpt_dir)
    result = model.load_state_dict(dist_checkpointing.load(sharded, directory), strict=not fresh)
    if fresh and (set(result.missing_keys) - fresh or result.unexpected_keys):
        raise CheckpointError(f"{ckpt_dir}: state-dict mismatch after loading: missing {result.missing_keys[:3]}, "
                              f"unexpected {result.unexpected_keys[:3]}")


def import_hf(hf_dir: str | Path, out_dir: str | Path, **policy_overrides) -> Path:
    """HF Qwen2.5-VL checkpoint -> policy checkpoint (weights converted by Megatron-Bridge)."""
    policy = build_policy(PolicyConfig(hf_path=str(hf_dir), precision="fp32", **policy_overrides))
    return save_policy(policy, out_dir, metadata={"source": {"hf_path": str(Path(hf_dir).resolve())}})


def _hf_weight_bytes(hf_config: dict, dtype: torch.dtype) -> int:
    """Bytes of the HF model's weights in ``dtype``: its parameters counted on the meta device (no memory)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**hf_config))
    return sum(p.numel() for p in model.parameters()) * dtype.itemsize


def _hf_weight_dtype(hf_config: dict) -> torch.dtype:
    name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
    return getattr(torch, name)


def _write_safetensors_shards(tensors, out: Path, max_shard_bytes: int) -> None:
    """Write (name, tensor) pairs as HF-style safetensors shards plus ``model.safetensors.index.json``.

    Streaming: a shard is written as soon as it is full and its tensors are released, so host memory
    holds at most one shard (plus the tensor that overflows it). Shards are numbered as they are written;
    once the count is known they are renamed to HF's ``model-0000i-of-0000n.safetensors`` (a single
    shard: ``model.safetensors``) and the index is written.
    """
    from safetensors.torch import save_file

    written: list[tuple[Path, list[str]]] = []
    current, current_bytes, total = {}, 0, 0

    def flush():
        path = out / f"shard-{len(written) + 1:05d}.safetensors.partial"
        save_file(current, path, metadata={"format": "pt"})
        written.append((path, list(current)))

    for name, tensor in tensors:
        if current and current_bytes + tensor.nbytes > max_shard_bytes:
            flush()
            current, current_bytes = {}, 0
        current[name] = tensor.contiguous()
        current_bytes += tensor.nbytes
        total += tensor.nbytes
    flush()
    current = {}
    if len(written) == 1:
        written[0][0].rename(out / "model.safetensors")
        return
    weight_map = {}
    for index, (path, names) in enumerate(written, start=1):
        file_name = f"model-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(out / file_name)
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def export_hf(policy: MegatronPolicy, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write ``policy`` as an HF checkpoint dir (weights + config + tokenizer/processor). Collective.

    Megatron-Bridge streams the weights back to HF names and layouts (gathering TP shards and PP
    stages); they are cast to the dtype recorded in the HF config and written by rank 0, one shard of at
    most ``max_shard_bytes`` at a time (see :func:`_write_safetensors_shards`): host memory beyond the
    model's own weights is bounded by about one shard.
    """
    out = Path(out_dir)
    tmp = out.with_name(f".{out.name}.partial")
    dtype = _hf_weight_dtype(policy.hf_config)
    weights = policy.bridge.export_hf_weights(policy.chunks, cpu=True, show_progress=False)
    if _rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            tmp.mkdir(parents=True)
            _copy_hf_assets(Path(policy.config.hf_path), tmp)
            _write_safetensors_shards(((n, t.to(dtype)) for n, t in weights), tmp, max_shard_bytes)
        except Exception as error:  # safetensors reports a short write as its own SafetensorError, no errno
            shutil.rmtree(tmp, ignore_errors=True)
            needed = (_hf_weight_bytes(policy.hf_config, dtype)
                      + sum(f.stat().st_size for f in _hf_assets(Path(policy.config.hf_path))))
            if out_of_space(error, out.parent, needed):
                raise no_space_error(out.parent, needed) from error
            raise
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    else:
        for _ in weights:  # every rank takes part in the gathers
            pass
    collectives.barrier()
    return out


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                      **policy_overrides) -> Path:
    """Policy checkpoint -> HF checkpoint dir loadable by ``transformers``. The policy is loaded in the
    dtype the HF weights are written in (bf16 for a bf16 checkpoint), not wider."""
    ckpt = resolve_checkpoint(ckpt_dir)
    read_checkpoint_metadata(ckpt)
    hf_dtype = _hf_weight_dtype(read_qwen25_vl_config(ckpt / "hf"))
    policy_overrides.setdefault("precision", "bf16" if hf_dtype == torch.bfloat16 else "fp32")
    return export_hf(load_policy(ckpt, **policy_overrides), out_dir, max_shard_bytes)

