"""Routed decoders really skip compute: XLA's FLOP count of the compiled forward falls with capacity
and matches ``vlmjax.flops.routed_decoder_forward_flops`` (spec: "the FLOPs of the block scale with
k, not T: check with cost_analysis()"). Tiny shapes where the block dominates (d = 64, T = 128)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from vlmjax import flops as flops_lib
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import routed_decoder
from vlmjax.models import routing as R

T = 128
CFG = decoder_lib.DecoderConfig(vocab_size=128, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=32, rope_theta=10000.0)
CAPACITIES = (1.0, 0.5, 0.25)


def _xla_forward_flops(model, **kwargs) -> float:
    """XLA cost_analysis FLOPs of the jitted forward of one [1, T] sequence (abstract params)."""
    tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
    compiled = jax.jit(lambda v, t: model.apply(v, t, **kwargs)[0]).lower(variables, tokens).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _routed(kind: str, capacity: float) -> routed_decoder.RoutedDecoder:
    rc = R.RoutingConfig(kind=kind, capacity=capacity, causal_capacity=capacity,
                         beta="scheduled" if kind == "tdtf" else "learned")
    return routed_decoder.build(CFG, rc)


@pytest.fixture(scope="module")
def non_routed_flops() -> float:
    """XLA FLOPs of everything but the routed layer: a 1-layer dense decoder (embed, layer 0, norm,
    LM head). With every=2, offset=1 on 2 layers, layer 1 is the only routed layer."""
    one = decoder_lib.Decoder(dataclasses.replace(CFG, num_hidden_layers=1))
    return _xla_forward_flops(one)


def test_dense_analytic_matches_xla():
    xla = _xla_forward_flops(decoder_lib.Decoder(CFG))
    analytic = flops_lib.decoder_forward_flops(CFG, T)
    assert xla == pytest.approx(analytic, rel=0.05), (xla, analytic)


def test_routed_capacity_one_equals_dense_plus_router_heads():
    """At capacity 1.0 MoD is the dense model plus its router (2 T d per routed layer)."""
    rc = R.RoutingConfig(kind="mod", capacity=1.0)
    dense = flops_lib.decoder_forward_flops(CFG, T)
    assert flops_lib.routed_decoder_forward_flops(CFG, rc, T) == dense + 2 * T * CFG.hidden_size
    assert flops_lib.routed_decoder_train_flops(CFG, rc, 3, T) == 9 * flops_lib.routed_decoder_forward_flops(
        CFG, rc, T)


@pytest.mark.parametrize("kind", ["mod", "dtf"])
def test_xla_flops_fall_with_capacity_and_match_analytic(kind, non_routed_flops):
    xla = {c: _xla_forward_flops(_routed(kind, c), mode="topk") for c in CAPACITIES}
    analytic = {c: flops_lib.routed_decoder_forward_flops(CFG, _routed(kind, c).routing, T, "train")
                for c in CAPACITIES}
    # (b) strictly decreasing, each within 5% of the analytic routed formula.
    assert xla[1.0] > xla[0.5] > xla[0.25], xla
    for c in CAPACITIES:
        assert xla[c] == pytest.approx(analytic[c], rel=0.05), (kind, c, xla[c], analytic[c])
    # The routed layer's part (total minus the non-routed layers) is roughly proportional to k:
    # its ratio to capacity 1.0 is within 0.05 of the analytic ratio (k = 64: ~0.5, k = 32: ~0.25).
    part = {c: xla[c] - non_routed_flops for c in CAPACITIES}
    a_part = {c: sum(flops_lib.routed_layer_forward_flops(
        CFG, _routed(kind, c).routing, "mod" if kind == "mod" else "dtf", T, "train").values())
        for c in CAPACITIES}
    for c in (0.5, 0.25):
        assert part[c] / part[1.0] == pytest.approx(a_part[c] / a_part[1.0], abs=0.05), (kind, c, part)
    # (c) A masked implementation (block on all T tokens, unselected updates zeroed) keeps the block's
    # FLOPs constant and fails this: at capacity 0.25 the routed layer costs < 0.8x capacity 1.0.
    assert part[0.25] < 0.8 * part[1.0], (kind, part)


def test_tdtf_teacher_dense_in_training_routed_at_inference():
    """TDTF: the training forward runs the dense teacher block (no saving: >= dense); the inference
    forward ("causal", static cap = capacity) runs the block on the cap only, so it falls."""
    dense = _xla_forward_flops(decoder_lib.Decoder(CFG))
    train = {c: _xla_forward_flops(_routed("tdtf", c), mode="topk") for c in (1.0, 0.25)}
    infer = {c: _xla_forward_flops(_routed("tdtf", c), mode="causal") for c in (1.0, 0.25)}
    assert train[0.25] > dense and train[0.25] == pytest.approx(train[1.0], rel=0.01), (train, dense)
    assert infer[0.25] < 0.8 * infer[1.0], infer
    for c in (1.0, 0.25):
        rc = _routed("tdtf", c).routing
        assert train[c] == pytest.approx(flops_lib.routed_decoder_forward_flops(CFG, rc, T, "train"), rel=0.05)
        assert infer[c] == pytest.approx(flops_lib.routed_decoder_forward_flops(CFG, rc, T, "inference"),
                                         rel=0.05)


@pytest.mark.slow  # default-suite time; a benchmark script's end-to-end run; its counting functions are tested above
def test_routing_flops_script_runs_and_writes_its_report(tmp_path):
    """The benchmark script end to end on the CPU shape (FLOP counts only, no timing)."""
    import json

    from conftest import run_module

    out = str(tmp_path / "rf")
    p = run_module(["benchmarks/routing_flops.py", "--shapes=cpu", "--no_time", f"--out={out}"])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rows = json.load(open(out + ".json"))
    text = open(out + ".md").read()
    assert "MoD capacity 0.125" in text and "| cpu | mod |" in text
    assert rows and "XLA vs analytic" in text
    # The inference section: causal prefill FLOPs per model (routed below dense, at the 'auto' cap);
    # decoding is skipped with --no_time.
    assert "## Inference" in text and "### Prefill" in text
    inf = {r["model"]: r for r in rows["inference"] if r["shape"] == "cpu"}
    assert set(inf) == {"dense", "mod", "dtf", "tdtf"}, inf
    dense = inf["dense"]["prefill_MFLOP_tok_xla"]
    assert dense and inf["dense"]["prefill_MFLOP_tok_analytic"]
    for kind, cap in (("mod", 0.125), ("dtf", 0.5), ("tdtf", 0.5)):
        r = inf[kind]
        assert r["causal_c"] == pytest.approx(cap + 0.125) and r["cap_per_layer"] == int((cap + 0.125) * 128)
        assert r["prefill_MFLOP_tok_xla"] < dense and r["prefill_xla_vs_dense"] < 1.0, (kind, r)
        assert r["prefill_MFLOP_tok_analytic"] < inf["dense"]["prefill_MFLOP_tok_analytic"], (kind, r)
        assert r.get("decode_tok_s") is None  # --no_time: no decoding
