"""Never lose a user's files, never certify a changed artifact: the output-folder rules, the lock, stale partial
folders, failed runs beside passing ones, disk space, and the integrity record that ``validate`` checks first."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_export.cli import main
from slm_export.errors import ConfigError, IntegrityError
from tests.conftest import run_cli as _run

QUICK = ["--target", "host", "--precision", "fp32", "--eval-windows", "1", "--timing-tokens", "4", "--threads", "1"]



@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import make_tiny_model

    return make_tiny_model("llama", tmp_path_factory.mktemp("m") / "tiny-llama")


@pytest.fixture(scope="module")
def artifact(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One passing fp32 artifact; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("a") / "art"
    assert main([*QUICK, "--model", str(model), "--out", str(out)]) == 0
    return out


def _copy(artifact: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(artifact, dest)
    return dest


def _user_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


# -- case 1: --out pointed at a folder the tool did not write ------------------------------------------------

def test_user_folder_is_refused_and_kept(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    (d / "src").mkdir(parents=True)
    (d / "thesis.txt").write_text("x")
    (d / "src" / "main.py").write_text("print(1)")
    before = _user_files(d)
    code, out = _run([*QUICK, "--model", model, "--out", d], capsys)
    assert code == 2, out
    assert "is not an slm-export artifact" in out
    assert "--force" in out
    assert _user_files(d) == before
    assert not list(tmp_path.glob(".d.*"))


def test_force_replaces_a_user_folder(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "old.txt").write_text("x")
    code, out = _run([*QUICK, "--model", model, "--out", d, "--force"], capsys)
    assert code == 0, out
    assert not (d / "old.txt").exists()
    assert (d / "artifact.json").is_file()


def test_artifact_holding_user_files_is_refused(artifact: Path, model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    art = _copy(artifact, tmp_path)
    (art / "my-notes.txt").write_text("keep me")
    code, out = _run([*QUICK, "--model", model, "--out", art], capsys)
    assert code == 2, out
    assert "my-notes.txt" in out
    assert (art / "my-notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(("where", "expected"), [
    ("/", "filesystem root"),
    (".", "current folder"),
    ("..", "current folder"),
    ("~", "home folder"),
    ("model", "holds this run's input"),
    ("model-parent", "holds this run's input"),
])
def test_never_replaceable_even_with_force(where: str, expected: str, model: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    (home / "keep.txt").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    target = {"model": str(model), "model-parent": str(model.parent)}.get(where, where)
    for force in ([], ["--force"]):
        code, out = _run([*QUICK, "--model", model, "--out", target, *force], capsys)
        assert code == 2, out
        assert expected in out
        assert "internal error" not in out
    assert (work / "keep.txt").read_text() == "x"
    assert (home / "keep.txt").read_text() == "x"
    assert (model / "config.json").is_file()


def test_empty_folder_and_our_artifact_are_written(artifact: Path, model: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run([*QUICK, "--model", model, "--out", empty], capsys)[0] == 0
    again = _copy(artifact, tmp_path)
    code, out = _run([*QUICK, "--model", model, "--out", again], capsys)
    assert code == 0, out
    report = json.loads((again / "report.json").read_text())
    assert report["output"]["replaced"] == "artifact"


# -- case 3: a failing run never replaces a passing artifact ---------------------------------------------------

def test_failing_run_lands_beside_a_passing_artifact(artifact: Path, model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    art = _copy(artifact, tmp_path)
    before = (art / "report.json").read_bytes()
    goals = tmp_path / "hard.toml"
    goals.write_text("[decode_tokens_per_s_p50]\nmin = 1e15\n")
    code, out = _run([*QUICK, "--model", model, "--out", art, "--goals", goals], capsys)
    assert code == 1, out
    failed = tmp_path / "copy.failed"
    assert f"this run's artifact is in {failed}" in out
    assert (art / "report.json").read_bytes() == before
    assert json.loads((failed / "report.json").read_text())["verdict"] == "FAIL"
    # a second failing run replaces the earlier failed artifact, still not the passing one
    code, _ = _run([*QUICK, "--model", model, "--out", art, "--goals", goals], capsys)
    assert code == 1
    assert (art / "report.json").read_bytes() == before


# -- case 6: partial folders of killed runs --------------------------------------------------------------------

def test_stale_partial_folders_are_removed_and_reported(model: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.partial-{dead.pid}"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.onnx.data").write_bytes(b"\0" * 4096)
    alive = tmp_path / f".out.partial-{os.getppid()}"  # a live process's folder is not ours to remove
    alive.mkdir()
    unrelated = tmp_path / ".other.partial-1"
    unrelated.mkdir()
    code, out = _run([*QUICK, "--model", model, "--out", tmp_path / "out", "--json"], capsys)
    assert code == 0, out
    assert not stale.exists()
    assert alive.exists()
    assert unrelated.exists()
    report, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
    assert any(str(stale) in n and "interrupted run" in n for n in report["notes"])


# -- case 12: two runs on one --out ----------------------------------------------------------------------------

def test_second_run_on_the_same_out_fails_naming_the_first(model: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; from pathlib import Path; from slm_export.output import OutputLock\n"
        f"lock = OutputLock(Path({str(tmp_path / 'out')!r})); lock.acquire(); print('held', flush=True)\n"
        "sys.stdin.read()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        code, out = _run([*QUICK, "--model", model, "--out", tmp_path / "out"], capsys)
        assert code == 2, out
        assert f"another slm-export run (pid {holder.pid})" in out
        assert not (tmp_path / "out").exists()
    finally:
        holder.communicate("", timeout=30)
    # once the holder is gone (its lock released by the kernel even if it had died), a run goes through
    assert _run([*QUICK, "--model", model, "--out", tmp_path / "out"], capsys)[0] == 0
    assert not (tmp_path / ".out.lock").exists()


# -- cases 8 and 9: user errors that exited 4 or were found late ----------------------------------------------

@pytest.mark.parametrize(("extra", "expected"), [
    (["--threads", "-3"], "at least 0, not '-3'"),
    (["--precision", "int4", "--method", "rtn", "--calib-samples", "-1"], "--calib-samples must be at least 1"),
    (["--precision", "int4", "--group-size", "7"], "--group-size must be a power of two"),
    (["--group-size", "7"], "--group-size must be a power of two"),  # out of range, even where it is not read
    (["--sparsity", "unstructured", "--sparsity-ratio", "1.5"], "--sparsity-ratio must be in (0, 1)"),
    (["--device-timeout", "-1"], "expected a positive number, not '-1'"),
])
def test_options_refused_before_any_work(extra: list[str], expected: str, model: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import slm_export.models

    monkeypatch.setattr(slm_export.models, "load_model", _no_work)
    code, out = _run([*QUICK, "--model", model, "--out", tmp_path / "o", *extra], capsys)
    assert code == 2, out
    assert expected in out
    assert "Traceback" not in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("extra", "expected"), [
    (["--group-size", "64"], "--group-size applies to weight-only int8 and int4; this plan (fp32) does not read it"),
    (["--precision", "int4", "--method", "rtn", "--calib-samples", "8"], "--calib-samples applies to methods that "
     "calibrate"),
    (["--sparsity-ratio", "0.3"], "--sparsity-ratio applies to --sparsity unstructured"),
])
def test_options_the_plan_ignores_are_warned(extra: list[str], expected: str, model: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run([*QUICK, "--model", model, "--out", tmp_path / "o", "--dry-run", *extra], capsys)
    assert code == 0, out
    assert f"warning: {expected}" in out
    plan = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]["plan"]
    assert any(expected in n for n in plan["notes"])


def _no_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("the model was loaded before the bad input was refused")


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.write_text(""), "is empty"),
    (lambda p: p.write_bytes(b"text\0\x01\x02binary"), "binary"),
    (lambda p: p.mkdir(), "is a folder"),
])
def test_eval_data_checked_before_load(make: object, expected: str, model: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import slm_export.models

    monkeypatch.setattr(slm_export.models, "load_model", _no_work)
    bad = tmp_path / "eval.txt"
    make(bad)  # type: ignore[operator]
    code, out = _run([*QUICK, "--model", model, "--out", tmp_path / "o", "--eval-data", bad], capsys)
    assert code == 2, out
    assert expected in out
    assert not (tmp_path / "o").exists()


# -- case 7: disk full -----------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path: Path) -> object:
    """A real tmpfs of a given size (root with mount rights only)."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        if shutil.which("mount") is None or os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root and mount(8)")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_too_little_space_is_refused_up_front(model: Path, small_disk: object,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    disk = small_disk("200k")  # type: ignore[operator]
    code, out = _run([*QUICK, "--model", model, "--out", disk / "o"], capsys)
    assert code == 3, out
    assert "not enough disk space" in out
    assert "MB needed" in out
    assert os.listdir(disk) == []


def test_disk_full_mid_run_is_named(model: Path, small_disk: object, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    import slm_export.output

    monkeypatch.setattr(slm_export.output, "check_space", lambda folder, needed: None)  # let the run start
    disk = small_disk("700k")  # type: ignore[operator]
    code, out = _run([*QUICK, "--model", model, "--out", disk / "o"], capsys)
    assert code == 3, out
    assert f"disk full while writing the artifact in {disk}" in out
    assert "onnxruntime" not in out.lower().split("disk full")[0]
    assert os.listdir(disk) == []


# -- cases 2 and 11: integrity and validate ---------------------------------------------------------------------

def test_manifest_records_every_file(artifact: Path) -> None:
    manifest = json.loads((artifact / "artifact.json").read_text())
    on_disk = {p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()} - {"artifact.json"}
    assert set(manifest["integrity"]["files"]) == on_disk
    assert Path(manifest["source_model"]).is_absolute()
    report = json.loads((artifact / "report.json").read_text())
    assert set(report["integrity"]["files"]) == on_disk - {"report.json", "report.md", "report.html"}
    assert report["integrity"]["hashed_at"]


def test_any_flipped_byte_is_found(artifact: Path, tmp_path: Path) -> None:
    """Every file of the artifact, a sample of offsets each (first, last, middle and seeded ones)."""
    import random

    from slm_export.revalidate import load_manifest

    art = _copy(artifact, tmp_path)
    load_manifest(art)  # the untouched copy passes
    rng = random.Random(0)
    checked = 0
    for path in sorted(p for p in art.rglob("*") if p.is_file()):
        data = path.read_bytes()
        offsets = {0, len(data) - 1, len(data) // 2, *(rng.randrange(len(data)) for _ in range(6))}
        for off in sorted(offsets):
            for mask in (0x01, 0x20, 0xFF):
                bad = bytearray(data)
                bad[off] ^= mask
                path.write_bytes(bytes(bad))
                with pytest.raises(IntegrityError):
                    load_manifest(art)
                checked += 1
        path.write_bytes(data)
    load_manifest(art)
    assert checked > 100


def test_validate_exits_5_on_a_changed_file(artifact: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    art = _copy(artifact, tmp_path)
    data = bytearray((art / "model.onnx.data").read_bytes())
    data[65536:65536 + 64] = b"\x7f" * 64
    (art / "model.onnx.data").write_bytes(bytes(data))
    before = (art / "report.json").read_bytes()
    code, out = _run(["validate", art], capsys)
    assert code == 5, out
    assert "model.onnx.data changed since export" in out
    assert (art / "report.json").read_bytes() == before


def test_validate_from_another_folder_finds_the_model(artifact: Path, model: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    art = _copy(artifact, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out = _run(["validate", art, "--eval-windows", "1", "--timing-tokens", "4", "--threads", "1"], capsys)
    assert code == 0, out
    # validate rewrote the reports and sealed them again: a second validate passes the integrity check
    from slm_export.revalidate import load_manifest

    load_manifest(art)
    assert json.loads((art / "report.json").read_text())["validated_file"] == \
        json.loads((artifact / "report.json").read_text())["validated_file"]


def _unsealed(artifact: Path, tmp_path: Path) -> Path:
    """A copy whose manifest has no integrity record, as an older version wrote it."""
    art = _copy(artifact, tmp_path)
    manifest = json.loads((art / "artifact.json").read_text())
    manifest.pop("integrity")
    manifest.pop("manifest_sha256")
    (art / "artifact.json").write_text(json.dumps(manifest, indent=2))
    return art


@pytest.mark.parametrize("where", ["../other/model.onnx", "/etc/passwd", "sub/../../x.onnx"])
def test_validate_refuses_files_outside_the_artifact(where: str, artifact: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    art = _unsealed(artifact, tmp_path)
    report = json.loads((art / "report.json").read_text())
    report["validated_file"] = where
    (art / "report.json").write_text(json.dumps(report))
    code, out = _run(["validate", art], capsys)
    assert code == 2, out
    assert "not inside the artifact folder" in out


def test_corrupt_report_of_an_unsealed_artifact_is_a_user_error(artifact: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    art = _unsealed(artifact, tmp_path)
    (art / "report.json").write_text('{"plan": {"target": 3')
    code, out = _run(["validate", art], capsys)
    assert code == 2, out
    assert "report.json is corrupt" in out


# -- report.json parsing never ends in anything but ConfigError --------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                   max_size=4), max_leaves=12)


@settings(max_examples=2000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_report_parser_fuzz(artifact: Path, data: st.DataObject) -> None:
    from slm_export.plan import Plan
    from slm_export.revalidate import _inside_or_refuse, parse_report

    real = json.loads((artifact / "report.json").read_text())
    kind = data.draw(st.sampled_from(["bytes", "json", "field", "plan-field"]))
    if kind == "bytes":
        raw: bytes | str = data.draw(st.binary(max_size=64))
    elif kind == "json":
        raw = json.dumps(data.draw(_json))
    elif kind == "field":
        key = data.draw(st.sampled_from(["plan", "target", "backends", "validated_file", "stages", "roofline"]))
        raw = json.dumps({**real, key: data.draw(_json)})
    else:
        key = data.draw(st.sampled_from(sorted(real["plan"])))
        raw = json.dumps({**real, "plan": {**real["plan"], key: data.draw(_json)}})
    try:
        report = parse_report(raw)
        plan = report.get("plan")
        if plan:
            Plan.from_dict(plan)
        _inside_or_refuse(artifact, report.get("validated_file"), "the file it validated")
    except ConfigError:
        pass


def test_sigterm_exits_143(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "slm_export.cli", *QUICK, "--model", str(model), "--out",
                             str(out)], stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stderr is not None
    deadline = time.time() + 120
    for line in proc.stderr:
        if "export: start" in line:
            break
        assert time.time() < deadline
    proc.terminate()
    rest = proc.stderr.read()
    assert proc.wait(timeout=60) == 143, rest
    assert not out.exists()
    assert not list(tmp_path.glob(".o.*"))
