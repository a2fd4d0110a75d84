"""Flamingo-style fusion VQA (``task='fusion_vqa'``): gated cross-attention from the question to the image.

Experiment: ``configs/fusion_vqa.py``. The model is ``vlmjax.models.fusion.FusionVQAModel``: vision
tower -> projection to the decoder width -> vision gate -> a decoder over the question with
``num_fusion_layers`` gated cross-attention blocks interleaved before its layers -> answer head.
The task is the ``vlm`` task's sibling and reuses its pieces (``VLMTask``: the vision tower config and
HF towers, the decoder config and HF decoders, the data pipeline ``vlm_data``, answer-prior baseline,
report and diagnostics probe); it differs in the model, the heads and what is frozen.

Config sections this task reads (besides the trainer block):

  data            ``vlmjax.data.vlm_data.default_config()``: procedural scenes (typed VQA; set
                  caption_fraction=0 and turns=1: questions only), or a jsonl / csv file + image
                  folder (ViVQA: ``question_key``, ``answer_key``, ``image_key='img_id'``,
                  ``qtype_key='type'``, ``image_pattern='{}.jpg'``), text through ``tokenizer`` (a
                  local HF directory; default: ``decoder.init_from``'s)
  vision_encoder  init_from (an HF CLIP / SigLIP / DINOv2 directory, ``vlmjax.convert``), freeze
                  (regexes inside the tower; ('',) = all of it), tower (``vit.ViTConfig`` fields when
                  training from scratch)
  decoder         ``vlm.decoder_section()``: init_from (an HF Llama / Qwen checkpoint dir, loaded into
                  the ``FusionDecoder`` by name and frozen: only the fusion blocks, the vision gate and
                  the answer head train) or the ``DecoderConfig`` of a small question encoder trained
                  from scratch; freeze (more regexes inside the decoder); remat / dtype / attention_impl.
                  type must be 'qwen'; LoRA, 4-bit bases and the TRM options are the vlm task's.
  fusion          ``fusion.default_config()``: num_fusion_layers, use_vision_gate, vision_gate_init,
                  head ('classify' | 'generate'), num_answers (classify: the N most frequent training
                  answers form the vocabulary, plus an <unk> for the rest that is never correct; 0 =
                  every training answer), answer_pool, projector_layers, xattn_*, dropout
  model           attention_impl, dtype (vision tower, blocks and head)
  generation      max_new_tokens, temperature, top_p (head='generate': the answers of evaluation)
  text_only       no image at all (every cross-attention update is 0): a question-only baseline

Heads. 'classify': the question (``[BOS] question: <q> answer:``, the batch's left-padded
``prompt_ids``) -> pooled hidden state -> logits over the answer vocabulary; cross-entropy on the
answer's id (``vlm_data.VLMData.with_answer_vocabulary``); the prediction is the argmax's answer text
(<unk> predicts nothing). 'generate': ``[BOS] prompt answer [EOS]`` through the decoder, next-token
loss on the answer tokens and EOS only, answers generated greedily (``fusion.generate_with_visual``).
Either way evaluation is exact match after ``vlm_data.normalize_answer``, overall and per question
type, beside the answer-prior baseline (the vlm task's ``VLMData.accuracy`` / ``prior_accuracy``).

Gates. Train and eval metrics carry ``gate/xattn_{j}/attn`` and ``gate/xattn_{j}/ffn`` (tanh(alpha) of
block j), their means over blocks ``gate/attn_mean`` / ``gate/ffn_mean``, and ``gate/vision``
(sigmoid of the vision gate's logit), so the metrics log holds their trajectory over training.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from vlmjax.data import vlm_data
from vlmjax.models import fusion as fusion_lib
from vlmjax.models import vlm as vlm_lib
from vlmjax.tasks import vlm
from vlmjax.tasks.base import Task

# Inside decoder/: what trains on a frozen pretrained decoder (the gated blocks and the vision gate).
FUSION_PARAMS = r"xattn_\d+/|vision_gate_logit$"


def gate_metrics(aux) -> dict[str, jax.Array]:
    """The gates of ``FusionVQAModel.forward``'s aux as metrics (module docstring)."""
    out = {}
    for key in sorted(aux):
        m = re.fullmatch(r"xattn_(\d+)/(attn|ffn)_gate", key)
        if m:
            out[f"gate/xattn_{m.group(1)}/{m.group(2)}"] = jnp.asarray(aux[key], jnp.float32)
    for kind in ("attn", "ffn"):
        values = [v for k, v in out.items() if k.endswith(f"/{kind}")]
        if values:
            out[f"gate/{kind}_mean"] = jnp.mean(jnp.stack(values))
    if "vision_gate" in aux:
        out["gate/vision"] = jnp.asarray(aux["vision_gate"], jnp.float32)
    return out


