"""Two-pass foveated video prediction (``task='foveated'``; experiment ``configs/foveated.py``,
docs/foveated.md).

The model (``vlmjax.models.foveated.FoveatedModel``) reads every frame of a clip twice: with a learned
static query (pass 1, coarse) and with the queries its LLM predicted from pass 1 (pass 2, fine), and
predicts each next frame's latent from each pass. Training minimises
``loss_fine + lambda_coarse * loss_coarse`` (MSE on the cached target latents; plus
``lambda_look * look_loss`` when set). The success metric
(the seed's) is ``loss_fine / loss_coarse`` on held-out clips: below 1 when the LLM's choice of where
to look helps.

Config sections this task reads (besides the trainer block):

  data      ``vlmjax.data.video.default_config()``: procedural sprite clips (default), a folder of
            videos or a TFDS video dataset; data.patch_size must equal the encoder's patch size (the
            change maps then score the attention per patch)
  latents   ``vlmjax.data.latents.default_config()``: the targets, computed once and cached
            (a fixed pixel encoder, or a diffusers AutoencoderKL directory)
  encoder   init_from (an HF DINOv2 / DINOv3 / CLIP / SigLIP dir; '' = from scratch with ``tower``),
            tower (``vit.ViTConfig`` fields), image_mean / image_std (the encoder's normalisation),
            freeze (regexes inside the encoder)
  decoder   init_from (an HF Llama / Qwen dir, e.g. SmolLM2-135M) and ``DecoderConfig`` fields
            (the architecture when training from scratch; dtype / remat / attention_impl always)
  foveated  ``FoveatedConfig`` fields (query_mode, query_heads, film_channels, residual, ...),
            lambda_coarse and lambda_look (``FoveatedTask.look_loss``, 0 = off)
  model     dtype, attention_impl
  eval      max_batches, num_pictures (clips drawn in attention.png after every evaluation)

Metrics: loss_fine, loss_coarse and their ratio every log step (and data_wait_frac, from the
trainer); in evaluation also the two controls (pass 2 with the static query: ratio 1 by
construction; with another clip's queries), the copy-last-latent baseline, and each pass's attention
mass on the patches that changed (where the sprites move) beside the uniform share, and
``state_use_{coarse,fine}``: the loss with another clip's LLM states over the loss (1.0 = the head
ignores what the LLM saw).
"""

from __future__ import annotations

import dataclasses
import io

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vlmjax import config_util
from vlmjax import convert
from vlmjax import tree
from vlmjax.data import latents as latents_lib
from vlmjax.data import video as video_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import foveated as foveated_lib
from vlmjax.models import vit as vit_lib
from vlmjax.tasks import video_cls
from vlmjax.tasks.base import DataTask, fit_saved, is_hf_dir
from vlmjax.train import checkpoint

# DINOv2 / DINOv3 preprocessing (ImageNet statistics); CLIP-family checkpoints set their own.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Decoder fields that say how to run a checkpoint, not its architecture (applied on top of config.json).
_RUN_FIELDS = ("dtype", "remat", "attention_impl")
_FOVEATED_KEYS = ("lambda_coarse", "lambda_look")
PICTURE = "attention.png"
# The optional config.stages entry: the same model trained first on easier clips (configs/foveated.py).
WARMUP_STAGE = "warmup"


def encoder_section() -> ml_collections.ConfigDict:
    """``config.encoder``: a pretrained ViT directory or a from-scratch tower."""
    return ml_collections.ConfigDict(dict(
        init_from="", freeze=(), image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
        tower=dict(variant="dinov2", hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                   num_attention_heads=4, patch_size=8, image_size=64, hidden_act="gelu",
                   layer_norm_eps=1e-6, num_register_tokens=0, use_mask_token=False, remat="none",
                   scan_layers=False)))


def decoder_section() -> ml_collections.ConfigDict:
    """``config.decoder``: every ``DecoderConfig`` field plus ``init_from``."""
    return decoder_lib.default_config()


def foveated_section() -> ml_collections.ConfigDict:
    """``config.foveated``: every ``FoveatedConfig`` field at its default (dtype comes from
    ``config.model``) plus ``lambda_coarse`` and ``lambda_look``."""
    c = config_util.config_dict(foveated_lib.FoveatedConfig)
    del c["dtype"]
    c.lambda_coarse = 1.0
    # Weight of the look-where-it-changes loss on pass 2's attention (``FoveatedTask.look_loss``; 0 = off).
    c.lambda_look = 0.0
    return c


