"""Target-profile registry: built-in TOML profiles, the detected host, and user files."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from slm_export.registry import Registry
from slm_export.targets.profile import TargetProfile

BUILTIN_PROFILES = ("jetson-tx2", "rpi4b", "android-arm64", "a100", "fpga-zcu104", "host")

_registry: Registry[TargetProfile] | None = None


def registry() -> Registry[TargetProfile]:
    """The registry of built-in profiles, loaded on first use."""
    global _registry
    if _registry is None:
        reg: Registry[TargetProfile] = Registry("target")
        for name in BUILTIN_PROFILES:
            profile = _load_builtin(name)
            reg.register(profile.id, profile, profile.aliases)
        _registry = reg
    return _registry


def _load_builtin(name: str) -> TargetProfile:
    path = resources.files("slm_export.targets") / "profiles" / f"{name}.toml"
    with resources.as_file(path) as p:
        profile = TargetProfile.from_toml(p, origin="built-in")
    if name == "host":
        from slm_export.targets.host import detect_host

        profile = detect_host(profile)
    return profile


def get_target(name: str | None = None, target_file: str | Path | None = None) -> TargetProfile:
    """Resolve ``--target NAME`` or ``--target-file FILE`` to a profile.

    Raises:
        ConfigError: an unknown name, or a file that is missing, a folder, unreadable or not a valid profile.
    """
    if target_file is not None:
        return TargetProfile.from_toml(Path(target_file).expanduser())
    return registry().get(name or "host")


__all__ = ["BUILTIN_PROFILES", "TargetProfile", "get_target", "registry"]
