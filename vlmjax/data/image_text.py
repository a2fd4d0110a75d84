"""Image-caption pairs: the data config, its checks and the grain pipeline.

The shared data source of the alignment (CLIP/SigLIP-style), VLM and VQA
experiments. Each example is a dict of numpy arrays (S = image_size, L =
max_text_len):

  image:       float32 [S, S, 3]  (pixel / 255 - mean) / std; CLIP mean/std, or
                                  the processor's (`processor`)
  text:        int32   [L]        [BOS] + caption tokens + [EOS], then pad_id;
                                  a long caption is cut to L - 2 tokens and
                                  still ends with [EOS]
  text_valid:  bool    [L]        True on BOS, the tokens and EOS
  mask:        float32 []         1 for a real example, 0 for eval padding
  index:       int32   []         the example's index in its split: eval row i
                                  of 'scenes' is eval image i with its one
                                  caption, so retrieval ground truth is the row

Sources (`config.data.source`):
  'scenes'  procedural scenes of coloured shapes (`vlmjax.data.scenes`), nothing
            to download; captions describe every object exactly, eval scenes
            hold out (colour, shape) pairs and have pairwise distinct captions.
            Train captions use a template and object order drawn per index; eval
            captions use the fixed template 0 in reading order.
  'jsonl'   one JSON object per line (PixMo style), e.g.
            {"image": "imgs/0001.jpg", "caption": "a dog on a sofa"}
  'csv'     a header row naming the image and caption columns, one pair per row
  'tfds'    a prepared ArrayRecord TFDS dataset with an image feature (uint8
            [H, W, 3], or encoded png/jpeg bytes) and a text feature; read with
            numpy only (`write_image_text_dataset` writes one without TensorFlow)
For 'jsonl'/'csv', image paths are relative to `image_root` ('' = the folder
of the jsonl/csv file); evaluation reads `eval_path` when set, otherwise the
FIRST num_eval rows of `path` are held out (and training uses the rest).
Images are read with Pillow, converted to RGB and either resized to S x S
(bicubic, aspect ratio not kept, nothing cropped) or preprocessed by the HF
`ImageProcessor` of `processor` (whose output size must be S x S).

Tokenizers (`config.data.tokenizer`): '' = the built-in scene word tokenizer
(only for 'scenes': a `tokenizers` WordLevel model over the closed scene
vocabulary, ids [PAD]=0, [UNK]=1, [BOS]=2, words, [EOS] = vocab_size - 1, the
highest id, so CLIP's EOS pooling finds it both by id and by argmax), or a
local HF directory with tokenizer.json (`tokenizers.HFTokenizer`; special ids
from its config.json).

Pipelines mirror `vlmjax.data.video`: `build_image_text_data(cfg).
train_dataset(...)` is a checkpointable grain IterDataset of per-process
batches, `eval_batches(...)` a finite deterministic list with the same length
on every process.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from etils import epath
import grain
import ml_collections
import numpy as np
from PIL import Image
import tokenizers as hf_tokenizers

from vlmjax.data import clips
from vlmjax.data import common
from vlmjax.data import image_processing
from vlmjax.data import scenes
from vlmjax.data import tokenizers

SOURCES = ("scenes", "jsonl", "csv", "tfds")
# Built-in scene tokenizer: specials first, [EOS] last (see the module docstring).
SCENE_SPECIALS = ("[PAD]", "[UNK]", "[BOS]")
SCENE_EOS = "[EOS]"
SCENE_TOKENIZER_FILE = "scene_tokenizer.json"


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of an image-text experiment config."""
    c = ml_collections.ConfigDict()
    # 'scenes' (procedural, nothing to download), 'jsonl', 'csv' or 'tfds'.
    c.source = "scenes"
    # S: images are S x S (a multiple of the ViT patch size).
    c.image_size = 64
    # Mixed with the trainer's seed for the training order only (scene content:
    # scenes.seed).
    c.seed = 0
    # 'scenes': eval scenes (distinct captions); 'jsonl'/'csv' without eval_path:
    # leading rows held out for evaluation. 'tfds' evaluates the whole eval split.
    c.num_eval = 256
    # L: text tokens per example including [BOS] and [EOS].
    c.max_text_len = 32
    # '' = built-in scene word tokenizer ('scenes' only), or a local HF directory
    # holding tokenizer.json (+ config.json with the special token ids).
    c.tokenizer = ""
    # '' = resize to S x S + CLIP mean/std, or a local HF directory (or file)
    # with preprocessor_config.json (`vlmjax.data.image_processing`).
    c.processor = ""
    # 'jsonl'/'csv': the training file; 'tfds': the data_dir (with tfds_name) or a
    # prepared builder directory.
    c.path = ""
    # 'jsonl'/'csv': a separate evaluation file ('' = hold out num_eval leading rows).
    c.eval_path = ""
    # 'jsonl'/'csv': folder that relative image paths start from ('' = the file's folder).
    c.image_root = ""
    # 'tfds': dataset name ('vlmjax_image_text' for `write_image_text_dataset`).
    c.tfds_name = ""
    # 'tfds': split specs; '' eval_split = the first of 'validation', 'val', 'eval', 'test'.
    c.train_split = "train"
    c.eval_split = ""
    # Field names: jsonl keys, csv columns, tfds features.
    c.image_key = "image"
    c.caption_key = "caption"
    # grain reader threads (rendering / decoding images; 0 = inline), their read-ahead,
    # and batches prepared ahead on a background thread (0 = none).
    c.num_threads = 2
    c.prefetch_buffer_size = 16
    c.prefetch_batches = 2
    # 'scenes' only: content seed, objects per scene, colours, shapes, held-out pairs.
    c.scenes = scenes.default_config()
    return c


