"""prunerep_jax: prune Llama-family causal LMs as pure functions on Flax params and measure how
pruning moves every representation space (hidden states, logits, probabilities)."""

from prunerep_jax.loading import DEFAULT_MODEL, Model, load  # sets HF_HUB_OFFLINE first
from prunerep_jax.config import Config, RopeScaling
from prunerep_jax.model import ForwardOutput, cast, forward, init_params
from prunerep_jax.decode import Generation, generate
from prunerep_jax import analysis, checkpoint, decode, layout, metrics, prune
from prunerep_jax.recover import recover
from prunerep_jax.loading.tokenizer import chat_prompt, encode_batch

__version__ = "0.1.0"
