"""kdsearch: hyperparameter search for confidence-preserving knowledge distillation."""

__version__ = "0.1.0"
