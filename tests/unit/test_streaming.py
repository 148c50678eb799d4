"""The streaming load (``models/lazy.py``): a safetensors model read tensor by tensor gives the same artifact and the
same reference as one held in memory, for every family whose checkpoint names are the module's, and the parts
that stream hold no weight they are not using.

Each family's tiny model makes its layout bite: a tied head (llama, smollm3, granite), Gemma's ``1 + w`` norms, Phi-3's
fused q/k/v and gate/up (row slices of one stored tensor), GPT-2's Conv1D (transposed), OPT's projections."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from slm_export.models import load_model
from slm_export.models.lazy import LazyTensor, LazyWeights
from tests.families import FAMILIES, VARIANTS, make_family_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 42, 7, 11, 64, 200, 31, 9]])
# gpt_neox's checkpoints name the head embed_out (transformers renames it): that family loads held, not streamed.
RENAMED = ("gpt_neox", "gpt_neox-sequential")
STREAMED = [n for n in (*FAMILIES, *VARIANTS) if n not in RENAMED]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    return {name: make_family_model(name, root / name) for name in (*STREAMED, "gpt_neox")}


def _digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.onnx").read_bytes() + (folder / "model.onnx.data").read_bytes()).hexdigest()


@pytest.mark.parametrize("name", STREAMED)
def test_streamed_export_and_reference_equal_the_held_ones(name: str, models: dict[str, Path], tmp_path: Path) -> None:
    from slm_export.exporters.onnx import OnnxExporter
    from slm_export.planning import make_plan
    from slm_export.targets import get_target

    digests, logits = [], []
    for stream in (False, True):
        model = load_model(str(models[name]), stream)
        assert model.streamed is stream
        out = tmp_path / f"out-{stream}"
        out.mkdir()
        plan = make_plan(get_target("host"), model=str(models[name]), out=tmp_path / f"plan-{stream}", precision="fp32")
        OnnxExporter().export(model, plan, out)
        digests.append(_digest(out))
        with torch.no_grad():
            logits.append(model.torch_module()(IDS).logits)
    assert digests[0] == digests[1], f"{name}: the streamed export differs from the held one"
    assert torch.equal(logits[0], logits[1]), f"{name}: the streamed reference differs"


def test_streamed_reference_holds_no_weight_between_blocks(models: dict[str, Path]) -> None:
    """Outside a block's forward its parameters are on the meta device: a forward holds one block at a time."""
    model = load_model(str(models["qwen2"]), True)
    module = model.torch_module()
    seen: list[int] = []

    def count(*_: object) -> None:
        seen.append(sum(1 for p in module.parameters() if p.device.type != "meta"))

    for layer in module.model.layers:
        layer.register_forward_pre_hook(count)
    with torch.no_grad():
        module(IDS)
    assert all(p.device.type == "meta" for p in module.parameters())
    per_layer = sum(1 for _ in module.model.layers[0].parameters())
    # inside layer i's pre-hook (after its own load ran first): at most that layer's parameters are real
    assert seen, "no layer ran"
    assert max(seen) <= per_layer, seen


def test_lazy_weights_read_each_time_and_keep_nothing(models: dict[str, Path]) -> None:
    model = load_model(str(models["llama"]), True)
    w = model.weights
    assert isinstance(w, LazyWeights)
    a, b = w["model.embed_tokens.weight"], w["model.embed_tokens.weight"]
    assert torch.equal(a, b)
    assert a.data_ptr() != b.data_ptr()
    assert w.source("lm_head.weight") == "model.embed_tokens.weight"  # the tied head is the embedding's tensor
    held = load_model(str(models["llama"]), False)
    assert model.weight_bytes == held.weight_bytes
    assert model.shapes() == held.shapes()


