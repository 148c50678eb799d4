"""ONNX exporter: writes the graph, its external data, the tokenizer and an artifact manifest."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slm_export.calibration.quant import QuantizedTensor
from slm_export.errors import ExportError
from slm_export.exporters.decoder import build_decoder
from slm_export.exporters.encoder import build_encoder
from slm_export.integrity import write_manifest
from slm_export.models.adapters import DecoderSpec, spec_for
from slm_export.models.lazy import LazyView
from slm_export.models.loader import LoadedModel
from slm_export.plan import Plan

MODEL_FILE = "model.onnx"


@dataclass(frozen=True)
class ExportResult:
    """What the export stage produced."""

    model_path: Path
    files: tuple[str, ...]
    bytes: int
    weight_bytes_per_token: int
    flops_per_token: int
    graph_ops: str
    opset: int


class OnnxExporter:
    """The ``Exporter`` protocol: ``export(model, plan, out_dir) -> ExportResult``."""

    name = "onnx"

    def export(self, model: LoadedModel, plan: Plan, out_dir: Path,
               weights: Mapping[str, Any] | None = None) -> ExportResult:
        """Export ``model`` into ``out_dir`` (which the caller created and will rename into place).

        ``weights`` replaces the model's own (the compress stage's output: quantized tensors included).
        """
        source = weights if weights is not None else model.weights
        if model.streamed:  # stand-ins read when the graph writer takes their bytes: one weight held at a time
            source = LazyView(source, model.weights)
        try:
            spec = spec_for(model.config, source)
        except KeyError as exc:
            raise ExportError(f"{model.path}: weight {exc} missing for {model.model_type}") from None
        if isinstance(spec, DecoderSpec):
            builder = build_decoder(spec, plan.opset, plan.precision, plan.max_seq_len, plan.graph_ops,
                                    plan.accuracy_level, plan.max_seq_len if plan.static_shapes else None)
            per_token, macs = _decoder_bytes_per_token(spec, plan.precision)
        else:
            builder = build_encoder(spec, plan.opset, plan.precision)
            per_token, macs = 0, 0
        path = out_dir / MODEL_FILE
        model_bytes, data_bytes = builder.save(path)
        model.tokenizer.save_pretrained(out_dir / "tokenizer")
        model.config.to_json_file(out_dir / "config.json")
        manifest = {
            "kind": model.kind, "model_type": model.model_type, "precision": plan.precision,
            "graph_ops": plan.graph_ops, "opset": plan.opset, "tool": "slm-export",
            # absolute, so that `validate` finds the model from any folder; a hub model pinned to its commit
            "source_model": model.hub.ref if model.hub else source_path(model.path),
            "model_name": model.name, "fingerprint": model.fingerprint, "max_seq_len": plan.max_seq_len,
            "static_seq_len": plan.max_seq_len if plan.static_shapes else None,
            "eos_token_id": _eos(model), "files": [MODEL_FILE, MODEL_FILE + ".data", "tokenizer", "config.json"],
        }
        if model.hub:
            manifest["hub"] = model.hub.to_dict()
        write_manifest(out_dir, manifest)
        return ExportResult(path, tuple(manifest["files"]), model_bytes + data_bytes, per_token, 2 * macs,
                            plan.graph_ops, plan.opset)


def source_path(path: str) -> str:
    """A model path as an absolute path when it names a file or folder (a built-in name stays a name)."""
    return os.path.abspath(path) if os.path.exists(path) else path


def _decoder_bytes_per_token(spec: DecoderSpec, precision: str) -> tuple[int, int]:
    """(weight bytes read per decoded token, weights multiplied per token): every linear layer and the
    LM head; of the embedding table only one row is read."""
    width = 2 if precision in ("fp16", "bf16") else 4
    total, count = 0, 0
    for layer in spec.layers:
        for w in (*layer.qkv, layer.o, *layer.up, layer.down):
            total += w.storage_bytes() if isinstance(w, QuantizedTensor) else w.size * width
            count += w.size
    head = spec.lm_head if spec.lm_head is not None else spec.embed
    total += head.storage_bytes() if isinstance(head, QuantizedTensor) else head.size * width
    return total, count + head.size


def _eos(model: LoadedModel) -> Any:
    eos = getattr(model.config, "eos_token_id", None)
    return eos if eos is not None else getattr(model.tokenizer, "eos_token_id", None)
