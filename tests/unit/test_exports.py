"""bitplan export: each runtime's file, loaded by that runtime's own library, gives every layer the planned format.

torchao (config_from_dict + quantize_), compressed-tensors (QuantizationConfig + apply_quantization_config) and ModelOpt
(mtq.quantize) run on the CPU here and are checked on the quantized modules themselves. llama.cpp is C++: the GGUF
type file is read as llama-quantize reads it (whitespace-separated ``regex=type``, case-insensitive types, the last
match wins) against the tensor names of a GGUF file written by the gguf package from the model's own weights, and
that file is read back with gguf's reader to check each tensor's type."""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from bitplan.cli import main
from bitplan.errors import ExportError
from bitplan.exports import FORMATS, export_choices, export_plan
from tests.plans import plan_for

warnings.filterwarnings("ignore", category=DeprecationWarning)


def tiny_llama(hidden: int = 32, layers: int = 2, inter: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=inter or 2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


@pytest.fixture(scope="module")
def mixed():
    """Bits 2, 3, 4, 6, 8 and 16 across the layers, and one layer with 8-bit inputs."""
    model = tiny_llama()
    names = linears(model)
    bits = {n: [2, 3, 4, 6, 8, 16][i % 6] for i, n in enumerate(names)}
    a_bits = {names[2]: 8}
    return bits, a_bits


def test_torchao_quantize_gives_each_linear_its_planned_width(mixed):
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    bits, a_bits = mixed
    model = tiny_llama()
    x = torch.randint(0, 64, (1, 8))
    before = model(x).logits
    export = export_plan(plan_for(model, bits, a_bits), "torchao")
    quantize_(model, config_from_dict(json.loads(export.text)), filter_fn=None)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if bits[name] == 16:
            assert type(weight) is nn.Parameter, name
            continue
        assert weight.target_dtype == getattr(torch, f"int{bits[name]}"), name
        assert tuple(weight.block_size) == (1, module.in_features), name  # one scale per output channel
        assert (weight.activation_quantization is not None) == (name in a_bits), name
    after = model(x).logits
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_compressed_tensors_schemes_match_the_plan(mixed):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    bits, a_bits = mixed
    model = tiny_llama()
    export = export_plan(plan_for(model, bits, a_bits), "compressed-tensors")
    config = QuantizationConfig.model_validate_json(export.text)
    apply_quantization_config(model, config)
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        scheme = getattr(module, "quantization_scheme", None)
        if bits[name] == 16:
            assert scheme is None and name in config.ignore, name
            continue
        assert (scheme.weights.num_bits, scheme.weights.strategy, scheme.weights.symmetric) == (bits[name], "channel",
                                                                                                 True), name
        acts = scheme.input_activations
        assert (acts.num_bits if acts else None) == a_bits.get(name), name
    # one config group per (weight, input) width pair
    assert len(config.config_groups) == len({(bits[n], a_bits.get(n, 16)) for n in bits if bits[n] < 16})


def test_modelopt_quantizers_match_the_plan_on_linear_and_conv_layers(mixed):
    import modelopt.torch.quantization as mtq
    import yaml

    from bitplan.catalog.digits import build

    bits, a_bits = mixed
    for model, plan_bits, plan_acts, x in [
        (tiny_llama(), bits, a_bits, torch.randint(0, 64, (2, 8))),
        (build("digits_cnn").eval(), None, None, torch.randn(2, 1, 8, 8)),
    ]:
        names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        plan_bits = plan_bits or {n: [3, 16, 5][i % 3] for i, n in enumerate(names)}
        plan_acts = plan_acts or {names[0]: 6}
        fmt = "hf" if plan_acts is a_bits else "pt2"
        export = export_plan(plan_for(model, plan_bits, plan_acts, fmt=fmt), "modelopt")
        assert export.filename.endswith(".yaml")
        mtq.quantize(model, yaml.safe_load(export.text), lambda m, x=x: m(x))
        for name in names:
            module = model.get_submodule(name)
            wq, iq = module.weight_quantizer, module.input_quantizer
            if plan_bits[name] == 16:
                assert not wq.is_enabled and not iq.is_enabled, name
                continue
            assert wq.is_enabled and wq.num_bits == plan_bits[name] and wq.axis == 0, name
            assert iq.is_enabled == (name in plan_acts), name
            if name in plan_acts:
                assert iq.num_bits == plan_acts[name]


def test_group_granularity_reaches_every_runtime():
    import modelopt.torch.quantization as mtq
    import yaml
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    plan = plan_for(tiny_llama(), default=4, granularity="group:16", kept="mixed")
    model = tiny_llama()
    quantize_(model, config_from_dict(json.loads(export_plan(plan, "torchao").text)), filter_fn=None)
    assert tuple(model.model.layers[0].mlp.down_proj.weight.block_size) == (1, 16)
    model = tiny_llama()
    apply_quantization_config(model, QuantizationConfig.model_validate_json(export_plan(plan, "compressed-tensors").text))
    weights = model.model.layers[0].mlp.down_proj.quantization_scheme.weights
    assert (weights.strategy, weights.group_size) == ("group", 16)
    model = tiny_llama()
    export = export_plan(plan, "modelopt")
    mtq.quantize(model, yaml.safe_load(export.text), lambda m: m(torch.randint(0, 64, (1, 8))))
    assert model.model.layers[0].mlp.down_proj.weight_quantizer.block_sizes == {-1: 16}
    # the per-unit bits cannot be expressed: said, not dropped silently
    assert any("per-unit bits" in note for note in export.notes)


def _llama_quantize_types(type_file: str, tensor_names: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """What llama-quantize's --tensor-type-file makes of ``type_file``: the type per tensor (the last matching
    pattern wins; std::regex_search on the lower-cased pattern) and how many tensors each pattern matched."""
    import gguf

    types: dict[str, str] = {}
    matched: dict[str, int] = {}
    rules = []
    for token in type_file.split():
        pattern, _, kind = token.partition("=")
        assert pattern and kind, token
        known = {t.name.lower(): t.name for t in gguf.GGMLQuantizationType}
        assert kind.lower() in known, f"ggml has no type {kind}"
        rules.append((pattern.lower(), known[kind.lower()]))
    for tensor in tensor_names:
        for pattern, kind in rules:
            if re.search(pattern, tensor):
                types[tensor] = kind
                matched[pattern] = matched.get(pattern, 0) + 1
    return types, matched


def test_gguf_type_file_names_the_converted_tensors_and_their_planned_types(tmp_path, mixed):
    import gguf

    # rows of 256 weights: the K-quants' block, so llama-quantize applies every override (no fallback)
    model = tiny_llama(hidden=256, layers=2, inter=512)
    names = linears(model)
    bits = {n: [2, 3, 4, 5, 6, 8, 16][i % 7] for i, n in enumerate(names)}
    plan = plan_for(model, bits, {names[0]: 8}, model_type="llama")
    export = export_plan(plan, "gguf")
    assert export.filename.endswith(".gguf-types.txt")
    assert any("activation" in n for n in export.notes)  # a8 is not something llama.cpp takes
    # a GGUF of the model's weights, named as llama.cpp's converter names them (gguf's own tensor map)
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    gguf_names = {k: name_map.get_name(k, try_suffixes=(".weight",)) for k in state}
    assert all(gguf_names.values()), [k for k, v in gguf_names.items() if not v]
    types, matched = _llama_quantize_types(export.text, list(gguf_names.values()))
    assert set(matched.values()) == {1}, "each pattern names exactly one tensor"
    expect = {"F16": 16, "Q2_K": 2, "Q3_K": 3, "Q4_K": 4, "Q5_K": 5, "Q6_K": 6, "Q8_0": 8}
    for layer in names:
        assert expect[types[gguf_names[layer + ".weight"]]] == bits[layer], layer
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    written = {}
    for key, array in state.items():
        name = gguf_names[key]
        qtype = gguf.GGMLQuantizationType[types.get(name, "F32")]
        if qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, array)
        elif qtype == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name, array.astype(np.float16))
        else:
            try:
                data = gguf.quants.quantize(array, qtype)
            except NotImplementedError:  # gguf-py has no K-quant encoder (llama-quantize has): blocks of the right size
                data = np.zeros(gguf.quants.quant_shape_to_byte_shape(array.shape, qtype), dtype=np.uint8)
            writer.add_tensor(name, data, raw_dtype=qtype)
        written[name] = qtype
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader = gguf.GGUFReader(str(path))
    read = {t.name: t.tensor_type for t in reader.tensors}
    assert read == written
    for layer in names:
        assert expect[read[gguf_names[layer + ".weight"]].name] == bits[layer], layer


