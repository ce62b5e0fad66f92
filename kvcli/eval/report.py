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
    seen = list(dict.fromkeys((r.run, r.budget) for r in rows))
    full = [s for s in seen if s[0] == FULL]
    return full + [s for s in seen if s[0] != FULL]


def kinds_of(rows: Sequence[EvalRow]) -> list[str]:
    return list(dict.fromkeys(r.kind for r in rows))


def summarize(rows: Sequence[EvalRow]) -> list[RunSummary]:
    """One summary per method@budget, the full cache first."""
    kinds = kinds_of(rows)
    by_run: dict[tuple[str, str], list[EvalRow]] = defaultdict(list)
    for r in rows:
        by_run[(r.run, r.budget)].append(r)
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
#: One look per run, so that runs whose values coincide stay distinguishable.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p")
LINESTYLES = ("-", "--", "-.", ":")


def _length_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _is_all(budget: str) -> bool:
    return float(budget) == 1.0


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)
    return path


def _heatmap_grid(rows: Sequence[EvalRow], path: Path) -> Path | None:
    """niah_single scores as ONE figure: a panel per run (rows: methods, columns: budgets),
    needle depth x context length cells, one 0-100 colour scale."""
    import matplotlib.pyplot as plt

    needle = [r for r in rows if r.kind == "niah_single" and r.depth is not None]
    if not needle:
        return None
    depths = sorted({round(r.depth, 3) for r in needle if r.depth is not None})
    lengths = sorted({r.length for r in needle})
    labels = run_labels(needle)
    runs = list(dict.fromkeys(run for run, _ in labels))
    budgets = sorted({b for _, b in labels if not _is_all(b)}, key=_budget_key) or ["1"]
    # runs that keep every token (full, plain PoD) share the first row(s); then one row per
    # method, a column per budget; with one budget, the panels simply fill rows of up to four
    whole = [(run, b) for run, b in labels if all(_is_all(x) for r2, x in labels if r2 == run)]
    width = len(budgets) if len(budgets) > 1 else min(4, len(labels))
    flat = whole if len(budgets) > 1 else labels
    grid_rows: list[list[tuple[str, str] | None]] = [
        [*flat[k : k + width], *[None] * (width - len(flat[k : k + width]))] for k in range(0, len(flat), width)
    ]
    if len(budgets) > 1:
        for run in runs:
            if not any(run == w for w, _ in whole):
                mine = {b for r2, b in labels if r2 == run}
                grid_rows.append([(run, b) if b in mine else None for b in budgets])
    cells: dict[tuple[str, str], dict[tuple[int, int], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in needle:
        if r.depth is not None:
            cells[(r.run, r.budget)][(depths.index(round(r.depth, 3)), lengths.index(r.length))].append(r.score)
    panel_w, panel_h = 0.9 + 0.62 * len(lengths), 0.75 + 0.34 * len(depths)
    fig, axes = plt.subplots(
        len(grid_rows),
        width,
        figsize=(max(5.5, 1.6 + panel_w * width), 1.1 + panel_h * len(grid_rows)),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for i, line in enumerate(grid_rows):
        for j, ax in enumerate(axes[i]):
            if line[j] is None:
                ax.axis("off")
                continue
            run, budget = line[j]  # type: ignore[misc]  # (not None: checked above)
            grid = [[float("nan")] * len(lengths) for _ in depths]
            for (a, b), scores in cells[(run, budget)].items():
                grid[a][b] = 100.0 * sum(scores) / len(scores)
            image = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            for a, values in enumerate(grid):
                for b, v in enumerate(values):
                    text, colour = ("n/a", "grey") if v != v else (f"{v:.0f}", "white" if v < 20 or v > 80 else "black")
                    ax.text(b, a, text, ha="center", va="center", fontsize=9, color=colour)
            ax.set_xticks(range(len(lengths)), [_length_label(n) for n in lengths], fontsize=8)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=8)
            ax.set_title(run if _is_all(budget) else f"{run} @ {budget}", fontsize=10)
            if j == 0:
                ax.set_ylabel("needle depth", fontsize=9)
            if i == len(grid_rows) - 1 or (i + 1 < len(grid_rows) and grid_rows[i + 1][j] is None):
                ax.set_xlabel("context length (tokens)", fontsize=9)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=min(1.0, 3.0 / len(grid_rows)), label="score (%)")
    fig.suptitle("niah_single: needles retrieved (%)\nby needle depth and context length")
    return _save(fig, path)


def _by_budget(
    summary: Sequence[RunSummary],
    value,
    path: Path,
    ylabel: str,
    title: str,
    full: float | None,
    full_label: str,
    bounds: tuple[float, float] | None = None,
) -> Path | None:
    """One line per run over the budgets (categories, largest first), each run nudged
    sideways a little and drawn with its own marker, so equal values do not hide each other;
    the full cache as a dashed line inside the axes (never on its edge)."""
    import matplotlib.pyplot as plt

    comp = [s for s in summary if s.method != FULL and value(s) is not None]
    if not comp:
        return None
    order = sorted(dict.fromkeys(s.budget for s in comp), key=_budget_key)
    runs = list(dict.fromkeys(s.method for s in comp))
    fig, ax = plt.subplots(figsize=(7.5 + 0.3 * max(0, len(order) - 3), 4.2), layout="constrained")
    width = 0.5 / max(1, len(runs))
    ys: list[float] = []
    for k, run in enumerate(runs):
        pts = sorted((order.index(s.budget), value(s)) for s in comp if s.method == run)
        xs = [x + (k - (len(runs) - 1) / 2) * width for x, _ in pts]
        ax.plot(
            xs,
            [y for _, y in pts],
            marker=MARKERS[k % len(MARKERS)],
            linestyle=LINESTYLES[k % len(LINESTYLES)],
            markersize=6,
            label=run,
            clip_on=False,
            zorder=3,
        )
        ys += [y for _, y in pts]
    if full is not None:
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label=full_label, zorder=2)
        ys.append(full)
    lo, hi = bounds if bounds else (min(ys), max(ys))
    pad = 0.08 * (hi - lo or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(order)), [f"{b} (every token)" if _is_all(b) else b for b in order])
    ax.set_xlim(-0.5, len(order) - 0.5)
    ax.set_xlabel("budget (fraction of the tokens seen kept, or entries)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.legend(loc="outside right upper", fontsize="small")
    return _save(fig, path)


def write_plots(rows: Sequence[EvalRow], plot_dir: str | Path) -> list[Path]:
    """``needle_heatmaps.png``: every run's niah_single scores, depth x length, in one grid;
    ``score_vs_budget.png``: overall score against budget; ``logprob_delta.png``: the answer
    log-likelihood against the full cache's, against budget (one line per run in both)."""
    import matplotlib  # optional weight: only plots need it

    matplotlib.use("Agg")

    out = prepare_dir(plot_dir, "plot directory")
    summary = summarize(rows)
    full = next((s for s in summary if s.method == FULL), None)
    written = [
        _heatmap_grid(rows, out / "needle_heatmaps.png"),
        _by_budget(
            summary,
            lambda s: None if s.overall is None else 100 * s.overall,
            out / "score_vs_budget.png",
            "overall score (%)",
            "Score against budget",
            None if full is None or full.overall is None else 100 * full.overall,
            "full cache",
            bounds=(0.0, 100.0),
        ),
        _by_budget(
            summary,
            lambda s: s.logprob_delta,
            out / "logprob_delta.png",
            "logprob Δ: answer log-likelihood per token\nminus the full cache's (below 0 = less likely)",
            "Answer likelihood against the full cache",
            0.0 if full is not None else None,
            "full cache (0)",
        ),
    ]
    return [p for p in written if p is not None]
