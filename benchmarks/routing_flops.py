r"""FLOPs and step time of routed decoders (MoD, DTF, TDTF) against the dense decoder of the same shape.

  python benchmarks/routing_flops.py                                   # CPU default (~23 min, 2 cores*)
  python benchmarks/routing_flops.py --shapes=smollm2_135m,qwen25_05b --time_large --dtype=bfloat16  # GPU

  * 1277 s and 1363 s on a 2-core Xeon VM on 2026-12-03 while another job kept one core busy; about
    190 s of it is the decoding benchmark (--no_decode skips it). The earlier run without decoding,
    on a quiet machine, took 281 s.

For every shape and model (dense; MoD at --mod_capacity every other layer; DTF at gamma --dtf_capacity;
TDTF at --tdtf_capacity; all ``every=2, offset=1``, so layers 1, 3, 5, ... are routed and, for DTF,
layers 0, 2, 4, ... are its dense decision layers with a PriorFFN) it reports:

- forward FLOPs per token of the training ("topk") forward, from XLA (``cost_analysis()`` of the
  compiled jitted forward on this backend) and from ``vlmjax.flops.routed_decoder_forward_flops``;
- inference ("causal") forward FLOPs per token. The causal path processes a data-dependent number of
  tokens under a static cap ``floor(c T)``; the compiled program always computes the cap. Every
  routed model is built with the default ``causal_capacity='auto'``: c = min(1, capacity +
  causal_margin) = capacity + 0.125 here (MoD 0.25, DTF / TDTF 0.625);
- train-step FLOPs: XLA of ``jit(value_and_grad(loss))`` (loss = LM cross-entropy + ``router_loss``,
  as ``tasks/routed_lm.py``) and ``routed_decoder_train_flops`` (3x the training forward);
- XLA / analytic ratios and ratios vs dense (with the LM head, and without it: the analytic head
  2 T d V is subtracted from both counts);
- wall time of the forward, the inference forward and the train step, as ratios vs dense measured
  in the same run: every compiled function of the shape is called once per round, round-robin, for
  --warmup untimed and --iters timed rounds (each call ``block_until_ready``), and the median per
  function is reported, so a slow phase of a shared machine affects all models alike. On CPU the
  large shapes are counted but not timed unless --time_large.

Router overhead (``overhead`` table). Method: the routed layer's own code path
(``RoutedDecoder._mod_layer`` / ``_dtf_layer`` / ``_tdtf_layer``, plus for DTF the decision layer's
PriorFFN, L_prior, D_st and D_ch) is run with the decoder block replaced by the identity, so what is
left is exactly the non-block work: router scores, surprise criteria and moving average, causal
router, BCE / MSE side losses, top_k, gather, gate multiply and scatter-add. Its XLA FLOPs and
median time (forward, and forward+backward w.r.t. the parameters and input; round-robin rounds
as above, --overhead_iters of them; on the large untimed shapes the forward only, over
--overhead_iters_large rounds) are divided by those of
one dense ``DecoderBlock`` on all T tokens at the same shape. Target: <= 10%.

Inference (``inference`` rows of the JSON, "Inference" in the report), per shape and model:

- prefill: the causal forward above as a prefill of T tokens: XLA and analytic FLOPs per token,
  ratios vs dense, the static cap floor(c T) per routed layer, its time ratio vs dense;
- decoding (timed shapes only, and not with --no_time / --no_decode): batch-1 generation with
  ``vlmjax.models.generate.generate``, a random --decode_prompt-token prompt (32) then
  --decode_tokens new tokens (64), compiled once, the median of --decode_iters calls per model
  timed round-robin across the models (as above); tokens/s and its ratio vs dense. Decoding runs
  a routed block on a step only if the token was chosen (``nn.cond``); generate's prefill of the
  prompt runs the routed blocks masked over the whole prompt.
  Tokens are sampled at --decode_temperature 1.0, not greedy: greedy decoding of an untrained
  model repeats one token (its own tied embedding is the argmax), so every step's router input is
  the same and a router chooses all or none of the steps.
  Router rate: untrained causal routers are random, so each routed model's routers are set so that
  about ``capacity`` of the decode steps' tokens are wanted (causal logit > 0), layer by layer in
  order (``calibrate_causal_rate``): DTF / TDTF: the causal router's bias -= the (1 - capacity)
  quantile of its logits; MoD (``mod_causal='aux'``: the causal logit is the router logit
  r = w^T x, no bias): w -= beta |w| m with m the unit mean of the layer's inputs, which at init
  share a large common component, so the term acts as a bias; beta is chosen for the rate. The
  rate is set on the sequence being decoded (its causal forward, positions P..P+N-2), which is then
  generated again with the same key, --decode_calib_rounds (2) times: at init one sequence's
  logits share a large per-sequence offset, so a rate set on other random sequences does not carry
  over to a single decoded sequence (it ranged over ~0-0.8 at a population rate of 0.125-0.5).
  Measured: the fraction of the decode steps (the N - 1 generated tokens fed back) whose token each
  routed layer wanted and ran, from a step-by-step re-run of generate's decoding on its tokens
  (each step's "intermediates"; checked against the cache's per-layer "chosen" counters, against
  generate's sampled tokens, and against the one-piece causal forward of the sequence), the
  fraction of routed-block executions skipped, and the analytic FLOPs of one decode step at the
  measured fractions (``decode_step_flops``: every layer at
  ``flops.decoder_layer_forward_flops(cfg, 1, kv_tokens=P + N)``, the attention running over the
  whole KV cache, routed layers times their ran fraction, plus the router terms and the LM head).

Outputs: tables printed and written as markdown (``<out>.md``), JSON (``<out>.json``) and a PNG plot
(``<out>.png``, when matplotlib is importable: ``pip install -e .[bench]``).
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import linen as nn  # noqa: E402

from benchmarks import common  # noqa: E402
from vlmjax import flops as flops_lib  # noqa: E402
from vlmjax.models import decoder as decoder_lib  # noqa: E402
from vlmjax.models import routed_decoder  # noqa: E402
from vlmjax.models import routing as R  # noqa: E402

_CPU = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=64, vocab_size=2048, rope_theta=10000.0,
            tie_word_embeddings=True)
# name -> (decoder fields, seq_len, timed on CPU by default)
SHAPES: dict[str, tuple[dict[str, Any], int, bool]] = {
    "cpu": (_CPU, 128, True),                                       # configs/lm.py default decoder
    "cpu12": ({**_CPU, "num_hidden_layers": 12}, 256, True),         # 12 layers: the MoD ~0.55x check
    "smollm2_135m": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                          rope_theta=100000.0, tie_word_embeddings=True), 2048, False),
    "qwen25_05b": (dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                        num_attention_heads=14, num_key_value_heads=2, head_dim=64, vocab_size=151936,
                        rope_theta=1000000.0, attention_bias=True, tie_word_embeddings=True), 2048, False),
}
MODELS = ("dense", "mod", "dtf", "tdtf")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="cpu,cpu12,smollm2_135m,qwen25_05b",
                   help=f"Comma-separated shapes among {list(SHAPES)}.")
    p.add_argument("--models", default=",".join(MODELS), help=f"Comma-separated among {MODELS}.")
    p.add_argument("--batch", type=int, default=4, help="Sequences per step for the CPU shapes.")
    p.add_argument("--large_batch", type=int, default=1,
                   help="Sequences per step for smollm2_135m / qwen25_05b (FLOPs are reported per token).")
    p.add_argument("--iters", type=int, default=10,
                   help="Timed rounds (one call of every model per round); the median is reported.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed rounds before timing.")
    p.add_argument("--overhead_iters", type=int, default=30,
                   help="Timed rounds of the (cheap) router-overhead measurement.")
    p.add_argument("--overhead_iters_large", type=int, default=7,
                   help="Timed rounds of the router-overhead forward on the untimed (large) shapes.")
    p.add_argument("--time_large", action="store_true",
                   help="Also time the large shapes (default: only off CPU).")
    p.add_argument("--no_time", action="store_true", help="FLOP counts only, no timing (and no decoding).")
    p.add_argument("--no_decode", action="store_true", help="Skip the batch-1 decoding benchmark.")
    p.add_argument("--decode_prompt", type=int, default=32, help="Prompt tokens of the decoding benchmark.")
    p.add_argument("--decode_tokens", type=int, default=64, help="New tokens generated per call.")
    p.add_argument("--decode_temperature", type=float, default=1.0,
                   help="Sampling temperature of the decoding benchmark (0 = greedy; see the docstring: "
                        "greedy decoding of random weights repeats one token).")
    p.add_argument("--decode_iters", type=int, default=10,
                   help="Timed rounds of generate (one call of every model per round); the median is reported.")
    p.add_argument("--decode_calib_rounds", type=int, default=2,
                   help="Rounds of (set the routers' rate on the decoded sequence, decode again); see the docstring.")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="Compute dtype.")
    p.add_argument("--mod_capacity", type=float, default=0.125, help="MoD capacity (paper: 12.5%%).")
    p.add_argument("--dtf_capacity", type=float, default=0.5, help="DTF gamma (spec default 0.5).")
    p.add_argument("--tdtf_capacity", type=float, default=0.5, help="TDTF capacity.")
    p.add_argument("--out", default="benchmarks/results/routing_flops_cpu",
                   help="Output prefix: writes <out>.json, <out>.md and <out>.png.")
    args = p.parse_args(argv)
    for name, allowed in (("shapes", SHAPES), ("models", MODELS)):
        vals = [s for s in getattr(args, name).split(",") if s]
        bad = [s for s in vals if s not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}; choose from {list(allowed)}.")
        setattr(args, name, vals)
    if args.decode_prompt < 1 or args.decode_tokens < 2:
        p.error("--decode_prompt must be >= 1 and --decode_tokens >= 2.")
    if "dense" not in args.models:
        args.models = ["dense", *args.models]  # every ratio is vs dense
    return args


# ------------------------------------------------------------------------------------------------
# Models and functions
# ------------------------------------------------------------------------------------------------

def build_model(kind: str, cfg: decoder_lib.DecoderConfig, args) -> tuple[Any, R.RoutingConfig | None]:
    if kind == "dense":
        return decoder_lib.Decoder(cfg), None
    cap = {"mod": args.mod_capacity, "dtf": args.dtf_capacity, "tdtf": args.tdtf_capacity}[kind]
    # The default causal_capacity ('auto'): the causal forward's static cap is floor(c T) with
    # c = min(1, capacity + causal_margin) (see docstring).
    rc = R.RoutingConfig(kind=kind, capacity=cap, beta="scheduled" if kind == "tdtf" else "learned")
    return routed_decoder.build(cfg, rc), rc


def make_fns(model, routed: bool) -> dict[str, Callable]:
    """forward (training "topk" selection), inference ("causal"), train (value_and_grad of the loss)."""
    progress = jnp.asarray(0.5, jnp.float32)

    def forward(variables, tokens, mode="topk"):
        if not routed:
            return model.apply(variables, tokens)[0]
        return model.apply(variables, tokens, mode=mode, progress=progress)[0]

    def loss(params, state, tokens):
        # LM cross-entropy (+ router_loss), as tasks/lm.py and tasks/routed_lm.py.
        targets = jnp.roll(tokens, -1, axis=1)
        if routed:
            (logits, aux), new_state = model.apply({"params": params, **state}, tokens, mode="topk",
                                                   progress=progress, mutable=[R.ROUTER_STATE])
            extra = aux["router_loss"]
        else:
            (logits, _), new_state, extra = model.apply({"params": params, **state}, tokens), state, 0.0
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()
        return ce + extra, new_state

    def train(variables, tokens):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        return jax.value_and_grad(loss, has_aux=True)(params, state, tokens)

    return {"forward": forward, "inference": lambda v, t: forward(v, t, "causal"), "train": train}


def xla_flops(fn, *args) -> tuple[float | None, Any]:
    compiled = jax.jit(fn).lower(*args).compile()
    return common.compiled_flops(compiled), compiled


def interleaved_times(calls: dict[Any, tuple[Any, tuple]], warmup: int, iters: int) -> dict[Any, list[float]]:
    """Seconds of every timed call of each compiled function, each call blocked until ready.

    The functions are timed round-robin (one call of each per round, ``iters`` rounds after ``warmup``
    rounds), so a slow phase of a shared machine hits every model alike and the ratios stay fair.

    Args:
        calls: name -> (compiled executable, its arguments).
    """
    times: dict[Any, list[float]] = {k: [] for k in calls}
    for i in range(warmup + iters):
        for name, (compiled, args) in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def interleaved_median_times(calls: dict[Any, tuple[Any, tuple]], warmup: int, iters: int) -> dict[Any, float]:
    """Median seconds per call of ``interleaved_times``."""
    return {k: statistics.median(v) for k, v in interleaved_times(calls, warmup, iters).items()}


# ------------------------------------------------------------------------------------------------
# Router overhead: the routed layer's code path with an identity block
# ------------------------------------------------------------------------------------------------

def _identity_block(x, positions, key_valid, decode):
    del positions, key_valid, decode
    return x, {}


def router_only(module, x, progress):
    """Non-block work of the first routed layer (``RoutedDecoder`` internals, block = identity).

    x: [B, T, D] -> (output [B, T, D], side loss scalar). MoD: router scores, top_k, gather, gate,
    scatter-add, BCE. DTF: the decision layer's PriorFFN, L_prior, D_st, D_ch (the identity stands for
    that layer's block update) and the dynamic layer's MA, criteria, causal router, top_k, gather,
    scatter-add, BCE. TDTF: causal router, transition net, D_st / D_ch / MA / criteria, top_k, BCE
    (its teacher block runs on all tokens, so no gather / scatter in training).
    """
    b, t, _ = x.shape
    rc = module.routing
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    valid = jnp.ones((b, t), jnp.bool_)
    losses: dict[str, list] = collections.defaultdict(list)
    key = str(rc.dynamic_layers(module.config.num_hidden_layers)[0])
    if rc.kind == "mod":
        y, _ = module._mod_layer(key, _identity_block, x, positions, None, valid, False, "topk", progress,
                                 losses)
    elif rc.kind == "dtf":
        router = module.routers[key]
        update = x                                    # stands for the decision layer's Block_l(H)
        h_post = x + update
        h_prior = router.predict(x)                   # H + PriorFFN(RMSNorm(H))
        losses["prior"].append(R.masked_mean(R.mean_sq(h_prior, jax.lax.stop_gradient(h_post)), valid))
        pending = (R.mean_sq(update), module._d_ch(h_post, h_prior))
        y, _ = module._dtf_layer(key, _identity_block, h_post, positions, None, valid, False, "topk",
                                 progress, pending, losses)
    else:
        y, _ = module._tdtf_layer(key, _identity_block, x, positions, None, valid, False, "topk",
                                  progress, losses)
    side = sum(jnp.mean(jnp.stack(v)) for v in losses.values())
    return y, side


def dense_block(module, x):
    b, t, _ = x.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    update, _ = module.layers[0](x, positions, None, False)
    return x + update


def overhead_pair(module, x, progress):
    """Both sides of the overhead ratio; ``init`` with this method creates only their variables."""
    return router_only(module, x, progress), dense_block(module, x)


def measure_overhead(model, x, modes: tuple[str, ...], iters: int, args) -> dict[str, Any]:
    """XLA FLOPs of ``router_only`` / ``dense_block`` (forward and fwd+bwd) and, for ``modes`` (a
    subset of ('fwd', 'train')), their median times over ``iters`` round-robin rounds.

    Only the variables of the first routed layer's router and of layer 0 are initialised (``init``
    with ``method=overhead_pair``), so the large shapes need no full parameter set.

    Args:
        x: [B, T, D] residual stream (a ``jax.ShapeDtypeStruct`` when nothing is timed).
    """
    progress = jnp.asarray(0.5, jnp.float32)
    init = lambda x: model.init(jax.random.key(1), x, progress, method=overhead_pair)
    variables = init(x) if modes else jax.eval_shape(init, x)

    def rfwd(v, x):
        return model.apply(v, x, progress, method=router_only)

    def bfwd(v, x):
        return model.apply(v, x, method=dense_block)

    def rtrain(v, x):
        def f(p, x):
            y, side = model.apply({**v, "params": p}, x, progress, method=router_only)
            return jnp.mean(y.astype(jnp.float32) ** 2) + side
        return jax.grad(f, argnums=(0, 1))(v["params"], x)

    def btrain(v, x):
        def f(p, x):
            return jnp.mean(model.apply({**v, "params": p}, x, method=dense_block).astype(jnp.float32) ** 2)
        return jax.grad(f, argnums=(0, 1))(v["params"], x)

    out: dict[str, Any] = {}
    calls = {}
    for name, (rf, bf) in (("fwd", (rfwd, bfwd)), ("train", (rtrain, btrain))):
        rflops, rc_ = xla_flops(rf, variables, x)
        bflops, bc_ = xla_flops(bf, variables, x)
        out[f"{name}_flops_pct"] = None if not (rflops and bflops) else 100.0 * rflops / bflops
        calls[f"{name}_router"], calls[f"{name}_block"] = (rc_, (variables, x)), (bc_, (variables, x))
    if modes:
        times = interleaved_times({k: v for k, v in calls.items() if k.split("_")[0] in modes},
                                  args.warmup, iters)
        t = {k: statistics.median(v) for k, v in times.items()}
        for name in modes:
            out[f"{name}_time_pct"] = 100.0 * t[f"{name}_router"] / t[f"{name}_block"]
            # Fastest call of each: less sensitive to other processes preempting a sub-ms call.
            out[f"{name}_time_pct_min"] = 100.0 * min(times[f"{name}_router"]) / min(times[f"{name}_block"])
            out[f"{name}_block_ms"] = t[f"{name}_block"] * 1e3
    return out


# ------------------------------------------------------------------------------------------------
# Inference: causal prefill FLOPs and batch-1 decoding
# ------------------------------------------------------------------------------------------------

def routed_keys(cfg, rc) -> list[str]:
    return [str(i) for i in rc.dynamic_layers(cfg.num_hidden_layers)]


def _mod_bias_beta(a: np.ndarray, b: np.ndarray, rate: float) -> float:
    """beta with mean(a - beta b > 0) closest to ``rate`` (a, b: [N]); tried at the midpoints of
    the sorted crossing points a / b, where the fraction changes."""
    with np.errstate(divide="ignore", invalid="ignore"):
        cross = np.sort((a / b)[np.abs(b) > 0])
    cand = np.concatenate([[cross[0] - 1.0], (cross[1:] + cross[:-1]) / 2, [cross[-1] + 1.0]])
    frac = np.stack([(a - c * b > 0).mean() for c in cand])
    return float(cand[np.argmin(np.abs(frac - rate))])


def calibrate_causal_rate(model, rc, variables, tokens, rate: float, window: tuple[int, int]
                          ) -> tuple[dict, dict[str, float]]:
    """Router parameters edited so that about ``rate`` of the tokens at positions ``window`` (the
    decode steps: the hidden states drift with the position) are wanted (causal logit > 0).

    An untrained model's causal routers are random; this sets their decision rate. Routed layers
    are calibrated in order (a layer's input depends on the earlier layers' choices), each from one
    causal forward on ``tokens`` (random token ids, [B, T]) with the earlier layers already set,
    counting the tokens at positions ``window[0] <= p < window[1]``:
      - DTF / TDTF: the causal router's ``bias`` -= the (1 - rate) quantile of its logits;
      - MoD, ``mod_causal='aux'`` (the causal logit is the router logit r = w^T x, no bias): the
        kernel w <- w - beta |w| m, m the unit mean of the layer's inputs x over ``tokens``. The
        hidden states share a large common component (x . m > 0 for ~98% of the tokens at init),
        so the new term acts as a per-token bias; beta is chosen so that ``rate`` of the tokens
        have r > 0 (r also scales MoD's routed update: it stays of the init's size);
      - MoD predictor: the predictor's output bias, as DTF.

    Args:
        variables: unboxed variables (``nn.meta.unbox``).

    Returns:
        (variables with the edited "params", {layer: wanted fraction in the window afterwards}).
    """
    keys = routed_keys(model.config, rc)
    lo, hi = window
    inputs: dict[str, Any] = {}

    def grab_router_input(f, args, kwargs, ctx):
        if isinstance(ctx.module, R.MoDRouter) and ctx.method_name == "__call__":
            inputs[ctx.module.name] = args[0]
        return f(*args, **kwargs)

    @jax.jit
    def probe(params):
        inputs.clear()
        with nn.intercept_methods(grab_router_input):
            _, st = model.apply({**variables, "params": params}, tokens, mode="causal",
                                mutable=["intermediates"])
        logits = {k: st["intermediates"][f"router_{k}"][0]["causal_logit"] for k in keys}
        return logits, {k: inputs[f"routers_{k}"] for k in keys if f"routers_{k}" in inputs}

    params = jax.tree.map(np.asarray, variables["params"])  # host copies, edited in place below
    for k in keys:
        logits, xs = probe(params)
        lg = np.asarray(logits[k], np.float64)[:, lo:hi].ravel()
        router = params[f"routers_{k}"]
        if rc.kind == "mod" and rc.mod_causal == "aux":
            w0 = np.asarray(router["router"]["kernel"], np.float64)[:, 0]
            x = np.asarray(xs[k], np.float64)[:, lo:hi].reshape(-1, w0.shape[0])
            m = x.mean(0)
            m /= np.linalg.norm(m)
            a, b = x @ w0, (x @ m) * np.linalg.norm(w0)
            beta = _mod_bias_beta(a, b, rate)
            w = w0 - beta * np.linalg.norm(w0) * m
            router["router"]["kernel"] = w[:, None].astype(router["router"]["kernel"].dtype)
        else:
            leaf = router["predictor_out"] if rc.kind == "mod" else router["causal"]
            q = np.quantile(lg, 1.0 - rate)
            leaf["bias"] = (leaf["bias"] - q).astype(leaf["bias"].dtype)
    logits, _ = probe(params)
    wanted = {k: float(np.mean(np.asarray(logits[k])[:, lo:hi] > 0)) for k in keys}
    return {**variables, "params": jax.tree.map(jnp.asarray, params)}, wanted


def decode_trace(model, rc, variables, tokens, prompt_len: int, rng, temperature: float) -> dict[str, Any]:
    """Per-step routing decisions of ``generate``'s decoding, re-run step by step on its tokens.

    Prefill of the prompt in decode mode, then one decode step per generated token but the last
    (generate never feeds its last token back), teacher-forced with ``tokens`` (the output of
    ``generate``, [1, P + N]), sampling each step's next token as ``generate`` does so the run can be
    checked against it. Decisions come from the "intermediates" of each step and the per-layer
    "chosen" counters of the decode cache (``CausalBudget``); the causal forward of the same
    sequence is run too, to check that it chooses exactly the decode's tokens.

    Returns:
        dict: ``selected`` / ``wanted`` {layer: [N - 1] bool} of the decode steps, ``chosen_prompt``
        and ``chosen_decode`` {layer: count} from the cache counters, ``tokens_match`` (the re-run
        samples generate's tokens), ``causal_agree`` (fraction of (layer, step) decisions equal in
        the causal forward).
    """
    from vlmjax.models import generate as generate_lib  # pylint: disable=g-import-not-at-top

    keys = routed_keys(model.config, rc)
    b, total = tokens.shape
    n_new = total - prompt_len

    @jax.jit
    def run(variables, tokens):
        cache = decoder_lib.init_cache(model, b, total)
        (logits, _), st = model.apply({**variables, "cache": cache}, tokens[:, :prompt_len], decode=True,
                                      mutable=["cache"])
        count0 = {k: st["cache"][f"budget_{k}"]["chosen"] for k in keys}
        first = generate_lib.sample_logits(logits[:, -1], jax.random.fold_in(rng, 0), temperature)

        def step(cache, inp):
            s, tok = inp
            (logits, _), st = model.apply({**variables, "cache": cache}, tok[:, None], decode=True,
                                          mutable=["cache", "intermediates"])
            inter = st["intermediates"]
            sel = {k: inter[f"router_{k}"][0]["selected_frac"][:, 0] for k in keys}
            want = {k: inter[f"router_{k}"][0]["causal_logit"][:, 0] > 0 for k in keys}
            nxt = generate_lib.sample_logits(logits[:, -1], jax.random.fold_in(rng, s), temperature)
            return st["cache"], (sel, want, nxt)

        steps = jnp.arange(1, n_new, dtype=jnp.int32)
        cache, (sel, want, nxt) = jax.lax.scan(step, st["cache"], (steps, tokens[:, prompt_len:total - 1].T))
        count1 = {k: cache[f"budget_{k}"]["chosen"] for k in keys}
        _, inter = model.apply(variables, tokens[:, :total - 1], mode="causal", mutable=["intermediates"])
        causal = {k: inter["intermediates"][f"router_{k}"][0]["selected_frac"][:, prompt_len:] for k in keys}
        return first, nxt, sel, want, count0, count1, causal

    first, nxt, sel, want, count0, count1, causal = jax.device_get(run(variables, tokens))
    toks = np.asarray(tokens)
    generated = np.concatenate([np.asarray(first)[None], np.asarray(nxt)], axis=0)[:, 0]  # [N]
    selected = {k: np.asarray(sel[k])[:, 0] for k in keys}
    agree = [np.mean(np.asarray(causal[k])[0] == selected[k]) for k in keys]
    return {"selected": selected, "wanted": {k: np.asarray(want[k])[:, 0] for k in keys},
            "chosen_prompt": {k: int(count0[k][0]) for k in keys},
            "chosen_decode": {k: int(count1[k][0] - count0[k][0]) for k in keys},
            "tokens_match": bool(np.array_equal(generated, toks[0, prompt_len:])),
            "causal_agree": float(np.mean(agree)) if agree else None}


def decode_step_flops(cfg, rc, ran: dict[str, float] | None, kv_tokens: int) -> float:
    """Analytic FLOPs of one batch-1 decode step (one generated token).

    Every layer at ``decoder_layer_forward_flops(cfg, 1, kv_tokens)`` (the attention runs over all
    ``kv_tokens`` cache slots, masked), routed layers weighted by the fraction ``ran[i]`` of steps
    that ran them (a skipped step costs nothing: ``nn.cond``), plus the per-token router terms of
    ``routed_layer_forward_flops`` (MoD router, causal router, DTF PriorFFN, TDTF transition net,
    which run every step) and the LM head 2 d V.
    """
    head = 2.0 * cfg.hidden_size * cfg.vocab_size
    layer = flops_lib.decoder_layer_forward_flops(cfg, 1, kv_tokens)
    if rc is None:
        return cfg.num_hidden_layers * layer + head
    total = head
    for i, role in enumerate(rc.roles(cfg.num_hidden_layers)):
        terms = flops_lib.routed_layer_forward_flops(cfg, rc, role, 1, "inference")
        terms["block"] = layer * (ran[str(i)] if role in R.KINDS else 1.0)
        total += sum(terms.values())
    return total


def bench_decode(shape: str, cfg, built: list[tuple[str, Any, Any, Any]], args) -> dict[str, dict[str, Any]]:
    """Batch-1 generation with ``generate`` for every model of a shape (see the module docstring).

    Args:
        built: (kind, model, routing config or None, variables) per model, dense first.

    Returns:
        {kind: decode fields of its inference row}.
    """
    from vlmjax.models import generate as generate_lib  # pylint: disable=g-import-not-at-top

    p, n, temp = args.decode_prompt, args.decode_tokens, args.decode_temperature
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (1, p), dtype=np.int32))
    key = jax.random.key(3)
    out: dict[str, dict[str, Any]] = {}
    calls: dict[str, tuple[Callable, tuple]] = {}
    gen: dict[str, Any] = {}

    def generator(model, variables):
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}
        return lambda: generate_lib.generate(model, params, prompt, max_new_tokens=n, rng=key,
                                             temperature=temp, model_state=state)

    for kind, model, rc, variables in built:
        t0 = time.perf_counter()
        variables = nn.meta.unbox(variables)
        row: dict[str, Any] = {}
        fn = generator(model, variables)
        gen[kind] = jax.block_until_ready(fn())  # compiles (the parameters are arguments: once)
        for _ in range(args.decode_calib_rounds if rc is not None else 0):
            # Set the router rate on the sequence being decoded, then decode it again.
            variables, wanted = calibrate_causal_rate(model, rc, variables, gen[kind], rc.capacity, (p, p + n - 1))
            row["calib_wanted"] = float(np.mean(list(wanted.values())))
            fn = generator(model, variables)
            gen[kind] = jax.block_until_ready(fn())
        row["decode_compile_s"] = time.perf_counter() - t0
        calls[kind] = (fn, ())
        if rc is not None:
            tr = decode_trace(model, rc, variables, gen[kind], p, key, temp)
            keys = routed_keys(cfg, rc)
            ran = {k: float(np.mean(tr["selected"][k])) for k in keys}
            row.update({
                "decode_wanted": float(np.mean([np.mean(tr["wanted"][k]) for k in keys])),
                "decode_ran": float(np.mean(list(ran.values()))),
                "decode_ran_by_layer": " ".join(f"{ran[k]:.3f}" for k in keys),
                "decode_skipped": 1.0 - float(np.mean(list(ran.values()))),
                "decode_prompt_ran": float(np.mean([tr["chosen_prompt"][k] for k in keys])) / p,
                "decode_counters_match": all(tr["chosen_decode"][k] == int(tr["selected"][k].sum())
                                             for k in keys),
                "decode_tokens_match": tr["tokens_match"],
                "decode_causal_agree": tr["causal_agree"],
                "_ran": ran,
            })
        else:
            row["_ran"] = None
        row["decode_MFLOP_tok_analytic"] = decode_step_flops(cfg, rc, row["_ran"], p + n) / 1e6
        out[kind] = row
        print(f"  {shape:>12} {kind:>5}: decode compiled in {row['decode_compile_s']:.0f}s"
              + (f", ran {row['decode_ran']:.3f} of the decode steps per routed layer "
                 f"(wanted {row['decode_wanted']:.3f}; calibration {row['calib_wanted']:.3f})"
                 if rc is not None else ""), flush=True)
    print(f"  {shape:>12} timing generate round-robin ({args.decode_iters} rounds)...", flush=True)
    times = interleaved_times(calls, args.warmup, args.decode_iters)
    dense = out[built[0][0]]
    for kind, row in out.items():
        row["decode_ms"] = statistics.median(times[kind]) * 1e3
        row["decode_tok_s"] = n / (row["decode_ms"] / 1e3)
    for kind, row in out.items():
        row["decode_tok_s_vs_dense"] = row["decode_tok_s"] / dense["decode_tok_s"]
        row["decode_time_vs_dense"] = row["decode_ms"] / dense["decode_ms"]
        row["decode_analytic_vs_dense"] = row["decode_MFLOP_tok_analytic"] / dense["decode_MFLOP_tok_analytic"]
    return out


# ------------------------------------------------------------------------------------------------
# One shape
# ------------------------------------------------------------------------------------------------

def bench_shape(shape: str, args) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(FLOP / time rows, router overhead rows, inference rows) of one shape."""
    fields, seq, timed_default = SHAPES[shape]
    cfg = decoder_lib.DecoderConfig(**fields, dtype=args.dtype, max_position_embeddings=max(seq, 2048))
    on_cpu = jax.devices()[0].platform == "cpu"
    timed = not args.no_time and (timed_default or args.time_large or not on_cpu)
    batch = args.batch if timed_default else args.large_batch
    tokens_per_step = batch * seq
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch, seq), dtype=np.int32))
    head = 2.0 * seq * cfg.hidden_size * cfg.vocab_size  # LM head, per sequence
    rows, over = [], []
    calls: dict[tuple[str, str], tuple[Any, tuple]] = {}
    decode = timed and not args.no_decode
    built = []  # (kind, model, rc, variables) for the decode benchmark
    for kind in args.models:
        model, rc = build_model(kind, cfg, args)
        init = lambda: model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))
        t0 = time.perf_counter()
        variables = init() if timed else jax.eval_shape(init)
        toks = tokens if timed else jax.ShapeDtypeStruct(tokens.shape, tokens.dtype)
        fns = make_fns(model, rc is not None)
        row: dict[str, Any] = {"shape": shape, "model": kind, "capacity": None if rc is None else rc.capacity,
                               "T": seq, "batch": batch}
        if rc is None:
            a_fwd = a_inf = flops_lib.decoder_forward_flops(cfg, seq)
            a_train = flops_lib.decoder_train_flops(cfg, batch, seq)
        else:
            a_fwd = flops_lib.routed_decoder_forward_flops(cfg, rc, seq, "train")
            a_inf = flops_lib.routed_decoder_forward_flops(cfg, rc, seq, "inference")
            a_train = flops_lib.routed_decoder_train_flops(cfg, rc, batch, seq)
        for name, analytic, per in (("fwd", a_fwd, seq), ("inf", a_inf, seq), ("train", a_train, None)):
            fn = fns[{"fwd": "forward", "inf": "inference", "train": "train"}[name]]
            x, compiled = xla_flops(fn, variables, toks)
            if name == "train":
                row["train_GFLOP_xla"] = None if x is None else x / 1e9
                row["train_GFLOP_analytic"] = analytic / 1e9
            else:
                x_seq = None if x is None else x / batch
                row[f"{name}_MFLOP_tok_xla"] = None if x_seq is None else x_seq / per / 1e6
                row[f"{name}_MFLOP_tok_analytic"] = analytic / per / 1e6
                row[f"_{name}_seq_xla"], row[f"_{name}_seq_analytic"] = x_seq, analytic
            row[f"{name}_xla_over_analytic"] = None if x is None else (
                x / batch / analytic if name != "train" else x / analytic)
            row[f"_{name}_xla"] = x
            calls[(kind, name)] = (compiled, (variables, toks))
        row["_head_seq"] = head
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        if decode:
            built.append((kind, model, rc, variables))
        print(f"  {shape:>12} {kind:>5}: fwd {common.fmt(row['fwd_MFLOP_tok_xla'])} MFLOP/tok (XLA) "
              f"{common.fmt(row['fwd_MFLOP_tok_analytic'])} (analytic), train {common.fmt(row['train_GFLOP_xla'])} "
              f"GFLOP/step (XLA), compiled in {row['seconds']:.0f}s", flush=True)
        if rc is not None:
            # Timed shapes: forward and fwd+bwd; large shapes on CPU: the forward only (cheap).
            modes = () if args.no_time else (("fwd", "train") if timed else ("fwd",))
            iters = args.overhead_iters if timed else args.overhead_iters_large
            shape_x = (batch, seq, cfg.hidden_size)
            x = (jnp.asarray(rng.standard_normal(shape_x), cfg.dtype) if modes
                 else jax.ShapeDtypeStruct(shape_x, cfg.dtype))
            ov = measure_overhead(model, x, modes, iters, args)
            over.append({"shape": shape, "model": kind, "capacity": rc.capacity, **ov})
    if timed:
        print(f"  {shape:>12} timing {len(calls)} functions round-robin ({args.iters} rounds)...", flush=True)
        t = interleaved_median_times(calls, args.warmup, args.iters)
        for row in rows:
            for name in ("fwd", "inf", "train"):
                row[f"{name}_ms"] = t[(row["model"], name)] * 1e3
    del calls
    # Ratios vs dense (same run).
    dense = rows[0]
    for row in rows:
        for name in ("fwd", "inf", "train"):
            x, xd = row[f"_{name}_xla"], dense[f"_{name}_xla"]
            row[f"{name}_xla_vs_dense"] = None if not (x and xd) else x / xd
        for name in ("fwd", "inf"):
            a, ad = row[f"_{name}_seq_analytic"], dense[f"_{name}_seq_analytic"]
            row[f"{name}_analytic_vs_dense"] = a / ad
            row[f"{name}_analytic_vs_dense_nohead"] = (a - head) / (ad - head)
            x, xd = row[f"_{name}_seq_xla"], dense[f"_{name}_seq_xla"]
            row[f"{name}_xla_vs_dense_nohead"] = None if not (x and xd) else (x - head) / (xd - head)
        row["train_analytic_vs_dense"] = row["train_GFLOP_analytic"] / dense["train_GFLOP_analytic"]
        for name in ("fwd", "inf", "train"):
            if f"{name}_ms" in row:
                row[f"{name}_time_vs_dense"] = row[f"{name}_ms"] / dense[f"{name}_ms"]
        row["tokens_per_step"] = tokens_per_step
    dec = bench_decode(shape, cfg, built, args) if decode else {}
    inference = []
    for row in rows:
        rc = build_model(row["model"], cfg, args)[1] if row["model"] != "dense" else None
        d = dec.get(row["model"], {})
        if "decode_time_vs_dense" in d:
            row["decode_time_vs_dense"] = d["decode_time_vs_dense"]
        inference.append({
            "shape": shape, "model": row["model"], "capacity": row["capacity"],
            "causal_c": None if rc is None else rc.causal_fraction, "T": seq,
            "cap_per_layer": None if rc is None else R.capacity_tokens(rc.causal_fraction, seq),
            "prefill_MFLOP_tok_xla": row["inf_MFLOP_tok_xla"],
            "prefill_MFLOP_tok_analytic": row["inf_MFLOP_tok_analytic"],
            "prefill_xla_vs_dense": row["inf_xla_vs_dense"],
            "prefill_analytic_vs_dense": row["inf_analytic_vs_dense"],
            "prefill_xla_vs_dense_nohead": row["inf_xla_vs_dense_nohead"],
            "prefill_time_vs_dense": row.get("inf_time_vs_dense"),
            "decode_prompt": args.decode_prompt if d else None, "decode_tokens": args.decode_tokens if d else None,
            **{k: v for k, v in d.items() if not k.startswith("_")},
        })
    return rows, over, inference


