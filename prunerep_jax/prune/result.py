"""What every pruning transform returns."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from prunerep_jax.config import Config


@dataclasses.dataclass(frozen=True)
class PruneResult:
  """A pruned model, never sharing mutable state with the input.

  Attributes:
    params: the pruned params pytree (same layout as the input, or fewer layers after a block
      drop; see `config`).
    masks: keep-masks (bool, True = kept) with the structure of the pruned kernels, e.g.
      masks["layers"]["attn"]["q_proj"]["kernel"] [L, D, N*H]; None for methods that remove whole
      sublayers or blocks (see report["dropped"]).
    report: JSON-serialisable dict: method, arguments, per-matrix and per-layer sparsity,
      importance scores, dropped sublayers/blocks, the calibration used (source, nsamples,
      seqlen, seed) and timings.
    config: the config the pruned params run with (differs from the input only when blocks are
      removed or MLP channels cut).
  """

  params: Any
  masks: Optional[Any]
  report: dict
  config: Config
