"""pj.recover: structure kept exactly (masks, N:M groups, dropped sublayers), the loss goes down,
LoRA merges inside the masks, checkpoints resume the same trajectory, bad input is refused."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prunerep_jax as pj
from prunerep_jax.prune import drop
from prunerep_jax.recover import default_optimizer
from prunerep_jax.validate import ArgumentError

CFG = pj.Config(family="llama", vocab_size=97, hidden_size=32, intermediate_size=64,
                num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8)
DATA = np.random.RandomState(0).randint(0, 97, (8, 16)).astype(np.int32)
# One optimizer object shared by the runs below, so they reuse one compiled step.
ADAM = optax.adam(3e-3)
STEPS = 24
def assert_trees_equal(a, b, **tol):
  """Same structure and leaves: bitwise without tolerances, else within rtol/atol."""
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    if tol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


LINEARS = [("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]


@pytest.fixture(scope="module")
def dense():
  return pj.init_params(CFG, jax.random.key(3))


@pytest.fixture(scope="module")
def pruned(dense):
  """2:4 magnitude pruning, then layer 1's attention dropped (its o_proj zeroed)."""
  nm = pj.prune.magnitude(dense, CFG, "2:4")
  params = drop.zero_sublayers(nm.params, [(1, "attn")])
  report = dict(nm.report, dropped=[{"layer": 1, "sublayer": "attn"}])
  return pj.prune.PruneResult(params, nm.masks, report, CFG)


@pytest.fixture(scope="module")
def recovered(dense, pruned):
  return pj.recover(dense, pruned, CFG, DATA, steps=STEPS, optimizer=ADAM)


@pytest.fixture(scope="module")
def lora(dense, pruned):
  return pj.recover(dense, pruned, CFG, DATA, steps=STEPS, loss="next_token", lora_rank=4,
                    optimizer=optax.adam(1e-2))


def _kernel(params, sub, name):
  return np.asarray(params["layers"][sub][name]["kernel"])


def _check_structure(result, pruned):
  changed = 0
  for sub, name in LINEARS:
    w = _kernel(result.params, sub, name)
    keep = np.asarray(pruned.masks["layers"][sub][name]["kernel"])
    assert np.all(w[~keep] == 0.0), f"{sub}/{name}: a pruned weight moved"
    groups = (w != 0).reshape(CFG.num_layers, -1, 4, w.shape[-1]).sum(axis=2)
    assert groups.max() <= 2, f"{sub}/{name}: an N:M group lost a zero"
    changed += int(np.sum(w != _kernel(pruned.params, sub, name)))
  assert np.all(_kernel(result.params, "attn", "o_proj")[1] == 0.0)  # still dropped
  assert changed > 0
  # Everything but the trained kernels is the pruned model's, bit for bit.
  frozen = lambda p: {k: v for k, v in p.items() if k != "layers"}
  assert_trees_equal(frozen(result.params), frozen(pruned.params))
  assert_trees_equal(result.params["layers"]["attn_norm"], pruned.params["layers"]["attn_norm"])
  assert result.masks is pruned.masks and result.config == pruned.config


def test_recovery_keeps_masks_nm_groups_and_dropped_sublayers(recovered, pruned):
  _check_structure(recovered, pruned)


def test_recovery_lowers_the_distillation_loss(recovered, pruned, dense):
  losses = recovered.report["recovery"]["losses"]
  assert len(losses) == STEPS and recovered.report["recovery"]["loss"] == "kl_to_dense"
  # Two consecutive steps cover the 8 windows once (batch 4): compare whole-data losses.
  assert np.mean(losses[-2:]) < 0.5 * np.mean(losses[:2])
  z = lambda p: pj.forward(p, CFG, DATA, capture=False).logits
  kl = lambda p: float(jnp.mean(pj.metrics.kl(z(dense), z(p))))
  assert kl(recovered.params) < 0.5 * kl(pruned.params)
  assert recovered.report["method"] == "magnitude"  # the pruning report is kept


def test_lora_merges_inside_the_masks_and_lowers_the_next_token_loss(lora, pruned):
  _check_structure(lora, pruned)
  losses = lora.report["recovery"]["losses"]
  assert lora.report["recovery"]["lora_rank"] == 4
  assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05