# ------------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------------

FLOP_COLS = ["shape", "model", "capacity", "T", "fwd_MFLOP_tok_xla", "fwd_MFLOP_tok_analytic",
             "fwd_xla_over_analytic", "inf_MFLOP_tok_xla", "inf_MFLOP_tok_analytic", "inf_xla_over_analytic",
             "batch", "train_GFLOP_xla", "train_GFLOP_analytic", "train_xla_over_analytic"]
RATIO_COLS = ["shape", "model", "capacity", "fwd_xla_vs_dense", "fwd_analytic_vs_dense",
              "fwd_xla_vs_dense_nohead", "fwd_analytic_vs_dense_nohead", "inf_xla_vs_dense",
              "train_xla_vs_dense", "train_analytic_vs_dense", "fwd_time_vs_dense", "inf_time_vs_dense",
              "train_time_vs_dense", "fwd_ms", "train_ms"]
PREFILL_COLS = ["shape", "model", "capacity", "causal_c", "T", "cap_per_layer", "prefill_MFLOP_tok_xla",
                "prefill_MFLOP_tok_analytic", "prefill_xla_vs_dense", "prefill_analytic_vs_dense",
                "prefill_xla_vs_dense_nohead", "prefill_time_vs_dense"]
DECODE_COLS = ["shape", "model", "capacity", "calib_wanted", "decode_wanted", "decode_ran", "decode_ran_by_layer",
               "decode_skipped", "decode_ms", "decode_tok_s", "decode_tok_s_vs_dense", "decode_MFLOP_tok_analytic",
               "decode_analytic_vs_dense", "decode_causal_agree"]
