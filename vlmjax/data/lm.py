"""Language-model data: documents -> tokens -> packed fixed-length batches.

Training pipeline (grain, per process; the head and the tail are the ones of
every pipeline, `common.sharded_train_dataset` / `common.batch_and_prefetch`):

  MapDataset.source(documents)          random access, str or pre-tokenized
    .shuffle(seed).repeat()             grain reshuffles every epoch (seed+epoch)
    [process_index::process_count]      disjoint documents per process
    .map(tokenize + <eos>)              {"tokens": int32 [n_doc + 1]}
    .to_iter_dataset(ReadOptions)       reader/tokenizer threads
  _PackedExamples                       grain's ConcatThenSplitIterDataset cuts
                                        the stream into seq_len+1 windows ->
                                        inputs/targets shifted by one token
    .batch(global_batch // process_count)
  ThreadPrefetchIterDataset             packing+batching on a background thread

Each element of the result is a dict of numpy arrays, B = per-process batch:

  inputs:    int32   [B, T]  tokens t_0 .. t_{T-1} of a window
  targets:   int32   [B, T]  tokens t_1 .. t_T (next-token labels)
  loss_mask: float32 [B, T]  1 where `targets` is a real token, 0 on padding
  attention_mask: int32 [B, T]  1 where `inputs` is a real token, 0 on padding

Documents are separated by <eos>, windows cross document boundaries (no
padding in training), and there is no <bos>: this is the GPT-2 style
"concatenate then split" recipe.

The iterator is checkpointable: `it = iter(lm_data.train_dataset(...))` is a
`grain.DatasetIterator` whose `get_state()` is a small JSON-able dict (indices,
not data), so it can be saved with the model through orbax:

  ocp.args.Composite(..., data=grain.checkpoint.CheckpointSave(it))
  ocp.args.Composite(..., data=grain.checkpoint.CheckpointRestore(it))

Evaluation is finite and deterministic: the validation documents in their
natural order, concatenated, cut into windows with stride T (so every token is
a target exactly once), the last window and the last batch padded with
loss_mask = 0, and every process gets the same number of batches.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import ml_collections
import numpy as np

from vlmjax.data import common
from vlmjax.data import corpus
from vlmjax.data import tfds_text
from vlmjax.data import tokenizers


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of an LM experiment config, with its defaults."""
    c = ml_collections.ConfigDict()
    # Where documents come from: 'embedded' (CPython docs, needs nothing),
    # 'text' (one document per file), 'jsonl' (one document per line) or
    # 'tfds' (a prepared ArrayRecord TFDS dataset; nothing is downloaded).
    c.source = "embedded"
    # 'text'/'jsonl': glob of local files ('**' recurses, '*.gz' is gunzipped).
    # 'tfds': the TFDS data_dir (with tfds_name; '' = TFDS default) or, with an
    # empty tfds_name, a prepared builder directory holding dataset_info.json.
    c.path = ""
    # 'tfds' only: dataset name, e.g. 'lm1b' or 'my_text/cfg:1.0.0'.
    c.tfds_name = ""
    # 'tfds' only: split specs for training and evaluation ('train[:90%]' works).
    c.train_split = "train"
    c.eval_split = "validation"
    # 'jsonl'/'tfds': the field/feature that holds the text.
    c.text_field = "text"
    # 'embedded'/'text'/'jsonl': fraction of documents held out for evaluation,
    # chosen by a CRC32 of each document's text (stable under reordering).
    c.val_fraction = 0.05
    # 'bytes' (UTF-8 bytes, vocab 264), 'bpe' (byte-level BPE trained on the
    # training split, cached as <workdir>/tokenizer.json) or 'hf' (a pretrained
    # checkpoint's tokenizer.json, for fine-tuning a model loaded with
    # config.model.init_from).
    c.tokenizer = "bytes"
    # 'hf' only: the local HF checkpoint directory holding tokenizer.json
    # ('' = config.model.init_from when the task has one).
    c.tokenizer_path = ""
    # 'bpe' only: vocabulary size including <pad>, <bos>, <eos> (>= 259).
    c.bpe_vocab_size = 4096
    # 'bpe' only: train on the leading training documents up to this many
    # UTF-8 bytes (0 = all). Bounds tokenizer training time on large sources.
    c.bpe_train_bytes = 100_000_000
    # Tokens per example (inputs and targets are [T]; windows hold T+1 tokens).
    c.seq_len = 128
    # Mixed with the trainer's seed for the document order, so data order can be
    # varied independently of parameter initialisation.
    c.shuffle_seed = 0
    # grain reader threads that fetch and tokenize documents lazily (TFDS; 0 =
    # inline), and how many documents they may run ahead. In-memory sources are
    # tokenized once up front and always read inline.
    c.num_threads = 2
    c.prefetch_buffer_size = 256
    # Batches prepared ahead on a background thread (0 = no background thread).
    c.prefetch_batches = 2
    # Tokenize at most this many validation documents (0 = all); bounds start-up
    # time on large TFDS validation splits.
    c.eval_max_documents = 0
    return c


