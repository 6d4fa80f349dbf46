r"""Main job: chat with the default model, then show how much each sublayer moves each space.

  python -m experiments.main [--model=smollm2-135m-instruct] [--prompt="..."]

Prints the model's answer and a per-layer table: for every attention and MLP sublayer, the
cosine between the residual stream before and after it in hidden space (h), logit space
(z = LM head of the lens) and probability space (p = softmax(z / T)), and KL(before || after),
averaged over all prompt and answer tokens.
"""

from absl import app, flags

flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "Registered model name, local Hugging Face directory, or .gguf file.")
flags.DEFINE_string("prompt", "In two sentences, why do leaves change colour in autumn?",
                    "User message sent through the model's chat template.")
flags.DEFINE_integer("max_new_tokens", 64, "Length of the greedy answer.")
flags.DEFINE_float("temperature", 1.0, "Temperature of the probability space analysed (> 0).")
flags.DEFINE_enum("lens", "final_norm", ["final_norm", "raw"],
                  "How logits are read off intermediate states: through the final norm (the "
                  "model's own path) or raw (the reference code's choice).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import numpy as np
  import jax.numpy as jnp
  import prunerep_jax as pj
  from prunerep_jax.loading import tokenizer as tok_lib

  model = pj.load(FLAGS.model)
  prompt = tok_lib.chat_prompt(model.tokenizer, FLAGS.prompt)
  gen = pj.generate(model.params, model.config, np.asarray([prompt], np.int32),
                    FLAGS.max_new_tokens)
  n = int(gen.lengths[0])
  answer = model.tokenizer.decode(np.asarray(gen.tokens[0, :n]), skip_special_tokens=True)
  print(f"model: {FLAGS.model} ({model.config.num_layers} layers)\n")
  print(f"user: {FLAGS.prompt}\nassistant: {answer.strip()}\n")

  tokens = jnp.concatenate([jnp.asarray([prompt], jnp.int32), gen.tokens[:, :n]], axis=1)
  out = pj.forward(model.params, model.config, tokens, logits=False)
  eff = pj.analysis.sublayer_effects(model.params, model.config, out.residual, lens=FLAGS.lens,
                                     temperature=FLAGS.temperature)
  eff = {k: np.asarray(v).mean(axis=(1, 2)) for k, v in eff.items()}
  print(f"Residual change per sublayer, mean over {tokens.shape[1]} tokens "
        f"(lens={FLAGS.lens}, T={FLAGS.temperature}):")
  print(f"{'layer':>5} {'sublayer':>8} {'cos h':>8} {'cos z':>8} {'cos p':>8} {'KL':>9}")
  for i in range(2 * model.config.num_layers):
    print(f"{i // 2:>5} {('attn', 'mlp')[i % 2]:>8} {eff['cos_h'][i]:8.4f} {eff['cos_z'][i]:8.4f} "
          f"{eff['cos_p'][i]:8.4f} {eff['kl'][i]:9.4f}")


if __name__ == "__main__":
  app.run(main)