OVER_COLS = ["shape", "model", "capacity", "fwd_flops_pct", "fwd_time_pct", "fwd_time_pct_min",
             "train_flops_pct", "train_time_pct", "train_time_pct_min", "fwd_block_ms", "train_block_ms"]


def target_lines(rows, over, args, info) -> list[str]:
    out = []
    devs = [abs(r[k] - 1.0) for r in rows for k in ("fwd_xla_over_analytic", "inf_xla_over_analytic",
                                                     "train_xla_over_analytic") if r.get(k)]
    if devs:
        worst = max(devs)
        out.append(f"XLA vs analytic (target within 3%): worst deviation {100 * worst:.2f}% over "
                   f"{len(devs)} counts -> {'MET' if worst <= 0.03 else 'MISSED'}.")
    for r in rows:
        if r["model"] == "mod" and r["shape"] == "cpu12":
            out.append(f"MoD capacity {r['capacity']} every other block, 12 layers (target forward ~0.55x "
                       f"dense): XLA {r['fwd_xla_vs_dense']:.3f}x with LM head, "
                       f"{r['fwd_xla_vs_dense_nohead']:.3f}x without; analytic "
                       f"{r['fwd_analytic_vs_dense']:.3f}x / {r['fwd_analytic_vs_dense_nohead']:.3f}x.")
    if over:
        worst_f = max(o["fwd_flops_pct"] for o in over if o.get("fwd_flops_pct") is not None)
        line = f"Router overhead vs one dense block (target <= 10%): XLA FLOPs up to {worst_f:.2f}%"
        for key, label in (("fwd_time_pct", "forward time"), ("train_time_pct", "fwd+bwd time"),
                           ("fwd_time_pct_min", "forward time of the fastest calls"),
                           ("train_time_pct_min", "fwd+bwd time of the fastest calls")):
            timed = [o for o in over if o.get(key) is not None]
            if timed:
                w = max(timed, key=lambda o: o[key])
                line += f"; {label} up to {w[key]:.1f}% ({w['shape']}/{w['model']})"
                per_shape = {}
                for o in timed:
                    per_shape[o["shape"]] = max(per_shape.get(o["shape"], 0.0), o[key])
                line += " [max per shape: " + ", ".join(f"{k} {v:.1f}%" for k, v in per_shape.items()) + "]"
        out.append(line + ".")
    if info["platform"] == "gpu":
        for r in rows:
            if r["model"] == "mod" and "train_time_vs_dense" in r:
                out.append(f"GPU train step MoD/dense ({r['shape']}, target <= 0.62x on H100): "
                           f"{r['train_time_vs_dense']:.3f}x on {info['device_kind']}.")
    else:
        out.append(f"GPU timing was not measured (this run: {info['platform']}); the H100 target "
                   "(MoD train step <= 0.62x dense time) is unchecked. Run this script on a GPU "
                   "with --time_large.")
    return out


