"""Encoder graphs against transformers' AutoModel on tiny random models of every encoder family: the last hidden
state and the masked-mean sentence embedding that validation compares, on a batch with right and left padding."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slm_export.cli import main
from slm_export.exporters.encoder import build_encoder
from slm_export.models.adapters import ADAPTERS, spec_for
from slm_export.models.loader import DECODER_TYPES, ENCODER_TYPES
from slm_export.validation.generate import make_session
from tests.conftest import VOCAB, _tokenizer, make_tiny_model

PAD = 1  # the tiny tokenizer's <pad>, and every tiny config's pad_token_id
SMALL = {"vocab_size": VOCAB, "pad_token_id": PAD, "max_position_embeddings": 64, "initializer_range": 0.2}
BERT_LIKE = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, **SMALL}


def _bert() -> Any:
    import transformers as t

    return t.BertConfig(**BERT_LIKE, type_vocab_size=2)


def _distilbert(sinusoidal: bool) -> Callable[[], Any]:
    def make() -> Any:
        import transformers as t

        return t.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, sinusoidal_pos_embds=sinusoidal,
                                  activation="gelu", **SMALL)
    return make


def _roberta() -> Any:
    import transformers as t

    return t.RobertaConfig(**BERT_LIKE, type_vocab_size=1, bos_token_id=0, eos_token_id=0)


def _xlm_roberta() -> Any:
    import transformers as t

    return t.XLMRobertaConfig(**BERT_LIKE, type_vocab_size=1, bos_token_id=0, eos_token_id=0, hidden_act="gelu_new")


def _mobilebert(**kw: Any) -> Callable[[], Any]:
    """MobileBERT with the published model's shape rules at a tiny size: a 32-wide embedding under a 64-wide
    hidden state, 16-wide bottlenecks, stacked FFNs; ``kw`` switches the variants."""
    def make() -> Any:
        import transformers as t

        base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 32,
                "embedding_size": 32, "intra_bottleneck_size": 16, "num_feedforward_networks": 3,
                "type_vocab_size": 2, **SMALL}
        return t.MobileBertConfig(**{**base, **kw})
    return make


# (name, config factory): every encoder family, and the variants of each that take another path in the graph.
TINY_ENCODERS: tuple[tuple[str, Callable[[], Any]], ...] = (
    ("bert", _bert),
    ("distilbert", _distilbert(sinusoidal=False)),
    ("distilbert-sinusoidal", _distilbert(sinusoidal=True)),
    ("roberta", _roberta),
    ("xlm-roberta", _xlm_roberta),
    # trigram input, key/query-shared bottleneck, NoNorm (the published defaults)
    ("mobilebert", _mobilebert()),
    # LayerNorm (two of them with torch's default epsilon), every attention input through the bottleneck, no trigram
    ("mobilebert-layernorm", _mobilebert(normalization_type="layer_norm", layer_norm_eps=0.05,
                                         use_bottleneck_attention=True, trigram_input=False)),
    # no bottlenecks, one FFN, the embedding as wide as the hidden state: no projection
    ("mobilebert-plain", _mobilebert(use_bottleneck=False, trigram_input=False, embedding_size=64,
                                     num_feedforward_networks=1, hidden_act="gelu")),
)
FACTORIES = dict(TINY_ENCODERS)


def _save(name: str, folder: Path) -> Path:
    """A seeded random model of row ``name``, saved with the tiny byte-level BPE tokenizer (no token types).
    Norm weights and every bias are drawn too: at their defaults (1 and 0) NoNorm and a dropped bias would pass."""
    from transformers import AutoModel

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = AutoModel.from_config(FACTORIES[name]())
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.ndim == 1:
                p.normal_(1.0 if key.endswith("weight") else 0.0, 0.3)
    model.save_pretrained(folder)
    _tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = _save(name, tmp_path_factory.mktemp("enc") / name)
        return made[name]
    return get


def _batch() -> dict[str, np.ndarray]:
    """A full row, a right-padded and a left-padded one: RoBERTa's position ids differ between the last two."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, VOCAB, size=(3, 9))
    ids[1, 5:] = PAD
    ids[2, :2] = PAD
    return {"input_ids": ids, "attention_mask": (ids != PAD).astype(np.int64),
            "token_type_ids": rng.integers(0, 2, size=ids.shape)}


def _run_graph(spec: Any, tmp: Path, feed: dict[str, np.ndarray], precision: str = "fp32") -> list[np.ndarray]:
    path = tmp / f"encoder-{precision}.onnx"
    build_encoder(spec, 17, precision).save(path)
    sess = make_session(path, 1)
    return sess.run(["last_hidden_state", "sentence_embedding"], {i.name: feed[i.name] for i in sess.get_inputs()})


