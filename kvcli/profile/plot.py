"""Plots of a profile or an estimate: KV bytes and memory against tokens processed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from .estimate import Estimate
from .profile import ProfileRow

#: One look per line, so that methods whose curves coincide stay distinguishable.
STYLES = [
    {"marker": m, "linestyle": ls}
    for ls, m in zip(
        ["-", "--", "-.", ":"] * 3, ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">", "p"], strict=True
    )
]


def plot_rows(rows: Sequence[ProfileRow | Estimate], path: str, title: str = "") -> None:
    """KV bytes and process memory against tokens processed, one line per method.

    Both axes start at zero (the RSS of a small model is mostly weights: a panel cut at
    the lowest value would make a few MiB look large); the legend sits outside the panels.
    Written to a temporary file next to ``path`` and renamed, so a failure leaves nothing
    half-written."""
    import matplotlib  # optional weight: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1024 * 1024
    nan = float("nan")
    has_mem = any(t.get("rss_bytes") for r in rows for t in r.trace)
    estimate = bool(rows) and isinstance(rows[0], Estimate)
    fig, axes = plt.subplots(
        1, 2 if has_mem else 1, figsize=(12.5 if has_mem else 8, 4.6), squeeze=False, layout="constrained"
    )
    ax_kv = axes[0][0]
    for k, r in enumerate(rows):
        trace = [t for t in r.trace if t.get("tokens") is not None]
        if not trace:
            continue
        label = r.method if r.budget in ("1", "1.0") else f"{r.method} @ {r.budget}"
        style = {**STYLES[k % len(STYLES)], "markersize": 4, "markevery": max(1, len(trace) // 12)}
        xs = [t["tokens"] for t in trace]
        ax_kv.plot(xs, [t.get("kv_bytes", nan) / mib for t in trace], label=label, **style)
        if has_mem:
            axes[0][1].plot(xs, [t.get("rss_bytes", nan) / mib for t in trace], label=label, **style)
    ax_kv.set_title("KV cache held after each chunk" + (" (estimate)" if estimate else ""))
    ax_kv.set_ylabel("KV cache (MiB)")
    if has_mem:
        ax = axes[0][1]
        base = [r.rss_baseline_bytes for r in rows if isinstance(r, ProfileRow) and r.rss_baseline_bytes]
        if base:  # what the model alone holds: the part of RSS no method changes
            ax.axhline(min(base) / mib, color="grey", linewidth=1, linestyle=(0, (1, 3)))
            ax.annotate(
                "after loading the model",
                (0, min(base) / mib),
                xytext=(4, -12),
                textcoords="offset points",
                fontsize="small",
                color="grey",
            )
        ax.set_title("process memory (RSS, weights included) after each chunk")
        ax.set_ylabel("RSS (MiB)")
    for ax in axes[0]:
        ax.set_xlabel("tokens processed")
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0, top=ax.get_ylim()[1] * 1.05)
        ax.grid(True, alpha=0.3)
    handles, labels = ax_kv.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize="small", title="method @ budget")
    if title:
        fig.suptitle(title)
    directory = os.path.dirname(os.path.abspath(path))
    suffix = os.path.splitext(path)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".kvcli-plot-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
