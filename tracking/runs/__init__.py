"""Runs: the tracking stores, the offline spool, the MLflow writer and callback, environment tags, plots."""

from recon.events import RUN_ID_KEY

__all__ = ["RUN_ID_KEY"]
