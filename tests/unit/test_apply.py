"""bitplan apply: the compressed-tensors checkpoint it writes loads in transformers and computes exactly what bitplan
measured (its weights are Q_b(W), bit for bit), and its size is accounted for to the byte."""

from __future__ import annotations

import json
import struct
import warnings

import pytest
import torch
from torch import nn

from bitplan.archives.hf import check_checkpoint
from bitplan.cli import main
from bitplan.core.apply import apply_plan, weight_scale
from bitplan.core.quant import quantize_format, quantize_weight
from bitplan.errors import BitplanError, ExportError
from tests.hf_checkpoint import build_checkpoint
from tests.plans import plan_for

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("apply") / "tiny-llama")


def _hf(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def _plan(ckpt, bits):
    plan = plan_for(_hf(ckpt), bits)
    return plan.model_copy(update={"model": plan.model.model_copy(update={"sha256": check_checkpoint(ckpt).sha256})})


def test_weight_scale_is_the_scale_quantize_weight_used():
    w = torch.randn(16, 40)
    for bits in (2, 3, 4, 6, 8):
        q, scale = weight_scale(w, bits, "mse")
        k = q.reshape(16, -1) / scale
        assert torch.equal(q, quantize_weight(w, bits, "mse"))
        assert torch.allclose(k, k.round(), atol=1e-4) and k.abs().max() <= 2 ** (bits - 1) - 1 + 1e-4


def test_the_checkpoint_computes_what_bitplan_measured_and_its_size_is_accounted(ckpt, tmp_path):
    model = _hf(ckpt)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    bits = {n: [2, 3, 4, 5, 6, 8, 16][i % 7] for i, n in enumerate(names)}
    plan = _plan(ckpt, bits)
    report = apply_plan(plan, ckpt, tmp_path / "out", latency=True)
    assert report.layers == sum(b < 16 for b in bits.values())
    # bitplan's own fake-quantized model (what the plan's figures were measured on) ...
    with torch.no_grad():
        for name, b in bits.items():
            if b < 16:
                weight = model.get_submodule(name).weight
                weight.copy_(quantize_weight(weight, b, "mse"))
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    # ... and the written checkpoint, loaded by transformers' compressed-tensors integration: the same logits
    loaded = _hf(report.out)
    assert isinstance(loaded.model.layers[0].self_attn.k_proj.weight_packed, torch.Tensor)  # stored packed
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    config = json.loads((report.out / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    assert {g["format"] for g in groups.values()} >= {"pack-quantized"}
    assert (report.out / "tokenizer.json").exists()
    # the size: every stored byte is the counted tensors plus each file's safetensors header
    headers = 0
    for path in report.out.glob("*.safetensors"):
        with open(path, "rb") as f:
            headers += 8 + struct.unpack("<Q", f.read(8))[0]
    assert report.real_bytes == report.container_bytes + headers
    assert report.latency_ms and report.latency_ms["full_precision"] > 0 and report.latency_ms["torchao"] > 0


def test_format_scales_are_compressed_tensors_own():
    """bitplan's format quantizers and compressed-tensors' quantize/dequantize, given bitplan's scales, agree: the
    elements a checkpoint stores are bitplan's Q_f(W)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    from bitplan.core.quant import format_scales, quantize_format
    from bitplan.exports import CT_FORMATS

    # a partial last block of 16 and 32 (compressed-tensors takes whole blocks: padding with zeros keeps each block's
    # amax), and a row and a block of zeros (E8M0 and E4M3 keep their least scale: nothing wraps to NaN)
    w = torch.randn(8, 80, generator=torch.Generator().manual_seed(0)) * 0.05
    w[1], w[2, :32] = 0.0, 0.0
    for name, args in CT_FORMATS.items():
        q, scale, tensor_scale = format_scales(w, name)
        assert torch.equal(q, quantize_format(w, name))
        args = QuantizationArgs.model_validate(args)
        if name == "fp8_e4m3":
            continue  # one scale per row: the blocks of 80 below are the other formats'
        cols = -(-80 // args.group_size) * args.group_size
        padded = torch.nn.functional.pad(w, (0, cols - 80))
        zero = torch.zeros_like(scale)
        back = dequantize(quantize(padded, scale, zero, args, global_scale=tensor_scale), scale, zero, args,
                          global_scale=tensor_scale)[:, :80]
        assert torch.allclose(back, q, rtol=0, atol=1e-7), name
    q, scale, _ = format_scales(w, "fp8_e4m3")
    args = QuantizationArgs.model_validate(CT_FORMATS["fp8_e4m3"])
    assert scale.shape == (8, 1)
    assert torch.equal(dequantize(quantize(w, scale, torch.zeros_like(scale), args), scale, None, args), q)


def test_a_plan_with_number_formats_is_stored_in_compressed_tensors_formats(ckpt, tmp_path):
    """fp8_e4m3, mxfp8, mxfp4 and nvfp4 beside INT layers: a mixed-precision checkpoint whose decompressed weights are
    bitplan's Q_f(W) (exactly; nvfp4 within the bfloat16 that compressed-tensors decompresses it in), every byte
    accounted for."""
    model = _hf(ckpt)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    cycle = ["fp8_e4m3", "mxfp8", "mxfp4", "nvfp4", 4, 8, 16]
    choices = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    report = apply_plan(_plan(ckpt, choices), ckpt, tmp_path / "out")
    assert report.layers == sum(c != 16 for c in choices.values())
    config = json.loads((report.out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "mixed-precision"
    assert sorted(g["format"] for g in config["config_groups"].values()) == sorted(
        ["float-quantized", "mxfp8-quantized", "mxfp4-pack-quantized", "nvfp4-pack-quantized", "pack-quantized",
         "pack-quantized"])
    loaded = _hf(report.out)
    loaded.hf_quantizer.compressor.decompress_model(loaded)
    for name, choice in choices.items():
        if choice == 16:
            continue
        weight = model.get_submodule(name).weight
        ref = quantize_weight(weight, choice, "mse") if isinstance(choice, int) else quantize_format(weight, choice)
        got = loaded.get_submodule(name).weight.float()
        if choice == "nvfp4":
            assert torch.allclose(got, ref, rtol=2**-8, atol=0), name
        else:
            assert torch.equal(got, ref), (name, choice)
    headers = 0
    for path in report.out.glob("*.safetensors"):
        with open(path, "rb") as f:
            headers += 8 + struct.unpack("<Q", f.read(8))[0]
    assert report.real_bytes == report.container_bytes + headers


def test_apply_refuses_what_it_cannot_do_and_leaves_nothing(ckpt, tmp_path):
    plan = _plan(ckpt, {})
    with pytest.raises(BitplanError, match="made for another model"):
        apply_plan(plan.model_copy(update={"model": plan.model.model_copy(update={"sha256": "1" * 64})}), ckpt,
                   tmp_path / "a")
    with pytest.raises(ExportError, match="Hugging Face checkpoints; this plan is of a pt2 model"):
        apply_plan(plan.model_copy(update={"model": plan.model.model_copy(update={"format": "pt2"})}), ckpt,
                   tmp_path / "b")
    with pytest.raises(BitplanError, match=r"does not store \(nf4\); bitplan apply writes INT, fp8_e4m3"):
        apply_plan(_plan(ckpt, {"lm_head": "nf4"}), ckpt, tmp_path / "d")
    odd = build_checkpoint(tmp_path.parent / f"{tmp_path.name}-odd" / "llama", hidden=48)  # 48 inputs: 1.5 MX blocks
    with pytest.raises(BitplanError, match=r"whole number of blocks .*not lm_head \(mxfp4, 48 columns\)"):
        apply_plan(_plan(odd, {"lm_head": "mxfp4", "model.layers.0.mlp.down_proj": "nvfp4"}), odd, tmp_path / "e")
    (tmp_path / "c").mkdir()
    with pytest.raises(BitplanError, match="already exists"):
        apply_plan(plan, ckpt, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # nothing half-written


def test_cli_apply_prints_the_size_beside_the_prediction(ckpt, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(_plan(ckpt, {"lm_head": 8}).to_json())
    assert main(["apply", str(plan_path), str(ckpt), "--out", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "wrote a compressed-tensors checkpoint (15 layers quantized)" in out and "size: real" in out
