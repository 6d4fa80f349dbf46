r"""Where decode B=1 time goes on the CPU, and variants of the decode step that were tried.

  python -m benchmarks.decode_variants [--repeats=7 --tokens=64]

Prints one table, all in this process on the default model (fp32, greedy, a 16-token prompt):

  streaming rates  a jitted read-only sum over 540 MB (what the memory system sustains), the LM
                   head alone (x [1, D] against the tied [V, D] table), and the 30 layers' largest
                   matrix-vector products in a bare `lax.scan` ([I, O] kernels as stored, and the
                   same kernels transposed to [O, I]);
  decode variants  ms/token of `pj.generate` as shipped; with every layer's weights in a buffer
                   of its own and a Python loop over the layers (no per-step copy of each
                   layer's slice of the stacked weights); with the layer scan unrolled by 2 and
                   5; with q/k/v and gate/up fused into one matrix each (prepared once outside
                   the step, 4 matrix-vector products per layer instead of 7). "first call" is
                   the variant's first run, compilation included. Each variant's tokens
                   are checked equal to the shipped one's. ms/token is (time(k + n) - time(k)) / n,
                   median over repeats, variants interleaved round by round so a burst of load
                   from other processes does not land on one variant only.

The variants patch `prunerep_jax.model` functions inside this process only; nothing here changes
the library. XLA flags apply to the whole process: compare them with separate runs, e.g.
`XLA_FLAGS=--xla_cpu_prefer_vector_width=512 python -m benchmarks.decode_variants`. Results and the decisions they led to: BUILD_NOTES.md, Model speed.
"""

from __future__ import annotations

import contextlib
import os
import time

from absl import app, flags
import numpy as np

flags.DEFINE_integer("repeats", 7, "Rounds; each times every variant once.")
flags.DEFINE_integer("tokens", 64, "Decoded tokens per timed difference (n).")
FLAGS = flags.FLAGS

_SHORT = 8  # k: the short run whose time cancels prefill and dispatch


