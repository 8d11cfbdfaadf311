"""Training without a second copy of the model: quantized layers recompute their on-grid weights
in the backward instead of autograd keeping a copy of each (quant/nn/recompute.py: the same
gradients, bit for bit, and no weight-sized tensor held by the graph), and QuEST's weights step
inside the backward (quest/training.py: the same parameters as one Adam after it)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import diffsqueeze.quant.nn.recompute as recompute
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.recompute import recomputed_quantized_weights
from diffsqueeze.quant.primitives.formats import int_qparams


def _model(split: int = 0) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(32, 48), nn.Conv2d(3, 32, 3, padding=1)]
    out = []
    for layer in layers:
        act = {"format": "int8", "shape": [1], "groups": 1, "n_timesteps": 1}
        q = make_quant_module(layer, {"weight_format": "int4", "group_size": 0, "act": act,
                                      "split": split if isinstance(layer, nn.Linear) else 0})
        for wq, sl in q.weight_parts():
            g = wq.grouped(q.weight.detach()[:, sl])
            s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), wq.fmt.bits, wq.fmt.symmetric)
            wq.set_params(scale=s, zero_point=z)
        for aq in q.act_quantizers():
            aq.set_params(0, torch.full(aq.param_shape, 0.05), None)
            aq.lsq = True  # trainable scales: gradients flow through every layer, as in QuEST
        q.requires_grad_(False)
        for p in (x for aq in q.act_quantizers() for x in aq.parameters()):
            p.requires_grad_(True)
        out.append(q)
    return nn.ModuleList(out)


def _loss(model, x):
    lin, conv = model
    y = conv(x)  # [2, 32, 6, 6]
    return lin(y.permute(0, 2, 3, 1)).square().mean()


@pytest.mark.parametrize("split", [0, 16])
def test_gradients_are_bit_identical(split):
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grads = []
    for wrap in (False, True):
        model = _model(split)
        x.grad = None
        if wrap:
            with recomputed_quantized_weights():
                loss = _loss(model, x)
        else:
            loss = _loss(model, x)
        loss.backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 1
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_the_graph_does_not_hold_the_quantized_weights(monkeypatch):
    """Every tensor autograd saves that shares storage with a layer's quantized weight (the weight,
    or a view: ``linear`` on a 4-D input saves its transpose expanded over the batch) is replaced
    by a note; nothing else is."""
    noted, packed = [], []
    note, pack = recompute._Recorder.note, recompute._Recorder.pack

    def spy_note(self, layer, w):
        noted.append(w.untyped_storage().data_ptr())
        note(self, layer, w)

    def spy_pack(self, t):
        out = pack(self, t)
        packed.append((t.untyped_storage().data_ptr(), isinstance(out, recompute._Saved), t.untyped_storage().nbytes()))
        return out

    monkeypatch.setattr(recompute._Recorder, "note", spy_note)
    monkeypatch.setattr(recompute._Recorder, "pack", spy_pack)
    model = _model()
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    with recomputed_quantized_weights():
        loss = _loss(model, x)
    assert len(noted) == 2
    replaced = [(ptr, n) for ptr, saved, n in packed if saved]
    kept = [ptr for ptr, saved, _ in packed if not saved]
    assert {ptr for ptr, _ in replaced} == set(noted)
    assert sorted({ptr: n for ptr, n in replaced}.values()) == sorted(4 * m.weight.numel() for m in model)
    assert not set(kept) & set(noted)
    loss.backward()


def test_steps_in_backward_equal_one_adam_over_all_parameters():
    """QuEST stage 2 steps each weight inside the backward (its gradient dropped at once): the
    same parameters as one Adam stepping all of them after the backward, bit for bit."""
    from diffsqueeze.quant.quest.training import steps_in_backward

    def train(in_backward: bool):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
        params = list(net.parameters())
        x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
        if in_backward:
            with steps_in_backward(params, lr=1e-2):  # one Adam state per parameter across the steps
                for _ in range(3):
                    net(x).square().mean().backward()
                    assert all(p.grad is None for p in params)
        else:
            opt = torch.optim.Adam(params, lr=1e-2)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                net(x).square().mean().backward()
                opt.step()
        return [p.detach().clone() for p in params]

    assert all(torch.equal(a, b) for a, b in zip(train(False), train(True)))
