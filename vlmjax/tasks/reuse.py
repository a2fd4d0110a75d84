"""Token reuse for video ViTs (experiment: ``configs/reuse.py``): distil ReuseViT against its frozen
backbone.

Spec: ``docs/token-reuse.md``. Only the ``reuse_*`` modules (decision and restoration MLPs)
train; the backbone's params are stop-gradient inside the loss (no weight gradients are even
computed for them) and frozen by ``optim.trainable=('^reuse_',)``. Targets are the same backbone
without reuse, every frame encoded alone.

Backbone (``init_from``):
- an HF directory (CLIP / SigLIP vision or two-tower, DINOv2): its vision tower;
- a vlmjax workdir: the ``vit`` params of its latest checkpoint (e.g. a ``video_cls`` run);
- '' (default): the experiment's stage 'backbone' (``config.stages.backbone``, a ``video_cls``
  experiment), which the runner trains first in its own workdir; its workdir is then loaded as above.

Training runs the soft path (Gumbel gates, all tokens computed); evaluation runs the hard path
(argmax decisions, recompute tokens gathered), so the reported reuse and fidelity are those of the
model that saves FLOPs. The run ends with a linear probe (ridge regression on clip embeddings)
trained on the original model's embeddings and tested on original and on reused embeddings.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from vlmjax import convert
from vlmjax import data as data_lib
from vlmjax import flops as flops_lib
from vlmjax.models import reuse as reuse_lib
from vlmjax.tasks import video_cls
from vlmjax.tasks.base import DataTask, is_hf_dir
from vlmjax.train import checkpoint


def probe_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(
        num_train=256,   # training clips whose embeddings fit the probe (0 disables the probe)
        num_eval=128,    # evaluation clips it is tested on
        batch_size=16,
        l2=1e-2,         # ridge penalty (on standardised features)
    ))


class ReuseTask(DataTask):
    units = "clips"

    @classmethod
    def needed_stages(cls, config) -> tuple[str, ...]:
        # The backbone stage stands in for init_from: with a pretrained backbone it is not trained.
        return () if config.init_from else super().needed_stages(config)

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        if not config.init_from and "backbone" not in self.stage_dirs:
            raise ValueError("No backbone: set --config.init_from=<HF CLIP/SigLIP/DINOv2 directory or vlmjax "
                             "workdir of a video_cls run>, or declare a 'backbone' stage in config.stages "
                             "(configs/reuse.py:default does) and run through vlmjax.run / vlmjax.main.")
        self.data = data_lib.build_video_data(config.data)
        self.groupings = {
            split: reuse_lib.Grouping.from_arrays(g["process_order"], g["ref_mask"], g["ref_type"])
            for split, g in (("train", self.data.train_grouping), ("eval", self.data.eval_grouping))}
        # The backbone: a pretrained checkpoint, else the finished 'backbone' stage's workdir.
        self.init_from = config.init_from or self.stage_dirs["backbone"]
        dtype = config.model.get("dtype", "float32")
        if self.init_from and is_hf_dir(self.init_from):
            self.spec = convert.vision_tower(self.init_from, dtype=dtype)
            vit_cfg = self.spec.module.config
        else:
            saved = epath.Path(self.init_from) / "config.json"
            if config.init_from and not epath.Path(self.init_from).exists():
                raise FileNotFoundError(f"config.init_from={self.init_from!r}: no such directory; point it at "
                                        "an HF CLIP/SigLIP/DINOv2 checkpoint directory or the workdir of a "
                                        "video_cls run, or set it to '' to train the backbone stage.")
            if not saved.exists():
                raise FileNotFoundError(f"init_from={self.init_from!r} is neither an HF checkpoint directory "
                                        "(config.json + safetensors) nor a vlmjax workdir (config.json + "
                                        "checkpoints/).")
            vit_cfg = video_cls.build_vit_config(ml_collections.ConfigDict(json.loads(saved.read_text())["model"]))
        self.vit_config = dataclasses.replace(vit_cfg, dtype=dtype) if dtype else vit_cfg
        if self.vit_config.patch_size != config.data.patch_size:
            raise ValueError(f"config.data.patch_size={config.data.patch_size} must equal the backbone's "
                             f"patch_size={self.vit_config.patch_size} (change_energy is per patch).")
        self.reuse_config = reuse_lib.ReuseConfig.from_config(config.reuse)
        self.reuse_config.validate(self.vit_config.num_hidden_layers)
        self.loss_config = config.reuse_loss
        n_layers = self.vit_config.num_hidden_layers
        self.hloss_layers = tuple(range(n_layers - len(self.loss_config.hloss_scaler), n_layers))
        if min(self.hloss_layers, default=0) < 0:
            raise ValueError(f"config.reuse_loss.hloss_scaler has {len(self.loss_config.hloss_scaler)} weights "
                             f"for a {n_layers}-layer backbone.")
        self.model = reuse_lib.build(self.vit_config, self.reuse_config, num_slots=int(config.data.num_frames))
        self.mean = tuple(config.image_mean)
        self.std = tuple(config.image_std)

    # ---- backbone -----------------------------------------------------------------------
    def pretrained_params(self, abstract_params, shardings):
        path = self.init_from
        backbone = {k: v for k, v in abstract_params.items() if not k.startswith("reuse_")}
        backbone_sh = None if shardings is None else {k: shardings[k] for k in backbone}
        if is_hf_dir(path):
            return convert.load_params(path, self.spec, backbone, shardings=backbone_sh)
        loaded, step = checkpoint.load_params(path, "vit")
        missing = sorted(set(backbone) - set(loaded))
        if missing:
            raise ValueError(f"{path} (step {step}): its 'vit' params lack {missing}; is it a video_cls run "
                             "of the same ViT config?")
        if jax.process_index() == 0:
            print(f"Backbone: params of {path} at step {step}", flush=True)
        put = (lambda x, s: jax.device_put(np.asarray(x), s)) if backbone_sh is not None else (
            lambda x, s: jnp.asarray(x))
        return jax.tree.map(put, {k: loaded[k] for k in backbone},
                            backbone_sh if backbone_sh is not None else {k: loaded[k] for k in backbone})

    # ---- model --------------------------------------------------------------------------
    def init_variables(self, rng):
        # The params do not depend on the clip length: an I frame then a P frame create every reuse
        # module, and tracing two frames instead of the whole unrolled clip keeps init cheap.
        s = self.config.data.image_size
        frames = jnp.zeros((1, 2, s, s, 3), jnp.float32)
        cmap = jnp.zeros((1, 2, self.data.num_patches), jnp.float32)
        g = data_lib.video.frame_grouping(2, (0, 1))
        grouping = reuse_lib.Grouping.from_arrays(g["process_order"], g["ref_mask"], g["ref_type"])
        variables = self.model.init({"params": rng}, frames, grouping, cmap,
                                    method=self.model.encode_clip, rng=jax.random.PRNGKey(0))
        # The cache is per clip and rebuilt by every call: not part of the train state.
        return {"params": variables["params"]}

    def _split(self, params):
        """Backbone params behind a stop-gradient (frozen: no weight gradients are computed)."""
        return {k: (v if k.startswith("reuse_") else jax.lax.stop_gradient(v)) for k, v in params.items()}

    def _run(self, params, batch, *, split, mode, rng=None, tau=None):
        frames = video_cls.normalize(batch["frames"], self.mean, self.std)
        cmap = batch["change_energy"].astype(jnp.float32)
        params = self._split(params)
        orig = jax.lax.stop_gradient(self.model.apply(
            {"params": params}, frames, keep_hidden=self.hloss_layers, method=self.model.original_clip))
        (out, stats), _ = self.model.apply(
            {"params": params}, frames, self.groupings[split], cmap, mode=mode, rng=rng, tau=tau,
            keep_hidden=self.hloss_layers, method=self.model.encode_clip, mutable=[reuse_lib.REUSE_CACHE])
        mask = batch["mask"].astype(jnp.float32)
        rates = reuse_lib.reuse_rates(stats, mask)
        p0 = self.model_prefix
        loss, terms = reuse_lib.reuse_loss(
            out["pooled"], orig["pooled"], [out["hidden"][l] for l in self.hloss_layers],
            [orig["hidden"][l] for l in self.hloss_layers], out["last_hidden_state"][:, :, p0:],
            orig["last_hidden_state"][:, :, p0:], self._loss_rates(rates, mode), mask, self.loss_config)
        metrics = {"loss": loss, **terms}
        layers_ = sorted(stats["gate"])
        # Three rates, over the reusable tokens of frames with references, per reuse layer:
        # reuse/{l} (decided): tokens whose noise-free decision is "reuse";
        # reuse_executed/{l}: tokens the hard path restored instead of recomputing (== decided with
        #   execution='packed'; with 'bucket' the batch's busiest clip sets everyone's capacity);
        # computed/{l}: tokens the layer ran per frame with references, padding included, as a
        #   fraction of N (what the FLOPs follow). reuse_gate/{l}: the Gumbel gate in training.
        has_ref = jnp.asarray(stats["has_ref"], jnp.float32)
        denom = jnp.maximum(mask.sum(), 1.0)
        ref_mean = lambda v: ((v * has_ref).sum(1) / jnp.maximum(has_ref.sum(), 1.0) * mask).sum() / denom
        for j, l in enumerate(layers_):
            metrics[f"reuse/{l}"] = rates["argmax_st"][j]
            metrics[f"reuse_executed/{l}"] = rates["hard"][j]
            metrics[f"computed/{l}"] = ref_mean(stats["computed"][l])
            if mode == "soft":
                metrics[f"reuse_gate/{l}"] = rates["soft"][j]
        if layers_:
            metrics["reuse_rate"] = rates["argmax_st"].mean()
            metrics["reuse_rate_executed"] = rates["hard"].mean()
        # compute_reuse_rate: fraction of all (frame, layer, token) computations of the clip skipped
        # (I frames, layer 0, CLS and padding count as computed): what turns into FLOPs.
        n_layers = self.vit_config.num_hidden_layers
        skipped = (sum(((1.0 - stats["computed"][l]).mean(1) * mask).sum() / denom for l in layers_)
                   if layers_ else jnp.zeros(()))
        metrics["compute_reuse_rate"] = skipped / n_layers
        metrics["overflow"] = (sum((stats["overflow"][l].mean(1) * mask).sum() / denom for l in layers_)
                               / max(len(layers_), 1)) if layers_ else jnp.zeros(())
        return loss, metrics, out, orig

    def _loss_rates(self, rates, mode):
        if mode != "soft":
            return rates["argmax_st"]
        est = self.loss_config.rate_estimator
        if est not in ("argmax_st", "gate"):
            raise ValueError(f"config.reuse_loss.rate_estimator={est!r}; use 'argmax_st' or 'gate'.")
        return rates["argmax_st" if est == "argmax_st" else "soft"]

    @property
    def model_prefix(self) -> int:
        return self.vit_config.num_prefix_tokens

    @property
    def model_fixed(self) -> int:
        return self.vit_config.num_prefix_tokens if self.reuse_config.skip_cls else 0

    def loss_fn(self, params, model_state, batch, rng, step):
        progress = jnp.asarray(step, jnp.float32) / max(int(self.config.total_steps), 1)
        tau = reuse_lib.scheduled_tau(self.reuse_config, progress)
        loss, metrics, _, _ = self._run(params, batch, split="train", mode="soft", rng=rng, tau=tau)
        metrics["tau"] = tau
        return loss, {"metrics": metrics, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        del model_state
        _, metrics, _, _ = self._run(params, batch, split="eval", mode="hard")
        n = batch["mask"].astype(jnp.float32).sum()
        return {"clips": n, **{k: v * n for k, v in metrics.items()}}

    def finalize_eval(self, sums):
        n = max(sums.get("clips", 0.0), 1.0)
        out = {k: v / n for k, v in sums.items() if k != "clips"}
        out["clips"] = int(n)
        out["flops_ratio"] = self.flops_ratio(out)
        return out

    def flops_ratio(self, metrics: dict[str, float]) -> float:
        """Analytic encoder FLOPs of the hard path / the original (``vlmjax.flops``), with each reuse
        layer's recompute count the measured mean tokens it ran (``computed/{l}``: padding included)."""
        n_tokens = self.data.num_patches + self.vit_config.num_prefix_tokens
        nr = n_tokens - self.model_fixed
        g = self.groupings["eval"]
        # (Capped at Nr: a tiny batch's chunk padding can exceed a frame's tokens.)
        recompute = {l: min(nr, max(0.0, metrics.get(f"computed/{l}", 1.0) * n_tokens - self.model_fixed))
                     for l in self.reuse_config.layers(self.vit_config.num_hidden_layers)}
        refs = [len(r) for r in g.refs]
        total = flops_lib.reuse_vit_clip_flops(self.vit_config, self.reuse_config, n_tokens, refs, recompute)
        return total / flops_lib.vit_original_clip_flops(self.vit_config, n_tokens, g.num_frames)

    def log_summary(self, metrics):
        keys = [("reuse_rate", "reuse"), ("reuse_rate_executed", "executed"), ("compute_reuse_rate", "compute"),
                ("pooled_cos", "pcos"), ("patch_cos", "patch-cos"), ("sloss", "s"), ("rloss", "r")]
        return " ".join(f"{short} {metrics[k]:.3f}" for k, short in keys if k in metrics)

    # ---- end of run ---------------------------------------------------------------------
    def on_end(self, state, mesh) -> dict[str, Any]:
        cfg = self.config.probe
        if not cfg.num_train:
            return {}
        res = linear_probe(self, state.params, cfg)
        if jax.process_index() == 0:
            print("linear probe on clip embeddings (ridge, fit on the original model's train embeddings): "
                  + ", ".join(f"{k} {v:.4f}" for k, v in res.items()), flush=True)
        return {"probe": res}


