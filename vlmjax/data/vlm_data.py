"""Captioning + VQA examples for the vision-language decoder (task `vlm`): config and pipeline.

The decoder sees a visual prefix [B, N, D] followed by the text below; it is trained with
next-token loss on the target (HF convention: `labels` are -100 where ignored and are shifted
inside the loss) and evaluated by greedy generation from the left-padded prompt, exact match
(`normalize_answer`) per question type, beside the answer-prior baseline (`answer_prior`).

Each example is a dict of numpy arrays; batches add a leading per-process axis B
(S = image_size, L = max_text_len, P = max_prompt_len):

  image:          float32 [S, S, 3]  preprocessed as in `image_text` (resize + CLIP mean/std,
                                     or the HF processor of `processor`)
  input_ids:      int32   [L]  [BOS] + prompt + target + [EOS], right-padded with pad_id
  attention_mask: int32   [L]  1 on those tokens, 0 on padding
  labels:         int32   [L]  input_ids on the target tokens and [EOS]; -100 on [BOS], the
                               prompt and padding (not shifted). With config.data.turns > 1
                               (training on scenes), later turns follow the first:
                               [BOS] p1 t1 [EOS] p2 t2 [EOS] ..., each target labelled
  label_kind:     int32   [L]  the kind (CAPTION / VQA) of the turn each labelled token belongs to,
                               -1 where labels is -100 (per-kind losses of multi-turn examples)
  prompt_ids:     int32   [P]  [BOS] + prompt, LEFT-padded with pad_id, so generation appends
                               at column P for every row (equal to input_ids[:n] of the row)
  prompt_mask:    int32   [P]  1 on [BOS] + prompt, 0 on the left padding
  kind:           int32   []   0 = caption (CAPTION), 1 = VQA (VQA)
  qtype:          int32   []   index into VLMData.qtypes; -1 for captions
  index:          int32   []   train: the record index; eval: the row of VLMData.eval_examples
  mask:           int32   []   1 = real example, 0 = padding row of the last eval batch
  answer_id:      int32   []   only from `VLMData.with_answer_vocabulary(vocab)` (classification
                               heads): the vocab index of the normalised answer, 0 (UNK_ANSWER)
                               when it is not in the vocabulary, -1 for captions

Prompt format (`format_example`, the only place that spells it):
  VQA         "question: <q> answer:"  -> target " <a>" + [EOS]
  captioning  "caption:"               -> target " <caption>" + [EOS]
[BOS] comes first when the tokenizer has one. Prompt and target are tokenized separately, so the
ids the model is trained to continue are exactly the prompt_ids it generates from.

Over-long examples are an error naming config.data.max_text_len / max_prompt_len and the length
needed (never silently cut: a truncated answer would teach wrong answers). `build_vlm_data`
measures every row of a jsonl/csv file and, for 'scenes', the eval examples and the
answer-prior sample of training examples, so a too-small limit fails at the start of a run.

Sources (`config.data.source`):
  'scenes'  procedural scenes (`vlmjax.data.scenes`). Training record i is train scene i with
            a caption (probability `caption_fraction`; a random template and object order) or
            one question: a question type drawn uniformly among those the scene has, then one
            of its questions (all have unique answers); drawn from (scenes.seed, i), so
            deterministic per index. Eval: the `num_eval` held-out scenes of
            `scenes.eval_indices` (every one has a held-out colour-shape pair), each as one
            caption (template 0) followed by all its questions, or a fixed random subset of
            `eval_questions` of them.
  'jsonl'   one JSON object per line (PixMo style), e.g.
            {"image": "imgs/1.jpg", "question": "what colour is the car?", "answer": "red",
             "question_type": "color"}; an empty or absent question makes the row a captioning
            example with the answer as the caption.
  'csv'     the same fields as columns of a header row (UTF-8).
For 'jsonl'/'csv', image paths are relative to `image_root` ('' = the file's folder), or,
with `image_pattern` (e.g. '{}.jpg', COCO-style '{:012d}.jpg'; ViVQA's `img_id` column), the
image column holds an id and the file is `image_root/image_pattern.format(id)` (the id as an int
when the pattern needs one);
evaluation reads `eval_path`, or holds out the FIRST num_eval rows. Question types come from
`qtype_key`; when no VQA row has one, every question has type 'ALL'.

Tokenizer (`config.data.tokenizer`): '' = the scenes word tokenizer (`image_text.
SceneTokenizer`) over the scene vocabulary plus the prompt words, so no scene text encodes to
[UNK]; or a local HF directory with tokenizer.json (`tokenizers.HFTokenizer`). Its BOS is the
`bos_token` of tokenizer_config.json when that file names one (null, as in Qwen2/2.5, or
add_bos_token=false: no BOS); without tokenizer_config.json, config.json's bos_token_id unless it
equals the EOS id (GPT-2 style: no BOS).
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import difflib
import json
import math
import os
import types
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging
from etils import epath
import grain
import ml_collections
import numpy as np
from PIL import Image

from vlmjax.data import image_text
from vlmjax.data import scenes
from vlmjax.data import tokenizers

SOURCES = ("scenes", "jsonl", "csv")
EVAL_COMPOSITIONS = ("held_out", "seen")  # config.data.eval_compositions (scenes)
CAPTION, VQA = 0, 1
KINDS = ("caption", "vqa")
IGNORE = -100  # HF's ignore_index for labels.
ALL_TYPES = "ALL"  # The one question type of a file without types.
UNK_ANSWER = "<unk>"  # Entry 0 of an answer vocabulary: every answer outside it (never correct).


def default_config() -> ml_collections.ConfigDict:
    """The `data` section of a vision-language (captioning + VQA) experiment config."""
    c = ml_collections.ConfigDict()
    # 'scenes' (procedural, nothing to download), 'jsonl' or 'csv' (+ a folder of images).
    c.source = "scenes"
    # S: images are S x S (a multiple of the vision tower's patch size).
    c.image_size = 64
    # Mixed with the trainer's seed for the training order only (scene content: scenes.seed).
    c.seed = 0
    # 'scenes': held-out eval scenes; 'jsonl'/'csv' without eval_path: leading rows held out.
    c.num_eval = 128
    # 'scenes': questions per eval scene, drawn like the training ones (a uniform question type,
    # then one of its questions; fixed per scene); 0 = all of them (~3/4 are COUNT questions).
    c.eval_questions = 0
    # 'scenes': which compositions the eval scenes hold. 'held_out': every eval scene holds a
    # (colour, shape) pair training never shows (scenes.held_out), the compositional test;
    # 'seen': new scenes drawn like the training ones (indices past scenes.num_train, so never
    # trained on), the i.i.d. test.
    c.eval_compositions = "held_out"
    # 'scenes': fraction of training examples that are captions (the rest are VQA).
    c.caption_fraction = 0.2
    # 'scenes': turns per training image, as in multi-turn instruction data (LLaVA): the first
    # turn is drawn as above (a caption or one question); up to turns - 1 more distinct
    # questions about the same image follow ([BOS] p1 t1 [EOS] p2 t2 [EOS] ...), as many as fit
    # in max_text_len (a turn is never cut). Each image then supervises several answers: with
    # turns=1 a from-scratch vision tower gets ~1/5 of a labelled colour per image and did not
    # learn in 900 steps (docs/vlm.md). Evaluation is always one turn.
    c.turns = 1
    # 'scenes': training records read (text only, nothing rendered) for the answer prior and
    # the length check; 'jsonl'/'csv' always use every training row.
    c.answer_prior_samples = 20_000
    # L: [BOS] + prompt + target + [EOS] tokens (the longest scene caption with 2 objects and
    # the word tokenizer needs 28).
    c.max_text_len = 40
    # P: [BOS] + prompt tokens, the generation prefix (scene questions need at most 13).
    c.max_prompt_len = 16
    # '' = built-in scene word tokenizer ('scenes' only), or a local HF directory holding
    # tokenizer.json (+ config.json / tokenizer_config.json for the special tokens), e.g. the
    # decoder's own checkpoint directory.
    c.tokenizer = ""
    # '' = resize to S x S + CLIP mean/std, or a local HF directory (or file) with
    # preprocessor_config.json (`vlmjax.data.image_processing`).
    c.processor = ""
    # 'jsonl'/'csv': the training file, a separate evaluation file ('' = hold out num_eval
    # leading rows), and the folder relative image paths start from ('' = the file's folder).
    c.path = ""
    c.eval_path = ""
    c.image_root = ""
    # 'jsonl'/'csv': '' = the image field is a path; else a str.format pattern turning the
    # field (an image id) into the file name under image_root, e.g. '{}.jpg' or COCO-style
    # '{:012d}.jpg' (ViVQA: image_key='img_id').
    c.image_pattern = ""
    # 'jsonl'/'csv' field names. An empty/absent question = a captioning row; qtype_key may be
    # absent from the file (every question is then of type 'ALL').
    c.image_key = "image"
    c.question_key = "question"
    c.answer_key = "answer"
    c.qtype_key = "question_type"
    # grain reader threads (rendering / decoding images; 0 = inline), their read-ahead, and
    # batches prepared ahead on a background thread (0 = none).
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
    for field in ("image_size", "num_eval", "answer_prior_samples"):
        if not isinstance(cfg[field], int) or cfg[field] < 1:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 1.")
    if not isinstance(cfg.turns, int) or isinstance(cfg.turns, bool) or cfg.turns < 1:
        raise ValueError(f"config.data.turns={cfg.turns!r} must be an int >= 1 (1 = one turn per image).")
    if cfg.turns > 1 and cfg.source != "scenes":
        raise ValueError(f"config.data.turns={cfg.turns} needs source='scenes' (a jsonl/csv row is one turn); "
                         "set config.data.turns=1.")
    compositions = cfg.get("eval_compositions", "held_out")  # absent in runs saved before it existed
    if compositions not in EVAL_COMPOSITIONS:
        raise ValueError(f"config.data.eval_compositions={compositions!r}; use one of {EVAL_COMPOSITIONS}.")
    for field in ("eval_questions", "num_threads", "prefetch_buffer_size", "prefetch_batches"):
        if not isinstance(cfg[field], int) or cfg[field] < 0:
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be an int >= 0.")
    if not isinstance(cfg.max_prompt_len, int) or cfg.max_prompt_len < 2:
        raise ValueError(f"config.data.max_prompt_len={cfg.max_prompt_len!r} must be an int >= 2.")
    if not isinstance(cfg.max_text_len, int) or cfg.max_text_len <= cfg.max_prompt_len:
        raise ValueError(
            f"config.data.max_text_len={cfg.max_text_len!r} must be an int > max_prompt_len="
            f"{cfg.max_prompt_len} (the prompt plus at least one target token and [EOS]).")
    if not isinstance(cfg.caption_fraction, (int, float)) or not 0 <= cfg.caption_fraction <= 1:
        raise ValueError(
            f"config.data.caption_fraction={cfg.caption_fraction!r} must be a number in [0, 1].")
    for field in ("tokenizer", "processor", "path", "eval_path", "image_root", "image_pattern", "image_key",
                  "question_key", "answer_key", "qtype_key"):
        if not isinstance(cfg[field], str):
            raise ValueError(f"config.data.{field}={cfg[field]!r} must be a string.")
    for field in ("image_key", "question_key", "answer_key"):
        if not cfg[field]:
            raise ValueError(f"config.data.{field} is empty; name the {field[:-4]} field/column.")
    if cfg.image_pattern and "{" not in cfg.image_pattern:
        raise ValueError(f"config.data.image_pattern={cfg.image_pattern!r} has no {{}} field for the image "
                         "id; use e.g. '{}.jpg' or '{:012d}.jpg', or '' when the column holds paths.")
    if cfg.source == "scenes":
        scenes.check_config(cfg.scenes)
        return
    if not cfg.tokenizer:
        raise ValueError(
            f"source={cfg.source!r} needs config.data.tokenizer: a local HF directory with "
            "tokenizer.json (the built-in word tokenizer only knows the scene vocabulary).")
    if not cfg.path:
        raise ValueError(f"source={cfg.source!r} needs config.data.path: the {cfg.source} file "
                         "of (image, question, answer) rows.")


# ---------------------------------------------------------------------------------------------
# Prompt format, answer normalisation.
# ---------------------------------------------------------------------------------------------


def format_example(kind: int, question: str, answer: str) -> tuple[str, str]:
    """(prompt text, target text) of one example: THE prompt format of the vlm task.

    VQA: "question: <q> answer:" -> " <a>"; captioning: "caption:" -> " <caption>"
    ([BOS] and [EOS] are added as ids, not text). The target's leading space makes byte-level
    BPEs (SmolLM2, Qwen) encode the answer with the same word tokens as in running text
    (' red' = 'Ġred'); the word tokenizer ignores it. Question and answer are stripped.
    """
    if kind == CAPTION:
        return "caption:", " " + answer.strip()
    if kind == VQA:
        return f"question: {question.strip()} answer:", " " + answer.strip()
    raise ValueError(f"kind={kind!r} is not {CAPTION} (caption) or {VQA} (vqa).")


def prompt_vocabulary() -> tuple[str, ...]:
    """Words of the prompt format (for the scene word tokenizer)."""
    texts = format_example(CAPTION, "", "") + format_example(VQA, "", "")
    return tuple(sorted({w for t in texts for w in scenes.words(t)}))


def normalize_answer(text: str) -> str:
    """The exact-match normal form: lowercase, whitespace collapsed and stripped, trailing
    punctuation (any Unicode punctuation class) removed: 'Two.' == ' two' == 'TWO !'."""
    text = " ".join(text.lower().split())
    end = len(text)
    while end and (unicodedata.category(text[end - 1]).startswith("P") or text[end - 1] == " "):
        end -= 1
    return text[:end]


def image_file_name(pattern: str, image_id: str) -> str:
    """The image file of a jsonl/csv row: `image_id` itself without a pattern, else
    `pattern.format(image_id)`, the id as an int when the pattern's format needs a number
    ('{:012d}.jpg' and '123' -> '000000000123.jpg')."""
    if not pattern:
        return image_id
    try:
        return pattern.format(image_id)
    except (ValueError, IndexError, KeyError) as e:
        try:
            return pattern.format(int(image_id.strip()))
        except (ValueError, IndexError, KeyError):
            raise ValueError(f"config.data.image_pattern={pattern!r} cannot format the image id "
                             f"{image_id!r}: {e}") from e


def answer_vocabulary(answers: Sequence[str], size: int = 0) -> tuple[str, ...]:
    """A classification head's answer vocabulary: (UNK_ANSWER, then the `size` most frequent
    normalised answers, most frequent first, ties alphabetical); size 0 = every answer."""
    counts = collections.Counter(normalize_answer(a) for a in answers)
    ranked = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if a != UNK_ANSWER]
    return (UNK_ANSWER, *(ranked[:size] if size else ranked))


def most_frequent(answers: Sequence[str]) -> str:
    """The most frequent normalised answer; ties go to the alphabetically first (deterministic)."""
    counts = collections.Counter(normalize_answer(a) for a in answers)
    return min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]


# ---------------------------------------------------------------------------------------------
# Records: text(i) = {'kind', 'qtype' (id), 'question', 'answer'}; [i] adds 'image', 'index'.
# ---------------------------------------------------------------------------------------------


def _plain(cfg) -> types.SimpleNamespace:
    """The scenes config as plain attributes: a FrozenConfigDict lookup costs ~7 us, and
    sampling one scene makes about 13 of them (a third of the time of the prior sample)."""
    return types.SimpleNamespace(**{k: tuple(tuple(x) if isinstance(x, (list, tuple)) else x
                                             for x in v) if isinstance(v, (list, tuple)) else v
                                    for k, v in cfg.items()})


class SceneTrainRecords:
    """Training records of the procedural scenes (module docstring): record i is a function of
    (scenes.seed, i); `text(i)` samples the scene without rendering it."""

    def __init__(self, cfg, image_size: int, caption_fraction: float, turns: int = 1):
        self._cfg = _plain(cfg)
        self._size, self._caption_fraction = image_size, float(caption_fraction)
        self._turns = int(turns)
        self._qtype_id = {t: i for i, t in enumerate(scenes.QA_TYPES)}

    def _draw(self, rng: np.random.Generator, qas: Sequence[scenes.QA]) -> scenes.QA:
        """A uniform question type first (COUNT questions outnumber the others about 3 to 1 per
        scene), then one of its questions."""
        by_type: dict[str, list[scenes.QA]] = {}
        for qa in qas:
            by_type.setdefault(qa.type, []).append(qa)
        options = by_type[list(by_type)[int(rng.integers(len(by_type)))]]
        return options[int(rng.integers(len(options)))]

    def _vqa(self, qa: scenes.QA) -> dict:
        return {"kind": VQA, "qtype": self._qtype_id[qa.type], "question": qa.question, "answer": qa.answer}

    def __len__(self) -> int:
        return self._cfg.num_train

    def _sample(self, index: int) -> tuple[scenes.Scene, dict]:
        scene = scenes.sample_scene(self._cfg.seed, index, "train", self._cfg)
        # Stream 2 of the index (scenes.SceneRecords uses 1 for its captions).
        rng = np.random.default_rng([self._cfg.seed, scenes.SPLITS["train"], index, 2])
        qas = scenes.questions(scene)
        if rng.random() < self._caption_fraction:
            record = {"kind": CAPTION, "qtype": -1, "question": "", "answer": scenes.caption(scene, rng=rng)}
        else:
            first = self._draw(rng, qas)
            record = self._vqa(first)
            qas = [qa for qa in qas if qa is not first]
        if self._turns > 1:
            # Stream 3: the later turns, distinct questions drawn like the first (the first turn,
            # and so the answer prior, is the same for every `turns`).
            rng = np.random.default_rng([self._cfg.seed, scenes.SPLITS["train"], index, 3])
            more = []
            while qas and len(more) < self._turns - 1:
                qa = self._draw(rng, qas)
                more.append(self._vqa(qa))
                qas = [q for q in qas if q is not qa]
            record["more"] = more
        return scene, record

    def text(self, index: int) -> dict:
        return self._sample(int(index))[1]

    def where(self, index: int) -> str:
        return f"training scene {index}"

    def __getitem__(self, index: int) -> dict:
        scene, record = self._sample(int(index))
        return {**record, "image": scenes.render(scene, self._size), "index": int(index)}

    def __repr__(self) -> str:
        return f"SceneTrainRecords(n={len(self)}, caption_fraction={self._caption_fraction}, turns={self._turns})"


class _ListRecords:
    """Records from a list of text entries, each with a way to its image."""

    def __init__(self, entries: Sequence[dict], image: Callable[[dict], np.ndarray], name: str):
        self._entries, self._image, self._name = list(entries), image, name

    def __len__(self) -> int:
        return len(self._entries)

    def text(self, index: int) -> dict:
        e = self._entries[int(index)]
        return {k: e[k] for k in ("kind", "qtype", "question", "answer")}

    def where(self, index: int) -> str:
        e = self._entries[int(index)]
        return f"{e['file']}:{e['line']}" if "file" in e else f"{self._name} {index}"

    def __getitem__(self, index: int) -> dict:
        return {**self.text(index), "image": self._image(self._entries[int(index)]),
                "index": int(index)}

    def __repr__(self) -> str:
        return f"{self._name}(n={len(self)})"


def _scene_eval_records(cfg) -> _ListRecords:
    sc = _plain(cfg.scenes)
    qtype_id = {t: i for i, t in enumerate(scenes.QA_TYPES)}
    entries = []
    if cfg.get("eval_compositions", "held_out") == "seen":  # training's distribution, past what training reads
        split, raws = "train", [sc.num_train + i for i in range(cfg.num_eval)]
    else:
        split, raws = "eval", scenes.eval_indices(sc, cfg.num_eval)
    for raw in raws:
        scene = scenes.sample_scene(sc.seed, raw, split, sc)
        entries.append({"raw": raw, "kind": CAPTION, "qtype": -1, "question": "",
                        "answer": scenes.caption(scene)})
        qas = scenes.questions(scene)
        if cfg.eval_questions and len(qas) > cfg.eval_questions:
            # Drawn as training draws them (a uniform question type, then one of its questions), without
            # repeats: the eval mix matches the training mix instead of being ~3/4 COUNT questions.
            rng = np.random.default_rng([sc.seed, scenes.SPLITS[split], raw, 2])
            by_type: dict[str, list[scenes.QA]] = {}
            for qa in qas:
                by_type.setdefault(qa.type, []).append(qa)
            picked = []
            for _ in range(cfg.eval_questions):
                t = sorted(by_type)[int(rng.integers(len(by_type)))]
                picked.append(by_type[t].pop(int(rng.integers(len(by_type[t])))))
                if not by_type[t]:
                    del by_type[t]
            qas = [qa for qa in qas if qa in picked]
        entries += [{"raw": raw, "kind": VQA, "qtype": qtype_id[qa.type], "question": qa.question,
                     "answer": qa.answer} for qa in qas]

    def image(entry):
        return scenes.render(scenes.sample_scene(sc.seed, entry["raw"], split, sc), cfg.image_size)

    return _ListRecords(entries, image, "SceneEvalRecords")


def _read_vqa_rows(file: str, cfg) -> list[dict]:
    rows = []
    for r, line in image_text.read_rows(
            file, cfg.source, {"image_key": cfg.image_key, "answer_key": cfg.answer_key},
            {"question_key": cfg.question_key, "qtype_key": cfg.qtype_key} if cfg.qtype_key
            else {"question_key": cfg.question_key}):
        if not r["answer_key"].strip():
            raise ValueError(f"{file}:{line}: the answer {cfg.answer_key!r} "
                             f"(config.data.answer_key) is blank.")
        question = r["question_key"].strip()
        rows.append({"file": file, "line": line, "path": r["image_key"],
                     "kind": VQA if question else CAPTION, "question": question,
                     "answer": r["answer_key"], "qtype_name": r.get("qtype_key", "").strip()})
    return rows


def _file_records(cfg) -> tuple[_ListRecords, _ListRecords, tuple[str, ...], str]:
    path = os.fspath(cfg.path)
    train = _read_vqa_rows(path, cfg)
    root = cfg.image_root or os.path.dirname(os.path.abspath(path))
    if cfg.eval_path:
        eval_ = _read_vqa_rows(cfg.eval_path, cfg)
        description = f"{cfg.source} {path} (eval {cfg.eval_path})"
    else:
        if len(train) <= cfg.num_eval:
            raise ValueError(
                f"{path} has {len(train)} rows; holding out config.data.num_eval={cfg.num_eval} "
                "for evaluation leaves none to train on. Lower num_eval or set "
                "config.data.eval_path.")
        train, eval_ = train[cfg.num_eval:], train[: cfg.num_eval]
        description = f"{cfg.source} {path} (first {cfg.num_eval} rows held out for eval)"
    vqa = [r for r in train + eval_ if r["kind"] == VQA]
    typed = [r for r in vqa if r["qtype_name"]]
    if typed and len(typed) < len(vqa):
        r = next(r for r in vqa if not r["qtype_name"])
        raise ValueError(
            f"{r['file']}:{r['line']}: question without a type {cfg.qtype_key!r} "
            "(config.data.qtype_key), while other rows have one; give every question a type, "
            "or set config.data.qtype_key='' to treat all as 'ALL'.")
    qtypes = tuple(sorted({r["qtype_name"] for r in typed})) if typed else (ALL_TYPES,)
    qtype_id = {t: i for i, t in enumerate(qtypes)}
    for r in train + eval_:
        r["qtype"] = -1 if r["kind"] == CAPTION else qtype_id[r["qtype_name"] or ALL_TYPES]

    for r in (train + eval_)[:1]:  # a pattern that cannot format the ids fails here, not in a reader thread
        image_file_name(cfg.image_pattern, r["path"])

    def image(entry):
        return image_text.read_image(os.path.join(root, image_file_name(cfg.image_pattern, entry["path"])),
                                     f"{entry['file']}:{entry['line']}",
                                     f"config.data.image_root={root!r}")

    return (_ListRecords(train, image, "FileTrainRecords"),
            _ListRecords(eval_, image, "FileEvalRecords"), qtypes, description)


# ---------------------------------------------------------------------------------------------
# Tokenization.
# ---------------------------------------------------------------------------------------------


def _hf_bos_id(tokenizer: tokenizers.HFTokenizer) -> int | None:
    """The BOS id this checkpoint's tokenizer puts first, or None (module docstring)."""
    file = os.path.join(tokenizer.path, "tokenizer_config.json")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            tc = json.load(f)
        if "bos_token" in tc:
            token = tc["bos_token"]
            if isinstance(token, dict):  # AddedToken serialisation
                token = token.get("content")
            if not token or tc.get("add_bos_token") is False:
                return None
            # pylint: disable-next=protected-access
            bos = tokenizer._tok.token_to_id(token)
            if bos is None:
                raise ValueError(f"{file}: bos_token {token!r} is not in tokenizer.json.")
            return int(bos)
    # HFTokenizer falls back to EOS when config.json names no BOS; that is no BOS.
    return None if tokenizer.bos_id == tokenizer.eos_id else int(tokenizer.bos_id)


