"""The Qwen2.5-VL policy: HF checkpoints, the Megatron model built through Megatron-Bridge, log-probs."""
