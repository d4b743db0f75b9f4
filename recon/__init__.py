"""smartify.recon: the science of the pipeline (data, masks, model, losses, metric, training, inference).

This package never imports the tracking layer (mlflow, optuna); it reports progress through
:mod:`recon.events`.
"""

__version__ = "0.1.0"
