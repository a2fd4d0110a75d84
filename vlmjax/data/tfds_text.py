"""Write documents as a TFDS dataset directory (array_record), without TensorFlow.

Turns local text (a JSONL dump, the embedded corpus) into the format `config.data.source='tfds'`
reads, so a corpus prepared once is random-access and shardable by grain. Used by
benchmarks/input_pipeline.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def write_text_dataset(data_dir: str, splits: Mapping[str, Sequence[str]]) -> str:
    """Builds dataset ``vlmjax_text`` with a ``text`` feature under ``data_dir``.

    Args:
      data_dir: TFDS data directory (``config.data.path``).
      splits: split name -> documents, e.g. ``{"train": [...], "validation": [...]}``.

    Returns:
      The prepared builder directory (``data_dir/vlmjax_text/1.0.0``), also accepted as
      ``config.data.path`` without ``tfds_name``.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only here)

    docs = {k: list(v) for k, v in splits.items()}

    with tfds.core.registered.skip_registration():
        class VlmjaxText(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

            def _split_generators(self, dl_manager):
                del dl_manager  # nothing is downloaded
                return {name: self._generate_examples(name) for name in docs}

            def _generate_examples(self, split):
                for i, text in enumerate(docs[split]):
                    yield i, {"text": text}

    builder = VlmjaxText(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
