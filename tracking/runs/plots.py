"""Training plots for the tracking UI: metric curves, schedules and reconstruction panels.

Figures are built with matplotlib's object API on the Agg canvas (no ``pyplot``, no global backend
switch, safe in a training process) and written atomically; each function returns the PNG path.
``history`` arguments map a metric name to its ``(step, value)`` points. Every axis names its quantity
and unit; titles are set on a constrained layout so they never overlap.
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
TITLE_SIZE = 11
EPOCH_LABEL = "epoch (completed passes over the training data)"


def schedule_label(key: str) -> str:
    """The y-axis label of a schedule: what it is and its unit."""
    if key == "lr" or key.endswith("/lr"):
        return "learning rate (per step, no unit)"
    if "mask" in key:
        return "probability of re-masking a slice (0-1)"
    if "aug" in key:
        return "probability of augmenting a slice (0-1)"
    return f"{key} (no unit)"


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
        ax.set_xlabel(EPOCH_LABEL, fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return drawn


def _figure(width: float, height: float, title: str) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=TITLE_SIZE + 1)
    return fig


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
    fig = _figure(11, 4.2, title)
    ax_loss, ax_val = fig.subplots(1, 2)
    if _draw(ax_loss, history, losses):
        values = [v for k in losses for v in _series(history[k])[1]]
        if values and min(values) > 0 and max(values) / min(values) > 20:
            ax_loss.set_yscale("log")
    ax_loss.set_title("training and validation loss", fontsize=TITLE_SIZE)
    ax_loss.set_ylabel("loss (per slice, no unit)", fontsize=9)
    _draw(ax_val, history, scores, dashed=[k for k in scores if k.startswith("best_")])
    ax_val.set_title("validation scores (dashed: best so far)", fontsize=TITLE_SIZE)
    ax_val.set_ylabel("SSIM / accuracy (0-1, higher is better)", fontsize=9)
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
    fig = _figure(4.5 * max(len(present), 1), 3.6, title)
    axes = np.atleast_1d(fig.subplots(1, max(len(present), 1)))
    if not present:
        axes[0].text(0.5, 0.5, "no schedule logged yet", ha="center", va="center")
        axes[0].set_axis_off()
    for ax, key in zip(axes, present):
        _draw(ax, history, [key])
        ax.set_title(key, fontsize=TITLE_SIZE)
        ax.set_ylabel(schedule_label(key), fontsize=8)
        if key == "lr":
            values = _series(history[key])[1]
            if min(values) > 0 and max(values) / min(values) > 20:
                ax.set_yscale("log")
    return _save(fig, path)


def panel_title(panel) -> str:
    """``<file>:<slice>, SSIM 0.9123`` (``SSIM n/a`` when the panel carries none)."""
    ssim = float(getattr(panel, "ssim", math.nan))
    return f"{panel.name}, SSIM {ssim:.4f}" if math.isfinite(ssim) else f"{panel.name}, SSIM n/a"


def plot_panel(panels: Sequence, path: str | Path, title: str = "") -> Path:
    """Reconstruction panel: one row per slice, columns target, zero-filled, output and the error map.

    Images share the target's grey scale (intensity in the data's units, shown 0 to its 99.5th percentile).
    The error map is ``|output - target|`` in percent of the volume's maximum (``panel.max_value``, the
    SSIM's data range); a panel without a finite maximum is shown relative to the target slice's maximum
    and says so. Each row's title gives the slice's SSIM (``SSIM n/a`` when unknown).

    Args:
        panels: objects with ``name``, 2-D float arrays ``target``, ``zero_filled``, ``output`` of one shape
            and optional ``max_value``, ``ssim`` floats (``recon.events.Panel``).
        path: output PNG.
        title: figure title (e.g. the stage and epoch).

    Returns:
        ``path``.

    Raises:
        ValueError: no panels, or arrays that are not 2-D of one shape.
    """
    if not panels:
        raise ValueError("plot_panel: no panels given")
    fig = _figure(13, 3.4 * len(panels) + (0.4 if title else 0), title)
    rows = np.atleast_2d(fig.subplots(len(panels), 4))
    for row, panel in zip(rows, panels):
        images = [np.asarray(a, dtype=np.float64) for a in (panel.target, panel.zero_filled, panel.output)]
        if any(a.ndim != 2 or a.shape != images[0].shape for a in images):
            shapes = [a.shape for a in images]
            raise ValueError(f"plot_panel: panel {panel.name!r} needs three 2-D arrays of one shape, got {shapes}")
        scale = float(getattr(panel, "max_value", math.nan))
        relative_to = "volume max"
        if not (math.isfinite(scale) and scale > 0):
            scale, relative_to = float(np.nanmax(images[0])) if images[0].size else 0.0, "slice max (volume max n/a)"
        scale = scale if math.isfinite(scale) and scale > 0 else 1.0
        error = 100.0 * np.abs(images[2] - images[0]) / scale
        vmax = float(np.nanpercentile(images[0], 99.5)) or float(np.nanmax(images[0])) or 1.0
        labels = ("target", "zero-filled", "output", f"|output - target|, % of {relative_to}")
        for ax, image, label in zip(row, [*images, error], labels):
            if image is error:
                shown = ax.imshow(image, cmap="magma", vmin=0.0, vmax=max(float(np.nanmax(error)), 1e-9))
                bar = fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
                bar.set_label("% of max", fontsize=8)
            else:
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=vmax)
            ax.set_title(label, fontsize=9)
            ax.set_axis_off()
        row[0].set_title(f"target\n{panel_title(panel)}", fontsize=9)
    return _save(fig, path)