def backbone_head(task: ReuseTask):
    """The classification head {kernel [Dp, K], bias [K]} of a video_cls backbone workdir, or None
    (an HF backbone has none)."""
    if is_hf_dir(task.init_from):
        return None
    try:
        head, _ = checkpoint.load_params(task.init_from, "head")
    except (KeyError, ValueError):
        return None
    return {k: np.asarray(v) for k, v in head.items()}


def clip_embeddings(task: ReuseTask, params, clips: list[dict[str, np.ndarray]], batch_size: int,
                    head=None):
    """Mean over frames of the L2-normalised pooled embeddings: (original [C, Dp], reuse [C, Dp],
    labels [C], frame predictions of ``head`` {original, reuse: [C, F]} or None)."""
    model, grouping = task.model, task.groupings["eval"]

    @jax.jit
    def embed(params, frames, cmap):
        frames = video_cls.normalize(frames, task.mean, task.std)
        orig = model.apply({"params": params}, frames, method=model.original_clip)["pooled"]
        (out, _), _ = model.apply({"params": params}, frames, grouping, cmap, mode="hard",
                                  method=model.encode_clip, mutable=[reuse_lib.REUSE_CACHE])
        unit = lambda e: e / (jnp.linalg.norm(e, axis=-1, keepdims=True) + 1e-6)
        # The backbone's own head on every frame's pooled embedding (video_cls.FrameClassifier).
        pred = lambda e: (jnp.argmax(e.astype(jnp.float32) @ head["kernel"] + head["bias"], -1)
                          if head is not None else jnp.zeros(e.shape[:2], jnp.int32))
        return unit(orig).mean(1), unit(out["pooled"]).mean(1), pred(orig), pred(out["pooled"])

    parts: list[list[np.ndarray]] = [[], [], [], []]
    for i in range(0, len(clips), batch_size):
        chunk = clips[i:i + batch_size]
        pad = batch_size - len(chunk)
        chunk = chunk + [chunk[-1]] * pad
        frames = np.stack([c["frames"] for c in chunk])
        cmap = np.stack([c["change_energy"] for c in chunk])
        for part, value in zip(parts, jax.device_get(embed(params, frames, cmap))):
            part.append(value[: batch_size - pad])
    labels = np.array([int(c["label"]) for c in clips])
    o, r, po, pr = (np.concatenate(p) for p in parts)
    return o, r, labels, (None if head is None else {"original": po, "reuse": pr})


