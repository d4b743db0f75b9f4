"""Submission robustness: each system scored on the public leaderboard and on re-masked copies of it.

The Hacker is trained for the public mask pattern, the Helper for other masks, and the Broker sends a
slice to the Hacker only when its mask is exactly the public pattern. The private leaderboard may use
other masks, so a submission with labels is also scored on copies of the leaderboard whose masks are
those of the re-masked validation (:func:`recon.inference.evaluation.write_remasked_leaderboard`, one
copy per kind, deterministic per file name and kind). Per world (``public``, then each kind) the Broker
reconstructs, and each system alone (both Broker slots given the same system) reconstructs unless the
Broker sent every slice of that world to it already, in which case the system's score *is* the Broker's
(recorded as shared). On the public leaderboard the Broker sends everything to the Hacker, on a
re-masked copy everything to the Helper, so the cost is about three more reconstructions of the
leaderboard (the Helper on the public masks, the Hacker on each of the two kinds); none of it counts
against the time budget, which is the Broker's public reconstruction alone.

Metric names (see :func:`metrics`): ``submission/<system>/leaderboard`` (and ``/ssim/acc4``,
``/ssim/acc8``) on the public masks, ``submission/remasked/<system>/<kind>/leaderboard`` (and
``/ssim/acc4``, ``/ssim/acc8``) per kind, ``submission/remasked/<system>/leaderboard`` the mean over the
kinds (the private-like score), ``routing/remasked/<kind>/hacker_ratio`` and ``time/robustness_s``.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from recon.engine.stage import RemaskConfig
from recon.inference.evaluation import evaluate_folder, write_remasked_leaderboard
from recon.inference.reconstruct import ReconResult, reconstruct_leaderboard
from recon.inference.systems import ReconSystem

log = logging.getLogger(__name__)

SYSTEMS = ("hacker", "helper", "broker")
PUBLIC = "public"
LABELS = {"hacker": "Hacker", "helper": "Helper", "broker": "Broker (submitted)"}
_SCORES = ("acc4", "acc8", "leaderboard")


@dataclass
class Robustness:
    """Scores of every system in every world.

    Attributes:
        protocol: the re-masking protocol (:meth:`RemaskConfig.protocol`).
        kinds: the re-mask kinds, in order.
        scores: world (``public`` or a kind) -> system -> ``{"acc4", "acc8", "leaderboard"}``.
        shared: world -> systems whose scores are the Broker's (it sent every slice to them).
        hacker_ratio: world -> share of the Broker's slices sent to the Hacker.
        seconds: wall time of the extra reconstructions and scoring.
    """

    protocol: str
    kinds: tuple[str, ...]
    scores: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    shared: dict[str, list[str]] = field(default_factory=dict)
    hacker_ratio: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def remasked_mean(self, system: str, score: str = "leaderboard") -> float:
        """The private-like score of a system: the mean over the re-mask kinds."""
        return sum(self.scores[k][system][score] for k in self.kinds) / len(self.kinds)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON-able)."""
        return {"protocol": self.protocol, "kinds": list(self.kinds), "scores": self.scores,
                "shared": self.shared, "hacker_ratio": self.hacker_ratio, "seconds": self.seconds,
                "remasked_mean": {s: self.remasked_mean(s) for s in SYSTEMS}}


def _scores(evaluation: dict[str, Any]) -> dict[str, float]:
    return {k: float(evaluation[k]) for k in _SCORES}


