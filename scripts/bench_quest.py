"""Benchmark the ``quest`` stage on an SD-1.5-architecture UNet with random weights.

Measures what the QuEST issue asks for: time per epoch (stage 1: one epoch over one timestep's
samples; stage 2: one epoch over all timesteps) and peak memory (CUDA: max allocated; CPU: peak
process RSS), after W4A4 quantization of the same UNet (``--ptq fast``: min/max swaps, the
default, since the scale searches only cost setup time; ``--ptq stage``: the real ``ptq`` stage).

* ``--size small`` (default without CUDA): the SD-1.5 block layout with narrow channels
  (32/64/128/128), 16x16 latents, 64-d text tokens; minutes on a laptop CPU.
* ``--size full`` (default with CUDA): the real SD-1.5 UNet (860M parameters, 320/640/1280/1280,
  64x64 latents = 512x512 images, 77x768 text tokens).

No download: the UNet is built from its config with random weights; the calibration recording is
synthetic (random latents / text embeddings at real scheduler timesteps) and written in the run
directory's calibration format, so the ``ptq`` and ``quest`` stages run unchanged.

    python scripts/bench_quest.py                         # CPU, small
    python scripts/bench_quest.py --size full --device cuda --gradient-checkpointing
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

SD15 = dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, sample_size=64)
SMALL = dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, sample_size=16)


def sd15_unet(size: str, seed: int = 0):
    from diffusers import UNet2DConditionModel

    dims = SD15 if size == "full" else SMALL
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=dims["sample_size"], in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=dims["block_out_channels"], cross_attention_dim=dims["cross_attention_dim"],
        attention_head_dim=8, norm_num_groups=32,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def write_calibration(folder: Path, unet, n_t: int, samples: int, tokens: int = 77) -> None:
    """Synthetic recording in :class:`~diffsqueeze.pipelines.calibration.CalibrationData` format."""
    from diffsqueeze.pipelines.calibration import FORMAT as CALIBRATION_FORMAT
    from diffsqueeze.pipelines.calibration import record_arguments

    folder.mkdir(parents=True, exist_ok=True)
    c = unet.config
    steps = list(range(0, 50, 50 // n_t))[:n_t]
    timesteps = [float(981 - 20 * s) for s in steps]  # SD's 50-step DDIM/PNDM timesteps
    files = []
    g = torch.Generator().manual_seed(0)
    for k, (s, t) in enumerate(zip(steps, timesteps)):
        name = f"s{s:04d}_b0000.safetensors"
        call = {"sample": torch.randn(samples, 4, c.sample_size, c.sample_size, generator=g),
                "timestep": torch.full((samples,), t),
                "encoder_hidden_states": torch.randn(samples, tokens, c.cross_attention_dim, generator=g)}
        tensors, structure, n = record_arguments(call, "sample")  # the recording's own layout
        save_file(tensors, str(folder / name))
        files.append({"file": name, "step": s, "step_index": k, "timestep": t, "n": n, "structure": structure})
    meta = {"format": CALIBRATION_FORMAT, "steps": steps, "timesteps": timesteps, "files": files}
    (folder / "meta.json").write_text(json.dumps(meta), encoding="utf-8")


def fast_quantize(unet, timesteps: list[float], groups: int) -> int:
    """W4A4 swaps with min/max weight scales and fixed activation scales (setup only).

    The real ``ptq`` stage's scale searches dominate the bench on a CPU and do not change what
    the ``quest`` stage costs per epoch (same modules, same FLOPs); ``--ptq stage`` runs it.
    """
    from diffsqueeze.quant.nn.layers import (
        act_param_shape,
        make_quant_module,
        quant_layer_types,
    )
    from diffsqueeze.quant.nn.routing import attach_timestep_routing, group_assignment
    from diffsqueeze.quant.nn.swaps import swap_module

    group_of = group_assignment(len(timesteps), groups)
    names = [n for n, m in unet.named_modules() if isinstance(m, quant_layer_types())]
    for n in names:
        m = unet.get_submodule(n)
        act = {"format": "int4", "shape": list(act_param_shape(m, True)), "groups": groups,
               "n_timesteps": len(timesteps)}
        q = make_quant_module(m, {"weight_format": "int4", "group_size": 0, "act": act, "split": 0})
        w = q.weight.detach().reshape(q.weight.shape[0], -1)
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        s = ((hi - lo) / 15).clamp(min=1e-8)
        q.weight_quant.set_params(scale=s, zero_point=torch.round(-lo / s))
        for a in q.act_quantizers():
            a.set_routing(timesteps, group_of)
            for g in range(groups):
                a.set_params(g, torch.full(a.param_shape, 0.5), torch.full(a.param_shape, 8.0))
        swap_module(unet, n, q)
    attach_timestep_routing(unet)
    return len(names)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(args) -> dict:
    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.models.state import CompressionState
    from diffsqueeze.pipelines.calibration import CALIB_DIR, calibration_key
    from diffsqueeze.pipelines.context import StageContext
    from diffsqueeze.quant.ptq.stage import PTQStage
    from diffsqueeze.quant.quest.stage import QuestStage
    from diffsqueeze.recipe import recipe_from_dict

    device = torch.device(args.device)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quest_"))
    pipe = load_pipeline("builtin:tiny-sd")  # scheduler/tokenizer shell; the UNet is replaced
    unet = sd15_unet(args.size).to(device)
    teacher_unet = copy.deepcopy(unet).eval().requires_grad_(False)
    pipe.register_modules(unet=unet)
    teacher = copy.copy(pipe)
    teacher.register_modules(unet=teacher_unet)
    calib = {"num_samples": args.samples, "timesteps": args.timesteps, "num_inference_steps": 50, "batch_size": 1}
    quest = {"time_layers": ["auto"], "sensitive_layers": {"select": "pattern", "patterns": ["*ff.net.*"]},
             "gradient_checkpointing": args.gradient_checkpointing, "measure_error": True,
             "stage1": {"epochs": args.epochs1, "samples": min(args.samples, 8), "batch_size": args.batch_size,
                        "lr": 1e-5, "act_lr": 1e-5},
             "stage2": {"epochs": args.epochs2, "samples": args.samples, "batch_size": args.batch_size,
                        "lr": 1e-5, "act_lr": 1e-4}}
    ptq = {"weights": {"bits": 4, "format": "int", "search_steps": 20},
           "activations": {"bits": 4, "format": "int", "granularity": "channel", "timestep_groups": args.groups,
                           "search_values": 2**16},
           "softmax_bits": 8, "batch_size": args.batch_size}
    recipe = recipe_from_dict({"model": "builtin:tiny-sd", "output_dir": str(work), "device": args.device,
                               "calibration": calib, "stages": [{"ptq": ptq}, {"quest": quest}]})
    ctx = StageContext(index=0, run_dir=work, device=device, seed=0, state=CompressionState(),
                       model_spec=recipe.model, recipe_seed=recipe.seed, calibration=recipe.calibration,
                       teacher_factory=lambda: teacher)
    write_calibration(work / CALIB_DIR / calibration_key(recipe.model, recipe.calibration, recipe.seed), unet,
                      args.timesteps, args.samples)
    t0 = time.perf_counter()
    if args.ptq == "stage":
        PTQStage(recipe.stages[0].config).apply(pipe, ctx)
    else:
        from diffsqueeze.pipelines.calibration import CalibrationData

        folder = work / CALIB_DIR / calibration_key(recipe.model, recipe.calibration, recipe.seed)
        fast_quantize(unet, CalibrationData(folder).timesteps, args.groups)
    ptq_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    rss_before = peak_rss_mb()
    t0 = time.perf_counter()
    summary = QuestStage(recipe.stages[1].config).apply(pipe, ctx)
    quest_s = time.perf_counter() - t0
    params = sum(p.numel() for p in teacher_unet.parameters())
    result = {
        "size": args.size, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "unet_params_m": round(params / 1e6, 1),
        "latent": unet.config.sample_size, "timesteps": args.timesteps, "samples_per_timestep": args.samples,
        "batch_size": args.batch_size, "gradient_checkpointing": args.gradient_checkpointing,
        "time_layers": len(summary["time_layers"]), "sensitive_layers": len(summary["sensitive_layers"]),
        "ptq": args.ptq, "ptq_s": round(ptq_s, 1), "quest_s": round(quest_s, 1),
        "stage1_s_per_epoch_per_timestep": summary.get("stage1", {}).get("s_per_epoch"),
        "stage2_s_per_epoch": summary.get("stage2", {}).get("s_per_epoch"),
        "peak_cuda_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "peak_rss_mb_before_quest": round(rss_before, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
        "denoiser_mse_before": summary.get("denoiser_mse_before"), "denoiser_mse_after": summary.get("denoiser_mse_after"),
    }
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cuda = torch.cuda.is_available()
    p.add_argument("--size", choices=("small", "full"), default="full" if cuda else "small")
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--timesteps", type=int, default=None, help="calibration timesteps (full: 25, small: 4)")
    p.add_argument("--samples", type=int, default=None, help="samples per timestep (full: 64 as QuEST, small: 4)")
    p.add_argument("--batch-size", type=int, default=None, help="full: 8, small: 2")
    p.add_argument("--groups", type=int, default=2, help="activation timestep groups")
    p.add_argument("--epochs1", type=int, default=1, help="stage 1 epochs per timestep to time")
    p.add_argument("--epochs2", type=int, default=1, help="stage 2 epochs to time")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--ptq", choices=("fast", "stage"), default="fast",
                   help="fast: min/max W4A4 swaps (setup only); stage: the real ptq stage first")
    p.add_argument("--workdir", default=None)
    p.add_argument("--out", default=None, help="append the result as one JSON line to this file")
    args = p.parse_args(argv)
    full = args.size == "full"
    args.timesteps = args.timesteps or (25 if full else 4)
    args.samples = args.samples or (64 if full else 4)
    args.batch_size = args.batch_size or (8 if full else 2)
    logging.basicConfig(level=logging.WARNING)
    result = run(args)
    line = json.dumps(result)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
