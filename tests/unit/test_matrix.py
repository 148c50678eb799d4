"""`slm-export matrix`: the file's keys and values checked against the option declarations before any cell runs,
cells expanded with their overrides, and a real small matrix of tiny models on a local Ray cluster: a cell that
fails at run time while the others pass, a re-run that skips unchanged cells, a changed option that re-runs its
cell, and the comparison report."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from slm_export.matrix.compare import pareto
from slm_export.matrix.spec import read_matrix
from tests.conftest import run_cli as _run

FAST = """
[options]
eval-windows = 1
timing-tokens = 4
"""



@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.conftest import make_tiny_model

    root = tmp_path_factory.mktemp("models")
    return {a: make_tiny_model(a, root / f"tiny-{a}") for a in ("llama", "qwen2")}


def _write(folder: Path, body: str) -> Path:
    path = folder / "matrix.toml"
    path.write_text(textwrap.dedent(body))
    return path


def _head(models: dict[str, Path], precisions: str = '["fp32", "int4"]') -> str:
    return (f'out = "out"\nmodels = ["{models["llama"]}", "{models["qwen2"]}"]\ntargets = ["host"]\n'
            f"precisions = {precisions}\n")


# -- the file, checked before any work ------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "expected"), [
    ('[options]\ngroup-sise = 64\n', "unknown option 'group-sise'; did you mean 'group-size'?"),
    ('[options]\ngroup-size = 48\n', "group-size must be a power of two >= 16, not 48"),
    ('[options]\ngroup-size = "big"\n', "group-size: expected a whole number, not 'big'"),
    ('[options]\nlm-head-bits = 3\n', "lm-head-bits must be one of 0, 4, 8, not 3"),
    ('[options]\nsymmetric = "yes"\n', "symmetric must be true or false"),
    ('[options]\neval-windows = 0\n', "eval-windows: expected a whole number of at least 1, not '0'"),
    ('[options]\nprecision = "int8"\n', "an axis of the matrix"),
    ('[optoins]\n', "unknown key 'optoins'; did you mean 'options'?"),
    ('[[override]]\nprecision = "int3"\ngroup-size = 64\n', "selects no cell of the matrix"),
    ('[[override]]\nprecision = "int4"\ngroup-size = 17\n', "[[override]] #1: group-size must be a power of two"),
    ('methods = ["rtm"]\n', "methods: unknown value 'rtm'; did you mean 'rtn'?"),
])
def test_bad_keys_and_values_are_refused_before_any_cell(body: str, expected: str, models: dict[str, Path],
                                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, _head(models) + body)
    code, out = _run(["matrix", path], capsys)
    assert code == 2, out
    assert expected in out, out
    assert "Traceback" not in out
    assert not (tmp_path / "out").exists()  # refused before the out folder or any cell was made


def test_a_user_folder_is_never_the_matrix_out(models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    code, out = _run(["matrix", _write(tmp_path, _head(models))], capsys)
    assert code == 2
    assert "is not a matrix's out folder" in out
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"


def test_cells_expand_with_overrides_in_file_order(models: dict[str, Path], tmp_path: Path) -> None:
    body = _head(models, '["fp32", "int8", "int4"]') + textwrap.dedent("""
        methods = { int4 = ["rtn", "gptq"] }
        [options]
        group-size = 64
        eval-windows = 2
        no-validate = true
        [[override]]
        precision = "int4"
        group-size = 128
        [[override]]
        model = "tiny-qwen2"
        method = ["gptq"]
        group_size = 32
        calib-samples = 4
        """)
    spec = read_matrix(_write(tmp_path, body))
    got = {c.label: c for c in spec.cells}
    assert len(got) == 2 * (1 + 1 + 2)  # fp32, int8 (its default method), int4 x 2 methods, per model
    assert got["tiny-llama x host x int4 x gptq"].plan["group_size"] == 128
    assert got["tiny-qwen2 x host x int4 x gptq"].plan["group_size"] == 32  # the later override wins
    assert got["tiny-qwen2 x host x int4 x gptq"].plan["calib_samples"] == 4
    assert got["tiny-qwen2 x host x int4 x rtn"].plan["group_size"] == 128
    assert got["tiny-llama x host x fp32"].plan == {"group_size": 64, "validate": False}
    assert got["tiny-llama x host x fp32"].settings == {"windows": 2}
    assert spec.out == (tmp_path / "out").resolve()


def test_pareto_front() -> None:
    # (speed, ppl change): bigger speed better, lower change better
    pts = [(10.0, 1.0), (20.0, 2.0), (15.0, 3.0), (5.0, 0.5), (20.0, 2.5)]
    assert pareto(pts, bigger_x_better=True) == {0, 1, 3}
    # (size, ppl change): smaller size better
    assert pareto([(1.0, 3.0), (2.0, 1.0), (3.0, 2.0)], bigger_x_better=False) == {0, 1}


# -- a real matrix on a local Ray cluster ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster() -> object:
    """One local cluster for the module (the command uses a Ray already started in its process), with a worker
    per core reused across the runs below: its start and the workers' imports are paid once."""
    ray = pytest.importorskip("ray")
    from slm_export.matrix.cluster import cluster

    with cluster(None) as r:
        yield r
    assert not ray.is_initialized()