class _Encoder:
    """(kind, question, answer) -> the text arrays of an example (module docstring)."""

    def __init__(self, tokenizer, bos_id: int | None, eos_id: int, pad_id: int, max_len: int,
                 max_prompt_len: int):
        self._tok, self.bos_id, self.eos_id, self.pad_id = tokenizer, bos_id, eos_id, pad_id
        self.max_len, self.max_prompt_len = max_len, max_prompt_len
        self._bos = [] if bos_id is None else [bos_id]

    def ids(self, record: dict) -> tuple[list[int], list[int]]:
        """([BOS] + prompt ids, target ids + [EOS])."""
        prompt, target = format_example(record["kind"], record["question"], record["answer"])
        return (self._bos + self._tok.encode(prompt).tolist(),
                self._tok.encode(target).tolist() + [self.eos_id])

    def check_lengths(self, records: Sequence[dict], where: Callable[[int], str]) -> None:
        """Raises naming the config field when any record is too long (encoded in batches)."""
        texts = [format_example(r["kind"], r["question"], r["answer"]) for r in records]
        if not texts:
            return
        prompts = self._tok.encode_batch([p for p, _ in texts])
        targets = self._tok.encode_batch([t for _, t in texts])
        p_len = np.asarray([len(self._bos) + len(p) for p in prompts])
        t_len = p_len + np.asarray([len(t) + 1 for t in targets])
        for lengths, limit, field, what in (
                (p_len, self.max_prompt_len, "max_prompt_len", "[BOS] + prompt"),
                (t_len, self.max_len, "max_text_len", "[BOS] + prompt + target + [EOS]")):
            if lengths.max() > limit:
                i = int(lengths.argmax())
                raise ValueError(
                    f"config.data.{field}={limit} is too short: {where(i)} needs "
                    f"{int(lengths[i])} tokens ({what}: {''.join(texts[i])!r}); "
                    f"{int((lengths > limit).sum())} of {len(lengths)} checked examples are "
                    f"longer. Set config.data.{field}={int(lengths.max())} or more.")

    def encode(self, record: dict) -> dict[str, np.ndarray]:
        prompt, target = self.ids(record)
        n_p, n = len(prompt), len(prompt) + len(target)
        for length, limit, field in ((n_p, self.max_prompt_len, "max_prompt_len"),
                                     (n, self.max_len, "max_text_len")):
            if length > limit:
                text = "".join(format_example(record["kind"], record["question"],
                                              record["answer"]))
                raise ValueError(f"config.data.{field}={limit} is too short for an example of "
                                 f"{length} tokens ({text!r}); raise it.")
        input_ids = np.full((self.max_len,), self.pad_id, np.int32)
        input_ids[:n] = prompt + target
        labels = np.full((self.max_len,), IGNORE, np.int32)
        labels[n_p:n] = target  # The target tokens and [EOS]: what the model must produce.
        label_kind = np.full((self.max_len,), -1, np.int32)
        label_kind[n_p:n] = record["kind"]
        for turn in record.get("more", ()):  # later turns (no BOS), while whole turns fit
            p, t = format_example(turn["kind"], turn["question"], turn["answer"])
            p_ids, t_ids = self._tok.encode(p).tolist(), self._tok.encode(t).tolist() + [self.eos_id]
            end = n + len(p_ids) + len(t_ids)
            if end > self.max_len:
                break
            input_ids[n:end] = p_ids + t_ids
            labels[n + len(p_ids):end] = t_ids
            label_kind[n + len(p_ids):end] = turn["kind"]
            n = end
        prompt_ids = np.full((self.max_prompt_len,), self.pad_id, np.int32)
        prompt_ids[self.max_prompt_len - n_p:] = prompt  # Left padding: generation appends at P.
        return {"input_ids": input_ids,
                "attention_mask": (np.arange(self.max_len) < n).astype(np.int32),
                "labels": labels, "label_kind": label_kind, "prompt_ids": prompt_ids,
                "prompt_mask": (np.arange(self.max_prompt_len)
                                >= self.max_prompt_len - n_p).astype(np.int32)}


