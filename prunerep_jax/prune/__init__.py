"""Pruning transforms: pure functions params -> PruneResult(params, masks, report)."""

from prunerep_jax.prune.patterns import NM, Unstructured, parse_pattern
from prunerep_jax.prune.result import PruneResult
from prunerep_jax.prune.calibrate import Calibration, calibration
from prunerep_jax.prune.magnitude import magnitude
from prunerep_jax.prune.sparsegpt import sparsegpt
from prunerep_jax.prune.wanda import wanda
