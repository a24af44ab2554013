"""Eval outputs in <workdir>/eval/: <suite>.jsonl, summary.json, summary.md and PNG plots.

Every file is written to a temporary sibling and renamed into place, so a reader never sees
half a file; only process 0 writes. Plots use matplotlib's Agg canvas (no display, no
pyplot state).
"""

from __future__ import annotations

import io
import json
import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import jax


def write_bytes(path: Path, data: bytes) -> None:
  """Atomically: a temporary sibling renamed over `path`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_jsonl(path: Path, rows) -> None:
  write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


# ---------------------------------------------------------------------------- plots


def _figure(width=6.0, height=4.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k, t and indices are whole tokens
  return fig, ax


def _save_png(fig, path: Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  write_bytes(path, buffer.getvalue())


def plot_prefilling(metrics: Mapping, path: Path) -> None:
  """ASR of the continuation against the number of harmful tokens prefilled."""
  ks = sorted(int(k) for k in metrics["asr_by_k"])
  fig, ax = _figure()
  ax.plot(ks, [100 * metrics["asr_by_k"][str(k)] for k in ks], marker="o")
  ax.set(xlabel="harmful-response tokens prefilled (k)", ylabel="attack success rate (%)",
         ylim=(-3, 103), title=f"Prefilling attack ({metrics['n']} questions)")
  ax.grid(alpha=0.3)
  _save_png(fig, path)


def plot_refusal_positions(metrics: Mapping, path: Path) -> None:
  """How many refusals start at each token index of the response."""
  counts = metrics["histogram"]
  fig, ax = _figure()
  ax.bar(range(len(counts)), counts, width=0.8)
  share = metrics["share_first_5"]
  shown = "n/a" if share is None else f"{100 * share:.0f}%"
  ax.set(xlabel="token index of the first refusal phrase", ylabel="responses",
         title=f"Refusal position ({metrics['refusals']} of {metrics['n']} refuse; "
               f"{shown} in the first 5 tokens)")
  ax.set_xlim(-0.7, max(len(counts), 5) - 0.3)
  ax.grid(axis="y", alpha=0.3)
  _save_png(fig, path)


def plot_refusal_probe(metrics: Mapping, path: Path) -> None:
  """Mean teacher-forced P(refusal) over positions of the harmful response, with counts."""
  curve, counts = metrics["curve"], metrics["counts"]
  fig, ax = _figure()
  ax.plot(range(len(curve)), curve, color="C0")
  ax.set(xlabel="position t in the harmful response",
         ylabel=r"mean P(refusal $\mid$ q, $\hat{r}_{<t}$)", ylim=(-0.02, 1.02),
         title=f"Refusal probe ({metrics['n']} responses)")
  ax.grid(alpha=0.3)
  twin = ax.twinx()
  twin.plot(range(len(counts)), counts, color="C1", alpha=0.5, linestyle="--")
  twin.set_ylabel("responses that reach t", color="C1")
  twin.set_ylim(0, max(counts) * 1.05)
  _save_png(fig, path)


def plot_over_refusal(metrics: Mapping, path: Path) -> None:
  """XSTest's three classes per prompt type, stacked (shares of that type's prompts)."""
  types = list(metrics["per_type"])
  fig, ax = _figure(8.0, 0.9 + 0.32 * max(len(types), 3))
  left = [0.0] * len(types)
  for cls, color in (("full_compliance", "C2"), ("partial_refusal", "C1"),
                     ("full_refusal", "C3"), ("empty", "C7")):
    shares = [100 * metrics["per_type"][t][cls] for t in types]
    ax.barh(types, shares, left=left, color=color, label=cls.replace("_", " "))
    left = [a + b for a, b in zip(left, shares, strict=True)]
  ax.invert_yaxis()
  ax.set(xlabel="share of prompts (%)", xlim=(0, 100),
         title=f"Over-refusal ({metrics['n_safe']} safe prompts, {metrics['n_unsafe']} unsafe "
               "contrasts)")
  ax.legend(loc="lower right", fontsize=7)
  _save_png(fig, path)


def plot_attacks(suites: Mapping, path: Path) -> None:
  """ASR per attack suite under the configured judge and under strict."""
  names = [n for n, m in suites.items() if "asr_strict" in m]
  fig, ax = _figure(max(4.0, 1.1 * len(names) + 1.5), 4.0)
  x = range(len(names))
  ax.bar([i - 0.2 for i in x], [100 * suites[n]["asr"] for n in names], 0.4, label="judge")
  ax.bar([i + 0.2 for i in x], [100 * suites[n]["asr_strict"] for n in names], 0.4,
         label="strict")
  ax.set_xticks(list(x), names, rotation=20, fontsize=8)
  ax.set(ylabel="attack success rate (%)", ylim=(0, 103), title="Attacks")
  ax.legend()
  ax.grid(axis="y", alpha=0.3)
  _save_png(fig, path)


PLOTS = {
    "prefilling": ("prefilling_asr.png", plot_prefilling),
    "refusal_position": ("refusal_position.png", plot_refusal_positions),
    "refusal_probe": ("refusal_probe.png", plot_refusal_probe),
    "over_refusal": ("over_refusal.png", plot_over_refusal),
}


# ---------------------------------------------------------------------------- files


def write_suite(directory: Path, name: str, rows, metrics: Mapping) -> list[str]:
  """<name>.jsonl, the suite's plot, and for alpaca the JSON list AlpacaEval reads."""
  files = [f"{name}.jsonl"]
  if name == "alpaca":
    files.append("alpaca_outputs.json")
  if name in PLOTS:
    files.append(PLOTS[name][0])
  if jax.process_index() != 0:
    return files
  write_jsonl(directory / files[0], rows)
  if name == "alpaca":
    write_bytes(directory / files[1], json.dumps(rows, indent=1, ensure_ascii=False).encode())
  if files[-1].endswith(".png"):
    PLOTS[name][1](metrics, directory / files[-1])
  return files


