"""Causal language modelling with the dense decoder (experiment: ``configs/lm.py``).

Loss: mean next-token cross-entropy over non-padding targets. Evaluation reports validation loss
(nats/token), perplexity, bits per byte (loss / ln 2 / UTF-8 bytes per token of the validation
text, comparable across tokenizers) and next-token accuracy. The run ends with a sampled
continuation of ``config.sample.prompt``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from vlmjax import convert
from vlmjax import data as data_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import generate as generate_lib
from vlmjax.models import lora as lora_lib
from vlmjax.tasks.base import DataTask, load_pretrained

def sample_config() -> ml_collections.ConfigDict:
    """Schema of ``config.sample``: the continuation sampled at the end of a run."""
    return ml_collections.ConfigDict(dict(
        prompt="The",            # text to continue at the end of training ('' disables)
        max_new_tokens=96,
        temperature=0.7,         # 0 = greedy
        top_p=0.9,
    ))


# Decoder config fields that describe how to train, not the architecture: they apply on top of a
# pretrained checkpoint's config.json.
_TRAINING_FIELDS = ("remat", "attention_impl", "scan_layers", "lora_rank", "lora_alpha", "lora_dropout",
                    "lora_targets")


def init_from(config) -> str:
    """The HF checkpoint directory to start from: ``config.init_from`` (or ``config.model.init_from``);
    one that is not a local HF directory fails here, naming the field."""
    top = config.get("init_from", "") or ""
    model = config.model.get("init_from", "") or ""
    if top and model and top != model:
        raise ValueError(f"config.init_from={top!r} and config.model.init_from={model!r} disagree; set one.")
    path = top or model
    field = "config.init_from" if top else "config.model.init_from"
    fix = ("point it at a local Hugging Face checkpoint directory (config.json, *.safetensors and "
           "tokenizer.json, as save_pretrained writes them), or set it to '' to train from scratch.")
    if path and not os.path.isdir(path):
        raise FileNotFoundError(f"{field}={path!r}: no such directory; {fix}")
    if path and not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{field}={path!r} is not a Hugging Face checkpoint directory (no "
                                f"config.json); {fix}")
    return path


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """logits: [B, T, V] (fp32), targets: [B, T] int, mask: [B, T] -> (nll [B, T] masked, correct [B, T])."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return nll * mask, correct * mask


