"""The reproduction study: does pruning keep non-generative scores while generation collapses?

  grid       the cells (pruned models), evaluation sizes and analyses of each profile
  suites     both task kinds on one model, and its fidelity to the dense model
  cells      pruning one cell, and the on-disk cache that lets an interrupted run resume
  analyses   the analyses of `prunerep_jax.analysis` at the chosen settings
  report     the claims of the paper, the rules for "held", report.md and the console summary
  figures    the sweep, main-table and analysis figures
  run        the whole study into one output directory (`experiments.reproduce` calls it)
  beyond     beyond the paper: cosine vs KL drop ranking, uniform / OWL / KL-allocated Wanda,
             before vs after recovery, at equal compression (`experiments.beyond` calls it);
             beyond_report (its verdict rules and report.md) and beyond_figures
"""

from prunerep_jax.study.grid import PROFILES, Cell, Profile, profile
from prunerep_jax.study.run import DTYPES, Options, run
from prunerep_jax.study.suites import Sources
