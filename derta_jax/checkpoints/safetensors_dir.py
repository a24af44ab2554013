"""A safetensors checkpoint directory: which file holds each tensor, sliced numpy reads."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import safetensors

from derta_jax.checkpoints.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsDir:
  """Which file holds each tensor; lazy, sliced reads through safetensors' numpy API."""

  def __init__(self, directory: Path, stack: contextlib.ExitStack):
    index_path = directory / INDEX_FILE
    if index_path.exists():
      index = read_json(index_path)
      weight_map = index.get("weight_map")
      if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: field 'weight_map' is missing or not an object")
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(p.name for p in directory.glob("*.safetensors"))
      weight_map = None
    if not files:
      found = sorted(p.name for p in directory.iterdir())
      raise CheckpointError(f"{directory}: no *.safetensors weights (found {found}); "
                            "derta_jax never unpickles .bin/.pt files: convert them to "
                            "safetensors first")
    self.handles, self.file_of, self.directory = {}, {}, directory
    for name in files:
      path = directory / name
      if not path.exists():
        raise CheckpointError(f"{index_path}: lists {name}, which does not exist in {directory}")
      try:
        handle = stack.enter_context(safetensors.safe_open(path, framework="numpy"))
      except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
      self.handles[name] = handle
      for key in handle.keys():
        if weight_map is None or weight_map.get(key) == name:
          self.file_of[key] = name
    if weight_map is not None:
      absent = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
      if absent:
        raise CheckpointError(f"{index_path}: tensor {absent[0]} is listed in "
                              f"{weight_map[absent[0]]} but not stored there")

  def slice(self, name: str):
    return self.handles[self.file_of[name]].get_slice(name)

  def location(self, name: str) -> str:
    return str(self.directory / self.file_of[name])


def read_json(path: Path) -> dict:
  """A JSON object from `path`; CheckpointError names the file and line otherwise."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: "
                          f"{e.msg}") from None
  if not isinstance(data, dict):
    raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
  return data
