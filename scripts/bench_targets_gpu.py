"""Seconds per denoiser forward and peak GPU memory of the deploy formats, against bf16, on one GPU.

The formats are the ones diffsqueeze exports for plain diffusers: torchao checkpoints (int8
weight-only, int8 dynamic activations with int8 weights, float8 dynamic activations with float8
weights; loaded pre-quantized through ``TorchAoConfig``) and GGUF files (Q8_0, Q4_0, Q4_K; loaded
with ``from_single_file(..., quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))``).
Speed and memory do not depend on weight values, so each architecture is built at full width from
its diffusers class with seeded random weights, directly in bf16 on the device (no download, no
file), and every format is put in place the way loading its export would:

- torchao rows: ``torchao.quantization.quantize_`` with the config objects that diffsqueeze's
  torchao export writes into ``quantization_config`` (``torchao_export.LAYOUTS``): the same tensor
  classes, granularity and activation quantization as loading the exported checkpoint;
- GGUF rows: every ``nn.Linear`` whose input width is a multiple of the type's block is encoded
  with this package's torch encoder (``gguf_quantize_bytes``, on the device), wrapped as diffusers'
  ``GGUFParameter(data, quant_type=...)`` and installed with diffusers' own
  ``_replace_with_gguf_linear``, as ``from_single_file`` does; every other tensor stays bf16.

Rows (``--rows``; each format eager or compiled): by default bf16 eager, bf16 + compile, then each
quantized format + compile. Each row builds its own model (same seed, so the same weights), times
batch-1 forwards (median after warm-up; the first call includes compilation) and frees everything
before the next; a row that fails (out of memory, a missing package, float8 on a card without it)
is recorded with its one-line reason and the next row runs (the exit status is 1 when a row failed,
0 when every row ran or was skipped for a stated reason). The ratios divide by the bf16 eager row of
the same process. Results: ``--json`` and a Markdown table ``--out``, both rewritten after every row.

    python scripts/bench_targets_gpu.py --json targets.json --out targets.md          # one GPU, both architectures
    python scripts/bench_targets_gpu.py --small --device cpu                           # the same code, tiny, on the CPU
    python scripts/bench_targets_gpu.py --small --device cuda                          # a quick GPU smoke test
    PARTS=targets bash scripts/gpu_bench.sh                                            # as a part of the GPU benchmark

Needs torch and diffusers; the torchao rows need torchao (>= 0.18), the GGUF rows gguf and
accelerate (as diffusers' GGUF loader does). Run from the repository root or anywhere: the
script puts its checkout on ``sys.path``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

try:
    import torch
    from torch import nn
except ImportError as exc:
    sys.exit(f"bench_targets_gpu: torch is not importable ({exc}); install torch (with CUDA for the GPU rows)")
try:
    import diffusers
except ImportError as exc:
    sys.exit(f"bench_targets_gpu: diffusers is not importable ({exc}); pip install diffusers (tested with 0.42.1)")

DTYPE = torch.bfloat16
GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """A denoiser at full width (``full``) and at smoke-test size (``small``), with its inputs."""

    key: str
    label: str
    cls_name: str
    full: dict[str, Any]
    small: dict[str, Any]
    # image side in pixels and text tokens of one forward, full and small
    full_inputs: tuple[int, int]
    small_inputs: tuple[int, int]


ARCHS = {
    # stabilityai/stable-diffusion-3-medium's transformer config; text = 77 CLIP + 256 T5 tokens
    "sd3": Arch("sd3", "SD3-medium-class", "SD3Transformer2DModel",
                full=dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                          num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                          pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192),
                small=dict(sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=32,
                           num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=64,
                           pooled_projection_dim=64, out_channels=16, pos_embed_max_size=16),
                full_inputs=(1024, 333), small_inputs=(128, 24)),
    # black-forest-labs/FLUX.1-dev's transformer config (about 12 B parameters)
    "flux": Arch("flux", "Flux-class", "FluxTransformer2DModel",
                 full=dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                           num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                           guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                 small=dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=32,
                            num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=64,
                            guidance_embeds=True, axes_dims_rope=(8, 12, 12)),
                 full_inputs=(1024, 512), small_inputs=(128, 16)),
}

# format -> (family, what diffsqueeze's export calls it); torchao names are torchao_export.LAYOUTS' names
FORMATS = {
    "bf16": ("bf16", "bf16"),
    "int8wo": ("torchao", "int8_weight_only"),
    "int8dq": ("torchao", "int8_dynamic_activation_int8_weight"),
    "fp8dq": ("torchao", "float8_dynamic_activation_float8_weight"),
    "q8_0": ("gguf", "q8_0"),
    "q4_0": ("gguf", "q4_0"),
    "q4_k": ("gguf", "q4_k"),
}
ALL_ROWS = [f"{fmt}-{mode}" for fmt in FORMATS for mode in ("eager", "compile")]
DEFAULT_ROWS = ["bf16-eager", "bf16-compile", "int8wo-compile", "int8dq-compile", "fp8dq-compile",
                "q8_0-compile", "q4_0-compile", "q4_k-compile"]


# --- building the denoiser and its inputs -------------------------------------------------------

@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_denoiser(arch: Arch, small: bool, device: torch.device) -> nn.Module:
    """The denoiser with its default random initialization, seeded (every row gets the same
    weights), created directly in bf16 on ``device``: Flux-class is 24 GB in bf16, and building it
    in float32 or on the host first would need twice that."""
    cls = getattr(diffusers, arch.cls_name)
    torch.manual_seed(0)
    with torch.device(device), _default_dtype(DTYPE):
        model = cls(**(arch.small if small else arch.full))
    # buffers computed in float32 at construction (SD3's positional table) become bf16, as
    # from_single_file / from_pretrained with torch_dtype=bfloat16 loads them (cast one by one:
    # model.to(dtype) would also warn about diffusers' keep-in-float32 list, empty for these classes)
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[name] = buf.to(DTYPE)
    return model.eval().requires_grad_(False)


def denoiser_inputs(arch: Arch, small: bool, device: torch.device) -> tuple[dict[str, torch.Tensor], str]:
    """Batch-1 keyword inputs of one denoiser forward at the architecture's image size and text
    length, as its pipeline passes them, and a line that says their shapes."""
    pixels, tokens = arch.small_inputs if small else arch.full_inputs
    config = arch.small if small else arch.full
    latent = pixels // 8  # the VAE's downsampling
    g = torch.Generator(device="cpu").manual_seed(1)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=DTYPE)

    text = randn(1, tokens, config["joint_attention_dim"])
    pooled = randn(1, config["pooled_projection_dim"])
    if arch.key == "sd3":
        inputs = dict(hidden_states=randn(1, config["in_channels"], latent, latent), encoder_hidden_states=text,
                      pooled_projections=pooled, timestep=torch.full((1,), 500.0, device=device, dtype=DTYPE))
        shapes = (f"{pixels}x{pixels} px -> latents 1x{config['in_channels']}x{latent}x{latent}, "
                  f"text 1x{tokens}x{config['joint_attention_dim']}, pooled 1x{config['pooled_projection_dim']}")
        return inputs, shapes
    side = latent // 2  # FluxPipeline packs 2x2 latent patches into one token of 4 x 16 channels
    ids = torch.zeros(side, side, 3)
    ids[..., 1] += torch.arange(side)[:, None]
    ids[..., 2] += torch.arange(side)[None, :]
    inputs = dict(hidden_states=randn(1, side * side, config["in_channels"]), encoder_hidden_states=text,
                  pooled_projections=pooled, timestep=torch.full((1,), 0.5, device=device, dtype=DTYPE),
                  img_ids=ids.reshape(-1, 3).to(device=device, dtype=DTYPE),
                  txt_ids=torch.zeros(tokens, 3, device=device, dtype=DTYPE),
                  guidance=torch.full((1,), 3.5, device=device, dtype=torch.float32))
    shapes = (f"{pixels}x{pixels} px -> {side * side} image tokens x {config['in_channels']}, "
              f"text 1x{tokens}x{config['joint_attention_dim']}, pooled 1x{config['pooled_projection_dim']}")
    return inputs, shapes


# --- putting a format in place ------------------------------------------------------------------

class RowSkipped(Exception):
    """The row cannot run here; its message is the one-line reason."""


def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def apply_torchao(model: nn.Module, layout_name: str, device: torch.device) -> str:
    """Quantize every ``nn.Linear`` in place with the torchao config that diffsqueeze's torchao
    export writes for ``layout_name``; returns what was quantized."""
    if layout_name.startswith("float8"):
        if device.type != "cuda":
            raise RowSkipped("float8 needs CUDA")
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise RowSkipped(f"float8 needs compute capability >= 8.9 (this card: {cap[0]}.{cap[1]})")
    try:
        from torchao.quantization import quantize_
    except ImportError as exc:
        raise RowSkipped(f"torchao is not installed ({exc})") from None
    try:
        from diffsqueeze.quant.export.torchao_export import LAYOUTS
    except ImportError as exc:
        raise RowSkipped(f"diffsqueeze's torchao export is not importable ({exc})") from None
    layout = next(lo for lo in LAYOUTS if lo.name == layout_name)
    quantize_(model, layout.torchao_config())
    layers = _linears(model)
    classes = sorted({type(m.weight).__name__ for _, m in layers if type(m.weight) not in (torch.Tensor, nn.Parameter)})
    done = sum(type(m.weight) not in (torch.Tensor, nn.Parameter) for _, m in layers)
    return f"{done} of {len(layers)} Linear as {'/'.join(classes) or 'nothing'} ({layout.config})"


def gguf_matmul_path() -> str:
    """Which matmul diffusers' GGUFLinear takes: its optional CUDA kernels (``kernels`` package,
    ``DIFFUSERS_GGUF_CUDA_KERNELS=true``) or dequantize in torch, then ``F.linear``."""
    from diffusers.quantizers.gguf import utils as gguf_utils

    if gguf_utils.ops is not None:
        return "diffusers' CUDA kernels (kernels package: ggml_dequantize, then matmul)"
    return "torch dequantize then F.linear (GGUFLinear.forward_native; no CUDA kernels loaded)"


def apply_gguf(model: nn.Module, type_name: str) -> str:
    """Replace every eligible ``nn.Linear`` by diffusers' ``GGUFLinear`` holding the layer's weight
    encoded as GGUF ``type_name``, exactly as ``from_single_file`` with ``GGUFQuantizationConfig``
    (compute dtype bf16) builds it; returns what was replaced."""
    try:
        import accelerate  # noqa: F401  (diffusers' GGUF loader needs it: layers are made on the meta device)
        import gguf
        from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter, _replace_with_gguf_linear
    except ImportError as exc:
        raise RowSkipped(f"diffusers' GGUF path needs gguf and accelerate ({exc})") from None
    from diffsqueeze.quant.primitives.gguf_bytes import GGUF_BLOCK_SIZES, gguf_quantize_bytes

    quant_type = gguf.GGMLQuantizationType[type_name.upper()]
    block = GGUF_BLOCK_SIZES[type_name]
    state: dict[str, torch.Tensor] = {}  # what load_gguf_checkpoint would return for those layers
    biases: dict[str, torch.Tensor | None] = {}
    layers = _linears(model)
    for name, layer in layers:
        if layer.in_features % block:
            continue  # a GGUF row is whole blocks; such layers stay bf16 (as diffsqueeze's export keeps them float)
        blocks = gguf_quantize_bytes(layer.weight.detach(), type_name)
        state[f"{name}.weight"] = GGUFParameter(blocks, quant_type=quant_type)
        biases[name] = None if layer.bias is None else layer.bias.detach()
        layer.register_parameter("weight", None)  # frees the bf16 weight now: peak is one layer, not the model twice
    # diffusers' own replacement (GGUFQuantizer._process_model_before_weight_loading): GGUFLinear on meta
    _replace_with_gguf_linear(model, DTYPE, state, modules_to_not_convert=[])
    for key, param in state.items():
        name = key.removesuffix(".weight")
        new = model.get_submodule(name)
        assert isinstance(new, GGUFLinear), f"{name}: diffusers did not replace it"
        new._parameters["weight"] = param  # GGUFQuantizer.create_quantized_param
        if biases[name] is not None:  # load_model_dict_into_meta: a plain parameter in the compute dtype
            new._parameters["bias"] = nn.Parameter(biases[name].to(DTYPE), requires_grad=False)
        assert tuple(param.quant_shape) == (new.out_features, new.in_features), f"{name}: {param.quant_shape}"
    return f"{len(state)} of {len(layers)} Linear as GGUFLinear {quant_type.name} (input width a multiple of {block})"


def apply_format(model: nn.Module, fmt: str, device: torch.device) -> str:
    family, name = FORMATS[fmt]
    if family == "torchao":
        return apply_torchao(model, name, device)
    if family == "gguf":
        return apply_gguf(model, name)
    return f"{len(_linears(model))} Linear in bf16"


def compile_denoiser(model: nn.Module, how: str, backend: str) -> str:
    """Compile ``model`` in place. ``regional``: every repeated transformer block, as diffusers'
    ``compile_repeated_blocks`` does (Flux names them in ``_repeated_blocks``; SD3 does not in
    diffusers 0.42, so the classes of its ``transformer_blocks`` are used): the blocks carry almost
    all of the time, and one compiled block serves all its instances, so compiling costs a fraction
    of a whole-model compile, which matters with several compiled rows per call. ``full``:
    ``torch.compile`` of the whole model."""
    if how == "full":
        model.compile(backend=backend)
        return f"full model, {backend}"
    names = getattr(model, "_repeated_blocks", None) or sorted({type(b).__name__ for b in model.transformer_blocks})
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    for block in blocks:
        block.compile(backend=backend)
    return f"regional: {len(blocks)} blocks ({', '.join(names)}), {backend}"


# --- timing -------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_breaks() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


@dataclass
class Timing:
    first_s: float
    runs_s: list[float]
    output: torch.Tensor
    graph_breaks: int


def time_forwards(model: nn.Module, inputs: dict[str, torch.Tensor], warmup: int, runs: int,
                  device: torch.device) -> Timing:
    """``warmup`` forwards (the first one compiles, timed alone), then ``runs`` timed ones, each
    between two device synchronizations."""
    breaks = _graph_breaks()

    def forward() -> torch.Tensor:
        return model(**inputs, return_dict=False)[0]

    with torch.inference_mode():
        _sync(device)
        t0 = time.perf_counter()
        forward()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(warmup - 1):
            forward()
        times = []
        for _ in range(runs):
            _sync(device)
            t0 = time.perf_counter()
            out = forward()
            _sync(device)
            times.append(time.perf_counter() - t0)
    return Timing(first, times, out, _graph_breaks() - breaks)


# --- one row ------------------------------------------------------------------------------------

@dataclass
class Row:
    """One measured (or failed, or skipped) row of the table."""

    arch: str
    row: str
    status: str = "ok"  # ok | failed | skipped
    reason: str | None = None
    s_per_forward: float | None = None
    runs_s: list[float] = field(default_factory=list)
    first_call_s: float | None = None
    prepare_s: float | None = None
    weights_gib: float | None = None
    peak_gib: float | None = None
    speed_vs_bf16: float | None = None  # bf16 eager seconds / this row's seconds: > 1 is faster
    peak_vs_bf16: float | None = None
    rel_diff_vs_bf16: float | None = None
    finite: bool | None = None
    layers: str | None = None
    compiled: str | None = None
    graph_breaks: int | None = None


def _free(device: torch.device) -> None:
    gc.collect()
    torch._dynamo.reset()  # drops compiled graphs (they hold the previous model's weights) and guards
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


def run_row(arch: Arch, row_name: str, args, device: torch.device, inputs: dict[str, torch.Tensor],
            reference: dict[str, Any]) -> Row:
    """Build, convert, compile and time one row; ``reference`` holds the bf16 eager row's seconds,
    peak and output once it has run."""
    fmt, mode = row_name.rsplit("-", 1)
    row = Row(arch.key, row_name)
    _free(device)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    model = None
    try:
        t0 = time.perf_counter()
        model = build_denoiser(arch, args.small, device)
        row.layers = apply_format(model, fmt, device)
        compiled = mode == "compile" and args.compile != "off"
        row.compiled = compile_denoiser(model, args.compile, args.backend) if compiled else "off"
        _sync(device)
        row.prepare_s = time.perf_counter() - t0
        if device.type == "cuda":
            row.weights_gib = (torch.cuda.memory_allocated(device) - base) / GIB
            torch.cuda.reset_peak_memory_stats(device)
        timing = time_forwards(model, inputs, args.warmup, args.runs, device)
        row.first_call_s, row.runs_s = timing.first_s, timing.runs_s
        row.s_per_forward = statistics.median(timing.runs_s)
        row.graph_breaks = timing.graph_breaks if compiled else None
        row.finite = bool(torch.isfinite(timing.output).all())
        if device.type == "cuda":
            row.peak_gib = (torch.cuda.max_memory_allocated(device) - base) / GIB
        if row_name == "bf16-eager":
            reference.update(s=row.s_per_forward, peak=row.peak_gib, output=timing.output.float())
        if reference.get("s"):
            row.speed_vs_bf16 = reference["s"] / row.s_per_forward
        if reference.get("peak") and row.peak_gib:
            row.peak_vs_bf16 = row.peak_gib / reference["peak"]
        if reference.get("output") is not None:
            ref = reference["output"]
            row.rel_diff_vs_bf16 = float((timing.output.float() - ref).norm() / ref.norm().clamp_min(1e-30))
    except RowSkipped as exc:
        row.status, row.reason = "skipped", str(exc)
    except Exception as exc:  # noqa: BLE001 -- every failure is this row's result, and the next row runs
        row.status, row.reason = "failed", _one_line(exc)
        traceback.print_exc(file=sys.stderr)
    finally:
        del model
        _free(device)
    return row


# --- report -------------------------------------------------------------------------------------

def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (compute capability {cap[0]}.{cap[1]}, CUDA {torch.version.cuda})"
    threads = torch.get_num_threads()
    return f"CPU ({platform.processor() or platform.machine()}, {threads} torch thread{'' if threads == 1 else 's'})"


def _num(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def markdown(meta: dict[str, Any], rows: list[Row]) -> str:
    lines = [
        f"Card: {meta['card']}; torch {meta['torch']}, diffusers {meta['diffusers']}, torchao {meta['torchao']}, "
        f"gguf {meta['gguf']}; {meta['date']}.",
        "",
        f"Command: `{meta['command']}`",
        "",
        *[f"- {label}: `{cls}`, {_count(n)} parameters; {shapes}." for label, cls, n, shapes in meta["archs"]],
        f"- Timing: batch 1, bf16 activations, {meta['warmup']} warm-up forwards (the first, which compiles, is "
        f"'first call s'), then the median of {meta['runs']} timed forwards, each between two device "
        "synchronizations; 'speed' is the bf16 eager row's seconds over the row's (> 1: faster), measured in "
        "the same process. Peak: `torch.cuda.max_memory_allocated` during the forwards, less what was allocated "
        "before the model was built; weights: allocated after building and converting.",
        f"- torch.compile: {meta['compile']}; graph breaks counted by dynamo.",
        "- torchao rows: `torchao.quantization.quantize_` of the bf16 model with the config object diffsqueeze's "
        "torchao export writes into `quantization_config` (`diffsqueeze/quant/export/torchao_export.py`, "
        "`LAYOUTS`): the tensor classes, int8/float8 codes with float32 per-row scales and activation "
        "quantization of loading the exported checkpoint; the weight values differ, which does not change speed. "
        "The tensors' nominal dtype is bf16 here (the compute dtype), where the export declares float32.",
        "- GGUF rows: each `nn.Linear` whose input width is a multiple of the type's block encoded on the device "
        "by `diffsqueeze.quant.primitives.gguf_bytes.gguf_quantize_bytes`, wrapped as diffusers' "
        "`GGUFParameter(data, quant_type=...)` and installed by diffusers' `_replace_with_gguf_linear` (compute "
        f"dtype bf16), as `from_single_file(..., quantization_config=GGUFQuantizationConfig(...))` builds it; "
        f"matmul: {meta['gguf_path']}.",
        "- Random weights, the same in every row (seeded): 'rel. diff' is the output's relative L2 distance to "
        "the bf16 eager row's output for the same inputs, a check that the row computes the same function, not "
        "a quality number.",
        "",
        "| architecture | row | s / forward | speed vs bf16 eager | peak GiB | peak vs bf16 eager | weights GiB "
        "| first call s | build + convert s | rel. diff | layers | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    labels = {a.key: a.label for a in ARCHS.values()}
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {labels[r.arch]} | {r.row} | {r.status}: {r.reason} | | | | | | | | {r.layers or ''} | |")
            continue
        notes = [f"compile {r.compiled}" if r.compiled != "off" else "eager"]
        if r.graph_breaks:
            notes.append(f"{r.graph_breaks} graph breaks")
        if r.finite is False:
            notes.append("output not finite")
        lines.append(
            f"| {labels[r.arch]} | {r.row} | {_num(r.s_per_forward, '.4f')} | {_num(r.speed_vs_bf16, '.2f')}x | "
            f"{_num(r.peak_gib, '.2f')} | {_num(r.peak_vs_bf16, '.2f')} | {_num(r.weights_gib, '.2f')} | "
            f"{_num(r.first_call_s, '.1f')} | {_num(r.prepare_s, '.1f')} | {_num(r.rel_diff_vs_bf16, '.2e')} | "
            f"{r.layers} | {'; '.join(notes)} |")
    return "\n".join(lines)


def write_results(args, meta: dict[str, Any], rows: list[Row]) -> None:
    """Both files after every row, so a run stopped by its time limit keeps what finished."""
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [vars(r) for r in rows]}, indent=1) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(markdown(meta, rows) + "\n")


def _compile_line(args) -> str:
    if args.compile == "off":
        return "off (the -compile rows run eager)"
    what = "each repeated transformer block" if args.compile == "regional" else "the whole model"
    return f"{args.compile} ({what}, backend {args.backend}, default mode, fullgraph=False)"


def _gguf_line() -> str:
    try:
        import diffsqueeze.quant.primitives.gguf_bytes  # noqa: F401  (the encoder the GGUF rows use)

        return gguf_matmul_path()
    except ImportError as exc:
        return f"unavailable ({exc})"


def _param_count(arch: Arch, small: bool) -> int:
    with torch.device("meta"):  # no memory: only the shapes
        model = getattr(diffusers, arch.cls_name)(**(arch.small if small else arch.full))
    return sum(p.numel() for p in model.parameters())


def main() -> int:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    ap.add_argument("--rows", nargs="+", choices=ALL_ROWS, default=DEFAULT_ROWS,
                    help="FORMAT-eager or FORMAT-compile; bf16-eager, the reference of the ratios, always runs first")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="2 blocks of width 64, 128 px: the same code in seconds")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5, help="timed forwards per row (the median is reported)")
    ap.add_argument("--compile", choices=["regional", "full", "off"], default=None,
                    help="how the -compile rows compile (default: regional on CUDA, off on the CPU)")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend ('eager' checks tracing only)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds from the start: start no row once the time so far plus the longest row would pass it")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="Markdown table")
    args = ap.parse_args()
    if args.warmup < 1 or args.runs < 1:
        ap.error("--warmup and --runs must be >= 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_targets_gpu: no CUDA device (torch.cuda.is_available() is False); --device cpu runs on the CPU")
    if args.compile is None:
        args.compile = "regional" if device.type == "cuda" else "off"
    if device.type == "cpu":
        torch.set_num_threads(1)  # the CPU run checks the code, on machines shared with other jobs
    sys.path.insert(0, str(REPO))  # diffsqueeze from this checkout, installed or not

    meta: dict[str, Any] = {
        "card": machine(device), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "torchao": _version("torchao"), "gguf": _version("gguf"), "date": time.strftime("%Y-%m-%d"),
        "command": "python scripts/bench_targets_gpu.py " + " ".join(sys.argv[1:]),
        "warmup": args.warmup, "runs": args.runs, "small": args.small, "compile": _compile_line(args),
        "gguf_path": _gguf_line(), "archs": [],
    }
    rows: list[Row] = []
    longest = 0.0
    for key in args.archs:
        arch = ARCHS[key]
        inputs, shapes = denoiser_inputs(arch, args.small, device)
        params = _param_count(arch, args.small)
        meta["archs"].append((arch.label, arch.cls_name, params, shapes))
        print(f"== {arch.label}: {_count(params)} parameters; {shapes}", flush=True)
        reference: dict[str, Any] = {}
        for name in dict.fromkeys(["bf16-eager", *args.rows]):
            if args.budget_s is not None and time.perf_counter() - started + longest > args.budget_s:
                row = Row(key, name, "skipped", f"not started: --budget-s {args.budget_s:.0f} would be passed")
            else:
                t0 = time.perf_counter()
                row = run_row(arch, name, args, device, inputs, reference)
                longest = max(longest, time.perf_counter() - t0)
            rows.append(row)
            print(json.dumps({k: v for k, v in vars(row).items() if k != "runs_s"}), flush=True)
            write_results(args, meta, rows)
        del inputs, reference
    print(markdown(meta, rows))
    failed = [f"{r.arch} {r.row}" for r in rows if r.status == "failed"]
    if failed:  # recorded with their reasons above; the exit status tells a calling script
        print(f"{len(failed)} row(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
