"""PNG charts of runtime results (matplotlib, imported only when a chart is asked for)."""

from __future__ import annotations

from pathlib import Path

from ferry.errors import FerryError

PERCENTILES = (50.0, 90.0, 99.0, 99.9, 100.0)  # of |Δ|, per graph output, in parity reports


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or a FerryError saying what to install."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise FerryError("--plot needs matplotlib: pip install matplotlib") from exc
    return plt


def plot_error_distributions(reports, path: str | Path, machine: str = "") -> Path:
    """One line per compared backend: |Δ| against the reference at each percentile, the worst
    graph output at that percentile (log scale), so fp32, int8 and 16-bit variants sit apart."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    positions = range(len(PERCENTILES))
    for report in reports:
        if not report.diffs:
            continue
        worst = [max(d.percentiles[i] for d in report.diffs) for i in positions]
        ax.plot(positions, [max(v, 1e-12) for v in worst], marker="o",
                label=f"{report.candidate} vs {report.reference}")
    ax.set_yscale("log")
    ax.set_xticks(list(positions))
    ax.set_xticklabels([f"p{p:g}" if p < 100 else "max" for p in PERCENTILES])
    ax.set_xlabel("percentile of |Δ| over every element (worst graph output)")
    ax.set_ylabel("|Δ| against the reference")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    if machine:
        fig.text(0.01, 0.01, machine, fontsize=6, color="gray")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
