"""TargetProfile: a device described as data (one TOML file a device), loaded and checked here."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slm_export.errors import ConfigError, UnsupportedByTarget
from slm_export.plan import IMPLEMENTED_PRECISIONS, PRECISIONS, Plan

GRAPH_OPS = ("standard", "onnxruntime")
VALIDATION_MODES = ("host", "emulator", "device")
KNOWN_BACKENDS = ("onnxruntime", "tensorrt", "tvm", "executorch", "llamacpp", "vitis-ai")
SPARSITY_PATTERNS = ("2:4", "4:8", "unstructured")
INT8_METHODS = ("rtn", "gptq", "awq", "awq-gptq", "smoothquant", "dynamic")
INT8_SCALES = ("per-channel", "pow2-per-tensor")
INT8_OBSERVERS = ("minmax", "moving-average", "percentile", "entropy", "mse")  # calibration.observers.OBSERVERS
MAX_PROFILE_BYTES = 1 << 20  # profiles are a few KiB; reading a large file whole would only fail later


@dataclass(frozen=True)
class CpuSpec:
    """The CPU that runs the model (or hosts the accelerator)."""

    isa: str
    model: str
    cores: int
    freq_ghz: float
    features: tuple[str, ...]
    llvm_mcpu: str | None = None
    llvm_mattr: tuple[str, ...] = ()
    qemu_cpu: str | None = None


@dataclass(frozen=True)
class GpuSpec:
    """An accelerator (GPU or FPGA overlay) beside the CPU."""

    name: str
    arch: str
    tensorrt: tuple[str, ...] = ()
    dpu_fingerprint: str | None = None


@dataclass(frozen=True)
class TargetProfile:
    """Everything the tool needs to know about a device. Frozen; built from TOML by ``from_dict``."""

    id: str
    name: str
    aliases: tuple[str, ...]
    description: str
    cpu: CpuSpec
    gpu: GpuSpec | None
    memory_gb: float
    bandwidth_gbs: float
    peak_gflops: dict[str, float]
    precisions: tuple[str, ...]
    default_precision: str
    refused_precisions: dict[str, str]
    sparsity_patterns: tuple[str, ...]
    sparse_speedup: bool
    opset: int
    static_shapes: bool
    graph_ops: str
    max_seq_len: int
    backends: tuple[str, ...]
    validation: str
    power_w: float
    int8_method: str = "rtn"  # what --precision int8 means here unless --method says otherwise
    int8_scales: str = "per-channel"  # or "pow2-per-tensor" (DPU-class: shifts, not multiplies)
    int8_observer: str = "minmax"  # activation observer of W8A8 static unless --observer says otherwise
    sources: dict[str, str] = field(default_factory=dict)
    origin: str = "built-in"

    # ---- checks ---------------------------------------------------------------------------
    def check(self, plan: Plan) -> None:
        """Refuse a plan this target cannot run, saying what it can run instead."""
        if plan.precision not in self.precisions:
            why = self.refused_precisions.get(plan.precision, "not in the profile's supported list")
            raise UnsupportedByTarget(
                f"{self.id} cannot run precision {plan.precision!r}: {why}. "
                f"Supported on {self.id}: {', '.join(self.precisions)}."
            )
        if plan.precision not in IMPLEMENTED_PRECISIONS:
            raise UnsupportedByTarget(
                f"precision {plan.precision!r} is not produced by this version yet. "
                f"Available now: {', '.join(IMPLEMENTED_PRECISIONS)}."
            )
        if plan.sparsity and plan.sparsity not in self.sparsity_patterns:
            can = ", ".join(self.sparsity_patterns) or "none"
            raise UnsupportedByTarget(
                f"{self.id} has no use for sparsity pattern {plan.sparsity!r}; patterns it can use: {can}."
            )
        if plan.backend not in self.backends:
            raise UnsupportedByTarget(
                f"backend {plan.backend!r} is not one of {self.id}'s backends: {', '.join(self.backends)}."
            )
        if self.int8_scales == "pow2-per-tensor" and plan.precision == "int8" and not plan.pow2_scales:
            raise UnsupportedByTarget(f"{self.id} runs int8 only with symmetric, per-tensor, power-of-two scales on "
                                      "weights and activations (W8A8 static: --method smoothquant).")
        if plan.opset > self.opset:
            raise UnsupportedByTarget(f"{self.id} accepts ONNX opset <= {self.opset}, not {plan.opset}.")
        if plan.graph_ops == "onnxruntime" and self.graph_ops == "standard":
            raise UnsupportedByTarget(
                f"{self.id}'s runtime cannot run ONNX Runtime contrib ops; it needs standard ONNX."
            )

    # ---- derived figures ---------------------------------------------------------------------
    def roofline(self, weight_bytes: float, flops_per_token: float, precision: str) -> dict[str, float]:
        """Upper bounds from the profile: decode by bandwidth, prefill by peak compute."""
        peak = self.peak_gflops.get(precision) or self.peak_gflops.get("fp32", 0.0)
        decode = self.bandwidth_gbs * 1e9 / weight_bytes if weight_bytes else 0.0
        prefill = peak * 1e9 / flops_per_token if flops_per_token else 0.0
        return {"decode_tokens_per_s": decode, "prefill_tokens_per_s": prefill,
                "bandwidth_gbs": self.bandwidth_gbs, "peak_gflops": peak}

    def to_dict(self) -> dict[str, Any]:
        """Plain data, for reports and ``targets show``."""
        from dataclasses import asdict

        return asdict(self)

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path, origin: str | None = None) -> TargetProfile:
        """Load and validate a profile file; errors name the file, the field and the problem."""
        path = Path(path)
        try:
            if path.is_dir():
                raise ConfigError(f"target file {path} is a folder; pass the profile's .toml file inside it")
            if path.exists() and not path.is_file():
                raise ConfigError(f"target file {path} is not a regular file (a device or a pipe); pass a .toml "
                                  "file")
            with open(path, "rb") as fh:
                data = fh.read(MAX_PROFILE_BYTES + 1)
        except FileNotFoundError:
            raise ConfigError(f"target file {path} does not exist") from None
        except OSError as exc:
            raise ConfigError(f"target file {path} cannot be read: {exc.strerror or exc}") from None
        if len(data) > MAX_PROFILE_BYTES:
            raise ConfigError(f"target file {path} is over {MAX_PROFILE_BYTES // 1024} KiB: not a device profile "
                              "(a model file passed by mistake?)")
        try:
            raw = tomllib.loads(data.decode("utf-8"))
        except (ValueError, RecursionError) as exc:  # TOMLDecodeError, UnicodeDecodeError, an over-long integer
            raise ConfigError(f"target file {path} is not valid TOML: {exc}") from None
        try:
            return cls.from_dict(raw, origin=origin or str(path))
        except ConfigError as exc:
            raise ConfigError(f"target file {path}: {exc}") from None

    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "built-in") -> TargetProfile:
        """Build from parsed TOML, checking every field's presence, type and range; unknown keys are
        errors, so a misspelt optional field is not silently ignored."""
        _reject_unknown(raw)
        r = _Reader(raw)
        cpu, gpu = _cpu_spec(r.section("cpu")), _gpu_spec(r.section("gpu")) if "gpu" in raw else None
        mem, comp, prec = r.section("memory"), r.section("compute"), r.section("precision")
        sp, graph, val = r.section("sparsity"), r.section("graph"), r.section("validation")
        supported = tuple(prec.str_list("supported", choices=PRECISIONS))
        default = prec.str("default", choices=supported)
        peak = {k: comp.float(k, minimum=0.0) for k in comp.raw}
        for k in peak:
            if k not in PRECISIONS:
                raise ConfigError(f"compute.{k}: unknown precision; expected one of {', '.join(PRECISIONS)}")
        refused = _str_table(prec.raw.get("refused", {}), "precision.refused", "precision = \"reason\"")
        backends = tuple(r.section("backends").str_list("order", choices=KNOWN_BACKENDS))
        if not backends:
            raise ConfigError("backends.order: must name at least one backend")
        sources = _str_table(raw.get("sources", {}), "sources", "field = \"source\"")
        return cls(
            id=r.str("id"), name=r.str("name"), aliases=tuple(r.str_list("aliases", required=False)),
            description=r.str("description"), cpu=cpu, gpu=gpu,
            memory_gb=mem.float("capacity_gb", minimum=0.01),
            bandwidth_gbs=mem.float("bandwidth_gbs", minimum=0.01),
            peak_gflops=peak, precisions=supported, default_precision=default,
            refused_precisions=refused,
            sparsity_patterns=tuple(sp.str_list("patterns", choices=SPARSITY_PATTERNS)),
            sparse_speedup=sp.bool("hardware_speedup"),
            opset=graph.int("opset", minimum=13, maximum=23),
            static_shapes=graph.bool("static_shapes"),
            graph_ops=graph.str("ops", choices=GRAPH_OPS),
            max_seq_len=graph.int("max_seq_len", minimum=16),
            backends=backends, validation=val.str("mode", choices=VALIDATION_MODES),
            power_w=r.section("power").float("watts", minimum=0.0),
            int8_method=prec.str("int8_method", choices=INT8_METHODS) if "int8_method" in prec.raw else "rtn",
            int8_scales=(prec.str("int8_scales", choices=INT8_SCALES) if "int8_scales" in prec.raw
                         else "per-channel"),
            int8_observer=(prec.str("int8_observer", choices=INT8_OBSERVERS) if "int8_observer" in prec.raw
                           else "minmax"),
            sources={str(k): str(v) for k, v in sources.items()}, origin=origin,
        )


_SCHEMA: dict[str, set[str] | None] = {
    "": {"id", "name", "aliases", "description", "cpu", "gpu", "memory", "compute", "precision", "sparsity",
         "graph", "backends", "validation", "power", "sources"},
    "cpu": {"isa", "model", "cores", "freq_ghz", "features", "llvm_mcpu", "llvm_mattr", "qemu_cpu"},
    "gpu": {"name", "arch", "tensorrt", "dpu_fingerprint"},
    "memory": {"capacity_gb", "bandwidth_gbs"},
    "compute": None, "sources": None,  # open tables: precisions, field paths
    "precision": {"supported", "default", "refused", "int8_method", "int8_scales", "int8_observer"},
    "sparsity": {"patterns", "hardware_speedup"},
    "graph": {"opset", "static_shapes", "ops", "max_seq_len"},
    "backends": {"order"}, "validation": {"mode"}, "power": {"watts"},
}


def _cpu_spec(c: _Reader) -> CpuSpec:
    return CpuSpec(isa=c.str("isa", choices=("x86_64", "aarch64", "armv7")), model=c.str("model"),
                   cores=c.int("cores", minimum=1), freq_ghz=c.float("freq_ghz", minimum=0.01),
                   features=tuple(c.str_list("features")), llvm_mcpu=c.opt_str("llvm_mcpu"),
                   llvm_mattr=tuple(c.str_list("llvm_mattr", required=False)), qemu_cpu=c.opt_str("qemu_cpu"))


def _gpu_spec(g: _Reader) -> GpuSpec:
    return GpuSpec(name=g.str("name"), arch=g.str("arch"), tensorrt=tuple(g.str_list("tensorrt", required=False)),
                   dpu_fingerprint=g.opt_str("dpu_fingerprint"))


def _str_table(value: Any, where: str, form: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ConfigError(f"{where}: expected a table of {form}")
    return dict(value)


def _reject_unknown(raw: dict[str, Any]) -> None:
    import difflib

    for table, allowed in _SCHEMA.items():
        section = raw if not table else raw.get(table, {})
        if allowed is None or not isinstance(section, dict):
            continue
        for key in section:
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                where = f"{table}.{key}" if table else key
                raise ConfigError(f"{where}: unknown field{hint} Known here: {', '.join(sorted(allowed))}")


_HUGE = 1e308  # larger magnitudes are no device's figure, and an int beyond it does not convert to float


def _shown(value: Any) -> str:
    """``repr`` cut short: a huge integer's repr raises, and a long list would swamp the message."""
    try:
        text = repr(value)
    except ValueError:  # Python refuses the repr of an integer of over 4300 digits
        text = f"a {type(value).__name__} holding an integer too long to print"
    return text if len(text) <= 120 else text[:117] + "..."


