"""Out-of-memory and divergence handling for Optuna trials: a trial that cannot fit costs seconds, not an epoch.

:func:`guard_objective` wraps any objective ``f(trial) -> float``:

1. **Predicted OOM.** Before the objective runs, an optional ``predict(trial)`` gives the trial's peak memory
   (e.g. :class:`~tracking.tune.memory.MemoryPredictor` on the trial's sampled configuration). Above the
   budget the trial is pruned at once with user attributes ``prune_reason=oom-predicted``, ``predicted_bytes``
   and ``budget_bytes``.
2. **Real OOM.** A ``torch.OutOfMemoryError`` (or an allocator failure with the same meaning) raised by the
   objective prunes the trial (``prune_reason=oom``). The exception and its traceback, which hold the frames
   that reference the model and the optimizer, are dropped before ``gc.collect()`` and
   ``torch.cuda.empty_cache()``, so the next trial starts with the memory back (optuna #1224, #5931, #3050: an
   OOM otherwise fails the trial and the memory piles up across trials).
3. **Divergence.** The engine's :class:`~recon.engine.loop.DivergenceError` (NaN/inf loss, loss stuck at 1;
   PromptMR-plus #7) prunes with ``prune_reason=diverged`` and the engine's reason.
4. **Pruner.** ``optuna.TrialPruned`` from the objective gets ``prune_reason=pruner`` unless it set one.
5. **Anything else** is recorded (``error``, ``error_type``; the traceback goes to the log) and re-raised as
   :class:`TrialError` without the original traceback: the trial FAILs and, with
   ``study.optimize(..., catch=CATCH)``, the study goes on.

Memory is released after every trial that ran the objective, whatever the outcome, once the exception is
gone; ``gc_after_trial`` is then redundant (and a full collection costs ~0.2 s in a process that has torch
and MLflow loaded, which would dominate a trial pruned on its prediction).

The prediction itself (:class:`tracking.tune.memory.MemoryPredictor`) is a job of its own, in
:mod:`tracking.tune.memory`.
"""

from __future__ import annotations

import json
import logging
import math
import traceback
from typing import Callable

import optuna
import torch

from recon.engine.loop import DivergenceError
from tracking.tune.memory import MemoryPrediction, release_memory

log = logging.getLogger(__name__)

PRUNE_REASON = "prune_reason"
OOM_PREDICTED = "oom-predicted"
OOM = "oom"
DIVERGED = "diverged"
PRUNER = "pruner"
#: what ``study.optimize`` should catch so that a failing trial never stops the study
CATCH: tuple[type[Exception], ...] = (Exception,)
_MAX_TEXT = 500
#: attributes this guard writes; a retried trial inherits the attributes of the trial it repeats, so they are reset
OWN_ATTRS = (PRUNE_REASON, "error", "error_type", "predicted_bytes", "budget_bytes", "prediction_source",
             "prediction_details", "divergence", "divergence_epoch", "divergence_step", "divergence_loss")
# Allocator failures that are OOM without being torch.OutOfMemoryError (host RAM, cuBLAS workspaces).
_OOM_TEXT = ("out of memory", "can't allocate memory", "cublas_status_alloc_failed", "failed to allocate")


def is_oom(exc: BaseException) -> bool:
    """True for ``torch.OutOfMemoryError`` and allocator failures reported as ``RuntimeError``."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT)


def _text(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:_MAX_TEXT]


Predict = Callable[[optuna.trial.Trial], "MemoryPrediction | int | None"]


class TrialError(RuntimeError):
    """A trial's objective raised: the message is the original ``Type: message``, its traceback is in the log."""


