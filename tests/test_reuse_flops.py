"""Token reuse really skips compute: XLA's FLOP count of the compiled hard path (``ReuseViT.encode_clip
(mode='hard')``) falls with the reuse fraction and matches ``vlmjax.flops.reuse_vit_clip_flops``; the
benchmark ``benchmarks/reuse_speed.py`` runs end to end. Tiny ViT (hidden 64, 4 layers, patch 8, 64 px,
N = 65 tokens) on a 4-frame group in the eval order (3, 1, 0, 2)."""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from vlmjax import flops as flops_lib
from vlmjax.data import video
from vlmjax.models import reuse as R
from vlmjax.models import vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = vit.ViTConfig(variant="clip", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=2, patch_size=8, image_size=64)
FRAMES = 4
N = (64 // 8) ** 2 + 1
NR = N - 1
_G = video.frame_grouping(FRAMES, (3, 1, 0, 2))
GROUPING = R.Grouping.from_arrays(_G["process_order"], _G["ref_mask"], _G["ref_type"])
NUM_REFS = [len(r) for r in GROUPING.refs]
FRACTIONS = (0.0, 0.5, 0.75)
_PIXELS = jax.ShapeDtypeStruct((1, FRAMES, 64, 64, 3), jnp.float32)


def _xla_flops(fn, variables) -> float:
    compiled = jax.jit(fn).lower(variables, _PIXELS).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _config(fraction: float, **kw) -> R.ReuseConfig:
    return R.ReuseConfig(policy="topk_similarity", topk_reuse_fraction=fraction,
                         capacity_buckets=(flops_lib.topk_capacity_bucket(fraction, NR),), execution="bucket",
                         **kw)


def _hard_xla(rc: R.ReuseConfig) -> float:
    """XLA FLOPs of the jitted hard-path clip encode (abstract params; every output the benchmark reads)."""
    model = R.ReuseViT(CFG, reuse_config=rc, num_slots=FRAMES)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(_PIXELS.shape), GROUPING,
                                                  mode="hard", method=R.ReuseViT.encode_clip))
    variables = {"params": variables["params"]}

    def fn(v, frames):
        (out, stats), _ = model.apply(v, frames, GROUPING, mode="hard", method=R.ReuseViT.encode_clip,
                                      mutable=[R.REUSE_CACHE])
        return out["pooled"], out["last_hidden_state"], stats["reused"]
    return _xla_flops(fn, variables)


def _analytic(rc: R.ReuseConfig) -> float:
    cap = flops_lib.reuse_capacity_tokens(rc, NR)
    return flops_lib.reuse_vit_clip_flops(CFG, rc, N, NUM_REFS, {l: cap for l in rc.layers(4)})


@pytest.fixture(scope="module")
def hard_flops() -> dict[float, float]:
    return {f: _hard_xla(_config(f)) for f in FRACTIONS}


def test_capacity_bucket_is_exact():
    for nr in (64, 196, 65, 257):
        for f in (0.0, 0.3, 0.5, 0.7, 0.75, 0.85, 0.95, 0.99):
            rc = R.ReuseConfig(capacity_buckets=(flops_lib.topk_capacity_bucket(f, nr),))
            assert flops_lib.reuse_capacity_tokens(rc, nr) == max(1, nr - int(f * nr)), (nr, f)


def test_original_analytic_matches_xla():
    model = R.ReuseViT(CFG, reuse_config=_config(0.5), num_slots=FRAMES)
    variables = {"params": jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(_PIXELS.shape), GROUPING,
                                                             mode="hard", method=R.ReuseViT.encode_clip))["params"]}
    xla = _xla_flops(lambda v, x: model.apply(v, x, method=R.ReuseViT.original_clip)["pooled"], variables)
    analytic = flops_lib.vit_original_clip_flops(CFG, N, FRAMES)
    assert analytic == FRAMES * flops_lib.vit_forward_flops(
        hidden_size=64, intermediate_size=256, num_layers=4, patch_size=8, image_hw=(64, 64))
    assert xla == pytest.approx(analytic, rel=0.05), (xla, analytic)


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_hard_path_analytic_matches_xla(hard_flops, fraction):
    analytic = _analytic(_config(fraction))
    assert hard_flops[fraction] == pytest.approx(analytic, rel=0.05), (fraction, hard_flops[fraction], analytic)


def test_passthrough_analytic_matches_xla():
    rc = _config(0.75, restoration="passthrough")
    terms = flops_lib.reuse_vit_clip_flops_terms(CFG, rc, N, NUM_REFS, {l: 16 for l in rc.layers(4)})
    assert terms["restoration"] == 0.0 and terms["decision"] == 0.0
    assert _hard_xla(rc) == pytest.approx(sum(terms.values()), rel=0.05)


