"""Runs: the tracking stores, the offline spool, the MLflow writer and callback, environment tags, plots."""

#: The one name of a stage's MLflow run id outside MLflow: the key of the MLflow callback's state, which every
#: checkpoint keeps under ``tracking`` (so ``--resume`` reopens the run and the registry finds the stage's run).
#: Defined here, in a module without imports, so that any part of ``tracking`` can use it cheaply.
RUN_ID_KEY = "mlflow_run_id"
