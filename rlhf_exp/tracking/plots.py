"""Figures logged to MLflow: people would rather look at a curve than read a table."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_figure(history: dict[str, list[tuple[int, float]]], names: list[str], title: str):
    """One line per metric in `names` (those present), x = optimizer step."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for name in names:
        points = history.get(name)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def close(fig) -> None:
    plt.close(fig)
