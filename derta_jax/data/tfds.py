"""DeRTa's JSONL sources as a TFDS dataset in ArrayRecord files, read back by random access.

  ds_dir = prepare({"train": "triples.jsonl"}, fmt="triples", data_dir="gs://bucket/tfds")
  triples = open_records("gs://bucket/tfds", "triples", "train")  # Sequence[Triple]

Training reads them with `data.source="tfds"` and `data.tfds_dir` (triples, and helpful
pairs where prepared, as `data.source="recipe"` reads the JSONL files).

Writes `{data_dir}/{name}/{fmt}/1.0.0/`. Neither building nor reading needs TensorFlow: with
`file_format="array_record"`, TFDS serializes through its own protos and the `array_record`
package, and reads with `tfds.data_source`-style numpy decoding. Records keep the order of
the source files (the builder disables TFDS's write-time shuffle and keys records by their
position), so an index into the source is a stable example id. An upstream file holds
Examples of the kinds "mle" and "rto" only, and they are stored as such. A gs:// data_dir goes
through etils.epath, which without TensorFlow needs the `gcsfs` package.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from derta_jax.data import formats
from derta_jax.data.records import DataError, EvalItem, Example, Helpful, Triple

DEFAULT_NAME = "derta_data"
Record = Example | Triple | Helpful | EvalItem
SourcePaths = Mapping[str, str | os.PathLike | Sequence[str | os.PathLike]]


@dataclasses.dataclass(frozen=True)
class _Format:
  loader: str  # function name in derta_jax.data.formats
  record: type
  description: str


FORMATS = {
    "upstream": _Format("load_upstream", Example,
                        'Upstream training data {"prefix", "text", "safe"} as Examples.'),
    "triples": _Format("load_triples", Triple,
                       'Harmful triples {"instruction", "output", "safe_response"}.'),
    "helpful": _Format("load_helpful", Helpful, 'Helpful pairs {"instruction", "output"}.'),
    "eval": _Format("load_eval", EvalItem,
                    'Evaluation prompts {"question"[, "answer"][, "type", "safe"]}; "" means '
                    'absent, safe is "true" or "false".'),
}


def _check_fmt(fmt: str) -> _Format:
  if fmt not in FORMATS:
    raise ValueError(f"Unknown data format {fmt!r}; choose one of {sorted(FORMATS)}")
  return FORMATS[fmt]


def _fields(fmt: str) -> list[str]:
  """The record's fields a dataset of format `fmt` stores: an upstream file has no pairs,
  so an Example is stored without `rejected`."""
  return [f.name for f in dataclasses.fields(FORMATS[fmt].record)
          if not (fmt == "upstream" and f.name == "rejected")]


def _features(fmt: str) -> tfds.features.FeaturesDict:
  fields = {name: tfds.features.Text() for name in _fields(fmt)}
  if fmt == "upstream":
    fields["kind"] = tfds.features.ClassLabel(names=list(formats.UPSTREAM_KINDS))
  return tfds.features.FeaturesDict(fields)


def _to_feature_dict(fmt: str, record: Record) -> dict[str, Any]:
  # TFDS has no optional Text, so a missing eval answer or type is stored as ""; the readers
  # reject an empty one, so "" is never a real one. An eval item's safe flag is stored as
  # "true" / "false" / "".
  if isinstance(record, Example) and record.kind not in formats.UPSTREAM_KINDS:
    raise DataError(f"an Example of kind {record.kind!r} cannot be stored in the upstream "
                    f"format, which holds the kinds {formats.UPSTREAM_KINDS}")
  stored = _fields(fmt)
  return {k: "" if v is None else ("true" if v else "false") if isinstance(v, bool) else v
          for k, v in dataclasses.asdict(record).items() if k in stored}


def to_record(fmt: str, item: Mapping[str, str]) -> Record:
  """The record dataclass of a decoded item (as `open_source` returns it)."""
  spec = _check_fmt(fmt)
  fields = dict(item)
  if spec.record is EvalItem:
    fields["answer"] = fields["answer"] or None
    fields["type"] = fields.get("type") or None
    fields["safe"] = {"true": True, "false": False}.get(fields.get("safe", ""))
  return spec.record(**fields)


def _normalize_sources(sources: SourcePaths) -> dict[str, tuple[str, ...]]:
  """split -> file paths, each checked to exist (local or gs://)."""
  out = {}
  for split, paths in sources.items():
    if isinstance(paths, str | os.PathLike):
      paths = [paths]
    out[split] = tuple(os.fspath(p) for p in paths)
    if not out[split]:
      raise ValueError(f"Split {split!r} has no source files")
    for path in out[split]:
      if not epath.Path(path).exists():
        raise FileNotFoundError(f"Source file for split {split!r} not found: {path}")
  return out


class DertaData(tfds.core.GeneratorBasedBuilder):
  """DeRTa data from user-given JSONL files, one config per file format.

  The source files come in as `sources` (split -> paths); they are needed only to build.
  `name` replaces the dataset name (the directory under data_dir), so that several datasets
  of one format can live in one data_dir.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=k, description=v.description)
                     for k, v in FORMATS.items()]
  # TFDS 4.9.10 computes this with `importlib_resources`, which it does not install on
  # Python >= 3.9 (tensorflow/datasets#11212); the value is the same.
  code_path = epath.Path(__file__)

  def __init__(self, *, sources: SourcePaths | None = None, name: str = DEFAULT_NAME,
               **kwargs):
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
      raise ValueError(f"Dataset name {name!r} must be snake_case, e.g. {DEFAULT_NAME!r}")
    # An instance attribute shadows the class's registered name, which fixes the directory.
    self.name = name
    self._sources = sources
    super().__init__(**kwargs)
    self._original_state.update(sources=sources, name=name)  # for pickling

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="DeRTa data from user-given JSONL files (derta_jax.data.tfds_derta).",
        features=_features(self.builder_config.name),
        # Keeps the source order: records are keyed by position and written sorted by key.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the sources are local or gs:// files, never downloaded
    if not self._sources:
      raise ValueError(f"Building {self.name}/{self.builder_config.name} needs sources= "
                       "(split -> JSONL paths); see derta_jax.data.tfds.prepare")
    return {split: self._generate_examples(paths)
            for split, paths in _normalize_sources(self._sources).items()}

  def _generate_examples(self, paths: tuple[str, ...]):
    load = getattr(formats, FORMATS[self.builder_config.name].loader)
    index = 0
    for path in paths:
      for record in load(path):
        yield index, _to_feature_dict(self.builder_config.name, record)
        index += 1
    if not index:
      # TFDS would fail later with "No examples were yielded", naming neither split nor files.
      raise DataError(f"No records in {', '.join(paths)}")


def prepare(sources: SourcePaths, *, fmt: str, data_dir: str | os.PathLike,
            name: str = DEFAULT_NAME, overwrite: bool = False) -> str:
  """Builds ArrayRecord files from `sources` (split -> JSONL file(s)); returns the dataset dir.

  An existing dataset raises FileExistsError unless `overwrite`, so that new sources are
  never silently ignored in favour of an old build.
  """
  _check_fmt(fmt)
  kwargs = dict(sources=_normalize_sources(sources), name=name, config=fmt,
                data_dir=os.fspath(data_dir))
  builder = DertaData(**kwargs)
  if builder.is_prepared():
    if not overwrite:
      raise FileExistsError(f"{builder.data_dir} exists; pass overwrite=True to rebuild it")
    builder.data_path.rmtree()
    # A fresh builder, as the old one holds the old build's DatasetInfo.
    builder = DertaData(**kwargs)
  # Nothing is downloaded; a temporary download_dir keeps TFDS's empty cache out of data_dir.
  with tempfile.TemporaryDirectory() as download_dir:
    builder.download_and_prepare(download_dir=download_dir,
                                 file_format=tfds.core.FileFormat.ARRAY_RECORD)
  return os.fspath(builder.data_dir)


class _Source(Sequence):
  """A list-like view of a TFDS data source: len(), [i], [a:b] and iteration."""

  def __init__(self, source, convert: Callable[[Mapping[str, Any]], Any]):
    self._source = source
    self._convert = convert

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      keys = range(*index.indices(len(self)))
      return [self._convert(r) for r in self._source.__getitems__(keys)] if keys else []
    i = index.__index__()
    if not -len(self) <= i < len(self):
      raise IndexError(f"Index {index} out of range for {len(self)} records")
    return self._convert(self._source[i % len(self)])


def _decoder(fmt: str) -> Callable[[Mapping[str, Any]], dict[str, str]]:
  """Turns TFDS's numpy item (bytes, and the kind as a label id) into a dict of str."""
  def decode(item):
    out = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in item.items()}
    if fmt == "upstream":
      out["kind"] = formats.UPSTREAM_KINDS[int(out["kind"])]
    return out

  return decode


