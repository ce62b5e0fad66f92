"""Plots of a profile or an estimate: KV bytes and memory against tokens processed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

from .estimate import Estimate
from .profile import ProfileRow


def plot_rows(rows: Sequence[ProfileRow | Estimate], path: str, title: str = "") -> None:
    """KV bytes and process memory against tokens processed, one line per method.

    Written to a temporary file next to ``path`` and renamed, so a failure leaves nothing
    half-written."""
    import matplotlib  # optional weight: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 1024 * 1024
    has_mem = any(t.get("rss_bytes") for r in rows for t in r.trace)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(12 if has_mem else 7, 4.8), squeeze=False)
    ax_kv = axes[0][0]
    for r in rows:
        trace = [t for t in r.trace if t.get("tokens") is not None]
        if not trace:
            continue
        label = r.method if r.method == "full" else f"{r.method} @ {r.budget}"
        xs = [t["tokens"] for t in trace]
        nan = float("nan")
        ax_kv.plot(xs, [t.get("kv_bytes", nan) / mib for t in trace], marker=".", label=label)
        if has_mem:
            axes[0][1].plot(xs, [t.get("rss_bytes", nan) / mib for t in trace], marker=".", label=label)
    ax_kv.set_title(
        "KV cache held after each chunk" + (" (estimate)" if rows and isinstance(rows[0], Estimate) else "")
    )
    ax_kv.set_xlabel("tokens processed")
    ax_kv.set_ylabel("KV cache (MiB)")
    ax_kv.set_ylim(bottom=0)
    if has_mem:
        ax = axes[0][1]
        ax.set_title("process memory (RSS) after each chunk")
        ax.set_xlabel("tokens processed")
        ax.set_ylabel("RSS (MiB)")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
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
