r"""QLoRA on the real SmolLM2-135M-Instruct, offline: the NF4 base's loss vs bf16, and LoRA on the NF4 base.

  python -c "from vlmjax.convert import gguf; print(gguf.smollm2_135m_instruct())"   # once -> ~/.cache/vlmjax/...
  python benchmarks/qlora_smollm2.py         # 2-core CPU: ~20 min
  python benchmarks/qlora_smollm2.py --eval_seqs=4 --train_steps=10 --seq_len=128   # quicker

Loss = mean next-token NLL (nats) on held-out windows of the embedded corpus (the CPython docstrings
of ``vlmjax.data.corpus``, tokenized with SmolLM2's own tokenizer), for the decoder with

  fp32   the checkpoint as converted
  bf16   weights stored in bf16, bf16 compute (the baseline the 4-bit bases are compared with)
  nf4    ``load_in_4bit``: every projection and the tied embedding (SmolLM2's LM head too) in NF4
         (blocks of 64, double-quantised scales), bf16 compute
  nf4+lora  the nf4 base with LoRA r=16 (alpha 32, every projection) trained --train_steps Adam steps
         (lr 1e-3) on other windows of the corpus; only the adapters train (``train_lora``)
  nf4 (bf16 embedding)  ``quant_embeddings=False``, bitsandbytes' / QLoRA's recipe: every projection
         NF4 (blocks of 64, double-quantised), the tied embedding / LM head kept in bf16
  nf4 (bf16 embedding)+lora  that base with the same LoRA recipe
  nf4 block 32  as nf4 (embedding quantised) with ``quant_block_size=32``

and the parameter memory of each base (``decoder.memory_table`` of the row's config: the quant
collection + the rest at bf16 for the 4-bit rows; adapters not counted), ``mem_vs_bf16`` its ratio
to bf16, ``vs_bf16`` each 4-bit row's NLL over bf16's. Prints a table, writes JSON.
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


def token_nll(model, variables, t):
    """Mean next-token NLL of ``t`` [B, T + 1] under ``model``."""
    logits, _ = model.apply(variables, t[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    return -jnp.mean(jnp.take_along_axis(logp, t[:, 1:, None], -1))


def nll(model, variables, toks: np.ndarray) -> float:
    f = jax.jit(lambda variables, t: token_nll(model, variables, t))
    return float(np.mean([f(variables, toks[i:i + 2]) for i in range(0, len(toks), 2)]))


def quantize(cfg: decoder_lib.DecoderConfig, fp) -> tuple[dict, dict]:
    """``(params, quant)`` of ``cfg``'s 4-bit model from the fp checkpoint; what stays in params
    (norms; the embedding when ``quant_embeddings=False``) is cast to bf16 like the bf16 row."""
    abstract = jax.eval_shape(lambda: decoder_lib.Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))
    rest, quant = quant_lib.quantize_params(fp, abstract, cfg.quant)
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), rest), quant


def train_lora(cfg, rest, quant, train_toks: np.ndarray, train_steps: int, batch_size: int):
    """LoRA r=16 (alpha 32, every projection) on the frozen 4-bit base ``(rest, quant)`` of ``cfg``:
    ``train_steps`` Adam steps (lr 1e-3) on batches of ``train_toks``; only the fp32 adapters
    change. Returns (the LoRA config, its params, the row's training fields)."""
    lora = dataclasses.replace(cfg, lora_rank=16, lora_alpha=32.0)
    model = decoder_lib.Decoder(lora)
    init = nn.meta.unbox(jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32)))()["params"])
    is_adapter = lambda k: k.endswith(("lora_a", "lora_b"))
    flat_init, flat_rest = tree_lib.flatten(init), tree_lib.flatten(rest)
    adapters = {k: v.astype(jnp.float32) for k, v in flat_init.items() if is_adapter(k)}
    frozen = dict(flat_rest)
    assert set(frozen) == {k for k in flat_init if not is_adapter(k)}, "LoRA model's params != base params + adapters"
    opt = optax.adam(1e-3)
    opt_state = opt.init(adapters)

    @jax.jit
    def step(adapters, opt_state, frozen, quant, t):  # the base is an argument, not a jit constant
        loss_fn = lambda a: token_nll(model, {"params": tree_lib.unflatten({**frozen, **a}), "quant": quant}, t)
        loss, g = jax.value_and_grad(loss_fn)(adapters)
        updates, opt_state = opt.update(g, opt_state, adapters)
        return optax.apply_updates(adapters, updates), opt_state, loss

    t0 = time.perf_counter()
    loss = float("nan")
    for i in range(train_steps):
        batch = train_toks[i * batch_size:(i + 1) * batch_size]
        adapters, opt_state, loss = step(adapters, opt_state, frozen, quant, batch)
    train_s = time.perf_counter() - t0
    params = tree_lib.unflatten({**frozen, **adapters})
    return lora, params, {"train_steps": train_steps, "train_s": train_s, "last_train_nll": float(loss)}


