"""The pod planner (python -m vlmjax.plan) compiles the real train step for a TPU topology on this CPU.

Needs libtpu (the ``.[tpu]`` extra, which CI installs); without it the compile tests are skipped with
the reason. The collective counter is tested on hand-written HLO either way.
"""

import pytest

from conftest import load_config, run_module
from vlmjax import plan as plan_lib

TPU_REASON = plan_lib.tpu_available("v5e:2x2")
needs_tpu = pytest.mark.skipif(TPU_REASON is not None, reason=f"libtpu cannot describe a TPU slice here "
                               f"({TPU_REASON}); pip install -e '.[tpu]'")


def _config(mesh):
    return load_config("lm", "smoke", **{f"mesh.{k}": v for k, v in mesh.items()})


def test_collectives_are_counted_with_their_bytes():
    hlo = "\n".join([
        "  %all-reduce.1 = f32[128,4]{1,0} all-reduce(f32[128,4]{1,0} %p), replica_groups={{0,1}}",
        "  %ag = (bf16[8,16]{1,0}, bf16[2]{0}) all-gather-start(bf16[4,16]{1,0} %x), dimensions={0}",
        "  %ag.done = (bf16[8,16]{1,0}, bf16[2]{0}) all-gather-done(%ag)",
        "  %rs = f32[64]{0} reduce-scatter(f32[128]{0} %g), dimensions={0}",
        "  %add = f32[64]{0} add(f32[64]{0} %a, f32[64]{0} %b)",
    ])
    c = plan_lib.collectives(hlo)
    assert c["all-reduce"] == {"count": 1, "bytes": 128 * 4 * 4}
    assert c["all-gather"] == {"count": 1, "bytes": (8 * 16 + 2) * 2}  # -done not counted again
    assert c["reduce-scatter"] == {"count": 1, "bytes": 64 * 4}
    assert c["all-to-all"]["count"] == c["collective-permute"]["count"] == 0


@needs_tpu
def test_plan_compiles_dp_and_fsdp_for_a_v5e_slice():
    dp = plan_lib.plan(_config(dict(data=-1, fsdp=1, tensor=1)), "v5e:2x2", compile_eval=True)
    assert (dp["devices"], dp["chip"], dp["hosts"], dp["mesh"]) == (4, "v5e", 1, {"data": 4, "fsdp": 1, "tensor": 1})
    assert dp["hbm_gib"] == 16.0 and dp["fits"] and dp["advice"] == ""
    m = dp["memory_gib"]
    assert m["arguments"] > 0 and m["temporaries"] > 0 and m["peak"] >= m["arguments"]
    assert dp["flops_per_device"] > 0 and dp["eval"]["flops_per_device"] > 0
    assert dp["collectives"]["all-reduce"]["count"] > 0  # gradients are averaged over the data axis
    fsdp = plan_lib.plan(_config(dict(data=1, fsdp=-1, tensor=1)), "v5e:2x2", compile_eval=False)
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1} and "eval" not in fsdp
    # Params and optimizer state sharded over 4 chips: fewer argument bytes per chip, gathered per layer.
    assert fsdp["memory_gib"]["arguments"] < 0.6 * m["arguments"]
    assert fsdp["collectives"]["all-gather"]["count"] > 0
    text = plan_lib.format_plan(dp)
    assert "FITS" in text and "v5e:2x2" in text


def _cli(*args):
    return run_module(["-m", "vlmjax.plan", *args], {"JAX_PLATFORMS": "cpu"})


@needs_tpu
def test_cli_exits_nonzero_with_the_fix_when_the_step_does_not_fit(tmp_path):
    out = tmp_path / "plan.json"
    r = _cli("--config=configs/lm.py:smoke", "--topology=v5e:2x2", "--hbm_gib=0.0004", "--noeval", f"--json={out}")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "DOES NOT FIT" in r.stdout
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("vlmjax: error: the train step needs") and "--config." in last, last
    assert "Traceback" not in r.stderr
    assert out.exists()


