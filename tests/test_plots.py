"""prunerep_jax.plots: every figure drawn from saved result files alone, on a tiny random model.

The results are computed once per module (a 2-layer model, two sublayers dropped) and saved; each
figure is then drawn from a copy of the directory that holds only the files.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from prunerep_jax import plots, validate
from prunerep_jax.analysis import drift, layerwise, option_subspace, theorem_check
from prunerep_jax.analysis.results import Result
from prunerep_jax.prune.drop import drop_listed

sys.path.insert(0, str(Path(__file__).parent / "tasks"))
import _tiny_model as tiny  # noqa: E402  (the suites' tiny model and byte-level chat tokenizer)

NAMES = {"layerwise": "layerwise", "drift": "drift", "theorem_layerwise": "theorem_check",
         "theorem_drift": "theorem_check", "option_subspace": "option_subspace"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A directory with a saved result of every kind (and files that are not results)."""
  config, params, tok = tiny.config(), tiny.params(0), tiny.tokenizer()
  pruned = drop_listed(params, config, [(0, "attn"), (1, "mlp")])
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, tiny.VOCAB, size=(3, 10)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[0, :4] = 0
  lw = layerwise(params, config, tokens, pruned, attention_mask=mask)
  dr = drift(params, pruned.params, config, tokens, 6, prompt_mask=mask, tokenizer=tok)
  letters = [tok.convert_tokens_to_ids(x) for x in "ABCD"]
  os_ = option_subspace(params, pruned.params, config, tokens, letters, answers=[0, 1, 3],
                        prompt_mask=mask, option_labels=list("ABCD"), tokenizer=tok)
  root = tmp_path_factory.mktemp("results")
  for name, result in (("layerwise", lw), ("drift", dr), ("theorem_layerwise", theorem_check(lw)),
                       ("theorem_drift", theorem_check(dr)), ("option_subspace", os_)):
    result.save(str(root), name)
  (root / "run.json").write_text(json.dumps({"launcher": "x", "outputs": []}))
  (root / "other.json").write_text(json.dumps({"kind": "unknown"}))
  (root / "other.npz").write_bytes(b"")
  return root


@pytest.fixture()
def files_only(saved, tmp_path):
  """A fresh copy of the saved files: figures cannot lean on anything but them."""
  out = tmp_path / "copy"
  shutil.copytree(saved, out)
  return out


def check_png(path, width_in, height_in):
  """A PNG of the figure's size whose pixels are far from one colour."""
  assert os.path.getsize(path) > 10_000
  image = matplotlib.image.imread(path)
  assert image.shape[:2] == (round(height_in * plots.DPI), round(width_in * plots.DPI))
  colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
  assert len(colours) > 50 and image[..., :3].std() > 0.05


@pytest.mark.parametrize("fn,name,size", [
    (plots.layerwise, "layerwise", (15, 11.5)),
    (plots.drift, "drift", (15, 8.5)),
    (plots.theorem, "theorem_layerwise", (12.5, 10)),
    (plots.theorem, "theorem_drift", (12.5, 10)),
    (plots.option_subspace, "option_subspace", (16, 9.5)),
])
def test_each_figure_is_drawn_from_the_saved_files(files_only, fn, name, size):
  path = fn(str(files_only), name)
  assert path == str(files_only / f"{name}.png")
  check_png(path, *size)


def test_out_png_elsewhere_and_overwrite_refused(files_only, tmp_path):
  target = tmp_path / "figs" / "lw.png"
  assert plots.layerwise(str(files_only), "layerwise", str(target)) == str(target)
  before = target.read_bytes()
  with pytest.raises(FileExistsError, match="already exists"):
    plots.layerwise(str(files_only), "layerwise", str(target), overwrite=False)
  assert target.read_bytes() == before


def test_plot_all_draws_every_result_and_skips_other_json(files_only):
  paths = plots.plot_all(str(files_only))
  assert paths == [str(files_only / f"{n}.png") for n in sorted(NAMES)]
  assert plots.saved_results(str(files_only)) == sorted(NAMES.items())
  assert not (files_only / "run.png").exists() and not (files_only / "other.png").exists()


def test_missing_result_and_wrong_kind_are_refused(files_only):
  with pytest.raises(FileNotFoundError, match=r"plots.drift\(name='nope'\): expected a result "
                     r"saved in .*nope.json does not exist"):
    plots.drift(str(files_only), "nope")
  with pytest.raises(validate.ArgumentError, match=r"plots.drift\(name='layerwise'\): expected a "
                     r"saved drift result; layerwise.json holds a 'layerwise' result"):
    plots.drift(str(files_only), "layerwise")
  with pytest.raises(FileNotFoundError, match="plots.plot_all"):
    plots.plot_all(str(files_only / "absent"))


def test_option_subspace_item_is_checked_and_default_follows_the_rule(files_only):
  result = Result.load(str(files_only), "option_subspace")
  items = result.table("items")
  expected = next((r["item"] for r in items if r["global_flip"] and r["option_survives"]),
                  next((r["item"] for r in items if r["global_flip"]), 0))
  assert plots.default_item(result) == expected
  with pytest.raises(validate.ArgumentError, match=r"item=3\): expected an item index in "
                     r"\[0, 3\)"):
    plots.option_subspace(str(files_only), "option_subspace", item=3)
  check_png(plots.option_subspace(str(files_only), "option_subspace", item=2), 16, 9.5)


def test_per_step_statistics_use_only_valid_entries():
  values = np.array([[1.0, 2.0, 5.0], [3.0, np.nan, 7.0], [9.0, 4.0, 0.5]])
  valid = np.array([[True, True, False], [True, True, False], [False, True, False]])
  mean, lo, hi = plots._per_step(values, valid)
  np.testing.assert_allclose(mean[:2], [2.0, 3.0])
  np.testing.assert_allclose(lo[:2], [1.0, 2.0])
  np.testing.assert_allclose(hi[:2], [3.0, 4.0])
  assert np.isnan(mean[2]) and np.isnan(lo[2]) and np.isnan(hi[2])  # no prompt still running


def test_drawing_neither_imports_pyplot_nor_changes_matplotlib_state(saved, tmp_path):
  # rcParams read with _get: reading "backend" the ordinary way would itself import pyplot.
  state = ("(matplotlib.rcParams._get_backend_or_none(), {k: repr(matplotlib.rcParams._get(k)) "
           "for k in matplotlib.rcParams.keys()})")
  code = (f"import sys, matplotlib; before = {state}; "
          "from prunerep_jax import plots; "
          f"plots.drift({str(saved)!r}, 'drift', {str(tmp_path / 'd.png')!r}); "
          "print('pyplot' if 'matplotlib.pyplot' in sys.modules else 'no-pyplot', "
          f"{state} == before)")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        cwd=Path(__file__).parents[1], env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["no-pyplot", "True"]
