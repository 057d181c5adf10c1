"""Models: resolve a spec (HF id/dir, .gguf, PEFT adapter, embedded default) and generate."""

from lancet.models.generate import generate
from lancet.models.loading import load_model, load_tokenizer

__all__ = ["generate", "load_model", "load_tokenizer"]