class GuardedObjective:
    """The wrapped objective returned by :func:`guard_objective` (see the module docstring).

    Args:
        objective: ``f(trial) -> float``.
        predict: ``predict(trial)`` -> :class:`MemoryPrediction`, bytes, or None (no prediction).
        budget_bytes: the budget; None disables the prediction check.
        after_trial: called with the trial after every outcome, before memory is released (close files, drop
            references held outside the objective's frames).
    """

    def __init__(self, objective: Callable[[optuna.trial.Trial], float], predict: Predict | None = None,
                 budget_bytes: int | None = None,
                 after_trial: Callable[[optuna.trial.Trial], None] | None = None) -> None:
        self.objective = objective
        self.predict = predict
        self.budget_bytes = budget_bytes
        self.after_trial = after_trial

    def __call__(self, trial: optuna.trial.Trial) -> float:
        inherited = trial.user_attrs
        for key in OWN_ATTRS:
            if inherited.get(key) is not None:
                trial.set_user_attr(key, None)
        pruned: str | None = None
        failed: str | None = None
        ran = False
        try:
            pruned = self._check_prediction(trial)
            if pruned is None:
                ran = True
                return self.objective(trial)
        except optuna.TrialPruned as exc:
            if trial.user_attrs.get(PRUNE_REASON) is None:
                trial.set_user_attr(PRUNE_REASON, PRUNER)
            pruned = str(exc) or "pruned"
        except DivergenceError as exc:
            event = exc.event
            trial.set_user_attr(PRUNE_REASON, DIVERGED)
            trial.set_user_attr("divergence", event.reason[:_MAX_TEXT])
            trial.set_user_attr("divergence_epoch", int(event.epoch))
            trial.set_user_attr("divergence_step", int(event.step))
            trial.set_user_attr("divergence_loss", float(event.loss) if math.isfinite(event.loss) else str(event.loss))
            pruned = f"diverged: {event.reason}"
        except Exception as exc:
            trial.set_user_attr("error", _text(exc))
            if is_oom(exc):
                trial.set_user_attr(PRUNE_REASON, OOM)
                pruned = "out of memory during training"
            else:
                trial.set_user_attr("error_type", type(exc).__name__)
                # the traceback goes to the log as text: a logged exception object would keep the frames alive
                log.error("trial %d failed:\n%s", trial.number, "".join(traceback.format_exception(exc)).rstrip())
                failed = _text(exc)
        finally:
            if self.after_trial is not None:
                self.after_trial(trial)
            if ran:
                # The except blocks are left here: the exception, its traceback and the frames holding the model
                # and optimizer are unreachable now, so collection really frees them.
                release_memory()
        # no exception chaining: a __cause__ would keep the training frames (and the model) alive in Optuna
        if failed is not None:
            raise TrialError(failed) from None
        log.info("trial %d pruned: %s", trial.number, pruned)
        raise optuna.TrialPruned(pruned)

    def _check_prediction(self, trial: optuna.trial.Trial) -> str | None:
        if self.predict is None or self.budget_bytes is None:
            return None
        result = self.predict(trial)
        if result is None:
            return None
        prediction = result if isinstance(result, MemoryPrediction) else MemoryPrediction(int(result), "given")
        trial.set_user_attr("predicted_bytes", int(prediction.predicted_bytes))
        trial.set_user_attr("budget_bytes", int(self.budget_bytes))
        trial.set_user_attr("prediction_source", prediction.source)
        if prediction.predicted_bytes <= self.budget_bytes:
            return None
        trial.set_user_attr(PRUNE_REASON, OOM_PREDICTED)
        if prediction.details:
            trial.set_user_attr("prediction_details", json.dumps(prediction.details, default=str)[:_MAX_TEXT])
        return (f"predicted peak {prediction.predicted_bytes / 2**20:.1f} MiB > budget "
                f"{self.budget_bytes / 2**20:.1f} MiB ({prediction.source})")


def guard_objective(objective: Callable[[optuna.trial.Trial], float], *, predict: Predict | None = None,
                    budget_bytes: int | None = None,
                    after_trial: Callable[[optuna.trial.Trial], None] | None = None) -> GuardedObjective:
    """Wrap an objective with OOM prediction, OOM and divergence pruning and error recording.

    Args:
        objective: ``f(trial) -> float``.
        predict: ``predict(trial)`` -> :class:`MemoryPrediction` or bytes (None: no check for this trial). It may
            sample the trial's parameters; Optuna returns the same values when the objective samples them again.
        budget_bytes: memory budget; None: no prediction check.
        after_trial: optional hook run after every trial, before memory is released.

    Returns:
        The guarded objective; use it with ``study.optimize(guarded, catch=CATCH, gc_after_trial=True)``.
    """
    return GuardedObjective(objective, predict, budget_bytes, after_trial)
