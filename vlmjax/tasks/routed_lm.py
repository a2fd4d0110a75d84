"""Causal LM with a routed decoder: MoD, DTF, TDTF (``configs/{mod,dtf,tdtf}.py``).

Same data, tokenizers and metrics as ``lm.py``. Differences:
- the model is ``RoutedDecoder``; its ``router_state`` collection (schedule progress, long-run D_st
  means) is part of the train state and checkpointed;
- the loss is ``L_LM + router_loss`` (spec: lambda_prior * mean L_prior + lambda_causal * mean BCE
  (+ lambda_tpn * mean L_tpn for TDTF));
- evaluation reports the loss under both selection modes: ``loss`` / ``perplexity`` with the causal
  routers (a valid autoregressive score) and ``loss_topk`` / ``perplexity_topk`` with top-k over the
  whole sequence (sees future tokens; what training optimises);
- router telemetry per routed layer goes to metrics.jsonl / wandb, a summary to the log line;
- generation (KV cache) uses the causal routers.
With ``init_from`` the decoder weights come from an HF checkpoint and the routers (``routers_*``)
and any LoRA adapters keep their fresh init.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from vlmjax.models import lora as lora_lib
from vlmjax.models import routed_decoder, routing
from vlmjax.tasks import lm
from vlmjax.tasks.base import load_pretrained

# Telemetry averaged over routed layers for the log line (all per-layer values go to metrics.jsonl).
_LINE_STATS = (("selected_frac", "sel"), ("g_cont", "G"), ("causal_acc", "c-acc"))


class RoutedLMTask(lm.LMTask):
    state_collections = (routing.ROUTER_STATE,)

    loss_label = "total-loss"  # LM loss + router losses; log_summary shows the LM loss as lm-loss

    def __init__(self, config, workdir, stage_dirs=None):
        self.routing_config = routing.RoutingConfig.from_config(config.routing)
        super().__init__(config, workdir, stage_dirs)

    def build_model(self, model_config):
        return routed_decoder.build(model_config, self.routing_config)

    def pretrained_params(self, abstract_params, shardings):
        if not self.init_from:
            return None
        # Routers, PriorFFNs / transition nets and LoRA adapters are not in the HF checkpoint.
        return load_pretrained([("", self.init_from)], abstract_params, shardings,
                               skip=(r"(^|/)routers_", lora_lib.LORA_REGEX))

    # ---- model --------------------------------------------------------------------------
    def _apply(self, params, model_state, batch, *, mode, rng=None, progress=None, mutable=False):
        rngs = {"dropout": rng} if rng is not None and self.model_config.lora_dropout > 0 else None
        # attention_mask (0 on the padding of the last evaluation window): padding is never chosen
        # by a router and never a key.
        return self.model.apply({"params": params, **model_state}, batch["inputs"], mode=mode,
                                attention_mask=batch.get("attention_mask"), progress=progress, rngs=rngs,
                                mutable=[routing.ROUTER_STATE] if mutable else False)

    def loss_fn(self, params, model_state, batch, rng, step):
        progress = jnp.asarray(step, jnp.float32) / max(int(self.config.total_steps), 1)
        (logits, aux), new_state = self._apply(params, model_state, batch, mode="topk", rng=rng,
                                               progress=progress, mutable=True)
        mask = batch["loss_mask"].astype(jnp.float32)
        nll, correct = lm.token_nll(logits, batch["targets"], mask)
        count = jnp.maximum(mask.sum(), 1.0)
        lm_loss = nll.sum() / count
        loss = lm_loss + aux["router_loss"]
        metrics = {"loss": loss, "lm_loss": lm_loss, "accuracy": correct.sum() / count,
                   **{k: jnp.mean(v) for k, v in aux.items()}}
        return loss, {"metrics": metrics, "model_state": {**model_state, **new_state}}

    def eval_fn(self, params, model_state, batch):
        mask = batch["loss_mask"].astype(jnp.float32)
        out = {"tokens": mask.sum(), "batches": jnp.ones((), jnp.float32)}
        for mode, suffix in (("causal", ""), ("topk", "_topk")):
            logits, aux = self._apply(params, model_state, batch, mode=mode)
            nll, correct = lm.token_nll(logits, batch["targets"], mask)
            out[f"nll_sum{suffix}"] = nll.sum()
            out[f"correct_sum{suffix}"] = correct.sum()
            sel = [v for k, v in aux.items() if k.endswith("/selected_frac")]  # over real tokens only
            out[f"selected_frac_sum{suffix}"] = jnp.mean(jnp.stack(sel))
            if mode == "causal":  # tokens the causal routers wanted but the running budget skipped
                over = [v for k, v in aux.items() if k.endswith("/causal_overflow")]
                out["causal_overflow_sum"] = jnp.mean(jnp.stack(over))
        return out

    def finalize_eval(self, sums):
        tokens = max(sums.get("tokens", 0.0), 1.0)
        batches = max(sums.get("batches", 0.0), 1.0)
        res: dict[str, Any] = {"tokens": int(tokens)}
        for suffix in ("", "_topk"):
            loss = sums[f"nll_sum{suffix}"] / tokens
            res.update({
                f"loss{suffix}": loss,
                f"perplexity{suffix}": math.exp(min(loss, 50.0)),
                f"bits_per_byte{suffix}": loss / math.log(2) / self.data.bytes_per_token,
                f"accuracy{suffix}": sums[f"correct_sum{suffix}"] / tokens,
                f"selected_frac{suffix}": sums[f"selected_frac_sum{suffix}"] / batches,
            })
        res["causal_overflow"] = sums.get("causal_overflow_sum", 0.0) / batches
        return res

    def log_summary(self, metrics: dict[str, float]) -> str:
        parts = [f"lm-loss {metrics['lm_loss']:.4f}"] if "lm_loss" in metrics else []
        for stat, short in _LINE_STATS:
            vals = [v for k, v in metrics.items() if k.startswith("router/") and k.endswith("/" + stat)]
            if vals:
                parts.append(f"{short} {np.mean(vals):.3f}")
        for name in ("prior", "causal", "tpn"):
            v = metrics.get(f"loss/{name}")
            if v:
                parts.append(f"L_{name} {v:.4f}")
        return " ".join(parts)

    # ---- end of run ---------------------------------------------------------------------
    def on_end(self, state, mesh) -> dict[str, Any]:
        return self.sample(state.params, {routing.ROUTER_STATE: state.model_state[routing.ROUTER_STATE]})
