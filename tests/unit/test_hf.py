"""Hugging Face checkpoints as models: a directory or zip of config.json + safetensors (+ tokenizer.json) loads
with every name and size checked first; hostile checkpoints are refused before transformers or torch reads
them, and nothing in them runs (pickles, modelling code); text data is tokenised into next-token windows."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
import torch

from bitplan.archives.hf import check_checkpoint
from bitplan.core.data import load_data, read_text, tokenize_text
from bitplan.core.loading import load_model
from bitplan.core.pipeline import prepare
from bitplan.errors import BitplanError, DataError, ModelFormatError, UnsafeModelError
from tests.hf_checkpoint import build_checkpoint, write_text, zip_dir


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "calib.txt")


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_model(str(ckpt))


def copy(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(ckpt, out)
    return out


class Marker:
    """Unpickling this writes a file: the proof that a pickle was (or was not) loaded."""

    path = ""

    def __reduce__(self):
        return (Path.write_text, (Path(self.path), "unpickled"))


def test_directory_and_zip_load_the_same_layers_under_the_checkpoints_names(ckpt, loaded, tmp_path):
    names = [g.name for g in loaded.layers]
    assert names[:7] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj", "model.layers.0.self_attn.o_proj",
                         "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"]
    assert names[-1] == "lm_head" and len(names) == 15
    assert loaded.info.format == "hf" and loaded.inputs[0].name == "input_ids"
    assert loaded.tokenizer is not None and loaded.vocab_size == loaded.tokenizer.get_vocab_size()
    for root in ("tiny-llama", ""):  # a zipped folder, or the files at the top of the zip
        zipped = load_model(str(zip_dir(ckpt, tmp_path / f"m{root}.zip", root=root)))
        assert [g.name for g in zipped.layers] == names
        ids = torch.randint(0, 100, (2, 12))
        torch.testing.assert_close(zipped.gm(input_ids=ids), loaded.gm(input_ids=ids), rtol=0, atol=0)
    # the exported graph takes any batch and sequence length
    assert loaded.gm(input_ids=torch.zeros(3, 40, dtype=torch.int64)).shape == (3, 40, loaded.vocab_size)


def test_the_graph_computes_what_transformers_computes(ckpt, loaded):
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(ckpt), local_files_only=True).eval()
    ids = torch.randint(0, loaded.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded.gm(input_ids=ids), reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_sharded_checkpoint_loads_and_a_stale_index_is_refused(tmp_path):
    sharded = build_checkpoint(tmp_path / "sharded", shards=True)
    assert len(list(sharded.glob("*.safetensors"))) > 1
    assert len(load_model(str(sharded)).layers) == 15
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    other = sorted({s for s in index["weight_map"].values() if s != index["weight_map"][name]})[0]
    index["weight_map"][name] = other
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="the index is stale|maps"):
        check_checkpoint(sharded)
    index["weight_map"][name] = "model-99999-of-99999.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match="not in the checkpoint"):
        check_checkpoint(sharded)


def test_pickles_and_code_in_the_checkpoint_are_never_run(ckpt, tmp_path):
    marker = tmp_path / "ran"
    Marker.path = str(marker)
    folder = copy(ckpt, tmp_path)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Marker()))
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    model = load_model(str(folder))
    assert not marker.exists()
    assert any("pytorch_model.bin" in n and "modeling_evil.py" in n and "not read" in n for n in model.notes)
    # weights only as a pickle: refused, still unread
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UnsafeModelError, match="only as pytorch_model.bin.*pickles"):
        load_model(str(folder))
    assert not marker.exists()


def test_custom_code_configs_are_refused(ckpt, tmp_path):
    folder = copy(ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsafeModelError, match="custom code.*trust_remote_code"):
        load_model(str(folder))


@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.update(model_type="no_such_model"), ModelFormatError, "not one that transformers"),
    (lambda c: c.update(architectures=["LlamaModel"]), ModelFormatError, "not a causal language model"),
    (lambda c: c.update(architectures=["os.system"]), ModelFormatError, "architectures must name one"),
    (lambda c: c.update(architectures=["LlamaForCausalLM", "BertModel"]), ModelFormatError, "architectures must name one"),
    (lambda c: c.update(hidden_size=4096, intermediate_size=4 << 30), BitplanError, "out of range|shape"),
    (lambda c: c.update(hidden_size=64), ModelFormatError, "has shape .* but config.json makes it"),
    (lambda c: c.update(num_hidden_layers=3), ModelFormatError, "the weights lack model.layers.2"),
])
def test_configs_that_disagree_with_the_weights_are_refused_before_allocating(ckpt, tmp_path, edit, error, match):
    folder = copy(ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=match):
        load_model(str(folder))


@pytest.mark.parametrize("raw, match", [
    ('{"model_type": "llama", "model_type": "bert"}', "appears twice"),
    ('{"model_type": "llama", "rope_theta": NaN}', "not a JSON number"),
    ('[1, 2]', "not a JSON object"),
    ('{"model_type": "llama\\u0000"}', "no valid model_type"),
    ("{" * 2000, "nested|not valid JSON"),
])
def test_hostile_config_json(ckpt, tmp_path, raw, match):
    folder = copy(ckpt, tmp_path)
    (folder / "config.json").write_text(raw)
    with pytest.raises(BitplanError, match=match):
        check_checkpoint(folder)


def _safetensors(header: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + payload


@pytest.mark.parametrize("blob, match", [
    (_safetensors({"a\"); import os; (\"": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "not a dotted path"),
    (_safetensors({"w": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4), "unknown dtype"),
    (_safetensors({"w": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}, b"\0" * 4),
     "outside or inconsistent"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                   "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (b"\1\2", "truncated"),
])
def test_hostile_safetensors_headers(ckpt, tmp_path, blob, match):
    folder = copy(ckpt, tmp_path)
    (folder / "model.safetensors").write_bytes(blob)
    with pytest.raises(BitplanError, match=match):
        check_checkpoint(folder)


def test_hostile_zips(ckpt, tmp_path):
    evil = zip_dir(ckpt, tmp_path / "evil.zip", root="", extra={"../escape.json": b"{}"})
    with pytest.raises(UnsafeModelError, match="unsafe name"):
        load_model(str(evil))
    twice = zip_dir(ckpt, tmp_path / "twice.zip", root="", extra={"config.json": b'{"model_type": "bert"}'})
    with pytest.raises(UnsafeModelError, match="twice"):
        load_model(str(twice))


def test_text_becomes_next_token_windows(loaded, text, tmp_path):
    data = tokenize_text(read_text(text), loaded.tokenizer, 32, loaded.vocab_size)
    ids, targets = data.inputs["input_ids"], data.targets
    assert ids.shape[1] == 32 and targets.shape == ids.shape and ids.dtype == torch.int64
    assert torch.equal(ids[:, 1:], targets[:, :-1])  # each target is the next token
    stream = loaded.tokenizer.encode(text.read_text()).ids
    assert ids[0].tolist() == stream[:32] and ids[1].tolist() == stream[33:65]
    jsonl = write_text(tmp_path / "calib.jsonl", jsonl=True)
    assert len(load_data(jsonl, loaded.tokenizer, 32, loaded.vocab_size)) > 10
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "typo"}\n')
    with pytest.raises(DataError, match="line 2: expected an object with a \"text\""):
        load_data(bad, loaded.tokenizer)
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    with pytest.raises(DataError, match="fewer than one window"):
        load_data(short, loaded.tokenizer, 128)
    with pytest.raises(DataError, match="does not belong to this model"):
        load_data(text, loaded.tokenizer, 32, vocab_size=50)
    with pytest.raises(DataError, match="no tokenizer.json") as err:
        load_data(text)
    assert err.value.code == "needs_tokenizer"


def test_a_checkpoint_without_a_tokenizer_says_what_to_send(ckpt, text, tmp_path):
    folder = copy(ckpt, tmp_path)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(DataError, match="no tokenizer.json"):
        prepare(str(folder), str(text))