class LMTask(DataTask):
    units = "tokens"

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        self.init_from = init_from(config)
        if not self.init_from and int(config.model.get("lora_rank", 0)) > 0:
            raise ValueError(
                f"config.model.lora_rank={config.model.lora_rank} adds LoRA adapters to a frozen base, but no "
                "pretrained base is given: set --config.init_from=<local HF checkpoint dir> (e.g. a "
                "Qwen2.5 for configs/dtf.py:pretrained_lora), or --config.model.lora_rank=0 to train from scratch.")
        data_cfg = config.data
        if not self.init_from and data_cfg.tokenizer == "hf" and not data_cfg.get("tokenizer_path"):
            raise ValueError(
                "config.data.tokenizer='hf' takes the tokenizer of a pretrained checkpoint, and none is "
                "given (the :finetune / :pretrained variants fine-tune one): set --config.init_from=<local "
                "HF checkpoint dir> (offline SmolLM2-135M: README, 'Pretrained weights'), or "
                "--config.data.tokenizer_path=<dir> to train from scratch with its tokenizer.")
        if self.init_from:
            if data_cfg.tokenizer != "hf":
                raise ValueError(
                    f"init_from={self.init_from!r} loads a pretrained decoder, whose embedding "
                    f"table needs its own token ids: set config.data.tokenizer='hf' (not "
                    f"{data_cfg.tokenizer!r}).")
            if not data_cfg.tokenizer_path:
                data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
                data_cfg.tokenizer_path = self.init_from
        self.data = data_lib.build_lm_data(data_cfg, workdir=workdir,
                                           global_batch_size=int(config.batch_size))
        self.tokenizer = self.data.tokenizer
        self.seq_len = int(config.data.seq_len)
        if self.init_from:
            # Architecture from the checkpoint's config.json; compute dtype, remat and adapters (LoRA)
            # from our config.
            self.spec = convert.build(self.init_from, dtype=config.model.dtype)
            keep = {k: config.model[k] for k in _TRAINING_FIELDS if k in config.model}
            self.model_config = dataclasses.replace(self.spec.module.config, **keep)
            self.model_config.validate()
            if self.model_config.vocab_size < self.tokenizer.vocab_size:
                raise ValueError(f"{self.init_from}: vocab_size {self.model_config.vocab_size} < tokenizer's "
                                 f"{self.tokenizer.vocab_size}.")
        else:
            self.model_config = decoder_lib.DecoderConfig.from_config(
                config.model, vocab_size=self.tokenizer.vocab_size)
        self.model = self.build_model(self.model_config)

    def build_model(self, model_config):
        """The Linen module trained by this task (subclasses: routed decoders)."""
        return decoder_lib.Decoder(model_config)

    def pretrained_params(self, abstract_params, shardings):
        if not self.init_from:
            return None
        return load_pretrained([("", self.init_from)], abstract_params, shardings,
                               skip=(lora_lib.LORA_REGEX,) if self.model_config.lora_rank else ())

    def units_per_step(self, global_batch_size):
        return global_batch_size * self.seq_len

    # ---- model --------------------------------------------------------------------------
    def init_variables(self, rng):
        return self.model.init(rng, jnp.zeros((1, self.seq_len), jnp.int32))

    def _forward(self, params, model_state, batch, rng=None):
        # rng: the "dropout" stream (LoRA dropout); None = deterministic (evaluation).
        rngs = {"dropout": rng} if rng is not None else {}
        logits, aux = self.model.apply({"params": params, **model_state}, batch["inputs"],
                                       attention_mask=batch.get("attention_mask"), rngs=rngs)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll, correct = token_nll(logits, batch["targets"], mask)
        return nll, correct, mask, aux

    def loss_fn(self, params, model_state, batch, rng, step):
        del step  # the dense LM has no schedules; rng only drives LoRA dropout (if lora_dropout > 0)
        nll, correct, mask, aux = self._forward(params, model_state, batch, rng)
        count = jnp.maximum(mask.sum(), 1.0)
        loss = nll.sum() / count
        metrics = {"loss": loss, "accuracy": correct.sum() / count,
                   **{k: jnp.mean(v) for k, v in aux.items()}}
        return loss, {"metrics": metrics, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        nll, correct, mask, _ = self._forward(params, model_state, batch)
        return {"nll_sum": nll.sum(), "correct_sum": correct.sum(), "tokens": mask.sum()}

    def finalize_eval(self, sums):
        tokens = max(sums.get("tokens", 0.0), 1.0)
        loss = sums["nll_sum"] / tokens
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "bits_per_byte": loss / math.log(2) / self.data.bytes_per_token,
            "accuracy": sums["correct_sum"] / tokens,
            "tokens": int(tokens),
        }

    # ---- end of run ---------------------------------------------------------------------
    def on_end(self, state, mesh) -> dict[str, Any]:
        return self.sample(state.params)

    def sample(self, params, model_state=None) -> dict[str, Any]:
        """Continues ``config.sample.prompt`` with the KV-cache generator; prints and returns it."""
        cfg = self.config.sample
        if not cfg.prompt or cfg.max_new_tokens <= 0:
            return {}
        prompt = np.asarray(self.tokenizer.encode(cfg.prompt), np.int32)[None, :]
        out = generate_lib.generate(
            self.model, params, jnp.asarray(prompt), max_new_tokens=int(cfg.max_new_tokens),
            rng=jax.random.PRNGKey(self.config.seed), temperature=float(cfg.temperature),
            top_p=float(cfg.top_p), model_state=model_state)
        if jax.process_count() > 1:
            out = multihost_utils.process_allgather(out, tiled=True)
        text = self.tokenizer.decode(np.asarray(jax.device_get(out))[0].tolist())
        if jax.process_index() == 0:
            print(f"sample (temperature={cfg.temperature}, top_p={cfg.top_p}):\n{text!r}", flush=True)
        return {"sample": text}
