"""The dataset format shared by synthesis (writes) and RL training (reads): records, shards, manifest.

- :mod:`~nemo_viper.data.records`: the typed ``caption_refine`` / ``visual_op`` records and their validation;
- :mod:`~nemo_viper.data.shards`: :class:`ShardWriter` and :class:`ShardDataset` (webdataset tars + manifest);
- :mod:`~nemo_viper.data.prompt_source`: the RL loop's prompt source over a dataset, sharded over
  data-parallel ranks, delivering :class:`~nemo_viper.data.task_prompt.TaskPrompt` s. Import it from its
  module: it needs torch and the image preprocessor, which the writer side does not;
- :mod:`~nemo_viper.data.image_config`: the image processor settings (torch-free).

Layout and semantics: ``docs/data_format.md``.
"""

from nemo_viper.lazy_exports import lazy_getattr

# Each public name -> the submodule defining it; loaded on first access (PEP 562), so that importing
# ``nemo_viper.data.image_config`` (the launcher) loads neither PIL nor torch.
_SOURCES = {
    "SCHEMA_VERSION": "records",
    "CaptionRefineRecord": "records",
    "Record": "records",
    "RecordError": "records",
    "VisualOpRecord": "records",
    "ground_truth": "records",
    "parse_record": "records",
    "MANIFEST_NAME": "shards",
    "CorruptImageError": "shards",
    "DatasetError": "shards",
    "ShardDataset": "shards",
    "ShardInfo": "shards",
    "ShardWriter": "shards",
    "write_manifest": "shards",
}

__all__ = sorted(_SOURCES)

__getattr__ = lazy_getattr(__name__, _SOURCES)
