"""The figures of evaluation, logged to MLflow and drawn in reports: people would rather look at a curve than
read a table. matplotlib is imported on first use (`pyplot`)."""

from __future__ import annotations


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (it costs each process most
    of a second of start-up, and most runs draw nothing until they end)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_curves(ax, history: dict[str, list[tuple[int, float]]], names: list[str], *,
                styles: dict[str, dict] | None = None, legend_size: float | None = None) -> None:
    """On `ax`: one line per series in `names` (those present), x = optimizer step, drawn with its `styles`
    entry (matplotlib's keywords: linestyle, colour, label); a `<x>/mean` whose `<x>/ci_low` and `<x>/ci_high`
    are in `history` too gets its interval as a band."""
    for name in names:
        points = history.get(name)
        if points:
            steps, values = zip(*points)
            style = {"label": name, **(styles or {}).get(name, {})}
            line, = ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, **style)
            low, high = (history.get(name.removesuffix("/mean") + f"/ci_{side}") for side in ("low", "high"))
            if name.endswith("/mean") and low and high and len(low) == len(high) == len(points):
                ax.fill_between([s for s, _ in low], [v for _, v in low], [v for _, v in high],
                                color=line.get_color(), alpha=0.2, label=f"{name}: 95% interval")
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def curves_figure(history: dict[str, list[tuple[int, float]]], names: list[str], title: str):
    """One set of axes with `draw_curves` of `names`: a run's curves as it logs them."""
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    draw_curves(ax, history, names)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def close(fig) -> None:
    pyplot().close(fig)


def reliability_figure(table: list[dict], title: str):
    """Reliability diagram: accuracy against confidence per bin; the diagonal is perfect calibration."""
    fig, ax = pyplot().subplots(figsize=(5, 5), dpi=110)
    ax.plot([0.5, 1.0], [0.5, 1.0], linestyle="--", color="grey", label="perfectly calibrated")
    if table:
        centres = [(b["lo"] + b["hi"]) / 2 for b in table]
        ax.bar(centres, [b["accuracy"] for b in table], width=[b["hi"] - b["lo"] for b in table],
               alpha=0.6, edgecolor="black", label="accuracy")
        ax.plot([b["confidence"] for b in table], [b["accuracy"] for b in table], marker="o", color="C3",
                label="accuracy at the bin's mean confidence")
        for c, b in zip(centres, table):
            ax.annotate(str(b["count"]), (c, b["accuracy"]), ha="center", va="bottom", fontsize=7)
    ax.set_xlim(0.5, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("confidence: max(p, 1 - p), p = sigmoid(r_chosen - r_rejected)")
    ax.set_ylabel("accuracy (labelled chosen wins)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