def _median_ms(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp

  import prunerep_jax as pj
  from prunerep_jax import model as M

  print(f"load average before: {os.getloadavg()[0]:.2f}", flush=True)
  model = pj.load()
  params, config = model.params, model.config
  layers = params["layers"]
  rows = []

  # ---------------------------------------------------------------- streaming rates
  big = jnp.ones((135_000_000,), jnp.float32)
  read = jax.jit(jnp.sum)
  ms = _median_ms(lambda: read(big).block_until_ready(), 20)
  rows.append(("read-only sum, 540 MB", f"{ms:.2f} ms", f"{big.nbytes / ms / 1e6:.1f} GB/s"))
  del big
  table = params["embed"]["embedding"]
  x = jnp.ones((1, config.hidden_size), jnp.float32)
  head = jax.jit(lambda x, e: jnp.einsum("bd,vd->bv", x, e))
  ms = _median_ms(lambda: head(x, table).block_until_ready(), 30)
  rows.append(("LM head [1, D] x [V, D]^T", f"{ms:.2f} ms", f"{table.nbytes / ms / 1e6:.1f} GB/s"))

  def scan_products(contract, width):
    v = jnp.ones((1, width), jnp.float32)

    def body(c, w):
      return c, contract(v, w)[0, :4]
    return jax.jit(lambda k: jax.lax.scan(body, 0.0, k)[1])

  for name in ("gate_proj", "down_proj"):
    kernel = layers["mlp"][name]["kernel"]  # [L, I, O]
    as_stored = scan_products(lambda v, w: v @ w, kernel.shape[1])
    ms = _median_ms(lambda: as_stored(kernel).block_until_ready(), 30)
    rows.append((f"scan of 30 {name} [I, O]", f"{ms:.2f} ms", f"{kernel.nbytes / ms / 1e6:.1f} GB/s"))
    transposed = jnp.swapaxes(kernel, 1, 2).copy()
    contiguous = scan_products(lambda v, w: jnp.einsum("bi,oi->bo", v, w), kernel.shape[1])
    ms = _median_ms(lambda: contiguous(transposed).block_until_ready(), 30)
    rows.append((f"scan of 30 {name} [O, I]", f"{ms:.2f} ms", f"{kernel.nbytes / ms / 1e6:.1f} GB/s"))
    del transposed

  # ---------------------------------------------------------------- decode variants
  prompt = jnp.asarray(np.random.default_rng(0).integers(3, config.vocab_size, (1, 16),
                                                         dtype=np.int32))
  shipped_run_layers = M.run_layers
  shipped_attention, shipped_mlp = M.attention_sublayer, M.mlp_sublayer

  def unrolled(u):
    def run_layers(layer_params, config, h, ctx, *, cache=None, index=None, keep_idx=None,
                   capture=True):
      if capture or keep_idx is not None:
        return shipped_run_layers(layer_params, config, h, ctx, cache=cache, index=index,
                                  keep_idx=keep_idx, capture=capture)
      def body(h, xs):
        p, layer_cache = xs
        out = M.block(p, config, h, ctx, cache=layer_cache, index=index)
        return out.h_out, out.cache
      h, cache = jax.lax.scan(body, h, (layer_params, cache), unroll=u)
      return h, None, cache
    return run_layers

  def per_layer_loop(layer_params, config, h, ctx, *, cache=None, index=None, keep_idx=None,
                     capture=True):
    # Layers given as a tuple of per-layer dicts, each leaf its own buffer: a Python loop in
    # which every product reads its weights where they lie (the scan's dynamic slice of the
    # stacked [L, ...] weights is a copy on XLA:CPU before each product).
    if not isinstance(layer_params, tuple) or capture or keep_idx is not None:
      return shipped_run_layers(layer_params, config, h, ctx, cache=cache, index=index,
                                keep_idx=keep_idx, capture=capture)
    ks, vs = [], []
    for l, p in enumerate(layer_params):
      out = M.block(p, config, h, ctx, cache=M.LayerCache(cache.k[l], cache.v[l]), index=index)
      h = out.h_out
      ks.append(out.cache.k)
      vs.append(out.cache.v)
    return h, None, M.LayerCache(jnp.stack(ks), jnp.stack(vs))

  def fused_attention(p, config, h, ctx, *, cache=None, index=None, inputs=False,
                      causal_chunk=None):
    c = config
    B, T, _ = h.shape
    N, K, H = c.num_heads, c.num_kv_heads, c.head_dim
    x = M.rms_norm(p["attn_norm"]["scale"], h, c.rms_norm_eps)
    qkv = x @ p["attn"]["qkv"]
    q = qkv[..., :N * H].reshape(B, T, N, H)
    k = qkv[..., N * H:(N + K) * H].reshape(B, T, K, H)
    v = qkv[..., (N + K) * H:].reshape(B, T, K, H)
    q, k = M.apply_rope(q, *ctx.rope), M.apply_rope(k, *ctx.rope)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, index, zero, zero)
    cache = M.LayerCache(jax.lax.dynamic_update_slice(cache.k, k, start),
                         jax.lax.dynamic_update_slice(cache.v, v, start))
    o_in = M._attend(q.reshape(B, T, K, N // K, H), cache.k, cache.v, ctx.mask, h.dtype)
    return M.AttnOut(o_in.reshape(B, T, N * H) @ p["attn"]["o_proj"]["kernel"], None, cache)

  def fused_mlp(p, config, h, *, inputs=False):
    x = M.rms_norm(p["mlp_norm"]["scale"], h, config.rms_norm_eps)
    gate_up = x @ p["mlp"]["gate_up"]
    F = config.intermediate_size
    down_in = jax.nn.silu(gate_up[..., :F]) * gate_up[..., F:]
    return M.MLPOut(down_in @ p["mlp"]["down_proj"]["kernel"], None)

  def concat(sub, names):
    return jnp.concatenate([layers[sub][n]["kernel"] for n in names], axis=-1)

  fused_layers = {
      **layers,
      "attn": {"qkv": concat("attn", ("q_proj", "k_proj", "v_proj")), "o_proj": layers["attn"]["o_proj"]},
      "mlp": {"gate_up": concat("mlp", ("gate_proj", "up_proj")), "down_proj": layers["mlp"]["down_proj"]},
  }

  @contextlib.contextmanager
  def patched(run_layers=None, fused=False):
    try:
      if run_layers is not None:
        M.run_layers = run_layers
      if fused:
        M.attention_sublayer, M.mlp_sublayer = fused_attention, fused_mlp
      yield
    finally:
      M.run_layers = shipped_run_layers
      M.attention_sublayer, M.mlp_sublayer = shipped_attention, shipped_mlp

  from prunerep_jax import decode as D
  mask = jnp.ones(prompt.shape, bool)
  stopping = D.Stopping((), int(config.pad_token_id or 0))

  def variant(p, run_layers=None, fused=False):
    # Its own jit of generate's core (generate validates params against the layout, which the
    # fused leaves are not), traced while the model functions are patched, so the compiled step
    # is the variant's. A new function object per variant: jax caches traces by the wrapped
    # function, so jitting the same function again would reuse the shipped trace.
    def generate_core(*args):
      return D._generate.__wrapped__(*args)
    core = jax.jit(generate_core, static_argnums=(1, 5, 6, 7, 8, 9))

    def run(steps):
      with patched(run_layers, fused):
        out = core(p, config, prompt, mask, jnp.uint32(0), steps, D.Sampling(), stopping, (),
                   None)
        return np.asarray(jax.block_until_ready(out.tokens))
    return run

  per_layer = tuple(jax.tree_util.tree_map(lambda x: x[l].copy(), layers)
                    for l in range(config.num_layers))
  variants = {
      "shipped": variant(params),
      "per-layer buffers, Python loop": variant(dict(params, layers=per_layer), per_layer_loop),
      "layer scan unroll=2": variant(params, unrolled(2)),
      "layer scan unroll=5": variant(params, unrolled(5)),
      "fused q/k/v and gate/up": variant(dict(params, layers=fused_layers), fused=True),
  }
  shipped = pj.generate(params, config, prompt, _SHORT + FLAGS.tokens, eos_token_ids=())
  reference = np.asarray(shipped.tokens)
  diffs = {name: [] for name in variants}
  compile_s = {}
  for name, run in variants.items():  # compile both lengths, check the tokens
    t0 = time.perf_counter()
    run(_SHORT)
    compile_s[name] = time.perf_counter() - t0
    got = run(_SHORT + FLAGS.tokens)
    if not np.array_equal(got, reference):
      raise SystemExit(f"variant {name!r} decodes other tokens than the shipped step")
  for _ in range(FLAGS.repeats):
    for name, run in variants.items():
      t0 = time.perf_counter()
      run(_SHORT)
      t1 = time.perf_counter()
      run(_SHORT + FLAGS.tokens)
      t2 = time.perf_counter()
      diffs[name].append(((t2 - t1) - (t1 - t0)) / FLAGS.tokens)
  weights = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  for name, d in diffs.items():
    ms = 1e3 * float(np.median(d))
    rows.append((f"decode B=1, {name} (first call {compile_s[name]:.1f} s)", f"{ms:.2f} ms/token",
                 f"{weights / ms / 1e6:.1f} GB/s"))

  print(f"\n| measurement | time | weight bytes / time |\n|---|---|---|")
  for row in rows:
    print("| " + " | ".join(row) + " |")
  print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  app.run(main)
