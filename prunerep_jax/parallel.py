"""Device meshes and sharding: data parallelism over batches, model parallelism over the linears.

A mesh has two named axes, ``data`` and ``model`` (an axis a mesh omits has size 1):

  data    batches are split over it (rows [B, ...] -> B / data rows per device); params are
          replicated along it
  model   the linears of every block are split over it (see `param_specs`)

Everything runs through `jax.jit` with `NamedSharding`: the params and the batch are placed once
(`shard_params`, `shard_batch`), and XLA partitions the jitted computation to follow the data,
inserting the collectives itself (the calibration statistics, plain sums over the batch, become
per-device partial sums plus one all-reduce). No function here needs explicit collectives, so
none uses `jax.shard_map`. `jax.pmap` is not used at all: it has been in maintenance mode since
JAX 0.8 (it is now implemented on top of shard_map) and only expresses one data axis with a
leading device dimension on every array; meshes express data and model axes on ordinary arrays.

Multi-host runs (TPU pods, several GPU hosts) start every process with `initialize_distributed`
before any other JAX call; the mesh then spans the devices of all processes, every process runs
the same program on the same host inputs, and `fetch` brings a global result to every host.

Shape letters: B batch, L layers, D hidden, N query heads, K kv heads, H head_dim,
F intermediate, V vocab.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunerep_jax import batching
from prunerep_jax import layout
from prunerep_jax import validate
from prunerep_jax.config import Config

AXES = ("data", "model")

MeshLike = Union[None, str, Mesh]


# --------------------------------------------------------------------------------- meshes

def _devices_text() -> str:
  kinds = sorted({d.platform for d in jax.devices()})
  return f"{jax.device_count()} {'/'.join(kinds)} devices"


def parse_spec(fn: str, spec: Any, name: str = "mesh") -> dict[str, int]:
  """{"data": d, "model": m} from "data:4,model:1" (an omitted axis has size 1).

  Raises ArgumentError naming `fn`, the spec and the problem: not a string, an item that is not
  AXIS:SIZE, an unknown or repeated axis, a size that is not a positive integer.
  """
  expected = ("a mesh spec 'AXIS:SIZE[,AXIS:SIZE]' with axes from ('data', 'model') and "
              "positive integer sizes, e.g. 'data:4,model:1'")
  if not isinstance(spec, str) or not spec.strip():
    raise validate.fail(fn, name, spec, expected)
  sizes: dict[str, int] = {}
  for item in spec.split(","):
    axis, sep, size = item.strip().partition(":")
    axis, size = axis.strip(), size.strip()
    if not sep or not axis:
      raise validate.fail(fn, name, spec, f"{expected}; item {item.strip()!r} is not AXIS:SIZE")
    if axis not in AXES:
      raise validate.fail(fn, name, spec, f"axes from {AXES}; {axis!r} is not one")
    if axis in sizes:
      raise validate.fail(fn, name, spec, f"each axis at most once; {axis!r} is repeated")
    if not size.isdigit() or int(size) < 1:
      raise validate.fail(fn, name, spec,
                          f"a positive integer size for axis {axis!r}; got {size!r}")
    sizes[axis] = int(size)
  return {a: sizes.get(a, 1) for a in AXES}


def make_mesh(spec: str, num_devices: Optional[int] = None) -> Mesh:
  """A ("data", "model") mesh over the first `num_devices` devices, from a spec string.

  Args:
    spec: "data:4,model:1", "data:2,model:2", "model:4", ... (an omitted axis has size 1).
    num_devices: how many of `jax.devices()` to use (default: all of them, across every process
      in a multi-host run); the axis sizes must multiply to exactly this number.

  Returns:
    A `jax.sharding.Mesh` with axes ("data", "model") of type Auto, so that XLA propagates
    shardings through the jitted code (computation follows the data's placement). Device order
    comes from `jax.make_mesh`, which lays axes along the physical topology on TPUs.

  Raises:
    ArgumentError: a malformed spec (see `parse_spec`), num_devices outside [1, available], or
      axis sizes whose product is not num_devices.
  """
  return _make_mesh("make_mesh", spec, num_devices, "spec")


def _make_mesh(fn: str, spec: Any, num_devices: Optional[int], name: str) -> Mesh:
  sizes = parse_spec(fn, spec, name)
  available = jax.device_count()
  if num_devices is None:
    n = available
  else:
    n = validate.integer(fn, "num_devices", num_devices, minimum=1, maximum=available,
                         expected=f"None or an integer in [1, {available}] (JAX sees "
                                  f"{_devices_text()})")
  product = math.prod(sizes.values())
  if product != n:
    used = (f"all {n} devices JAX sees" if num_devices is None
            else f"num_devices={n} of the {_devices_text()} JAX sees")
    raise validate.fail(fn, name, spec,
                        f"axis sizes whose product is the number of devices used, {n} ({used}); "
                        f"data x model = {sizes['data']} x {sizes['model']} = {product}")
  return jax.make_mesh(tuple(sizes[a] for a in AXES), AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(AXES),
                       devices=jax.devices()[:n])


def as_mesh(fn: str, mesh: MeshLike, name: str = "mesh") -> Optional[Mesh]:
  """None, a `Mesh` whose axis names are among ("data", "model"), or a spec for `make_mesh`
  (over all devices). What every public `mesh=` argument accepts."""
  if mesh is None or isinstance(mesh, Mesh):
    if mesh is not None and not set(mesh.axis_names) <= set(AXES):
      raise validate.fail(fn, name, mesh, f"a Mesh whose axes are among {AXES}; it has "
                          f"{tuple(mesh.axis_names)}")
    return mesh
  if isinstance(mesh, str):
    return _make_mesh(fn, mesh, None, name)
  raise validate.fail(fn, name, mesh, "None, a jax.sharding.Mesh with axes ('data', 'model') "
                      "(parallel.make_mesh) or a spec such as 'data:4,model:1'", error=TypeError)


def axis_size(mesh: Optional[Mesh], axis: str) -> int:
  """Size of `axis` in `mesh` (1 when the mesh is None or has no such axis)."""
  if mesh is None or axis not in mesh.axis_names:
    return 1
  return int(mesh.shape[axis])


# ------------------------------------------------------------------------- params

def param_specs(config: Config, mesh: Optional[Mesh]) -> dict:
  """PartitionSpecs for the params pytree (same structure as `layout.param_shapes(config)`).

  Over the ``model`` axis (size m):
    q_proj kernel [L, D, N*H] and bias [L, N*H]   output dim split  if N % m == 0
    k/v_proj kernel [L, D, K*H] and bias [L, K*H] output dim split  if K % m == 0
    o_proj kernel [L, N*H, D]                     input dim split   if N % m == 0
    gate/up_proj kernel [L, D, F] and bias [L, F] output dim split  if F % m == 0
    down_proj kernel [L, F, D]                    input dim split   if F % m == 0
    embed/embedding [V, D] and lm_head/kernel [D, V]  vocab split   if V % m == 0
    norm scales, o/down biases [L, D]             replicated
  Attention dims split on whole heads (N or K divisible by m, not just N*H), so each device
  attends with complete heads of its own. A dim that does not divide is replicated instead: the
  result is the same, only that tensor's memory and matmul are not split (e.g. K = 2 kv heads on
  model:4 replicates k/v, a vocabulary of 49,153 replicates the embedding and the head).
  Nothing is split over ``data``: params are replicated along it.
  """
  m = axis_size(mesh, "model")
  c = config

  def split(dims: int, axis: int, ok: bool) -> P:
    if m == 1 or not ok:
      return P()
    return P(*[("model" if i == axis else None) for i in range(dims)])

  heads_q, heads_kv = c.num_heads % m == 0, c.num_kv_heads % m == 0
  ffn, vocab = c.intermediate_size % m == 0, c.vocab_size % m == 0
  rules = {  # (sublayer, linear) -> (split kernel axis, divisible, bias split)
      ("attn", "q_proj"): (2, heads_q, True), ("attn", "k_proj"): (2, heads_kv, True),
      ("attn", "v_proj"): (2, heads_kv, True), ("attn", "o_proj"): (1, heads_q, False),
      ("mlp", "gate_proj"): (2, ffn, True), ("mlp", "up_proj"): (2, ffn, True),
      ("mlp", "down_proj"): (1, ffn, False),
  }
  shapes = layout.param_shapes(config)

  def spec(path, shape) -> P:
    keys = tuple(str(getattr(k, "key", k)) for k in path)
    if keys == ("embed", "embedding"):
      return split(2, 0, vocab)
    if keys == ("lm_head", "kernel"):
      return split(2, 1, vocab)
    if keys[0] == "layers" and keys[1:3] in rules:
      axis, ok, bias_split = rules[keys[1:3]]
      if keys[3] == "kernel":
        return split(3, axis, ok)
      return split(2, 1, ok and bias_split)
    return P()

  return jax.tree_util.tree_map_with_path(spec, shapes, is_leaf=lambda x: isinstance(x, tuple))


def param_shardings(config: Config, mesh: Mesh) -> dict:
  """`param_specs` as NamedShardings on `mesh`."""
  return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), param_specs(config, mesh),
                                is_leaf=lambda x: isinstance(x, P))


def _place(x: Any, sharding: NamedSharding) -> Any:
  if isinstance(x, jax.Array) and not validate.is_traced(x) and x.sharding.is_equivalent_to(
      sharding, x.ndim):
    return x
  return jax.device_put(x, sharding)


def shard_params(params: Any, config: Config, mesh: Mesh) -> Any:
  """params placed on `mesh` by `param_specs`; leaves already placed so come back unchanged
  (so passing sharded params on every call costs nothing).

  Raises the layout errors of `validate.params` for params that do not match config.
  """
  validate.params("shard_params", params, config)
  shardings = param_shardings(config, mesh)
  return jax.tree_util.tree_map(lambda s, x: _place(x, s), shardings, params,
                                is_leaf=lambda x: isinstance(x, NamedSharding))


# ------------------------------------------------------------------------- batches

def padded_size(n: int, mesh: Optional[Mesh]) -> int:
  """n rounded up to a multiple of the data axis."""
  d = axis_size(mesh, "data")
  return -(-n // d) * d


def pad_rows(x: Any, rows: int) -> Any:
  """x [B, ...] with rows B..rows-1 copies of row B-1 (a valid input, so padding computes finite
  values; callers cut it off or weight it 0). NumPy in, NumPy out; JAX arrays stay on device."""
  n = x.shape[0]
  if rows == n:
    return x
  xp = np if isinstance(x, np.ndarray) else jnp
  return xp.concatenate([x, xp.repeat(x[n - 1:], rows - n, axis=0)], axis=0)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
  """The batch axis (`axis`, leading by default) over ``data``, everything else replicated."""
  if "data" not in mesh.axis_names:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(*([None] * axis), "data"))


def shard_batch(x: Any, mesh: Mesh) -> tuple[jax.Array, int]:
  """Pads x [B, ...] to a multiple of the data axis and places it with P("data").

  Returns:
    (padded [B', ...] on the mesh, B the number of real rows, which come first). The padding
    repeats the last real row; every caller drops rows B.. or gives them weight 0.
  """
  n = int(x.shape[0])
  if not isinstance(x, jax.Array):
    x = np.asarray(x)
  return _place(pad_rows(x, padded_size(n, mesh)), batch_sharding(mesh)), n


def put_batch(x: Any, mesh: Optional[Mesh], axis: int = 0) -> jax.Array:
  """x as a device array: without a mesh simply on the default device; with one, its batch axis
  (already a multiple of the data axis, as `batches` makes it) split over ``data``."""
  if mesh is None:
    return jnp.asarray(x)
  return _place(np.asarray(x) if not isinstance(x, jax.Array) else x,
                batch_sharding(mesh, axis))


def unpad(tree: Any, n: int, axis: int = 0) -> Any:
  """Every leaf of tree cut to its first n entries along `axis` (a no-op where already n)."""
  def cut(x):
    if x.shape[axis] == n:
      return x
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)
  return jax.tree_util.tree_map(cut, tree)


def batches(n: int, batch_size: int, mesh: Optional[Mesh] = None) -> Iterator[batching.Batch]:
  """`batching.batches` with every batch a multiple of the data axis.

  The batch size is min(batch_size, n) rounded up to a multiple of the data axis, so every
  batch has one shape (one compilation) and splits evenly over ``data``; padding rows repeat the
  last real row and have weight 0, exactly as `batching.batches` pads its last batch. Without a
  mesh this is `batching.batches` itself.
  """
  rows = padded_size(batching.batch_size_for(n, batch_size), mesh)
  for b in batching.batches(n, rows):
    pad = rows - b.rows.shape[0]
    if pad:
      b = batching.Batch(pad_rows(b.rows, rows), np.concatenate([b.weight, np.zeros(pad,
                                                                                    np.float32)]),
                         b.real)
    yield b


def fetch(x: Any) -> Any:
  """A (pytree of) global array(s) as NumPy on this host, in every process of a multi-host run.

  Single-process arrays are simply copied to the host; arrays spanning devices of other
  processes are gathered with `jax.experimental.multihost_utils.process_allgather`.
  """
  from jax.experimental import multihost_utils

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(a)
  return jax.tree_util.tree_map(one, x)


# ----------------------------------------------------------------------------- hosts

def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None, *,
                           local_device_ids: Optional[Sequence[int]] = None,
                           cpu_collectives: str = "gloo") -> None:
  """Joins this process to a multi-host run: `jax.distributed.initialize`, behind a flag.

  Call it first, before any other JAX call (launchers do so under --distributed). On Cloud TPU
  pods and SLURM/Open MPI clusters every argument may be None: JAX detects the cluster. Elsewhere
  pass the coordinator "host:port" (process 0's address), the number of processes and this
  process's id. After it, `jax.devices()` lists the devices of every process and `make_mesh`
  spans all of them.

  Args:
    coordinator_address, num_processes, process_id, local_device_ids: as
      `jax.distributed.initialize`.
    cpu_collectives: the cross-process collectives of the CPU backend ("gloo" or "mpi"); only
      CPU-only runs (tests, CPU clusters) use them.

  Raises:
    ArgumentError: bad arguments, or JAX's distributed runtime already initialised.
  """
  fn = "initialize_distributed"
  if coordinator_address is not None and (not isinstance(coordinator_address, str)
                                          or ":" not in coordinator_address):
    raise validate.fail(fn, "coordinator_address", coordinator_address,
                        "None or 'host:port' of process 0")
  if num_processes is not None:
    num_processes = validate.integer(fn, "num_processes", num_processes, minimum=1)
  if process_id is not None:
    process_id = validate.integer(
        fn, "process_id", process_id, minimum=0,
        maximum=None if num_processes is None else num_processes - 1)
  cpu_collectives = validate.choice(fn, "cpu_collectives", cpu_collectives, ("gloo", "mpi"))
  if jax.distributed.is_initialized():
    raise validate.fail(fn, "coordinator_address", coordinator_address,
                        "a first call: jax.distributed is already initialised in this process")
  jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address, num_processes, process_id,
                             local_device_ids=local_device_ids)
