"""slm-export: make a small language model ready for a specific device.

    >>> import slm_export
    >>> result = slm_export.export("smollm2-135m", target="host", out="build/host")
    >>> result.passed
"""

from __future__ import annotations

from pathlib import Path

from slm_export.errors import (
    CompileError,
    ConfigError,
    DeviceError,
    ExportError,
    ModelLoadError,
    SlmExportError,
    UnsupportedByTarget,
    ValidationFailed,
)
from slm_export.pipeline import RunResult
from slm_export.validation.validate import ValidationSettings

__version__ = "0.1.0"


def export(model: str, target: str = "host", out: str | Path = "build/out", precision: str | None = None,
           eval_data: str | None = None, target_file: str | Path | None = None, validate: bool = True,
           raise_on_fail: bool = False, settings: ValidationSettings | None = None, **options: object) -> RunResult:
    """Run the whole flow for ``model`` on ``target``; returns the result (``.passed``, ``.report``).

    ``options`` are the compression settings of the CLI, by their Python names: ``method``,
    ``group_size``, ``symmetric``, ``calib_data``, ``calib_samples``, ``calib_seqlen``, ``seed``,
    ``accuracy_level``, ``lm_head_bits``. ``settings``: how much validation measures (threads, evaluation
    windows, emulated tokens, a device), as the CLI's validation flags.

    Goals missed return a result with ``passed == False`` unless ``raise_on_fail`` is set, in which
    case ``ValidationFailed`` is raised. Other errors raise their ``SlmExportError`` subclass.
    """
    from slm_export.pipeline import make_plan, run
    from slm_export.targets import get_target

    profile = get_target(target, target_file)
    plan = make_plan(profile, model, out, precision, eval_data, validate, **options)
    try:
        return run(plan, profile, settings=settings)
    except ValidationFailed as exc:
        if raise_on_fail:
            raise
        folder = (exc.report or {}).get("output", {}).get("folder")  # beside a passing artifact it is kept
        return RunResult(exc.report, Path(folder or out))


__all__ = ["CompileError", "ConfigError", "DeviceError", "ExportError", "ModelLoadError", "RunResult",
           "SlmExportError", "UnsupportedByTarget", "ValidationFailed", "ValidationSettings", "export"]
