"""Decoder with routed layers: Mixture-of-Depths, DTF (surprise-routed) and TDTF (temporal).

``RoutedDecoder`` is the dense ``Decoder`` (same parameter names, so HF Llama/Qwen checkpoints load
into ``embed_tokens``, ``layers_{i}``, ``norm``, ``lm_head``) plus per-routed-layer routers
``routers_{i}`` and, in decode mode, per-layer stream state in the "cache" collection. Spec:
``docs/routing.md``; the primitives are in ``routing.py``.

Selection modes (``mode=``):
  - ``"topk"``: the k = floor(capacity T) best tokens of the whole sequence (training; it looks at
    future tokens, so its perplexity is not a valid autoregressive score);
  - ``"causal"``: each token decided by its causal router (sigmoid(logit) > 0.5) under the running
    budget max(1, floor(c (p + 1))) chosen tokens up to position p (``routing.causal_budget``; c =
    ``RoutingConfig.causal_fraction``), gathered to a static floor(c T). Decoding (``decode=True``)
    uses the same rule, carrying the count in the cache, and skips a routed block no row chose.

Layer roles for ``every=2, offset=1`` on 4 layers:
  mod:  dense, mod, dense, mod      (x_i + r_i Block(X_sel)_i on the chosen tokens)
  dtf:  decision, dtf, decision, dtf (decision = dense block + PriorFFN; dtf = G-gated routed block)
  tdtf: dense, tdtf, dense, tdtf    (teacher dense block + transition net in training)

Gradients (two stop-gradients the spec leaves implicit):
- G_cont is computed from stop-gradient D_st / D_ch, so its gradient trains beta_ce, beta_cu, o_ce
  and m_cu only (VPR's event criteria are likewise not differentiated through the surprise).
  Otherwise the LM loss would reward the decision layer for inflating its update
  (D_st = (1/d)||Block(H)||^2) to raise the gate of the next layer.
- The PriorFFN sees stop-gradient H. With H differentiable, minimising
  ||H + PriorFFN(H) - sg(H + Block(H))||^2 moves H by (Block - PriorFFN) every step while the target
  moves with it: a runaway drift of the residual stream. The first default run did exactly that
  (L_prior 4.5e3 at step 50, 5.7e4 at step 100, loss 2.8e3).
The PriorFFN learns from L_prior, the TDTF transition net from L_tpn, the causal routers from their
BCE, the blocks from the LM loss through the stream.

Non-trainable state: ``router_state`` (checkpointed with the train state): ``progress`` (fraction of
training done, for scheduled betas) and per surprise router the long-run mean of D_st, used as the
moving average of a stream's first token (no history yet). Decode-mode "cache" per routed layer: the
MA window (last ``ma_window`` D_st values), the previous token's state for the causal router and, in
TDTF, the previous token's final state for the transition network; a sequence fed in chunks or token
by token therefore sees the same MA and decisions as in one piece.
"""

from __future__ import annotations

import collections
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vlmjax.models import axes
from vlmjax.models import decoder as decoder_lib
from vlmjax.models import layers
from vlmjax.models import routing as R

Array = jax.Array
sg = jax.lax.stop_gradient


class PreviousToken(nn.Module):
    """x [B, T, D] -> x shifted one token right (row t holds x_{t-1}; x_{-1} = 0, padding -> 0).

    In decode mode the last token of each call is kept in the "cache" collection ("last"), so the
    next call's first token sees it.
    """

    @nn.compact
    def __call__(self, x: Array, valid: Array, decode: bool) -> Array:
        b, _, d = x.shape
        first = jnp.zeros((b, 1, d), x.dtype)
        first_valid = jnp.zeros((b, 1), jnp.bool_)
        if decode:
            initialized = self.has_variable("cache", "last")
            last = self.variable("cache", "last", jnp.zeros, (b, 1, d), x.dtype)
            last_valid = self.variable("cache", "last_valid", jnp.zeros, (b, 1), jnp.bool_)
            first, first_valid = last.value, last_valid.value
            if initialized:
                last.value, last_valid.value = x[:, -1:], valid[:, -1:]
        prev = jnp.concatenate([first, x[:, :-1]], axis=1)
        prev_valid = jnp.concatenate([first_valid, valid[:, :-1]], axis=1)
        return jnp.where(prev_valid[..., None], prev, 0).astype(x.dtype)


