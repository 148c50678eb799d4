"""Validation on a device over SSH, against a real OpenSSH server on loopback (tests/sshd.py), with a
device Python that has only NumPy and ONNX Runtime; and every fault case for real."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slm_export.cli import main
from slm_export.errors import DeviceError
from slm_export.validation.ssh import DeviceUrl, SshDevice, SshRunner, check_device
from tests.sshd import Sshd, start_sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def artifact(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ssh-art") / "rpi4"
    code = main(["--target", "rpi4", "--model", str(tiny_models["llama"]), "--out", str(out), "--precision", "fp32",
                 "--no-emulate", "--threads", "1"])
    assert code == 0
    return out


def _dev(sshd: Sshd, **kw: object) -> list[str]:
    args = {"--device": sshd.url(), "--identity": str(sshd.key), "--known-hosts": str(sshd.known_hosts)}
    args.update({k: str(v) for k, v in kw.items()})
    return [x for k, v in args.items() for x in (k, v)]


def _no_remote_runs(sshd: Sshd, workdir: Path | None = None) -> bool:
    runs = (workdir or sshd.root / "remote") / "runs"
    artifacts = (workdir or sshd.root / "remote") / "artifacts"
    partial = list(artifacts.glob("*.partial-*")) if artifacts.is_dir() else []
    return (not runs.is_dir() or not any(runs.iterdir())) and not partial


def test_device_run_matches_the_host_run(sshd: Sshd, artifact: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    goals = tmp_path / "goals.toml"
    goals.write_text("[device_agreement_with_host]\nmin = 1.0\n[device_greedy_equals_host]\nequals = true\n"
                     "[perplexity_change_pct]\nmax = 0.1\nwhy = \"float32 export\"\n")
    junit = tmp_path / "results.xml"
    code = main(["validate", str(artifact), "--json", "--threads", "1", "--goals", str(goals), "--junit", str(junit),
                 *_dev(sshd)])
    report = json.loads(capsys.readouterr().out)
    assert code == 0, report["goals"]
    m = report["metrics"]
    # the same windows on the device and the host: float32 gives the same tokens and the same perplexity
    assert m["device_agreement_with_host"]["value"] == 1.0
    assert m["device_greedy_equals_host"]["value"] is True
    assert m["device_perplexity"]["value"] == pytest.approx(m["perplexity"]["value"], rel=1e-6)
    where = m["device_perplexity"]["where"]
    assert "measured on device" in where
    assert f"127.0.0.1:{sshd.port}" in where
    assert "onnxruntime" in where
    assert m["device_decode_fraction_of_roofline"]["value"] > 0
    device = report["device"][0]
    assert device["environment"]["machine"] == "x86_64"
    assert device["uploaded"] is True
    assert device["overhead_s"] >= 0
    assert [g["metric"] for g in report["goals"]] == ["device_agreement_with_host", "device_greedy_equals_host",
                                                      "perplexity_change_pct"]
    xml = junit.read_text()
    assert xml.count("<testcase") == 3
    assert "<failure" not in xml
    assert _no_remote_runs(sshd)
    # the same artifact again: nothing uploaded
    main(["validate", str(artifact), "--json", "--threads", "1", *_dev(sshd)])
    assert json.loads(capsys.readouterr().out)["device"][0]["uploaded"] is False
    assert str(sshd.key) not in (artifact / "report.json").read_text()  # no key material or paths in the report


def test_devices_check(sshd: Sshd, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "check", sshd.url(), "--identity", str(sshd.key), "--known-hosts",
                 str(sshd.known_hosts), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["reachable"] is True
    assert info["runtimes"]["onnxruntime"]
    assert info["runtimes"]["executorch"] is None
    assert info["free_disk_gb"] > 0
    assert info["memory_gb"] > 0


@pytest.mark.parametrize(("change", "message"), [
    ("wrong key", "authentication refused"),
    ("unknown host", "not in known_hosts"),
    ("runtime missing", "runtime is missing on the device"),
    ("hangs", "timed out after 2 s"),
    ("unreachable", "unreachable"),
])
def test_device_faults_are_device_errors(change: str, message: str, sshd: Sshd, artifact: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    before = (artifact / "report.json").read_bytes()
    kw: dict[str, object] = {}
    if change == "wrong key":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
        kw["--identity"] = tmp_path / "other"
    elif change == "unknown host":
        (tmp_path / "empty").write_text("")
        kw["--known-hosts"] = tmp_path / "empty"
    elif change == "runtime missing":
        kw["--device"] = sshd.url(python="/usr/bin/python3")  # the system Python: no NumPy, no ONNX Runtime
    elif change == "hangs":  # a device Python that never answers
        hang = tmp_path / "hanging-python"
        hang.write_text("#!/bin/sh\nexec sleep 60\n")
        hang.chmod(0o755)
        kw["--device"] = sshd.url(python=str(hang))
        kw["--device-timeout"] = 2
    else:
        kw["--device"] = sshd.url().replace(f":{sshd.port}", ":9")  # nothing listens on the discard port
    code = main(["validate", str(artifact), "--threads", "1", *_dev(sshd, **kw)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert message in err
    assert "Traceback" not in err
    if change == "unknown host":
        assert "SHA256:" in err  # the fingerprint, and how to accept it
        assert "ssh-keyscan -p" in err
    assert (artifact / "report.json").read_bytes() == before  # no half-written local report
    assert _wait_for(lambda: _no_remote_runs(sshd), 10)


def test_full_remote_disk(sshd: Sshd, artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(small)], check=True)
    try:
        code = main(["validate", str(artifact), "--threads", "1", *_dev(sshd, **{"--device": sshd.url(small)})])
        err = capsys.readouterr().err
        assert code == 3
        assert "out of disk space" in err
        assert _no_remote_runs(sshd, small)
        assert not list((small / "artifacts").glob("*")) if (small / "artifacts").is_dir() else True
    finally:
        subprocess.run(["umount", str(small)], check=True)


def _wait_for(pred: object, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_dropped_connection_during_upload_and_run(sshd: Sshd, artifact: Path, tmp_path: Path) -> None:
    """sshd killed while the artifact uploads, then while the runner runs: DeviceErrors; no half-copied
    artifact is used afterwards, and the device removes what the runs left."""
    import shutil

    big = tmp_path / "big"
    shutil.copytree(artifact, big)
    with open(big / "model.onnx.data", "ab") as f:  # past every tensor's offset: the model is unchanged
        f.write(b"\0" * (400 << 20))
    workdir = tmp_path / "remote"
    device = SshDevice(DeviceUrl.parse(sshd.url(workdir)), str(sshd.key), str(sshd.known_hosts))
    runner = SshRunner(device)
    job = {"schema": 1, "model": "model.onnx", "threads": 1, "windows": [[3, 9, 27, 81, 243, 100]],
           "greedy_prompt": [3, 9, 27], "greedy_tokens": 4}
    killer = threading.Thread(target=lambda: _wait_for(lambda: list((workdir / "artifacts").glob("*.partial-*")))
                              and sshd.stop())
    killer.start()
    with pytest.raises(DeviceError, match="dropped|failed|unreachable"):
        runner.run(big, job)
    killer.join()
    sshd.start()
    assert _wait_for(lambda: _no_remote_runs(sshd, workdir), 10)
    assert not [p for p in (workdir / "artifacts").glob("*") if not (p / ".complete").exists()]
    # the run: killed once the runner has started on the device
    killer = threading.Thread(target=lambda: _wait_for(lambda: list((workdir / "runs").glob("*/result.json.partial"))
                                                       or list((workdir / "runs").glob("*/runner.log")))
                              and sshd.stop())
    killer.start()
    with pytest.raises(DeviceError):
        runner.run(big, job)
    killer.join()
    sshd.start()
    assert _wait_for(lambda: _no_remote_runs(sshd, workdir), 30)
    result = runner.run(big, job)  # the artifact on the device is whole: the next run uses it
    assert result["ok"]
    assert runner.last["uploaded"] is False


def test_hostile_names_do_not_reach_a_shell(sshd: Sshd, tmp_path: Path) -> None:
    canary = tmp_path / "pwned"
    for bad in (f"ssh://root@127.0.0.1:{sshd.port};touch {canary}", "ssh://-oProxyCommand=touch@x",
                "ssh://r$(touch x)@127.0.0.1"):
        with pytest.raises(Exception, match="device"):
            DeviceUrl.parse(bad)
    hostile = tmp_path / "w $(touch PWNED) ; `touch PWNED2`'\""
    device = SshDevice(DeviceUrl.parse(sshd.url(hostile)), str(sshd.key), str(sshd.known_hosts))
    info = check_device(device)
    assert info["reachable"]
    device.run(["mkdir", "-p", str(hostile / ("x; touch " + str(canary)))])
    assert (hostile / ("x; touch " + str(canary))).is_dir()
    assert not canary.exists()
    assert not list(Path.home().glob("PWNED*"))


def test_device_power_sensor_gives_measured_energy(sshd: Sshd, artifact: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """A device exposing a Jetson's INA3221 rails (a fake sysfs tree, named by the URL's ``sysfs``): the report's
    energy per token is the rail's power over the device's measured time per token."""
    rails = tmp_path / "sys/bus/i2c/drivers/ina3221x/0-0041/iio:device1"
    rails.mkdir(parents=True)
    for n, (name, mw) in enumerate({"VDD_IN": 4200, "VDD_SYS_CPU": 1500}.items()):
        (rails / f"rail_name_{n}").write_text(name + "\n")
        (rails / f"in_power{n}_input").write_text(f"{mw}\n")
    args = _dev(sshd, **{"--device": sshd.url() + f"&sysfs={tmp_path / 'sys'}"})
    assert main(["validate", str(artifact), "--json", "--threads", "1", *args]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert m["device_power_w"]["value"] == pytest.approx(4.2)
    assert "VDD_IN" in m["device_power_w"]["where"]
    assert "measured on device" in m["device_power_w"]["where"]
    energy = m["energy_per_token_j"]
    assert energy["source"] == "measured"
    assert energy["value"] == pytest.approx(4.2 / m["device_decode_tokens_per_s_p50"]["value"])