def _reference(folder: Path, feed: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    from transformers import AutoModel

    module = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return module(**{k: torch.from_numpy(feed[k]) for k in names}).last_hidden_state.numpy()


def _loaded_spec(folder: Path) -> Any:
    from slm_export.models import load_model

    model = load_model(str(folder))
    assert model.kind == "encoder"
    return spec_for(model.config, model.weights)


def test_every_encoder_adapter_has_a_tiny_model() -> None:
    covered = {factory().model_type for _, factory in TINY_ENCODERS}
    encoders = set(ADAPTERS.names()) - set(DECODER_TYPES)
    assert encoders == set(ENCODER_TYPES), "an encoder adapter must be in ENCODER_TYPES, and the reverse"
    assert encoders <= covered, f"encoder adapters without a row in TINY_ENCODERS: {sorted(encoders - covered)}"


@pytest.mark.parametrize("name", list(FACTORIES))
def test_encoder_matches_transformers(name: str, encoder_dir: Callable[[str], Path], tmp_path: Path) -> None:
    folder = encoder_dir(name)
    spec = _loaded_spec(folder)
    feed = _batch()
    hidden, pooled = _run_graph(spec, tmp_path, feed)
    graph_inputs = [i.name for i in make_session(tmp_path / "encoder-fp32.onnx", 1).get_inputs()]
    assert ("token_type_ids" in graph_inputs) == spec.token_type_input
    ref = _reference(folder, feed, graph_inputs)
    m = feed["attention_mask"][..., None]
    scale = float(np.abs(ref * m).max())
    assert float((ref * m).std()) > 0.1 * scale, "outputs are flat: the test could not tell layers apart"
    np.testing.assert_allclose(hidden * m, ref * m, atol=2e-5 * max(scale, 1.0), rtol=0)
    want = (ref * m).sum(1) / m.sum(1)
    np.testing.assert_allclose(pooled, want, atol=2e-5 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize("name", ["roberta", "xlm-roberta"])
def test_position_rule_bites(name: str, encoder_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Positions 0 .. seq - 1 (BERT's rule) must miss transformers on the padded rows: the test above would fail
    if the graph ignored RoBERTa's rule."""
    folder = encoder_dir(name)
    spec = _loaded_spec(folder)
    feed = _batch()
    ref = _reference(folder, feed, ["input_ids", "attention_mask"])
    plain = replace(spec, pos=spec.pos[spec.position_padding_idx + 1:], position_padding_idx=None)
    hidden, _ = _run_graph(plain, tmp_path, feed)
    m = feed["attention_mask"][..., None]
    gap = np.abs(hidden * m - ref * m).max(axis=(1, 2))
    assert gap[:2].max() < 1e-4, "unpadded and right-padded rows count from padding_idx + 1 either way"
    assert gap[2] > 1e-2, "a left-padded row's positions must differ from an offset range"


def test_sinusoidal_table_is_sinusoidal(encoder_dir: Callable[[str], Path]) -> None:
    spec = _loaded_spec(encoder_dir("distilbert-sinusoidal"))
    assert np.allclose(spec.pos[3, 0::2], np.sin(3 / 10000 ** (np.arange(0, 64, 2) / 64)), atol=1e-6)


@pytest.mark.parametrize("name", [n for n in FACTORIES if n != "bert"])
def test_encoder_exports_through_the_cli(name: str, encoder_dir: Callable[[str], Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The whole run at fp16 (validation feeds the graph what it takes, the tokenizer returns no token types);
    int8 and int4 refused with the reason, before any compress work."""
    folder = encoder_dir(name)
    assert main(["--target", "host", "--precision", "fp16", "--model", str(folder), "--out", str(tmp_path / "a"),
                 "--threads", "1"]) == 0
    capsys.readouterr()
    for precision in ("int8", "int4"):
        assert main(["--target", "host", "--precision", precision, "--model", str(folder),
                     "--out", str(tmp_path / precision)]) == 2
        assert "encoders export in fp32 or fp16" in capsys.readouterr().err
        assert not (tmp_path / precision).exists()


def test_bert_without_token_type_ids_exports(tmp_path: Path) -> None:
    """A BERT saved with a BPE tokenizer (no token_type_ids): validation feeds the graph zeros for them."""
    from transformers import AutoTokenizer

    folder = make_tiny_model("bert", tmp_path / "bert")
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(folder)("a b")
    assert main(["--target", "host", "--precision", "fp32", "--model", str(folder), "--out", str(tmp_path / "out"),
                 "--threads", "1"]) == 0


@pytest.mark.parametrize(("name", "field", "value", "says"), [
    ("distilbert", "activation", "tanh", "activation 'tanh' is not supported"),
    ("roberta", "pad_token_id", None, "no pad_token_id"),
    ("mobilebert", "normalization_type", "batch_norm", "normalization_type 'batch_norm'"),
    ("bert", "auto_map", {"AutoModel": "x.Model"}, "auto_map"),
])
def test_unsupported_encoder_config_refused_at_load(name: str, field: str, value: Any, says: str,
                                                    encoder_dir: Callable[[str], Path], tmp_path: Path) -> None:
    import json
    import shutil

    from slm_export.errors import ModelLoadError
    from slm_export.models import load_model

    folder = shutil.copytree(encoder_dir(name), tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ModelLoadError, match=says):
        load_model(str(folder))
