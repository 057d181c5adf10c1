"""lancet: find the training data that makes a language model misbehave, and correct the model."""

__version__ = "0.1.0"
