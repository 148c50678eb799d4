"""Property-based fuzzing of the readers of user files: the profile TOML reader, the GGUF reader and the
safetensors header check.

Every mutated input must end in success or in a documented error (an SlmExportError subclass); any other
exception is a reader bug (the CLI would report it as an internal error, exit 4). Seeds are derandomized so
CI sees the same examples on every run; the readers are fuzzed directly (no model is built per example).
"""

from __future__ import annotations

import contextlib
import json
import struct
import tempfile
import tomllib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slm_export.errors import ConfigError, ModelLoadError
from slm_export.models.gguf import gguf_config, gguf_weights, read_gguf
from slm_export.models.safetensors_check import DTYPE_BITS, check_float_dtypes, parse_header
from slm_export.targets.profile import TargetProfile

EXAMPLES = 2000
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- (a) target profiles ---------------------------------------------------------------------------------

PROFILE_TEXT = (resources.files("slm_export.targets") / "profiles" / "rpi4b.toml").read_text(encoding="utf-8")
PROFILE = tomllib.loads(PROFILE_TEXT)

_scalars = st.one_of(
    st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["fp32", "int4", "onnxruntime", "tvm", "aarch64", "emulator", "2:4", "", "host"]),
    st.datetimes(), st.dates(), st.times(),
)
toml_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=6)