class MovingAverageState(nn.Module):
    """Causal moving average of D_st over the previous ``window`` slots (``routing.causal_moving_average``);
    in decode mode the last ``window`` slots are carried in the "cache" collection."""

    window: int

    @nn.compact
    def __call__(self, values: Array, valid: Array, decode: bool) -> tuple[Array, Array]:
        """values, valid: [B, T] -> (ma [B, T], count [B, T])."""
        b = values.shape[0]
        shape = (b, self.window)
        if decode:
            initialized = self.has_variable("cache", "values")
            hist_v = self.variable("cache", "values", jnp.zeros, shape, jnp.float32)
            hist_m = self.variable("cache", "valid", jnp.zeros, shape, jnp.bool_)
            ma, count, new_v, new_m = R.causal_moving_average(values, valid, self.window, hist_v.value,
                                                              hist_m.value)
            if initialized:
                hist_v.value, hist_m.value = new_v, new_m
            return ma, count
        ma, count, _, _ = R.causal_moving_average(values, valid, self.window, jnp.zeros(shape, jnp.float32),
                                                  jnp.zeros(shape, jnp.bool_))
        return ma, count


class CausalBudget(nn.Module):
    """The causal selection under the running budget (``routing.causal_budget``). In decode mode the
    count of tokens chosen so far per row is carried in the "cache" collection ("chosen"), so
    token-by-token decoding chooses exactly the tokens of a one-piece causal forward."""

    @nn.compact
    def __call__(self, wanted: Array, positions: Array, capacity: Array | float, decode: bool) -> Array:
        """wanted, positions: [B, T] -> chosen [B, T] bool."""
        if not decode:
            return R.causal_budget(wanted, positions, capacity)[0]
        initialized = self.has_variable("cache", "chosen")
        count = self.variable("cache", "chosen", jnp.zeros, (wanted.shape[0],), jnp.int32)
        chosen, new_count = R.causal_budget(wanted, positions, capacity, count.value)
        if initialized:
            count.value = new_count
        return chosen


