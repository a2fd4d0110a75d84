"""Tokenizers for language-model data: raw UTF-8 bytes, or a byte-level BPE.

Both share one interface (`Tokenizer`) and one id layout for the special
tokens, so model code never depends on which one a config picked:

  id 0 = <pad>, id 1 = <bos>, id 2 = <eos>, ids 3.. = content.

Putting <pad> at 0 means zero-filled buffers are padding. `vocab_size` is the
size of the embedding table a model must allocate; ids at or above the learned
vocabulary are never produced.

The BPE is trained with HuggingFace `tokenizers` (ByteLevel pre-tokenizer, so
every string is encodable without an <unk> and decoding is lossless) on the
training split, and cached as `<workdir>/tokenizer.json` with a sidecar
`<workdir>/tokenizer_meta.json`. A workdir's cached tokenizer is the source of
truth on resume: it is reused without re-reading the training text (which may
have changed, e.g. another Python's embedded corpus), but a different
`bpe_vocab_size` is an error, because the checkpoint's embedding table would
no longer match. Nothing is ever downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import json
import os
from typing import Any, Protocol
import uuid

from absl import logging
from etils import epath
import numpy as np
import tokenizers as hf_tokenizers

from vlmjax.data import corpus

PAD_ID = 0
BOS_ID = 1
EOS_ID = 2
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_META_FILE = "tokenizer_meta.json"

TOKENIZERS = ("bytes", "bpe", "hf")


class Tokenizer(Protocol):
    """What the LM pipeline and tasks need from a tokenizer."""

    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 [n] ids, without special tokens."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like `encode` on each text (possibly in parallel)."""

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; special and unused ids are dropped."""


def _as_ids(ids: Iterable[int]) -> np.ndarray:
    """Any 1-D id container (list, numpy or jax array, generator) -> int64 [n]."""
    if not hasattr(ids, "__len__"):
        ids = list(ids)
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class ByteTokenizer:
    """UTF-8 bytes as tokens: byte b has id b + 3 (after <pad>, <bos>, <eos>).

    `vocab_size` is 264: 3 specials + 256 bytes = 259, rounded up to a multiple
    of 8 so embedding/logit matmuls tile evenly; ids 259..263 are never used.
    Byte-level modelling makes bits-per-byte equal bits-per-token.
    """

    OFFSET = len(SPECIAL_TOKENS)
    vocab_size = 264
    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 [len(utf8(text))]."""
        raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
        return raw.astype(np.int32) + self.OFFSET

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_ids(ids)
        content = ids[(ids >= self.OFFSET) & (ids < self.OFFSET + 256)]
        # errors='replace': a window cut mid-character decodes to U+FFFD instead
        # of raising.
        return (content - self.OFFSET).astype(np.uint8).tobytes().decode(
            "utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=264)"


class BPETokenizer:
    """Byte-level BPE from HuggingFace `tokenizers`, specials at ids 0, 1, 2.

    Attributes:
      vocab_size: the configured `bpe_vocab_size`, i.e. the embedding size. A
        tiny training text may learn fewer merges; `learned_vocab_size` says how
        many ids are actually in use.
    """

    pad_id = PAD_ID
    bos_id = BOS_ID
    eos_id = EOS_ID

    def __init__(self, tokenizer: hf_tokenizers.Tokenizer, vocab_size: int):
        for expected_id, token in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(token) != expected_id:
                raise ValueError(
                    f"BPE tokenizer must map {token!r} to id {expected_id}, got "
                    f"{tokenizer.token_to_id(token)}.")
        if tokenizer.get_vocab_size() > vocab_size:
            raise ValueError(
                f"BPE tokenizer has {tokenizer.get_vocab_size()} tokens, more than "
                f"config.data.bpe_vocab_size={vocab_size}.")
        # By default HF matches special tokens inside raw text, so a document that
        # contains the string "<eos>" would get a real end-of-sequence id. Data is
        # text, never control tokens: encode such strings as ordinary bytes. The flag
        # is not serialised in tokenizer.json, hence set on every construction.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.learned_vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Trains a byte-level BPE with `vocab_size` tokens (specials included).

        Training is deterministic for a given text sequence, so processes that
        train independently end up with identical tokenizers.
        """
        min_size = len(SPECIAL_TOKENS) + 256
        if vocab_size < min_size:
            raise ValueError(
                f"config.data.bpe_vocab_size={vocab_size} must be at least "
                f"{min_size} (3 specials + the 256-byte alphabet).")
        tokenizer = hf_tokenizers.Tokenizer(hf_tokenizers.models.BPE())
        # add_prefix_space=False keeps encode/decode an exact round trip.
        tokenizer.pre_tokenizer = hf_tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=False)
        tokenizer.decoder = hf_tokenizers.decoders.ByteLevel()
        trainer = hf_tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=2,
            special_tokens=list(SPECIAL_TOKENS),
            # The full byte alphabet, so unseen characters still encode.
            initial_alphabet=hf_tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, vocab_size)

    @classmethod
    def from_json(cls, text: str, vocab_size: int) -> BPETokenizer:
        return cls(hf_tokenizers.Tokenizer.from_str(text), vocab_size)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def encode(self, text: str) -> np.ndarray:
        """`text` -> int32 [n]."""
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in Rust.
        encodings = self._tokenizer.encode_batch(list(texts),
                                                 add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        ids = _as_ids(ids)
        ids = ids[(ids >= len(SPECIAL_TOKENS)) & (ids < self.learned_vocab_size)]
        return self._tokenizer.decode(ids.tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, "
                f"learned={self.learned_vocab_size})")


class HFTokenizer:
    """A pretrained checkpoint's own tokenizer (``tokenizer.json`` in a local HF directory).

    Used to fine-tune a loaded checkpoint (``config.model.init_from``): the ids must be the ones the
    embedding table was trained with. Special ids come from the directory's ``config.json`` (or its
    ``text_config``, as in CLIP / SigLIP checkpoints) / ``generation_config.json`` (``bos_token_id``, ``eos_token_id``, ``pad_token_id``; pad falls back
    to eos, which the loss masks anyway).
    """

    def __init__(self, path: str):
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"config.data.tokenizer_path={path!r}: no such directory; point it at a local HF "
                f"checkpoint directory holding {TOKENIZER_FILE}.")
        if not os.path.isfile(file):
            raise FileNotFoundError(
                f"config.data.tokenizer='hf' needs {file} (the checkpoint's fast tokenizer). Point "
                "config.data.tokenizer_path (or config.model.init_from) at the HF checkpoint directory.")
        self.path = path
        self._tok = hf_tokenizers.Tokenizer.from_file(file)
        ids: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json"):
            f = os.path.join(path, name)
            if os.path.isfile(f):
                with open(f) as fh:
                    d = json.load(fh)
                # Dual-tower checkpoints (CLIP, SigLIP) keep the text ids in text_config.
                if isinstance(d.get("text_config"), dict):
                    d = {**d["text_config"], **d}
                for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    if d.get(k) is not None and k not in ids:
                        v = d[k]
                        ids[k] = int(v[0] if isinstance(v, list) else v)
        if "eos_token_id" not in ids:
            raise ValueError(f"{path}: no eos_token_id in config.json or generation_config.json; "
                             "documents are separated by <eos>, so one is required.")
        self.eos_id = ids["eos_token_id"]
        self.bos_id = ids.get("bos_token_id", self.eos_id)
        self.pad_id = ids.get("pad_token_id", self.eos_id)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(_as_ids(ids).tolist(), skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _take_bytes(texts: Iterable[str], max_bytes: int) -> list[str]:
    """Leading texts whose UTF-8 size stays within `max_bytes` (0 = all)."""
    taken, total = [], 0
    for text in texts:
        size = len(text.encode("utf-8"))
        if max_bytes and taken and total + size > max_bytes:
            break
        taken.append(text)
        total += size
        if max_bytes and total >= max_bytes:
            break
    return taken


def _atomic_write(path: epath.Path, text: str) -> None:
    # Several processes may write the same (deterministic) file concurrently;
    # write-then-rename means a reader never sees a partial file. `replace`, not
    # `rename`: epath's rename refuses an existing destination (another process's
    # copy), replace overwrites it (os.replace locally, a rename on gs://).
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(text)
    tmp.replace(path)


def _load_cached_bpe(workdir: epath.Path, vocab_size: int) -> BPETokenizer:
    """Loads `<workdir>/tokenizer.json`, checking it matches the config."""
    path = workdir / TOKENIZER_FILE
    meta_path = workdir / TOKENIZER_META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    cached_size = meta.get("bpe_vocab_size")
    if cached_size is not None and cached_size != vocab_size:
        raise ValueError(
            f"config.data.bpe_vocab_size={vocab_size} but the tokenizer cached in "
            f"{path} was trained with bpe_vocab_size={cached_size}; use a fresh "
            "--workdir (its checkpoints belong to the cached tokenizer) or set "
            f"config.data.bpe_vocab_size={cached_size}.")
    tokenizer = BPETokenizer.from_json(path.read_text(), vocab_size)
    logging.info("Loaded %s from %s", tokenizer, path)
    return tokenizer


def build_tokenizer(data_cfg, workdir: epath.PathLike | None,
                    train_texts: Iterable[str]) -> Tokenizer:
    """Returns the tokenizer that `data_cfg.tokenizer` names.

    Args:
      data_cfg: data config; reads `tokenizer`, `bpe_vocab_size` and
        `bpe_train_bytes`.
      workdir: experiment directory where the BPE is cached (`tokenizer.json`);
        any `etils.epath` path (local or gs://...). None or '' trains in memory
        every time.
      train_texts: training documents (only read for 'bpe'); the leading ones up
        to `bpe_train_bytes` UTF-8 bytes are used.

    Returns:
      A `ByteTokenizer` or `BPETokenizer`.
    """
    kind = data_cfg.tokenizer
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        if not data_cfg.tokenizer_path:
            raise ValueError("config.data.tokenizer='hf' needs config.data.tokenizer_path (a local HF "
                             "checkpoint directory with tokenizer.json).")
        return HFTokenizer(data_cfg.tokenizer_path)
    if kind != "bpe":
        raise ValueError(
            f"config.data.tokenizer={kind!r} is not one of "
            f"{', '.join(repr(t) for t in TOKENIZERS)}")

    vocab_size = int(data_cfg.bpe_vocab_size)
    directory = epath.Path(workdir) if workdir else None
    if directory is not None and (directory / TOKENIZER_FILE).exists():
        # The training text is not even read: the cached file is authoritative.
        return _load_cached_bpe(directory, vocab_size)

    texts = _take_bytes(train_texts, int(data_cfg.bpe_train_bytes))
    if not texts:
        raise ValueError("Cannot train the BPE tokenizer: the training split has "
                         "no documents.")
    tokenizer = BPETokenizer.train(texts, vocab_size)
    logging.info("Trained %s on %d documents (%d bytes).", tokenizer,
                 len(texts), sum(len(t.encode("utf-8")) for t in texts))
    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
        # Meta first: whoever sees tokenizer.json can rely on the meta being there.
        _atomic_write(directory / TOKENIZER_META_FILE, json.dumps({
            "bpe_vocab_size": vocab_size,
            "learned_vocab_size": tokenizer.learned_vocab_size,
            "train_documents": len(texts),
            # Records what it was trained on; not checked on reuse (see above).
            "train_text_fingerprint": corpus.corpus_fingerprint(texts),
        }, indent=2))
        _atomic_write(directory / TOKENIZER_FILE, tokenizer.to_json())
    return tokenizer
