"""Training checkpoints of the builtin-model scripts: atomic safetensors, exact resume."""

import torch

from diffsqueeze.models.fashion.checkpoint import load_checkpoint, save_checkpoint


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(4, 3, generator=g)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_resume_is_exact(tmp_path):
    torch.manual_seed(0)
    a = torch.nn.Linear(3, 2)
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
    _step(a, opt_a, 0)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, a, opt_a, {"step": 1}, extra={"ema.w": a.weight * 2})
    assert not list(tmp_path.glob("*.tmp"))

    b = torch.nn.Linear(3, 2)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    meta, extra = load_checkpoint(path, b, opt_b)
    assert meta["step"] == 1 and torch.equal(extra["ema.w"], a.weight * 2)
    _step(a, opt_a, 1)
    _step(b, opt_b, 1)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