class _RoutedLayers:
    """The per-layer routing logic, shared by the looped ``RoutedDecoder`` (keys = layer index) and
    the scanned ``RoutedGroup`` (keys = position in the group). The host module has ``config``,
    ``routing`` and calls ``_make_routing_modules`` in its ``setup``."""

    def _make_routing_modules(self, roles: tuple[str, ...]) -> None:
        """Routers, moving averages, previous-token states and budgets of the routed layers among
        ``roles`` (dict attributes keyed by the layer's position: names ``routers_{i}`` etc.)."""
        c, rc = self.config, self.routing
        routers, ma, prev, prev_final = {}, {}, {}, {}
        for i, role in enumerate(roles):
            key = str(i)
            if role == "mod":
                hidden = rc.predictor_hidden or max(8, c.hidden_size // 8)
                routers[key] = R.MoDRouter(predictor=rc.mod_causal == "predictor", predictor_hidden=hidden,
                                           bias_init=rc.causal_bias_init,
                                           initializer_range=c.initializer_range, param_dtype=c.param_dtype)
            elif role in ("dtf", "tdtf"):
                routers[key] = R.SurpriseRouter(rc, eps=c.rms_norm_eps, initializer_range=c.initializer_range,
                                                dtype=c.dtype, param_dtype=c.param_dtype)
                ma[key] = MovingAverageState(rc.ma_window)
                prev[key] = PreviousToken()
                if role == "tdtf":
                    prev_final[key] = PreviousToken()
        self.routers = routers
        self.moving_average = ma
        self.previous = prev
        self.previous_final = prev_final
        self.budget = {key: CausalBudget() for key in routers}

    def _run_layers(self, blocks, roles, x, positions, attention_mask, valid, decode, mode, prog):
        """Runs ``blocks`` (each returning its residual update) in their ``roles``.

        Returns (x [B, T, D], stats {key: {stat: scalar}} of the routed layers, losses {name: [scalars]}).
        """
        stats_all: dict[str, dict[str, Array]] = {}
        losses: dict[str, list[Array]] = collections.defaultdict(list)
        pending = None  # (D_st, D_ch) of the decision layer before a DTF dynamic layer
        for i, (layer, role) in enumerate(zip(blocks, roles)):
            key = str(i)
            if role == "dense":
                update, _ = layer(x, positions, attention_mask, decode)
                x = x + update
            elif role == "decision":
                router = self.routers[str(i + 1)]
                update, _ = layer(x, positions, attention_mask, decode)
                h_orig, h_post = x, x + update
                h_prior = router.predict(sg(h_orig))                   # H + PriorFFN(RMSNorm(H))
                losses["prior"].append(self._prior_loss(h_prior, h_post, update, valid))
                pending = (R.mean_sq(update), self._d_ch(h_post, h_prior))  # D_st, D_ch: [B, T]
                x = h_post
            elif role == "mod":
                x, stats_all[key] = self._mod_layer(key, layer, x, positions, attention_mask, valid, decode, mode,
                                                    prog, losses)
            elif role == "dtf":
                x, stats_all[key] = self._dtf_layer(key, layer, x, positions, attention_mask, valid, decode, mode,
                                                    prog, pending, losses)
            else:  # tdtf
                x, stats_all[key] = self._tdtf_layer(key, layer, x, positions, attention_mask, valid, decode, mode,
                                                     prog, losses)
        return x, stats_all, dict(losses)

    # -- helpers -----------------------------------------------------------------------------------
    def _d_ch(self, a: Array, b: Array) -> Array:
        """D_ch: (1/d)||a - b||^2 (mse) or (1/d) KL(N(a, s^2 I) || N(b, s^2 I)) = that / (2 s^2) (kl)."""
        d = R.mean_sq(a, b)
        return d if self.routing.d_ch == "mse" else d / (2.0 * self.routing.kl_variance)

    def _ma(self, key: str, router: R.SurpriseRouter, d_st: Array, has_value: Array, decode: bool) -> Array:
        """MA of stop-gradient D_st; a token with no earlier value in its window uses the long-run
        mean (router_state), or before any training its own D_st (CU = (1 - m_cu) D_st)."""
        ma, count = self.moving_average[key](sg(d_st), has_value, decode)
        fallback = jnp.where(router.has_history(), router.ma_fallback(), sg(d_st))
        return jnp.where(count > 0, ma, fallback)

    def _sow(self, key: str, values: dict[str, Array]) -> None:
        """Per-token router intermediates ([B, T]) into "intermediates" when that collection is
        mutable (tests, analysis notebooks); free otherwise."""
        self.sow("intermediates", f"router_{key}", {k: v for k, v in values.items() if v.ndim == 2})

    # -- routed layers -----------------------------------------------------------------------------
    def _gate(self, gate: Array) -> Array:
        return R.straight_through_one(gate) if self.routing.gate_forward == "one" else gate

    def _topk_selection(self, scores: Array, valid: Array, prog: Array) -> Array:
        """[B, T] bool: the top floor(capacity T) ``scores`` among valid tokens (annealed capacity
        while warming up; padding is never chosen)."""
        rc, t = self.routing, scores.shape[1]
        if rc.capacity_warmup > 0:
            k = jnp.maximum(jnp.floor(rc.annealed(rc.capacity, prog) * t), 1.0)
            return R.rank_mask(scores, k, valid)
        idx, picked = R.topk_indices(scores, R.capacity_tokens(rc.capacity, t), valid)
        return R.indices_to_mask(idx, picked, t)

    def _causal_selection(self, key: str, logits: Array, valid: Array, positions: Array, prog: Array,
                          decode: bool) -> tuple[Array, Array]:
        """(chosen, wanted) [B, T] bool: the causal router's decisions under the running budget
        (``RoutingConfig.causal_capacity``); in decode mode the count is carried in the cache."""
        rc = self.routing
        wanted = (logits > 0) & valid
        cap = rc.annealed(rc.causal_fraction, prog) if rc.capacity_warmup > 0 else rc.causal_fraction
        return self.budget[key](wanted, positions, cap, decode), wanted

    def _block_on(self, layer, x: Array, positions: Array, attention_mask: Array | None, chosen: Array,
                  k: int, prog: Array, decode: bool) -> Array:
        """The routed block's update on the ``chosen`` tokens (zero elsewhere): [B, T, D].

        Training/evaluation: gathered to the static k (``chosen`` has at most k per row), so the
        block's FLOPs scale with k; while warming up, every token runs with the unchosen ones masked
        (``lax.cond`` picks the branch; only one runs). Decoding: the masked block, skipped entirely
        by ``lax.cond`` when no row chose the token (its cache slots are recorded as masked).
        """
        def masked(mdl, x):
            _, update = R.masked_compute(mdl, x, positions, attention_mask, chosen, jnp.ones(chosen.shape), decode)
            return update * chosen[..., None].astype(update.dtype)

        if decode:
            if self.is_initializing():  # creates the cache; the skip branch needs it to exist
                return masked(layer, x)
            return nn.cond(jnp.any(chosen), masked, lambda mdl, x: mdl.skip_decode(x, positions)[0], layer, x)

        def gathered(mdl, x):
            idx, picked = R.first_k_indices(chosen, k)
            return R.routed_update(mdl, x, positions, attention_mask, idx, picked)

        if self.routing.capacity_warmup <= 0:
            return gathered(layer, x)
        # While the capacity anneals from 1.0 every token runs masked (the dense start).
        return nn.cond(prog < self.routing.capacity_warmup, masked, gathered, layer, x)

    def _route(self, key, layer, x, positions, attention_mask, valid, decode, mode, prog, *, scores,
               causal_logits, gate, losses, stats):
        """The selection modes of a routed layer (MoD and DTF).

        topk: the top-k ``scores`` (capacity * T) run the block, gated by ``gate``; the causal
        router's BCE against that selection is added to ``losses["causal"]``. causal / decode: the
        causal router's choices under the running budget. Returns (x [B, T, D], chosen [B, T] bool).
        """
        rc, t = self.routing, x.shape[1]
        if mode == "topk":
            chosen = self._topk_selection(scores, valid, prog)
            k = R.capacity_tokens(rc.capacity, t)
            losses["causal"].append(R.bce_with_logits(causal_logits, sg(chosen.astype(jnp.float32)), valid))
            stats.update(R.decision_stats(causal_logits > 0, chosen, valid))
        else:
            chosen, wanted = self._causal_selection(key, causal_logits, valid, positions, prog, decode)
            k = R.capacity_tokens(rc.causal_fraction, t)
            stats["causal_overflow"] = wanted & ~chosen
        update = self._block_on(layer, x, positions, attention_mask, chosen, k, prog, decode)
        weight = jnp.where(chosen, self._gate(gate), 0.0)
        return x + (weight[..., None] * update).astype(x.dtype), chosen

    def _mod_layer(self, key, layer, x, positions, attention_mask, valid, decode, mode, prog, losses):
        """MoD (Raposo et al. 2024): x_i + r_i Block(X_sel)_i on the chosen tokens, x_i elsewhere."""
        r, pred = self.routers[key](x)
        causal_logits = r if pred is None else pred
        stats = {"router_logit": r}
        x, target = self._route(key, layer, x, positions, attention_mask, valid, decode, mode, prog, scores=r,
                                causal_logits=causal_logits, gate=r, losses=losses, stats=stats)
        stats.update({"causal_logit": causal_logits, "selected_frac": target})
        self._sow(key, {"selected": target, **stats})
        return x, {k: R.masked_mean(v, valid) if v.ndim else v for k, v in stats.items()}

    def _prior_loss(self, pred: Array, target: Array, update: Array, valid: Array) -> Array:
        """L_prior / L_tpn: mean over valid tokens of (1/d)||pred - sg(target)||^2, divided by that of
        (1/d)||sg(update)||^2 for ``prior_loss='relative'`` (scale-free, see RoutingConfig)."""
        loss = R.masked_mean(R.mean_sq(pred, sg(target)), valid)
        if self.routing.prior_loss == "relative":
            loss = loss / jnp.maximum(R.masked_mean(R.mean_sq(sg(update)), valid), 1e-12)
        return loss

    def _dtf_layer(self, key, layer, x, positions, attention_mask, valid, decode, mode, prog, pending, losses):
        """DTF dynamic layer: H_next = H_post + G_cont * Block(H_post) on the chosen tokens."""
        rc = self.routing
        router = self.routers[key]
        d_st, d_ch = pending
        params = router.parameters(prog)
        ma = self._ma(key, router, d_st, valid, decode)
        crit = R.surprise_gate(sg(d_st), sg(d_ch), ma, gate=rc.gate, **params)  # see module doc
        g = crit["g_cont"]
        logits = router.route_logits(x, self.previous[key](x, valid, decode))
        stats = {}
        if mode == "topk":
            router.update_ema(d_st, valid)
        x, target = self._route(key, layer, x, positions, attention_mask, valid, decode, mode, prog, scores=g,
                                causal_logits=logits, gate=g, losses=losses, stats=stats)
        stats.update({"d_st": d_st, "d_ch": d_ch, "ma": ma, **crit, **params, "causal_logit": logits,
                      "selected_frac": target})
        self._sow(key, stats)
        return x, {k: R.masked_mean(v, valid) if v.ndim else v for k, v in stats.items()}

    def _tdtf_layer(self, key, layer, x, positions, attention_mask, valid, decode, mode, prog, losses):
        """TDTF layer. Training ("topk"): the teacher runs the dense block on every token, dx = Block(x);
        the transition network predicts dx_t from the previous token's final state x_{t-1} + dx_{t-1};
        top-k of G picks the tokens whose stream is updated, x + G dx. Inference ("causal"): the
        student causal router picks the tokens (running budget), only they run the block (and write
        K/V)."""
        rc, t = self.routing, x.shape[1]
        router = self.routers[key]
        params = router.parameters(prog)
        logits = router.route_logits(x, self.previous[key](x, valid, decode))
        stats = {}
        if mode == "topk":
            dx, _ = layer(x, positions, attention_mask, decode)  # teacher: dense block, all tokens
            has_dx = valid
        else:
            has_dx, wanted = self._causal_selection(key, logits, valid, positions, prog, decode)
            stats["causal_overflow"] = wanted & ~has_dx
            dx = self._block_on(layer, x, positions, attention_mask, has_dx,
                                R.capacity_tokens(rc.causal_fraction, t), prog, decode)
        prev_final = self.previous_final[key](sg(x + dx), valid, decode)
        dx_hat = router.predict(prev_final)
        d_st, d_ch = R.mean_sq(dx), self._d_ch(dx, dx_hat)
        losses["tpn"].append(self._prior_loss(dx_hat, dx, dx, has_dx))
        ma = self._ma(key, router, d_st, has_dx, decode)
        crit = R.surprise_gate(sg(d_st), sg(d_ch), ma, gate=rc.gate, **params)  # see module doc
        g = crit["g_cont"]
        if mode == "topk":
            router.update_ema(d_st, valid)
            target = self._topk_selection(g, valid, prog)
            losses["causal"].append(R.bce_with_logits(logits, sg(target.astype(jnp.float32)), valid))
            stats.update(R.decision_stats(logits > 0, target, valid))
        else:
            target = has_dx
        x = x + (jnp.where(target, self._gate(g), 0.0)[..., None] * dx).astype(x.dtype)
        stats.update({"d_st": d_st, "d_ch": d_ch, "ma": ma, **crit, **params, "causal_logit": logits,
                      "selected_frac": target})
        self._sow(key, stats)
        return x, {k: R.masked_mean(v, valid) if v.ndim else v for k, v in stats.items()}




class RoutedGroup(_RoutedLayers, nn.Module):
    """One period of the routed layer pattern (``routing.every`` layers: dense / decision layers and
    one routed layer), the body that ``RoutedDecoder`` scans with ``scan_layers=True``. Params:
    ``layers_{j}`` and ``routers_{j}`` for the layer at position j of the group."""

    config: Any
    routing: R.RoutingConfig
    roles: tuple[str, ...]

    def setup(self):
        block = layers.remat(layers.DecoderBlock, self.config.remat, static_argnums=(4,))
        self.layers = [block(config=self.config, return_update=True) for _ in self.roles]
        self._make_routing_modules(self.roles)

    def __call__(self, x, positions, attention_mask, valid, decode, mode, prog):
        """x: [B, T, D] (the scan carry) -> (x, (stats {key: {stat: scalar}}, losses {name: [n]}))."""
        x, stats, losses = self._run_layers(self.layers, self.roles, x, positions, attention_mask, valid, decode,
                                            mode, prog)
        return x, (stats, {k: jnp.stack(v) for k, v in losses.items()})


class RoutedDecoder(_RoutedLayers, decoder_lib.Decoder):
    """Decoder-only LM with MoD / DTF / TDTF routed layers (see the module docstring).

    ``scan_layers=True``: the layers run as ``nn.scan`` over ``num_hidden_layers / every`` groups
    (``RoutedGroup``: one period of the role pattern); params ``groups/layers_{j}/...`` and
    ``groups/routers_{j}/...`` carry a leading [G] axis (layer i = group i // every, position
    i % every), as do the routers' state and the decode cache.
    """

    routing: R.RoutingConfig = R.RoutingConfig()

    def make_layers(self):
        if self.config.scan_layers:
            return None  # the scanned groups are built in setup
        return super().make_layers()

    def setup(self):
        super().setup()
        c, rc = self.config, self.routing
        rc.validate(c.num_hidden_layers)
        roles = rc.roles(c.num_hidden_layers)
        self.roles = roles
        if c.scan_layers:
            e = rc.every
            if c.num_hidden_layers % e:
                raise ValueError(f"model.scan_layers=True scans groups of routing.every={e} layers; "
                                 f"num_hidden_layers={c.num_hidden_layers} is not a multiple of it: set "
                                 "--config.model.scan_layers=False or change routing.every.")
            self.groups = nn.scan(
                RoutedGroup, variable_axes={"params": 0, "cache": 0, R.ROUTER_STATE: 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True}, in_axes=(nn.broadcast,) * 6,
                length=c.num_hidden_layers // e, metadata_params={nn.PARTITION_NAME: axes.LAYERS},
            )(c, rc, roles[:e])
        else:
            self._make_routing_modules(roles)
        self.progress = self.variable(R.ROUTER_STATE, "progress", lambda: jnp.zeros((), jnp.float32))

    def block_kwargs(self, index: int) -> dict[str, Any]:
        # Every block returns its residual update; the routing code adds it (gated where routed).
        return {**super().block_kwargs(index), "return_update": True}

    def _progress(self, progress: Array | float | None) -> Array:
        if progress is None:
            return self.progress.value
        progress = jnp.asarray(progress, jnp.float32)
        if self.is_mutable_collection(R.ROUTER_STATE) and not self.is_initializing():
            self.progress.value = progress
        return progress

    # -- forward -----------------------------------------------------------------------------------
    def backbone(
        self,
        inputs_embeds: Array,
        *,
        positions: Array | None = None,
        attention_mask: Array | None = None,
        decode: bool = False,
        mode: str = "topk",
        progress: Array | float | None = None,
    ) -> tuple[Array, dict[str, Array]]:
        """Runs the (routed) layers and the final norm.

        Args:
            inputs_embeds: [B, T, D]; positions, attention_mask, decode: as ``Decoder.backbone``.
            mode: "topk" | "causal" selection (decode forces "causal").
            progress: fraction of training done in [0, 1] (scheduled betas); stored in
                ``router_state`` when that collection is mutable, read from it when None.

        Returns:
            (hidden [B, T, D], aux): per routed layer i ``router/{i}/<stat>`` telemetry scalars and
            the loss terms ``loss/prior``, ``loss/causal``, ``loss/tpn`` and their weighted sum
            ``router_loss`` (add it to the LM loss).
        """
        if mode not in ("topk", "causal"):
            raise ValueError(f"mode={mode!r}: use 'topk' (training) or 'causal' (autoregressive).")
        if decode:
            mode = "causal"
        c, rc = self.config, self.routing
        b, t = inputs_embeds.shape[:2]
        x = inputs_embeds.astype(c.dtype)
        start = self.decode_position(t) if decode else 0
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32)[None, :], (b, t))
        positions = nn.with_logical_constraint(positions, (layers.ACT_BATCH, layers.ACT_LEN))
        valid = jnp.ones((b, t), jnp.bool_) if attention_mask is None else attention_mask.astype(jnp.bool_)
        prog = self._progress(progress)

        aux: dict[str, Array] = {}
        if c.scan_layers:
            x, (stats, stacked) = self.groups(x, positions, attention_mask, valid, decode, mode, prog)
            e = rc.every
            for j, group_stats in stats.items():  # each stat [G]: layer g * every + j
                for g in range(c.num_hidden_layers // e):
                    aux.update({f"router/{g * e + int(j)}/{k}": v[g] for k, v in group_stats.items()})
            losses = {name: [v.reshape(-1)] for name, v in stacked.items()}  # [G, n] -> one flat entry
        else:
            x, stats, losses = self._run_layers(self.layers, self.roles, x, positions, attention_mask, valid,
                                                decode, mode, prog)
            for i, layer_stats in stats.items():
                aux.update({f"router/{i}/{k}": v for k, v in layer_stats.items()})

        zero = jnp.zeros((), jnp.float32)
        mean = lambda name: jnp.mean(jnp.concatenate([jnp.reshape(v, (-1,)) for v in losses[name]])) \
            if losses.get(name) else zero
        aux["loss/prior"], aux["loss/causal"], aux["loss/tpn"] = mean("prior"), mean("causal"), mean("tpn")
        aux["router_loss"] = (rc.lambda_prior * aux["loss/prior"] + rc.lambda_causal * aux["loss/causal"]
                              + rc.lambda_tpn * aux["loss/tpn"])
        return self.norm(x), aux


def build(decoder_config: decoder_lib.DecoderConfig, routing_config) -> RoutedDecoder:
    """A ``RoutedDecoder`` from a DecoderConfig and ``config.routing`` (ConfigDict or RoutingConfig)."""
    rc = routing_config if isinstance(routing_config, R.RoutingConfig) else R.RoutingConfig.from_config(
        routing_config)
    rc.validate(decoder_config.num_hidden_layers)
    return RoutedDecoder(decoder_config, routing=rc)
