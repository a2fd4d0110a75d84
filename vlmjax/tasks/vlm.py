"""Vision-language decoding (``task='vlm'``): captioning and VQA with a visual prefix in a decoder.

Experiment: ``configs/trm_vlm_qa.py`` (docs/vlm.md). The model is ``vlmjax.models.vlm``'s
``VisionLanguageModel``: vision tower -> connector (Perceiver resampler | MLP projector | attention
pool) -> prefix embeddings -> decoder (a Llama/Qwen ``Decoder``, optionally LoRA on a frozen 4-bit
NF4 base, with the recursive refinement loop; or the tiny recursive ``TRMDecoder``).

Config sections this task reads (besides the trainer block):

  data            ``vlmjax.data.vlm_data.default_config()``: procedural scenes (captions + typed VQA),
                  or a JSONL / CSV + image folder (PixMo-style image, question, answer)
  vision_encoder  init_from (HF CLIP / SigLIP / DINOv2 dir), freeze (regexes inside the tower; ('',)
                  = all of it), tower (``vit.ViTConfig`` fields; ignored with init_from)
  connector       type ('perceiver' | 'mlp' | 'attention_pool') and the other ``vlm.VLMConfig`` fields
  decoder         type ('qwen': the Llama/Qwen2/Qwen3 ``Decoder`` | 'trm'), init_from (an HF
                  checkpoint dir; '' = the experiment's 'decoder' stage if it has one, else random),
                  every ``DecoderConfig`` field (the architecture when training from scratch;
                  load_in_4bit / quant_* / lora_* / dtype / remat / attention_impl / scan_layers
                  always), use_lora (freeze the base, train the lora_* adapters), freeze (more
                  regexes inside the decoder), use_trm_recursion + refine (the refinement loop),
                  trm (the TRM decoder's recursion)
  generation      max_new_tokens, temperature, top_p: the answers generated in evaluation
  text_only       train / evaluate the decoder alone on the examples' text, without images (the
                  decoder's language-model stage of an experiment; its VQA accuracy is the
                  question-only baseline)

Loss: next-token cross-entropy on the target tokens (answer or caption + EOS; the prompt and the
prefix are ``IGNORE``), averaged over tokens; with TRM deep supervision, averaged over cycles too.
Evaluation: teacher-forced caption / VQA loss and perplexity, and VQA answers generated greedily
from the left-padded prompt with the image prefilled in the KV cache, exact match overall and per
question type beside the answer-prior baseline (the most frequent training answer per type).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from etils import epath

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vlmjax import convert
from vlmjax import diagnostics
from vlmjax import tree as tree_lib
from vlmjax.data import vlm_data
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import lora as lora_lib
from vlmjax.models import trm as trm_lib
from vlmjax.models import vit as vit_lib
from vlmjax.models import vlm as vlm_lib
from vlmjax.tasks.base import DataTask, fit_saved, is_hf_dir
from vlmjax.train import checkpoint as checkpoint_lib

DECODER_TYPES = ("qwen", "trm")
# Decoder fields that say how to run / adapt a checkpoint, not its architecture: they apply on top
# of a pretrained config.json (as the lm task's _TRAINING_FIELDS, plus the 4-bit base).
_RUN_FIELDS = ("dtype", "remat", "attention_impl", "scan_layers", "lora_rank", "lora_alpha", "lora_dropout",
               "lora_targets", "load_in_4bit", "quant_block_size", "quant_double", "quant_embeddings")
# Keys of config.decoder that are not DecoderConfig fields.
_VLM_DECODER_KEYS = ("type", "init_from", "use_lora", "freeze", "use_trm_recursion", "refine", "trm")
STAGE = "decoder"  # the optional config.stages entry that pretrains the decoder on the text alone
# The optional config.stages entry that pretrains the vision side: scene parsing (task 'scene_parse',
# configs/scene_parse.py: vision_tower / vision_token_norm) or contrastive alignment (task 'alignment',
# configs/perceiver_mrl_alignment.py: also vision_resampler); same param names, so the VLM starts those
# subtrees from its checkpoint.
VISION_STAGE = "vision"
VISION_SUBTREES = ("vision_tower", "vision_token_norm", "vision_resampler", "vision_pool")


def generation_config() -> ml_collections.ConfigDict:
    """``config.generation``: how evaluation generates answers (greedy by default: exact match)."""
    return ml_collections.ConfigDict(dict(max_new_tokens=6, temperature=0.0, top_p=1.0))


def decoder_section() -> ml_collections.ConfigDict:
    """``config.decoder``: every ``DecoderConfig`` field plus the VLM switches (module docstring)."""
    c = decoder_lib.default_config()
    c.type = "qwen"
    c.use_lora = False
    c.freeze = ()
    c.use_trm_recursion = False
    c.refine = trm_lib.refiner_default_config()
    c.trm = trm_lib.default_config()
    return c


class VLMTask(DataTask):
    units = "examples"

    @classmethod
    def needed_stages(cls, config) -> tuple[str, ...]:
        # The stages stand in for decoder.init_from / vision_encoder.init_from: with a checkpoint
        # the stage is not trained.
        # A text-only run has no vision side to start.
        skip = {STAGE: bool(config.decoder.init_from),
                VISION_STAGE: bool(config.vision_encoder.init_from) or bool(config.get("text_only"))}
        return tuple(n for n in super().needed_stages(config) if not skip.get(n, False))

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        dc = config.decoder
        if dc.type not in DECODER_TYPES:
            raise ValueError(f"config.decoder.type={dc.type!r}; use one of {DECODER_TYPES}.")
        self.text_only = bool(config.text_only)
        self.decoder_source = dc.init_from or self.stage_dirs.get(STAGE, "")
        self.data = self._build_data(config, workdir)
        self.decoder_config = self._decoder_config(config)
        self.vision_config = self._vision_config(config)
        m = config.model
        fields = {k: v for k, v in config.connector.items() if k != "type"}
        self.vlm_config = vlm_lib.VLMConfig(connector=config.connector.type, attention_impl=m.attention_impl,
                                            dtype=m.dtype, **fields)
        self.vlm_config.validate()
        self.model = vlm_lib.VisionLanguageModel(self.vision_config, self.vlm_config, self.build_decoder())
        self.state_collections = ("quant",) if getattr(self.decoder_config, "load_in_4bit", False) else ()
        self.gen = config.generation
        if int(self.gen.max_new_tokens) < 1:
            raise ValueError(f"config.generation.max_new_tokens={self.gen.max_new_tokens} must be >= 1.")
        self._quantized = None  # the pretrained decoder's NF4 weights, until pretrained_model_state

    # ---- building ----------------------------------------------------------------------------
    @staticmethod
    def _build_data(config, workdir) -> vlm_data.VLMData:
        """The data of ``config.data``; a pretrained decoder (``decoder.init_from``, checked to be an HF
        directory) brings its tokenizer and a pretrained tower its image processor unless the data
        section names its own."""
        dc, ve, data_cfg = config.decoder, config.vision_encoder, config.data
        if dc.init_from and not is_hf_dir(dc.init_from):
            raise FileNotFoundError(f"config.decoder.init_from={dc.init_from!r} is not a Hugging Face checkpoint "
                                    "directory (config.json + *.safetensors); point it at one (e.g. the SmolLM2 "
                                    "directory `python -m vlmjax.convert.gguf` writes) or set it to ''.")
        updates = {}
        if dc.init_from and not data_cfg.tokenizer:
            updates["tokenizer"] = dc.init_from  # a pretrained decoder needs its own token ids
        if ve.init_from and not data_cfg.processor:
            updates["processor"] = ve.init_from
        if updates:
            data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
            data_cfg.update(updates)
        return vlm_data.build_vlm_data(data_cfg, workdir)

    def _decoder_config(self, config) -> decoder_lib.DecoderConfig:
        dc = config.decoder
        fields = {k: v for k, v in dc.items() if k not in _VLM_DECODER_KEYS}
        if dc.use_lora and int(fields["lora_rank"]) == 0:
            raise ValueError("config.decoder.use_lora=True needs config.decoder.lora_rank > 0 (e.g. 16, with "
                             "lora_alpha=32).")
        if dc.init_from:
            spec = convert.build(dc.init_from, dtype=fields["dtype"])
            cfg = dataclasses.replace(spec.module.config, **{k: fields[k] for k in _RUN_FIELDS if k in fields})
            if cfg.vocab_size < self.data.vocab_size:
                raise ValueError(f"config.decoder.init_from={dc.init_from!r} has vocab_size {cfg.vocab_size} < the "
                                 f"data tokenizer's {self.data.vocab_size}; set config.data.tokenizer to that "
                                 "checkpoint's directory (or leave it '').")
            cfg.validate()
            return cfg
        if self.stage_dirs.get(STAGE):
            # The stage's decoder architecture, with this run's LoRA / 4-bit / dtype settings.
            saved = json_config(self.stage_dirs[STAGE])
            arch = {k: v for k, v in saved["decoder"].items() if k not in _VLM_DECODER_KEYS and k not in _RUN_FIELDS}
            fields.update(arch)
        return decoder_lib.DecoderConfig.from_config(ml_collections.ConfigDict(fields),
                                                     vocab_size=self.data.vocab_size)

    def build_decoder(self):
        """The decoder module (``decoder/`` subtree): the TRM decoder (``decoder.type='trm'``), or a
        ``Decoder``, with the recursive refinement loop before its LM head when ``use_trm_recursion``."""
        dc = self.config.decoder
        if dc.type == "trm":
            if dc.use_trm_recursion:
                raise ValueError("config.decoder.use_trm_recursion refines a pretrained Llama/Qwen decoder's "
                                 "hidden states; the TRM decoder (decoder.type='trm') is recursive already: set one.")
            self.trm_config = trm_lib.TRMConfig(decoder=self.decoder_config, **dict(dc.trm.items()))
            self.trm_config.validate()
            return trm_lib.TRMDecoder(self.trm_config)
        if dc.use_trm_recursion:
            return trm_lib.RefinedDecoder(self.decoder_config, refiner=trm_lib.RefinerConfig.from_config(dc.refine))
        return decoder_lib.Decoder(self.decoder_config)

    def _vision_config(self, config) -> vit_lib.ViTConfig:
        ve, m = config.vision_encoder, config.model
        if ve.init_from:
            self.vision_spec = convert.vision_tower(ve.init_from, dtype=m.dtype)
            vcfg = dataclasses.replace(self.vision_spec.module.config, attention_impl=m.attention_impl,
                                       remat=ve.tower.remat, scan_layers=ve.tower.scan_layers)
        else:
            vcfg = vit_lib.ViTConfig(**dict(ve.tower.items()), attention_impl=m.attention_impl, dtype=m.dtype)
            if vcfg.image_size != int(config.data.image_size):
                raise ValueError(f"config.vision_encoder.tower.image_size={vcfg.image_size} differs from "
                                 f"config.data.image_size={config.data.image_size}; set both to the same size.")
        vcfg.validate()
        return vcfg

    # ---- model -------------------------------------------------------------------------------
    def init_variables(self, rng):
        s, length = self.data.image_size, int(self.config.data.max_text_len)
        image = None if self.text_only else jnp.zeros((1, s, s, 3), jnp.float32)
        ids = jnp.zeros((1, length), jnp.int32)
        return self.model.init(rng, image, ids, jnp.ones((1, length), jnp.int32), method="forward")

    def pretrained_params(self, abstract_params, shardings):
        out = {}
        ve = self.config.vision_encoder
        if ve.init_from:
            sh = None if shardings is None else shardings["vision_tower"]
            out["vision_tower"] = convert.load_params(ve.init_from, self.vision_spec, abstract_params["vision_tower"],
                                                      shardings=sh)
        elif self.stage_dirs.get(VISION_STAGE) and not self.text_only:
            out.update(self._load_vision_stage(abstract_params, shardings))
        if self.decoder_source:
            fp = self._load_decoder()
            sh = None if shardings is None else shardings["decoder"]
            if getattr(self.decoder_config, "load_in_4bit", False):
                from vlmjax.models import quant as quant_lib  # pylint: disable=g-import-not-at-top
                abstract = nn.meta.unbox(jax.eval_shape(lambda: self.model.init(
                    jax.random.key(0), None, jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32),
                    method="forward")))
                fp, self._quantized = quant_lib.quantize_params(
                    fp, {"quant": abstract["quant"]["decoder"]}, self.decoder_config.quant,
                    shardings=None if sh is None else {"params": sh})
            elif sh is not None:
                fp = jax.tree.map(lambda x, s: jax.device_put(x, s), fp, _subset(sh, fp))
            out["decoder"] = fp
        return out or None

    def _load_vision_stage(self, abstract_params, shardings):
        """The vision subtrees (``VISION_SUBTREES`` the model has) from the vision stage's checkpoint
        (a scene_parse or alignment run); shapes must match: the stage's tower and connector are this run's."""
        source = self.stage_dirs[VISION_STAGE]
        saved, _ = checkpoint_lib.load_params(source)
        out = {}
        for name in VISION_SUBTREES:
            if name not in abstract_params or name not in saved:
                continue
            out[name] = fit_saved(
                saved[name], abstract_params[name], None if shardings is None else shardings[name],
                where=f"the vision stage in {source} ({name})",
                hint=f"give config.stages.{VISION_STAGE} the same vision_encoder.tower and Perceiver (num_latents, "
                     "layers, heads) as config.vision_encoder / config.connector, or delete that stage's workdir.")
        if "vision_tower" not in out:
            raise ValueError(f"the vision stage in {source} has no vision_tower params: config.stages.{VISION_STAGE} "
                             "must be a scene_parse or alignment run.")
        return out

    def _load_decoder(self):
        """The fp decoder params (no LoRA) from the HF checkpoint or the decoder stage's workdir."""
        cfg = dataclasses.replace(self.decoder_config, lora_rank=0, **({"load_in_4bit": False} if hasattr(self.decoder_config, "load_in_4bit") else {}))
        abstract = nn.meta.unbox(jax.eval_shape(lambda: decoder_lib.Decoder(cfg).init(
            jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))["params"])
        if is_hf_dir(self.decoder_source):
            return convert.load_params(self.decoder_source, convert.build(self.decoder_source), abstract)
        params, _ = checkpoint_lib.load_params(self.decoder_source, "decoder")
        params = {k: v for k, v in tree_lib.flatten(params).items() if not re.search(lora_lib.LORA_REGEX, k)}
        want = tree_lib.flatten(abstract)
        missing = sorted(set(want) - set(params))
        if missing:
            raise ValueError(f"the decoder stage in {self.decoder_source} lacks {missing[:3]}; it was trained with "
                             "another decoder architecture: delete that stage's workdir to retrain it.")
        return tree_lib.unflatten({k: jnp.asarray(params[k], want[k].dtype) for k in want})

    def pretrained_model_state(self, abstract_model_state, shardings):
        if self._quantized is None:
            return None
        quant, self._quantized = self._quantized, None
        sh = None if shardings is None else shardings["quant"]["decoder"]
        if sh is not None:
            quant = jax.tree.map(lambda x, s: jax.device_put(x, s), quant, _subset(sh, quant))
        return {"quant": {"decoder": quant}}

    def frozen_decoder_regex(self) -> str | None:
        """The regex of decoder params the adapter recipe freezes: with LoRA or a 4-bit base every
        decoder param except the adapters (and ``trm_refiner/``, the refinement loop, which trains
        from zero); None = the decoder trains."""
        if self.config.decoder.use_lora or getattr(self.decoder_config, "load_in_4bit", False):
            return r"^decoder/(?!trm_refiner/)(?!.*(^|/)lora_[ab]$)"
        return None

    def optimizer_config(self, optim_cfg):
        """Freezes the vision tower's ``vision_encoder.freeze`` regexes, ``frozen_decoder_regex`` and the
        ``decoder.freeze`` regexes (regexes inside the subtree; a leading ^ anchors at its root)."""
        frozen = list(optim_cfg.frozen)
        vision_freeze = () if self.text_only else self.config.vision_encoder.freeze  # text only: no tower
        for subtree, patterns in (("vision_tower", vision_freeze),
                                  ("decoder", self.config.decoder.freeze)):
            for pattern in patterns:
                inner = f"(?:{pattern[1:]})" if pattern.startswith("^") else f".*(?:{pattern})"
                frozen.append(f"^{subtree}/{inner}")
        if (decoder_regex := self.frozen_decoder_regex()) is not None:
            frozen.append(decoder_regex)
        cfg = ml_collections.ConfigDict(optim_cfg.to_dict())
        cfg.frozen = tuple(frozen)
        return cfg

    # ---- loss --------------------------------------------------------------------------------
    def _forward(self, params, model_state, batch, rng=None):
        deterministic = rng is None
        image = None if self.text_only else batch["image"]

        def run(module):
            out = module.forward(image, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                 deterministic=deterministic)
            cycles = out["aux"].get("trm/cycle_hidden")
            if cycles is not None:  # TRM deep supervision: the LM loss after every cycle
                out["cycle_logits"] = module.decoder.cycle_logits(cycles[:, :, out["prefix_len"]:])
            return out

        rngs = {} if deterministic else {"dropout": rng}
        return self.model.apply({"params": params, **model_state}, method=run, rngs=rngs)

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        out = self._forward(params, model_state, batch, rng)
        labels = batch["labels"]
        if "cycle_logits" in out:
            nll = sum(vlm_lib.token_nll(logits, labels)[0] for logits in out["cycle_logits"]) / len(out["cycle_logits"])
        else:
            nll = vlm_lib.token_nll(out["logits"], labels)[0]
        valid = (labels[:, 1:] != vlm_lib.IGNORE).astype(jnp.float32)
        loss = jnp.sum(nll) / jnp.maximum(jnp.sum(valid), 1.0)
        metrics = {"loss": loss}
        # Per kind, token by token: a multi-turn example (data.turns > 1) holds both kinds.
        for name, kind in (("caption_loss", vlm_data.CAPTION), ("vqa_loss", vlm_data.VQA)):
            w = (batch["label_kind"][:, 1:] == kind).astype(jnp.float32)
            metrics[name] = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
        return loss, {"metrics": metrics, "model_state": model_state}

    # ---- evaluation --------------------------------------------------------------------------
    def eval_fn(self, params, model_state, batch):
        out = self._forward(params, model_state, batch)
        nll, count = vlm_lib.next_token_nll(out["logits"], batch["labels"])
        real = batch["mask"].astype(jnp.float32)
        sums = {}
        for name, kind in (("caption", vlm_data.CAPTION), ("vqa", vlm_data.VQA)):
            w = real * (batch["kind"] == kind)
            sums[f"{name}_nll"] = jnp.sum(nll * w)
            sums[f"{name}_tokens"] = jnp.sum(count * w)
        tokens = generate_lib.generate(
            self.model, params, batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
            images=None if self.text_only else batch["image"], model_state=model_state,
            max_new_tokens=int(self.gen.max_new_tokens), rng=jax.random.key(0),
            temperature=float(self.gen.temperature), top_p=float(self.gen.top_p), eos_id=self.data.eos_id)
        p = batch["prompt_ids"].shape[1]
        return sums | {"generated": tokens[:, p:], "index": batch["index"], "mask": batch["mask"]}

    def decode_answer(self, ids) -> str:
        """Generated ids [A] -> text, up to the first EOS."""
        ids = [int(t) for t in ids]
        if self.data.eos_id in ids:
            ids = ids[:ids.index(self.data.eos_id)]
        return self.data.tokenizer.decode(ids)

    def finalize_eval(self, outputs):
        metrics: dict[str, float] = {}
        for name in ("caption", "vqa"):
            tokens = outputs[f"{name}_tokens"]
            if tokens > 0:
                loss = outputs[f"{name}_nll"] / tokens
                metrics[f"{name}_loss"] = loss
                metrics[f"{name}_perplexity"] = math.exp(min(loss, 50.0))
        metrics.update(self._accuracy_metrics(outputs))
        return metrics

    def _accuracy_metrics(self, outputs) -> dict[str, float]:
        """VQA exact match overall and per question type beside the answer prior, of the combined
        eval outputs' predictions (``_predictions``); prints the report."""
        predictions = self._predictions(outputs)
        acc = self.data.accuracy(predictions)
        prior = self.data.prior_accuracy()
        metrics = {"vqa_accuracy": acc["overall"], "prior_accuracy": prior["overall"]}
        for t in self.data.qtypes:
            if t in acc:
                metrics[f"vqa_accuracy/{t}"] = acc[t]
            if t in prior:
                metrics[f"prior_accuracy/{t}"] = prior[t]
        self._report(acc, prior, predictions)
        return metrics

    def _predictions(self, outputs) -> dict[int, str]:
        """Eval row -> generated answer text, of the real rows of the combined eval outputs."""
        keep = outputs["mask"] > 0
        return {int(i): self.decode_answer(g) for i, g in zip(outputs["index"][keep], outputs["generated"][keep])}

    # ---- diagnostics -------------------------------------------------------------------------
    def vqa_probe(self) -> diagnostics.VQAProbe:
        """The eval's generated answers scored by ``VLMData.vqa_rows`` (the exact match of
        ``finalize_eval``); blank = mid-grey through the data's preprocessing; bias baselines from
        the answer prior's training sample; features: the vision tower's mean token; the
        question-only baseline: the text-only 'decoder' stage's final eval, when there is one."""
        notes = []
        if self.text_only:
            notes.append("text-only run (config.text_only=True): the model never sees an image, so every "
                         "drop is 0 by construction")
        question_only = None if self.text_only else self._question_only()
        if question_only is not None and not question_only["same_data"]:
            notes.append(f"the question-only baseline ({question_only['source']}) was evaluated with another "
                         "config.data than this run")
        return diagnostics.VQAProbe(
            rows=lambda outputs: self.data.vqa_rows(self._predictions(outputs)),
            train_examples=self.data.train_vqa, blank_image=self.data.blank_image(), qtypes=self.data.qtypes,
            normalize=vlm_data.normalize_answer, image_key="image", mask_key="mask",
            image_features=None if self.text_only else self._image_features,
            question_only=question_only, notes=tuple(notes))

    def _image_features(self, params, model_state, batch):
        """Pooled image features [B, Dv]: the vision tower's last hidden states averaged over tokens."""
        def pooled(module, image):
            out, _ = module.vision_tower(image, deterministic=True)
            return jnp.mean(out["last_hidden_state"].astype(jnp.float32), axis=1)

        return self.model.apply({"params": params, **model_state}, batch["image"], method=pooled)

    def _question_only(self) -> dict | None:
        """The text-only 'decoder' stage's final VQA accuracy by type, {'source', 'overall', <qtype>...}
        (None without that stage or its summary.json); 'same_data': whether it had this run's data."""
        source = self.stage_dirs.get(STAGE)
        summary = epath.Path(source) / "summary.json" if source else None
        if summary is None or not summary.exists():
            return None
        end = json.loads(summary.read_text()).get("eval_end", {})
        saved = json_config(source)
        if not saved.get("text_only") or "vqa_accuracy" not in end:
            return None
        out = {"source": str(source), "overall": end["vqa_accuracy"]}
        out.update({t: end[f"vqa_accuracy/{t}"] for t in self.data.qtypes if f"vqa_accuracy/{t}" in end})
        out["same_data"] = saved.get("data") == json.loads(self.config.data.to_json_best_effort())
        return out

    def _report(self, acc, prior, predictions):
        if jax.process_index() != 0:
            return
        counts: dict[str, int] = {}
        for i in predictions:
            ex = self.data.eval_examples[i]
            if ex["kind"] == vlm_data.VQA:
                counts[ex["qtype"]] = counts.get(ex["qtype"], 0) + 1
        mode = " (text only: no image)" if self.text_only else ""
        print(f"VQA exact match on {sum(counts.values())} held-out questions{mode}:", flush=True)
        print(f"  {'type':10s} {'n':>5s} {'model':>7s} {'prior':>7s}", flush=True)
        for t in self.data.qtypes:
            if t in counts:
                print(f"  {t:10s} {counts[t]:5d} {acc.get(t, math.nan):7.3f} {prior.get(t, math.nan):7.3f}", flush=True)
        print(f"  {'overall':10s} {sum(counts.values()):5d} {acc['overall']:7.3f} {prior['overall']:7.3f}", flush=True)
        shown = 0
        for i, text in sorted(predictions.items()):
            ex = self.data.eval_examples[i]
            if ex["kind"] == vlm_data.VQA and shown < 4:
                print(f"  e.g. {ex['question']!r} -> {text.strip()!r} (answer {ex['answer']!r})", flush=True)
                shown += 1

    def log_summary(self, metrics):
        return " ".join(f"{k} {metrics[k]:.3f}" for k in ("caption_loss", "vqa_loss") if k in metrics)


def json_config(workdir: str) -> dict:
    """The config.json a vlmjax run wrote in ``workdir`` (any epath: local or gs://)."""
    path = epath.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{workdir} has no config.json: the decoder stage did not run there.")
    return json.loads(path.read_text())


def _subset(shardings, values):
    """The shardings of the leaves ``values`` has (a partial tree of the same structure)."""
    flat = tree_lib.flatten(shardings)
    return tree_lib.unflatten({k: flat[k] for k in tree_lib.flatten(values)})