def test_exports_that_cannot_be_made_say_why():
    from bitplan.catalog.digits import build

    cnn = build("digits_cnn")
    convs_only = {n: (16 if isinstance(m, nn.Linear) else 4) for n, m in cnn.named_modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d))}
    plan = plan_for(cnn, convs_only, fmt="pt2", model_type=None)
    with pytest.raises(ExportError, match="nothing to export to torchao"):
        export_plan(plan, "torchao")
    with pytest.raises(ExportError, match="Hugging Face checkpoint"):
        export_plan(plan, "gguf")
    with pytest.raises(ExportError, match="unknown export format 'onnx'"):
        export_plan(plan, "onnx")
    with pytest.raises(ExportError, match="no architecture for model_type 'made_up'"):
        export_plan(plan_for(tiny_llama(), model_type="made_up"), "gguf")
    choices = {c["format"]: c for c in export_choices(plan)}
    assert set(choices) == set(FORMATS)
    assert choices["modelopt"]["available"] and not choices["gguf"]["available"]
    assert "Hugging Face" in choices["gguf"]["reason"]


def test_cli_export_writes_beside_the_plan_and_refuses_bad_files(tmp_path, capsys):
    plan_path = tmp_path / "plan-llm.json"
    plan_path.write_text(plan_for(tiny_llama(), {"lm_head": 16}).to_json())
    assert main(["export", str(plan_path), "--to", "compressed-tensors"]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "plan-llm.compressed-tensors.json"
    assert json.loads(written.read_text())["ignore"] == ["lm_head"]
    assert "14 x int4 per channel" in out and "1 x full precision" in out and f"written to {written}" in out
    assert main(["export", str(plan_path), "--to", "gguf", "--out", "-"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("^blk\\.0\\.attn_q\\.weight$=q4_K") and "use: llama-quantize" in captured.err
    (tmp_path / "junk.json").write_text("{}")
    assert main(["export", str(tmp_path / "junk.json"), "--to", "torchao"]) == 2
    assert "is not a plan file" in capsys.readouterr().err


# --- number formats (bitplan.formats): each runtime gets the format where it has one, and says where it has not ---

FORMAT_MIX = ["fp8_e4m3", "nvfp4", "mxfp4", "mxfp8", "nf4", "fp8_e5m2", 4, 16]


@pytest.fixture(scope="module")
def formats_plan():
    model = tiny_llama(hidden=64, layers=1)
    names = linears(model)
    return {n: FORMAT_MIX[i % len(FORMAT_MIX)] for i, n in enumerate(names)}


def test_compressed_tensors_gives_formats_the_presets_weights(formats_plan):
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    presets = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16", "mxfp8": "MXFP8A16"}
    model = tiny_llama(hidden=64, layers=1)
    export = export_plan(plan_for(model, formats_plan), "compressed-tensors")
    config = QuantizationConfig.model_validate_json(export.text)
    apply_quantization_config(model, config)
    for name, choice in formats_plan.items():
        scheme = getattr(model.get_submodule(name), "quantization_scheme", None)
        if choice in (16, "nf4", "fp8_e5m2"):  # no such format in compressed-tensors: left in float, and said
            assert scheme is None and name in config.ignore, name
            continue
        w = scheme.weights
        if choice in presets:
            want = preset_name_to_scheme(presets[choice], ["Linear"]).weights
            assert (w.num_bits, w.type, w.strategy, w.group_size, w.scale_dtype) == \
                (want.num_bits, want.type, want.strategy, want.group_size, want.scale_dtype), name
        elif choice == "fp8_e4m3":
            assert (w.num_bits, w.type, w.strategy) == (8, "float", "channel"), name
        else:
            assert (w.num_bits, w.type, w.strategy) == (4, "int", "channel"), name
    assert any("nf4" in export.layers[n] for n in export.layers) and any("no format" in n for n in export.notes)


def test_modelopt_gives_formats_their_quantizers(formats_plan):
    import modelopt.torch.quantization as mtq
    import yaml

    model = tiny_llama(hidden=64, layers=1)
    export = export_plan(plan_for(model, formats_plan), "modelopt")
    mtq.quantize(model, yaml.safe_load(export.text), lambda m: m(torch.randint(0, 64, (2, 8))))
    want = {"fp8_e4m3": ((4, 3), None), "nvfp4": ((2, 1), (16, (4, 3))),
            "mxfp4": ((2, 1), (32, (8, 0))), "mxfp8": ((4, 3), (32, (8, 0))), 4: (4, None)}
    for name, choice in formats_plan.items():
        wq = model.get_submodule(name).weight_quantizer
        if choice in (16, "nf4", "fp8_e5m2"):
            assert not wq.is_enabled, name
            continue
        bits, block = want[choice]
        assert wq.is_enabled and tuple(np.atleast_1d(wq.num_bits)) == tuple(np.atleast_1d(bits)), name
        if block is None:
            assert wq.axis == 0 and not wq.block_sizes, name
        else:
            sizes = wq.block_sizes
            assert (sizes[-1], tuple(sizes["scale_bits"]), sizes["type"]) == (*block, "dynamic"), name


def test_torchao_and_gguf_take_the_formats_they_have(formats_plan):
    from torchao.core.config import config_from_dict
    from torchao.quantization import quantize_

    model = tiny_llama(hidden=64, layers=1)
    plan = plan_for(model, formats_plan)
    export = export_plan(plan, "torchao")
    quantize_(model, config_from_dict(json.loads(export.text)), filter_fn=None)
    for name, choice in formats_plan.items():
        weight = model.get_submodule(name).weight
        if choice == "fp8_e4m3":
            assert weight.qdata.dtype == torch.float8_e4m3fn, name
        elif choice == 4:
            assert weight.target_dtype == torch.int4, name
        else:  # full precision, and the formats torchao has no stable config for: said, left in float
            assert type(weight) is nn.Parameter, name
            if choice != 16:
                assert export.layers[name].startswith("skipped"), name
    gguf_export = export_plan(plan, "gguf")
    names = {n: n for n in formats_plan}
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 1)
    tensors = {n: name_map.get_name(n + ".weight", try_suffixes=(".weight",)) for n in names}
    types, _ = _llama_quantize_types(gguf_export.text, list(tensors.values()))
    want = {"mxfp4": "MXFP4", "nvfp4": "NVFP4", "fp8_e4m3": "Q8_0", "fp8_e5m2": "Q8_0", "mxfp8": "Q8_0",
            "nf4": "Q4_K", 4: "Q4_K", 16: "F16"}
    assert {n: types[t] for n, t in tensors.items()} == {n: want[c] for n, c in formats_plan.items()}
    assert any("nearest" in note for note in gguf_export.notes)
