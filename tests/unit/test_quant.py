import torch

from bitplan.core.quant import WeightBank, fake_quant_activation, quantize_weight


def _weights(shape=(8, 3, 3, 3), seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_each_channel_uses_at_most_the_levels_of_its_bit_width():
    w = _weights()
    for bits in (2, 3, 4, 8):
        q = quantize_weight(w, bits)
        for channel in q.reshape(q.shape[0], -1):
            assert channel.unique().numel() <= 2 ** bits - 1


def test_quantization_is_symmetric_per_channel():
    w = _weights()
    q = quantize_weight(w, 4, clip="minmax").reshape(8, -1)
    scale = w.reshape(8, -1).abs().amax(1) / 7
    codes = q / scale[:, None]
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.abs().max() <= 7 + 1e-4


def test_mse_clipping_never_loses_to_minmax():
    w = torch.cat([_weights(), _weights(seed=1) * 10])  # heavy tails in some channels
    for bits in (2, 3, 4, 6):
        mse = (quantize_weight(w, bits, "mse") - w).pow(2).sum()
        minmax = (quantize_weight(w, bits, "minmax") - w).pow(2).sum()
        assert mse <= minmax + 1e-6


def test_error_shrinks_as_bits_grow_and_16_is_exact():
    w = _weights()
    bank = WeightBank({"w": w})
    errors = [bank.error_sq("w", b) for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert bank.error_sq("w", 16) == 0.0


def test_activation_fake_quant_has_2_pow_b_levels_and_passes_gradients():
    x = torch.linspace(-1, 3, 1000, requires_grad=True)
    y = fake_quant_activation(x, -1.0, 3.0, 4)
    assert y.detach().unique().numel() <= 16
    assert (y.detach() - x.detach()).abs().max() <= 4 / 15 / 2 + 1e-6
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