class FoveatedTask(DataTask):
    units = "clips"

    def __init__(self, config, workdir, stage_dirs=None):
        super().__init__(config, workdir, stage_dirs)
        self.vit_config = self._encoder_config(config)
        self.decoder_config = self._decoder_config(config)
        self.fov_config = config_util.from_config(foveated_lib.FoveatedConfig, config.foveated, "config.foveated",
                                                  ignore=_FOVEATED_KEYS, dtype=config.model.dtype)
        self.fov_config.validate()
        self.lambda_coarse = float(config.foveated.lambda_coarse)
        self.lambda_look = float(config.foveated.get("lambda_look", 0.0))
        for name in _FOVEATED_KEYS:
            if not float(config.foveated.get(name, 0.0)) >= 0:
                raise ValueError(f"config.foveated.{name}={config.foveated.get(name)!r} must be >= 0.")
        d = config.data
        if d.patch_size != self.vit_config.patch_size:
            raise ValueError(f"config.data.patch_size={d.patch_size} must equal the encoder's patch size "
                             f"{self.vit_config.patch_size} (the change maps score attention per patch).")
        self.data = self._build_data(config, workdir)
        self.model = foveated_lib.FoveatedModel(self.vit_config, self.decoder_config, self.fov_config,
                                                latent_grid=self.latent_shape[:2])
        self.mean, self.std = tuple(config.encoder.image_mean), tuple(config.encoder.image_std)

    # ---- building ----------------------------------------------------------------------------
    def _encoder_config(self, config) -> vit_lib.ViTConfig:
        ec, m = config.encoder, config.model
        if ec.init_from:
            if not is_hf_dir(ec.init_from):
                raise FileNotFoundError(f"config.encoder.init_from={ec.init_from!r} is not a Hugging Face "
                                        "checkpoint directory (config.json + *.safetensors).")
            try:  # pickle-only or weightless: refuse now (not after the latents are cached), naming the field
                convert.core.safetensors_files(ec.init_from)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"config.encoder.init_from={ec.init_from!r}: {e}") from None
            self.encoder_spec = convert.vision_tower(ec.init_from, dtype=m.dtype)
            vcfg = dataclasses.replace(self.encoder_spec.module.config, attention_impl=m.attention_impl,
                                       remat=ec.tower.remat, scan_layers=False)
        else:
            vcfg = vit_lib.ViTConfig(**dict(ec.tower.items()), attention_impl=m.attention_impl, dtype=m.dtype)
        if config.data.image_size % vcfg.patch_size:
            raise ValueError(f"config.data.image_size={config.data.image_size} must be a multiple of the "
                             f"encoder's patch size {vcfg.patch_size}.")
        vcfg.validate()
        return vcfg

    def _decoder_config(self, config) -> decoder_lib.DecoderConfig:
        dc = config.decoder
        fields = {k: v for k, v in dc.items() if k != "init_from"}
        fields["attention_impl"] = config.model.attention_impl
        if dc.init_from:
            if not is_hf_dir(dc.init_from):
                raise FileNotFoundError(f"config.decoder.init_from={dc.init_from!r} is not a Hugging Face "
                                        "checkpoint directory (config.json + *.safetensors); point it at one "
                                        "(e.g. the SmolLM2 directory vlmjax.convert.gguf writes) or set it to ''.")
            try:  # pickle-only or weightless: refuse now (not after the latents are cached), naming the field
                convert.core.safetensors_files(dc.init_from)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"config.decoder.init_from={dc.init_from!r}: {e}") from None
            spec = convert.build(dc.init_from, dtype=fields["dtype"])
            cfg = dataclasses.replace(spec.module.config, **{k: fields[k] for k in _RUN_FIELDS})
            cfg.validate()
            return cfg
        # The LLM reads frame features, never token ids (no embedding table is created); vocab_size=0 -> 1.
        return decoder_lib.DecoderConfig.from_config(ml_collections.ConfigDict(fields), vocab_size=1)

    def _build_data(self, config, workdir) -> video_lib.VideoData:
        data = video_lib.build_video_data(config.data)
        lc = config.latents
        cache_dir = lc.cache_dir or (str(epath.Path(workdir) / "latent_cache") if workdir else "")
        if not cache_dir:
            raise ValueError("config.latents.cache_dir is empty and there is no workdir: set "
                             "config.latents.cache_dir to a directory for the cached target latents.")
        sources = video_lib.ClipSources(train=data.train_clips, eval=data.eval_clips,
                                        num_classes=data.num_classes, class_names=data.class_names,
                                        description=data.description)
        wrapped = latents_lib.latent_sources(sources, lc, cache_dir=cache_dir, data_cfg=config.data)
        sample = wrapped.eval[0]["latents"]
        self.latent_shape = tuple(int(s) for s in sample.shape[1:])  # (h, w, C)
        if self.latent_shape[-1] != self.fov_config.latent_channels:
            raise ValueError(f"the cached latents have {self.latent_shape[-1]} channels; set "
                             f"config.foveated.latent_channels={self.latent_shape[-1]}.")
        return dataclasses.replace(data, train_clips=wrapped.train, eval_clips=wrapped.eval,
                                   description=wrapped.description)

    # ---- model -------------------------------------------------------------------------------
    def init_variables(self, rng):
        t, s = int(self.config.data.num_frames), int(self.config.data.image_size)
        return self.model.init(rng, jnp.zeros((1, t, s, s, 3), jnp.float32),
                               jnp.zeros((1, t, *self.latent_shape), jnp.float32))

    def pretrained_params(self, abstract_params, shardings):
        if WARMUP_STAGE in self.stage_dirs:
            return self._load_warmup(abstract_params, shardings)
        out = {}
        ec, dc = self.config.encoder, self.config.decoder
        if ec.init_from:
            sh = None if shardings is None else shardings["encoder"]
            out["encoder"] = convert.load_params(ec.init_from, self.encoder_spec, abstract_params["encoder"],
                                                 shardings=sh)
        if dc.init_from:
            # The LLM reads frame features, never token ids: its embed_tokens / lm_head are never
            # created (Decoder.backbone only), so the checkpoint's vocabulary matrices are skipped.
            spec = convert.build(dc.init_from)
            want = set(tree.flatten(abstract_params["llm"]))
            vocab = [r for r in spec.rules
                     if r.flax not in want and r.flax.startswith(("embed_tokens/", "lm_head/"))]
            spec = dataclasses.replace(spec, rules=[r for r in spec.rules if r not in vocab],
                                       ignore=tuple(spec.ignore) + tuple(r.hf for r in vocab))
            sh = None if shardings is None else shardings["llm"]
            out["llm"] = convert.load_params(dc.init_from, spec, abstract_params["llm"], shardings=sh)
        return out or None

    def _load_warmup(self, abstract_params, shardings):
        """Every param from the warm-up stage's checkpoint (``config.stages.warmup``: the same model
        trained first on easier clips, e.g. one sprite; it started from the init_from checkpoints
        itself). Shapes must match this model's."""
        source = self.stage_dirs[WARMUP_STAGE]
        saved, _ = checkpoint.load_params(source)
        return fit_saved(saved, abstract_params, shardings, where=f"the warm-up stage in {source}",
                         hint=f"give config.stages.{WARMUP_STAGE} the same encoder, decoder and foveated "
                              "sections, or delete that stage's workdir.")

    def optimizer_config(self, optim_cfg):
        """Freezes ``encoder.freeze`` (regexes inside the encoder). The LLM has no vocabulary matrices
        to freeze: it reads frame features, never token ids, so ``embed_tokens`` is never created."""
        frozen = list(optim_cfg.frozen)
        for pattern in self.config.encoder.freeze:
            inner = f"(?:{pattern[1:]})" if pattern.startswith("^") else f".*(?:{pattern})"
            frozen.append(f"^encoder/{inner}")
        cfg = ml_collections.ConfigDict(optim_cfg.to_dict())
        cfg.frozen = tuple(frozen)
        return cfg

    # ---- loss --------------------------------------------------------------------------------
    def _forward(self, params, batch, rng=None, fine_queries="predicted", shuffle_state=False):
        frames = video_cls.normalize(batch["frames"], self.mean, self.std)
        rngs = {} if rng is None else {"dropout": rng}
        return self.model.apply({"params": params}, frames, batch["latents"].astype(jnp.float32),
                                fine_queries=fine_queries, shuffle_state=shuffle_state, deterministic=rng is None,
                                rngs=rngs)

    @staticmethod
    def _sq_error(pred, latents):
        """pred [B, T-1, h, w, C] vs latents[:, 1:] -> per-clip MSE [B]."""
        return jnp.mean(jnp.square(pred - latents[:, 1:].astype(jnp.float32)), axis=(1, 2, 3, 4))

    def _attention_on_motion(self, attn, batch):
        """attention [B, T, Np] and changed_patches [B, T, Np] -> per-clip mass on changed patches of
        frames 1.. [B], and the uniform share [B] (what attention spread evenly would put there)."""
        changed = batch["changed_patches"][:, 1:].astype(jnp.float32)
        mass = jnp.mean(jnp.sum(attn[:, 1:] * changed, -1), 1)
        return mass, jnp.mean(jnp.mean(changed, -1), 1)

    @staticmethod
    def look_loss(attn, changed):
        """The look-where-it-changes loss: -log(pass-2 attention mass on the patches that changed).

        attn [B, T, Np] (pass 2, mean over heads), changed [B, T, Np] (``changed_patches``: frame t vs
        t-1, i.e. where the movers were at t-1 and are at t) -> per-clip mean over frames 1.. that
        changed [B]. Frame t is read with the query the LLM chose after frame t-1, so the loss asks it
        to predict where the motion will be from what it has seen; any split of the mass over the
        changed patches is optimal. Frames without change (and frame 0, all True) are skipped.
        """
        changed = changed[:, 1:].astype(jnp.float32)
        mass = jnp.sum(attn[:, 1:].astype(jnp.float32) * changed, -1)  # [B, T-1]
        has = (jnp.sum(changed, -1) > 0).astype(jnp.float32)
        nll = -jnp.log(jnp.clip(mass, 1e-6, 1.0))
        return jnp.sum(nll * has, 1) / jnp.maximum(jnp.sum(has, 1), 1.0)

    def loss_fn(self, params, model_state, batch, rng, step):
        del step
        out = self._forward(params, batch, rng)
        w = batch["mask"].astype(jnp.float32)
        n = jnp.maximum(w.sum(), 1.0)
        fine = jnp.sum(self._sq_error(out["pred_fine"], batch["latents"]) * w) / n
        coarse = jnp.sum(self._sq_error(out["pred_coarse"], batch["latents"]) * w) / n
        loss = fine + self.lambda_coarse * coarse
        metrics = {"loss_fine": fine, "loss_coarse": coarse, "ratio": fine / jnp.maximum(coarse, 1e-12)}
        if self.lambda_look:
            look = jnp.sum(self.look_loss(out["attn_fine"], batch["changed_patches"]) * w) / n
            loss = loss + self.lambda_look * look
            metrics["loss_look"] = look
        return loss, {"metrics": metrics, "model_state": model_state}

    def eval_fn(self, params, model_state, batch):
        del model_state
        w = batch["mask"].astype(jnp.float32)
        lat = batch["latents"].astype(jnp.float32)
        out = self._forward(params, batch)
        sums = {"clips": w.sum(),
                "fine_sum": jnp.sum(self._sq_error(out["pred_fine"], lat) * w),
                "coarse_sum": jnp.sum(self._sq_error(out["pred_coarse"], lat) * w),
                "copy_sum": jnp.sum(jnp.mean(jnp.square(lat[:, 1:] - lat[:, :-1]), (1, 2, 3, 4)) * w)}
        for control in ("static", "shuffled"):
            ctl = self._forward(params, batch, fine_queries=control)
            sums[f"fine_{control}_sum"] = jnp.sum(self._sq_error(ctl["pred_fine"], lat) * w)
        # Does the head use the clip's LLM state? Both passes with another clip's states.
        other = self._forward(params, batch, shuffle_state=True)
        for name in ("coarse", "fine"):
            sums[f"{name}_other_state_sum"] = jnp.sum(self._sq_error(other[f"pred_{name}"], lat) * w)
        for name in ("coarse", "fine"):
            mass, uniform = self._attention_on_motion(out[f"attn_{name}"], batch)
            sums[f"motion_attn_{name}_sum"] = jnp.sum(mass * w)
        sums["motion_share_sum"] = jnp.sum(uniform * w)
        # Per-clip arrays for the pictures (the trainer concatenates them over batches).
        sums["attn_coarse"], sums["attn_fine"] = out["attn_coarse"], out["attn_fine"]
        sums["valid"] = w
        return sums

    def finalize_eval(self, sums):
        n = max(float(sums["clips"]), 1.0)
        mean = lambda k: float(sums[k]) / n
        fine, coarse = mean("fine_sum"), mean("coarse_sum")
        res = {"loss_fine": fine, "loss_coarse": coarse, "ratio": fine / max(coarse, 1e-12),
               "loss_copy_last": mean("copy_sum"), "clips": int(n)}
        for control in ("static", "shuffled"):
            res[f"loss_fine_{control}"] = mean(f"fine_{control}_sum")
            res[f"ratio_{control}"] = res[f"loss_fine_{control}"] / max(coarse, 1e-12)
        for name in ("coarse", "fine"):
            res[f"motion_attention_{name}"] = mean(f"motion_attn_{name}_sum")
            # > 1: the predictions need this clip's LLM state (1.0: the head ignores what the LLM saw).
            res[f"state_use_{name}"] = mean(f"{name}_other_state_sum") / max(res[f"loss_{name}"], 1e-12)
        res["motion_share_uniform"] = mean("motion_share_sum")
        if self.workdir and jax.process_index() == 0 and int(self.config.eval.num_pictures):
            self.write_pictures(np.asarray(sums["attn_coarse"]), np.asarray(sums["attn_fine"]))
        return res

    def log_summary(self, metrics):
        if "loss_fine" not in metrics:
            return ""
        return (f"fine {metrics['loss_fine']:.4f} coarse {metrics['loss_coarse']:.4f} "
                f"ratio {metrics['ratio']:.3f}")

    # ---- pictures ------------------------------------------------------------------------------
    def write_pictures(self, attn_coarse: np.ndarray, attn_fine: np.ndarray) -> str:
        """Draws ``eval.num_pictures`` validation clips: frames, pass-1 and pass-2 attention over the
        patches (red, scaled per frame to its maximum) -> ``WORKDIR/attention.png``; returns its path."""
        k = min(int(self.config.eval.num_pictures), attn_fine.shape[0])
        clips = [self.data.clip(i, "eval")["frames"] for i in range(k)]
        png = attention_picture(np.stack(clips), attn_coarse[:k], attn_fine[:k], self.vit_config.patch_size)
        path = epath.Path(self.workdir) / PICTURE
        path.write_bytes(png)
        return str(path)


