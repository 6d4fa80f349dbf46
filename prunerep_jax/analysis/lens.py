"""Reading logits off an intermediate residual state.

Two lenses, and every result records which one it used:
  "final_norm": LM head applied to final_norm(h), the model's own path (the usual logit lens).
  "raw":        LM head applied to h itself, as the original authors' code does.
"""

from __future__ import annotations

import jax

from prunerep_jax import model as M
from prunerep_jax import validate

LENSES = ("final_norm", "raw")


def logit_lens(params, config, h: jax.Array, lens: str = "final_norm") -> jax.Array:
  """h [..., D] residual state -> logits [..., V] float32."""
  lens = validate.choice("analysis.logit_lens", "lens", lens, LENSES)
  x = M.final_norm(params, config, h) if lens == "final_norm" else h
  return M.lm_head(params, config, x)