class _ToExample(grain.transforms.Map):
    """Record -> example dict (module docstring)."""

    def __init__(self, preprocess: Callable[[np.ndarray], np.ndarray], encoder: _Encoder,
                 answer_ids: Mapping[str, int] | None = None):
        self._preprocess, self._encoder, self._answer_ids = preprocess, encoder, answer_ids

    def map(self, record: dict) -> dict[str, np.ndarray]:
        out = {"image": self._preprocess(record["image"]), **self._encoder.encode(record),
               "kind": np.int32(record["kind"]), "qtype": np.int32(record["qtype"]),
               "index": np.int32(record["index"]), "mask": np.int32(1)}
        if self._answer_ids is not None:
            out["answer_id"] = np.int32(-1 if record["kind"] != VQA else
                                        self._answer_ids.get(normalize_answer(record["answer"]), 0))
        return out


# ---------------------------------------------------------------------------------------------
# The pipeline.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VLMData(image_text.RecordPipelines):
    """Captioning + VQA examples of one data config: training stream, eval batches, baseline.

    Attributes:
      config: the data config (frozen copy).
      train_records / eval_records: random-access records ([i] renders/reads the image; `.text(i)`
        gives kind, qtype id, question, answer without it).
      tokenizer: `.encode(text)` -> int32 ids, `.decode(ids)`.
      vocab_size, pad_id, bos_id (None: the tokenizer has no BOS), eos_id.
      qtypes: question-type names; batch `qtype` indexes them.
      eval_examples: row i = eval example i: {'kind' (0/1), 'qtype' (name, None for captions),
        'question', 'answer'}.
      answer_prior: question type -> the most frequent normalised TRAINING answer.
      mean / std: per-channel normalisation of `image`; image_size: S.
      description: where the examples come from, for logs.
      train_vqa: the training questions the answer prior is taken from ({'qtype' (name),
        'question', 'answer'}; the first turn of each record read), for the bias baselines of
        `vlmjax.diagnostics`.
    """

    config: Any
    train_records: Any
    eval_records: Any
    tokenizer: Any
    vocab_size: int
    pad_id: int
    bos_id: int | None
    eos_id: int
    qtypes: tuple[str, ...]
    eval_examples: list[dict]
    answer_prior: dict[str, str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    description: str
    _to_example: _ToExample = dataclasses.field(repr=False, default=None)
    train_vqa: tuple[dict, ...] = dataclasses.field(repr=False, default=())
    answer_vocab: tuple[str, ...] = ()

    def with_answer_vocabulary(self, vocab: Sequence[str]) -> "VLMData":
        """This data with an `answer_id` field in every example (module docstring), for a
        classification head over `vocab` (`answer_vocabulary`: UNK_ANSWER first)."""
        vocab = tuple(vocab)
        if not vocab or vocab[0] != UNK_ANSWER:
            raise ValueError(f"an answer vocabulary starts with {UNK_ANSWER!r} (answer_vocabulary()).")
        ex = self._to_example
        ids = {a: i for i, a in enumerate(vocab) if i}
        # pylint: disable-next=protected-access
        to_example = _ToExample(ex._preprocess, ex._encoder, ids)
        return dataclasses.replace(self, answer_vocab=vocab, _to_example=to_example)

    normalize_answer = staticmethod(normalize_answer)

    _mask_dtype = np.int32  # batch 'mask' is int32 here (the lm/vlm convention)

    def vqa_rows(self, predictions: Mapping[int, str]) -> dict[str, list]:
        """Per VQA eval row given (in row order), the columns 'index', 'qtype' (name),
        'question', 'answer', 'prediction' and 'correct' (exact match after
        `normalize_answer`); caption rows and rows not given are skipped.

        Args:
          predictions: eval row (batch `index`) -> generated answer text.
        """
        cols: dict[str, list] = {k: [] for k in ("index", "qtype", "question", "answer", "prediction",
                                                 "correct")}
        for index in sorted(int(i) for i in predictions):
            ex = self.eval_examples[index]
            if ex["kind"] != VQA:
                continue
            text = predictions[index]
            for k, v in (("index", index), ("qtype", ex["qtype"]), ("question", ex["question"]),
                         ("answer", ex["answer"]), ("prediction", text),
                         ("correct", normalize_answer(text) == normalize_answer(ex["answer"]))):
                cols[k].append(v)
        return cols

    def accuracy(self, predictions: Mapping[int, str]) -> dict[str, float]:
        """Exact match (`normalize_answer`) of predicted answers on the VQA eval rows given.

        Args:
          predictions: eval row (batch `index`) -> generated answer text; caption rows and
            rows not given are skipped.

        Returns:
          {'overall': fraction correct, <qtype>: fraction correct of that type, ...} for the
          types present (overall is NaN when no VQA row is given).
        """
        right: dict[str, list[bool]] = {}
        rows = self.vqa_rows(predictions)
        for qtype, correct in zip(rows["qtype"], rows["correct"]):
            right.setdefault(qtype, []).append(correct)
        scores = [r for rs in right.values() for r in rs]
        out = {"overall": float(np.mean(scores)) if scores else math.nan}
        out.update({t: float(np.mean(right[t])) for t in self.qtypes if t in right})
        return out

    def prior_accuracy(self) -> dict[str, float]:
        """`accuracy` of the answer-prior baseline (each question answered with its type's most
        frequent training answer; a type never seen in training counts as wrong)."""
        return self.accuracy({i: self.answer_prior.get(ex["qtype"], "")
                              for i, ex in enumerate(self.eval_examples) if ex["kind"] == VQA})

    def blank_image(self) -> np.ndarray:
        """float32 [S, S, 3]: a constant mid-grey picture (uint8 128) through the same
        preprocessing as every image (the diagnostics' "blank image")."""
        grey = np.full((self.image_size, self.image_size, 3), 128, np.uint8)
        return self._to_example._preprocess(grey)  # pylint: disable=protected-access


def _tokenizer(cfg, workdir) -> tuple[Any, int | None]:
    if cfg.tokenizer:
        tok = tokenizers.HFTokenizer(cfg.tokenizer)
        return tok, _hf_bos_id(tok)
    # The scene words plus the prompt words ("question", "answer", "caption").
    vocab = sorted(set(scenes.vocabulary(cfg.scenes)) | set(prompt_vocabulary()))
    tok = image_text.scene_tokenizer(vocab, workdir)
    return tok, tok.bos_id


def build_vlm_data(data_cfg, workdir: epath.PathLike | None = None) -> VLMData:
    """Validates the config, reads the sources, builds the tokenizer and the answer prior.

    Args:
      data_cfg: the data section (`default_config()`).
      workdir: with the built-in scene tokenizer, its tokenizer.json is written to
        `<workdir>/scene_tokenizer.json` (None: not written).

    Returns:
      VLMData. jsonl/csv rows are read and checked here (images only when an example is read);
      every checked example fits max_text_len / max_prompt_len (else a ValueError).
    """
    _check_config(data_cfg)
    cfg = ml_collections.FrozenConfigDict(data_cfg)
    tokenizer, bos_id = _tokenizer(cfg, workdir)
    preprocess = image_text.Preprocess(cfg.image_size, image_text.make_processor(cfg))
    if cfg.source == "scenes":
        sc = cfg.scenes
        train = SceneTrainRecords(sc, cfg.image_size, cfg.caption_fraction, cfg.turns)
        eval_ = _scene_eval_records(cfg)
        qtypes = scenes.QA_TYPES
        # A fixed sample of training records (their text only) for the prior and length check.
        checked = range(min(cfg.answer_prior_samples, len(train)))
        description = (f"procedural scenes ({sc.min_objects}-{sc.max_objects} objects, "
                       f"{len(sc.held_out)} held-out pairs, caption_fraction "
                       f"{cfg.caption_fraction})")
    else:
        train, eval_, qtypes, description = _file_records(cfg)
        checked = range(len(train))
    train_texts = [train.text(i) for i in checked]
    eval_texts = [eval_.text(i) for i in range(len(eval_))]
    encoder = _Encoder(tokenizer, bos_id, int(tokenizer.eos_id), int(tokenizer.pad_id),
                       cfg.max_text_len, cfg.max_prompt_len)
    encoder.check_lengths(train_texts, lambda i: train.where(checked[i]))
    encoder.check_lengths(eval_texts, eval_.where)
    answers: dict[str, list[str]] = {}
    for t in train_texts:
        if t["kind"] == VQA:
            answers.setdefault(qtypes[t["qtype"]], []).append(t["answer"])
    prior = {t: most_frequent(answers[t]) for t in qtypes if t in answers}
    eval_examples = [{"kind": t["kind"], "qtype": None if t["kind"] == CAPTION
                      else qtypes[t["qtype"]], "question": t["question"], "answer": t["answer"]}
                     for t in eval_texts]
    num_vqa = sum(e["kind"] == VQA for e in eval_examples)
    logging.info("vlm data: %s; %d eval examples (%d VQA, %d captions), types %s, prior %s",
                 description, len(eval_examples), num_vqa, len(eval_examples) - num_vqa, qtypes,
                 prior)
    return VLMData(
        config=cfg, train_records=train, eval_records=eval_, tokenizer=tokenizer,
        vocab_size=int(tokenizer.vocab_size), pad_id=int(tokenizer.pad_id), bos_id=bos_id,
        eos_id=int(tokenizer.eos_id), qtypes=tuple(qtypes), eval_examples=eval_examples,
        answer_prior=prior, mean=preprocess.mean, std=preprocess.std,
        image_size=cfg.image_size, description=description,
        _to_example=_ToExample(preprocess, encoder),
        train_vqa=tuple({"qtype": qtypes[t["qtype"]], "question": t["question"], "answer": t["answer"]}
                        for t in train_texts if t["kind"] == VQA))


def write_vqa_files(folder: str, rows: Sequence[Mapping[str, Any]], fmt: str = "jsonl", *,
                    name: str = "vqa") -> str:
    """Writes a VQA file + its PNG images (for tests and docs); returns the file's path.

    Args:
      folder: created if missing; images go to `<folder>/images/<name>_<i>.png`.
      rows: dicts with 'image' (uint8 [H, W, 3]), 'question' ('' = a caption row), 'answer',
        and optionally 'question_type'.
      fmt: 'jsonl' or 'csv' (UTF-8; columns image, question, answer[, question_type]).
      name: the file's stem (`<folder>/<name>.<fmt>`).
    """
    if fmt not in ("jsonl", "csv"):
        raise ValueError(f"fmt={fmt!r} is not 'jsonl' or 'csv'.")
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    out = []
    for i, row in enumerate(rows):
        rel = f"images/{name}_{i}.png"
        Image.fromarray(np.asarray(row["image"], np.uint8)).save(os.path.join(folder, rel))
        out.append({"image": rel, "question": row.get("question", ""), "answer": row["answer"],
                    **({"question_type": row["question_type"]} if "question_type" in row
                       else {})})
    file = os.path.join(folder, f"{name}.{fmt}")
    with open(file, "w", encoding="utf-8", newline="") as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in out)
        else:
            fields = ["image", "question", "answer"]
            if any("question_type" in r for r in out):
                fields.append("question_type")
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(out)
    return file
