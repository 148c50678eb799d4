"""Model loading: Hugging Face folders, GGUF files, and built-in names."""

from slm_export.models import decoders  # noqa: F401  (registers the decoder adapters)
from slm_export.models.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "load_model"]
