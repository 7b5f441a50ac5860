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


def saved(plt, fig, path: str | Path, machine: str = "", *, layout: bool = True,
          **options) -> Path:
    """Write `fig` to `path` as PNG (the machine it measured on in a grey footnote) and close
    it; `options` go to `savefig`."""
    if machine:
        fig.text(0.01, 0.005, machine, fontsize=6, color="gray")
    if layout:
        fig.tight_layout()
    path = Path(path)
    fig.savefig(path, **options)
    plt.close(fig)
    return path


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
    return saved(plt, fig, path, machine)


def plot_error_growth(bisection, path: str | Path, machine: str = "") -> Path:
    """A bisection's |Δ| through the layers: one panel per graph, max and 99th percentile of
    each probed state in computation order (log scale), the states past the tolerance marked."""
    from ferry.graph_spec import is_probe

    graphs = list(dict.fromkeys(d.graph for d in bisection.diffs))
    plt = pyplot()
    fig, axes = plt.subplots(len(graphs), 1, figsize=(8, 2.6 * len(graphs)), dpi=110,
                             squeeze=False)
    for ax, graph in zip(axes[:, 0], graphs):
        states = [d for d in bisection.diffs if d.graph == graph and is_probe(d.name)]
        positions = range(len(states))
        ax.plot(positions, [max(d.max_abs, 1e-12) for d in states], marker="o", label="max |Δ|")
        ax.plot(positions, [max(d.q99_abs, 1e-12) for d in states], marker=".",
                label="99th percentile |Δ|")
        over = [i for i, d in enumerate(states) if d.exceeds]
        if over:
            ax.scatter(over, [max(states[i].max_abs, 1e-12) for i in over], s=120,
                       facecolors="none", edgecolors="red", label="past the tolerance")
        ax.set_yscale("log")
        ax.set_xticks(list(positions))
        ax.set_xticklabels([d.label.split(".", 1)[-1] for d in states], rotation=60,
                           ha="right", fontsize=6)
        ax.set_title(f"{graph}: {bisection.candidate} vs {bisection.reference}", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    return saved(plt, fig, path, machine)


def plot_attention(maps: dict, axes: tuple[list[str], list[str]], title: str,
                   path: str | Path) -> Path:
    """Heatmaps of attention probabilities, one panel per layer: `maps` name → (queries, keys),
    `axes` the (query, key) token labels."""
    plt = pyplot()
    queries, keys = axes
    columns = min(len(maps), 3)
    rows = -(-len(maps) // columns)
    side = max(2.5, 0.22 * max(len(queries), len(keys)))
    fig, panels = plt.subplots(rows, columns, figsize=(side * columns + 1, side * rows + 0.6),
                               dpi=110, squeeze=False)
    for panel, (name, probabilities) in zip(panels.flat, maps.items()):
        image = panel.imshow(probabilities, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        panel.set_title(name.split(".")[1], fontsize=8)
        panel.set_xticks(range(len(keys)))
        panel.set_xticklabels(keys, rotation=90, fontsize=6)
        panel.set_yticks(range(len(queries)))
        panel.set_yticklabels(queries, fontsize=6)
        panel.set_xlabel("attended to", fontsize=7)
    for panel in panels[:, 0]:
        panel.set_ylabel("attending", fontsize=7)
    for panel in list(panels.flat)[len(maps):]:
        panel.axis("off")
    fig.colorbar(image, ax=panels.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=9)
    return saved(plt, fig, path, layout=False, bbox_inches="tight")
