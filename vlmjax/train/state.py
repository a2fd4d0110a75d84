"""The training state pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes; checkpointed whole.

    step: int32 scalar, the number of optimizer updates applied so far.
    params: trainable parameters (fp32).
    opt_state: optax state (optimizer.skip_nonfinite wrapping the configured chain).
    model_state: non-trainable Linen collections (router moving averages, reuse caches), e.g.
      ``{"router_state": {...}}``; ``{}`` for a dense model. Updated by the forward pass, never
      differentiated.
    rng: raw uint32[2] PRNG key; the step number is folded in for each update, so a resumed run
      draws the same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    model_state: Any
    rng: jax.Array