def _paths(tree: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every key path into nested tables and lists (the root excluded)."""
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


PROFILE_PATHS = sorted(_paths(PROFILE), key=repr)


def _mutate(tree: Any, path: tuple[Any, ...], op: str, value: Any) -> Any:
    tree = json.loads(json.dumps(tree))  # a deep copy (the profile holds only JSON-able values)
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if op == "delete":
        del parent[last]
    elif op == "add" and isinstance(parent, dict):
        parent[f"{last}_x"] = value
    elif op == "wrap":
        parent[last] = [parent[last]]
    else:
        parent[last] = value
    return tree


def _profile_ok(build: Any) -> None:
    with contextlib.suppress(ConfigError):
        build()


@FUZZ
@given(data=st.data())
def test_profile_from_dict_on_mutations_of_a_builtin(data: st.DataObject) -> None:
    raw = PROFILE
    for _ in range(data.draw(st.integers(1, 3))):
        paths = sorted(_paths(raw), key=repr) or PROFILE_PATHS
        path = data.draw(st.sampled_from(paths))
        try:
            raw = _mutate(raw, path, data.draw(st.sampled_from(["replace", "delete", "add", "wrap"])),
                          data.draw(toml_values))
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or retyped this path
    _profile_ok(lambda: TargetProfile.from_dict(raw))


@FUZZ
@given(raw=st.dictionaries(st.sampled_from([*PROFILE, "gpu", "x"]) | st.text(max_size=6), toml_values, max_size=6))
def test_profile_from_dict_on_arbitrary_tables(raw: dict[str, Any]) -> None:
    _profile_ok(lambda: TargetProfile.from_dict(raw))


def _byte_edits(size: int, focus: int) -> st.SearchStrategy[list[tuple[str, int, bytes]]]:
    """Edits of a file of ``size`` bytes, mostly within its first ``focus`` bytes (where the headers are)."""
    pos = st.one_of(st.integers(0, max(focus - 1, 0)), st.integers(0, size - 1))
    interesting = st.sampled_from([b"\x00", b"\xff", b"\x7f", b"\x80", b"\n", b"[", b"\"", b"=", b"{", b"}"])
    edit = st.one_of(
        st.tuples(st.just("set"), pos, st.binary(min_size=1, max_size=4) | interesting),
        st.tuples(st.just("u64"), pos, st.sampled_from([0, 1, 2, 3, 7, 8, 31, 32, 255, 2**31, 2**32 - 1, 2**32,
                                                        2**62, 2**63 - 1, 2**63, 2**64 - 1])
                  .map(lambda v: struct.pack("<Q", v))),
        st.tuples(st.just("u32"), pos, st.sampled_from([0, 1, 2, 3, 4, 5, 8, 9, 12, 13, 24, 28, 30, 99, 2**31,
                                                        2**32 - 1]).map(lambda v: struct.pack("<I", v))),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16).map(lambda n: bytes(n))),
        st.tuples(st.just("truncate"), pos, st.just(b"")),
    )
    return st.lists(edit, min_size=1, max_size=4)


def _apply(data: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, payload in edits:
        pos = min(pos, len(buf))
        if op in ("set", "u64", "u32"):
            buf[pos:pos + len(payload)] = payload
        elif op == "insert":
            buf[pos:pos] = payload
        elif op == "delete":
            del buf[pos:pos + len(payload)]
        else:
            del buf[pos:]
    return bytes(buf)


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="slm-fuzz-") as d:
        yield Path(d)


PROFILE_BYTES = PROFILE_TEXT.encode()


@FUZZ
@given(edits=_byte_edits(len(PROFILE_BYTES), len(PROFILE_BYTES)))
def test_profile_from_toml_on_byte_mutations(scratch: Path, edits: list[tuple[str, int, bytes]]) -> None:
    board = scratch / "board.toml"
    board.write_bytes(_apply(PROFILE_BYTES, edits))
    _profile_ok(lambda: TargetProfile.from_toml(board))


# ---- (b) GGUF --------------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, nan: bool = False, merges: tuple[str, ...] = ("a b",)) -> Path:
    """A one-block Llama GGUF (hidden 32, 2 heads, 1 KV head) with F32, F16 and Q8_0 tensors and a 16-token
    vocabulary: every part of the format the reader parses, in 24 KB."""
    import gguf

    rng = np.random.default_rng(0)
    hidden, heads, kv, head_dim, ff, vocab = 32, 2, 1, 16, 32, 16
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "ab"] + [chr(99 + i) for i in range(vocab - 3)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(list(merges))
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    def f32(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", f32(vocab, hidden))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    q = f32(heads * head_dim, hidden)
    if nan:
        q[3, 4] = np.nan
    w.add_tensor("blk.0.attn_q.weight", q)
    w.add_tensor("blk.0.attn_k.weight", f32(kv * head_dim, hidden))
    w.add_tensor("blk.0.attn_v.weight", f32(kv * head_dim, hidden))
    w.add_tensor("blk.0.attn_output.weight", f32(hidden, heads * head_dim).astype(np.float16))
    w.add_tensor("blk.0.ffn_gate.weight", f32(ff, hidden))
    up = gguf.quants.quantize(f32(ff, hidden), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_up.weight", up, raw_shape=up.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("blk.0.ffn_down.weight", f32(hidden, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


with tempfile.TemporaryDirectory(prefix="slm-fuzz-") as _d:
    TINY_GGUF = write_tiny_gguf(Path(_d) / "tiny.gguf").read_bytes()


@contextlib.contextmanager
def bounded_memory(extra: int = 1 << 30) -> Iterator[None]:
    """At most ``extra`` more bytes of address space inside: a reader that allocates by a damaged header's
    numbers raises MemoryError here (a failure naming the example) instead of exhausting the machine (an
    out-of-memory kill that takes the test worker, and CI with it)."""
    import resource

    with open("/proc/self/statm") as fh:
        used = int(fh.read().split()[0]) * resource.getpagesize()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (used + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _read_all(path: Path) -> None:
    with bounded_memory():
        meta, infos, mm, start = read_gguf(path)
        try:
            cfg = gguf_config(meta, infos)
            gguf_weights(path, meta, infos, mm, start, cfg)
        finally:
            mm.close()


def test_tiny_gguf_reads(scratch: Path) -> None:
    f = scratch / "tiny.gguf"
    f.write_bytes(TINY_GGUF)
    meta, infos, mm, start = read_gguf(f)
    cfg = gguf_config(meta, infos)
    weights = gguf_weights(f, meta, infos, mm, start, cfg)
    mm.close()
    assert (cfg["hidden_size"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (32, 1, 16)
    assert weights["model.layers.0.mlp.up_proj.weight"].shape == (32, 32)
    assert len(weights) == 11


@FUZZ
@given(edits=_byte_edits(len(TINY_GGUF), 1700))
def test_gguf_reader_on_byte_mutations(scratch: Path, edits: list[tuple[str, int, bytes]]) -> None:
    f = scratch / "fuzz.gguf"
    f.write_bytes(_apply(TINY_GGUF, edits))
    with contextlib.suppress(ModelLoadError):
        _read_all(f)


@FUZZ
@given(cut=st.integers(0, len(TINY_GGUF)))
def test_gguf_reader_on_truncations(scratch: Path, cut: int) -> None:
    f = scratch / "cut.gguf"
    f.write_bytes(TINY_GGUF[:cut])
    try:
        _read_all(f)
    except ModelLoadError:
        if cut == len(TINY_GGUF):
            raise


def test_gguf_reader_on_the_head_of_the_builtin_file(scratch: Path) -> None:
    from slm_export.models.builtin import BUILTIN_MODELS

    with open(BUILTIN_MODELS.get("smollm2-135m").path(), "rb") as fh:
        head = fh.read(4_000_000)
    for cut in (16, 1000, 100_000, 1_785_000, 1_785_664, 4_000_000):
        f = scratch / "head.gguf"
        f.write_bytes(head[:cut])
        with pytest.raises(ModelLoadError, match="truncated|cannot read GGUF"):
            _read_all(f)


# The loader on a few hand-made files: through the config, the checks and (for the last) the tokenizer.
@pytest.mark.parametrize(("case", "expected"), [
    ("nan", "holds 1 NaN or Inf"),
    ("dims", "has dimensions"),
    ("count", "cannot read GGUF"),
    ("blocks", "2130706433 blocks but the file describes only 11 tensors"),
    ("merges", "tokenizer"),
    ("tokenizer", "does not round-trip"),
])
def test_load_gguf_refuses_damaged_files(case: str, expected: str, tmp_path: Path) -> None:
    from slm_export.models.loader import load_model

    f = tmp_path / f"{case}.gguf"
    if case == "nan":
        write_tiny_gguf(f, nan=True)
    elif case == "merges":
        write_tiny_gguf(f, merges=("a b", "c d"))  # "cd" is no token: tokenizers panics in Rust
    else:
        data = bytearray(TINY_GGUF)
        if case == "dims":  # llama.embedding_length 32 -> 48: the tensors no longer fit the metadata
            key = b"llama.embedding_length"
            at = data.index(key) + len(key) + 4
            data[at:at + 4] = struct.pack("<I", 48)
        elif case == "count":  # the tensor count -> 2**62
            data[8:16] = struct.pack("<Q", 2**62)
        elif case == "blocks":  # llama.block_count 1 -> 0x7f000001, a byte flipped: nothing may be sized by it
            key = b"llama.block_count"
            at = data.index(key) + len(key) + 4
            data[at:at + 4] = struct.pack("<I", 0x7F000001)
        f.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=expected) as info:
        load_model(str(f))
    assert str(f) in str(info.value)


# ---- (c) safetensors headers -----------------------------------------------------------------------------

def _tiny_safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    g = torch.Generator().manual_seed(0)
    return save({
        "model.embed_tokens.weight": torch.randn(8, 4, generator=g),
        "model.norm.weight": torch.ones(4, dtype=torch.float16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "embeddings.position_ids": torch.arange(8).unsqueeze(0),
        "empty": torch.zeros(0, 4),
    }, metadata={"format": "pt"})


TINY_ST = _tiny_safetensors()
ST_HEADER_LEN = struct.unpack("<Q", TINY_ST[:8])[0]
ST_HEADER = json.loads(TINY_ST[8:8 + ST_HEADER_LEN])


def _check_st(data: bytes) -> None:
    """Our check, and the property that makes it worth having: whatever it accepts, safetensors loads, with
    the dtypes and shapes the header declared."""
    from safetensors.torch import load

    try:
        with bounded_memory():
            entries = parse_header(data, len(data), "fuzz.safetensors")
            check_float_dtypes(entries, "fuzz.safetensors")
    except ModelLoadError:
        return
    tensors = load(data)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {k: e.shape for k, e in entries.items()}


def test_tiny_safetensors_passes() -> None:
    entries = parse_header(TINY_ST, len(TINY_ST), "tiny")
    check_float_dtypes(entries, "tiny")
    assert entries["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"


_header_values = st.one_of(
    st.sampled_from([*DTYPE_BITS, "F32", "F32", "I32", "f32", ""]), st.integers(-2, 300),
    st.sampled_from([2**63, 2**64, 2**64 + 1, 10**30]), st.lists(st.integers(-1, 300), max_size=3),
    st.lists(st.sampled_from([0, 1, 4, 8, 2**32, 2**63, 2**64 - 1]), max_size=3), st.none(), st.text(max_size=4),
    st.floats(allow_nan=False, allow_infinity=False, width=16),
)


@FUZZ
@given(data=st.data())
def test_safetensors_check_on_header_mutations(data: st.DataObject) -> None:
    header = json.loads(json.dumps(ST_HEADER))
    names = sorted(header)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(names))
        entry = header.get(name)
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "shape.0", "data_offsets.1",
                                           "delete", "entry", "copy"]))
        value = data.draw(_header_values)
        if field == "delete":
            header.pop(name, None)
        elif field == "entry":
            header[name] = value
        elif field == "copy":
            header[f"{name}.copy"] = entry
        elif isinstance(entry, dict):
            key, _, index = field.partition(".")
            if index and isinstance(entry.get(key), list) and entry[key]:
                entry[key][int(index) % len(entry[key])] = value
            else:
                entry[key] = value
    text = json.dumps(header, separators=(",", ":")).encode()
    pad = data.draw(st.integers(0, 9))
    body = TINY_ST[8 + ST_HEADER_LEN:]
    body = body[:data.draw(st.integers(0, len(body)))] if data.draw(st.booleans()) else body
    _check_st(struct.pack("<Q", len(text) + pad) + text + b" " * pad + body)


@FUZZ
@given(edits=_byte_edits(len(TINY_ST), 8 + ST_HEADER_LEN))
def test_safetensors_check_on_byte_mutations(edits: list[tuple[str, int, bytes]]) -> None:
    _check_st(_apply(TINY_ST, edits))


def test_safetensors_check_reads_files(tmp_path: Path) -> None:
    from slm_export.models.safetensors_check import check_safetensors

    f = tmp_path / "model.safetensors"
    f.write_bytes(TINY_ST)
    assert set(check_safetensors(f)) == set(ST_HEADER) - {"__metadata__"}
    for cut in (0, 7, 8, 100, len(TINY_ST) - 1):
        f.write_bytes(TINY_ST[:cut])
        with pytest.raises(ModelLoadError, match="truncated|damaged"):
            check_safetensors(f)
