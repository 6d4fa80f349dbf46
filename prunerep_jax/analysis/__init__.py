"""Analyses of how pruning moves representations (see ../shared/PAPER.md, "Analyses").

  layerwise         one sublayer pruned at a time in the dense context, per layer (paper Fig. 2)
  drift             dense vs pruned decoding side by side, free and teacher-forced (Figs. 6, 8)
  option_subspace   multiple-choice option tokens vs the whole vocabulary (Fig. 7)
  theorem_check     second-order estimates vs exact KL and 1 - cos(p) (Fig. 6)
  sublayer_effects  how much each dense sublayer moves the residual stream
  logit_lens        logits read off an intermediate state ("final_norm" or "raw")

Every analysis returns a `Result` that saves to JSON/CSV/NPZ and loads back; `prunerep_jax.plots`
draws the figures from those files.
"""

from prunerep_jax.analysis.lens import LENSES, logit_lens
from prunerep_jax.analysis.sublayers import sublayer_effects
from prunerep_jax.analysis.results import Result
from prunerep_jax.analysis.layerwise import layerwise
from prunerep_jax.analysis.drift import drift
from prunerep_jax.analysis.subspace import option_subspace
from prunerep_jax.analysis.theory import theorem_check
