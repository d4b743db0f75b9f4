"""The PromptMR+ network: configuration, model, parameter counting."""

from recon.models.config import PRESETS, PromptMRConfig
from recon.models.promptmr import PromptMR, PromptMROutput, count_parameters

__all__ = ["PRESETS", "PromptMR", "PromptMRConfig", "PromptMROutput", "count_parameters"]