def _cell(value) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:.4f}" if isinstance(value, float) else str(value)


def headline(name: str, metrics: Mapping) -> list[tuple[str, object]]:
  """The (metric, value) pairs of a suite shown in summary.md."""
  if name == "prefilling":
    return [(f"asr@k={k}", v) for k, v in metrics["asr_by_k"].items()]
  if name == "refusal_probe":
    return [("mean P(refusal)", metrics["mean"]), ("P(refusal)@t=0", metrics["first"])]
  keys = {"refusal_position": ("share_first_5", "mean_position", "refusals"),
          "alpaca": (),
          "over_refusal": ("refusal_rate", "refusal_rate_strict", "full_compliance",
                           "unsafe_refusal_rate")}.get(name, ("asr", "asr_strict", "empty",
                                                              "accuracy"))
  return [(k, metrics[k]) for k in keys if k in metrics]


def summary_markdown(summary: Mapping, config: Mapping) -> str:
  lines = ["# Evaluation", "", f"- model: {summary.get('model', '–')}",
           f"- tokenizer: {summary.get('tokenizer', '–')}",
           f"- template: `{config['template']}`, judge: `{config['judge']}`, "
           f"max_new_tokens: {config['max_new_tokens']}, temperature: {config['temperature']}",
           "", "| suite | metric | value | n |", "|---|---|---|---|"]
  for name, metrics in summary["suites"].items():
    pairs = headline(name, metrics) or [("generations", metrics["n"])]
    lines += [f"| {name} | {k} | {_cell(v)} | {metrics['n']} |" for k, v in pairs]
  return "\n".join(lines) + "\n"


def write_summary(directory: Path, summary: Mapping, config: Mapping) -> None:
  """summary.json (the summary plus the settings used) and summary.md."""
  if jax.process_index() != 0:
    return
  write_bytes(directory / "summary.json",
              (json.dumps(dict(summary, config=config), indent=1) + "\n")
              .encode())
  write_bytes(directory / "summary.md", summary_markdown(summary, config).encode())
  if any("asr_strict" in m for m in summary["suites"].values()):
    plot_attacks(summary["suites"], directory / "attacks.png")
