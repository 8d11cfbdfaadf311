"""Denoiser speed of FP32 against W8A8 INT, simulated (decode + float math) and real (oneDNN int8
kernels), measured side by side in one process, in turns, so the ratios hold on a noisy machine.

Two models:

* ``--run RUN``: a W8A8 INT run of builtin:fashion (e.g. ``configs/w8a8_int.yaml``); end-to-end
  seconds per image (its sampler, 10 steps, guidance 2) for FP32, the run loaded simulated, real,
  and with ``decode: once``; PSNR of the real images against the simulated ones.
* ``--sd15``: the Stable Diffusion 1.5 UNet architecture (diffusers' config, 860M parameters)
  with random weights (speed does not depend on weight values), every conv/linear quantized
  W8A8 INT round-to-nearest (per-channel asymmetric int8 weights from their min/max, per-tensor
  int8 activations scaled on one forward), packed as export packs it; one denoiser forward at
  32x32 latents, batch 2. ``--small`` uses a narrow UNet of the same layout (a dry run, seconds).

Usage:
    python scripts/bench_speed.py --run runs/w8a8_int --run runs/w8a8_int_sym --sd15 --out docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffsqueeze.metrics.compare import write_marked_section  # noqa: E402
from diffsqueeze.quant.export.kernels import decode_weights_once, use_real_kernels  # noqa: E402
from diffsqueeze.quant.export.save import pack_layer  # noqa: E402
from diffsqueeze.quant.nn.layers import make_quant_module  # noqa: E402
from diffsqueeze.quant.primitives.formats import int_qparams  # noqa: E402

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SMALL_UNET = {**SD15_UNET, "block_out_channels": (32, 64, 64, 64), "cross_attention_dim": 64, "norm_num_groups": 8}


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def timed_in_turns(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each callable; every round calls each once, in turns (after a warm-up)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


@torch.no_grad()
def w8a8_int_packed(unet: nn.Module, kwargs: dict) -> None:
    """Quantize every conv/linear of ``unet`` W8A8 INT round-to-nearest and pack it, in place."""
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    amax: dict[str, float] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: amax.__setitem__(n, float(a[0].abs().max())))
             for n, m in layers]
    unet(**kwargs)
    for h in hooks:
        h.remove()
    for name, layer in layers:
        q = make_quant_module(layer, {"weight_format": "int8", "act": {"format": "int8", "shape": [1]}})
        wq = q.weight_quant
        g = wq.grouped(q.weight.detach())
        s, z = int_qparams(g.amin(-1, keepdim=True), g.amax(-1, keepdim=True), 8, False)
        wq.set_params(scale=s, zero_point=z)
        a = max(amax.get(name, 1.0), 1e-6)
        q.act_quant.set_params(0, torch.tensor(2 * a / 255), torch.tensor(127.0))
        packed, entry = pack_layer(q)
        if packed is None:
            raise RuntimeError(f"{name}: {entry.get('reason')}")
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, packed)
        layer.weight = None  # the float weight goes: the packed codes replace it


class Holder(nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    @property
    def components(self):
        return {"unet": self.unet}


def bench_sd15(small: bool, repeats: int) -> list[str]:
    import copy

    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    config = SMALL_UNET if small else SD15_UNET
    fp = UNet2DConditionModel(**config).eval()
    params = sum(p.numel() for p in fp.parameters())
    kwargs = {"sample": torch.randn(2, 4, 32, 32), "timestep": torch.tensor([500, 500]),
              "encoder_hidden_states": torch.randn(2, 77, config["cross_attention_dim"]), "return_dict": False}
    sim = copy.deepcopy(fp)
    w8a8_int_packed(sim, kwargs)
    real = copy.deepcopy(sim)
    plan = use_real_kernels(Holder(real), device="cpu")
    n_real = sum(v["compute"] == "real" for v in plan.values())
    once = copy.deepcopy(sim)
    decode_weights_once(Holder(once))
    with torch.no_grad():
        ref, out = sim(**kwargs)[0], real(**kwargs)[0]
    rel = float((ref - out).norm() / ref.norm())
    fns = {k: (lambda m=m: m(**kwargs)) for k, m in (("fp32", fp), ("sim", sim), ("once", once), ("real", real))}
    with torch.no_grad():
        t = timed_in_turns(fns, repeats)
    name = "SD-1.5-layout UNet, narrow (dry run)" if small else "SD-1.5 UNet (860M, random weights)"
    where = f"one denoiser forward, latents 2x4x32x32, text 2x77x{config['cross_attention_dim']}, CPU ({machine()})"
    rows = [f"| {name} | FP32 | {t['fp32']:.3f} | 1.00x | - | {params / 1e6:.0f}M params |",
            f"| {name} | W8A8 INT simulated (decode per forward) | {t['sim']:.3f} | {t['fp32'] / t['sim']:.2f}x | - | |",
            f"| {name} | W8A8 INT simulated, decode once | {t['once']:.3f} | {t['fp32'] / t['once']:.2f}x | - | |",
            f"| {name} | W8A8 INT real (oneDNN int8) | {t['real']:.3f} | {t['fp32'] / t['real']:.2f}x | "
            f"output rel. diff to simulated {rel:.2e} | {n_real} of {len(plan)} layers real |"]
    return [f"<!-- {where} -->", *rows]


def bench_run(run: str, repeats: int, num_images: int) -> list[str]:
    import diffsqueeze
    from diffsqueeze.metrics.fidelity import per_image_fidelity
    from diffsqueeze.metrics.grid import generate_images
    from diffsqueeze.models.prompts import load_prompts

    prompts = load_prompts("builtin:fashion")
    ps, seeds = [prompts[i % len(prompts)] for i in range(num_images)], list(range(num_images))
    pipes = {"fp32": diffsqueeze.load("builtin:fashion"), "sim": diffsqueeze.load(run),
             "once": diffsqueeze.load(run, decode="once"), "real": diffsqueeze.load(run, kernels="real")}
    for p in pipes.values():
        p.set_progress_bar_config(disable=True)
    images = {}

    def gen(k):
        images[k] = generate_images(pipes[k], ps, seeds, 10, 2.0, batch_size=num_images)

    with torch.no_grad():
        t = timed_in_turns({k: (lambda k=k: gen(k)) for k in pipes}, repeats)
    psnr = float(per_image_fidelity(images["real"], images["sim"])["psnr"].mean())
    name = f"builtin:fashion, `{run}`"
    per = {k: v / num_images for k, v in t.items()}
    return [f"<!-- end to end: {num_images} images per call (prompts builtin:fashion, seeds 0..{num_images - 1}), "
            f"DDIM 10 steps, guidance 2, CPU ({machine()}) -->",
            f"| {name} | FP32 | {per['fp32']:.3f} | 1.00x | - | s per image |",
            f"| {name} | W8A8 INT simulated | {per['sim']:.3f} | {t['fp32'] / t['sim']:.2f}x | - | |",
            f"| {name} | W8A8 INT simulated, decode once | {per['once']:.3f} | {t['fp32'] / t['once']:.2f}x | - | |",
            f"| {name} | W8A8 INT real (oneDNN int8) | {per['real']:.3f} | {t['fp32'] / t['real']:.2f}x | "
            f"images vs simulated PSNR {psnr:.2f} dB | |"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", default=[], help="a W8A8 INT run (or model folder) of builtin:fashion (repeatable)")
    p.add_argument("--sd15", action="store_true", help="the SD-1.5 UNet architecture rows")
    p.add_argument("--small", action="store_true", help="a narrow UNet instead of SD-1.5 (dry run)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--num-images", type=int, default=8)
    p.add_argument("--out", default=None, help="write the table into this markdown file (bench_speed section)")
    args = p.parse_args(argv)
    lines = ["| model | compute | seconds | speed vs FP32 | agreement | note |", "|---|---|---:|---:|---|---|"]
    comments = []
    for chunk in [bench_run(run, args.repeats, args.num_images) for run in args.run] + \
                 ([bench_sd15(args.small, args.repeats)] if args.sd15 or args.small else []):
        comments.append(chunk[0].strip("<!-> "))
        lines += chunk[1:]
    command = "python scripts/bench_speed.py " + " ".join(a for a in (argv or sys.argv[1:]))
    text = "\n".join([f"Command: `{command}`", "", *[f"- {c}" for c in comments], "", *lines,
                      "", "GPU rows (FP8 / INT8 W8A8 against fp16 at 64x64 latents): not run (no GPU was available)."])
    print(text)
    if args.out:
        write_marked_section(Path(args.out), "bench_speed", text, "Speed: real low-bit kernels against FP32")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