def test_hard_path_flops_fall_with_reuse(hard_flops):
    """A gather implementation, not masking: the gathered block costs what its capacity says."""
    x0, x5, x75 = (hard_flops[f] for f in FRACTIONS)
    assert x0 > x5 > x75
    a0, a75 = _analytic(_config(0.0)), _analytic(_config(0.75))
    # The saving is the gathered block's (q/k/v/out, attention, MLP on 65 -> 17 tokens in 3 reuse layers of
    # 3 referencing frames); masking would save nothing.
    assert x0 - x75 == pytest.approx(a0 - a75, rel=0.1), (x0 - x75, a0 - a75)
    # Reuse layers of referencing frames: XLA cost minus the parts that never reuse (patch embedding,
    # layer 0, the I frame), from the analytic count of those parts scaled by XLA/analytic of the original.
    fixed = sum(flops_lib.vit_original_frame_flops(CFG, N).values())  # I frame
    per_layer = sum(flops_lib.vit_layer_forward_flops_terms(CFG, N).values())
    never = fixed + 3 * (flops_lib.vit_patch_embed_flops(CFG, N) + per_layer)
    reuse0, reuse75 = x0 - never, x75 - never
    assert reuse75 < 0.6 * reuse0, (reuse0, reuse75)


def test_analytic_terms():
    """Terms by hand for one referencing frame at capacity 16 (ViT-B-style names)."""
    rc = _config(0.75)
    t = flops_lib.reuse_vit_frame_flops(CFG, rc, N, {1: 16, 2: 16, 3: 16}, True, num_refs=2)
    d, f = 64, 256
    assert t["recompute_proj"] == 3 * 2 * 17 * d * d * 4
    assert t["recompute_attention"] == 3 * 2 * 17 * N * d * 2
    assert t["recompute_mlp"] == 3 * 2 * 17 * d * f * 2
    assert t["restoration"] == 3 * 3 * 4 * (NR - 16) * d * 64  # only the reused tokens are restored
    assert t["similarity"] == 3 * 2 * NR * d * 5
    assert t["decision"] == 0.0  # topk_similarity never reads the decision MLP
    assert t["full_layers"] == sum(flops_lib.vit_layer_forward_flops_terms(CFG, N).values())
    t_i = flops_lib.reuse_vit_frame_flops(CFG, rc, N, {1: 16}, False)
    assert sum(t_i.values()) == sum(flops_lib.vit_original_frame_flops(CFG, N).values())
    mlp = flops_lib.reuse_vit_frame_flops(CFG, R.ReuseConfig(), N, {1: 16, 2: 16, 3: 16}, True)
    assert mlp["decision"] == 3 * 2 * NR * 64 * 8 and mlp["importance"] == 3 * 2 * N * d
    rates = flops_lib.reuse_vit_compute_reuse(CFG, rc, N, NUM_REFS, {l: 16 for l in rc.layers(4)})
    assert rates["layer"] == pytest.approx(0.75)
    assert rates["overall"] == pytest.approx(3 * 3 * 48 / (FRAMES * 4 * N))


def test_benchmark_small_end_to_end(tmp_path):
    sys.path.insert(0, ROOT)
    try:
        from benchmarks import reuse_speed  # pylint: disable=g-import-not-at-top
    finally:
        sys.path.remove(ROOT)
    out = str(tmp_path / "reuse_small")
    reuse_speed.main(["--small", "--rates=0.75", "--passthrough_rates=0.75", "--shared_rates=", "--iters=1",
                      "--warmup=0", f"--out={out}"])
    with open(out + ".json") as fh:
        payload = json.load(fh)
    rows = {r["config"]: r for r in payload["rows"]}
    assert set(rows) == {"original", "reuse 0.75", "reuse 0.75 passthrough"}
    r = rows["reuse 0.75"]
    assert r["layer_reuse"] == pytest.approx(0.75)
    assert r["overall_reuse"] == pytest.approx(r["analytic_overall_reuse"])
    assert abs(r["xla_vs_analytic_pct"]) < 5.0
    assert rows["reuse 0.75 passthrough"]["xla_ratio"] < r["xla_ratio"] < 1.0
    assert all(v == 1 for k, v in payload["model"]["compiles"].items() if k != "timing")
    assert payload["model"]["compiles"].get("timing", 0) == 0
    assert 0.0 < r["cos_min"] <= 1.0 + 1e-6 and "time_ratio" in r
    assert os.path.exists(out + ".md")