def test_lazy_tensor_slices_and_transposes_read_late() -> None:
    reads: list[str] = []

    class Source(dict):  # type: ignore[type-arg]
        def __getitem__(self, key: str) -> torch.Tensor:
            reads.append(key)
            return torch.arange(12, dtype=torch.float32).reshape(4, 3)

    t = LazyTensor(Source(), "w", (4, 3))
    part = t[1:3].T
    assert part.shape == (3, 2)
    assert not reads
    assert np.array_equal(np.asarray(part), np.arange(12, dtype=np.float32).reshape(4, 3)[1:3].T)
    assert reads == ["w"]
    assert np.array_equal(t + 1.0, np.arange(12, dtype=np.float32).reshape(4, 3) + 1)


def test_renamed_checkpoint_is_held_and_the_report_says_so(models: dict[str, Path], tmp_path: Path) -> None:
    """gpt_neox's head is stored under another name than the module's: no stream, a note instead of a failure."""
    from slm_export import ValidationSettings, export

    assert not load_model(str(models["gpt_neox"]), True).streamed
    settings = ValidationSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=8, decode_tokens=4,
                                  repeats=1, threads=1)
    result = export(str(models["gpt_neox"]), "host", tmp_path / "out", "fp32", settings=settings, stream="on")
    assert any("not streamed" in n for n in result.report["notes"]), result.report["notes"]


