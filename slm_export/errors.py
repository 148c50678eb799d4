"""Error hierarchy. Each error maps to a CLI exit code (see ``cli.py``).

Messages say what failed, why, and what to do about it.
"""

from __future__ import annotations

from typing import Any


class SlmExportError(Exception):
    """Base class for every error the tool raises on purpose."""

    exit_code = 2


class ConfigError(SlmExportError):
    """A bad flag, profile file or recipe."""


class ModelLoadError(SlmExportError):
    """The model is missing, corrupt or of an unsupported kind."""


class UnsupportedByTarget(SlmExportError):
    """The request cannot run on the chosen target; the message says what can."""


class ExportError(SlmExportError):
    """Graph export failed."""

    exit_code = 3


class CompileError(SlmExportError):
    """Backend compilation failed."""

    exit_code = 3


class DeviceError(SlmExportError):
    """The device, emulator or a required runtime could not be reached or failed."""

    exit_code = 3


class ValidationFailed(SlmExportError):
    """Goals were missed; carries the report."""

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report
