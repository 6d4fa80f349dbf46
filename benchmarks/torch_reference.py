"""The reference approach to step-wise drift, written the way one does it without our library.

The baseline of `benchmarks/analysis_speed.py`: the same measurement as
`pj.analysis.drift(dense, pruned, config, prompts, steps, mode="free")` with greedy decoding,
organised the obvious way with transformers on PyTorch:

1. for each prompt in turn (batch 1, no padding), two separate `generate` calls, one per model,
   each keeping every step's hidden states and raw logits (`output_hidden_states`,
   `output_logits`, `return_dict_in_generate`);
2. then, step by step in Python, the metrics of `prunerep_jax.analysis.drift.STEP_METRICS` between
   the two trajectories: cosine and 1 - cos of the final-normed hidden state (the last entry of
   `hidden_states`, what the LM head reads), of the logits and of p = softmax(z / T); RMS of
   dz = z' - z; KL(p || p') and its Theorem 3 estimate Var_p(dz) / 2T^2; 1 - cos(p, p') and its
   Theorem 2 estimate Var_r(dz) / 2T^2 with r = p^2 / sum p^2; whether the two tokens agree.

The metrics use the plain textbook formulas in float64 (a reference needs no cancellation-free
forms when it has the precision to spare); the models run in float32. Both generations run to
exactly `steps` tokens: EOS is switched off (`eos_token_id=None`), as the benchmark passes
`eos_token_ids=()` to our side, so the work done never depends on where a model stops.
"""

from __future__ import annotations

import numpy as np
import torch

# The order of prunerep_jax.analysis.drift.STEP_METRICS.
STEP_METRICS = ("cos_h", "one_minus_cos_h", "cos_z", "one_minus_cos_z", "rms_dz", "cos_p",
                "one_minus_cos_p", "cos_p_estimate", "kl", "kl_estimate", "agree")


def load_model(directory: str):
  """A `LlamaForCausalLM` from a Hugging Face directory, float32, eval mode, offline."""
  from transformers import LlamaForCausalLM

  model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32, local_files_only=True)
  return model.eval()


def generate_trace(model, prompt: torch.Tensor, steps: int) -> dict:
  """Greedy generation of `steps` tokens for one prompt, keeping what the metrics need.

  Args:
    model: a transformers causal LM.
    prompt: int64 [T], one unpadded prompt.
    steps: S new tokens (always exactly S: no EOS stop).

  Returns:
    {"tokens": [S] int64, "hidden": [S, D] float32 final-normed hidden state that produced each
    token, "logits": [S, V] float32 raw logits of each step}.
  """
  ids = prompt[None]
  out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=steps, min_new_tokens=steps, eos_token_id=None,
                       pad_token_id=0, output_hidden_states=True, output_logits=True,
                       return_dict_in_generate=True)
  # hidden_states[s] holds one tensor per layer boundary, the last one after the final norm;
  # step 0 covers every prompt position, later steps the new token only.
  hidden = torch.stack([layers[-1][0, -1] for layers in out.hidden_states])
  logits = torch.stack([z[0] for z in out.logits])
  return {"tokens": out.sequences[0, ids.shape[1]:], "hidden": hidden, "logits": logits}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
  return float(a @ b / (a.norm() * b.norm()))


def _var(w: torch.Tensor, x: torch.Tensor) -> float:
  mean = w @ x
  return float(w @ (x - mean) ** 2)


def step_metrics(h_dense, h_pruned, z_dense, z_pruned, tok_dense, tok_pruned,
                 temperature: float = 1.0) -> dict:
  """The metrics of one step: hidden states [D], logits [V], tokens (ints) -> dict of floats."""
  hd, hp = h_dense.double(), h_pruned.double()
  zd, zp = z_dense.double(), z_pruned.double()
  dz = zp - zd
  log_p = torch.log_softmax(zd / temperature, dim=-1)
  log_q = torch.log_softmax(zp / temperature, dim=-1)
  p, q = log_p.exp(), log_q.exp()
  r = p * p / (p @ p)
  cos_h, cos_z, cos_p = _cos(hd, hp), _cos(zd, zp), _cos(p, q)
  return {"cos_h": cos_h, "one_minus_cos_h": 1.0 - cos_h,
          "cos_z": cos_z, "one_minus_cos_z": 1.0 - cos_z,
          "rms_dz": float(dz.square().mean().sqrt()),
          "cos_p": cos_p, "one_minus_cos_p": 1.0 - cos_p,
          "cos_p_estimate": _var(r, dz) / (2.0 * temperature**2),
          "kl": float(p @ (log_p - log_q)),
          "kl_estimate": _var(p, dz) / (2.0 * temperature**2),
          "agree": float(int(tok_dense) == int(tok_pruned))}


def _margin(logits: torch.Tensor) -> np.ndarray:
  """[S, V] -> [S]: largest minus second largest logit of each step."""
  top = logits.topk(2, dim=-1).values
  return (top[:, 0] - top[:, 1]).numpy()


def drift(dense_model, pruned_model, prompts: list, steps: int,
          temperature: float = 1.0) -> dict:
  """Free-running greedy drift, prompt by prompt: the reference for `pj.analysis.drift`.

  Args:
    dense_model, pruned_model: transformers causal LMs.
    prompts: B prompts, each int [T_b] (NumPy or torch; lengths may differ).
    steps: S generated tokens per model and prompt.
    temperature: analysis temperature T of p = softmax(z / T).

  Returns:
    {"dense/tokens": [B, S], "free/tokens": [B, S], "free/<metric>": [B, S] float64 for every
    metric of STEP_METRICS}, NumPy arrays laid out like our Result's arrays, plus "dense/margin"
    and "free/margin" [B, S]: the gap between each step's two largest logits, which tells a
    near-tie (where float rounding may pick either token) from a real disagreement.
  """
  rows = []
  with torch.inference_mode():
    for prompt in prompts:
      prompt = torch.as_tensor(np.asarray(prompt), dtype=torch.int64)
      dense = generate_trace(dense_model, prompt, steps)
      pruned = generate_trace(pruned_model, prompt, steps)
      per_step = [step_metrics(dense["hidden"][s], pruned["hidden"][s], dense["logits"][s],
                               pruned["logits"][s], dense["tokens"][s], pruned["tokens"][s],
                               temperature) for s in range(steps)]
      rows.append((dense["tokens"].numpy(), pruned["tokens"].numpy(), per_step,
                   _margin(dense["logits"]), _margin(pruned["logits"])))
  out = {"dense/tokens": np.stack([r[0] for r in rows]),
         "free/tokens": np.stack([r[1] for r in rows]),
         "dense/margin": np.stack([r[3] for r in rows]),
         "free/margin": np.stack([r[4] for r in rows])}
  for k in STEP_METRICS:
    out[f"free/{k}"] = np.array([[m[k] for m in r[2]] for r in rows], np.float64)
  return out
