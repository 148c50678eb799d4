"""Every registered target profile, the registry's lookups, and profile checks."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from slm_export.errors import ConfigError, UnsupportedByTarget
from slm_export.pipeline import make_plan
from slm_export.targets import get_target, registry
from slm_export.targets.host import detect_host, measure_bandwidth_gbs
from slm_export.targets.profile import TargetProfile

PROFILE_DIR = resources.files("slm_export.targets") / "profiles"


def test_every_profile_file_is_registered() -> None:
    files = {p.name.removesuffix(".toml") for p in PROFILE_DIR.iterdir() if p.name.endswith(".toml")}
    assert files == set(registry().names())


@pytest.mark.parametrize("name", registry().names())
def test_profile_is_complete_and_sourced(name: str) -> None:
    p = registry().get(name)
    assert p.default_precision in p.precisions
    assert p.bandwidth_gbs > 0
    assert p.memory_gb > 0
    assert p.backends
    assert "memory.bandwidth_gbs" in p.sources
    for precision in p.peak_gflops:
        assert f"compute.{precision}" in p.sources, f"{name}: compute.{precision} has no source"
    assert p.roofline(1e8, 2e8, p.default_precision)["decode_tokens_per_s"] > 0


@pytest.mark.parametrize(("alias", "canonical"), [
    ("jetson", "jetson-tx2"), ("rpi4", "rpi4b"), ("pi4", "rpi4b"), ("raspberry-pi-4b", "rpi4b"),
    ("android", "android-arm64"), ("fpga", "fpga-zcu104"), ("A100", "a100"),
])
def test_aliases(alias: str, canonical: str) -> None:
    assert get_target(alias).id == canonical


def test_unknown_target_lists_known_and_closest() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'jetson'.*Known: a100, android-arm64, fpga-zcu104, host"):
        get_target("jetsn")


def test_int8_refused_on_jetson_tx2(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedByTarget, match="no DP4A.*Supported on jetson-tx2: fp32, fp16"):
        make_plan(get_target("jetson"), "smollm2-135m", tmp_path / "o", "int8")


def test_portable_targets_get_standard_graphs(tmp_path: Path) -> None:
    for name in ("jetson-tx2", "a100"):
        assert make_plan(get_target(name), "m", tmp_path / name).graph_ops == "standard"
    assert make_plan(get_target("host"), "m", tmp_path / "h").graph_ops == "onnxruntime"


def test_profile_defaults_drive_the_plan(tmp_path: Path) -> None:
    plan = make_plan(get_target("rpi4"), "m", tmp_path / "r")
    assert (plan.precision, plan.method, plan.backend) == ("int4", "awq", "onnxruntime")
    assert make_plan(get_target("jetson"), "m", tmp_path / "j").precision == "fp16"


def test_user_profile_file(tmp_path: Path) -> None:
    text = (PROFILE_DIR / "rpi4b.toml").read_text().replace('id = "rpi4b"', 'id = "my-board"')
    board = tmp_path / "board.toml"
    board.write_text(text)
    p = get_target(target_file=board)
    assert p.id == "my-board"
    assert p.origin == str(board)


def test_missing_field_is_named(tmp_path: Path) -> None:
    text = "\n".join(ln for ln in (PROFILE_DIR / "a100.toml").read_text().splitlines()
                     if not ln.startswith("bandwidth_gbs"))
    board = tmp_path / "b.toml"
    board.write_text(text)
    with pytest.raises(ConfigError, match=r"b.toml: memory.bandwidth_gbs: missing required field"):
        TargetProfile.from_toml(board)


def test_host_detection_measures_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(tmp_path))
    base = TargetProfile.from_toml(PROFILE_DIR / "host.toml")
    first = detect_host(base)
    assert first.bandwidth_gbs > 0.5
    assert first.cpu.cores >= 1
    cached = json.loads((tmp_path / "host.json").read_text())
    assert cached["bandwidth_gbs"] == pytest.approx(first.bandwidth_gbs, abs=0.1)
    cached["bandwidth_gbs"] = 123.0
    (tmp_path / "host.json").write_text(json.dumps(cached))
    assert detect_host(base).bandwidth_gbs == 123.0
    assert "measured" in first.sources["memory.bandwidth_gbs"]


def test_bandwidth_measurement_is_plausible() -> None:
    assert 0.5 < measure_bandwidth_gbs(1, megabytes=64, repeats=2) < 2000
