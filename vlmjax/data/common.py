"""What every input pipeline shares: seeds, batch layout, the sharded grain train head, TFDS I/O.

Used by the LM pipeline (`vlmjax.data.lm`, `corpus`, `tfds_text`) and the video pipeline
(`vlmjax.data.video`, `tfds_video`); imports nothing else from `vlmjax.data`, so it is the root
of the package's module tree.

The training stream of both pipelines is, per process:

  MapDataset.source(records)            random access (documents, clips)
    .shuffle(mix_seeds(seed, shuffle_seed)).repeat()
                                        grain reshuffles every epoch (seed + epoch)
    [process_index::process_count]      disjoint records per process
    .map(transform)                     record -> example dict
    .to_iter_dataset(ReadOptions)       reader threads         <- `sharded_train_dataset`
  <pipeline-specific step>              (LM: concat-then-split packing)
    .batch(per-process batch, drop_remainder=True)
  ThreadPrefetchIterDataset             batching on a thread   <- `batch_and_prefetch`

TensorFlow is never imported: TFDS datasets are read through `builder.as_data_source` (ArrayRecord,
numpy decoding), and written with numpy-only features.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from etils import epath
import grain
import numpy as np


def mix_seeds(seed: int, shuffle_seed: int) -> int:
    """A well-mixed 32-bit shuffle seed from the trainer's and the data seed."""
    return int(np.random.SeedSequence([seed, shuffle_seed]).generate_state(1)[0])


def check_batching(global_batch_size: int, process_index: int, process_count: int, *,
                   unit: str = "examples") -> int:
    """Validates the batch layout and returns the per-process batch size.

    Args:
      global_batch_size: examples per step over all processes.
      process_index: this process, in [0, process_count).
      process_count: number of processes loading data.
      unit: what one batch row is ('examples', 'clips'), for the error message.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} must be in [0, process_count={process_count}).")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of "
            f"process_count={process_count}: every process loads "
            f"global_batch_size // process_count {unit}.")
    return global_batch_size // process_count


def sharded_train_dataset(source: Sequence[Any], *, seed: int, shuffle_seed: int,
                          process_index: int, process_count: int,
                          transform: grain.transforms.Map,
                          read_options: grain.ReadOptions) -> grain.IterDataset:
    """The infinite, shuffled, per-process stream of examples, before batching.

    Records 0..len(source)-1 are shuffled with `mix_seeds(seed, shuffle_seed)`, reshuffled every
    epoch, and dealt round-robin to the processes; `transform` runs lazily, in grain's reader
    threads (`read_options`).

    Args:
      source: random-access records (grain `RandomAccessDataSource`: `len` and `[i]`).
      seed: the trainer's seed.
      shuffle_seed: the data config's seed, mixed with `seed` for the order only.
      process_index: this process, in [0, process_count).
      process_count: number of processes loading data.
      transform: record -> example.
      read_options: reader threads and read-ahead.

    Returns:
      A grain.IterDataset of single examples; `batch_and_prefetch` finishes it.
    """
    ds = grain.MapDataset.source(source)
    # Shuffle before repeat: grain's shuffle then sees indices beyond one epoch and reshuffles
    # each epoch with seed + epoch.
    ds = ds.shuffle(seed=mix_seeds(seed, shuffle_seed)).repeat()
    # Strided slicing of the one global order: in every epoch each record goes to exactly one
    # process, and which one changes between epochs.
    ds = ds[process_index::process_count]
    ds = ds.map(transform)
    return ds.to_iter_dataset(read_options)


def batch_and_prefetch(ds: grain.IterDataset, batch_size: int,
                       prefetch_batches: int) -> grain.IterDataset:
    """Full batches of `batch_size`, prepared `prefetch_batches` ahead on a thread (0 = inline).

    The prefetch thread's state is the state of the last batch handed out, so checkpoints of the
    iterator stay exact.
    """
    ds = ds.batch(batch_size, drop_remainder=True)
    if prefetch_batches:
        ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=prefetch_batches)
    return ds


# ---------------------------------------------------------------------------------------------
# TFDS: reading prepared ArrayRecord datasets and writing them, without TensorFlow.
# ---------------------------------------------------------------------------------------------


def open_tfds_builder(name: str, data_dir: str, *,
                      writer: str = "vlmjax.data.tfds_text.write_text_dataset"):
    """Opens a prepared TFDS dataset by name (in a data_dir) or by its builder directory.

    Args:
      name: TFDS name such as 'lm1b' or 'my_text/config:1.0.0' (`config.data.tfds_name`).
        When empty, `data_dir` must be a prepared builder directory (the folder holding
        `dataset_info.json`, e.g. `~/tensorflow_datasets/lm1b/1.1.0`).
      data_dir: TFDS data_dir (with `name`; '' = the TFDS default) or builder directory
        (without `name`) (`config.data.path`).
      writer: the numpy-only writer to suggest when a feature needs TensorFlow.

    Returns:
      (builder, origin): the prepared builder and a description for messages. Nothing is ever
      downloaded or generated: a dataset that is not already prepared is an error.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only here)

    if not name and not data_dir:
        raise ValueError(
            "source='tfds' needs config.data.tfds_name (with config.data.path as its data_dir) "
            "or config.data.path naming a prepared builder directory.")
    try:
        if name:
            try:
                builder = tfds.builder(name, data_dir=data_dir or None)
            except tfds.core.registered.DatasetNotFoundError as e:
                raise ValueError(
                    f"config.data.tfds_name={name!r}: no dataset of that name is prepared "
                    f"under config.data.path={data_dir!r}.") from e
            origin = f"TFDS dataset {name!r} in {builder.data_dir}"
        else:
            if not (epath.Path(data_dir) / "dataset_info.json").is_file():
                raise ValueError(
                    f"config.data.path={data_dir!r} is not a prepared TFDS builder directory "
                    "(it has no dataset_info.json); set config.data.tfds_name to use it as a "
                    "data_dir instead.")
            builder = tfds.builder_from_directory(data_dir)
            origin = f"TFDS builder directory {data_dir!r}"
        builder.info.features  # pylint: disable=pointless-statement  (builds every feature)
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] == "tensorflow":
            raise ValueError(
                f"loading TFDS dataset {name or data_dir!r} needs TensorFlow: one of its "
                "features (e.g. tfds.features.Video) cannot be built without it. Install "
                f"tensorflow (CPU is enough), or re-write the data with {writer} (numpy-only "
                "features).") from e
        raise
    if not builder.is_prepared():
        raise ValueError(
            f"{origin} is not prepared; run download_and_prepare with "
            "file_format='array_record' on a machine with the data (downloads are "
            "disabled here).")
    return builder, origin