def is_prepared(data_dir: str | os.PathLike, fmt: str, *, name: str = DEFAULT_NAME) -> bool:
  """Whether `prepare` has written format `fmt` under data_dir."""
  _check_fmt(fmt)
  return DertaData(name=name, config=fmt, data_dir=os.fspath(data_dir)).is_prepared()


def _data_source(data_dir: str | os.PathLike, fmt: str, split: str, name: str):
  _check_fmt(fmt)
  builder = DertaData(name=name, config=fmt, data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    raise FileNotFoundError(f"No prepared dataset at {builder.data_dir}; run prepare() first")
  if split not in builder.info.splits:
    raise ValueError(f"Split {split!r} not in {builder.data_dir}; it has "
                     f"{sorted(builder.info.splits)}")
  return builder.as_data_source(split=split)


def open_source(data_dir: str | os.PathLike, fmt: str, split: str, *,
                name: str = DEFAULT_NAME) -> Sequence[dict[str, str]]:
  """Random access to a prepared split; items are dicts of str, in source order."""
  return _Source(_data_source(data_dir, fmt, split, name), _decoder(fmt))


def open_records(data_dir: str | os.PathLike, fmt: str, split: str, *,
                 name: str = DEFAULT_NAME) -> Sequence[Record]:
  """Like `open_source`, with items as record dataclasses, i.e. what formats' loaders give."""
  decode = _decoder(fmt)
  return _Source(_data_source(data_dir, fmt, split, name), lambda r: to_record(fmt, decode(r)))
