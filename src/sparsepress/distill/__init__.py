"""Recovery fine-tuning of a compressed model toward its dense teacher (the `distill` stage).

Example:
    >>> from sparsepress.distill import distill_
    >>> callable(distill_)
    True
"""

from .train import distill_, learning_rate, trainable_parameters

__all__ = ["distill_", "learning_rate", "trainable_parameters"]
