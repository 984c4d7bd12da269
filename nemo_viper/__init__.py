"""nemo_viper: the Megatron/NeMo recipe for ViPER (self-evolving visual perception for Qwen2.5-VL)."""

__version__ = "0.1.0"