def _check_config(cfg) -> None:
    """Fails early, naming the field, on values that cannot work."""
    corpus.check_source(cfg.source)
    if cfg.tokenizer not in tokenizers.TOKENIZERS:
        raise ValueError(
            f"config.data.tokenizer={cfg.tokenizer!r} is not one of "
            f"{', '.join(repr(t) for t in tokenizers.TOKENIZERS)}")
    if cfg.tokenizer == "hf" and cfg.tokenizer_path and not os.path.isdir(cfg.tokenizer_path):
        raise FileNotFoundError(  # before the documents are read
            f"config.data.tokenizer_path={cfg.tokenizer_path!r}: no such directory; point it at a "
            f"local HF checkpoint directory holding {tokenizers.TOKENIZER_FILE}.")
    if not isinstance(cfg.seq_len, int) or cfg.seq_len < 1:
        raise ValueError(f"config.data.seq_len={cfg.seq_len!r} must be an int >= 1.")
    if cfg.source != "tfds" and not 0.0 < cfg.val_fraction < 1.0:
        raise ValueError(
            f"config.data.val_fraction={cfg.val_fraction!r} must be in (0, 1) for "
            f"source={cfg.source!r}: it holds out the evaluation documents.")
    min_vocab = len(tokenizers.SPECIAL_TOKENS) + 256
    if cfg.tokenizer == "bpe" and cfg.bpe_vocab_size < min_vocab:
        raise ValueError(
            f"config.data.bpe_vocab_size={cfg.bpe_vocab_size} must be at least {min_vocab} "
            "(3 specials + the 256-byte alphabet).")
    for field in ("num_threads", "prefetch_buffer_size", "prefetch_batches",
                  "eval_max_documents", "bpe_train_bytes"):
        value = cfg[field]
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"config.data.{field}={value!r} must be an int >= 0.")


class TokenizedDocuments(Sequence[np.ndarray]):
    """Documents tokenized once, each followed by <eos>, in one flat array.

    `flat` is the whole split as a single token stream (int32 [N]); document i
    is `flat[offsets[i]:offsets[i + 1]]` (a read-only view, no copy).
    """

    def __init__(self, token_lists: Sequence[np.ndarray], eos_id: int):
        lengths = np.fromiter((len(t) + 1 for t in token_lists), dtype=np.int64,
                              count=len(token_lists))
        self.offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self.offsets[1:])
        self.flat = np.empty(int(self.offsets[-1]), dtype=np.int32)
        for i, tokens in enumerate(token_lists):
            start, end = self.offsets[i], self.offsets[i + 1]
            self.flat[start:end - 1] = tokens
            self.flat[end - 1] = eos_id
        self.flat.flags.writeable = False

    @classmethod
    def from_texts(cls, texts: Sequence[str],
                   tokenizer: tokenizers.Tokenizer) -> TokenizedDocuments:
        return cls(tokenizer.encode_batch(list(texts)), tokenizer.eos_id)

    @property
    def num_tokens(self) -> int:
        return len(self.flat)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:  # pytype: disable=signature-mismatch
        return self.flat[self.offsets[index]:self.offsets[index + 1]]


