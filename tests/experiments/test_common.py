"""experiments._common.jsonable: what report.json holds is strict JSON, whatever the report held."""

import json

import jax.numpy as jnp
import numpy as np

from experiments._common import jsonable


def test_jsonable_gives_strict_json_for_numpy_jax_and_non_finite_values():
  value = {"ppl": float("inf"), "kl": np.float32(0.25), "n": np.int64(7), "nan": float("nan"),
           "flag": np.bool_(True), "pairs": ((1, "attn"),), 3: jnp.arange(3), "neg": -np.inf,
           "none": None}
  out = jsonable(value)
  assert out == {"ppl": "inf", "kl": 0.25, "n": 7, "nan": "nan", "flag": True,
                 "pairs": [[1, "attn"]], "3": [0, 1, 2], "neg": "-inf", "none": None}
  assert type(out["kl"]) is float and type(out["n"]) is int and type(out["flag"]) is bool
  json.dumps(out, allow_nan=False)
