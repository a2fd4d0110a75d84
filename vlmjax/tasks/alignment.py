"""Vision-text alignment (``task='alignment'``): contrastive training of a vision tower + pooling head
and a text tower into one (Matryoshka-nested) embedding space, evaluated by retrieval.

Experiments: ``configs/pixmo_alignment.py`` (attention pooling) and
``configs/perceiver_mrl_alignment.py`` (Perceiver resampler + MRL); ``docs/alignment.md``.

Config sections this task reads (besides the trainer block):

  data             ``vlmjax.data.image_text.default_config()``: procedural scenes by default, or a
                   JSONL / CSV + image folder, or a TFDS directory
  vision_encoder   init_from (HF CLIP / SigLIP / DINOv2 dir, or a CLIP / SigLIP two-tower dir),
                   freeze (regexes on paths inside the tower; ('',) = the whole tower), tower (fields of
                   ``vit.ViTConfig``; ignored with init_from, whose config.json decides), and the
                   head switches of ``AlignmentConfig`` (use_perceiver, perceiver_*, use_attention_pooling,
                   pool_heads, pooling, projection_layers), perceiver_lr_mult
  text_encoder     init_from (HF CLIP / SigLIP text or two-tower dir), freeze, tower (fields of
                   ``TextEncoderConfig``; vocab_size and eos_token_id come from the data's tokenizer)
  model            embed_dim, use_mrl, mrl_dimensions, mrl_tied, attention_impl, dtype
  losses           type ('clip' | 'siglip'), contrastive_weight, mrl_weights (one per dim, () = 1 each),
                   sample_single_mrl_dim, logit_scale_init, logit_bias_init

Both losses see the GLOBAL batch: the embeddings are sharded over the data axes and the [B, B]
similarity is one jnp expression, so XLA gathers every device's embeddings (every device's
negatives come from the whole batch). Gradient accumulation would shrink the negatives to one
micro-batch, so it is refused.

Evaluation embeds the held-out pairs (row i = image i and its caption i), then reports image-to-text
and text-to-image R@1/5/10 at every MRL dim, bytes per embedding, a table in the log and
``WORKDIR/retrieval.png`` (R@1 against dim).
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import convert
from vlmjax import data as data_lib
from vlmjax.models import alignment
from vlmjax.models import contrastive
from vlmjax.models import text_encoder as text_lib
from vlmjax.models import vit as vit_lib
from vlmjax.tasks.base import DataTask

HEAD_FIELDS = ("use_perceiver", "perceiver_num_latents", "perceiver_num_layers", "perceiver_num_heads",
               "perceiver_dim", "perceiver_ffn_mult", "perceiver_latent_init_std", "use_attention_pooling",
               "pool_heads", "pooling", "projection_layers")
TOWER_PATHS = {"vision_encoder": "vision_tower", "text_encoder": "text_tower"}
# The heads that learn from scratch on top of the towers: ``vision_encoder.perceiver_lr_mult`` applies here.
RESAMPLER_PATH = r"^vision_resampler/"
KS = (1, 5, 10)


def vision_tower_config() -> ml_collections.ConfigDict:
    """``vision_encoder.tower`` of a small CLIP-style ViT for 96 px scenes (fields of ``vit.ViTConfig``).

    Patch 32 at 96 px makes one patch per cell of the scenes' 3x3 grid, so each token holds at most
    one object (measured on procedural scenes, batch 128: CLIP loss summed over 5 MRL dims 14.2 at
    step 150 vs 19.8 with 64 px / patch 16, at a ~6x smaller vision cost)."""
    return ml_collections.ConfigDict(dict(
        variant="clip", hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
        patch_size=32, image_size=96, hidden_act="quick_gelu", layer_norm_eps=1e-5, dropout_rate=0.0,
        drop_path_rate=0.0, remat="none", scan_layers=False))


def text_tower_config() -> ml_collections.ConfigDict:
    """``text_encoder.tower`` of a small CLIP-style causal text tower (fields of ``TextEncoderConfig``
    except vocab_size / eos_token_id, which the tokenizer gives)."""
    return ml_collections.ConfigDict(dict(
        variant="clip", hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=32, hidden_act="quick_gelu", layer_norm_eps=1e-5, remat="none"))


def _tower_fields(section) -> dict:
    return {k: v for k, v in section.tower.items()}


class AlignmentTask(DataTask):
    units = "pairs"

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        if int(config.optim.grad_accum_steps) != 1:
            raise ValueError(f"config.optim.grad_accum_steps={config.optim.grad_accum_steps}: contrastive losses "
                             "take their negatives from the whole batch, which accumulation would split; use 1 "
                             "(and a smaller batch_size, or more devices).")
        ve, te = config.vision_encoder, config.text_encoder
        data_cfg = config.data
        if (te.init_from and not data_cfg.tokenizer) or (ve.init_from and not data_cfg.processor):
            # A pretrained tower brings its tokenizer / image preprocessing unless the data names others.
            data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
            data_cfg.tokenizer = data_cfg.tokenizer or te.init_from
            data_cfg.processor = data_cfg.processor or ve.init_from
        self.data = data_lib.build_image_text_data(data_cfg, workdir)
        dtype = config.model.dtype
        common = dict(dtype=dtype, attention_impl=config.model.attention_impl)
        if ve.init_from:
            self.vision_spec = convert.vision_tower(ve.init_from, dtype=dtype)
            vcfg = self.vision_spec.module.config
            vcfg = dataclasses.replace(vcfg, attention_impl=common["attention_impl"], remat=ve.tower.remat,
                                       scan_layers=ve.tower.scan_layers)
        else:
            vcfg = vit_lib.ViTConfig(**{**_tower_fields(ve), **common})
            if vcfg.image_size != int(config.data.image_size):
                raise ValueError(f"config.vision_encoder.tower.image_size={vcfg.image_size} differs from "
                                 f"config.data.image_size={config.data.image_size}; a tower trained from scratch "
                                 "should see images of the size its position table is built for: set both.")
        vcfg.validate()
        if te.init_from:
            self.text_spec = convert.text_tower(te.init_from, dtype=dtype)
            tcfg = self.text_spec.module.config
            if tcfg.vocab_size != self.data.vocab_size:
                raise ValueError(f"text_encoder.init_from={te.init_from!r} has vocab_size {tcfg.vocab_size} but the "
                                 f"data's tokenizer has {self.data.vocab_size}; set config.data.tokenizer to that "
                                 "checkpoint's directory.")
            tcfg = dataclasses.replace(tcfg, attention_impl=common["attention_impl"], remat=te.tower.remat)
        else:
            tcfg = text_lib.TextEncoderConfig(**{**_tower_fields(te), **common, "vocab_size": self.data.vocab_size,
                                                 "eos_token_id": self.data.eos_id})
        tcfg.validate()
        if int(config.data.max_text_len) > tcfg.max_position_embeddings:
            raise ValueError(f"config.data.max_text_len={config.data.max_text_len} exceeds the text tower's "
                             f"max_position_embeddings={tcfg.max_position_embeddings}.")
        m, lc = config.model, config.losses
        dims = tuple(m.mrl_dimensions) if m.use_mrl else ()
        self.head_config = alignment.AlignmentConfig(
            embed_dim=int(m.embed_dim), mrl_dims=dims, mrl_tied=bool(m.mrl_tied), loss=lc.type,
            logit_scale_init=float(lc.logit_scale_init), logit_bias_init=float(lc.logit_bias_init),
            **{k: ve[k] for k in HEAD_FIELDS}, **common)
        self.head_config.validate()
        self.vision_config, self.text_config = vcfg, tcfg
        self.model = alignment.AlignmentModel(vcfg, tcfg, self.head_config)
        self.dims = self.head_config.dims
        weights = tuple(lc.mrl_weights)
        if weights and len(weights) != len(self.dims):
            raise ValueError(f"config.losses.mrl_weights has {len(weights)} weights for the {len(self.dims)} "
                             f"dims {self.dims}; give one per dim (largest first) or () for 1 each.")
        self.mrl_weights = weights or None
        self.image_size = int(config.data.image_size)

    # ---- model --------------------------------------------------------------------------
    def init_variables(self, rng):
        s, t = self.image_size, int(self.config.data.max_text_len)
        return self.model.init(rng, jnp.zeros((1, s, s, 3), jnp.float32), jnp.zeros((1, t), jnp.int32),
                               jnp.ones((1, t), jnp.bool_))

    def pretrained_params(self, abstract_params, shardings):
        entries = [(TOWER_PATHS[name], self.config[name].init_from)
                   for name in TOWER_PATHS if self.config[name].init_from]
        if not entries:
            return None
        out = {}
        for path, hf_dir in entries:
            spec = self.vision_spec if path == "vision_tower" else self.text_spec
            sh = None if shardings is None else shardings[path]
            out[path] = convert.load_params(hf_dir, spec, abstract_params[path], shardings=sh)
        return out

    def optimizer_config(self, optim_cfg):
        """Adds each tower's ``freeze`` regexes (prefixed with its path) to ``frozen`` and the
        resampler's learning-rate multiplier to ``lr_groups``."""
        frozen = list(optim_cfg.frozen)
        for name, path in TOWER_PATHS.items():
            for pattern in self.config[name].freeze:  # searched inside the tower; '^' anchors at its root
                inner = f"(?:{pattern[1:]})" if pattern.startswith("^") else f".*(?:{pattern})"
                frozen.append(f"^{path}/{inner}")
        groups = list(optim_cfg.lr_groups)
        mult = float(self.config.vision_encoder.perceiver_lr_mult)
        if self.head_config.use_perceiver and mult != 1.0:
            groups.insert(0, (RESAMPLER_PATH, mult))
        cfg = ml_collections.ConfigDict(optim_cfg.to_dict())
        cfg.frozen, cfg.lr_groups = tuple(frozen), tuple(groups)
        return cfg

    # ---- loss ---------------------------------------------------------------------------
    def _embed(self, params, batch, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        return self.model.apply({"params": params}, batch["image"], batch["text"], batch["text_valid"],
                                deterministic=rng is None, rngs=rngs)

    def _pair_loss(self, scalars):
        if self.head_config.loss == "clip":
            return functools.partial(contrastive.clip_loss, logit_scale=scalars["logit_scale"])
        return functools.partial(contrastive.siglip_loss, logit_scale=scalars["logit_scale"],
                                 logit_bias=scalars["logit_bias"])

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        dropout_rng, mrl_rng = jax.random.split(rng)
        img, txt, scalars = self._embed(params, batch, dropout_rng)
        loss, metrics = contrastive.mrl_loss(img, txt, self._pair_loss(scalars), self.mrl_weights,
                                             sample_single=bool(self.config.losses.sample_single_mrl_dim),
                                             rng=mrl_rng)
        loss = loss * float(self.config.losses.contrastive_weight)
        metrics = {**metrics, "loss": loss}
        return loss, {"metrics": metrics, "model_state": model_state}

    # ---- evaluation ---------------------------------------------------------------------
    def eval_fn(self, params, model_state, batch):
        img, txt, _ = self._embed(params, batch)
        out = {f"img_{m}": img[m] for m in self.dims} | {f"txt_{m}": txt[m] for m in self.dims}
        return out | {"mask": batch["mask"], "index": batch["index"]}

    def finalize_eval(self, outputs):
        keep = outputs["mask"] > 0
        order = np.argsort(outputs["index"][keep], kind="stable")
        n = int(keep.sum())
        metrics: dict[str, float] = {"pairs": n}
        rows = []
        for m in self.dims:
            img = outputs[f"img_{m}"][keep][order]
            txt = outputs[f"txt_{m}"][keep][order]
            r = contrastive.retrieval_metrics(img @ txt.T, ks=KS)
            metrics.update({f"{k}@{m}": float(v) for k, v in r.items()})
            rows.append((m, r, contrastive.embedding_bytes(m, np.float32)))
        self._report(rows, n)
        return metrics

    def _report(self, rows, n):
        if jax.process_index() != 0:
            return
        keys = [k for k in rows[0][1]]
        print(f"retrieval on {n} held-out pairs (chance R@1 = {1 / max(n, 1):.4f}):", flush=True)
        print("   dim   bytes  " + "  ".join(f"{k:>9s}" for k in keys), flush=True)
        for m, r, nbytes in rows:
            print(f"  {m:4d}  {nbytes:6d}  " + "  ".join(f"{r[k]:9.4f}" for k in keys), flush=True)
        if self.workdir is not None and len(rows) > 1:
            _plot(rows, os.path.join(str(self.workdir), "retrieval.png"), n)

    def log_summary(self, metrics):
        if "mrl_dim" in metrics:
            return f"mrl_dim {int(metrics['mrl_dim'])}"
        return ""


def _plot(rows, path, n):
    """R@1 (both directions) against the embedding dim, log-x (``WORKDIR/retrieval.png``)."""
    try:
        import matplotlib  # pylint: disable=g-import-not-at-top
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:  # an optional extra; the table is in the log and metrics.jsonl either way
        print(f"(no {os.path.basename(path)}: matplotlib is not installed; pip install -e '.[bench]')", flush=True)
        return
    dims = [m for m, _, _ in rows]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for key in [k for k in rows[0][1] if k.endswith("R@1")]:
        ax.plot(dims, [r[key] for _, r, _ in rows], marker="o", label=key)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("embedding dim")
    ax.set_ylabel("R@1")
    ax.set_title(f"retrieval, {n} held-out pairs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