def resolve_eval_split(builder, requested: str, candidates: Sequence[str], origin: str) -> str:
    """``requested`` (config.data.eval_split), or when empty the first of ``candidates`` the TFDS
    builder has; none: a ValueError saying how to name one."""
    if requested:
        return requested
    available = sorted(builder.info.splits.keys())
    found = [s for s in candidates if s in available]
    if not found:
        raise ValueError(
            f"{origin} has none of the evaluation splits {tuple(candidates)} (splits: {available}); "
            "set config.data.eval_split (e.g. 'train[90%:]' with train_split='train[:90%]').")
    return found[0]


def tfds_split(builder, split: str, *, field: str, origin: str) -> Sequence[Any]:
    """`builder.as_data_source(split)`: random-access records of one split (`split` comes from
    `config.data.<field>`, named in the error for an unknown split)."""
    try:
        return builder.as_data_source(split=split)
    except ValueError as e:  # Unknown split names are ValueErrors in tfds.
        available = sorted(builder.info.splits.keys())
        raise ValueError(
            f"config.data.{field}={split!r} for {origin} (splits: {available}): {e}") from e


def write_tfds_dataset(data_dir: str, class_name: str, features: Callable[[Any], Any],
                       splits: Mapping[str, Iterable[dict[str, Any]]], *,
                       disable_shuffling: bool = False, module: str = __name__) -> str:
    """Builds a TFDS dataset (array_record, version 1.0.0) from in-memory examples.

    Args:
      data_dir: TFDS data directory.
      class_name: the builder class name; TFDS names the dataset after it in snake case
        ('VlmjaxText' -> 'vlmjax_text').
      features: `tfds` -> the `tfds.features.FeaturesDict` of an example (called with the
        module, so callers need not import TFDS themselves).
      splits: split name -> examples (dicts of feature values); example i gets key i.
      disable_shuffling: keep record i of a split = example i (TFDS otherwise orders records by a
        hash of their keys).
      module: `__module__` of the builder class (recorded in dataset_info.json).

    Returns:
      The prepared builder directory (``data_dir/<name>/1.0.0``), also accepted as
      ``config.data.path`` without ``tfds_name``.
    """
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (heavy; only here)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, disable_shuffling=disable_shuffling,
                                     features=features(tfds))

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {name: self._generate_examples(name) for name in splits}

    def _generate_examples(self, split):
        yield from enumerate(splits[split])

    with tfds.core.registered.skip_registration():
        builder_cls = type(class_name, (tfds.core.GeneratorBasedBuilder,), {
            "__module__": module,
            "VERSION": tfds.core.Version("1.0.0"),
            "_info": _info,
            "_split_generators": _split_generators,
            "_generate_examples": _generate_examples,
        })
    builder = builder_cls(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir)