class FusionVQATask(vlm.VLMTask):
    """``task='fusion_vqa'`` (module docstring)."""

    units = "examples"

    def __init__(self, config, workdir, stage_dirs=None):  # pylint: disable=super-init-not-called
        Task.__init__(self, config, workdir, stage_dirs)
        dc = config.decoder
        if dc.type != "qwen":
            raise ValueError(f"config.decoder.type={dc.type!r}: the fusion decoder is a Llama/Qwen-style "
                             "'qwen' decoder (the TRM decoder is task 'vlm's).")
        for field in ("use_lora", "use_trm_recursion", "load_in_4bit"):
            if dc[field]:
                raise ValueError(f"config.decoder.{field}=True is not supported by task 'fusion_vqa' (a pretrained "
                                 "decoder is frozen in full precision; only the fusion blocks train): set it False.")
        self.text_only = bool(config.text_only)
        self.decoder_source = dc.init_from
        fc = config.fusion
        if fc.head not in fusion_lib.HEADS:
            raise ValueError(f"config.fusion.head={fc.head!r}; use one of {fusion_lib.HEADS}.")
        if not isinstance(fc.num_answers, int) or isinstance(fc.num_answers, bool) or fc.num_answers < 0:
            raise ValueError(f"config.fusion.num_answers={fc.num_answers!r} must be an integer >= 0 (the N most "
                             "frequent training answers; 0 = all of them).")
        data_cfg = config.data
        if data_cfg.turns != 1:
            raise ValueError(f"config.data.turns={data_cfg.turns}: task 'fusion_vqa' answers one question per "
                             "example; set config.data.turns=1.")
        if data_cfg.source == "scenes" and data_cfg.caption_fraction:
            raise ValueError(f"config.data.caption_fraction={data_cfg.caption_fraction}: task 'fusion_vqa' trains "
                             "on questions only; set config.data.caption_fraction=0.")
        data = self._build_data(config, workdir)
        self.head = fc.head
        if self.head == "classify":
            data = data.with_answer_vocabulary(
                vlm_data.answer_vocabulary([e["answer"] for e in data.train_vqa], fc.num_answers))
        self.data = data
        self.decoder_config = self._decoder_config(config)
        self.vision_config = self._vision_config(config)
        fields = dict(fc.items())
        fields.update(attention_impl=config.model.attention_impl, dtype=config.model.dtype)
        if self.head == "classify":
            fields["num_answers"] = len(data.answer_vocab)
        self.fusion_config = fusion_lib.FusionConfig.from_config(fields)
        self.fusion_config.validate(self.decoder_config)
        self.model = fusion_lib.FusionVQAModel(self.vision_config, self.fusion_config, self.decoder_config)
        self.state_collections = ()
        self.gen = config.generation
        if int(self.gen.max_new_tokens) < 1:
            raise ValueError(f"config.generation.max_new_tokens={self.gen.max_new_tokens} must be >= 1.")
        self._quantized = None

    # ---- model -------------------------------------------------------------------------------
    def _text(self, batch):
        """(ids, mask): the question prompt (classify) or prompt + answer (generate)."""
        if self.head == "classify":
            return batch["prompt_ids"], batch["prompt_mask"]
        return batch["input_ids"], batch["attention_mask"]

    def init_variables(self, rng):
        s = self.data.image_size
        length = int(self.config.data.max_prompt_len if self.head == "classify" else self.config.data.max_text_len)
        image = None if self.text_only else jnp.zeros((1, s, s, 3), jnp.float32)
        return self.model.init(rng, image, jnp.zeros((1, length), jnp.int32), jnp.ones((1, length), jnp.int32),
                               method="forward")

    def frozen_decoder_regex(self) -> str | None:
        """A pretrained decoder is frozen except the fusion blocks and the vision gate
        (``FUSION_PARAMS``); a question encoder from scratch trains."""
        return f"^decoder/(?!(?:{FUSION_PARAMS}))" if self.decoder_source else None

    def _forward(self, params, model_state, batch, rng=None):
        deterministic = rng is None
        image = None if self.text_only else batch["image"]
        ids, mask = self._text(batch)
        rngs = {} if deterministic else {"dropout": rng}
        return self.model.apply({"params": params, **model_state}, image, ids, mask, deterministic=deterministic,
                                method="forward", rngs=rngs)

    # ---- loss --------------------------------------------------------------------------------
    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        out = self._forward(params, model_state, batch, rng)
        if self.head == "classify":
            answers = batch["answer_id"]
            nll, correct = fusion_lib.answer_nll(out["answer_logits"], answers)
            valid = (answers >= 0).astype(jnp.float32)
            n = jnp.maximum(jnp.sum(valid), 1.0)
            loss = jnp.sum(nll) / n
            # <unk> (id 0) is never a correct answer.
            metrics = {"loss": loss, "accuracy": jnp.sum(correct & (answers > 0)) / n}
        else:
            nll, valid = vlm_lib.token_nll(out["logits"], batch["labels"])
            loss = jnp.sum(nll) / jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
            metrics = {"loss": loss}
        metrics.update(gate_metrics(out["aux"]))
        return loss, {"metrics": metrics, "model_state": model_state}

    # ---- evaluation --------------------------------------------------------------------------
    def eval_fn(self, params, model_state, batch):
        out = self._forward(params, model_state, batch)
        real = batch["mask"].astype(jnp.float32) * (batch["kind"] == vlm_data.VQA)
        sums = {f"{k}_sum": v for k, v in gate_metrics(out["aux"]).items()}
        sums["gate_batches"] = jnp.float32(1.0)
        keep = {"index": batch["index"], "mask": batch["mask"]}
        if self.head == "classify":
            nll, _ = fusion_lib.answer_nll(out["answer_logits"], jnp.where(real > 0, batch["answer_id"], -1))
            sums.update(vqa_nll=jnp.sum(nll), vqa_count=jnp.sum(real))
            return sums | keep | {"answer_pred": jnp.argmax(out["answer_logits"], axis=-1).astype(jnp.int32)}
        nll, count = vlm_lib.next_token_nll(out["logits"], batch["labels"])
        sums.update(vqa_nll=jnp.sum(nll * real), vqa_count=jnp.sum(count * real))
        tokens = fusion_lib.generate_with_visual(
            self.model, params, batch["prompt_ids"], prompt_mask=batch["prompt_mask"],
            **({"visual": jnp.zeros((batch["prompt_ids"].shape[0], 1, self.decoder_config.hidden_size)),
                "visual_mask": jnp.zeros((batch["prompt_ids"].shape[0], 1), jnp.bool_)}
               if self.text_only else {"images": batch["image"]}),
            model_state=model_state, max_new_tokens=int(self.gen.max_new_tokens), rng=jax.random.key(0),
            temperature=float(self.gen.temperature), top_p=float(self.gen.top_p), eos_id=self.data.eos_id)
        p = batch["prompt_ids"].shape[1]
        return sums | keep | {"generated": tokens[:, p:]}

    def _predictions(self, outputs) -> dict[int, str]:
        """Eval row -> predicted answer text (classify: the argmax's answer, '' for <unk>; generate:
        the generated text), of the real rows of the combined eval outputs."""
        if self.head != "classify":
            return super()._predictions(outputs)
        keep = outputs["mask"] > 0
        vocab = self.data.answer_vocab
        return {int(i): (vocab[int(a)] if int(a) > 0 else "")
                for i, a in zip(outputs["index"][keep], outputs["answer_pred"][keep])}

    def finalize_eval(self, outputs):
        metrics: dict[str, float] = {}
        if outputs["vqa_count"] > 0:
            metrics["vqa_loss"] = outputs["vqa_nll"] / outputs["vqa_count"]
        batches = max(float(outputs["gate_batches"]), 1.0)
        metrics.update({k[:-4]: float(v) / batches for k, v in outputs.items()
                        if k.startswith("gate/") and k.endswith("_sum")})
        metrics.update(self._accuracy_metrics(outputs))
        if jax.process_index() == 0:
            gates = " ".join(f"{k[5:]} {metrics[k]:.3f}" for k in ("gate/attn_mean", "gate/ffn_mean", "gate/vision")
                             if k in metrics)
            print(f"  gates: {gates}", flush=True)
        return metrics

    def log_summary(self, metrics):
        keys = ("accuracy", "gate/attn_mean", "gate/vision")
        return " ".join(f"{k.replace('gate/', '')} {metrics[k]:.3f}" for k in keys if k in metrics)
