"""Text documents in TFDS datasets (array_record), read and written without TensorFlow.

Reading (`config.data.source='tfds'`, through `corpus.load_documents`): `tfds_documents` opens one
split of a prepared dataset as a lazy random-access sequence of `str` (`TfdsTextSource`); records
are read from ArrayRecord files and decoded with numpy only (`builder.as_data_source`, what
`tfds.data_source` returns), so a corpus never needs to fit in memory.

Writing: `write_text_dataset` turns local text (a JSONL dump, the embedded corpus) into that
format, so a corpus prepared once is random-access and shardable by grain. Used by
benchmarks/input_pipeline.py and the tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from vlmjax.data import common


# ---------------------------------------------------------------------------------------------
# Reading.
# ---------------------------------------------------------------------------------------------


class TfdsTextSource(Sequence[str]):
    """Random-access `str` view of one text feature of a TFDS data source.

    Records are read and decoded on access (grain calls this from its reader
    threads), so the dataset never needs to fit in memory.
    """

    def __init__(self, data_source: Sequence[Any], text_field: str,
                 description: str):
        self._source = data_source
        self._text_field = text_field
        self._description = description

    def __len__(self) -> int:
        return len(self._source)

    def _decode(self, record: Any) -> str:
        try:
            value = record[self._text_field]
        except KeyError as e:
            raise ValueError(
                f"{self._description} has no feature "
                f"config.data.text_field={self._text_field!r} "
                f"(features: {sorted(record)}).") from e
        if isinstance(value, np.ndarray) and value.ndim == 0:
            value = value.item()  # Some decoders return 0-d object/bytes arrays.
        if isinstance(value, bytes):  # tfds Text features decode to UTF-8 bytes.
            return value.decode("utf-8")
        if isinstance(value, str):
            return value
        raise ValueError(
            f"{self._description}: feature {self._text_field!r} is "
            f"{type(value).__name__}, expected text.")

    def __getitem__(self, index: int) -> str:  # pytype: disable=signature-mismatch
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._decode(self._source[index])

    def __iter__(self) -> Iterator[str]:
        # Sequence's default __iter__ stops at IndexError, which data sources
        # need not raise past the end.
        for i in range(len(self)):
            yield self[i]

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        # Batched reads let ArrayRecord fetch several records in one call.
        getitems = getattr(self._source, "__getitems__", None)
        records = getitems(indices) if getitems else [self._source[i]
                                                      for i in indices]
        return [self._decode(r) for r in records]

    def __repr__(self) -> str:
        return f"TfdsTextSource({self._description}, {len(self)} records)"


def tfds_documents(*, name: str, data_dir: str, split: str, text_field: str,
                   split_field: str = "train_split") -> TfdsTextSource:
    """Opens one split of a prepared TFDS dataset as a lazy `str` sequence.

    Args:
      name: TFDS name such as 'lm1b' or 'my_text/config:1.0.0'. When empty,
        `data_dir` must be a prepared builder directory (the folder holding
        `dataset_info.json`, e.g. `~/tensorflow_datasets/lm1b/1.1.0`).
      data_dir: TFDS data_dir (with `name`; '' = the TFDS default) or builder
        directory (without `name`).
      split: TFDS split spec, e.g. 'train', 'validation', 'train[:1%]'.
      text_field: the feature holding the text.
      split_field: the config field `split` came from, for error messages.

    Returns:
      A TfdsTextSource. Nothing is ever downloaded or generated: a dataset that
      is not already prepared (as ArrayRecord) is an error.
    """
    builder, origin = common.open_tfds_builder(name, data_dir)
    data_source = common.tfds_split(builder, split, field=split_field, origin=origin)
    source = TfdsTextSource(data_source, text_field, f"{origin} split {split!r}")
    if len(source):
        source[0]  # Fails early, naming text_field, if the feature is missing.
    return source


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


def write_text_dataset(data_dir: str, splits: Mapping[str, Sequence[str]]) -> str:
    """Builds dataset ``vlmjax_text`` with a ``text`` feature under ``data_dir``.

    Args:
      data_dir: TFDS data directory (``config.data.path``).
      splits: split name -> documents, e.g. ``{"train": [...], "validation": [...]}``.

    Returns:
      The prepared builder directory (``data_dir/vlmjax_text/1.0.0``), also accepted as
      ``config.data.path`` without ``tfds_name``.
    """
    docs = {name: [{"text": text} for text in texts] for name, texts in splits.items()}

    def features(tfds):
        return tfds.features.FeaturesDict({"text": tfds.features.Text()})

    return common.write_tfds_dataset(data_dir, "VlmjaxText", features, docs, module=__name__)
