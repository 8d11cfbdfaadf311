"""Accounting (docs/methods.md §9): packed export round trip, OPs = FP MACs + MACs b_w b_a / 64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffsqueeze.quant.export.accounting import ops_count, read_packed, write_packed
from diffsqueeze.quant.nn.binary_layers import make_binary_module


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.body(self.conv_in(x))
        return self.fc(h.mean(dim=(2, 3)))


def _binarize(model: Toy, order: int, act_bits: int | None, masked: bool = False) -> None:
    for name in ("body", "fc"):
        layer = getattr(model, name)
        act = {"format": f"int{act_bits}_sym", "shape": [1], "groups": 1, "n_timesteps": 1} if act_bits else None
        b = make_binary_module(layer, {"order": order, "masked": masked, "act": act})
        b.weight_quant.init_from(b.weight)
        setattr(model, name, b)


def test_ops_formula():
    torch.manual_seed(0)
    model = Toy()
    x = torch.randn(1, 3, 5, 5)
    call = lambda m, kw: m(kw["x"])  # noqa: E731
    fp = ops_count(model, {"x": x}, call)
    macs_in, macs_body, macs_fc = 25 * 8 * 3 * 9, 25 * 8 * 8 * 9, 4 * 8
    assert fp["macs"] == macs_in + macs_body + macs_fc and fp["ops"] == fp["macs"]
    _binarize(model, order=2, act_bits=4)
    q = ops_count(model, {"x": x}, call)
    assert q["macs"] == fp["macs"]
    assert q["fp_macs"] == macs_in
    assert q["ops"] == macs_in + (macs_body + macs_fc) * 2 * 4 / 64
    assert q["layers"]["body"]["b_w"] == 2 and q["layers"]["body"]["b_a"] == 4


def test_ops_w1a32():
    torch.manual_seed(0)
    model = Toy()
    _binarize(model, order=1, act_bits=None)
    q = ops_count(model, {"x": torch.randn(1, 3, 5, 5)}, lambda m, kw: m(kw["x"]))
    assert q["layers"]["fc"]["b_a"] == 32 and q["layers"]["fc"]["b_w"] == 1
    assert q["ops"] == 25 * 8 * 3 * 9 + (25 * 8 * 8 * 9 + 32) * 32 / 64


def test_packed_export_restores_binary_weights_exactly(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        model.body.weight.mul_(torch.rand_like(model.body.weight) > 0.5)  # pruned
    _binarize(model, order=2, act_bits=4, masked=True)
    with torch.no_grad():  # learned scales may leave the initialization (a2 > a1 here)
        model.fc.weight_quant.a2.mul_(5.0)
        model.body.act_quant.scale.fill_(0.123)
    info = write_packed(model, tmp_path / "toy.safetensors")
    assert info["bytes"] == (tmp_path / "toy.safetensors").stat().st_size
    assert info["breakdown_bytes"]["binary_codes"] == 2 * (72 + 4)  # 576 bits and 32 bits, two bases
    assert info["breakdown_bytes"]["masks"] == 72 + 4  # keep bits of both masked layers
    fresh = Toy()
    _binarize(fresh, order=2, act_bits=4, masked=True)
    read_packed(fresh, tmp_path / "toy.safetensors")
    for name in ("body", "fc"):
        assert torch.equal(getattr(fresh, name).binary_weight(), getattr(model, name).binary_weight())
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    fp32 = sum(t.numel() * 4 for t in Toy().state_dict().values())
    assert info["bytes"] < fp32


@pytest.mark.slow
def test_sd15_unet_architecture_packed_size_and_ops(tmp_path):
    """SD-1.5 UNet architecture (random weights: sizes and OPs do not depend on values), W1A4 policy.

    Prints the numbers quoted in docs/binarydm.md (run with ``-m slow -s``).
    """
    from diffusers import UNet2DConditionModel

    from diffsqueeze.pipelines.stage_helpers import call_denoiser
    from diffsqueeze.quant.binarydm.config import BinarizeConfig
    from diffsqueeze.quant.binarydm.policy import block_groups, plan_layers
    from diffsqueeze.quant.export.accounting import fp32_bytes
    from diffsqueeze.quant.nn.binary_layers import install_attention_quant

    unet = UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).eval().requires_grad_(False)
    kwargs = {"sample": torch.randn(1, 4, 64, 64), "timestep": torch.tensor([500]),
              "encoder_hidden_states": torch.randn(1, 77, 768)}
    fp_bytes = fp32_bytes(unet, tmp_path / "fp32.safetensors")
    (tmp_path / "fp32.safetensors").unlink()
    fp_ops = ops_count(unet, kwargs, call_denoiser)
    order, groups = block_groups(unet, kwargs)
    cfg = BinarizeConfig()
    for plan in plan_layers(unet, order, groups, cfg):
        if plan.order is None:
            continue
        layer = unet.get_submodule(plan.name)
        shape = [1]
        b = make_binary_module(layer, {"order": plan.order, "act": {"format": "int4_sym", "shape": shape,
                                                                   "groups": 1, "n_timesteps": 1}})
        b.weight_quant.init_from(b.weight)
        from diffsqueeze.quant.nn.swaps import swap_module

        swap_module(unet, plan.name, b)
    for name, m in list(unet.named_modules()):
        if hasattr(m, "set_processor") and hasattr(m, "processor") and any(name.startswith(o + ".") for o in order):
            install_attention_quant(m, 4, 4)
    q_ops = ops_count(unet, kwargs, call_denoiser)
    info = write_packed(unet, tmp_path / "packed.safetensors")
    ratio = fp_bytes / info["bytes"]
    saving = fp_ops["ops"] / q_ops["ops"]
    print(f"\nSD-1.5 UNet W1A4 BinaryDM policy: FP32 {fp_bytes / 2**20:.1f} MiB, packed {info['bytes'] / 2**20:.1f} MiB "
          f"({ratio:.1f}x); breakdown {info['breakdown_bytes']}; OPs FP32 {fp_ops['ops'] / 1e9:.2f} G, "
          f"W1A4 {q_ops['ops'] / 1e9:.2f} G ({saving:.1f}x)")
    assert ratio > 20 and saving > 5  # measured: 28.1x and 9.3x