@pytest.mark.parametrize(("precision", "method"), [("fp32", None), ("int4", "rtn"), ("int4", "awq-gptq")])
def test_streamed_run_gives_the_held_runs_artifact(precision: str, method: str | None, models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    """The whole flow, validation included: the same weights file and the same figures, streamed or not."""
    from slm_export import ValidationSettings, export

    settings = ValidationSettings(windows=1, window_len=64, greedy_tokens=4, prompt_tokens=8, decode_tokens=4,
                                  repeats=1, threads=1)
    options = {"method": method, "calib_samples": 4, "calib_seqlen": 32} if method else {}
    figures = []
    for stream in ("off", "on"):
        result = export(str(models["llama"]), "host", tmp_path / stream, precision, settings=settings, stream=stream,
                        **options)
        m = result.report["metrics"]
        data = (Path(result.out) / "model.onnx.data").read_bytes()
        figures.append((hashlib.sha256(data).hexdigest(), m["perplexity_change_pct"]["value"],
                        m["greedy_matching_prefix"]["value"]))
    assert figures[0] == figures[1]


def test_forced_greedy_is_the_reference_greedy_up_to_the_first_difference(models: dict[str, Path]) -> None:
    """One pass along another system's path gives the reference's own greedy tokens up to and including the first
    token where they differ."""
    from slm_export.validation.generate import forced_greedy, torch_greedy

    module = load_model(str(models["qwen2"]), False).torch_module()
    prompt = [5, 17, 99, 3, 250, 42]
    own = torch_greedy(module, prompt, 8)
    assert forced_greedy(module, prompt, own) == own
    other = [*own[:3], (own[3] + 1) % 384, *own[4:]]
    assert forced_greedy(module, prompt, other) == own[:4]


def test_chunked_read_equals_the_stored_tensor(models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks that end inside a row (an odd byte count) put every value where it belongs."""
    from safetensors.torch import load_file

    from slm_export.models import lazy

    files = sorted(models["qwen2"].glob("*.safetensors"))
    index = lazy.index_safetensors(files)
    monkeypatch.setattr(lazy, "CHUNK_BYTES", 1000)
    stored = load_file(str(files[0]))
    for name, tensor in stored.items():
        assert torch.equal(lazy.read_tensor(index[name]), tensor.float()), name


@pytest.mark.parametrize("symmetric", [False, True])
def test_rounding_and_sqnr_by_blocks_of_rows_equal_the_whole(symmetric: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large tensor is rounded and measured in blocks of rows (fewer full-size temporaries): the same codes,
    scales and zero points, and the same SQNR to float32 rounding."""
    from slm_export.calibration import quant, run

    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    whole = quant.quantize_rtn(w, 4, 32, symmetric)
    monkeypatch.setattr(quant, "CHUNK_ELEMS", 7 * 64)  # 7 rows a block: the last block is short
    blocks = quant.quantize_rtn(w, 4, 32, symmetric)
    assert np.array_equal(whole.codes, blocks.codes)
    assert np.array_equal(whole.scales, blocks.scales)
    assert (whole.zeros is None) == (blocks.zeros is None)
    if whole.zeros is not None:
        assert np.array_equal(whole.zeros, blocks.zeros)
    ref = w.numpy()
    assert run.sqnr_by_rows(ref, whole) == pytest.approx(run.sqnr32(ref, whole.dequantize()), abs=1e-4)


def test_compile_keeps_the_weights_only_for_backends_that_rebuild_from_them() -> None:
    """The host's compile and validation run ONNX Runtime on the written graph: the compressed weights are
    dropped before them; android's ExecuTorch and TVM's targets rebuild from the weights and keep them."""
    from slm_export.backends import reads_weights
    from slm_export.planning import make_plan
    from slm_export.targets import get_target

    for target, expected in (("host", False), ("android-arm64", True)):
        profile = get_target(target)
        plan = make_plan(profile, model="smollm2-135m", out=f"/nonexistent/{target}", precision="int4")
        assert reads_weights(plan, profile) is expected, target


def test_auto_streaming_counts_a_containers_memory_limit(tmp_path: Path) -> None:
    """A CI job in a container sees the host's RAM; its cgroup limit is what it may use."""
    from slm_export.models.lazy import total_memory

    limit = tmp_path / "memory.max"
    limit.write_text("max\n")
    machine = total_memory(())
    assert total_memory((str(limit),)) == machine
    limit.write_text(f"{2 << 30}\n")
    assert total_memory((str(limit), str(tmp_path / "absent"))) == min(machine, 2 << 30)


def test_a_model_file_changed_during_the_run_is_named_not_a_traceback(models: dict[str, Path], tmp_path: Path) -> None:
    """Streaming reads the files again at each use: one truncated after the load's checks is a clear error."""
    import shutil

    from slm_export.errors import ModelLoadError

    folder = shutil.copytree(models["llama"], tmp_path / "llama")
    model = load_model(str(folder), True)
    shard = next(folder.glob("*.safetensors"))
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    with pytest.raises(ModelLoadError, match="changed, truncated or removed during the run"):
        _read_all(model.weights)  # tensors in the file's second half are past the cut


def _read_all(weights: LazyWeights) -> None:
    for name in weights:
        weights[name]


def test_packed_codes_read_as_the_codes_they_hold() -> None:
    """Int4 codes held two to a byte give back the same codes, rows, fused stacks and graph bytes."""
    from slm_export.calibration.quant import PackedQuantized, QuantizedTensor, quantize_rtn
    from slm_export.exporters.quantized import pack_codes

    w = torch.randn(12, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(w, 4, 32, False)
    p = PackedQuantized.of(q)
    assert isinstance(p, PackedQuantized)
    assert p.nibbles().nbytes == q.codes.nbytes // 2
    assert np.array_equal(p.codes, q.codes)
    assert p.shape == q.shape
    assert p.size == q.size
    assert np.array_equal(p.dequantize(), q.dequantize())
    assert p.storage_bytes() == q.storage_bytes()
    rows = np.array([0, 5, 11])
    assert np.array_equal(p[2:7].codes, q[2:7].codes)
    assert np.array_equal(p[rows].zeros, q[rows].zeros)
    assert np.array_equal(pack_codes(p), pack_codes(q))
    joined = QuantizedTensor.joined([p[:4], p[4:]])
    assert np.array_equal(pack_codes(joined), pack_codes(q))
    assert joined.nibbles() is not None
    assert PackedQuantized.of(quantize_rtn(w, 8, 32, True)).nibbles() is None  # int8 stays a byte a code


def test_gptq_by_blocks_of_rows_equals_the_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """GPTQ rounds rows independently given the Hessian: a large tensor (an LM head) done in blocks of rows gets the
    same codes and scales, also with a sparsity mask and a fixed grid."""
    from slm_export.calibration import gptq
    from slm_export.hessian import accumulate

    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(40, 64, generator=g), torch.randn(256, 64, generator=g)
    h = accumulate(None, x)
    keep = torch.rand(40, 64, generator=g) > 0.3
    cases = [(gptq.GPTQConfig(4, 32, True, signed=True), None, None),
             (gptq.GPTQConfig(4, 32, False), keep, None),
             (gptq.GPTQConfig(8, 64, True), None, torch.tensor([[0.05]]))]
    whole = [gptq.gptq_quantize(w, h, c, k, s) for c, k, s in cases]
    monkeypatch.setattr(gptq, "ROW_BLOCK_ELEMS", 9 * 64)  # 9 rows a block: the last one short
    for (c, k, s), ref in zip(cases, whole, strict=True):
        got = gptq.gptq_quantize(w, h, c, k, s)
        assert np.array_equal(got.codes, ref.codes), c
        assert np.array_equal(got.scales, ref.scales), c


@pytest.mark.parametrize("stats_kind", ["hessian", "sample", "none"])
def test_layer_figures_by_blocks_of_rows_equal_the_whole(stats_kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large weight's report entry (weight and output SQNR, sparsity; a hot-row head's int8 rows included) is
    summed over blocks of rows: the same figures as over the whole tensor."""
    from slm_export.calibration import quant, run
    from slm_export.calibration.config import CompressConfig
    from slm_export.calibration.sequential import InputStats

    g = torch.Generator().manual_seed(3)
    w = torch.randn(50, 64, generator=g)
    w[w.abs() < 0.3] = 0
    st = None if stats_kind == "none" else InputStats()
    if st is not None:
        st.update(torch.randn(300, 64, generator=g), stats_kind == "hessian", 128)
        st = st.finish()
    base = quant.quantize_rtn(w, 4, 32, True)
    rows = np.array([3, 20, 49])
    hot = quant.HotRowsTensor(base.codes, base.scales, None, 4, 32, rows=rows, hot=quant.quantize_rtn(w[rows], 8, 32,
                                                                                                        True))
    cfg = CompressConfig("int4", "gptq", 32, sparsity="unstructured", sparsity_ratio=0.3)
    for q in (base, hot):
        whole = run.layer_entry("x", w, q, cfg, st)
        monkeypatch.setattr(run, "CHUNK_ELEMS", 7 * 64)
        blocks = run.layer_entry("x", w, q, cfg, st)
        monkeypatch.undo()
        assert whole.keys() == blocks.keys()
        for key, value in whole.items():  # SQNR figures are rounded to 0.01 dB: a sum's last bit may flip one
            assert blocks[key] == (value if key == "sparsity" else pytest.approx(value, abs=0.011)), key


def test_streamed_calibration_holds_one_layer_and_packs_its_codes(models: dict[str, Path],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Calibrating a streamed model reads each decoder layer when its step runs and drops it after: during a step
    only that layer's parameters are real; its int4 results are held two codes to a byte, equal to the held run's."""
    from slm_export.calibration import layers
    from slm_export.calibration.compress import compress
    from slm_export.calibration.config import CompressConfig
    from slm_export.calibration.quant import PackedQuantized

    cfg = CompressConfig("int4", "awq-gptq", 32, calib_samples=2, calib_seqlen=32, lm_head_bits=4)
    held = compress(load_model(str(models["llama"]), False), cfg).weights
    seen: list[tuple[int, int]] = []
    step = layers.LayerQuantizer.step

    def spy(self: layers.LayerQuantizer, i: int, layer: torch.nn.Module, *args: object) -> None:
        seen.append((sum(1 for p in self.run.work.parameters() if p.device.type != "meta"),
                     sum(1 for _ in layer.parameters())))
        step(self, i, layer, *args)

    monkeypatch.setattr(layers.LayerQuantizer, "step", spy)
    streamed = compress(load_model(str(models["llama"]), True), cfg).weights
    assert len(seen) > 1
    assert all(real == per_layer for real, per_layer in seen), seen
    packed = [k for k, v in streamed.items() if isinstance(v, PackedQuantized)]
    assert "lm_head.weight" in packed
    assert len(packed) == sum(1 for v in held.values() if hasattr(v, "codes"))
    for name in packed:
        assert np.array_equal(streamed[name].codes, held[name].codes), name
        assert np.array_equal(streamed[name].scales, held[name].scales), name
