"""Analyses of how representations move: logit lens, per-sublayer effects."""

from prunerep_jax.analysis.lens import LENSES, logit_lens
from prunerep_jax.analysis.sublayers import sublayer_effects