def test_cli_bad_input_is_one_line():
    r = _cli("--config=configs/lm.py:smoke")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("vlmjax: error: --topology is required")
    r = _cli("--config=configs/lm.py:smoke", "--topology=v5e:2x2", "--config.mesh.fsdpp=2")
    assert r.returncode == 1
    assert "fsdpp" in r.stderr.strip().splitlines()[-1] and "fsdp" in r.stderr.strip().splitlines()[-1]


@needs_tpu
def test_unknown_topology_is_one_line():
    with pytest.raises(Exception, match=r"--topology=v9z:3x3: not a TPU slice libtpu knows"):
        plan_lib.topology_devices("v9z:3x3")


@needs_tpu
def test_a_mesh_axis_that_does_not_divide_a_param_says_which_size_does():
    c = load_config("lm", "smoke", **{"mesh.data": 1, "mesh.fsdp": -1, "batch_size": 64})  # hidden 32, 64 chips
    with pytest.raises(Exception, match=r"cannot split its axis 1 \(size 32\) 64 ways over mesh axis fsdp: .*"
                                        r"--config.mesh.fsdp=32 --config.mesh.data=-1"):
        plan_lib.plan(c, "v5e:8x8", compile_eval=False)


@needs_tpu
def test_a_step_xla_cannot_fit_is_a_plan_that_does_not_fit_with_the_fix():
    # 30M params, 1024 sequences of 512 tokens per v5e chip: XLA's TPU compiler refuses the temporaries.
    c = load_config("lm", "smoke", **{"batch_size": 4096, "data.seq_len": 512, "model.hidden_size": 1024,
                                      "model.intermediate_size": 4096, "model.num_attention_heads": 8,
                                      "model.head_dim": 128})
    p = plan_lib.plan(c, "v5e:2x2", compile_eval=False)
    assert not p["fits"] and "RESOURCE_EXHAUSTED" in p["compiler_error"]
    assert p["memory_gib"]["temporaries"] > 16 and 0 < p["state_gib_per_device"] < 1
    assert "--config.model.remat=full" in p["advice"] and "--config.optim.grad_accum_steps=2" in p["advice"]
    assert "DOES NOT FIT" in plan_lib.format_plan(p)


SMOKE_DEFAULT = ("dtf",)
SMOKE_ALL = ("lm", "mod", "dtf", "tdtf", "video_cls", "reuse", "perceiver_mrl_alignment", "pixmo_alignment",
             "trm_vlm_qa", "fusion_vqa", "foveated")


@needs_tpu
@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in SMOKE_DEFAULT else pytest.mark.slow)
                                  for n in SMOKE_ALL])
def test_every_smoke_config_compiles_for_a_v5e_slice(name):
    c = load_config(name, "smoke", **{"mesh.data": -1})
    c.unlock()
    c.batch_size = max(4, c.batch_size - c.batch_size % 4)  # divisible by the slice's 4 chips
    c.lock()
    p = plan_lib.plan(c, "v5e:2x2", compile_eval=True)
    assert p["fits"] and p["flops_per_device"] > 0 and p["eval"]["memory_gib"]["peak"] > 0, plan_lib.format_plan(p)


@needs_tpu
def test_multislice_puts_the_data_axis_across_slices():
    p = plan_lib.plan(load_config("lm", "smoke", **{"mesh.data": 2, "mesh.fsdp": -1}), "v5e:2x2", num_slices=2,
                      compile_eval=False)
    assert (p["devices"], p["hosts"], p["mesh"]) == (8, 2, {"data": 2, "fsdp": 4, "tensor": 1}) and p["fits"]
    with pytest.raises(Exception, match=r"--num_slices=2: config.mesh.data=1 must be a multiple of the slices"):
        plan_lib.plan(load_config("lm", "smoke", **{"mesh.data": 1, "mesh.fsdp": -1}), "v5e:2x2", num_slices=2)
