"""Accelerate training for both SpecPT stages: settings, Parquet data loading, and the training loop.

from specpt_hf.training import TrainingSettings, training_function
settings = TrainingSettings.from_yaml("examples/configs/specpt-small-autoencoder.yaml", max_steps=100)
result = training_function(settings)  # result.model, result.model_dir, result.best_dir, result.history
"""

from .data import SpectrumCollator, build_dataloader, load_training_data
from .settings import SETTINGS_NAME, TrainingSettings, parse_settings
from .train import TrainingResult, build_model, training_function

__all__ = [
    "SETTINGS_NAME",
    "SpectrumCollator",
    "TrainingResult",
    "TrainingSettings",
    "build_dataloader",
    "build_model",
    "load_training_data",
    "parse_settings",
    "training_function",
]
