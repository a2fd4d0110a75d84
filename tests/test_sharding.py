"""Sharding on 8 fake CPU devices (a fresh interpreter, since the device count is fixed at import)."""

import json

import numpy as np
import pytest

from conftest import run_module


def _check(*parts):
    p = run_module(["tests/helpers/sharding_check.py", *parts],
                   env_extra={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return json.loads(p.stdout.split("RESULT ", 1)[1])


def _assert_routed_matches(res, kind):
    r = res[f"routed_{kind}"]
    np.testing.assert_allclose(r["loss_mesh"], r["loss_single"], rtol=1e-5, err_msg=kind)
    # Two Adam steps amplify float reassociation differences (~1e-5 of lr 3e-3 updates).
    assert r["max_param_diff"] < 1e-4 and r["max_state_diff"] < 1e-5, (kind, r)


def test_mesh_step_matches_single_device_and_params_are_sharded():
    # One routed kind here (DTF); TDTF and MoD: test_tdtf_and_mod_mesh_steps_match_single_device (slow).
    res = _check("lm", "dtf")
    np.testing.assert_allclose(res["mesh222"]["loss"], res["single"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(res["mesh222"]["grad_norm"], res["single"]["grad_norm"], rtol=1e-4)
    assert res["max_param_diff"] < 1e-5

    specs, shapes = res["specs"], res["shard_shapes"]
    q = [k for k in specs if k.endswith("q_proj/kernel")]
    mlp = [k for k in specs if k.endswith("gate_proj/kernel")]
    emb = [k for k in specs if k.endswith("embedding")]
    assert q and mlp and emb, sorted(specs)
    # Rules: embed -> fsdp, q_heads/mlp/vocab -> tensor.
    assert specs[q[0]][:2] == ["fsdp", "tensor"] and not any(specs[q[0]][2:]), specs[q[0]]
    assert specs[mlp[0]] == ["fsdp", "tensor"], specs[mlp[0]]
    assert specs[emb[0]] == ["tensor", "fsdp"], specs[emb[0]]
    glob_shape, shard_shape = shapes[q[0]]
    assert shard_shape[0] == glob_shape[0] // 2 and shard_shape[1] == glob_shape[1] // 2
    assert "['fsdp', 'tensor']" in res["opt_specs"], res["opt_specs"]

    assert res["restore_step"] == 1
    assert res["restore_max_diff"] == 0.0
    assert res["restore_mesh"] == "(('data', 4), ('fsdp', 1), ('tensor', 2))"
    assert np.isfinite(res["restore_next_loss"])

    # convert.load_hf(mesh=...) places each HF tensor sharded, and the sharded model matches torch.
    assert res["hf_mesh_q_spec"][:2] == ["fsdp", "tensor"]
    assert res["hf_mesh_q_shard"] == [16, 2, 8]
    assert res["hf_mesh_max_err"] < 1e-4
    _assert_routed_matches(res, "dtf")


@pytest.mark.slow
def test_tdtf_and_mod_mesh_steps_match_single_device():
    """TDTF (dense teacher, transition network) and MoD (top-k of the router logits) on the mesh. The
    default test covers the LM and DTF (sequence top-k, gather/scatter, router_state) on it; these two
    kinds add four sharded train-step compiles, so they run with -m slow (as in test_accelerator_core)."""
    res = _check("tdtf", "mod")
    for kind in ("tdtf", "mod"):
        _assert_routed_matches(res, kind)
