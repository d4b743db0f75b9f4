"""Runs: the tracking stores, the offline spool, the MLflow writer and callback, environment tags, plots."""
