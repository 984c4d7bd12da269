"""nemo_viper: the Megatron/NeMo recipe for ViPER (self-evolving visual perception for Qwen2.5-VL)."""

from nemo_viper.runtime.lifetime import follow_parent_from_env

__version__ = "0.1.0"

# A process started by a job of this project (directly or through torchrun / multiprocessing) dies with
# its parent: see nemo_viper.runtime.lifetime.
follow_parent_from_env()
