"""Child process of test_multi_host.py: one of two local processes with 2 CPU devices each.

Run as `python tests/parallel/_multi_host.py PROCESS_ID PORT OUT.json` with XLA_FLAGS holding
--xla_force_host_platform_device_count=2. Both processes join through
`parallel.initialize_distributed` (coordinator on localhost:PORT, gloo CPU collectives), so the
meshes span 4 devices in 2 processes; each process also computes the one-device reference on its
own first device and records how far the mesh results are from it.
"""

import json
import sys

import jax
import numpy as np

import prunerep_jax as pj
from prunerep_jax import parallel
from prunerep_jax.tasks.perplexity import perplexity
from _multi_device import EVEN, random_params  # the same config, logits of order 1


def main(process_id: int, port: int, out_path: str) -> None:
  # Importing JAX starts no backend; this must come before the first computation.
  parallel.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
  params = jax.device_put(random_params(EVEN, 0))
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, EVEN.vocab_size, (3, 12))  # 3 rows: padded to 4 over data:2
  calib = rng.integers(0, EVEN.vocab_size, (6, 8))
  windows = rng.integers(0, EVEN.vocab_size, (5, 10))
  r = {"process_count": jax.process_count(), "device_count": jax.device_count(),
       "local_device_count": jax.local_device_count()}

  mesh = parallel.make_mesh("data:2,model:2")
  ref = pj.forward(params, EVEN, tokens)
  out = pj.forward(params, EVEN, tokens, mesh=mesh)
  r["logits_fully_addressable"] = bool(out.logits.is_fully_addressable)
  r["logits_diff"] = float(np.max(np.abs(parallel.fetch(out.logits) - np.asarray(ref.logits))))
  r["greedy_equal"] = bool(np.array_equal(
      parallel.fetch(pj.generate(params, EVEN, tokens, 5, mesh=mesh).tokens),
      np.asarray(pj.generate(params, EVEN, tokens, 5).tokens)))
  nll = perplexity(params, EVEN, windows, batch_size=2)["nll"]
  nll_mesh = perplexity(params, EVEN, windows, batch_size=2, mesh=mesh)["nll"]
  r["nll_rel"] = abs(nll_mesh - nll) / nll
  data4 = parallel.make_mesh("data:4")
  # the statistics of all four input groups are summed across the processes either way
  linears = ("attn/q_proj", "mlp/down_proj")
  wanda = pj.prune.wanda(params, EVEN, 0.5, calibration=calib, batch_size=4, include=linears,
                         mesh=data4)
  dense = pj.prune.wanda(params, EVEN, 0.5, calibration=calib, batch_size=4, include=linears)
  r["wanda_masks_equal"] = all(
      np.array_equal(parallel.fetch(a), np.asarray(b)) for a, b in
      zip(jax.tree_util.tree_leaves(wanda.masks), jax.tree_util.tree_leaves(dense.masks)))
  with open(out_path, "w") as f:
    json.dump(r, f)


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
