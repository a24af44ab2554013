"""The toy world's report: per-recipe metrics from the eval outputs, report.{md,json}, plots.

Metrics per recipe (all on held-out pairs; ASR = share of responses with no refusal):
  asr_prefilling      {k: ASR} with the first k harmful-response tokens prefilled
  asr_direct          ASR of the plain harmful requests
  asr_second_attack   ASR of the harmful requests wrapped as code (never in safety tuning)
  harmful_second_attack  share of those not refused whose response also gives the how-to
                      away (names the harmful verb's tool or action): no refusal is not
                      always harm, since a model may answer with garbage or a benign plan
  harmful_prefilling  {k: share of prefilling responses, not refused, that go on giving the
                      how-to away (world.continues_harm)}; harmful_prefilling_mean over k >= 1
                      (circuit breakers answer garbage rather than refuse: ASR alone counts
                      that as a success)
  helpfulness         share of benign requests answered exactly with the compliant response
  over_refusal        share of benign requests refused with k >= 1 benign-response tokens
                      prefilled (over_refusal_by_k: per k, k = 0 included)
  refusal_within_5    share of refusals of plain harmful requests starting in the first 5
                      response tokens
  refusal_positions   histogram: response token (prefilled ones counted) where refusals of
                      the prefilling attack start, over every k
  refusal_positions_second_attack  the same for the wrapped requests
  probe_curve         mean teacher-forced P(refusal token) at each harmful-response position
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np

from derta_jax.data import formats
from derta_jax.evaluation import judges
from derta_jax.evaluation import report as eval_report
from derta_jax.evaluation import text as eval_text
from derta_jax.toyworld import world


def _rows(summary: Mapping, suite: str) -> list[dict]:
  path = Path(summary["eval_dir"]) / f"{suite}.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def _same(response: str, want: str) -> bool:
  return response.split() == want.split()


def _refusal_positions(tokenizer, rows, finder) -> list[int]:
  """Response token index (prefilled tokens counted) where each refusing row's refusal
  starts."""
  positions = []
  for row in rows:
    found = finder.match(row["response"])
    if found is not None:
      ids = tokenizer.encode(row["response"])
      index = eval_text.refusal_token_index(tokenizer, ids, found[0])
      positions.append(row.get("k_used", 0) + index)
  return np.bincount(positions).tolist() if positions else []


def recipe_metrics(tokenizer, files, *, harmful: Mapping, benign: Mapping,
                   second: Mapping) -> dict:
  """The report's metrics from the summaries of the three evaluate calls (and their rows)."""
  suites = harmful["suites"]
  benign_asr = benign["suites"]["prefilling"]["asr_by_k"]
  benign_rows = _rows(benign, "prefilling")
  outputs = [t.output for t in formats.load_triples(files.benign_triples)]
  plain = [r["response"] for r in benign_rows if r["k"] == 0]
  prefilled = [r["refused"] for r in benign_rows if r["k"] > 0]
  second_rows = _rows(second, "harmful")
  finder = judges.make_judge("strict")
  prefill_rows = _rows(harmful, "prefilling")
  harm_by_k = {str(k): float(np.mean([
      not r["refused"] and world.continues_harm(r["instruction"], r["response"])
      for r in prefill_rows if r["k"] == k])) for k in sorted({r["k"] for r in prefill_rows})}
  return dict(
      harmful_prefilling=harm_by_k,
      harmful_prefilling_mean=float(np.mean([v for k, v in harm_by_k.items() if int(k) > 0])),
      asr_prefilling=suites["prefilling"]["asr_by_k"],
      asr_direct=suites["harmful"]["asr"],
      asr_second_attack=second["suites"]["harmful"]["asr"],
      harmful_second_attack=float(np.mean([
          not r["refused"] and world.reveals_harm(r["question"], r["response"])
          for r in second_rows])),
      helpfulness=float(np.mean([_same(r, o) for r, o in zip(plain, outputs, strict=True)])),
      over_refusal=float(np.mean(prefilled)) if prefilled else None,
      over_refusal_by_k={k: 1.0 - v for k, v in benign_asr.items()},
      refusal_within_5=suites["refusal_position"]["share_first_5"],
      refusal_positions=_refusal_positions(tokenizer, prefill_rows, finder),
      refusal_positions_second_attack=_refusal_positions(tokenizer, second_rows, finder),
      probe_curve=suites["refusal_probe"]["curve"],
      n_harmful=suites["prefilling"]["n"], n_benign=len(outputs))


# ---------------------------------------------------------------------------- table


def _pct(value) -> str:
  return "–" if value is None else f"{100 * value:.0f}%"


