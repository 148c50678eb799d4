"""Error hierarchy. Each error maps to a CLI exit code (see ``cli.py``): 1 goals missed, 2 user error, 3 environment
(a backend, device or disk space missing), 4 internal bug, 5 artifact files changed since export, 130 Ctrl-C, 143
SIGTERM.

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


class OutOfMemory(SlmExportError):
    """The plan's predicted peak memory exceeds this machine's (``memory.py``): refused before the work."""

    exit_code = 3


class DiskFull(SlmExportError):
    """The disk holding the output folder cannot take the artifact (predicted up front, or ENOSPC mid-run)."""

    exit_code = 3


class OutputBusy(SlmExportError):
    """Another run holds the output folder's lock."""


class IntegrityError(SlmExportError):
    """An artifact's files differ from what its manifest recorded at export: ``validate`` runs nothing."""

    exit_code = 5


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI timeout, ``kill``): unwinds like Ctrl-C so partial files are removed, then exits 143."""


class ValidationFailed(SlmExportError):
    """Goals were missed; carries the report."""

    exit_code = 1

    def __init__(self, message: str, report: Any = None) -> None:
        super().__init__(message)
        self.report = report


class NonFiniteOutput(SlmExportError):
    """A run produced NaN or Inf logits (or embeddings): no figure measured on them means anything."""

    exit_code = 1  # a broken artifact, like goals missed: no goal can pass on it