class _AsTokens(grain.transforms.Map):
    """Document -> {"tokens": int32 [n + 1]}, tokenizing `str` documents."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer

    def map(self, document: str | np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(document, np.ndarray):  # Already tokenized, <eos> included.
            return {"tokens": document}
        tokens = self._tokenizer.encode(document)
        return {"tokens": np.append(tokens, np.int32(self._tokenizer.eos_id))}


def _window_to_example(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed window of T+1 tokens -> inputs/targets/loss_mask/attention_mask, each [T]."""
    tokens = window["tokens"]
    # ConcatThenSplit marks padding (only possible at the very end of a finite
    # stream) with segment id 0; a target is real iff its segment id is not 0.
    real = window["tokens_segment_ids"] != 0
    return {
        "inputs": tokens[:-1],
        "targets": tokens[1:],
        "loss_mask": real[1:].astype(np.float32),
        "attention_mask": real[:-1].astype(np.int32),
    }


class _PackedExamplesIterator(grain.DatasetIterator):
    """Concat-then-split iterator emitting LM examples; state survives JSON.

    grain 0.2.18's ConcatThenSplit compares `remainder_slices` entries with the
    tuple (-1, -1). Its state holds tuples, but a checkpoint written through
    `grain.checkpoint.CheckpointSave` goes through JSON and comes back with
    lists, so `[-1, -1] != (-1, -1)` makes restore treat "no remainder" as a
    remainder and silently drop one document. Turning the lists back into
    tuples before restoring keeps restores exact.
    """

    def __next__(self) -> dict[str, np.ndarray]:
        return _window_to_example(next(self._parent))

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        if "remainder_slices" in state:
            state["remainder_slices"] = {
                key: tuple(value) for key, value in state["remainder_slices"].items()}
        self._parent.set_state(state)