def attention_picture(frames: np.ndarray, attn_coarse: np.ndarray, attn_fine: np.ndarray, patch: int) -> bytes:
    """PNG bytes: for each clip three rows (frames; coarse attention; fine attention) of T tiles.

    frames: [K, T, H, W, 3] in [0, 1] or uint8; attn_*: [K, T, Np], Np = (H / patch) * (W / patch).
    Attention tiles blend the frame (dimmed) with the attention in red, each frame scaled to its max.
    """
    from PIL import Image  # pylint: disable=g-import-not-at-top

    frames = np.asarray(frames, np.float32)
    if frames.max() > 1.5:
        frames = frames / 255.0
    k, t, h, w, _ = frames.shape
    gh, gw = h // patch, w // patch

    def heat(a, img):
        a = a.reshape(gh, gw) / max(float(a.max()), 1e-9)
        a = np.kron(a, np.ones((patch, patch)))[:h, :w, None]
        return 0.35 * img + 0.65 * a * np.array([1.0, 0.1, 0.1])

    rows = []
    for i in range(k):
        rows.append(np.concatenate(list(frames[i]), axis=1))
        for attn in (attn_coarse, attn_fine):
            rows.append(np.concatenate([heat(attn[i, j], frames[i, j]) for j in range(t)], axis=1))
    grid = np.clip(np.concatenate(rows, axis=0), 0.0, 1.0)
    image = Image.fromarray((grid * 255).astype(np.uint8))
    scale = max(1, 256 // h)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


__all__ = ["FoveatedTask", "attention_picture", "decoder_section", "encoder_section", "foveated_section"]
