"""Data-parallel training stages: a 2-process CPU launch (gloo, torchrun: the environment
``accelerate launch`` also sets) gives the model of the 1-process run, up to the order of the
gradient sums; only the main process writes the run directory."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.grid import generate_images
from diffsqueeze.pipelines.distributed import row_share, sum_gradients
from diffsqueeze.pipelines.stage_helpers import own_rows
from diffsqueeze.quant.nn.quantizers import ActQuantizer, WeightQuantizer
from diffsqueeze.quant.primitives.formats import int_qparams

CALIB = {"num_samples": 4, "batch_size": 2, "timesteps": 2, "num_inference_steps": 2, "guidance_scale": 2.0}
RECIPES = {
    "adaround-lsq-quest": [
        {"ptq": {"weights": {"bits": 4, "format": "int"},
                 "activations": {"bits": 8, "format": "int", "lsq_iters": 4, "search_values": 4096},
                 "rounding": {"method": "adaround", "iters": 8, "batch_size": 4}, "batch_size": 4}},
        {"quest": {"time_layers": ["auto"], "sensitive_layers": {"select": "pattern", "patterns": ["*ff.net.*"]},
                   "stage1": {"epochs": 2, "samples": 4, "batch_size": 4},
                   "stage2": {"epochs": 2, "samples": 4, "batch_size": 4}}}],
    "binarize": [{"binarize": {"train": {"iters": 6, "batch_size": 4}}}],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, name: str, stages: list, processes: int):
    out = tmp_path / f"{name}-{processes}"
    recipe = {"model": "builtin:tiny-sd", "seed": 0, "device": "cpu", "output_dir": str(out), "calibration": CALIB,
              "stages": stages}
    path = tmp_path / f"{name}-{processes}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        argv = [sys.executable, "-m", "diffsqueeze", "run", str(path)]
    else:
        argv = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                f"--master_port={_free_port()}", "-m", "diffsqueeze", "run", str(path)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _images(run):
    pipe = load_pipeline(str(run / "model"))
    return generate_images(pipe, ["a photo of a cat", "a red car"], [0, 1], 4, 2.0).float()


@pytest.mark.parametrize("name", list(RECIPES))
def test_two_processes_give_the_one_process_model(tmp_path, name):
    one = _run(tmp_path, name, RECIPES[name], 1)
    two = _run(tmp_path, name, RECIPES[name], 2)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert not list(Path(tempfile.gettempdir()).glob("diffsqueeze-rank*")), "a follower left its scratch folder"
    a = load_file(str(one / "model" / "unet" / "diffsqueeze_packed.safetensors"))
    b = load_file(str(two / "model" / "unet" / "diffsqueeze_packed.safetensors"))
    assert a.keys() == b.keys()
    if name == "binarize":
        # No rounding boundary in the trained path, but AdamW divides by sqrt(v): an element whose
        # gradient is within order-of-sum noise of 0 can step by up to lr either way. Measured
        # (6 steps, lr 2e-5): 0.07% of elements differ by more than lr / 10, none by lr / 4. Without
        # the gradient sum each process would step on its own rows: most elements off by ~lr.
        lr, iters = 2e-5, RECIPES[name][0]["binarize"]["train"]["iters"]
        diff = torch.cat([(x.float() - b[k].float()).abs().flatten() for k, x in a.items() if x.is_floating_point()])
        assert diff.max() <= iters * lr
        assert (diff > lr / 10).float().mean() <= 0.005
        return
    # LSQ steps (PTQ, QuEST) move scales by Adam: a gradient within order-of-sum noise of 0 can
    # take the other sign, and the rounding boundaries amplify it (the first step's gradients
    # agree to 1e-7, test below); QuEST's weight steps then move a few codes (measured: 99.7% the
    # same) and the two models agree to about 50 dB on their images
    codes = [(x, b[k]) for k, x in a.items() if not x.is_floating_point()]
    same = sum(int((x == y).sum()) for x, y in codes) / sum(x.numel() for x, _ in codes)
    assert same >= 0.99
    mse = ((_images(one) - _images(two)) ** 2).mean()
    assert mse == 0 or 10 * torch.log10(255**2 / mse) >= 40


def _step_grads(x, y, w, bias, rank: int = 0, world: int = 1, init: str | None = None, out: str | None = None):
    """One LSQ + AdaRound + weight gradient of a quantized linear layer on rows x -> y; with
    ``world`` > 1 in a gloo process group, on this process's rows, summed (train_loop's path)."""
    import torch.distributed as dist

    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    wq = WeightQuantizer("int4", tuple(w.shape))
    g = wq.grouped(w)
    s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), 4, False)
    wq.set_params(scale=s, zero_point=z)
    wq.init_rounding(w)
    aq = ActQuantizer("int8")
    aq.set_params(0, x.abs().max() / 127, torch.tensor(0.0))
    aq.lsq = True
    weight = torch.nn.Parameter(w.clone())
    params = [wq.alpha, aq.scale, weight]
    _, kwargs, (target,), share = own_rows((), {"x": x}, y)
    out_q = torch.nn.functional.linear(aq(kwargs["x"]), wq.quantize_learned(weight) + 0 * weight, bias)
    loss = ((out_q - target) ** 2).sum() / target.shape[0] * share
    loss.backward()
    sum_gradients(params)
    grads = [p.grad.clone() for p in params]
    if world > 1:
        if rank == 0:
            torch.save(grads, out)
        dist.destroy_process_group()
    return grads


def _step_worker(rank: int, x, y, w, bias, world: int, init: str, out: str):
    _step_grads(x, y, w, bias, rank, world, init, out)


def test_one_training_step_sums_to_the_whole_batch_gradient(tmp_path):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(7, 12, generator=g), torch.randn(6, 12, generator=g) * 0.2
    y, bias = torch.randn(7, 6, generator=g), torch.randn(6, generator=g)
    whole = _step_grads(x, y, w, bias)
    out = str(tmp_path / "grads.pt")
    torch.multiprocessing.spawn(_step_worker, args=(x, y, w, bias, 2, f"file://{tmp_path / 'pg'}", out), nprocs=2)
    split = torch.load(out)
    for a, b in zip(whole, split):  # 7 rows: 4 and 3, each weighted by its share
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_row_share_splits_rows_and_weights_sum_to_one(monkeypatch):
    import diffsqueeze.pipelines.distributed as D

    assert row_share(5) == (None, 1.0)
    monkeypatch.setattr(D, "_step_share", 1.0)  # restored after the test: LSQ reads it
    monkeypatch.setattr(D, "world_size", lambda: 2)
    for r in (0, 1):
        monkeypatch.setattr(D, "rank", lambda r=r: r)
        idx, share = D.row_share(5)
        assert idx.tolist() == list(range(r, 5, 2)) and share == len(idx) / 5
    with pytest.raises(ValueError, match="a training batch of 1 rows cannot be split over 2 processes"):
        D.row_share(1)