def _check_config(cfg) -> None:
    """Fails early, naming the field, on values that cannot work."""
    if cfg.source not in SOURCES:
        close = difflib.get_close_matches(str(cfg.source), SOURCES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"config.data.source={cfg.source!r} is not one of {SOURCES}{hint}")
    for field in ("image_size", "num_eval"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 1.")
    if not isinstance(cfg.max_text_len, int) or cfg.max_text_len < 3:
        raise ValueError(f"config.data.max_text_len={cfg.max_text_len!r} must be an int >= 3 "
                         "([BOS], at least one token, [EOS]).")
    for field in ("num_threads", "prefetch_buffer_size", "prefetch_batches"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 0.")
    for field in ("tokenizer", "processor", "path", "eval_path", "image_root", "tfds_name",
                  "train_split", "eval_split", "image_key", "caption_key"):
        if not isinstance(cfg[field], str):
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be a string.")
    for field in ("image_key", "caption_key"):
        if not cfg[field]:
            raise ValueError(f"config.data.{field} is empty; name the {field[:-4]} field/column.")
    if cfg.source == "scenes":
        scenes.check_config(cfg.scenes)
        return
    if not cfg.tokenizer:
        raise ValueError(
            f"source={cfg.source!r} needs config.data.tokenizer: a local HF directory with "
            "tokenizer.json (the built-in word tokenizer only knows the scene vocabulary).")
    if cfg.source in ("jsonl", "csv") and not cfg.path:
        raise ValueError(f"source={cfg.source!r} needs config.data.path: the {cfg.source} file "
                         "of (image, caption) pairs.")
    if cfg.source == "tfds" and not (cfg.tfds_name or cfg.path):
        raise ValueError(
            "source='tfds' needs config.data.tfds_name (with config.data.path as its "
            "data_dir) or config.data.path naming a prepared builder directory.")
    if not cfg.train_split:
        raise ValueError("config.data.train_split is empty; name the training split.")


# ---------------------------------------------------------------------------------------------
# Tokenizers and image preprocessing.
# ---------------------------------------------------------------------------------------------


class SceneTokenizer:
    """Word-level tokenizer over `scenes.vocabulary` (HF `tokenizers`: WordLevel + Whitespace).

    Ids: [PAD]=0, [UNK]=1, [BOS]=2, the words in sorted order, [EOS]=vocab_size - 1. Text is
    lower-cased; `decode` joins words with single spaces ("what colour is the circle ?").
    """

    def __init__(self, vocabulary: Sequence[str]):
        tokens = list(SCENE_SPECIALS) + list(vocabulary) + [SCENE_EOS]
        tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordLevel(
            {t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
        tok.normalizer = hf_tokenizers.normalizers.Lowercase()
        tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.Whitespace()
        tok.add_special_tokens(list(SCENE_SPECIALS) + [SCENE_EOS])
        tok.encode_special_tokens = True  # "[EOS]" inside a caption is text, not a control id.
        self._tok = tok
        self.vocab_size = len(tokens)
        self.pad_id, self.unk_id, self.bos_id = 0, 1, 2
        self.eos_id = self.vocab_size - 1

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32)
                for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = np.asarray(list(ids) if not hasattr(ids, "__len__") else ids, np.int64).reshape(-1)
        return self._tok.decode(ids.tolist(), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def __repr__(self) -> str:
        return f"SceneTokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


def encode_text(tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`text` -> (int32 [max_len] [BOS] tokens [EOS] pad..., bool [max_len] valid)."""
    ids = tokenizer.encode(text)[: max_len - 2]
    out = np.full((max_len,), tokenizer.pad_id, np.int32)
    out[0], out[1 : len(ids) + 1], out[len(ids) + 1] = tokenizer.bos_id, ids, tokenizer.eos_id
    return out, np.arange(max_len) < len(ids) + 2


class Preprocess:
    """uint8 [H, W, C] (any size) -> float32 [S, S, 3] normalised."""

    def __init__(self, image_size: int, processor: image_processing.ImageProcessor | None):
        self._size, self._processor = image_size, processor
        if processor is None:
            self.mean = image_processing.OPENAI_CLIP_MEAN
            self.std = image_processing.OPENAI_CLIP_STD
        elif processor.do_normalize:
            self.mean, self.std = tuple(processor.image_mean), tuple(processor.image_std)
        else:
            self.mean, self.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        self._mean = np.asarray(self.mean, np.float32)
        self._std = np.asarray(self.std, np.float32)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if self._processor is not None:
            return self._processor.process(image)
        image = image_processing.to_rgb(np.asarray(image))
        if image.shape[:2] != (self._size, self._size):
            image = np.asarray(Image.fromarray(image).resize((self._size, self._size),
                                                             Image.Resampling.BICUBIC))
        return (image.astype(np.float32) / 255.0 - self._mean) / self._std


# ---------------------------------------------------------------------------------------------
# Real sources: records {'image': uint8 [H, W, 3], 'caption': str, 'index': int}.
# ---------------------------------------------------------------------------------------------


def read_image(file: str, where: str, root_field: str) -> np.ndarray:
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{where}: image file {file} not found (relative paths start at "
                                f"{root_field}).")
    try:
        with Image.open(file) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: cannot read image {file}: {e}") from e


def read_rows(file: str, kind: str, required: Mapping[str, str],
              optional: Mapping[str, str] | None = None) -> list[tuple[dict[str, str], int]]:
    """Every row of a jsonl / csv file as ({config field: value}, line number).

    Args:
      file: the file (named in errors as config.data.path / eval_path).
      kind: 'jsonl' (one JSON object per line; blank lines skipped) or 'csv' (header row).
      required: config field -> key (e.g. {'image_key': 'image'}); every row needs a non-empty
        string there (a csv header must name the column).
      optional: config field -> key whose value may be absent or empty ('' then); when present
        it must be a string.
    """
    optional = dict(optional or {})
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{kind} file {file} not found (config.data.path / eval_path).")
    rows = []
    with open(file, newline="" if kind == "csv" else None, encoding="utf-8") as f:
        if kind == "csv":
            reader = csv.DictReader(f)
            missing = [k for k in required.values() if k not in (reader.fieldnames or ())]
            if missing:
                fields = " / ".join(required)
                raise ValueError(
                    f"{file}:1: the header {reader.fieldnames} has no column {missing[0]!r} "
                    f"(config.data.{fields}).")
            items = ((reader.line_num, row) for row in reader)
        else:
            items = enumerate(f, start=1)
        for line, row in items:
            if kind == "jsonl":
                if not row.strip():
                    continue
                try:
                    row = json.loads(row)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{file}:{line}: not valid JSON ({e}).") from e
                if not isinstance(row, dict):
                    raise ValueError(f"{file}:{line}: expected a JSON object, got "
                                     f"{type(row).__name__}.")
            values = {}
            for field, key in required.items():
                if not isinstance(row.get(key), str) or not row[key]:
                    raise ValueError(f"{file}:{line}: no non-empty string {key!r} "
                                     f"(config.data.{field}={key!r}); got {row.get(key)!r}.")
                values[field] = row[key]
            for field, key in optional.items():
                value = row.get(key)  # csv: None for a short row, '' for an empty cell.
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"{file}:{line}: {key!r} (config.data.{field}) must be a "
                                     f"string; got {value!r}.")
                values[field] = value or ""
            rows.append((values, line))
    return rows


def _read_pairs(file: str, kind: str, image_key: str,
                caption_key: str) -> list[tuple[str, str, int]]:
    """(image path, caption, line number) of every row of a jsonl / csv file."""
    return [(r["image_key"], r["caption_key"], line) for r, line in
            read_rows(file, kind, {"image_key": image_key, "caption_key": caption_key})]


class FileRecords:
    """Random-access (image, caption) records of rows of a jsonl / csv file."""

    def __init__(self, file: str, rows: Sequence[tuple[str, str, int]], image_root: str):
        self._file, self._rows, self._root = file, list(rows), image_root

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        path, text, line = self._rows[int(index)]
        image = read_image(os.path.join(self._root, path), f"{self._file}:{line}",
                            f"config.data.image_root={self._root!r}")
        return {"image": image, "caption": text, "index": int(index)}

    def __repr__(self) -> str:
        return f"FileRecords({self._file!r}, n={len(self)})"


def _file_sources(cfg) -> tuple[Sequence[dict], Sequence[dict], str]:
    path = os.fspath(cfg.path)
    rows = _read_pairs(path, cfg.source, cfg.image_key, cfg.caption_key)
    root = cfg.image_root or os.path.dirname(os.path.abspath(path))
    if cfg.eval_path:
        eval_rows = _read_pairs(cfg.eval_path, cfg.source, cfg.image_key, cfg.caption_key)
        train = FileRecords(path, rows, root)
        eval_ = FileRecords(cfg.eval_path, eval_rows, root)
        return train, eval_, f"{cfg.source} {path} (eval {cfg.eval_path})"
    if len(rows) <= cfg.num_eval:
        raise ValueError(
            f"{path} has {len(rows)} rows; holding out config.data.num_eval={cfg.num_eval} "
            "for evaluation leaves none to train on. Lower num_eval or set "
            "config.data.eval_path.")
    held = cfg.num_eval
    return (FileRecords(path, rows[held:], root), FileRecords(path, rows[:held], root),
            f"{cfg.source} {path} (first {held} rows held out for eval)")


def _decode_tfds_image(value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = value.item()
    if isinstance(value, bytes):
        with Image.open(io.BytesIO(value)) as im:
            return np.asarray(im.convert("RGB"))
    return image_processing.to_rgb(np.asarray(value, np.uint8))


class TfdsRecords:
    """Random-access records of one split of a prepared TFDS dataset."""

    def __init__(self, data_source: Sequence[Any], cfg, description: str):
        self._source, self._cfg, self._description = data_source, cfg, description

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        record = self._source[int(index)]
        text = record[self._cfg.caption_key]
        if isinstance(text, np.ndarray):
            text = text.item()
        if isinstance(text, bytes):  # tfds Text features decode to UTF-8 bytes.
            text = text.decode("utf-8")
        return {"image": _decode_tfds_image(record[self._cfg.image_key]), "caption": str(text),
                "index": int(index)}

    def __repr__(self) -> str:
        return f"TfdsRecords({self._description}, n={len(self)})"


def _tfds_sources(cfg) -> tuple[Sequence[dict], Sequence[dict], str]:
    builder, origin = common.open_tfds_builder(
        cfg.tfds_name, cfg.path, writer="vlmjax.data.image_text.write_image_text_dataset")
    features = list(builder.info.features.keys())
    for field in ("image_key", "caption_key"):
        if cfg[field] not in features:
            raise ValueError(f"config.data.{field}={cfg[field]!r}: {origin} has no such "
                             f"feature (features: {features}).")
    eval_split = common.resolve_eval_split(builder, cfg.eval_split, clips.EVAL_SPLIT_CANDIDATES, origin)
    description = f"{origin} (splits {cfg.train_split!r} / {eval_split!r})"
    train, eval_ = (TfdsRecords(common.tfds_split(builder, split, field=field, origin=origin),
                                cfg, f"{origin} {split!r}")
                    for split, field in ((cfg.train_split, "train_split"),
                                         (eval_split, "eval_split")))
    return train, eval_, description


def write_image_text_dataset(data_dir: str, splits: Mapping[str, Sequence[tuple[np.ndarray, str]]],
                             *, image_format: str = "raw", image_key: str = "image",
                             caption_key: str = "caption") -> str:
    """Builds TFDS dataset ``vlmjax_image_text`` (array_record) under ``data_dir``, no TensorFlow.

    Args:
      data_dir: TFDS data directory (``config.data.path`` with
        ``config.data.tfds_name='vlmjax_image_text'``).
      splits: split name -> (image uint8 [H, W, 3], caption) pairs.
      image_format: 'raw' (uint8 tensor, zlib) or 'png' (encoded bytes).
      image_key / caption_key: feature names.

    Returns:
      The prepared builder directory (record i of a split is ``splits[split][i]``).
    """
    if image_format not in ("raw", "png"):
        raise ValueError(f"image_format={image_format!r} is not one of ('raw', 'png').")

    def features(tfds):
        image = (tfds.features.Tensor(shape=(None, None, 3), dtype=np.uint8, encoding="zlib")
                 if image_format == "raw" else tfds.features.Tensor(shape=(), dtype=np.object_))
        return tfds.features.FeaturesDict({image_key: image, caption_key: tfds.features.Text()})

    def encode(image: np.ndarray):
        image = np.asarray(image, np.uint8)
        if image_format == "raw":
            return image
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        return buffer.getvalue()

    def records(split):
        for image, text in splits[split]:
            yield {image_key: encode(image), caption_key: text}

    return common.write_tfds_dataset(data_dir, "VlmjaxImageText", features,
                                     {name: records(name) for name in splits},
                                     disable_shuffling=True, module=__name__)


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------


class _ToExample(grain.transforms.Map):
    """Record -> example dict (module docstring)."""

    def __init__(self, preprocess: Callable[[np.ndarray], np.ndarray], tokenizer, max_len: int):
        self._preprocess, self._tokenizer, self._max_len = preprocess, tokenizer, max_len

    def map(self, record: dict) -> dict[str, np.ndarray]:
        text, valid = encode_text(self._tokenizer, record["caption"], self._max_len)
        return {"image": self._preprocess(record["image"]), "text": text, "text_valid": valid,
                "mask": np.float32(1.0), "index": np.int32(record["index"])}


def eval_rows(num_eval: int, global_batch_size: int, process_index: int, process_count: int,
              max_batches: int | None = None) -> list[tuple[int, bool]]:
    """This process's (example index, real?) rows of the padded evaluation batches, in order.

    Global batch b holds examples [b G, (b + 1) G); process p gets rows [p B, (p + 1) B),
    B = G // process_count. Rows past the last example repeat it with real=False, so every
    process gets ceil(num_eval / G) batches (at most `max_batches`; None or 0 = all).
    """
    local_batch = common.check_batching(global_batch_size, process_index, process_count)
    if max_batches is not None and max_batches < 0:
        raise ValueError(f"max_batches={max_batches} must be >= 0 (0 or None = all).")
    num_batches = math.ceil(num_eval / global_batch_size)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    rows = []
    for b in range(num_batches):
        first = b * global_batch_size + process_index * local_batch
        rows += [(min(i, num_eval - 1), i < num_eval) for i in range(first, first + local_batch)]
    return rows


class EvalRow(grain.transforms.Map):
    """(index, real?) -> example; padding rows repeat the last example with mask 0 (``mask_dtype``)."""

    def __init__(self, records: Sequence[dict], to_example: grain.transforms.Map, mask_dtype=np.float32):
        self._records, self._to_example, self._mask_dtype = records, to_example, mask_dtype

    def map(self, row: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, real = row
        example = self._to_example.map(self._records[index])
        example["mask"] = self._mask_dtype(real)
        return example


class RecordPipelines:
    """The grain pipelines of a dataset of random-access records (``ImageTextData``,
    ``vlm_data.VLMData``): the subclass (a dataclass) holds ``config`` (num_threads,
    prefetch_buffer_size, prefetch_batches, seed), ``train_records``, ``eval_records``,
    ``description`` and ``_to_example`` (record -> example), and sets ``_mask_dtype`` (the eval
    ``mask``'s dtype)."""

    _mask_dtype = np.float32

    def example(self, index: int, split: str = "train") -> dict[str, np.ndarray]:
        """One example of `split` ('train' / 'eval') exactly as the pipelines produce it."""
        records = self.train_records if split == "train" else self.eval_records
        return self._to_example.map(records[index])

    def _read_options(self) -> grain.ReadOptions:
        return grain.ReadOptions(num_threads=self.config.num_threads,
                                 prefetch_buffer_size=self.config.prefetch_buffer_size)

    def train_dataset(self, *, global_batch_size: int, seed: int, process_index: int,
                      process_count: int) -> grain.IterDataset:
        """The infinite, shuffled training stream of this process.

        Records are shuffled with (seed, config.seed), reshuffled every epoch, dealt
        round-robin to the processes, and rendered/decoded lazily by grain's reader threads.

        Returns:
          A grain.IterDataset of dicts (module docstring) with a leading per-process batch
          axis B = global_batch_size // process_count; checkpoint its iterator with
          `grain.checkpoint.CheckpointSave`.
        """
        local_batch = common.check_batching(global_batch_size, process_index, process_count)
        if len(self.train_records) < global_batch_size:
            raise ValueError(
                f"the training split of {self.description} has {len(self.train_records)} "
                f"examples, fewer than the global batch size {global_batch_size}.")
        ds = common.sharded_train_dataset(
            self.train_records, seed=seed, shuffle_seed=self.config.seed,
            process_index=process_index, process_count=process_count,
            transform=self._to_example, read_options=self._read_options())
        return common.batch_and_prefetch(ds, local_batch, self.config.prefetch_batches)

    def eval_batches(self, *, global_batch_size: int, process_index: int, process_count: int,
                     max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
        """This process's share of the evaluation batches, in a fixed order.

        Global batch b holds eval examples [b G, (b + 1) G); process p gets rows
        [p B, (p + 1) B), B = G // process_count. Rows past the last example repeat it with
        mask 0, so every process gets the same number of batches (``eval_rows``).

        Args:
          global_batch_size: G.
          process_index / process_count: this process and the number of processes.
          max_batches: at most this many leading global batches (None or 0 = all).
        """
        local_batch = common.check_batching(global_batch_size, process_index, process_count)
        num_eval = len(self.eval_records)
        if not num_eval:
            raise ValueError(f"{self.description} has no evaluation examples.")
        rows = eval_rows(num_eval, global_batch_size, process_index, process_count, max_batches)
        ds = grain.MapDataset.source(rows).map(EvalRow(self.eval_records, self._to_example, self._mask_dtype))
        return list(ds.to_iter_dataset(self._read_options()).batch(local_batch))


@dataclasses.dataclass
class ImageTextData(RecordPipelines):
    """Image-caption pairs of one data config (any source): training stream and eval batches.

    Attributes:
      config: the data config (frozen copy).
      train_records / eval_records: random-access records of each split; lengths = split sizes.
      tokenizer: `.encode(text)` -> int32 ids, `.decode(ids)`; special ids below.
      vocab_size, pad_id, bos_id, eos_id: the text embedding size and special ids (the CLIP
        text tower pools at eos_id).
      mean / std: per-channel normalisation of `image`.
      image_size: S.
      description: where the pairs come from, for logs.
    """

    config: Any
    train_records: Sequence[dict]
    eval_records: Sequence[dict]
    tokenizer: Any
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    description: str
    _to_example: _ToExample = dataclasses.field(repr=False, default=None)


def _tokenizer(cfg, workdir):
    if cfg.tokenizer:
        return tokenizers.HFTokenizer(cfg.tokenizer)
    return scene_tokenizer(scenes.vocabulary(cfg.scenes), workdir)


def scene_tokenizer(vocabulary: Sequence[str], workdir: epath.PathLike | None) -> SceneTokenizer:
    """The built-in word tokenizer over `vocabulary`, saved as <workdir>/scene_tokenizer.json."""
    tok = SceneTokenizer(vocabulary)
    if workdir:
        # Saved for reference (other tools, later stages): the vocabulary is fixed by the config.
        directory = epath.Path(workdir)
        directory.mkdir(parents=True, exist_ok=True)
        # pylint: disable-next=protected-access
        tokenizers._atomic_write(directory / SCENE_TOKENIZER_FILE, tok.to_json())
    return tok


def make_processor(cfg) -> image_processing.ImageProcessor | None:
    if not cfg.processor:
        return None
    processor = image_processing.ImageProcessor.from_pretrained(cfg.processor)
    if processor.output_size != (cfg.image_size, cfg.image_size):
        raise ValueError(
            f"config.data.processor={cfg.processor!r} makes images of size "
            f"{processor.output_size} (None: aspect-dependent), but config.data.image_size="
            f"{cfg.image_size}; set image_size to the processor's square crop size.")
    return processor


def build_image_text_data(data_cfg, workdir: epath.PathLike | None = None) -> ImageTextData:
    """Validates the config, opens the sources and the tokenizer.

    Args:
      data_cfg: the data section (`default_config()`).
      workdir: with the built-in scene tokenizer, its tokenizer.json is written to
        `<workdir>/scene_tokenizer.json` (None: not written).

    Returns:
      ImageTextData. File lists are read (and every row checked) and TFDS datasets opened
      here; images are only read when an example is.
    """
    _check_config(data_cfg)
    cfg = ml_collections.FrozenConfigDict(data_cfg)
    tokenizer = _tokenizer(cfg, workdir)
    preprocess = Preprocess(cfg.image_size, make_processor(cfg))
    if cfg.source == "scenes":
        sc = cfg.scenes
        train = scenes.SceneRecords(sc, "train", cfg.image_size)
        eval_ = scenes.SceneRecords(sc, "eval", cfg.image_size,
                                    scenes.eval_indices(sc, cfg.num_eval))
        description = (f"procedural scenes ({sc.min_objects}-{sc.max_objects} objects, "
                       f"{len(sc.held_out)} held-out pairs)")
    elif cfg.source == "tfds":
        train, eval_, description = _tfds_sources(cfg)  # Imports tensorflow_datasets (slow).
    else:
        train, eval_, description = _file_sources(cfg)
    return ImageTextData(
        config=cfg, train_records=train, eval_records=eval_, tokenizer=tokenizer,
        vocab_size=int(tokenizer.vocab_size), pad_id=int(tokenizer.pad_id),
        bos_id=int(tokenizer.bos_id), eos_id=int(tokenizer.eos_id), mean=preprocess.mean,
        std=preprocess.std, image_size=cfg.image_size, description=description,
        _to_example=_ToExample(preprocess, tokenizer, cfg.max_text_len))