def test_resumed_run_continues_the_same_trajectory(dense, pruned, recovered, tmp_path):
  first = tmp_path / "first"
  full = pj.recover(dense, pruned, CFG, DATA, steps=STEPS, optimizer=ADAM, checkpoint_dir=first,
                    checkpoint_every=8, keep_checkpoints=2)
  np.testing.assert_array_equal(full.report["recovery"]["losses"],
                                recovered.report["recovery"]["losses"])
  assert sorted(os.listdir(first)) == ["step_00000016", "step_00000024"]
  # An interrupted run: only the checkpoint at step 16 exists.
  second = tmp_path / "second"
  second.mkdir()
  shutil.copytree(first / "step_00000016", second / "step_00000016")
  resumed = pj.recover(dense, pruned, CFG, DATA, steps=STEPS, optimizer=ADAM,
                       checkpoint_dir=second, checkpoint_every=8, resume=True)
  assert resumed.report["recovery"]["resumed_from"] == 16
  np.testing.assert_allclose(resumed.report["recovery"]["losses"],
                             full.report["recovery"]["losses"], rtol=1e-6)
  assert_trees_equal(resumed.params, full.params, rtol=1e-6, atol=1e-7)
  with open(second / "step_00000024" / "meta.json") as f:
    assert json.load(f)["step"] == 24


def test_existing_checkpoints_need_resume_and_the_same_run(dense, pruned, tmp_path):
  pj.recover(dense, pruned, CFG, DATA, steps=2, optimizer=ADAM, checkpoint_dir=tmp_path)
  with pytest.raises(FileExistsError, match=r"holds checkpoints of a run \(up to step 2\); pass "
                     r"resume=True"):
    pj.recover(dense, pruned, CFG, DATA, steps=2, optimizer=ADAM, checkpoint_dir=tmp_path)
  with pytest.raises(ArgumentError, match=r"recover\(resume=True\): expected a checkpoint of the "
                     r"same run; .* was written with steps=2, this run has steps=3"):
    pj.recover(dense, pruned, CFG, DATA, steps=3, optimizer=ADAM, checkpoint_dir=tmp_path,
               resume=True)


def test_default_optimizer_is_a_warmup_cosine_adamw():
  opt = default_optimizer(100, learning_rate=1e-3)
  assert isinstance(opt, optax.GradientTransformation)
  params = {"w": jnp.ones(3)}
  state = opt.init(params)
  updates, state = opt.update({"w": jnp.ones(3)}, state, params)
  np.testing.assert_allclose(updates["w"], 0.0)  # step 0 of the warmup has learning rate 0


@pytest.mark.parametrize("kwargs, exc, regex", [
    (dict(optimizer=optax.adam), TypeError,
     r"recover\(optimizer=<function adam .*\): expected an optax.GradientTransformation"),
    (dict(optimizer="adam"), TypeError, r"recover\(optimizer='adam'\)"),
    (dict(steps=0), ArgumentError, r"recover\(steps=0\): expected an integer >= 1"),
    (dict(steps=2.0), ArgumentError, r"recover\(steps=2.0\): expected an integer >= 1"),
    (dict(lora_rank=0), ArgumentError,
     r"recover\(lora_rank=0\): expected None or an integer in \[1, 16\] \(the adapters' "
     r"rank"),
    (dict(lora_rank=17), ArgumentError, r"recover\(lora_rank=17\)"),
    (dict(loss="mse"), ArgumentError,
     r"recover\(loss='mse'\): expected one of \('kl_to_dense', 'next_token'\)"),
    (dict(include=("attn/x_proj",)), ArgumentError, r"recover\(include="),
    (dict(accumulate=0), ArgumentError, r"recover\(accumulate=0\)"),
    (dict(temperature=0.0), ArgumentError, r"recover\(temperature=0.0\)"),
    (dict(resume=True), ArgumentError,
     r"recover\(checkpoint_dir=None\): expected a directory when resume=True"),
    (dict(data=np.full((2, 8), 97)), ArgumentError,
     r"recover\(data=\.\.\.\): token id 97 .*\[0, 97\)"),
    (dict(data=np.zeros((2, 1), np.int32)), ArgumentError,
     r"recover\(data=<array int32\[2, 1\]>\): expected token windows \[N, T\] with T >= 2"),
    (dict(pruned="params"), TypeError, r"recover\(pruned='params'\): expected a PruneResult"),
])
def test_bad_input_is_refused(dense, pruned, kwargs, exc, regex):
  args = dict(dense_params=dense, pruned=pruned, config=CFG, data=DATA, steps=2)
  with pytest.raises(exc, match=regex):
    pj.recover(**{**args, **kwargs})
