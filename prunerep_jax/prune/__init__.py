"""Pruning transforms: pure functions params -> PruneResult(params, masks, report)."""

from prunerep_jax import validate

from prunerep_jax.prune.patterns import NM, Unstructured, parse_pattern
from prunerep_jax.prune.result import PruneResult
from prunerep_jax.prune.calibrate import Calibration, calibration
from prunerep_jax.prune.magnitude import magnitude
from prunerep_jax.prune.sparsegpt import sparsegpt
from prunerep_jax.prune.wanda import wanda
from prunerep_jax.prune.drop import drop_blocks, drop_sublayers
from prunerep_jax.prune.neurons import neurons
from prunerep_jax.prune import allocate, kl_score

# name -> transform, for launchers and configs.
METHODS = {
    "magnitude": magnitude,
    "wanda": wanda,
    "sparsegpt": sparsegpt,
    "neurons": neurons,
    "drop_sublayers": drop_sublayers,
    "drop_blocks": drop_blocks,
}


def get(method: str):
  """The transform registered under `method` (see METHODS)."""
  return METHODS[validate.choice("get", "method", method, sorted(METHODS))]
