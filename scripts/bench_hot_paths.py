"""Two hot paths of a compression run at SD-1.5 size, each A against B in one process, in turns.

* streamed teacher read: one forward of a streamed UNet whose weights come from accelerate's
  ``OffloadedWeightsLoader`` (``safe_open`` per tensor) against ``models/tensor_files.py``
  (headers parsed once, each tensor its own private mapping); outputs must be equal.
* weight fake quantization: ``int_quantize`` then ``int_dequantize`` (a fresh tensor per step, the
  path that records gradients) against ``int_fake_quantize``'s one-buffer path without
  gradients, on a 1280x11520 weight, 4-bit per channel; results must be equal.

Usage:
    python scripts/bench_hot_paths.py            # SD-1.5 UNet layout, full width, random weights
    python scripts/bench_hot_paths.py --small    # a narrow UNet of the same layout (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _turns(a, b, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(repeats):
        t0 = time.perf_counter(); a(); ta.append(time.perf_counter() - t0)  # noqa: E702
        t0 = time.perf_counter(); b(); tb.append(time.perf_counter() - t0)  # noqa: E702
    return statistics.median(ta), statistics.median(tb)


def streamed_read(small: bool, repeats: int) -> str:
    from accelerate import init_empty_weights
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open

    from diffsqueeze.models.streamed import component_files, streamed_component

    w = (32, 64, 64, 64) if small else (320, 640, 1280, 1280)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, block_out_channels=w, cross_attention_dim=64 if small else 768,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        unet.save_pretrained(folder / "unet")
        (folder / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DConditionModel"]}', encoding="utf-8")
        config = unet.config
        del unet
        new = streamed_component(folder, "unet", torch.device("cpu"), torch.float32)
        index = {}
        for path in component_files(folder / "unet"):
            with safe_open(str(path), framework="pt") as f:
                index.update({k: {"safetensors_file": str(path), "weight_name": k} for k in f.keys()})
        with init_empty_weights():
            old = UNet2DConditionModel.from_config(config)
        for key, buf in new.named_buffers():
            owner, _, attr = key.rpartition(".")
            (old.get_submodule(owner) if owner else old)._buffers[attr] = buf
        attach_align_device_hook(old, execution_device=torch.device("cpu"), offload=True,
                                 weights_map=OffloadedWeightsLoader(index=index))
        old.eval()
        x, t, c = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, config.cross_attention_dim)
        with torch.no_grad():
            assert torch.equal(old(x, t, c).sample, new(x, t, c).sample), "streamed outputs differ"
            a, b = _turns(lambda: old(x, t, c), lambda: new(x, t, c), repeats)
    return (f"streamed UNet forward ({'narrow' if small else 'SD-1.5'} layout, 16x16 latents): safe_open per tensor "
            f"{a:.3f} s, per-tensor mappings {b:.3f} s: {a / b:.1f}x, outputs equal")


def fake_quantize(small: bool, repeats: int) -> str:
    from diffsqueeze.process_memory import return_freed_memory
    from diffsqueeze.quant.primitives.int_format import int_dequantize, int_fake_quantize, int_quantize

    return_freed_memory()  # as a run does (many weight-sized temporaries each in their own mapping)
    rows, cols = (128, 1152) if small else (1280, 11520)
    g = torch.randn(rows, 1, cols, generator=torch.Generator().manual_seed(0))
    s = (g.abs().amax(-1, keepdim=True) / 7).clamp_min(1e-8)
    z = torch.full_like(s, 8.0)

    def recorded():
        with torch.no_grad():
            return int_dequantize(int_quantize(g, s, z, bits=4, symmetric=False, check=False), s, z)

    def one_buffer():
        with torch.no_grad():
            return int_fake_quantize(g, s, z, bits=4, symmetric=False, check=False)

    assert torch.equal(recorded(), one_buffer())
    a, b = _turns(recorded, one_buffer, repeats)
    return (f"int_fake_quantize {rows}x{cols}, 4-bit per channel: recorded steps {a * 1e3:.1f} ms, one buffer "
            f"{b * 1e3:.1f} ms: {a / b:.1f}x, equal")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(fake_quantize(args.small, args.repeats))
    print(streamed_read(args.small, args.repeats))


if __name__ == "__main__":
    main()
