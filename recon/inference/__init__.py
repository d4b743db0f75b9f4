"""Inference: the Broker (Hacker/Helper routing), reconstruction systems, and leaderboard reconstruction."""

from recon.inference.broker import FileDecision, Router, RoutingReport, route_slice
from recon.inference.reconstruct import ReconResult, reconstruct_leaderboard, write_volume
from recon.inference.systems import ReconBatch, ReconSystem, load_classifier, load_system

__all__ = [
    "FileDecision",
    "ReconBatch",
    "ReconResult",
    "ReconSystem",
    "Router",
    "RoutingReport",
    "load_classifier",
    "load_system",
    "reconstruct_leaderboard",
    "route_slice",
    "write_volume",
]