def measure(data_dir: Path, public: ReconResult, public_evaluation: dict[str, Any], hacker: ReconSystem,
            helper: ReconSystem, recon_kwargs: dict[str, Any], classifier: nn.Module | None = None,
            cfg: RemaskConfig | None = None) -> Robustness:
    """Score the Hacker, the Helper and the Broker on the public leaderboard and its re-masked copies.

    Args:
        data_dir: the leaderboard folder (with labels).
        public: the Broker's reconstruction of ``data_dir`` (the submission itself).
        public_evaluation: its official scores.
        hacker: the Hacker system.
        helper: the Helper system.
        recon_kwargs: the submission's inference settings for :func:`reconstruct_leaderboard` (device,
            amp, batch size, workers, anatomy source, budget, progress).
        classifier: the classifier module, or None (file names).
        cfg: the re-masking settings; the validation's defaults when None.

    Returns:
        The :class:`Robustness` table.
    """
    cfg = cfg or RemaskConfig()
    clock = time.perf_counter()
    result = Robustness(cfg.protocol(), tuple(cfg.kinds))
    pair = {"hacker": (hacker, hacker), "helper": (helper, helper), "broker": (hacker, helper)}
    with tempfile.TemporaryDirectory(prefix="smartify-robustness-") as tmp:
        root = Path(tmp)

        def run(world: str, system: str, data: Path) -> tuple[ReconResult, dict[str, Any]]:
            log.info("robustness: %s on the %s masks", system, world)
            recon = reconstruct_leaderboard(data, root / world / system, *pair[system], classifier=classifier,
                                            **recon_kwargs)
            return recon, evaluate_folder(data, root / world / system, device=recon.device)

        for world in (PUBLIC, *result.kinds):
            data = data_dir
            if world == PUBLIC:
                broker, evaluation = public, public_evaluation
            else:
                data = root / "data" / world
                write_remasked_leaderboard(data_dir, data, world, cfg)
                broker, evaluation = run(world, "broker", data)
            scores = {"broker": _scores(evaluation)}
            used = {name for name, n in broker.routing.slices_per_system.items() if n > 0}
            result.shared[world] = sorted(used) if len(used) == 1 else []
            for system in ("hacker", "helper"):
                scores[system] = scores["broker"] if system in result.shared[world] else _scores(run(world, system,
                                                                                                      data)[1])
            result.scores[world] = {s: scores[s] for s in SYSTEMS}
            result.hacker_ratio[world] = float(broker.routing.hacker_ratio)
    result.seconds = time.perf_counter() - clock
    return result


def metrics(rob: Robustness) -> dict[str, float]:
    """The metrics of a :class:`Robustness` table (names in the module docstring)."""
    out: dict[str, float] = {"time/robustness_s": rob.seconds}
    for system in SYSTEMS:
        public = rob.scores[PUBLIC][system]
        out[f"submission/{system}/leaderboard"] = public["leaderboard"]
        out.update({f"submission/{system}/ssim/{acc}": public[acc] for acc in ("acc4", "acc8")})
        for kind in rob.kinds:
            s = rob.scores[kind][system]
            out[f"submission/remasked/{system}/{kind}/leaderboard"] = s["leaderboard"]
            out.update({f"submission/remasked/{system}/{kind}/ssim/{acc}": s[acc] for acc in ("acc4", "acc8")})
        out[f"submission/remasked/{system}/leaderboard"] = rob.remasked_mean(system)
    out.update({f"routing/remasked/{kind}/hacker_ratio": rob.hacker_ratio[kind] for kind in rob.kinds})
    return out


def markdown(rob: Robustness) -> str:
    """``robustness.md``: the public and private-like scores of every system, as tables."""
    worlds = (PUBLIC, *rob.kinds)
    head = "| system | public | " + " | ".join(rob.kinds) + " | re-masked mean |"
    lines = [
        "# Robustness: public masks and re-masked copies of the leaderboard", "",
        "Leaderboard score (mean of the acc4 and acc8 slice-weighted SSIM) of each system on the public "
        "leaderboard and on copies of it whose masks are the re-masked validation's "
        f"(protocol `{rob.protocol}`: never the public pattern, deterministic per file and kind). "
        "The re-masked mean is the private-like score.", "",
        head, "|" + "---|" * (len(rob.kinds) + 3),
    ]
    for system in SYSTEMS:
        cells = [f"{rob.scores[w][system]['leaderboard']:.4f}" for w in worlds]
        lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + f" | {rob.remasked_mean(system):.4f} |")
    lines += ["", "Broker routing, share of slices sent to the Hacker: "
              + ", ".join(f"{w} {rob.hacker_ratio[w]:.2f}" for w in worlds) + ".", ""]
    for world in worlds:
        if rob.shared.get(world):
            lines.append(f"- {world}: the Broker sent every slice to the {rob.shared[world][0].capitalize()}, "
                         "so that system's score is the Broker's reconstruction.")
    lines += ["", "## Per acceleration", "", "| system | masks | acc4 | acc8 | leaderboard |", "|---|---|---|---|---|"]
    for system in SYSTEMS:
        for world in worlds:
            s = rob.scores[world][system]
            lines.append(f"| {LABELS[system]} | {world} | {s['acc4']:.4f} | {s['acc8']:.4f} | {s['leaderboard']:.4f} |")
    lines += ["", f"Extra reconstructions and scoring took {rob.seconds:.1f} s (not counted against the budget).", ""]
    return "\n".join(lines)