def ridge_probe(x_train, y_train, num_classes: int, l2: float):
    """Closed-form ridge regression onto one-hot labels (standardised features): predict(x) -> labels."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    z = (x_train - mu) / sd
    z = np.concatenate([z, np.ones((len(z), 1))], 1)
    y = np.eye(num_classes)[y_train]
    w = np.linalg.solve(z.T @ z + l2 * len(z) * np.eye(z.shape[1]), z.T @ y)
    return lambda x: np.argmax(np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], 1) @ w, -1)


def linear_probe(task: ReuseTask, params, cfg) -> dict[str, float]:
    """Downstream check: clip classification from pooled embeddings, with and without reuse."""
    # At most the split sizes (a folder of a few videos has fewer clips than the procedural defaults).
    train = [task.data.clip(i, "train") for i in range(min(int(cfg.num_train), len(task.data.train_clips)))]
    evals = [task.data.clip(i, "eval") for i in range(min(int(cfg.num_eval), len(task.data.eval_clips)))]
    tr_o, tr_r, tr_y, _ = clip_embeddings(task, params, train, int(cfg.batch_size))
    head = backbone_head(task)
    ev_o, ev_r, ev_y, preds = clip_embeddings(task, params, evals, int(cfg.batch_size), head=head)
    k = task.data.num_classes
    probe = ridge_probe(tr_o, tr_y, k, float(cfg.l2))
    probe_r = ridge_probe(tr_r, tr_y, k, float(cfg.l2))
    res = {"acc_original": float((probe(ev_o) == ev_y).mean()),
           "acc_reuse": float((probe(ev_r) == ev_y).mean()),
           "acc_reuse_own_probe": float((probe_r(ev_r) == ev_y).mean()),
           "clip_cos": float(np.mean(np.sum(ev_o * ev_r, -1) / (np.linalg.norm(ev_o, axis=-1)
                                                                * np.linalg.norm(ev_r, axis=-1) + 1e-9)))}
    if preds is not None:  # frame classification by the backbone's own head
        res["head_acc_original"] = float((preds["original"] == ev_y[:, None]).mean())
        res["head_acc_reuse"] = float((preds["reuse"] == ev_y[:, None]).mean())
    return res