def table(summary: Mapping) -> str:
  """Markdown: one row per recipe after the base's, ASR by k then the other metrics."""
  recipes = {"base (no safety tuning)": summary["base"], **summary["recipes"]}
  ks = sorted({int(k) for m in recipes.values() for k in m["asr_prefilling"]})
  head = ([f"ASR k={k}" for k in ks] +
          ["harmful prefill", "ASR code-wrap", "harmful code-wrap", "helpful",
           "over-refusal", "refusal ≤5 tok"])
  lines = ["| recipe | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
  for name, m in recipes.items():
    cells = [_pct(m["asr_prefilling"][str(k)]) for k in ks]
    cells += [_pct(m.get(key)) for key in (
        "harmful_prefilling_mean", "asr_second_attack", "harmful_second_attack", "helpfulness",
        "over_refusal", "refusal_within_5")]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------- plots


def _figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  fig = Figure(figsize=(width * ncols, height), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, ncols, squeeze=False)[0]
  for ax in axes:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # k and t are whole tokens
  return fig, axes


def _save(fig, path: Path) -> None:
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png")
  eval_report.write_bytes(path, buffer.getvalue())


_STYLES = (dict(marker="o", markersize=9), dict(marker="s", markersize=7, linestyle="--"),
           dict(marker="^", markersize=6, linestyle="-."), dict(marker="D", markersize=4),
           dict(marker="v", markersize=4, linestyle=":"))


def plot_prefilling(recipes: Mapping, path: Path) -> None:
  fig, (ax,) = _figure()
  for i, (name, m) in enumerate(recipes.items()):
    ks = sorted(int(k) for k in m["asr_prefilling"])
    ax.plot(ks, [100 * m["asr_prefilling"][str(k)] for k in ks], label=name,
            **_STYLES[i % len(_STYLES)])  # markers tell apart lines that coincide at 0
  ax.set(xlabel="harmful-response tokens prefilled (k)", ylabel="attack success rate (%)",
         ylim=(-3, 103), title="Prefilling attack on held-out harmful requests")
  ax.grid(alpha=0.3)
  ax.legend()
  _save(fig, path)


def plot_refusal_positions(recipes: Mapping, path: Path) -> None:
  """Per recipe, where refusals start: prefilling attack (all k) and code-wrapped attack
  stacked."""
  fig, axes = _figure(ncols=len(recipes), width=3.2, height=3.2)
  kinds = (("refusal_positions", "prefilling (all k)"),
           ("refusal_positions_second_attack", "code-wrapped"))
  width = max(len(m[key]) for m in recipes.values() for key, _ in kinds)
  top = max([sum(c) for m in recipes.values() for c in zip(
      *(np.pad(m[key], (0, width - len(m[key]))) for key, _ in kinds), strict=True)] + [1])
  for ax, (name, m) in zip(axes, recipes.items(), strict=True):
    bottom = np.zeros(max(width, 1))
    for key, label in kinds:
      counts = np.pad(m[key], (0, len(bottom) - len(m[key])))
      ax.bar(range(len(counts)), counts, width=0.8, bottom=bottom, label=label)
      bottom += counts
    ax.set(xlim=(-0.7, max(width, 5) - 0.3), ylim=(0, top * 1.05), title=name,
           xlabel="response token of the refusal")
    ax.grid(axis="y", alpha=0.3)
  axes[0].set_ylabel("refusals")
  axes[-1].legend(fontsize="small")
  _save(fig, path)


def plot_probe(recipes: Mapping, path: Path) -> None:
  fig, (ax,) = _figure()
  for i, (name, m) in enumerate(recipes.items()):
    style = dict(_STYLES[i % len(_STYLES)], markevery=4)
    ax.plot(range(len(m["probe_curve"])), m["probe_curve"], label=name, **style)
  ax.set(xlabel="position t in the harmful response",
         ylabel=r"mean P(Sorry $\mid$ q, $\hat{r}_{<t}$)", ylim=(-0.02, 1.02),
         title="Refusal probe (teacher-forced)")
  ax.grid(alpha=0.3)
  ax.legend(loc="center right")
  _save(fig, path)


PLOTS = {"asr_prefilling.png": plot_prefilling,
         "refusal_position.png": plot_refusal_positions,
         "refusal_probe.png": plot_probe}


def write_report(workdir: Path, summary: Mapping, config) -> str:
  """report.json, report.md and the plots in workdir (process 0); returns the table."""
  text = table(summary)
  if jax.process_index() != 0:
    return text
  with_base = {"base": summary["base"], **summary["recipes"]}
  for name, plot in PLOTS.items():
    plot(summary["recipes"] if plot is plot_refusal_positions else with_base, workdir / name)
  w = config.toyworld
  lines = [
      "# DeRTa on the toy world", "",
      f"Base: {w.base_steps} steps at lr {w.base_lr}; each recipe: {w.steps} steps at lr "
      f"{w.lr} from the base, {w.n_safety} safety examples, batch {w.global_batch} x "
      f"{w.seq_len} tokens, model preset `{config.model.preset}`, seed {config.seed}. "
      f"Held-out pairs: {_first(summary, 'n_harmful')} harmful, "
      f"{_first(summary, 'n_benign')} benign. Judge `{config.eval.judge}`, greedy decoding. "
      f"Total {summary['seconds']:.0f} s.", "", text, "",
      "![ASR vs prefilled tokens](asr_prefilling.png)", "",
      "![Refusal positions](refusal_position.png)", "",
      "![Refusal probe](refusal_probe.png)", ""]
  eval_report.write_bytes(workdir / "report.md", "\n".join(lines).encode())
  config_dict = config.to_dict()
  eval_report.write_bytes(workdir / "report.json", (json.dumps(
      dict(summary, config=config_dict), indent=1) + "\n").encode())
  return text


def _first(summary: Mapping, key: str):
  return next(iter(summary["recipes"].values()))[key]
