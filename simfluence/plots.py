"""Plots of trajectories, what-ifs and influences (matplotlib, PNG, no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# Line styles cycled over simulated curves, so curves that lie close stay distinguishable.
STYLES = ("-", "--", ":", "-.")


def merge_identical(curves: dict[str, np.ndarray], rtol: float = 1e-9, atol: float = 1e-12) -> dict[str, np.ndarray]:
    """Curves that are equal to ``rtol``/``atol`` drawn once, under their names joined by " = "
    (two methods whose predictions coincide would otherwise draw one line over the other)."""
    merged: dict[str, np.ndarray] = {}
    for name, values in curves.items():
        same = next((key for key, kept in merged.items()
                     if kept.shape == np.shape(values) and np.allclose(kept, values, rtol=rtol, atol=atol)), None)
        if same is None:
            merged[name] = np.asarray(values)
        else:
            merged[f"{same} = {name}"] = merged.pop(same)
    return merged


def trajectory(path: str | Path, curriculum: np.ndarray, simulated: dict[str, np.ndarray],
               true: np.ndarray | None = None, mark_example: int | None = None, title: str = "") -> Path:
    """One test example's loss over steps: ``simulated`` curves (name -> ``float[T+1]``), the true
    curve if given, and the steps whose batch contains ``mark_example`` shaded."""
    fig = Figure(figsize=(7, 3.8))
    ax = fig.subplots()
    if mark_example is not None:
        steps = np.flatnonzero((curriculum == mark_example).any(axis=1)) + 1
        for k, step in enumerate(steps):
            ax.axvspan(step - 0.5, step + 0.5, color="#f2c14e", alpha=0.45, lw=0,
                       label=f"batch has example {mark_example}" if k == 0 else None)
    if true is not None:
        ax.plot(np.arange(len(true)), true, color="black", lw=2, label="true")
    for k, (name, values) in enumerate(merge_identical(simulated).items()):
        ax.plot(np.arange(len(values)), values, lw=1.5, ls=STYLES[k % len(STYLES)], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def influence_bars(path: str | Path, table: pl.DataFrame, top: int = 15, title: str = "") -> Path:
    """The ``top`` training examples by |effect| (``example_id``, ``effect`` columns)."""
    rows = table.sort(pl.col("effect").abs(), descending=True).head(top).sort("effect")
    fig = Figure(figsize=(7, 0.32 * len(rows) + 1.2))
    ax = fig.subplots()
    colours = ["#3b7d3b" if v < 0 else "#b04040" for v in rows["effect"]]
    ax.barh([str(i) for i in rows["example_id"]], rows["effect"].to_numpy(), color=colours)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel("effect on final loss (nats; negative: the example lowers it)")
    ax.set_ylabel("training example")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)

