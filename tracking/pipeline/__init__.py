"""Pipelines: a list of steps (train, tune, promote, submit) run as one tracked invocation.

``config`` (the file and its workdir), ``runner`` (running the steps under one parent run), ``summary``
(step results, the printed table, the parent run's scores).
"""
