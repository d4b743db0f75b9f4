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


@torch.no_grad()
def validate(
    items: Iterable[list[TrainItem]],
    forward: Forward,
    panel_at: Sequence[int] = (),
) -> tuple[dict[str, float], list[Panel]]:
    """Score every validation slice with the leaderboard SSIM.

    Args:
        items: batches of validation items (file masks, stored labels).
        forward: maps a batch of items to cropped outputs ``(B, h, w)``.
        panel_at: dataset indices whose slices go into the reconstruction panel.

    Returns:
        Metrics ``val/ssim`` (slice-weighted over all slices), ``val/ssim/<anatomy>_acc<acc>``,
        ``val/ssim_acc4``/``val/ssim_acc8`` and ``val/leaderboard`` (their mean, as the
        challenge), ``val/slices``; and the panels.
    """
    groups: dict[str, list[float]] = defaultdict(list)
    by_acc: dict[int, list[float]] = defaultdict(list)
    panels: list[Panel] = []
    wanted = set(panel_at)
    for batch in items:
        outputs = forward(batch).float().cpu()
        for item, output in zip(batch, outputs):
            score = slice_ssim(output.numpy(), item.target.numpy(), item.max_value, item.anatomy)
            groups[item.expert].append(score)
            by_acc[item.acc].append(score)
            if item.index in wanted:
                panels.append(Panel(
                    name=f"{item.fname}:{item.slice_idx}",
                    target=item.target.numpy(),
                    zero_filled=zero_filled(item).numpy(),
                    output=output.numpy(),
                ))
    everything = [s for scores in groups.values() for s in scores]
    metrics: dict[str, float] = {"val/slices": float(len(everything))}
    if everything:
        metrics["val/ssim"] = float(np.mean(everything))
    for name, scores in sorted(groups.items()):
        metrics[f"val/ssim/{name}"] = float(np.mean(scores))
    for acc, scores in sorted(by_acc.items()):
        metrics[f"val/ssim_acc{acc}"] = float(np.mean(scores))
    if 4 in by_acc and 8 in by_acc:
        metrics["val/leaderboard"] = 0.5 * (metrics["val/ssim_acc4"] + metrics["val/ssim_acc8"])
    return metrics, panels
