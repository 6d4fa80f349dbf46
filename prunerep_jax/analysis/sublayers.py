"""How much each sublayer moves the residual stream, in hidden, logit and probability space."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from prunerep_jax import metrics
from prunerep_jax.analysis.lens import check_lens, logit_lens

Array = jax.Array


def sublayer_effects(params, config, residual: Array, *, lens: str = "final_norm",
                     temperature: float = 1.0) -> dict[str, Array]:
  """Compares consecutive residual states (before vs after each sublayer).

  Args:
    residual: [2L + 1, B, P, D] from `forward(...).residual`.
    lens: how logits are read off an intermediate state (see `analysis.lens`).
    temperature: T of the probability space.

  Returns:
    dict of [2L, B, P] float32 arrays (entry 2l is block l's attention, 2l + 1 its MLP):
    cos_h, cos_z, cos_p, kl (KL(before || after)), kl_estimate, cos_p_estimate.
    Logits are formed one sublayer at a time inside one jitted function, never as
    [2L, B, P, V].
  """
  check_lens(lens)
  if not temperature > 0:
    raise ValueError(f"temperature={temperature!r}: expected a number > 0")
  return _effects(params, config, residual, lens, float(temperature))


@functools.partial(jax.jit, static_argnums=(1, 3, 4))
def _effects(params, config, residual, lens, temperature):
  def one(pair):
    before, after = pair
    z0 = logit_lens(params, config, before, lens)
    z1 = logit_lens(params, config, after, lens)
    p0, p1 = metrics.probs(z0, temperature), metrics.probs(z1, temperature)
    return {
        "cos_h": metrics.cosine(before, after),
        "cos_z": metrics.cosine(z0, z1),
        "cos_p": metrics.cosine(p0, p1),
        "kl": metrics.kl(z0, z1, temperature),
        "kl_estimate": metrics.kl_estimate(z0, z1, temperature),
        "cos_p_estimate": metrics.cos_p_estimate(z0, z1, temperature),
    }

  return jax.lax.map(one, (residual[:-1], residual[1:]))
