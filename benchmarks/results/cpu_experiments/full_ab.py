"""python full_ab.py MODEL TRAIN STEPS VARIANT1 VARIANT2 ... (variant = comma-joined patches, '-' = none).
Builds one vlmjax model per variant (compiled under its patches) + HF torch eager; interleaves them all."""
import sys, os, json, statistics; sys.path.insert(0, __import__("os").path.dirname(__file__)); sys.path.insert(0, "/work/wt-cpuspeed")
import patches
from benchmarks import backbones, common
model, train, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
variants = sys.argv[4:] or ["-"]
extra = [a for a in variants if a.startswith("--")]; variants = [v for v in variants if not v.startswith("--")]
backbones.FLAGS(["x", f"--models={model}", "--batch=4", f"--train={'true' if train else 'false'}", f"--steps={steps}", "--seq_len=128"] + extra)
import torch, jax
backbones._torch_threads()
hf_cfg, cls = backbones._cases()[model]
fns = {}
for v in variants:
    patches.reset(); patches.apply([] if v == "-" else v.split(","))
    f = backbones.jax_fns(model, hf_cfg)
    for ph in f: f[ph]()  # compile under this variant's patches
    fns[f"vlmjax[{v}]"] = f
patches.reset()
fns["torch"] = backbones.torch_fns(model, hf_cfg, cls, False)
print(common.machine_line(), flush=True)
res = {"model": model, "dtype": backbones.FLAGS.dtype, "machine_before": common.machine_info(), "samples_s": {}}
for ph in (["fwd", "train"] if train else ["fwd"]):
    ts = backbones._time_rounds({k: f[ph] for k, f in fns.items()}, steps)
    res["samples_s"][ph] = ts
    tmed = statistics.median(ts["torch"])
    for k, t in ts.items():
        print(f"RESULT {model} {backbones.FLAGS.dtype} {ph} {k:28s} median {statistics.median(t)*1e3:8.0f} ms  min {min(t)*1e3:8.0f}  torch/this {tmed/statistics.median(t):.2f}", flush=True)
res["machine_after"] = common.machine_info()
print(common.machine_line())
tag = os.environ.get("TAG")
if tag: json.dump(res, open(f"/tmp/cpus/res_{tag}.json", "w"), indent=1)
