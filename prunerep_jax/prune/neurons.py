"""Structured MLP pruning: remove whole intermediate channels ("neurons") of a SwiGLU MLP.

Channel f of the MLP is column f of the gate and up kernels [D, F] and row f of the down kernel
[F, D]. Its score (the paper's reference code) is mean_d |W_down[f, d]| times the summed squared
activation that enters the down projection on channel f; the lowest-scoring fraction is removed.
Zeroing a channel's gate and up columns and its down row is exactly removing it (silu(0) * 0 = 0),
so `mask_neurons` keeps shapes (layers stay stackable) and `remove_neurons` actually shrinks the
kernels. Models with MLP biases (config.mlp_bias) must also drop or zero entry f of the gate and up
biases [..., F], with the same keep-mask; these functions touch kernels only.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from prunerep_jax import parallel
from prunerep_jax import validate
from prunerep_jax.prune import calibrate
from prunerep_jax.prune import patterns
from prunerep_jax.prune.result import PruneResult


def neuron_scores(w_down: jax.Array, act_sq_sum: jax.Array) -> jax.Array:
  """Importance of each intermediate channel: mean_d |W_down[f, d]| * sum_t a_f(t)^2.

  Args:
    w_down: [..., F, D] down-projection kernel.
    act_sq_sum: [..., F] sum over calibration tokens of the squared input of the down projection.

  Returns:
    [..., F] float32 scores.

  Shapes are checked; values are not (no host round trip): `neurons` refuses non-finite params at
  its entry.
  """
  w_shape, a_shape = tuple(np.shape(w_down)), tuple(np.shape(act_sq_sum))
  if len(w_shape) < 2:
    raise ValueError(f"neuron_scores: w_down must have shape [..., F, D], got {w_shape}")
  if a_shape != w_shape[:-1]:
    raise ValueError(f"neuron_scores: act_sq_sum must have shape [..., F] = {w_shape[:-1]} to "
                     f"match w_down of shape {w_shape}, got {a_shape}")
  mean_abs = jnp.mean(jnp.abs(jnp.asarray(w_down, jnp.float32)), axis=-1)
  return mean_abs * jnp.asarray(act_sq_sum, jnp.float32)


def neuron_keep(scores: jax.Array, sparsity: float) -> jax.Array:
  """Keep-mask over channels: drops the floor(sparsity * F) lowest scores.

  Args:
    scores: [..., F] channel scores (neuron_scores).
    sparsity: fraction of channels removed, in [0, 1).

  Returns:
    [..., F] bool, True = keep; exactly floor(sparsity * F) False, ties broken by channel index.
  """
  sparsity = patterns.check_sparsity(sparsity)
  if np.ndim(scores) < 1:
    raise ValueError(f"neuron_keep: scores must have shape [..., F], got {tuple(np.shape(scores))}")
  k = patterns.prune_count(np.shape(scores)[-1], sparsity)
  if k == 0:
    return jnp.ones(np.shape(scores), bool)
  order = jnp.argsort(scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1, stable=True) >= k


def _check_mlp(w_gate, w_up, w_down, keep, fn: str) -> None:
  g, u, d, k = (tuple(np.shape(a)) for a in (w_gate, w_up, w_down, keep))
  if len(g) < 2 or u != g or d != g[:-2] + (g[-1], g[-2]):
    raise ValueError(f"{fn}: expected w_gate and w_up [..., D, F] and w_down [..., F, D], got "
                     f"shapes {g}, {u}, {d}")
  if k != g[:-2] + (g[-1],):
    raise ValueError(f"{fn}: keep must have shape [..., F] = {g[:-2] + (g[-1],)}, got {k}")


def mask_neurons(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, keep: jax.Array):
  """Zeroes the dropped channels, keeping every shape (jittable; works on a stacked [L, ...]).

  Args:
    w_gate: [..., D, F] gate kernel.
    w_up: [..., D, F] up kernel.
    w_down: [..., F, D] down kernel.
    keep: [..., F] bool, True = keep.

  Returns:
    (w_gate, w_up, w_down) with the dropped channels zero and the rest bit for bit.
  """
  _check_mlp(w_gate, w_up, w_down, keep, "mask_neurons")
  keep = jnp.asarray(keep, bool)
  zero = lambda w, m: jnp.where(m, w, jnp.zeros((), w.dtype))
  return (zero(w_gate, keep[..., None, :]), zero(w_up, keep[..., None, :]),
          zero(w_down, keep[..., :, None]))


def remove_neurons(w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array, keep):
  """Removes the dropped channels of one layer, shrinking F to the number kept.

  Not jittable: the output shape depends on `keep`'s values.

  Args:
    w_gate: [D, F] gate kernel.
    w_up: [D, F] up kernel.
    w_down: [F, D] down kernel.
    keep: [F] bool, True = keep (concrete).

  Returns:
    (w_gate [D, F'], w_up [D, F'], w_down [F', D]), channels in their original order.
  """
  _check_mlp(w_gate, w_up, w_down, keep, "remove_neurons")
  if np.ndim(w_gate) != 2:
    raise ValueError(f"remove_neurons: expects one layer, w_gate [D, F], got shape "
                     f"{tuple(np.shape(w_gate))}; use mask_neurons for stacked layers")
  idx = np.flatnonzero(np.asarray(keep, bool))
  return w_gate[:, idx], w_up[:, idx], w_down[idx, :]


def neurons(params, config, sparsity: float = 0.5, *, calibration=None, remove: bool = True,
            batch_size: int = 8, mesh=None, donate: bool = False) -> PruneResult:
  """Structured MLP pruning: removes the lowest-scoring intermediate channels of every layer.

  Scored sequentially (layer l on the outputs of the already pruned layers 0..l-1) by
  mean_d |W_down[f, d]| * sum_t a_f(t)^2, with a the input of the down projection.

  Args:
    params, config: the dense model (not modified unless `donate`).
    sparsity: fraction of the F channels removed in every layer, in [0, 1).
    calibration: a `Calibration` or int tokens [N, T].
    remove: shrink the kernels (config.intermediate_size becomes the kept count) or, if False,
      zero the dropped channels and keep every shape.
    batch_size: calibration samples per batch.
    mesh: None, a ("data", "model") mesh or a spec such as "data:4" (`prunerep_jax.parallel`):
      params are placed on it and the calibration batches split over its data axis (statistics
      summed across it); the pruned params come back placed on the mesh.
    donate: True to give `params`' block weights up for the result (JAX buffer donation):
      the pruned layers are written into their buffers in place, saving one copy of the block
      weights (425 MB for the default model in float32); the given `params["layers"]` arrays are
      deleted (reading them afterwards raises). Default False: `params` is left as it was.

  Returns:
    PruneResult; masks["layers"]["mlp"]["channels"] is the [L, F] keep-mask of channels.
  """
  t0 = time.perf_counter()
  sparsity = validate.number("neurons", "sparsity", sparsity, minimum=0.0, maximum=1.0,
                             max_open=True)
  remove = validate.boolean("neurons", "remove", remove)
  batch_size = validate.integer("neurons", "batch_size", batch_size, minimum=1)
  donate = validate.boolean("neurons", "donate", donate)
  validate.params("neurons", params, config, finite=True)
  calib = calibrate.as_calibration(calibration, config, "neurons")
  mesh = parallel.as_mesh("neurons", mesh)
  if sparsity == 0.0:
    keep = jnp.ones((config.num_layers, config.intermediate_size), bool)
    report = {"method": "neurons", "sparsity": 0.0, "calibration": None, "kept_channels":
              config.intermediate_size, "timings": {"total_s": time.perf_counter() - t0}}
    return PruneResult(params, {"layers": {"mlp": {"channels": keep}}}, report, config)

  def prune_layer(l, layer_p, stats, ntokens):
    del l, ntokens
    mlp = layer_p["mlp"]
    keep = neuron_keep(neuron_scores(mlp["down_proj"]["kernel"], stats["down_in"]), sparsity)
    gate, up, down = mask_neurons(mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"],
                                  mlp["down_proj"]["kernel"], keep)
    new_mlp = {"gate_proj": dict(mlp["gate_proj"], kernel=gate),
               "up_proj": dict(mlp["up_proj"], kernel=up),
               "down_proj": dict(mlp["down_proj"], kernel=down)}
    for name in ("gate_proj", "up_proj"):  # silu(b_g) * b_u of a dropped channel must vanish too
      if "bias" in mlp[name]:
        new_mlp[name]["bias"] = jnp.where(keep, mlp[name]["bias"], 0)
    return dict(layer_p, mlp=new_mlp), keep, {}

  new_params, keep, _, timings = calibrate.sequential(
      params, config, calib, "sq_sum", prune_layer, batch_size=batch_size, method="neurons",
      mesh=mesh, donate=donate)
  keeps = np.asarray(keep)  # [L, F], stacked by the driver
  new_config = config
  if remove:
    idx = jnp.asarray(np.stack([np.flatnonzero(k) for k in keeps]))  # [L, F']
    mlp = new_params["layers"]["mlp"]
    cut = lambda x, ix, axis: jnp.take_along_axis(x, ix, axis=axis)
    new_mlp = {
        name: {"kernel": cut(mlp[name]["kernel"], idx[:, None, :], 2),  # [L, D, F']
               **({"bias": cut(mlp[name]["bias"], idx, 1)} if "bias" in mlp[name] else {})}
        for name in ("gate_proj", "up_proj")}
    new_mlp["down_proj"] = dict(mlp["down_proj"],
                                kernel=cut(mlp["down_proj"]["kernel"], idx[:, :, None], 1))
    new_params = dict(new_params, layers=dict(new_params["layers"], mlp=new_mlp))
    new_config = config.replace(intermediate_size=int(idx.shape[1]))
  report = {"method": "neurons", "sparsity": sparsity, "remove": remove,
            "calibration": calib.info, "kept_channels": int(keeps[0].sum()),
            "per_layer_sparsity": [float(1 - k.mean()) for k in keeps],
            "timings": dict(timings, total_s=time.perf_counter() - t0)}
  return PruneResult(new_params, {"layers": {"mlp": {"channels": keep}}}, report, new_config)
