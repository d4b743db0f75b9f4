"""Training plots for the tracking UI: metric curves, schedules and reconstruction panels.

Figures are built with matplotlib's object API on the Agg canvas (no ``pyplot``, no global backend
switch, safe in a training process) and written atomically; each function returns the PNG path.
``history`` arguments map a metric name to its ``(step, value)`` points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from recon.io import atomic_path

History = Mapping[str, Sequence[tuple[int, float]]]

SCHEDULE_KEYS = ("lr", "schedule/p_remask", "schedule/p_aug")
#: validation scores on one 0..1 scale (counts such as ``val/slices`` stay out of the plot)
SCORE_WORDS = ("ssim", "accuracy", "leaderboard")


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _series(points: Sequence[tuple[int, float]]) -> tuple[list[int], list[float]]:
    pts = sorted((int(s), float(v)) for s, v in points if math.isfinite(float(v)))
    return [s for s, _ in pts], [v for _, v in pts]


def _draw(ax, history: History, keys: Sequence[str], dashed: Sequence[str] = ()) -> bool:
    drawn = False
    for key in keys:
        steps, values = _series(history.get(key, ()))
        if steps:
            ax.plot(steps, values, "--" if key in dashed else "-", marker="." if len(steps) < 30 else None, label=key)
            drawn = True
    if drawn:
        ax.legend(fontsize=7, loc="best")
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def plot_curves(history: History, path: str | Path, title: str = "") -> Path:
    """Loss curves (left) and validation scores (right: overall, per group or expert, best so far).

    Args:
        history: metric name -> ``(epoch, value)`` points; uses keys containing ``loss``, and keys
            starting with ``val/`` or ``best_`` that name a score (SSIM, accuracy, leaderboard).
        path: output PNG.
        title: figure title.

    Returns:
        ``path``.
    """
    losses = sorted(k for k in history if "loss" in k)
    scores = sorted(k for k in history if k.startswith(("val/", "best_")) and "loss" not in k
                    and any(word in k for word in SCORE_WORDS))
    fig = Figure(figsize=(11, 4))
    ax_loss, ax_val = fig.subplots(1, 2)
    if _draw(ax_loss, history, losses):
        values = [v for k in losses for v in _series(history[k])[1]]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    _draw(ax_val, history, scores, dashed=[k for k in scores if k.startswith("best_")])
    ax_val.set_title("validation")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_schedules(history: History, path: str | Path, keys: Sequence[str] = SCHEDULE_KEYS, title: str = "") -> Path:
    """One small plot per schedule (learning rate, mask and augmentation probabilities).

    Args:
        history: metric name -> ``(epoch, value)`` points.
        path: output PNG.
        keys: schedules to draw (missing ones are left out; an empty figure says so).
        title: figure title.

    Returns:
        ``path``.
    """
    present = [k for k in keys if _series(history.get(k, ()))[0]]
    fig = Figure(figsize=(4 * max(len(present), 1), 3.2))
    axes = np.atleast_1d(fig.subplots(1, max(len(present), 1)))
    if not present:
        axes[0].text(0.5, 0.5, "no schedule logged yet", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, key in zip(axes, present):
        _draw(ax, history, [key])
        ax.set_title(key)
        if key == "lr":
            values = _series(history[key])[1]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_panel(panels: Sequence, path: str | Path, title: str = "") -> Path:
    """Reconstruction panel: one row per slice, columns target, zero-filled, output, |output - target|.

    Args:
        panels: objects with ``name`` and 2-D float arrays ``target``, ``zero_filled``, ``output``
            of one shape (``recon.events.Panel``).
        path: output PNG.
        title: figure title (e.g. the epoch).

    Returns:
        ``path``.

    Raises:
        ValueError: no panels, or arrays that are not 2-D of one shape.
    """
    if not panels:
        raise ValueError("plot_panel: no panels given")
    fig = Figure(figsize=(12, 3.2 * len(panels)))
    axes = np.atleast_2d(fig.subplots(len(panels), 4))
    for row, panel in zip(axes, panels):
        images = [np.asarray(a, dtype=np.float64) for a in (panel.target, panel.zero_filled, panel.output)]
        if any(a.ndim != 2 or a.shape != images[0].shape for a in images):
            shapes = [a.shape for a in images]
            raise ValueError(f"plot_panel: panel {panel.name!r} needs three 2-D arrays of one shape, got {shapes}")
        error = np.abs(images[2] - images[0])
        vmax = float(np.nanpercentile(images[0], 99.5)) or float(np.nanmax(images[0])) or 1.0
        for ax, image, label in zip(row, [*images, error], ("target", "zero-filled", "output", "|error|")):
            if label == "|error|":
                shown = ax.imshow(image, cmap="magma", vmin=0.0, vmax=max(float(error.max()), 1e-12))
                fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
            else:
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=vmax)
            ax.set_title(f"{panel.name}: {label}" if label == "target" else label, fontsize=8)
            ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return _save(fig, path)
