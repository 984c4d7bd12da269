"""Process-level setup for megatron-core / Megatron-Bridge: CPU mode, the TE import guard, distributed init."""