class _PackedExamples(grain.IterDataset):
    """{"tokens": [n]} documents -> {inputs, targets, loss_mask, attention_mask}, each [T]."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(
            grain.experimental.ConcatThenSplitIterDataset(
                parent, length_struct={"tokens": seq_len + 1}))

    def __iter__(self) -> _PackedExamplesIterator:
        return _PackedExamplesIterator(self._parent.__iter__())


@dataclasses.dataclass
class LMData:
    """Tokenizer, training stream and evaluation batches of one data config.

    Attributes:
      tokenizer: the tokenizer (`vocab_size`, `pad_id`, `bos_id`, `eos_id`,
        `encode`, `decode`).
      bytes_per_token: UTF-8 bytes per token on the evaluation documents, each
        <eos> counted as one byte (a document separator). Bits per byte is
        `loss_per_token_in_nats / ln(2) / bytes_per_token`; with the byte
        tokenizer it is exactly 1.
      seq_len: T, the length of `inputs`/`targets`.
      config: the data config this was built from.
      train_documents: random-access training documents, either pre-tokenized
        (`TokenizedDocuments`, in-memory sources) or `str` (TFDS, tokenized in
        grain's reader threads).
      eval_tokens: int32 [N], the evaluation documents as one token stream.
      num_train_tokens: tokens in the training split (None when not
        pre-tokenized, i.e. for TFDS).
      description: where the documents came from.
    """

    tokenizer: tokenizers.Tokenizer
    bytes_per_token: float
    seq_len: int
    config: ml_collections.ConfigDict
    train_documents: Sequence[Any]
    eval_tokens: np.ndarray
    num_train_tokens: int | None
    description: str

    def train_dataset(self, *, global_batch_size: int, seed: int,
                      process_index: int, process_count: int) -> grain.IterDataset:
        """The infinite, shuffled, packed training stream of this process.

        Args:
          global_batch_size: examples per step over all processes.
          seed: the trainer's seed; with `config.shuffle_seed` it fixes the order.
          process_index: this process, in [0, process_count).
          process_count: number of processes loading data.

        Returns:
          A grain.IterDataset of dicts {inputs, targets: int32, loss_mask:
          float32}, each [global_batch_size // process_count, seq_len]. The same
          arguments always give the same stream; processes see disjoint documents
          in every epoch. `iter()` it and checkpoint the iterator with
          `grain.checkpoint.CheckpointSave`.
        """
        cfg = self.config
        local_batch = common.check_batching(global_batch_size, process_index, process_count)
        if not len(self.train_documents):
            raise ValueError(
                f"The training split of {self.description} is empty; check "
                "config.data.train_split (tfds) or config.data.path and val_fraction.")
        window = self.seq_len + 1
        if (self.num_train_tokens is not None
            and self.num_train_tokens < global_batch_size * window):
            raise ValueError(
                f"The training split of {self.description} has "
                f"{self.num_train_tokens} tokens, fewer than one global batch needs "
                f"({global_batch_size} x (config.data.seq_len={self.seq_len} + 1) = "
                f"{global_batch_size * window}); use more data (config.data.source/"
                "path) or lower config.data.seq_len or the batch size.")

        # Reader threads pay off when a document costs I/O or tokenization; for
        # pre-tokenized in-memory documents they only contend for the GIL (half
        # the throughput on 2 cores), so those are read inline.
        lazy = not isinstance(self.train_documents, TokenizedDocuments)
        ds = common.sharded_train_dataset(
            self.train_documents, seed=seed, shuffle_seed=cfg.shuffle_seed,
            process_index=process_index, process_count=process_count,
            transform=_AsTokens(self.tokenizer),
            read_options=grain.ReadOptions(num_threads=cfg.num_threads if lazy else 0,
                                           prefetch_buffer_size=cfg.prefetch_buffer_size))
        ds = _PackedExamples(ds, self.seq_len)
        # Packing and batching are Python work; the prefetch thread overlaps them with the step.
        return common.batch_and_prefetch(ds, local_batch, cfg.prefetch_batches)

    def num_eval_windows(self) -> int:
        """Windows of T+1 tokens (stride T) covering the evaluation stream."""
        return max(1, math.ceil((len(self.eval_tokens) - 1) / self.seq_len))

    def eval_batches(self, *, global_batch_size: int, process_index: int,
                     process_count: int,
                     max_batches: int) -> list[dict[str, np.ndarray]]:
        """This process's share of the evaluation batches.

        Global batch b holds windows [b * G, (b + 1) * G) of the evaluation stream
        (window k = tokens[k T : k T + T + 1]); process p gets rows
        [p * B, (p + 1) * B) of it, B = G // process_count. The list has the same
        length on every process; windows past the end are all padding.

        Args:
          global_batch_size: G, examples per evaluation step over all processes.
          process_index: this process, in [0, process_count).
          process_count: number of processes.
          max_batches: evaluate on at most this many global batches (the leading
            ones); 0 means the whole split. The trainer passes
            `config.eval.max_batches`.

        Returns:
          A list of dicts {inputs, targets, attention_mask: int32 [B, T],
          loss_mask: float32 [B, T]}; loss_mask is 0 on padded targets (pad_id),
          attention_mask 0 on padded inputs.
        """
        local_batch = common.check_batching(global_batch_size, process_index, process_count)
        if max_batches < 0:
            raise ValueError(f"max_batches={max_batches} must be >= 0 (0 = the whole split).")
        seq_len = self.seq_len
        num_windows = self.num_eval_windows()
        num_batches = math.ceil(num_windows / global_batch_size)
        if max_batches:
            num_batches = min(num_batches, max_batches)

        tokens = self.eval_tokens
        pad_id = self.tokenizer.pad_id
        batches = []
        for b in range(num_batches):
            first = b * global_batch_size + process_index * local_batch
            windows = np.full((local_batch, seq_len + 1), pad_id, dtype=np.int32)
            lengths = np.zeros((local_batch,), dtype=np.int64)
            for row in range(local_batch):
                start = (first + row) * seq_len
                chunk = tokens[start:start + seq_len + 1]
                windows[row, :len(chunk)] = chunk
                lengths[row] = len(chunk)
            # Target j of a row is real iff token j + 1 of its window exists.
            loss_mask = np.arange(1, seq_len + 1)[None, :] < lengths[:, None]
            # Input j is real iff token j of the window exists (routed models never choose padding).
            attention_mask = np.arange(seq_len)[None, :] < lengths[:, None]
            batches.append({
                "inputs": windows[:, :-1],
                "targets": windows[:, 1:],
                "loss_mask": loss_mask.astype(np.float32),
                "attention_mask": attention_mask.astype(np.int32),
            })
        return batches


def _leading(documents: Sequence[str], limit: int) -> list[str]:
    """The first `limit` documents (all when limit is 0), read into a list."""
    count = len(documents) if not limit else min(limit, len(documents))
    return [documents[i] for i in range(count)]


def _tokens_needed(seq_len: int, global_batch_size: int) -> str:
    """How many training tokens one global batch needs, for error messages."""
    if global_batch_size:
        return (f"{global_batch_size * (seq_len + 1)} tokens (config.batch_size x "
                f"(config.data.seq_len + 1) = {global_batch_size} x {seq_len + 1})")
    return f"config.batch_size x (config.data.seq_len + 1) = config.batch_size x {seq_len + 1} tokens"


def _check_split(documents: corpus.Documents, data_cfg, global_batch_size: int) -> None:
    """Fails, naming the files and the fix, when a local corpus is empty or too
    few documents to hold some out (documents are held out whole)."""
    if data_cfg.source not in ("text", "jsonl"):
        return
    total = len(documents.train) + len(documents.validation)
    if total and len(documents.train) and len(documents.validation):
        return
    needed = _tokens_needed(data_cfg.seq_len, global_batch_size)
    unit = "file" if data_cfg.source == "text" else "line"
    if not total:
        files = corpus.glob_files(data_cfg.path, data_cfg.source)
        if data_cfg.source == "text":
            which = (f"{files[0]} is empty" if len(files) == 1 else
                     f"all {len(files)} files it matches are empty (e.g. {files[0]})")
        else:
            field = f"no line with a non-blank config.data.text_field={data_cfg.text_field!r}"
            which = (f"{files[0]} has {field}" if len(files) == 1 else
                     f"the {len(files)} files it matches have {field}")
        raise ValueError(
            f"config.data.path={data_cfg.path!r}: {which}, so there is nothing to train on. "
            f"Point config.data.path at {data_cfg.source} files with enough text: one global batch needs "
            f"{needed}, plus documents to hold out for evaluation.")
    split = "evaluation" if len(documents.train) else "training"
    enough = math.ceil(3 / data_cfg.val_fraction)
    raise ValueError(
        f"{documents.description}: the {split} split is empty. config.data.val_fraction="
        f"{data_cfg.val_fraction} holds out whole documents (picked by a hash of their text) and "
        f"source={data_cfg.source!r} makes each {unit} one document, so {total} document(s) are "
        f"too few: give about {enough} or more (more {unit}s"
        + (", or source='jsonl' with one document per line" if data_cfg.source == "text" else "")
        + f"). Training also needs at least {needed}.")


def build_lm_data(data_cfg, *, workdir: epath.PathLike | None,
                  global_batch_size: int = 0) -> LMData:
    """Loads documents, builds the tokenizer and tokenizes what fits in memory.

    Args:
      data_cfg: the data section of the experiment config (`default_config()`).
      workdir: experiment directory, where a BPE tokenizer is cached (any
        `etils.epath` path, e.g. gs://...); None or '' keeps everything in memory.
      global_batch_size: the trainer's `config.batch_size`, only for the
        numbers in error messages (0 = unknown).

    Returns:
      LMData. In-memory sources (embedded/text/jsonl) are tokenized here once;
      TFDS training documents are tokenized on the fly by grain's threads.
    """
    _check_config(data_cfg)
    documents = corpus.load_documents(data_cfg)
    _check_split(documents, data_cfg, global_batch_size)
    logging.info("LM data: %s; %d train / %d validation documents.",
                 documents.description, len(documents.train),
                 len(documents.validation))

    tokenizer = tokenizers.build_tokenizer(data_cfg, workdir, documents.train)

    validation = _leading(documents.validation, data_cfg.eval_max_documents)
    if not len(validation):
        raise ValueError(
            f"The evaluation split of {documents.description} is empty; check "
            "config.data.eval_split (tfds) or config.data.path and val_fraction.")
    eval_docs = TokenizedDocuments.from_texts(validation, tokenizer)
    num_bytes = sum(len(d.encode("utf-8")) for d in validation) + len(validation)
    bytes_per_token = num_bytes / eval_docs.num_tokens

    if isinstance(documents.train, tfds_text.TfdsTextSource):
        train_documents, num_train_tokens = documents.train, None
    else:
        train_documents = TokenizedDocuments.from_texts(documents.train, tokenizer)
        num_train_tokens = train_documents.num_tokens
    logging.info(
        "LM data: %s, %s train tokens, %d eval tokens, %.3f bytes/token.",
        tokenizer, num_train_tokens, eval_docs.num_tokens, bytes_per_token)
    return LMData(
        tokenizer=tokenizer,
        bytes_per_token=bytes_per_token,
        seq_len=data_cfg.seq_len,
        config=data_cfg,
        train_documents=train_documents,
        eval_tokens=eval_docs.flat,
        num_train_tokens=num_train_tokens,
        description=documents.description,
    )
