"""NaN and Inf in loaded weights, counted on the devices that hold each array."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

MAX_LISTED = 8  # tensors named in a message; the rest are counted


@functools.partial(jax.jit, static_argnames="out_shardings")
def _row_counts(arrays: tuple[jax.Array, ...], out_shardings: tuple) -> tuple[jax.Array, ...]:
  counts = []
  for x, out in zip(arrays, out_shardings, strict=True):
    # Per index of axis 0 in int32: one sum over a stacked tensor could pass 2**31.
    x = jnp.atleast_1d(x)
    rows = jnp.sum(~jnp.isfinite(x), axis=tuple(range(1, x.ndim)), dtype=jnp.int32)
    counts.append(rows if out is None else jax.lax.with_sharding_constraint(rows, out))
  return tuple(counts)


def _replicated(sharding: jax.sharding.Sharding) -> NamedSharding | None:
  # Replicated counts are fully addressable, so every host can fetch them.
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return None


def row_counts(arrays: Mapping[str, jax.Array]) -> dict[str, np.ndarray]:
  """Name -> NaN/Inf count per index of axis 0 (one row for a scalar), of each float array.

  One jitted reduction per set of devices runs where the arrays live; only the counts
  come to the host, in one device_get. Integer and non-array leaves are skipped.
  """
  groups: dict[frozenset, dict[str, jax.Array]] = {}
  for name, x in arrays.items():
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.inexact):
      groups.setdefault(frozenset(x.sharding.device_set), {})[name] = x
  counts = {}
  for group in groups.values():
    outs = tuple(_replicated(x.sharding) for x in group.values())
    counts.update(zip(group, _row_counts(tuple(group.values()), outs), strict=True))
  return jax.device_get(counts)


def nonfinite_leaves(arrays: Mapping[str, jax.Array], *,
                     rows: Mapping[str, Sequence[str]] | None = None) -> list[tuple[str, int]]:
  """(name, count) of each array in `arrays` holding NaN or Inf, in `arrays`' order.

  Args:
    rows: for some names, one name per index of axis 0 (a stacked tensor's layers); those
      arrays are reported per row under these names.
  """
  rows, counts = rows or {}, row_counts(arrays)
  bad = []
  for name in (n for n in arrays if n in counts):  # device_get returns dicts sorted by key
    if name in rows:
      bad.extend(zip(rows[name], map(int, counts[name]), strict=True))
    else:
      bad.append((name, int(counts[name].sum(dtype=np.int64))))
  return [(name, count) for name, count in bad if count]


def describe(bad: Sequence[tuple[str, int]]) -> str:
  """'2 tensor(s) hold NaN or Inf: a (3 non-finite), b (1 non-finite)'; names MAX_LISTED."""
  listed = ", ".join(f"{name} ({count} non-finite)" for name, count in bad[:MAX_LISTED])
  more = f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
  return f"{len(bad)} tensor(s) hold NaN or Inf: {listed}{more}"
