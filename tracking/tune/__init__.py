"""Optuna tuning: the tune file (config), search space (space), memory prediction (memory), OOM guard (oom),
one trial (session), the study and an invocation (study), its end (report) and its MLflow runs (study_runs)."""
