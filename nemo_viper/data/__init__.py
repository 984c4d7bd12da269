"""The dataset format shared by synthesis (writes) and RL training (reads): records, shards, manifest.

- :mod:`~nemo_viper.data.records`: the typed ``caption_refine`` / ``visual_op`` records and their validation;
- :mod:`~nemo_viper.data.shards`: :class:`ShardWriter` and :class:`ShardDataset` (webdataset tars + manifest);
- :mod:`~nemo_viper.data.prompt_source`: the RL loop's prompt source over a dataset, sharded over
  data-parallel ranks, delivering :class:`~nemo_viper.data.task_prompt.TaskPrompt` s. Import it from its
  module: it needs torch and the image preprocessor, which the writer side does not.

Layout and semantics: ``docs/data_format.md``.
"""

from nemo_viper.data.records import (
    SCHEMA_VERSION,
    CaptionRefineRecord,
    Record,
    RecordError,
    VisualOpRecord,
    ground_truth,
    parse_record,
)
from nemo_viper.data.shards import (
    MANIFEST_NAME,
    CorruptImageError,
    DatasetError,
    ShardDataset,
    ShardInfo,
    ShardWriter,
    write_manifest,
)

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "CaptionRefineRecord",
    "CorruptImageError",
    "DatasetError",
    "Record",
    "RecordError",
    "ShardDataset",
    "ShardInfo",
    "ShardWriter",
    "VisualOpRecord",
    "ground_truth",
    "parse_record",
    "write_manifest",
]
