"""Hugging Face LLaMA checkpoints <-> derta_jax models; the only module that knows HF names.

Reads `config.json` plus `*.safetensors` (one file, or shards listed in
`model.safetensors.index.json`) without torch, or a GGUF file (`gguf.open_gguf`, which
renames its tensors to HF names). Each device's shard of each parameter is
read straight from the memory-mapped file, so no host holds a full copy per device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, SingleDeviceSharding

from derta_jax import sharding as sharding_lib
from derta_jax.checkpoints import finite, gguf
from derta_jax.checkpoints.errors import CheckpointError
from derta_jax.checkpoints.safetensors_dir import INDEX_FILE, read_json
from derta_jax.checkpoints.safetensors_dir import SafetensorsDir as _SafetensorsDir
from derta_jax.models import hf_config, llama

SINGLE_FILE = "model.safetensors"
# Non-parameter buffers that some older LLaMA checkpoints carry; transformers drops them too.
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_FLOAT_DTYPES = frozenset({"F32", "F16", "BF16"})  # safetensors dtype names we read


@dataclasses.dataclass(frozen=True)
class _Tensor:
  """One parameter of ours and the HF tensor(s) it is made of.

  `layout`: "same"; "transpose" (2-D); "in_heads" (HF [X*H, D] <-> ours [D, X, H]);
  "out_heads" (HF [D, N*H] <-> ours [N, H, D]). Stacked parameters have "{i}" in `hf`.
  """

  path: tuple[str, ...]
  hf: str
  layout: str

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf


def _tensor_map(config: llama.LlamaConfig) -> list[_Tensor]:
  pre = "model.layers.{i}."
  tensors = [
      _Tensor(("embed",), "model.embed_tokens.weight", "same"),
      _Tensor(("layers", "attn_norm", "scale"), pre + "input_layernorm.weight", "same"),
      _Tensor(("layers", "attn", "q"), pre + "self_attn.q_proj.weight", "in_heads"),
      _Tensor(("layers", "attn", "k"), pre + "self_attn.k_proj.weight", "in_heads"),
      _Tensor(("layers", "attn", "v"), pre + "self_attn.v_proj.weight", "in_heads"),
      _Tensor(("layers", "attn", "o"), pre + "self_attn.o_proj.weight", "out_heads"),
      _Tensor(("layers", "mlp_norm", "scale"), pre + "post_attention_layernorm.weight", "same"),
      _Tensor(("layers", "mlp", "gate"), pre + "mlp.gate_proj.weight", "transpose"),
      _Tensor(("layers", "mlp", "up"), pre + "mlp.up_proj.weight", "transpose"),
      _Tensor(("layers", "mlp", "down"), pre + "mlp.down_proj.weight", "transpose"),
      _Tensor(("final_norm", "scale"), "model.norm.weight", "same"),
  ]
  if not config.tie_embeddings:
    tensors.append(_Tensor(("lm_head",), "lm_head.weight", "transpose"))
  return tensors


def module_names(config: llama.LlamaConfig) -> dict[tuple[str, ...], str]:
  """Our parameter path -> the name of the HF module holding it ("{i}": the layer), e.g.
  ("layers", "attn", "q") -> "model.layers.{i}.self_attn.q_proj" (PEFT names adapters so)."""
  return {t.path: t.hf.removesuffix(".weight") for t in _tensor_map(config)}


def _hf_shape(layout: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if layout == "same":
    return shape
  if layout == "transpose":
    return shape[::-1]
  if layout == "in_heads":
    d, x, h = shape
    return (x * h, d)
  n, h, d = shape  # out_heads
  return (d, n * h)


def _to_hf(layout: str, ours: np.ndarray) -> np.ndarray:
  if layout == "same":
    return ours
  if layout == "transpose":
    return ours.T
  if layout == "in_heads":
    d, x, h = ours.shape
    return ours.reshape(d, x * h).T
  n, h, d = ours.shape
  return ours.reshape(n * h, d).T


def _read_ours(read, layout: str, shape: tuple[int, ...], index: tuple[slice, ...]):
  """Our block `index` of a per-layer tensor of ours with `shape`, read via `read(slices)`."""
  if layout == "same":
    return read(index)
  if layout == "transpose":
    return read(index[::-1]).T
  if layout == "in_heads":
    (d, x, _), h = index, shape[2]
    rows = slice(x.start * h, x.stop * h)
    return read((rows, d)).T.reshape(d.stop - d.start, x.stop - x.start, h)[:, :, index[2]]
  x, hh, d = index
  h = shape[1]
  cols = slice(x.start * h, x.stop * h)
  return read((d, cols)).T.reshape(x.stop - x.start, h, d.stop - d.start)[:, hh]


def read_config(path: str | os.PathLike, **overrides) -> llama.LlamaConfig:
  """The LlamaConfig of the HF checkpoint directory or GGUF file `path` (with field
  overrides)."""
  directory = Path(path)
  if gguf.is_gguf(directory):
    return _config_of(gguf.open_gguf(directory)[0], directory, overrides)
  if not directory.exists():
    raise FileNotFoundError(f"HF checkpoint directory not found: {directory}")
  if not directory.is_dir():
    raise NotADirectoryError(f"{directory} is a file; an HF checkpoint is a directory holding "
                             "config.json and *.safetensors")
  config_path = directory / "config.json"
  if not config_path.exists():
    raise FileNotFoundError(f"{config_path} not found: an HF checkpoint directory needs "
                            "config.json")
  return _config_of(read_json(config_path), config_path, overrides)


def _config_of(hf_dict: dict, where: Path, overrides: dict) -> llama.LlamaConfig:
  try:
    return hf_config.from_hf_config(hf_dict, **overrides)
  except hf_config.HFConfigError as e:
    raise CheckpointError(f"{where}: {e}") from None


def _check_tensors(directory: Path, files, config: llama.LlamaConfig,
                   tensors: list[_Tensor], shapes: dict[tuple[str, ...], tuple[int, ...]]):
  expected = {}
  for t in tensors:
    per_layer = shapes[t.path][1:] if t.stacked else shapes[t.path]
    for i in range(config.n_layers if t.stacked else 1):
      expected[t.hf.format(i=i)] = _hf_shape(t.layout, per_layer)
  found = {k for k in files.file_of if not k.endswith(IGNORED_SUFFIXES)}
  if config.tie_embeddings and "lm_head.weight" in found:
    found.discard("lm_head.weight")
    embed, head = files.slice("model.embed_tokens.weight"), files.slice("lm_head.weight")
    if not np.array_equal(embed[:], head[:]):
      raise CheckpointError(f"{directory}: config.json has tie_word_embeddings=true but "
                            "lm_head.weight differs from model.embed_tokens.weight; set "
                            "tie_word_embeddings=false to load both")
  missing = sorted(set(expected) - found)
  if missing:
    raise CheckpointError(f"{directory}: missing {len(missing)} tensor(s) for this config "
                          f"({config.n_layers} layers, tie_word_embeddings="
                          f"{config.tie_embeddings}): {missing[:5]}")
  unexpected = sorted(found - set(expected))
  if unexpected:
    raise CheckpointError(f"{directory}: {len(unexpected)} unexpected tensor(s) not in a "
                          f"LlamaForCausalLM with this config: {unexpected[:5]}")
  for name, want in expected.items():
    info = files.slice(name)
    got, dtype = tuple(info.get_shape()), info.get_dtype()
    if got != want:
      raise CheckpointError(f"{files.location(name)}: tensor {name} has shape {got}, "
                            f"expected {want} from config.json")
    if dtype not in _FLOAT_DTYPES:
      raise CheckpointError(f"{files.location(name)}: tensor {name} has dtype "
                            f"{dtype}; expected one of {sorted(_FLOAT_DTYPES)}")


def _normalize(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape, strict=True))


def check_dtype(dtype, caller: str) -> str:
  """The name of a floating parameter dtype, or a ValueError naming `caller`."""
  name = jnp.dtype(dtype).name
  if name not in llama.DTYPES:
    raise ValueError(f"{caller}: dtype={name!r} is not a floating type; choose one of "
                     f"{sorted(llama.DTYPES)}")
  return name


def load_hf(path: str | os.PathLike, *, dtype=jnp.float32, mesh: Mesh | None = None,
            compute_dtype=None, rules=sharding_lib.DEFAULT_RULES,
            **config_overrides) -> llama.Llama:
  """Load an HF LLaMA checkpoint directory (or a GGUF file) into a `Llama`; NaN or Inf
  weights are an error.

  Args:
    dtype: parameter (storage) dtype; also the compute dtype unless `compute_dtype` is set.
    mesh: place each parameter on this mesh by its logical axes and `rules`; None puts
      everything on the default device.
    config_overrides: LlamaConfig fields such as `scan_layers` or `remat`.
  """
  directory = Path(path)
  fields = dict(param_dtype=check_dtype(dtype, "load_hf"),
                dtype=jnp.dtype(compute_dtype or dtype).name, **config_overrides)
  if gguf.is_gguf(directory):
    hf_dict, tensors = gguf.open_gguf(directory)
    return load_tensors(tensors, _config_of(hf_dict, directory, fields), where=directory,
                        mesh=mesh, rules=rules)
  config = read_config(directory, **fields)
  with contextlib.ExitStack() as stack:
    return load_tensors(_SafetensorsDir(directory, stack), config, where=directory, mesh=mesh,
                        rules=rules)


def load_tensors(files, config: llama.LlamaConfig, *, where: Path, mesh: Mesh | None = None,
                 rules=sharding_lib.DEFAULT_RULES) -> llama.Llama:
  """A `Llama` of `config` from `files` (HF tensor names -> slices: `file_of`, `slice`,
  `location`), each device's block read on its own; `where` names the source in errors."""
  graphdef, state = nnx.split(llama.abstract_model(config))
  variables = dict(nnx.to_flat_state(state))
  tensors = _tensor_map(config)
  target = np.dtype(config.weight_dtype)
  _check_tensors(where, files, config, tensors,
                 {t.path: variables[t.path].shape for t in tensors})
  for t in tensors:
    var = variables[t.path]
    shape = tuple(var.shape)
    if mesh is None:
      sharding = SingleDeviceSharding(jax.local_devices()[0])
    else:
      sharding = sharding_lib.param_sharding("/".join(t.path), shape,
                                             var.get_metadata()["out_sharding"], mesh, rules)
    cache: dict[tuple, np.ndarray] = {}

    def block(index, t=t, shape=shape, cache=cache):
      index = _normalize(index, shape)
      key = tuple((s.start, s.stop) for s in index)
      if key not in cache:
        if t.stacked:
          value = np.stack([
              _read_ours(files.slice(t.hf.format(i=i)).__getitem__, t.layout, shape[1:],
                         index[1:]) for i in range(*key[0])])
        else:
          value = _read_ours(files.slice(t.hf).__getitem__, t.layout, shape, index)
        cache[key] = np.asarray(value).astype(target, copy=False)
      return cache[key]

    var.set_value(jax.make_array_from_callback(shape, sharding, block))
  layers = {t.hf: [t.hf.format(i=i) for i in range(config.n_layers)] for t in tensors if t.stacked}
  bad = finite.nonfinite_leaves({t.hf: variables[t.path][...] for t in tensors}, rows=layers)
  if bad:
    listed = finite.describe([(f"{name} in {files.file_of[name]}", n) for name, n in bad])
    raise CheckpointError(f"{where}: {listed}; re-download or re-export the checkpoint")
  return nnx.merge(graphdef, nnx.from_flat_state(variables))


