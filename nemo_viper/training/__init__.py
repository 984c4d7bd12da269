"""RL training on the Megatron policy: rollout batches, the GRPO-variant update step, metrics."""