def inference_notes(inference, args) -> list[str]:
    """How the Inference tables were made, and a summary line of each."""
    out = [
        "Prefill = the causal forward (mode='causal') of T tokens, the same compiled function as 'inf' "
        "above: routed models at the default causal_capacity='auto', c = causal_c; cap_per_layer = floor(c T) "
        "tokens gathered by each routed layer (a static shape: what XLA counts and the analytic "
        "routed_decoder_forward_flops(mode='inference') assumes). *_nohead: LM head subtracted.",
    ]
    for shape in dict.fromkeys(r["shape"] for r in inference):
        rs = [r for r in inference if r["shape"] == shape and r["model"] != "dense"]
        cells = ", ".join(f"{r['model']} {common.fmt(r['prefill_xla_vs_dense'])}x" for r in rs)
        out.append(f"Prefill FLOPs vs dense ({shape}, XLA): {cells}.")
    if not any(r.get("decode_tok_s") for r in inference):
        out.append("Decoding not measured (--no_time / --no_decode, or large shapes on CPU without --time_large).")
        return out
    mode = "greedy" if args.decode_temperature == 0 else f"sampling at temperature {args.decode_temperature}"
    out += [
        f"Decoding: vlmjax.models.generate.generate, batch 1, a random {args.decode_prompt}-token prompt then "
        f"{args.decode_tokens} new tokens by {mode}, compiled once; decode_ms = median of {args.decode_iters} "
        f"calls per model, round-robin across models after {args.warmup} warm-up rounds (each call includes "
        "the prompt's prefill); decode_tok_s = new tokens / decode_ms. Decode mode skips a routed block "
        "(nn.cond) on a step where no row chose the token; generate's prefill runs the routed blocks "
        "masked over the whole prompt (skipped only if no prompt token was chosen), so it saves no FLOPs.",
        "Why sampling by default: greedy decoding of an untrained model repeats one token (its tied "
        "embedding is the argmax), so the routers would see one constant input and choose all or none of "
        "the steps. At temperature 1 the untrained model's near-uniform logits give random tokens, so the "
        "routers see varied inputs (--decode_temperature=0 for greedy).",
        "Router rate (untrained routers are random): each routed model's routers are set so that about "
        f"`capacity` of the decode steps' tokens (positions {args.decode_prompt}.."
        f"{args.decode_prompt + args.decode_tokens - 2}) of the sequence being decoded are wanted (causal logit "
        "> 0 in the causal forward of that sequence), then the sequence is generated again with the same "
        f"key ({args.decode_calib_rounds} rounds, starting from the untrained model's generation; the "
        "sampled tokens barely change since the untrained logits are near uniform). Calibrating on other "
        "random sequences does not carry over: at init a sequence's router logits share a large "
        "per-sequence offset (the attention averages over its context), so one sequence's rate ranges "
        "over ~0-0.8 at a population rate of 0.125-0.5. Layer by layer in order: DTF / TDTF "
        "causal router bias -= the (1 - capacity) quantile of its logits; MoD (mod_causal='aux', router "
        "logit r = w^T x without a bias): w -= beta |w| m, m the unit mean of the layer's inputs (the hidden "
        "states share a large common component, so this acts as a bias), beta chosen for the rate. "
        "calib_wanted: the wanted fraction of the last calibration (before the last generation; mean "
        "over routed layers).",
        "decode_wanted / decode_ran: fraction of the decode steps (the N - 1 generated tokens fed back; "
        "generate never feeds its last token) whose causal logit is > 0 / that ran the routed block (wanted "
        "and within the running budget max(1, floor(c (p + 1)))), mean over routed layers "
        "(decode_ran_by_layer: each routed layer in order); decode_skipped = 1 - decode_ran, the fraction "
        "of routed-block executions skipped. Measured by re-running generate's decoding step by step on its "
        "tokens (prefill, then one decode step per token, the 'intermediates' of each step) with the "
        "cache's per-layer 'chosen' counters as a check; decode_causal_agree: fraction of those decisions "
        "the one-piece causal forward of the same sequence makes identically.",
        f"decode_MFLOP_tok_analytic: one decode step (one generated token) at the measured decode_ran: "
        "every layer at flops.decoder_layer_forward_flops(cfg, 1, kv_tokens="
        f"{args.decode_prompt + args.decode_tokens}) "
        "(the attention runs over every slot of the KV cache, masked), routed layers times their ran "
        "fraction, plus the router terms that run every step (MoD router, causal router, DTF PriorFFN, "
        "TDTF transition net) and the LM head 2 d V; the prefill is not included.",
    ]
    for r in inference:
        if r["model"] != "dense" and r.get("decode_tok_s"):
            out.append(f"Decode {r['shape']}/{r['model']}: ran {r['decode_ran']:.3f} of the routed-block steps "
                       f"({100 * r['decode_skipped']:.1f}% skipped), {r['decode_tok_s']:.0f} tok/s = "
                       f"{r['decode_tok_s_vs_dense']:.3f}x dense; analytic FLOPs/token "
                       f"{r['decode_analytic_vs_dense']:.3f}x dense; counters match: "
                       f"{r['decode_counters_match']}, re-run reproduces generate's tokens: "
                       f"{r['decode_tokens_match']}.")
    return out


