"""Learning-rate and probability schedules as explicit, pure functions of the (absolute, 0-based) epoch.

The engine sets the optimizer's learning rate from :func:`lr_at` at the start of every epoch
(:func:`set_lr`) and logs ``lr``, ``p_mask`` and ``p_aug`` each epoch. There are no torch scheduler
objects, so nothing has to be serialised and a resumed run gets exactly the same values.

The presets reproduce the team's runs (docs/pipeline.md 4.3, 4.4, 4.6):

- :data:`BASELINE_LR` -- StepLR(step 11, gamma 0.3) stepped only from epoch 5 (``step_start``), i.e.
  x0.3 at epochs 16, 27, 38, ...: 2e-4 (0-15), 6e-5 (16-26), 1.8e-5 (27-37), 5.4e-6 (38-48).
- :data:`MOE_LR` -- SequentialLR(LinearLR 0.1->1 over 3, ConstantLR, StepLR(5, 0.3)) started at
  epoch 30: 2e-5, 8e-5, 1.4e-4 (30-32), 2e-4 (33-49), 6e-5 (50-54), 1.8e-5 (55-59), ...: the
  StepLR phase begins at epoch 45 (as trained), so its first x0.3 falls at 50.
  :data:`MOE_LR_README` begins the StepLR phase at 39 as the README intended (first x0.3 at 44).
- :data:`CLUTCH_LR` -- the clutch stage's intended constant 2e-5. The team's torch built it as
  SequentialLR with a zero-length warm-up, which in the team's torch release left LinearLR's 0.1
  start factor in force, so it trained at 2e-6 (torch 2.14 gives 2e-5 for the same construction);
  a constant schedule is just that, whatever the torch version.
- :data:`CLASSIFIER_LR` -- CosineAnnealingLR(T_max=10, eta_min=0.01 lr) stepped per epoch, which
  is periodic with period 20 (it climbs back after reaching eta_min).
- :data:`P_MASK` -- the Helper's mask-augmentation probability: exp, start 15, plateau 25, p_max 1.
- :data:`P_AUG` -- MRAugment strength: exp, start 33, plateau 50, p_max 0.5 (absolute epochs).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

from recon.sections import Section

__all__ = [
    "LRScheduleConfig",
    "RampScheduleConfig",
    "lr_at",
    "prob_at",
    "set_lr",
    "BASELINE_LR",
    "MOE_LR",
    "MOE_LR_README",
    "CLUTCH_LR",
    "CLASSIFIER_LR",
    "P_MASK",
    "P_AUG",
    "P_OFF",
]


def _check_epoch(epoch: int) -> None:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")


@dataclass(frozen=True)
class LRScheduleConfig(Section):
    """Learning rate per epoch. Defaults are the team's baseline (``kind="step"``).

    With ``k = epoch - start_epoch`` (epochs before ``start_epoch`` are an error) and
    ``n(e) = max(0, (e - step_start) // step_every)`` (a StepLR that starts stepping at epoch
    ``step_start``, so the first reduction is at ``step_start + step_every``):

    - ``step``:     ``lr = base_lr * gamma ** n(epoch)``.
    - ``moe``:      warm-up ``lr = base_lr * (f0 + (1 - f0) * k / W)`` for ``k < W`` (``f0`` =
      ``warmup_start_factor``, ``W`` = ``warmup_epochs``; LinearLR's factors 0.1, 0.4, 0.7 for
      W=3), then as ``step``. ``W = 0`` means no warm-up.
    - ``constant``: ``lr = base_lr``.
    - ``cosine``:   ``lr = eta + (base_lr - eta) * (1 + cos(pi * k / t_max)) / 2`` with
      ``eta = eta_min_factor * base_lr``; for ``k > t_max`` this keeps going (period ``2 t_max``),
      exactly as torch's CosineAnnealingLR stepped once per epoch.

    Attributes:
        kind: schedule shape, see above.
        base_lr: the peak learning rate.
        start_epoch: first epoch of the stage (warm-up and cosine count from here).
        step_start: absolute epoch at which the StepLR phase begins (the team's
            ``scheduler_start_epoch``: 5 for the baseline, 30 + 15 = 45 for the MoE).
        step_every: StepLR ``step_size``, epochs between reductions.
        gamma: multiplicative factor per reduction.
        warmup_epochs: length of the linear warm-up (``moe`` only).
        warmup_start_factor: warm-up factor at ``start_epoch``.
        t_max: half period of the cosine, in epochs.
        eta_min_factor: cosine floor as a fraction of ``base_lr``.
    """

    kind: Literal["step", "moe", "constant", "cosine"] = "step"
    base_lr: float = 2e-4
    start_epoch: int = 0
    step_start: int = 5
    step_every: int = 11
    gamma: float = 0.3
    warmup_epochs: int = 0
    warmup_start_factor: float = 0.1
    t_max: int = 10
    eta_min_factor: float = 0.01

    def validate(self) -> None:
        """Check the values (run on construction, see :class:`recon.sections.Section`).

        Raises:
            recon.sections.FieldError: a value out of range or inconsistent with the kind.
        """
        need = self.require
        need(math.isfinite(self.base_lr) and self.base_lr > 0, "base_lr", "must be > 0")
        need(self.start_epoch >= 0, "start_epoch", "must be >= 0")
        if self.kind in ("step", "moe"):
            need(0 < self.gamma <= 1, "gamma", "must be in (0, 1]")
            need(self.step_every >= 1, "step_every", "must be >= 1")
            need(self.step_start >= self.start_epoch + self.warmup_epochs, "step_start",
                 f"must not be before the end of the warm-up (start_epoch {self.start_epoch} + "
                 f"warmup_epochs {self.warmup_epochs})")
        need(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        need(not self.warmup_epochs or self.kind == "moe", "warmup_epochs",
             f"must be 0 unless kind is 'moe' (kind is '{self.kind}')")
        need(0 < self.warmup_start_factor <= 1, "warmup_start_factor", "must be in (0, 1]")
        if self.kind == "cosine":
            need(self.t_max >= 1, "t_max", "must be >= 1")
            need(0 <= self.eta_min_factor <= 1, "eta_min_factor", "must be in [0, 1]")


@dataclass(frozen=True)
class RampScheduleConfig(Section):
    """A probability per epoch (mask augmentation ``p_mask``, MRAugment strength ``p_aug``).

    With ``D = start``, ``T = plateau`` and ``c = decay / (T - D)``:

    - ``exp``:      ``p = 0`` for ``t < D``; ``p_max (1 - e^{-c (t - D)}) / (1 - e^{-c (T - D)})``
      for ``D <= t < T``; ``p_max`` for ``t >= T``.
    - ``ramp``:     ``p = 0`` for ``t < D``; ``p_max (t - D) / (T - D)`` for ``D <= t < T``;
      ``p_max`` for ``t >= T``.
    - ``constant``: ``p = 0`` for ``t < D``, else ``p_max`` (``plateau`` unused).
    - ``off``:      ``p = 0``.

    Epochs are absolute. The team's MRAugment counted the same formula with ``T`` =
    ``num_epochs - annealing_epoch`` = 50 (ver2) and froze its epoch counter at ``T - 1``, so
    p(34..49) = .128 ... .499 exactly as here, and p stayed at p(49) = 0.4988 afterwards where this
    closed form gives ``p_max`` = 0.5 from epoch 50 on. ``T`` is a setting, not the run length.

    Attributes:
        kind: shape, see above.
        start: first epoch ``D`` of the ramp (p is 0 before it).
        plateau: epoch ``T`` from which ``p = p_max``.
        p_max: the final probability, in [0, 1].
        decay: the exp shape constant (``c (T - D)``); MRAugment's ``aug_exp_decay``.
    """

    kind: Literal["exp", "ramp", "constant", "off"] = "off"
    start: int = 0
    plateau: int = 1
    p_max: float = 1.0
    decay: float = 5.0

    def validate(self) -> None:
        """Check the values (run on construction, see :class:`recon.sections.Section`).

        Raises:
            recon.sections.FieldError: a value out of range.
        """
        need = self.require
        need(0.0 <= self.p_max <= 1.0, "p_max", "must be in [0, 1]")
        need(self.start >= 0, "start", "must be >= 0")
        if self.kind in ("exp", "ramp"):
            need(self.plateau > self.start, "plateau", f"must be greater than start ({self.start})")
        if self.kind == "exp":
            need(math.isfinite(self.decay) and self.decay > 0, "decay", "must be > 0")


def lr_at(cfg: LRScheduleConfig, epoch: int) -> float:
    """Learning rate for an epoch (see :class:`LRScheduleConfig` for the formulas).

    Args:
        cfg: the schedule.
        epoch: absolute 0-based epoch, ``>= cfg.start_epoch``.

    Returns:
        The learning rate to use for the whole epoch.

    Raises:
        ValueError: the epoch is negative or before ``cfg.start_epoch``.
    """
    _check_epoch(epoch)
    if epoch < cfg.start_epoch:
        raise ValueError(f"epoch {epoch} is before the schedule's start_epoch {cfg.start_epoch}")
    k = epoch - cfg.start_epoch
    if cfg.kind == "constant":
        return cfg.base_lr
    if cfg.kind == "cosine":
        eta = cfg.eta_min_factor * cfg.base_lr
        return eta + (cfg.base_lr - eta) * (1.0 + math.cos(math.pi * k / cfg.t_max)) / 2.0
    if cfg.kind == "moe" and k < cfg.warmup_epochs:
        f0 = cfg.warmup_start_factor
        return cfg.base_lr * (f0 + (1.0 - f0) * k / cfg.warmup_epochs)
    n = max(0, (epoch - cfg.step_start) // cfg.step_every)
    return cfg.base_lr * cfg.gamma**n


def prob_at(cfg: RampScheduleConfig, epoch: int) -> float:
    """Probability for an epoch (see :class:`RampScheduleConfig` for the formulas).

    Args:
        cfg: the schedule.
        epoch: absolute 0-based epoch.

    Returns:
        A probability in ``[0, cfg.p_max]``.

    Raises:
        ValueError: the epoch is negative.
    """
    _check_epoch(epoch)
    if cfg.kind == "off" or epoch < cfg.start:
        return 0.0
    if cfg.kind == "constant" or epoch >= cfg.plateau:
        return cfg.p_max
    span = cfg.plateau - cfg.start
    if cfg.kind == "ramp":
        return cfg.p_max * (epoch - cfg.start) / span
    c = cfg.decay / span
    return cfg.p_max * (1.0 - math.exp(-c * (epoch - cfg.start))) / (1.0 - math.exp(-c * span))


def set_lr(optimizer: Any, lr: float) -> None:
    """Set the learning rate of every parameter group of a torch optimizer.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (anything with ``param_groups``).
        lr: the new learning rate, finite and ``>= 0``.

    Raises:
        ValueError: ``lr`` is negative or not finite.
    """
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"learning rate must be finite and >= 0, got {lr}")
    for group in optimizer.param_groups:
        group["lr"] = lr


BASELINE_LR = LRScheduleConfig()
MOE_LR = LRScheduleConfig(
    kind="moe", base_lr=2e-4, start_epoch=30, warmup_epochs=3, warmup_start_factor=0.1,
    step_start=45, step_every=5, gamma=0.3,
)
MOE_LR_README = dataclasses.replace(MOE_LR, step_start=39)
CLUTCH_LR = LRScheduleConfig(kind="constant", base_lr=2e-5, start_epoch=30)
CLASSIFIER_LR = LRScheduleConfig(kind="cosine", base_lr=2e-4, t_max=10, eta_min_factor=0.01)

P_MASK = RampScheduleConfig(kind="exp", start=15, plateau=25, p_max=1.0, decay=5.0)
P_AUG = RampScheduleConfig(kind="exp", start=33, plateau=50, p_max=0.5, decay=5.0)
P_OFF = RampScheduleConfig()
