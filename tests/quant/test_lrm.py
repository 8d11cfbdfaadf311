"""Low-rank representation mimicking (docs/methods.md §7): features, PCA projection, loss, hooks."""

from __future__ import annotations

import torch
from torch import nn

from diffsqueeze.pipelines.stage_helpers import capture_outputs
from diffsqueeze.quant.binarydm.lrm import (
    LowRankMimicking,
    block_outputs,
    features_2d,
    output_tensors,
    pca_projection,
)


def test_features_2d_flattens_over_the_channel_dim():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    f = features_2d(x)
    assert f.shape == (40, 3)
    torch.testing.assert_close(f[7], x[0, :, 1, 2])
    assert features_2d(torch.zeros(2, 7, 9)).shape == (14, 9)


def test_output_tensors():
    a, b = torch.zeros(1), torch.ones(1)
    assert output_tensors(a)[0] is a
    out = output_tensors((a, (b,)))
    assert out[0] is a and out[1] is None


def test_pca_projection_spans_top_principal_directions():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    scales = torch.tensor([10.0, 8.0, 6.0, 5.0] + [0.1] * 12, dtype=torch.float64)
    x = (torch.randn(2000, 16, generator=g, dtype=torch.float64) * scales) @ basis.T + 3.0
    k = pca_projection(x.float(), 4).double()
    assert k.shape == (16, 4)
    ref = torch.linalg.svd(x - x.mean(0), full_matrices=False).Vh[:4].T  # float64 reference
    cos = torch.linalg.svdvals(k.T @ ref)  # principal angles between the subspaces
    assert cos.min() > 0.999


def test_lrm_loss_and_gradient():
    torch.manual_seed(0)
    teacher = {"blk#0": torch.randn(4, 8, 6, 6), "tok#0": torch.randn(2, 10, 12)}
    lrm = LowRankMimicking(["blk", "tok"])
    lrm.fit(teacher)
    assert lrm.proj["blk#0"].shape == (8, 2) and lrm.proj["tok#0"].shape == (12, 3)
    assert lrm.loss(teacher, teacher).item() == 0.0
    student = {k: (v + 0.1 * torch.randn_like(v)).requires_grad_(True) for k, v in teacher.items()}
    loss = lrm.loss(student, teacher)
    # reference: mean over outputs of mean((s - t) K)^2
    ref = torch.stack([(features_2d(student[k] - teacher[k]) @ lrm.proj[k]).pow(2).mean() for k in lrm.keys]).mean()
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert student["blk#0"].grad.abs().sum() > 0


def test_capture_outputs_removes_hooks():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with capture_outputs(net, ["0", "2"]) as raw:
        net(torch.randn(3, 4))
    assert set(block_outputs(raw)) == {"0#0", "2#0"}
    assert not net[0]._forward_hooks and not net[2]._forward_hooks
