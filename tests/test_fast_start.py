"""Starting from a checkpoint (issue 13 part 5): the checkpoint's arrays go into the state as they are,
and only the params it lacks (routers, LoRA adapters) are initialised; the random init of the params it
has is neither compiled nor run."""

import glob
import os
import re

import jax
import numpy as np
import pytest
from conftest import load_config
from safetensors.numpy import load_file, save_file

from vlmjax import convert
from vlmjax import sharding as shd
from vlmjax import tasks
from vlmjax import tree
from vlmjax.train import trainer as trainer_lib

# Call sites of the threefry hash (every jax.random draw, split and fold_in of the default PRNG) and
# any rng_bit_generator, in StableHLO text.
_RNG_OP = re.compile(r"call @threefry2x32\w*\(|stablehlo\.rng_bit_generator")
_SMALL = {"data.seq_len": 32, "model.dtype": "float32", "sample.max_new_tokens": 0, "eval.max_batches": 1}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny random 4-layer Llama (tied embeddings) saved by transformers, with a tokenizer; its norm
    scales are random too (not the ones an init gives), so no tensor of it equals a fresh init."""
    from test_convert_llama import _hf_model, _with_tokenizer
    tmp = tmp_path_factory.mktemp("fast_start")
    _, path = _hf_model("llama_tied", tmp, vocab_size=320, num_hidden_layers=4, bos_token_id=1,
                        eos_token_id=2)
    file = os.path.join(path, "model.safetensors")
    tensors = load_file(file)
    rng = np.random.default_rng(0)
    for k, v in tensors.items():
        if v.ndim == 1:
            tensors[k] = (v + rng.uniform(0.1, 0.5, v.shape)).astype(v.dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    _with_tokenizer(path)
    return path


def _trainer(name, variant, path, tmp_path):
    cfg = load_config(name, variant, init_from=path, batch_size=4, **_SMALL)
    task = tasks.build(cfg, str(tmp_path))
    return task, trainer_lib.Trainer(cfg, task, shd.make_mesh(cfg.mesh))


def _loaded(task, tr):
    return task.pretrained_params(tr.abstract_state.params, tr.state_shardings.params)


def _flat_np(params):
    return {k: np.asarray(v) for k, v in tree.flatten(params).items()}


def _init_rng_ops(tmp_path, fn) -> int:
    """Runs ``fn`` with jax dumping every module it compiles; returns the random-number ops in the
    compiled train-state init (``Trainer._init_state``), i.e. what the start really runs."""
    dump = tmp_path / f"ir_{len(list(tmp_path.glob('ir_*')))}"
    jax.config.update("jax_dump_ir_to", str(dump))
    try:
        jax.block_until_ready(fn())
    finally:
        jax.config.update("jax_dump_ir_to", os.environ.get("JAX_DUMP_IR_TO", ""))
    files = glob.glob(str(dump / "*_init_state*"))
    assert len(files) == 1, sorted(os.listdir(dump))
    with open(files[0]) as f:
        return len(_RNG_OP.findall(f.read()))


def test_checkpoint_start_keeps_every_checkpoint_tensor_and_inits_only_the_rest(ckpt, tmp_path):
    """dtf:pretrained_lora: every param the checkpoint has is its tensor exactly (read here straight
    from the safetensors file through the mapping table), and the routers and LoRA adapters it lacks
    have the values the random init with the same seed gives them."""
    task, tr = _trainer("dtf", "pretrained_lora", ckpt, tmp_path)
    random_init = _flat_np(tr.init().params)
    state = tr.init(_loaded(task, tr))
    got = _flat_np(state.params)
    assert set(got) == set(random_init)

    file = load_file(os.path.join(ckpt, "model.safetensors"))
    spec = convert.build(ckpt)
    from_ckpt = {r.flax: r.transform.to_flax(file[r.hf], got[r.flax].shape) for r in spec.rules
                 if r.hf in file}
    assert len(from_ckpt) == 2 + 9 * 4  # embedding, final norm; 9 tensors a layer
    for k, want in from_ckpt.items():
        np.testing.assert_array_equal(got[k], want, err_msg=k)
        assert not np.array_equal(got[k], random_init[k]), k  # the init does not give them by chance

    rest = sorted(set(got) - set(from_ckpt))
    assert any(k.startswith("routers_") for k in rest) and any("lora_a" in k for k in rest)
    assert all(k.startswith("routers_") or "lora_" in k for k in rest), rest
    for k in rest:
        np.testing.assert_array_equal(got[k], random_init[k], err_msg=k)
    # The optimizer state is that of the final params (here: same structure, moments at zero).
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(tr.init().opt_state)


def test_checkpoint_start_compiles_no_random_init_for_loaded_params(ckpt, tmp_path):
    """The compiled init-from-checkpoint has no random-number op for a param the checkpoint has: a
    dense decoder whose every param is in the checkpoint draws nothing but the state's own rng split;
    the routed one only its routers' init. Initialising everything and then overwriting it (the old
    start) compiles the full init's ops and fails both."""
    split_only = len(_RNG_OP.findall(jax.jit(jax.random.split).lower(jax.random.PRNGKey(0)).as_text()))

    task, tr = _trainer("lm", "finetune", ckpt, tmp_path)
    full = _init_rng_ops(tmp_path, tr.init)
    task, tr = _trainer("lm", "finetune", ckpt, tmp_path)
    loaded = _loaded(task, tr)
    assert len(jax.tree.leaves(loaded)) == len(jax.tree.leaves(tr.abstract_state.params))
    from_ckpt = _init_rng_ops(tmp_path, lambda: tr.init(loaded))
    assert split_only >= 1 and full > split_only, (full, split_only)
    assert from_ckpt == split_only, (from_ckpt, split_only, full)

    task, tr = _trainer("dtf", "pretrained", ckpt, tmp_path)
    routed_full = _init_rng_ops(tmp_path, tr.init)
    task, tr = _trainer("dtf", "pretrained", ckpt, tmp_path)
    loaded = _loaded(task, tr)
    routed = _init_rng_ops(tmp_path, lambda: tr.init(loaded))
    # The routers' init is left (the count is of call sites, which same-shaped draws share).
    assert split_only < routed < routed_full, (routed, split_only, routed_full)


def test_pretrained_arrays_that_do_not_fit_are_one_clear_error(ckpt, tmp_path):
    task, tr = _trainer("lm", "finetune", ckpt, tmp_path)
    loaded = tree.flatten(_loaded(task, tr))
    loaded["layers_0/mlp/up_proj/kernel"] = loaded["layers_0/mlp/up_proj/kernel"][:, :8]
    loaded["layers_0/nope"] = loaded["norm/scale"]
    with pytest.raises(ValueError, match=r"2 pretrained param array\(s\) do not fit the model: "
                                         r"layers_0/mlp/up_proj/kernel: float32\[48, 8\] vs the model's "
                                         r"float32\[48, 80\]; layers_0/nope \(no such param\)"):
        tr.init(tree.unflatten(loaded))