def run(model_dir: str, seq_len: int, eval_seqs: int, train_steps: int, batch_size: int) -> dict:
    spec = convert.build(model_dir)
    tokenizer = convert.load_tokenizer(model_dir)
    _, fp = convert.load_hf(model_dir)
    fp = jax.device_get(fp)
    eval_toks = windows(tokenizer, seq_len, eval_seqs, 0)
    train_toks = windows(tokenizer, seq_len, train_steps * batch_size, 400)
    base = spec.module.config
    rows = []

    def row(name, cfg, variables, key="nf4", **extra):
        """Evaluates one row; ``key`` picks its bytes from ``memory_table(cfg)`` ("nf4": the quant
        collection of cfg's 4-bit model + the rest at bf16)."""
        t0 = time.perf_counter()
        loss = nll(decoder_lib.Decoder(cfg), variables, eval_toks)
        mem = decoder_lib.memory_table(cfg)
        r = {"base": name, "eval_nll": loss, "param_MiB": mem[key] / 2**20,
             "mem_vs_bf16": mem[key] / mem["bf16"], "eval_s": time.perf_counter() - t0, **extra}
        if key == "nf4":
            r["vs_bf16"] = loss / rows[1]["eval_nll"]
        rows.append(r)
        print(r, flush=True)

    row("fp32", base, {"params": fp}, key="fp32")
    bf16 = dataclasses.replace(base, dtype="bfloat16", param_dtype="bfloat16")
    row("bf16", bf16, {"params": jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), fp)}, key="bf16")
    for name, nf4, lora in [
        ("nf4", dataclasses.replace(bf16, load_in_4bit=True, quant_block_size=64), True),
        ("nf4 (bf16 embedding)", dataclasses.replace(bf16, load_in_4bit=True, quant_block_size=64,
                                                     quant_embeddings=False), True),
        ("nf4 block 32", dataclasses.replace(bf16, load_in_4bit=True, quant_block_size=32), False),
    ]:
        rest, quant = quantize(nf4, fp)
        row(name, nf4, {"params": rest, "quant": quant})
        if lora:
            lora_cfg, params, extra = train_lora(nf4, rest, quant, train_toks, train_steps, batch_size)
            row(name + "+lora", lora_cfg, {"params": params, "quant": quant}, **extra)
    return {"rows": rows, "seq_len": seq_len, "eval_seqs": eval_seqs, "batch_size": batch_size}


def main(argv):
    del argv
    path = FLAGS.model_dir or gguf_convert.smollm2_135m_instruct()
    res = run(path, FLAGS.seq_len, FLAGS.eval_seqs, FLAGS.train_steps, FLAGS.batch_size)
    print(f"\nSmolLM2-135M-Instruct, {FLAGS.eval_seqs} held-out windows x {FLAGS.seq_len} tokens of the embedded corpus")
    common.print_table(res["rows"], ["base", "param_MiB", "mem_vs_bf16", "eval_nll", "vs_bf16", "train_steps", "train_s"])
    common.write_json(FLAGS.out, {"device": common.device_info(), "machine": common.machine_info(), **res})


if __name__ == "__main__":
    app.run(main)
