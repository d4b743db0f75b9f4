"""Optuna tuning: the tune file, search space, study, OOM guard and memory prediction, report, study runs."""
