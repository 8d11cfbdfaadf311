"""BinaryLinear / BinaryConv2d swaps and attention q/k/probs/v quantization."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffsqueeze.quant.nn.binary_layers import (
    AttentionActQuant,
    BinaryConv2d,
    BinaryLinear,
    install_attention_quant,
    lsq_init_scale,
    make_binary_module,
)
from diffsqueeze.quant.nn.layers import QuantConv2d, QuantLinear
from diffsqueeze.quant.nn.swaps import LAYER_KINDS
from diffsqueeze.quant.primitives.binary import binarize, init_scales


def _conv():
    torch.manual_seed(0)
    return nn.Conv2d(8, 6, 3, padding=1)


@pytest.mark.parametrize("order", [1, 2])
def test_conv_swap_forward_is_binary_conv(order):
    conv = _conv()
    x = torch.randn(2, 8, 5, 5)
    b = make_binary_module(conv, {"order": order, "act": None})
    assert isinstance(b, BinaryConv2d) and isinstance(b, QuantConv2d)
    assert b.weight is conv.weight  # same parameter: masks and state_dict keys still match
    b.weight_quant.init_from(b.weight)
    a1, a2 = init_scales(conv.weight.detach(), order)
    torch.testing.assert_close(b.weight_quant.a1.detach(), a1)
    ref = F.conv2d(x, binarize(conv.weight.detach(), a1, a2, order), conv.bias, padding=1)
    torch.testing.assert_close(b(x), ref)
    b.weight_quant.enabled = False  # progressive init: not yet binarized
    torch.testing.assert_close(b(x), conv(x))


def test_linear_swap_state_dict_roundtrip_through_record():
    torch.manual_seed(1)
    lin = nn.Linear(16, 12)
    rec = {"kind": "BinaryLinear", "order": 2, "masked": False,
           "act": {"format": "int4_sym", "shape": [1], "groups": 1, "n_timesteps": 1}}
    b = make_binary_module(copy.deepcopy(lin), {k: v for k, v in rec.items() if k != "kind"})
    assert isinstance(b, BinaryLinear) and isinstance(b, QuantLinear)
    b.weight_quant.init_from(b.weight)
    with torch.no_grad():
        b.act_quant.scale.fill_(0.3)
    sd = b.state_dict()
    assert {"weight", "bias", "weight_quant.a1", "weight_quant.a2", "act_quant.scale"} <= set(sd)
    fresh = LAYER_KINDS["BinaryLinear"].rebuild(copy.deepcopy(lin), rec)
    fresh.load_state_dict(sd, strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(fresh(x), b(x))


def test_pruned_weights_stay_zero_and_get_no_gradient():
    conv = _conv()
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        conv.weight.mul_(mask)
    b = make_binary_module(conv, {"order": 2, "masked": True, "act": None})
    b.weight_quant.init_from(b.weight)
    wq = b.binary_weight()
    assert (wq[~mask] == 0).all() and (wq[mask] != 0).all()
    b(torch.randn(2, 8, 5, 5)).square().sum().backward()
    assert (b.weight.grad[~mask] == 0).all()
    assert b.weight.grad[mask].abs().sum() > 0
    opt = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.01)
    opt.step()
    assert (b.weight.detach()[~mask] == 0).all()  # zero grad, zero weight: AdamW keeps it at zero


def test_lsq_scale_learns():
    torch.manual_seed(2)
    lin = nn.Linear(16, 4)
    b = make_binary_module(lin, {"order": 1, "act": {"format": "int4_sym", "shape": [1], "groups": 1, "n_timesteps": 1}})
    b.weight_quant.init_from(b.weight)
    x = torch.randn(32, 16)
    s = float(lsq_init_scale(x.abs().mean(), 7))
    assert s == pytest.approx(2 * float(x.abs().mean()) / 7**0.5)
    with torch.no_grad():
        b.act_quant.scale.fill_(s)
    assert b.act_quant.lsq
    b(x).sum().backward()
    assert b.act_quant.scale.grad is not None and b.act_quant.scale.grad.abs().sum() > 0
    # quantized input lies on the 4-bit grid
    xq = b.quantized_input(x).detach()
    codes = xq / s
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.min() >= -8 and codes.max() <= 7


def test_attention_quant_on_tiny_sd(tiny_sd):
    attn = copy.deepcopy(tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1)
    x = torch.randn(2, 64, 32)
    ref = attn(x)
    quant = install_attention_quant(attn, bits=8, prob_bits=8)
    assert isinstance(quant, AttentionActQuant)
    for q in quant.quantizers():
        q.enabled = False
    torch.testing.assert_close(attn(x), ref)
    for q in quant.quantizers():
        q.enabled = True
    with torch.no_grad():
        for q in (quant.q, quant.k, quant.v):
            q.scale.fill_(0.05)
        quant.probs.scale.fill_(1 / 255)
    out8 = attn(x)
    assert not torch.equal(out8, ref)
    assert (out8 - ref).abs().max() < 0.1 * ref.abs().max()
    keys = set(attn.state_dict())
    assert "binarydm_act_quant.q.scale" in keys and "binarydm_act_quant.probs.scale" in keys
    # rebuild from a record on a fresh module, then load: identical output
    fresh = copy.deepcopy(tiny_sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1)
    fresh = LAYER_KINDS["BinaryDMAttention"].rebuild(fresh, {"kind": "BinaryDMAttention", "bits": 8, "prob_bits": 8})
    fresh.load_state_dict(attn.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), out8)
    # gradients reach the LSQ scales through the quantized SDPA
    attn(x).sum().backward()
    assert quant.q.scale.grad is not None and quant.probs.scale.grad is not None
