"""Evaluation results: summary per method@budget, table cells, CSV / JSON / Markdown, plots.

Rows come from ``runner.run_eval`` (one per item and run).  The summary averages scores
per task kind, then over kinds (each kind counts once, as in RULER), and compares with
the full cache, which is always first.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from ..core.errors import KvcliError
from ..core.fileio import atomic_write_text
from .rows import COLUMNS, FULL, EvalResult, EvalRow, RunSummary


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [x for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _budget_key(budget: str) -> tuple[float, float]:
    b = float(budget)
    return (0.0, -b) if b <= 1 else (1.0, -b)  # ratios (largest first), then token counts


def run_labels(rows: Sequence[EvalRow]) -> list[tuple[str, str]]:
    """(method, budget) pairs in table order: full first, then methods as they ran."""
    seen = list(dict.fromkeys((r.method, r.budget) for r in rows))
    full = [s for s in seen if s[0] == FULL]
    return full + [s for s in seen if s[0] != FULL]


def kinds_of(rows: Sequence[EvalRow]) -> list[str]:
    return list(dict.fromkeys(r.kind for r in rows))


def summarize(rows: Sequence[EvalRow]) -> list[RunSummary]:
    """One summary per method@budget, the full cache first."""
    kinds = kinds_of(rows)
    by_run: dict[tuple[str, str], list[EvalRow]] = defaultdict(list)
    for r in rows:
        by_run[(r.method, r.budget)].append(r)
    out = []
    full_overall = None
    for method, budget in run_labels(rows):
        rs = by_run[(method, budget)]
        per_kind = {k: _mean([r.score for r in rs if r.kind == k]) for k in kinds}
        overall = _mean(list(per_kind.values()))
        if method == FULL:
            full_overall = overall
        out.append(
            RunSummary(
                method=method,
                budget=budget,
                label=FULL if method == FULL else f"{method}@{budget}",
                scores=per_kind,
                overall=overall,
                logprob_delta=_mean([r.logprob_delta for r in rs]),
                pct_of_full=(100.0 * overall / full_overall) if full_overall and overall is not None else None,
                kv_ratio=_mean([r.kv_ratio for r in rs]),
                prefill_seconds=sum(r.prefill_seconds for r in rs if r.prefill_seconds is not None),
                n=len(rs),
            )
        )
    return out


# ------------------------------------------------------------------ text renderings
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _delta(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def table_cells(rows: Sequence[EvalRow]) -> tuple[list[str], list[list[str]]]:
    """Header and body of the score table (strings), shared by the terminal and Markdown."""
    kinds = kinds_of(rows)
    header = ["method@budget", *kinds, "overall", "logprob Δ", "% of full", "KV kept"]
    body = []
    for s in summarize(rows):
        pof = "-" if s.pct_of_full is None else f"{s.pct_of_full:.0f}%"
        kv = "-" if s.kv_ratio is None else f"{100 * s.kv_ratio:.0f}%"
        body.append([s.label, *(_pct(s.scores[k]) for k in kinds), _pct(s.overall), _delta(s.logprob_delta), pof, kv])
    return header, body


def markdown_table(rows: Sequence[EvalRow]) -> str:
    header, body = table_cells(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[EvalRow]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        r = row.as_dict()
        w.writerow(
            {
                **r,
                "answers": " | ".join(r["answers"]),
                **{k: ("" if r[k] is None else r[k]) for k in ("depth", "logprob", "logprob_delta", "seed")},
            }
        )
    return buf.getvalue()


def result_dict(result: EvalResult) -> dict:
    """The JSON document of a run: its settings, the summary and every row."""
    return {
        "config": result.config,
        "summary": [s.as_dict() for s in summarize(result.rows)],
        "rows": [r.as_dict() for r in result.rows],
    }


def json_text(result: EvalResult) -> str:
    return json.dumps(result_dict(result), indent=2)


# ------------------------------------------------------------------ files
def prepare_dir(path: str | Path, what: str = "output directory") -> Path:
    """Create an output directory (before the long run starts, so errors come first)."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise KvcliError(f"{what} {p}: exists and is not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise KvcliError(f"{what} {p}: cannot create directory ({e.strerror or e})") from None
    if not os.access(p, os.W_OK):
        raise KvcliError(f"{what} {p}: directory is not writable")
    return p


