"""Monkeypatches of vlmjax for in-process A/B experiments (not library code).

  attn   : layers.dot_product_attention with GQA groups merged into the matmul rows ([B, K, G*T, Dh])
  ln     : layers.LayerNorm / vit.LayerNorm centring x once (bitwise-identical output)
  pe_old : vit.VisionEmbeddings as on main (DenseGeneral over [p, p, C] with 3 contracting dims)
"""
import functools
import flax.linen as nn
import jax, jax.numpy as jnp
from einops import rearrange
from vlmjax.models import layers, vit

_ORIG = {"dpa": layers.dot_product_attention, "ln_layers": layers.LayerNorm, "ln_vit": vit.LayerNorm,
         "emb": vit.VisionEmbeddings}


def dot_product_attention_bkgt(q, k, v, mask, dtype):
    """Same contract as layers.dot_product_attention; query groups folded into the row dim."""
    kh = k.shape[2]
    g = q.shape[2] // kh
    dh = q.shape[-1]
    q = q * jnp.asarray(dh**-0.5, q.dtype)
    q = rearrange(q, "b t (k g) d -> b k (g t) d", k=kh)
    k = rearrange(k, "b s k d -> b k s d")
    v = rearrange(v.astype(dtype), "b s k d -> b k s d")
    logits = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    logits = rearrange(logits, "b k (g t) s -> b k g t s", g=g)
    logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = rearrange(jax.nn.softmax(logits, axis=-1).astype(dtype), "b k g t s -> b k (g t) s")
    out = jnp.einsum("bkms,bksd->bkmd", probs, v)
    return rearrange(out, "b k (g t) d -> b t (k g) d", g=g)


class LayerNormCentred(nn.Module):
    eps: float = 1e-5
    dtype: object = jnp.float32
    param_dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), (d,), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (d,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        xc = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = xc * jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class OldVisionEmbeddings(vit.VisionEmbeddings):
    """main's patch projection (DenseGeneral over [p, p, C]); the rest as the current class."""

    @nn.compact
    def __call__(self, pixel_values, mask=None):
        c = self.config
        b, height, width, channels = pixel_values.shape
        p, d = c.patch_size, c.hidden_size
        gh, gw = height // p, width // p
        x = rearrange(pixel_values[:, : gh * p, : gw * p], "b (gh ph) (gw pw) c -> b gh gw ph pw c", ph=p, pw=p)
        x = layers.DenseGeneral(d, kernel_axes=(None, None, None, "embed"), axis=(-3, -2, -1),
                                use_bias=c.patch_bias, initializer_range=c.initializer_range, dtype=c.dtype,
                                param_dtype=c.param_dtype, name="patch_embedding")(x)
        x = rearrange(x, "b gh gw d -> b (gh gw) d")
        assert mask is None and c.variant == "clip" and not c.num_register_tokens  # benchmark case only
        vector = lambda name, shape, axes: self.param(
            name, nn.with_logical_partitioning(nn.initializers.normal(c.initializer_range), axes), shape, c.param_dtype)
        table = vector("position_embedding", (c.num_positions, d), (None, "embed"))
        pos = vit.interpolate_position_embedding(table[1:], c.grid_size, (gh, gw), c.pos_antialias)
        cls = vector("class_embedding", (d,), ("embed",))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d)), x], axis=1)
        pos = jnp.concatenate([table[:1].astype(jnp.float32), pos], axis=0)
        return x + pos.astype(x.dtype)


def reset():
    layers.dot_product_attention = _ORIG["dpa"]
    layers.LayerNorm = _ORIG["ln_layers"]
    vit.LayerNorm = _ORIG["ln_vit"]
    vit.VisionEmbeddings = _ORIG["emb"]


def apply(names):
    for n in names:
        if n == "attn":
            layers.dot_product_attention = dot_product_attention_bkgt
        elif n == "ln":
            layers.LayerNorm = LayerNormCentred
            vit.LayerNorm = LayerNormCentred
        elif n == "pe_old":
            vit.VisionEmbeddings = OldVisionEmbeddings
        elif n in ("", "-"):
            pass
        else:
            raise ValueError(n)