def plot(rows, path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    metrics = [("fwd_xla_vs_dense", "fwd FLOPs"), ("train_xla_vs_dense", "train FLOPs"),
               ("inf_xla_vs_dense", "inference FLOPs"), ("fwd_time_vs_dense", "fwd time"),
               ("inf_time_vs_dense", "inference time"), ("train_time_vs_dense", "train time"),
               ("decode_time_vs_dense", "decode time (batch 1)")]
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.2 * len(shapes), 3.8), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rs = [r for r in rows if r["shape"] == shape and r["model"] != "dense"]
        width = 0.8 / len(metrics)
        for j, (key, label) in enumerate(metrics):
            vals = [r.get(key) or 0.0 for r in rs]
            ax.bar(np.arange(len(rs)) + j * width, vals, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(np.arange(len(rs)) + 0.4 - width / 2)
        ax.set_xticklabels([f"{r['model']}\n{r['capacity']}" for r in rs])
        ax.set_title(shape)
        ax.set_ylabel("ratio vs dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None):
    args = parse_args(argv)
    info = common.device_info()
    print(f"routing FLOPs on {info['device_count']}x {info['platform']} ({info['device_kind']}), "
          f"dtype {args.dtype}; shapes {args.shapes}", flush=True)
    t0 = time.perf_counter()
    rows, over, inference = [], [], []
    for shape in args.shapes:
        r, o, i = bench_shape(shape, args)
        rows += r
        over += o
        inference += i
    notes = [
        f"Routed models use every=2, offset=1 (layers 1, 3, 5, ... routed; DTF decision layers 0, 2, 4, ...); "
        f"MoD capacity {args.mod_capacity}, DTF gamma {args.dtf_capacity}, TDTF capacity {args.tdtf_capacity}.",
        "fwd = training forward (top-k selection); inf = inference forward (causal routers) with the default "
        f"causal_capacity='auto': c = min(1, capacity + causal_margin {R.RoutingConfig().causal_margin}), so "
        "each routed layer gathers the static cap floor(c T) tokens (the number the causal router actually "
        "picks is data dependent; the cap is what is computed).",
        "train = jit(value_and_grad(LM CE + router_loss)); analytic train = 3 x training forward.",
        "*_nohead: the analytic LM head (2 T d V per sequence) subtracted from both counts.",
        "Times: median of %d round-robin rounds (one call of each model per round, after %d warm-up "
        "rounds), same run; '-' = not timed (large shapes on CPU)." % (args.iters, args.warmup),
        "Overhead: the routed layer's non-block work (block replaced by identity) as % of one dense "
        f"DecoderBlock on all T tokens (XLA FLOPs; median time of {args.overhead_iters} round-robin rounds, "
        f"forward and fwd+bwd; on untimed large shapes the forward only, {args.overhead_iters_large} rounds); "
        "*_time_pct_min: the same ratio of the fastest calls (robust to other processes on a shared CPU).",
    ]
    targets = target_lines(rows, over, args, info)
    inf_notes = inference_notes(inference, args)
    print()
    print("FLOPs (per token for fwd / inf, per step for train):")
    common.print_table(rows, FLOP_COLS)
    print("\nRatios vs dense (same run):")
    common.print_table(rows, RATIO_COLS, machine=False)
    print("\nRouter overhead vs one dense block (%):")
    common.print_table(over, OVER_COLS, machine=False)
    print("\nInference: prefill (causal forward, FLOPs per token):")
    common.print_table(inference, PREFILL_COLS, machine=False)
    decoded = [r for r in inference if r.get("decode_tok_s") is not None]
    if decoded:
        print(f"\nInference: batch-1 decoding ({args.decode_prompt}-token prompt + {args.decode_tokens} new tokens):")
        common.print_table(decoded, DECODE_COLS, machine=False)
    print()
    for line in inf_notes + notes + targets:
        print(line)
    total = time.perf_counter() - t0
    print(f"total {total:.0f}s")

    clean = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    common.write_json(args.out + ".json", {"device": info, "args": vars(args), "rows": clean,
                                           "overhead": over, "notes": notes, "targets": targets,
                                           "inference": inference, "inference_notes": inf_notes,
                                           "seconds": total})
    md = [f"# Routing FLOPs and step time ({info['platform']}, {info['device_kind']}, {args.dtype})", "",
          f"Command: `python benchmarks/routing_flops.py {' '.join(sys.argv[1:] if argv is None else argv)}`",
          "", "## FLOPs (per token for fwd / inf, per step for train; M/GFLOP)", "", common.md_table(clean, FLOP_COLS),
          "", "## Ratios vs dense and wall time", "", common.md_table(clean, RATIO_COLS), "",
          "## Router overhead vs one dense block (%)", "", common.md_table(over, OVER_COLS), "",
          "## Inference", "", "### Prefill: causal forward FLOPs per token (MFLOP)", "",
          common.md_table(inference, PREFILL_COLS), "",
          f"### Decoding: batch 1, {args.decode_prompt}-token prompt + {args.decode_tokens} new tokens", ""]
    md += [common.md_table(decoded, DECODE_COLS) if decoded else
           "Not measured in this run (--no_time, --no_decode, or only untimed large shapes on CPU)."]
    md += ["", "### Inference notes", ""] + [f"- {n}" for n in inf_notes]
    md += ["", "## Notes", ""] + [f"- {n}" for n in notes] + ["", "## Targets", ""] + [f"- {t}" for t in targets]
    common.write_report(args.out, md, plot, rows)


if __name__ == "__main__":
    main()