def test_matrix_runs_fails_one_cell_skips_and_reruns(ray_cluster: object, models: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "short.txt").write_text("too short")  # fewer tokens than one window: found after load
    body = _head(models) + 'methods = ["rtn"]\n' + FAST + textwrap.dedent("""
        [[override]]
        model = "tiny-qwen2"
        precision = "fp32"
        eval-data = "short.txt"
        """)
    path = _write(tmp_path, body)
    code, out = _run(["matrix", path], capsys)
    out_dir = tmp_path / "out"
    rows = {r["cell"]: r for r in json.loads((out_dir / "matrix.json").read_text())["cells"]}
    assert set(rows) == {"tiny-llama-host-fp32", "tiny-llama-host-int4-rtn", "tiny-qwen2-host-fp32",
                         "tiny-qwen2-host-int4-rtn"}, out
    failed = rows["tiny-qwen2-host-fp32"]
    assert failed["status"] == "failed", out
    assert "evaluation" in failed["message"], failed
    assert failed["exit_code"] == 2, failed
    assert code == 2, out  # the worst cell's code
    assert not (out_dir / "tiny-qwen2-host-fp32").exists()  # a failed cell leaves no folder
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")], list(out_dir.iterdir())  # nor a partial
    for name in ("tiny-llama-host-fp32", "tiny-llama-host-int4-rtn", "tiny-qwen2-host-int4-rtn"):
        row = rows[name]
        assert row["status"] == "passed", row
        assert row["ppl_change_pct"] is not None, row
        assert row["decode_tok_s"] > 0, row
        assert row["size_mb"] > 0, row
        assert (out_dir / row["report"]).is_file()
        record = json.loads((out_dir / name / "matrix-cell.json").read_text())
        sealed = json.loads((out_dir / name / "artifact.json").read_text())["integrity"]["files"]
        assert "matrix-cell.json" in sealed
        assert record["cell"] == name
    assert rows["tiny-llama-host-int4-rtn"]["size_mb"] < rows["tiny-llama-host-fp32"]["size_mb"]
    _check_comparison(out_dir, rows)

    # The same file again, the failing cell fixed: the three passed cells are skipped, the fixed one runs.
    (tmp_path / "short.txt").write_text(Path(__file__).read_text() * 20)
    code, out = _run(["matrix", path], capsys)
    rows = {r["cell"]: r for r in json.loads((out_dir / "matrix.json").read_text())["cells"]}
    assert code == 0, out
    assert [n for n, r in rows.items() if r["status"] == "skipped"] == [
        "tiny-llama-host-fp32", "tiny-llama-host-int4-rtn", "tiny-qwen2-host-int4-rtn"], out
    assert rows["tiny-qwen2-host-fp32"]["status"] == "passed", out
    assert rows["tiny-llama-host-fp32"]["decode_tok_s"] > 0  # a skipped cell's figures still in the table

    # A changed option re-runs only the cells it reaches; a tampered artifact is not trusted.
    path.write_text(body.replace("timing-tokens = 4", "timing-tokens = 4\n[[override]]\nprecision = \"int4\"\n"
                                 "group-size = 16"))
    model_file = out_dir / "tiny-llama-host-fp32" / "config.json"
    model_file.write_text(model_file.read_text() + " ")
    code, out = _run(["matrix", path], capsys)
    rows = {r["cell"]: r for r in json.loads((out_dir / "matrix.json").read_text())["cells"]}
    assert code == 0, out
    assert {n: r["status"] for n, r in rows.items()} == {
        "tiny-llama-host-fp32": "passed", "tiny-llama-host-int4-rtn": "passed", "tiny-qwen2-host-fp32": "skipped",
        "tiny-qwen2-host-int4-rtn": "passed"}, out
    assert "tiny-llama-host-int4-rtn: runs again (options changed)" in out
    plan = json.loads((out_dir / "tiny-llama-host-int4-rtn" / "report.json").read_text())["plan"]
    assert plan["group_size"] == 16


def _check_comparison(out_dir: Path, rows: dict[str, dict[str, object]]) -> None:
    md = (out_dir / "matrix.md").read_text()
    assert "| host | tiny-qwen2 | fp32 |  | failed: " in md
    assert "[report](tiny-llama-host-int4-rtn/report.html)" in md
    html = (out_dir / "matrix.html").read_text()
    assert html.count("<svg id='speed-host'") == 1
    assert html.count("<svg id='size-host'") == 1
    # one point per cell that measured both figures, each a link to its report; the front has at least one
    assert html.count("<a href='tiny-llama-host-int4-rtn/report.html'><circle") == 2
    assert html.count("<circle") == 2 * 3
    assert "class=front " in html


def test_without_ray_the_command_says_how_to_install(models: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, out = _run(["matrix", _write(tmp_path, _head(models) + FAST)], capsys)
    assert code == 3, out
    assert "pip install 'slm-export[matrix]'" in out