class _Reader:
    """Typed access to one TOML table, with errors that name the field."""

    def __init__(self, raw: dict[str, Any], prefix: str = "") -> None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{prefix.rstrip('.') or 'file'}: expected a table")
        self.raw, self.prefix = raw, prefix

    def _get(self, key: str, required: bool = True) -> Any:
        if key not in self.raw:
            if required:
                raise ConfigError(f"{self.prefix}{key}: missing required field")
            return None
        return self.raw[key]

    def _bad(self, key: str, want: str, got: Any) -> ConfigError:
        return ConfigError(f"{self.prefix}{key}: expected {want}, got {_shown(got)}")

    def section(self, key: str) -> _Reader:
        return _Reader(self._get(key), f"{self.prefix}{key}.")

    def str(self, key: str, choices: tuple[str, ...] | None = None) -> str:
        value = self._get(key)
        if not isinstance(value, str) or not value:
            raise self._bad(key, "a non-empty string", value)
        if choices is not None and value not in choices:
            raise self._bad(key, f"one of {', '.join(choices)}", value)
        return value

    def opt_str(self, key: str) -> str | None:
        return None if key not in self.raw else self.str(key)

    def str_list(self, key: str, required: bool = True, choices: tuple[str, ...] | None = None) -> list[str]:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._bad(key, "a list of strings", value)
        for v in value:
            if choices is not None and v not in choices:
                raise self._bad(key, f"entries from {', '.join(choices)}", v)
        return value

    def int(self, key: str, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self._get(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self._bad(key, "an integer", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self._bad(key, f"an integer in [{minimum}, {maximum}]", value)
        return value

    def float(self, key: str, minimum: float | None = None) -> float:
        value = self._get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self._bad(key, "a number", value)
        if not (-_HUGE < value < _HUGE):  # NaN, an infinity or an integer past float range
            raise self._bad(key, "a finite number", value)
        if minimum is not None and value < minimum:
            raise self._bad(key, f"a number >= {minimum}", value)
        return float(value)

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value
