r"""Main job: chat with the default model, then show how much each sublayer moves each space.

  python -m experiments.main [--model=smollm2-135m-instruct] [--prompt="..."] \
      [--max_new_tokens=64] [--temperature=1.0] [--lens=final_norm]

Prints the model's answer and a per-layer table: for every attention and MLP sublayer, the
cosine between the residual stream before and after it in hidden space (h), logit space
(z = LM head of the lens) and probability space (p = softmax(z / T)), and KL(before || after),
averaged over all prompt and answer tokens.

Every flag is checked before the model is loaded (--model must be a registered name or an
existing path, --temperature > 0, --max_new_tokens >= 1); once the model is loaded, the prompt
plus --max_new_tokens must fit its context window, checked before generating. A refused flag
prints one line on stderr and exits with status 2.
"""

from absl import flags

from experiments import _common

PROG = "experiments.main"

flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
flags.DEFINE_string("prompt", "In two sentences, why do leaves change colour in autumn?",
                    "User message sent through the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 64, "Length of the greedy answer, >= 1 (prompt plus answer "
                     "must fit the model's context window).")
flags.DEFINE_float("temperature", 1.0, "Temperature of the probability space analysed (> 0).")
flags.DEFINE_enum("lens", "final_norm", ["final_norm", "raw"],
                  "How logits are read off intermediate states: through the final norm (the "
                  "model's own path) or raw (the reference code's choice).")
_common.define_device_flags()
FLAGS = flags.FLAGS


def check_flags(argv) -> tuple[float, dict]:
  """Checks every flag without loading the model; returns (the temperature, the device flags).

  Raises:
    app.UsageError: naming the flag, its value and what was expected.
  """
  _common.no_arguments(PROG, argv)
  from prunerep_jax import validate

  if not FLAGS.prompt.strip():
    raise _common.usage(f"{PROG}(--prompt={FLAGS.prompt!r}): expected a non-empty message")
  _common.checked(validate.integer, PROG, "--max_new_tokens", FLAGS.max_new_tokens, minimum=1)
  temperature = _common.checked(validate.temperature, PROG, FLAGS.temperature, allow_zero=False,
                                name="--temperature")
  _common.model_flag(PROG, FLAGS.model)
  return temperature, _common.check_device_flags(PROG)


def main(argv):
  temperature, devices = check_flags(argv)

  import numpy as np
  import jax.numpy as jnp
  import prunerep_jax as pj
  from prunerep_jax.loading import tokenizer as tok_lib

  mesh = _common.start_devices(PROG, devices)
  model = pj.load(FLAGS.model, dtype=FLAGS.dtype, mesh=mesh)
  if model.tokenizer is None:
    raise _common.usage(f"{PROG}(--model={FLAGS.model!r}): the model has no tokenizer; the "
                        "prompt cannot be encoded")
  prompt = tok_lib.chat_prompt(model.tokenizer, FLAGS.prompt)
  context = model.config.max_position_embeddings
  if len(prompt) + FLAGS.max_new_tokens > context:
    raise _common.usage(f"{PROG}(--max_new_tokens={FLAGS.max_new_tokens}): the prompt has "
                        f"{len(prompt)} tokens and the model's context window is {context}; "
                        f"expected at most {max(context - len(prompt), 0)}")
  gen = pj.generate(model.params, model.config, np.asarray([prompt], np.int32),
                    FLAGS.max_new_tokens, mesh=mesh)
  n = int(gen.lengths[0])
  answer = model.tokenizer.decode(np.asarray(gen.tokens[0, :n]), skip_special_tokens=True)
  print(f"model: {FLAGS.model} ({model.config.num_layers} layers)\n")
  print(f"user: {FLAGS.prompt}\nassistant: {answer.strip()}\n")

  tokens = jnp.concatenate([jnp.asarray([prompt], jnp.int32), gen.tokens[:, :n]], axis=1)
  out = pj.forward(model.params, model.config, tokens, logits=False, mesh=mesh)
  eff = pj.analysis.sublayer_effects(model.params, model.config, out.residual, lens=FLAGS.lens,
                                     temperature=temperature)
  eff = {k: np.asarray(v).mean(axis=(1, 2)) for k, v in eff.items()}
  print(f"Residual change per sublayer, mean over {tokens.shape[1]} tokens "
        f"(lens={FLAGS.lens}, T={temperature}):")
  print(f"{'layer':>5} {'sublayer':>8} {'cos h':>8} {'cos z':>8} {'cos p':>8} {'KL':>9}")
  for i in range(2 * model.config.num_layers):
    print(f"{i // 2:>5} {('attn', 'mlp')[i % 2]:>8} {eff['cos_h'][i]:8.4f} {eff['cos_z'][i]:8.4f} "
          f"{eff['cos_p'][i]:8.4f} {eff['kl'][i]:9.4f}")


if __name__ == "__main__":
  _common.run(main, PROG)
