"""How much each sublayer moves the residual stream, in hidden, logit and probability space."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import metrics, validate
from prunerep_jax.analysis.lens import LENSES, logit_lens

Array = jax.Array


def sublayer_effects(params, config, residual: Array, *, lens: str = "final_norm",
                     temperature: float = 1.0) -> dict[str, Array]:
  """Compares consecutive residual states (before vs after each sublayer).

  Args:
    params, config: the model whose residual stream this is (params checked against config's
      layout, shapes only).
    residual: [2L + 1, B, P, D] floating, from `forward(params, config, ...).residual`.
    lens: how logits are read off an intermediate state (see `analysis.lens`).
    temperature: T > 0 of the probability space (Python, NumPy or JAX scalar; may be traced).

  Returns:
    dict of [2L, B, P] float32 arrays (entry 2l is block l's attention, 2l + 1 its MLP):
    cos_h, cos_z, cos_p, kl (KL(before || after)), kl_estimate, cos_p_estimate.
    Logits are formed one sublayer at a time inside one jitted function, never as
    [2L, B, P, V].
  """
  fn = "analysis.sublayer_effects"
  validate.params(fn, params, config)
  lens = validate.choice(fn, "lens", lens, LENSES)
  temperature = validate.temperature(fn, temperature, allow_zero=False)
  depth, D = 2 * config.num_layers + 1, config.hidden_size
  shape, dtype = tuple(np.shape(residual)), getattr(residual, "dtype", None)
  if (len(shape) != 4 or shape[0] != depth or shape[3] != D or dtype is None
      or not jnp.issubdtype(dtype, jnp.floating)):
    raise validate.fail(
        fn, "residual", residual,
        f"floating residual states [2L + 1, B, P, D] = [{depth}, B, P, {D}] for this config "
        f"(L = {config.num_layers}), as forward(...).residual returns; got shape {shape}")
  return _effects(params, config, residual, lens, jnp.asarray(temperature, jnp.float32))


@functools.partial(jax.jit, static_argnums=(1, 3))
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
