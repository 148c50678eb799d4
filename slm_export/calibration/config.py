"""The compress stage's options, declared once: each field's default, flag, help and check live here, and the
plan (``plan.Plan``) is built on this class, so a new option is this field plus the code that reads it.

No heavy imports: the CLI builds its flags from these fields before it loads torch.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from slm_export.errors import ConfigError
from slm_export.options import at_least, between, check_values, opt, power_of_two

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
METHODS = ("rtn", "gptq", "awq", "awq-gptq", "smoothquant", "dynamic")
W8A8_METHODS = ("smoothquant", "dynamic")  # int8 activations too: static (calibrated) or per token at run time
FOLDING_METHODS = ("awq", "awq-gptq", "smoothquant")  # methods that fold scales into the layers' norms
BITS = {"int8": 8, "int4": 4, "int3": 3}  # everything else (fp32, fp16, bf16, "none") is not quantized
SPARSITY_METHODS = ("magnitude", "wanda", "sparsegpt")
COMPRESSION = "compression (int8, int4)"
SPARSITY = "sparsity"


def percent(text: str) -> float:
    """``5%`` or ``5`` -> 5.0."""
    try:
        return float(text.strip().rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage like 5% or 2.5, not {text!r}") from None


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1) like 0.05, not {text!r}")
    return value


def _quantized(c: Any) -> bool:
    return c.quantized


def _weight_only(c: Any) -> bool:
    return c.quantized and not c.w8a8


def _smoothquant(c: Any) -> bool:
    return c.quantized and c.method == "smoothquant"


def _reads_data(c: Any) -> bool:
    return c.compresses and (c.needs_data or c.tune_epochs > 0)


def _epochs(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 100
    return None if ok else "must be a whole number between 0 and 100 (passes over the calibration samples)"


CALIBRATES = "methods that calibrate (not round-to-nearest, dynamic or magnitude pruning)"


@dataclass(frozen=True)
class CompressConfig:
    """Quantization and sparsity settings; every field is checked on construction."""

    precision: str = opt("int4", "weight precision (default: the profile's)", choices=PRECISIONS)
    method: str | None = opt(
        None, "quantization method (default: awq-gptq for int4; for int8 the profile's: rtn weight-only on CPU "
        "targets, smoothquant W8A8 static on a100 and fpga). dynamic: W8A8, activations per token",
        group=COMPRESSION, choices=METHODS)
    group_size: int = opt(32, "weights per quantization group along the input", group=COMPRESSION,
                          check=power_of_two(16), applies=_weight_only, applies_to="weight-only int8 and int4")
    symmetric: bool = opt(False, "symmetric quantization (no zero points)", group=COMPRESSION, switch=True,
                          applies=_weight_only, applies_to="weight-only int8 and int4")
    # Symmetric int4/int3: a group whose positive end is the longer gets a negative scale, so the grid's extra
    # level reaches it (``group_params``). ONNX Runtime's MatMulNBits multiplies by the scale as stored.
    signed_scales: bool = False
    calib_data: str | None = opt(None, "calibration text: .txt, .jsonl with \"text\", or a `datasets` folder "
                                 "(default: the built-in calibration half, disjoint from evaluation)",
                                 group=COMPRESSION, applies=_reads_data, applies_to=CALIBRATES)
    calib_samples: int = opt(64, "calibration samples", group=COMPRESSION, check=at_least(1), applies=_reads_data,
                             applies_to=CALIBRATES)
    calib_seqlen: int = opt(512, "tokens per calibration sample", group=COMPRESSION, check=at_least(8),
                            applies=_reads_data, applies_to=CALIBRATES)
    seed: int = opt(0, "seed for drawing calibration samples", group=COMPRESSION, check=at_least(0),
                    applies=lambda c: _reads_data(c) or c.rotate > 0,
                    applies_to="methods that draw calibration samples")
    # Draw the samples from the head of the calibration text only: the accuracy budget (--max-ppl-increase)
    # fits its choice on the held-out tail (``data.split_calibration``), which the weights must not have seen.
    calib_holdout: bool = False
    accuracy_level: int = opt(4, "ONNX Runtime MatMulNBits accuracy level (4: int8 compute)", group=COMPRESSION,
                              choices=(0, 1, 2, 3, 4), applies=_quantized, applies_to="int8 and int4")
    lm_head_bits: int = opt(
        0, "quantize the LM head too (default: 8 for weight-only int8/int4 where ONNX Runtime is the target's first "
        "backend, else 0: float)", group=COMPRESSION, choices=(0, 4, 8), applies=_quantized,
        applies_to="int8 and int4")
    # Fraction of an int4 head's rows kept at int8 as well: the vocabulary rows the calibration data reads
    # most (its next tokens and the float head's probability mass). 0: one width for the whole head.
    lm_head_hot: float = opt(
        0.0, "an int4 LM head (implied) with this fraction of its rows, the ones the calibration text reads most, at "
        "int8 too (ONNX-Runtime-only targets; default 0.15 on the host for int4, else 0)", group=COMPRESSION,
        parse=fraction, metavar="FRACTION", check=between(0, 1, open_high=True))
    tune_epochs: int = opt(
        0, "after quantizing, tune the norm weights and the group scales (codes fixed: same format, size and speed) "
        "so the model's next-token distributions match the float model's on the calibration samples, N passes over "
        "them (default 0: off; minutes per pass on CPU)", group=COMPRESSION, metavar="N", check=_epochs)
    max_ppl_increase: float | None = opt(
        None, "accuracy budget, e.g. 5%%: int4, with the most sensitive layers kept at int8 until the perplexity "
        "change on held-out calibration text is within it", group=COMPRESSION, parse=percent,
        check=between(0, 1000, open_low=True, open_high=True))
    observer: str = opt("minmax", "activation observer of W8A8 static: minmax, moving-average, percentile, entropy, "
                        "mse", group=COMPRESSION, applies=_smoothquant, applies_to="--method smoothquant")
    smooth_alpha: float | None = opt(None, "SmoothQuant migration strength in [0, 1] (default: searched per input "
                                     "group)", group=COMPRESSION, check=between(0, 1), applies=_smoothquant,
                                     applies_to="--method smoothquant")
    pow2_scales: bool = False  # W8A8 with per-tensor power-of-two scales (DPU-class accelerators)
    rotate: int = opt(0, "W8A8: rotate down_proj's input online by a randomised Hadamard of this block size, "
                      "smoothing first (default 128 for smoothquant; 0: off)", group=COMPRESSION,
                      check=power_of_two(16, zero_ok=True))
    sparsity: str | None = opt(None, "N:M pattern along the input dimension (2:4, 4:8) or 'unstructured'",
                               group=SPARSITY)
    sparsity_method: str = opt("sparsegpt", "pruning method", group=SPARSITY, choices=SPARSITY_METHODS,
                               applies=lambda c: c.sparsity is not None, applies_to="--sparsity")
    sparsity_ratio: float = opt(0.5, "fraction of weights removed, unstructured", group=SPARSITY,
                                check=between(0, 1, open_low=True, open_high=True),
                                applies=lambda c: c.sparsity == "unstructured", applies_to="--sparsity unstructured")
    damp: float = opt(0.01, "GPTQ's dampening: this fraction of the Hessian diagonal's mean is added to it before "
                      "inverting (raise it when GPTQ reports an ill-conditioned Hessian)", group=COMPRESSION,
                      check=between(0, 1, open_low=True, open_high=True),
                      applies=lambda c: c.quantized and c.method in ("gptq", "awq-gptq", "smoothquant"),
                      applies_to="methods that round with GPTQ (gptq, awq-gptq, smoothquant)")
    act_order: bool = True  # GPTQ quantizes columns in order of falling Hessian diagonal

    def __post_init__(self) -> None:
        check_values(CompressConfig, {k: getattr(self, k) for k in self.__dataclass_fields__})
        if self.precision not in (*PRECISIONS, "int3", "none"):
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.sparsity is not None:
            self.sparsity_config  # noqa: B018  (parses the pattern)
        if self.quantized:
            self._check_quantized()

    def _check_quantized(self) -> None:
        if self.method is not None and self.method not in METHODS:  # None: left to the planner's rules
            raise ConfigError(f"unknown method {self.method!r}; methods: {', '.join(METHODS)}")
        if self.lm_head_hot and self.lm_head_bits != 4:
            raise ConfigError("--lm-head-hot keeps some rows of an int4 LM head at int8: use it with --lm-head-bits 4")
        if self.lm_head_hot and (not self.needs_data or self.w8a8):
            raise ConfigError("--lm-head-hot picks the head's rows by calibration data: use a weight-only method that "
                              "calibrates (gptq, awq or awq-gptq)")
        if self.signed_scales and not self.symmetric:
            raise ConfigError("signed scales are a form of symmetric quantization: use them with --symmetric")
        if self.method in W8A8_METHODS and self.precision != "int8":
            raise ConfigError(f"--method {self.method} quantizes weights and activations to int8: use --precision int8")
        if self.pow2_scales and self.method != "smoothquant":
            raise ConfigError("power-of-two per-tensor scales are made by the W8A8 static method (smoothquant)")
        if self.rotate and self.method not in W8A8_METHODS:
            raise ConfigError("the down_proj rotation is for int8 activations: --method smoothquant or dynamic")
        if self.method == "smoothquant":
            from slm_export.calibration.observers import check_observer

            check_observer(self.observer)
        if self.tune_epochs and self.w8a8:
            raise ConfigError(f"--tune-epochs tunes the scales of weight-only int8/int4: not for W8A8 ({self.method})")

    @property
    def quantized(self) -> bool:
        return self.precision in BITS

    @property
    def compresses(self) -> bool:
        return self.quantized or self.sparsity is not None

    @property
    def bits(self) -> int:
        return BITS.get(self.precision, 0)

    @property
    def w8a8(self) -> bool:
        return self.precision == "int8" and self.method in W8A8_METHODS

    @property
    def sparsity_config(self) -> Any:
        """The pruning settings the sparsity package takes, or None."""
        if self.sparsity is None:
            return None
        from slm_export.sparsity import SparsityConfig

        return SparsityConfig(self.sparsity, self.sparsity_method, self.sparsity_ratio)

    @property
    def needs_data(self) -> bool:
        quant = self.quantized and self.method not in ("rtn", "dynamic")
        return quant or (self.sparsity is not None and self.sparsity_method != "magnitude")

    @property
    def needs_hessian(self) -> bool:
        # W8A8 static rounds its (smoothed) int8 weights with GPTQ, as TensorRT Model Optimizer and
        # llm-compressor's W8A8 recipes do; on the power-of-two per-tensor grid too (step chosen first).
        quant = self.quantized and self.method in ("gptq", "awq-gptq", "smoothquant")
        return quant or (self.sparsity is not None and self.sparsity_method == "sparsegpt")

    def describe(self) -> str:
        return self.precision + (f" --method {self.method}" if self.method else "")
