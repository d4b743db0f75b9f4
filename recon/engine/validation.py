"""Validation with the official metric, per (anatomy, acceleration) and overall, plus panels."""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from recon.engine.transform import TrainItem
from recon.events import Panel
from recon.fft import center_crop, ifft2c, rss
from recon.metric import slice_ssim

Forward = Callable[[list[TrainItem]], torch.Tensor]


def zero_filled(item: TrainItem) -> torch.Tensor:
    """RSS of the zero-filled centre slice, cropped to the target's shape."""
    centre = item.masked_kspace[item.masked_kspace.shape[0] // 2]
    image = rss(ifft2c(centre), dim=-3)
    return center_crop(image, *item.target.shape[-2:])


def panel_indices(n: int, count: int) -> list[int]:
    """``count`` fixed, evenly spread validation indices (the same every epoch)."""
    if n == 0 or count <= 0:
        return []
    return sorted({int(i) for i in np.linspace(0, n - 1, min(count, n)).round()})


GroupStats = dict[str, tuple[float, int]]


def metrics_from_stats(stats: GroupStats, prefix: str = "val") -> dict[str, float]:
    """Metrics from per-group ``(sum of slice scores, slice count)``.

    Keys of ``stats`` are expert names (``brain_acc4``...); the result has ``val/ssim`` (slice
    weighted over everything), ``val/ssim/<group>``, ``val/ssim/acc4``/``val/ssim/acc8`` (slice
    weighted per acceleration), ``val/leaderboard`` (the mean of those two, as the challenge
    scores) and ``val/slices``; ``prefix`` replaces ``val`` (``val_remasked``).
    """
    total = sum(s for s, _ in stats.values())
    count = sum(n for _, n in stats.values())
    metrics: dict[str, float] = {"val/slices": float(count)}
    if count:
        metrics["val/ssim"] = total / count
    by_acc: dict[int, list[float]] = defaultdict(lambda: [0.0, 0])
    for name, (s, n) in sorted(stats.items()):
        if n:
            metrics[f"val/ssim/{name}"] = s / n
            acc = int(name.rsplit("acc", 1)[1])
            by_acc[acc][0] += s
            by_acc[acc][1] += n
    for acc, (s, n) in sorted(by_acc.items()):
        if n:
            metrics[f"val/ssim/acc{acc}"] = s / n
    if "val/ssim/acc4" in metrics and "val/ssim/acc8" in metrics:
        metrics["val/leaderboard"] = 0.5 * (metrics["val/ssim/acc4"] + metrics["val/ssim/acc8"])
    if prefix != "val":
        metrics = {prefix + key[3:]: value for key, value in metrics.items()}
    return metrics


def remasked_metrics(stats: GroupStats, prefix: str = "val_remasked") -> dict[str, float]:
    """Metrics of the re-masked pass from ``<kind>:<expert>`` statistics.

    The breakdown of :func:`metrics_from_stats` over every kind together (``val_remasked/ssim``,
    ``.../ssim/acc4``, ``.../ssim/brain_acc4``, ``.../leaderboard``, ``.../slices``) plus the split of
    kinds: ``val_remasked/slices/<kind>`` and ``val_remasked/ssim/<kind>``.
    """
    by_group: dict[str, list] = defaultdict(lambda: [0.0, 0])
    by_kind: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for key, (s, n) in stats.items():
        kind, group = key.split(":", 1)
        for bucket in (by_group[group], by_kind[kind]):
            bucket[0] += s
            bucket[1] += n
    metrics = metrics_from_stats({k: (v[0], v[1]) for k, v in by_group.items()}, prefix)
    for kind, (s, n) in sorted(by_kind.items()):
        metrics[f"{prefix}/slices/{kind}"] = float(n)
        if n:
            metrics[f"{prefix}/ssim/{kind}"] = s / n
    return metrics


@torch.no_grad()
def validate(
    items: Iterable[list[TrainItem]],
    forward: Forward,
    panel_at: Sequence[int] = (),
    key: Callable[[TrainItem], str] | None = None,
) -> tuple[GroupStats, list[Panel]]:
    """Score every validation slice with the leaderboard SSIM.

    Args:
        items: batches of validation items (file masks, stored labels).
        forward: maps a batch of items to cropped outputs ``(B, h, w)``.
        panel_at: dataset indices whose slices go into the reconstruction panel.
        key: the statistics group of an item (default: its expert, ``brain_acc4``...).

    Returns:
        Per-group ``(score sum, slice count)`` (see :func:`metrics_from_stats`; sums, so that
        data-parallel ranks can add theirs exactly once) and the panels.
    """
    stats: dict[str, list] = defaultdict(lambda: [0.0, 0])
    panels: list[Panel] = []
    wanted = set(panel_at)
    for batch in items:
        outputs = forward(batch).float().cpu()
        for item, output in zip(batch, outputs):
            score = slice_ssim(output.numpy(), item.target.numpy(), item.max_value, item.anatomy)
            group = key(item) if key is not None else item.expert
            stats[group][0] += score
            stats[group][1] += 1
            if item.index in wanted:
                panels.append(Panel(
                    name=f"{item.fname}:{item.slice_idx}",
                    target=item.target.numpy(),
                    zero_filled=zero_filled(item).numpy(),
                    output=output.numpy(),
                    max_value=float(item.max_value),
                    ssim=float(score),
                ))
    return {k: (float(v[0]), int(v[1])) for k, v in stats.items()}, panels
