"""Every registered target profile, the registry's lookups, profile validation, checks and host detection."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

from slm_export.errors import ConfigError, UnsupportedByTarget
from slm_export.pipeline import make_plan
from slm_export.plan import PRECISIONS, Plan
from slm_export.targets import BUILTIN_PROFILES, get_target, host, registry
from slm_export.targets.host import detect_host, measure_bandwidth_gbs
from slm_export.targets.profile import TargetProfile

PROFILE_DIR = Path(str(resources.files("slm_export.targets") / "profiles"))  # a plain folder: not zip-installed
STATUSES = ("confirmed", "secondary", "derived", "unconfirmed")
HOST_STATUSES = ("detected", "measured", "derived", "unknown")
# Numbers every device profile must source (host fills its own at load time).
SOURCED_FIELDS = ("cpu.cores", "cpu.freq_ghz", "memory.capacity_gb", "memory.bandwidth_gbs", "power.watts")


def _profile_text(name: str) -> str:
    return (PROFILE_DIR / f"{name}.toml").read_text(encoding="utf-8")


def test_every_profile_file_is_registered() -> None:
    files = {p.name.removesuffix(".toml") for p in PROFILE_DIR.iterdir() if p.name.endswith(".toml")}
    assert files == set(registry().names()) == set(BUILTIN_PROFILES)


@pytest.mark.parametrize("name", registry().names())
def test_profile_is_complete_and_sourced(name: str) -> None:
    p = registry().get(name)
    assert p.id == name
    assert p.default_precision in p.precisions
    assert not set(p.refused_precisions) & set(p.precisions), "a precision cannot be supported and refused"
    assert set(p.precisions) | set(p.refused_precisions) <= set(PRECISIONS)
    assert p.bandwidth_gbs > 0
    assert p.memory_gb > 0
    assert p.cpu.cores >= 1
    assert p.backends
    assert p.peak_gflops.get("fp32", 0) > 0 or p.peak_gflops.get(p.default_precision, 0) > 0
    assert "memory.bandwidth_gbs" in p.sources
    for precision in p.peak_gflops:
        assert f"compute.{precision}" in p.sources, f"{name}: compute.{precision} has no source"
    assert p.roofline(1e8, 2e8, p.default_precision)["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("name", [n for n in BUILTIN_PROFILES if n != "host"])
def test_device_profile_sources_carry_a_status(name: str) -> None:
    p = TargetProfile.from_toml(PROFILE_DIR / f"{name}.toml")
    for field in SOURCED_FIELDS:
        assert field in p.sources, f"{name}: {field} has no source"
    for field, source in p.sources.items():
        assert source.startswith(STATUSES), f"{name}: source of {field} has no status: {source!r}"
    if p.gpu is not None:
        assert "gpu.arch" in p.sources


def test_host_sources_say_how_each_fact_was_found() -> None:
    p = registry().get("host")
    fields = ("cpu.model", "cpu.cores", "cpu.freq_ghz", "memory.capacity_gb", *(f"compute.{k}" for k in p.peak_gflops))
    for field in fields:
        assert p.sources[field].startswith(HOST_STATUSES), (field, p.sources[field])
    assert p.sources["memory.bandwidth_gbs"].startswith("measured: float32 read of a 2048 MB buffer")


@pytest.mark.parametrize(("alias", "canonical"), [
    ("jetson", "jetson-tx2"), ("rpi4", "rpi4b"), ("pi4", "rpi4b"), ("raspberry-pi-4b", "rpi4b"),
    ("android", "android-arm64"), ("fpga", "fpga-zcu104"), ("A100", "a100"), ("cpu", "host"), ("local", "host"),
])
def test_aliases(alias: str, canonical: str) -> None:
    assert get_target(alias).id == canonical


def test_unknown_target_lists_known_and_closest() -> None:
    with pytest.raises(ConfigError) as info:
        get_target("jetsn")
    message = str(info.value)
    assert "'jetsn'" in message
    assert "Did you mean 'jetson" in message
    assert "Known: " + ", ".join(sorted(BUILTIN_PROFILES)) in message


def _plan(profile: TargetProfile, precision: str) -> Plan:
    return Plan(target=profile.id, model="m", out="o", precision=precision, backend=profile.backends[0],
                graph_ops=profile.graph_ops, opset=profile.opset, static_shapes=profile.static_shapes,
                max_seq_len=profile.max_seq_len, validation=profile.validation)


def test_check_refuses_int8_on_jetson_tx2_and_says_what_runs() -> None:
    jetson = get_target("jetson-tx2")
    jetson.check(_plan(jetson, "fp16"))  # the default passes
    with pytest.raises(UnsupportedByTarget, match=r"'int8'.*platformHasFastInt8.*DP4A") as info:
        jetson.check(_plan(jetson, "int8"))
    assert "Supported on jetson-tx2: fp32, fp16." in str(info.value)


def test_make_plan_refuses_int8_on_jetson(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedByTarget, match="no DP4A.*Supported on jetson-tx2: fp32, fp16"):
        make_plan(get_target("jetson"), "smollm2-135m", tmp_path / "o", "int8")


def test_fpga_refuses_float_with_the_reason() -> None:
    fpga = get_target("fpga")
    with pytest.raises(UnsupportedByTarget, match=r"int8-only.*Supported on fpga-zcu104: int8\."):
        fpga.check(_plan(fpga, "fp32"))


def test_portable_targets_get_standard_graphs(tmp_path: Path) -> None:
    for name in ("jetson-tx2", "a100"):
        assert make_plan(get_target(name), "m", tmp_path / name).graph_ops == "standard"
    assert make_plan(get_target("host"), "m", tmp_path / "h").graph_ops == "onnxruntime"


def test_profile_defaults_drive_the_plan(tmp_path: Path) -> None:
    plan = make_plan(get_target("rpi4"), "m", tmp_path / "r")
    assert (plan.precision, plan.backend) == ("int4", "onnxruntime")
    assert make_plan(get_target("jetson"), "m", tmp_path / "j").precision == "fp16"


def test_user_profile_file(tmp_path: Path) -> None:
    board = tmp_path / "board.toml"
    board.write_text(_profile_text("rpi4b").replace('id = "rpi4b"', 'id = "my-board"'), encoding="utf-8")
    p = get_target(target_file=board)
    assert p.id == "my-board"
    assert p.origin == str(board)


# (what is broken, text to replace in jetson-tx2.toml, replacement, expected message fragment)
MALFORMED = [
    ("missing field", "bandwidth_gbs = 51.2\n", "", r"memory\.bandwidth_gbs: missing required field"),
    ("missing table", "[validation]\nmode = \"device\"\n", "", r"validation: missing required field"),
    ("wrong type", "cores = 4\n", 'cores = "four"\n', r"cpu\.cores: expected an integer, got 'four'"),
    ("wrong type, number", "capacity_gb = 8.0", 'capacity_gb = "8 GB"', r"memory\.capacity_gb: expected a number"),
    ("unknown precision", 'supported = ["fp32", "fp16"]', 'supported = ["fp32", "fp8"]',
     r"precision\.supported: expected entries from fp32, fp16, bf16, int8, int4, got 'fp8'"),
    ("unknown compute precision", "fp16 = 1146.9", "fp16 = 1146.9\ntf32 = 1.0", r"compute\.tf32: unknown precision"),
    ("default not supported", 'default = "fp16"', 'default = "int8"',
     r"precision\.default: expected one of fp32, fp16, got 'int8'"),
    ("bad TOML syntax", "[memory]", "[memory", r"is not valid TOML"),
    ("unknown backend", 'order = ["tensorrt", "onnxruntime"]', 'order = ["tensorrt", "openvino"]',
     r"backends\.order: expected entries from .*vitis-ai, got 'openvino'"),
    ("no backend", 'order = ["tensorrt", "onnxruntime"]', "order = []", r"backends\.order: must name at least one"),
    ("opset out of range", "opset = 13", "opset = 7", r"graph\.opset: expected an integer in \[13, 23\]"),
    ("unknown validation mode", 'mode = "device"', 'mode = "ssh"', r"validation\.mode: expected one of host"),
    ("unknown graph ops", 'ops = "standard"', 'ops = "tensorrt"', r"graph\.ops: expected one of standard"),
    ("refused not a table", "[precision.refused]\n", 'refused = "int8"\n[sources.displaced]\n',
     r"precision\.refused: expected a table"),
    ("bad isa", 'isa = "aarch64"', 'isa = "riscv64"', r"cpu\.isa: expected one of x86_64, aarch64, armv7"),
    ("negative power", "watts = 15.0", "watts = -1.0", r"power\.watts: expected a number >= 0"),
]


@pytest.mark.parametrize(("broken", "old", "new", "message"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_profile_names_the_field(tmp_path: Path, broken: str, old: str, new: str, message: str) -> None:
    text = _profile_text("jetson-tx2")
    assert text.count(old) == 1, f"fixture for {broken!r} no longer matches the profile"
    board = tmp_path / "board.toml"
    board.write_text(text.replace(old, new), encoding="utf-8")
    with pytest.raises(ConfigError, match=message) as info:
        TargetProfile.from_toml(board)
    assert str(board) in str(info.value)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        get_target(target_file=tmp_path / "nope.toml")


# ---- host detection ---------------------------------------------------------------------------------

@pytest.fixture
def base_host() -> TargetProfile:
    return TargetProfile.from_toml(PROFILE_DIR / "host.toml")


def test_host_detection_measures_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 base_host: TargetProfile) -> None:
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(tmp_path))
    first = detect_host(base_host)
    assert first.bandwidth_gbs > 0.5
    assert first.cpu.cores >= 1
    assert first.memory_gb > 0
    assert first.peak_gflops["fp32"] > 0
    cache = tmp_path / "host.json"
    cached = json.loads(cache.read_text())
    assert cached["bandwidth_gbs"] == pytest.approx(first.bandwidth_gbs, abs=0.1)

    def fail(*args: object, **kwargs: object) -> float:
        raise AssertionError("measured again despite a cached value")

    monkeypatch.setattr(host, "_measure_apart", fail)
    cached["bandwidth_gbs"] = 123.0
    cache.write_text(json.dumps(cached))
    second = detect_host(base_host)
    assert second.bandwidth_gbs == 123.0
    assert "cached in" in second.sources["memory.bandwidth_gbs"]


def test_host_cache_of_another_cpu_is_remeasured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 base_host: TargetProfile) -> None:
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(tmp_path))
    (tmp_path / "host.json").write_text(json.dumps({"key": "other|999", "bandwidth_gbs": 1.0, "source": "x"}))
    monkeypatch.setattr(host, "_measure_apart", lambda cores: 42.0)
    assert detect_host(base_host).bandwidth_gbs == 42.0
    assert json.loads((tmp_path / "host.json").read_text())["bandwidth_gbs"] == 42.0


def test_host_cache_folder_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLM_EXPORT_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert host.cache_dir() == tmp_path / "slm-export"
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(tmp_path / "mine"))
    assert host.cache_dir() == tmp_path / "mine"


def test_host_detection_without_proc_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           base_host: TargetProfile) -> None:
    monkeypatch.setenv("SLM_EXPORT_CACHE_DIR", str(tmp_path))
    for name in ("CPUINFO", "MEMINFO", "MAX_FREQ"):
        monkeypatch.setattr(host, name, tmp_path / "missing")
    monkeypatch.setattr(host.platform, "processor", lambda: "")
    monkeypatch.setattr(host, "_measure_apart", lambda cores: 10.0)
    p = detect_host(base_host)
    assert p.cpu.model == "unknown"
    assert p.cpu.freq_ghz == 2.0
    assert p.memory_gb == 1.0
    for field in ("cpu.model", "cpu.freq_ghz", "memory.capacity_gb"):
        assert p.sources[field].startswith("unknown"), field
    assert p.peak_gflops["fp32"] > 0


def test_host_reads_cpuinfo_flags_and_max_clock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                base_host: TargetProfile) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd evtstrm asimddp asimdhp i8mm cpuid\n"
                                      "CPU part\t: 0xd0b\n")
    (tmp_path / "max").write_text("2400000\n")
    (tmp_path / "meminfo").write_text("MemTotal:        8000000 kB\n")
    monkeypatch.setattr(host, "CPUINFO", tmp_path / "cpuinfo")
    monkeypatch.setattr(host, "MAX_FREQ", tmp_path / "max")
    monkeypatch.setattr(host, "MEMINFO", tmp_path / "meminfo")
    monkeypatch.setattr(host.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(host, "_cached_bandwidth", lambda key, cores: (10.0, "measured: test"))
    p = detect_host(base_host)
    assert p.cpu.isa == "aarch64"
    assert p.cpu.freq_ghz == 2.4
    assert p.cpu.features == ("asimd", "asimddp", "asimdhp", "i8mm")
    assert p.memory_gb == pytest.approx(7.6, abs=0.1)
    fp32 = p.cpu.cores * 2.4 * 8
    assert p.peak_gflops["fp32"] == pytest.approx(fp32)
    assert p.peak_gflops["fp16"] == pytest.approx(2 * fp32)
    assert p.peak_gflops["int8"] == pytest.approx(4 * fp32)


def test_bandwidth_measurement_is_plausible() -> None:
    assert 0.5 < measure_bandwidth_gbs(2, megabytes=64, repeats=2) < 5000