def write_results(
    result: EvalResult, out_dir: str | Path, stem: str = "results", command: str | None = None
) -> dict[str, Path]:
    """``{stem}.csv`` (rows), ``{stem}.json`` (config, summary, rows) and ``{stem}.md``
    (the table, with the command that produced it)."""
    out = prepare_dir(out_dir)
    paths = {"csv": out / f"{stem}.csv", "json": out / f"{stem}.json", "md": out / f"{stem}.md"}
    md = markdown_table(result.rows)
    cfg = result.config
    notes = [
        f"Model: {cfg.get('model', '?')}; chunk size {cfg.get('chunk_size', '?')}"
        + ("; query-aware" if cfg.get("query_aware") else "")
        + "."
    ]
    if cfg.get("lengths"):
        notes.append(
            f"Tasks: {', '.join(cfg.get('kinds', []))} at {', '.join(map(str, cfg['lengths']))} tokens, "
            f"{cfg.get('samples')} sample(s) each, seed {cfg.get('seed')}."
        )
    notes.append(
        "Scores in %; overall = mean over task kinds; logprob Δ = mean per-token log-likelihood of the "
        "reference answer minus the full cache's; KV kept = cache bytes / full-cache bytes."
    )
    if command:
        notes.append(f"Command: `{command}`")
    atomic_write_text(paths["csv"], csv_text(result.rows))
    atomic_write_text(paths["json"], json_text(result) + "\n")
    atomic_write_text(paths["md"], md + "\n" + "\n\n".join(notes) + "\n")
    return paths


# ------------------------------------------------------------------ plots
def _ratio_budgets(budgets: Sequence[str]) -> bool:
    return all(float(b) <= 1 for b in budgets)


def write_plots(rows: Sequence[EvalRow], plot_dir: str | Path) -> list[Path]:
    """``needle_<method@budget>.png``: depth x length heatmap of niah_single scores, one per
    run; ``score_vs_budget.png``: overall score against budget, one line per method."""
    import matplotlib  # optional weight: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = prepare_dir(plot_dir, "plot directory")
    written: list[Path] = []
    needle = [r for r in rows if r.kind == "niah_single" and r.depth is not None]
    if needle:
        depths = sorted({round(r.depth, 3) for r in needle if r.depth is not None})
        lengths = sorted({r.length for r in needle})
        for method, budget in run_labels(needle):
            grid: list[list[float | None]] = [[None] * len(lengths) for _ in depths]
            cells: dict[tuple[int, int], list[float]] = defaultdict(list)
            for r in needle:
                if (r.method, r.budget) == (method, budget) and r.depth is not None:
                    cells[(depths.index(round(r.depth, 3)), lengths.index(r.length))].append(r.score)
            for (i, j), v in cells.items():
                grid[i][j] = sum(v) / len(v)
            label = FULL if method == FULL else f"{method}@{budget}"
            fig, ax = plt.subplots(figsize=(max(4.0, 1.6 + 1.1 * len(lengths)), max(3.0, 1.4 + 0.5 * len(depths))))
            data = [[float("nan") if v is None else v for v in row] for row in grid]
            im = ax.imshow(data, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("needle depth")
            ax.set_title(f"niah_single: {label}")
            for i, line in enumerate(grid):
                for j, cell in enumerate(line):
                    if cell is not None:
                        ax.text(j, i, f"{100 * cell:.0f}", ha="center", va="center", fontsize=8)
            fig.colorbar(im, ax=ax, fraction=0.05)
            fig.tight_layout()
            path = out / f"needle_{label.replace('@', '_at_').replace('/', '_')}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)

    summary = summarize(rows)
    comp = [s for s in summary if s.method != FULL]
    if comp:
        budgets = list(dict.fromkeys(s.budget for s in comp))
        numeric = _ratio_budgets(budgets)
        order = sorted(budgets, key=_budget_key) if numeric else budgets
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for method in dict.fromkeys(s.method for s in comp):
            pts = sorted(
                (float(s.budget) if numeric else order.index(s.budget), s.overall)
                for s in comp
                if s.method == method and s.overall is not None
            )
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=method)
        full = next((s for s in summary if s.method == FULL), None)
        if full and full.overall is not None:
            ax.axhline(100 * full.overall, color="black", linestyle="--", label="full cache")
        if not numeric:
            ax.set_xticks(range(len(order)), order)
        ax.set_xlabel("budget (fraction of tokens kept)" if numeric else "budget")
        ax.set_ylabel("overall score (%)")
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title("Score against budget")
        fig.tight_layout()
        path = out / "score_vs_budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
