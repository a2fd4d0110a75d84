r"""QLoRA on the real SmolLM2-135M-Instruct, offline: the NF4 base's loss vs bf16, and LoRA on the NF4 base.

  python -c "from vlmjax.convert import gguf; print(gguf.smollm2_135m_instruct())"   # once -> ~/.cache/vlmjax/...
  python benchmarks/qlora_smollm2.py         # 2-core CPU: ~10 min
  python benchmarks/qlora_smollm2.py --eval_seqs=4 --train_steps=10 --seq_len=128   # quicker

Loss = mean next-token NLL (nats) on held-out windows of the embedded corpus (the CPython docstrings
of ``vlmjax.data.corpus``, tokenized with SmolLM2's own tokenizer), for the decoder with

  fp32   the checkpoint as converted
  bf16   weights stored in bf16, bf16 compute (the baseline the 4-bit base is compared with)
  nf4    ``load_in_4bit``: every projection and the tied embedding in NF4 (blocks of 64, double-quantised
         scales), bf16 compute
  nf4+lora  the nf4 base with LoRA r=16 (alpha 32, every projection) trained --train_steps Adam steps
         (lr 1e-3) on other windows of the corpus; only the adapters train

and the parameter memory of each base (``decoder.memory_table``). Prints a table, writes JSON.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import convert  # noqa: E402
from vlmjax import tree as tree_lib  # noqa: E402
from vlmjax.convert import gguf as gguf_convert  # noqa: E402
from vlmjax.data import corpus  # noqa: E402
from vlmjax.models import decoder as decoder_lib  # noqa: E402
from vlmjax.models import quant as quant_lib  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", "", "SmolLM2 HF directory ('' = the cached conversion of the bundled GGUF).")
flags.DEFINE_integer("seq_len", 256, "Tokens per window.")
flags.DEFINE_integer("eval_seqs", 8, "Held-out windows.")
flags.DEFINE_integer("train_steps", 30, "LoRA steps on the NF4 base (batch --batch_size).")
flags.DEFINE_integer("batch_size", 4, "LoRA training batch.")
flags.DEFINE_string("out", "benchmarks/results/qlora_smollm2.json", "JSON output path.")


def windows(tokenizer, seq_len: int, count: int, offset: int) -> np.ndarray:
    """[count, seq_len + 1] token windows from the embedded corpus, starting at document ``offset``."""
    docs = corpus.embedded_corpus()
    ids: list[int] = []
    for doc in docs[offset:]:
        ids.extend(tokenizer(doc).input_ids + [tokenizer.eos_token_id])
        if len(ids) >= count * (seq_len + 1):
            break
    return np.asarray(ids[: count * (seq_len + 1)], np.int32).reshape(count, seq_len + 1)


def nll(model, variables, toks: np.ndarray) -> float:
    @jax.jit
    def f(variables, t):
        logits, _ = model.apply(variables, t[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1))
    return float(np.mean([f(variables, toks[i:i + 2]) for i in range(0, len(toks), 2)]))


def run(model_dir: str, seq_len: int, eval_seqs: int, train_steps: int, batch_size: int) -> dict:
    spec = convert.build(model_dir)
    tokenizer = convert.load_tokenizer(model_dir)
    _, fp = convert.load_hf(model_dir)
    fp = jax.device_get(fp)
    eval_toks = windows(tokenizer, seq_len, eval_seqs, 0)
    train_toks = windows(tokenizer, seq_len, train_steps * batch_size, 400)
    base = spec.module.config
    rows = []

    def row(name, cfg, variables, **extra):
        t0 = time.perf_counter()
        loss = nll(decoder_lib.Decoder(cfg), variables, eval_toks)
        mem = decoder_lib.memory_table(cfg)
        key = {"fp32": "fp32", "bf16": "bf16"}.get(name, "nf4")
        rows.append({"base": name, "eval_nll": loss, "param_MiB": mem[key] / 2**20,
                     "eval_s": time.perf_counter() - t0, **extra})
        print(rows[-1], flush=True)

    row("fp32", base, {"params": fp})
    bf16 = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16")
    row("bf16", bf16, {"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), fp)})
    nf4 = dataclasses.replace(bf16, load_in_4bit=True, quant_block_size=64)
    abstract = jax.eval_shape(lambda: decoder_lib.Decoder(nf4).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    rest, quant = quant_lib.quantize_params(fp, abstract, nf4.quant)
    rest = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), rest)
    row("nf4", nf4, {"params": rest, "quant": quant})
    bf16_loss = rows[1]["eval_nll"]
    rows[-1]["vs_bf16"] = rows[-1]["eval_nll"] / bf16_loss

    # LoRA on the frozen NF4 base: the fp32 adapters are the only params that change.
    lora = dataclasses.replace(nf4, lora_rank=16, lora_alpha=32.0)
    model = decoder_lib.Decoder(lora)
    init = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))()["params"])
    flat_init, flat_rest = tree_lib.flatten(init), tree_lib.flatten(rest)
    params = tree_lib.unflatten({k: (v.astype(jnp.float32) if k.endswith(("lora_a", "lora_b")) else flat_rest[k])
                                 for k, v in flat_init.items()})
    labels = tree_lib.unflatten({k: ("lora" if k.endswith(("lora_a", "lora_b")) else "frozen") for k in flat_init})
    opt = optax.multi_transform({"lora": optax.adam(1e-3), "frozen": optax.set_to_zero()}, labels)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, t):
        def loss_fn(p):
            logits, _ = model.apply({"params": p, "quant": quant}, t[:, :-1])
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
            return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1))
        loss, g = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    for i in range(train_steps):
        params, opt_state, loss = step(params, opt_state, train_toks[i * batch_size:(i + 1) * batch_size])
    train_s = time.perf_counter() - t0
    row("nf4+lora", lora, {"params": params, "quant": quant}, train_steps=train_steps,
        train_s=train_s, last_train_nll=float(loss))
    rows[-1]["vs_bf16"] = rows[-1]["eval_nll"] / bf16_loss
    return {"rows": rows, "seq_len": seq_len, "eval_seqs": eval_seqs, "batch_size": batch_size}


def main(argv):
    del argv
    path = FLAGS.model_dir or gguf_convert.smollm2_135m_instruct()
    res = run(path, FLAGS.seq_len, FLAGS.eval_seqs, FLAGS.train_steps, FLAGS.batch_size)
    print(f"\nSmolLM2-135M-Instruct, {FLAGS.eval_seqs} held-out windows x {FLAGS.seq_len} tokens of the embedded corpus")
    common.print_table(res["rows"], ["base", "param_MiB", "eval_nll", "vs_bf16", "train_steps", "train_s"])
    common.write_json(FLAGS.out, {"device": common.device_info(), "machine": common.machine_info(), **res})


if __name__ == "__main__":
    app.run(main)
