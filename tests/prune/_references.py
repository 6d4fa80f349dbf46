"""float64 NumPy references shared by the pruning tests.

Written per output row of a torch [O, I] matrix, as the papers write them; callers transpose
Flax [I, O] arrays, so orientation bugs show.
"""

import numpy as np


def ref_per_row_keep(s_oi, sparsity):
  keep = np.ones(s_oi.shape, bool)
  k = int(s_oi.shape[1] * sparsity)
  for r in range(s_oi.shape[0]):
    keep[r, np.argsort(s_oi[r], kind="stable")[:k]] = False
  return keep


def ref_nm_keep(s_oi, n, m):
  keep = np.ones(s_oi.shape, bool)
  for r in range(s_oi.shape[0]):
    for g in range(0, s_oi.shape[1], m):
      keep[r, g + np.argsort(s_oi[r, g:g + m], kind="stable")[:n]] = False
  return keep
