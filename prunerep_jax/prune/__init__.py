"""Pruning transforms: pure functions params -> PruneResult(params, masks, report)."""

from prunerep_jax.prune.patterns import NM, Unstructured, parse_pattern
from prunerep_jax.prune.result import PruneResult