def host_value(x: jax.Array) -> np.ndarray:
  """The whole array on this host, also when other hosts hold some of its shards."""
  if jax.process_count() > 1 and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _hf_tensors(model: llama.Llama, dtype) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) one layer at a time, so the host holds one layer's tensor at once."""
  variables = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for t in _tensor_map(model.config):
    value = variables[t.path][...]
    if t.stacked:
      for i in range(model.config.n_layers):
        yield t.hf.format(i=i), _to_hf(t.layout, host_value(value[i]).astype(dtype))
    else:
      yield t.hf, _to_hf(t.layout, host_value(value).astype(dtype))


def save_hf(model: llama.Llama, path: str | os.PathLike, *, dtype=None,
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Write `config.json`, `generation_config.json` and safetensors shards (plus index).

  `transformers.AutoModelForCausalLM.from_pretrained(path)` loads the result. `dtype`
  defaults to the parameter dtype. The directory appears complete or not at all; other
  files already in it (tokenizer, README) are kept, old weights replaced.
  """
  directory = Path(path)
  if directory.exists() and not directory.is_dir():
    raise NotADirectoryError(f"save_hf: {directory} exists and is not a directory")
  if model.config.lora is not None:
    raise ValueError("save_hf: the model has LoRA adapters, which a LlamaForCausalLM "
                     "checkpoint cannot hold; save lora.merge(model), and the adapters with "
                     "checkpoints.peft.save_peft")
  dtype_name = jnp.dtype(dtype or model.config.weight_dtype).name
  if dtype_name not in llama.DTYPES:
    raise ValueError(f"save_hf: dtype={dtype_name!r}; choose one of {sorted(llama.DTYPES)}")
  np_dtype = np.dtype(jnp.dtype(dtype_name))
  writer = jax.process_index() == 0
  tmp = directory.parent / f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}"
  if writer:
    tmp.mkdir(parents=True)
  try:
    shard_names: list[list[str]] = []
    current: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
      if writer:
        safetensors.numpy.save_file(current, tmp / f"shard-{len(shard_names)}",
                                    metadata={"format": "pt"})
      shard_names.append(list(current))

    for name, value in _hf_tensors(model, np_dtype):
      if current and size + value.nbytes > max_shard_bytes:
        flush()
        current, size = {}, 0
      current[name] = np.ascontiguousarray(value)
      size += value.nbytes
      total += value.nbytes
    flush()
    if writer:
      _finish(tmp, directory, model.config, dtype_name, shard_names, total)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"save_hf:{directory}")


def _finish(tmp: Path, directory: Path, config: llama.LlamaConfig, dtype_name: str,
            shard_names: list[list[str]], total_bytes: int) -> None:
  """Name the shards, write index and configs, then move the directory into place."""
  n = len(shard_names)
  weight_map = {}
  for k, names in enumerate(shard_names):
    file = SINGLE_FILE if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
    os.replace(tmp / f"shard-{k}", tmp / file)
    weight_map.update(dict.fromkeys(names, file))
  if n > 1:
    _write_json(tmp / INDEX_FILE, {"metadata": {"total_size": total_bytes},
                                   "weight_map": weight_map})
  _write_json(tmp / "config.json", hf_config.to_hf_config(config, dtype=dtype_name))
  eos = list(config.eos_ids)
  _write_json(tmp / "generation_config.json", {
      "bos_token_id": config.bos_id, "eos_token_id": eos[0] if len(eos) == 1 else eos or None,
      "pad_token_id": config.pad_id})
  if not directory.exists():
    os.replace(tmp, directory)
    return
  ours = {"config.json", "generation_config.json", INDEX_FILE}
  for old in directory.iterdir():
    if old.name not in ours and old.suffix != ".safetensors" and not (tmp / old.name).exists():
      (shutil.copytree if old.is_dir() else shutil.copy2)(old, tmp / old.name)
  trash = directory.parent / f".{directory.name}.old-{uuid.uuid4().hex[:8]}"
  os.replace(directory, trash)
  os.replace(tmp, directory)
  shutil.rmtree(trash)


def _write_json(path: Path, data: dict) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")
