"""Honest size and OPs accounting for binarized (and fake-quantized) denoisers (docs/methods.md §9).

**OPs** (BiBench / BinaryDM convention): ``OPs = FLOPs of FP layers + sum over quantized layers of
MACs * b_w * b_a / 64``, where, as in those papers, the "FLOPs" of an FP layer are its
multiply-accumulates. Counted: every ``nn.Linear`` / ``nn.Conv2d`` and the two matmuls of each
attention (``q k^T`` and ``p v``), measured by hooks on one real denoiser call of batch 1.
Norms, activations, softmax and element-wise ops are not counted (nor in the papers), except the
FP work a quantized layer adds beside itself: its low-rank branch and its smoothing multiply
(``<layer>#lowrank`` / ``<layer>#smoothing``, docs/methods.md §10). A binary
layer of order ``k`` has ``b_w = k`` (k sign bases); its ``b_a`` is its input quantizer's bits
(32 when activations stay FP). Attention matmuls with BinaryDM q/k/probs/v quantizers count
``b = bits`` on both operands.

**Storage**: :func:`write_packed` writes the denoiser the way it would ship: each binary layer
as packed sign bits (``codes1``, ``codes2`` for order 2; :func:`~diffsqueeze.quant.primitives.pack.pack_bool`), plus a packed keep-mask
for pruned layers, plus its FP32 scales ``a1``/``a2`` and bias; every other tensor of the
state dict (FP layers, norms, embeddings, activation scales) as FP32. The reported size is the
real byte count of that safetensors file, and :func:`read_packed` restores the binarized
weights from it bit for bit (tested), so the number is not bit-width arithmetic.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from diffsqueeze.quant.export.safetensors_writer import write_streamed
from diffsqueeze.quant.nn.attention import is_attention, sdpa_arguments
from diffsqueeze.quant.nn.binary_layers import (
    AttentionActQuant,
    BinaryMixin,
    act_quantizers_of,
)
from diffsqueeze.quant.nn.layers import QuantMixin
from diffsqueeze.quant.primitives.pack import pack_bool, unpack_bool

FP_BITS = 32


# ---- OPs -----------------------------------------------------------------------------------------


def _layer_bits(m: nn.Module) -> tuple[int, int]:
    """(b_w, b_a) of a layer as it runs: FP32 unless quantized."""
    if isinstance(m, BinaryMixin):  # in-memory (weight_quant) or packed export (order from its spec)
        wq = getattr(m, "weight_quant", None)
        bw = m.order if wq is None or wq.enabled else FP_BITS
    elif isinstance(m, QuantMixin) and m.quant_weights and m.weight_quantizers():
        bw = max(q.fmt.bits for q in m.weight_quantizers())
    else:
        bw = FP_BITS
    if isinstance(m, QuantMixin) and m.quant_acts and m.act_quantizers() and all(q.enabled for q in m.act_quantizers()):
        ba = max(q.fmt.bits for q in m.act_quantizers())
    else:
        ba = FP_BITS
    return bw, ba


class _CountSDPA(TorchFunctionMode):
    def __init__(self, current: list):
        super().__init__()
        self.current = current
        self.macs: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            bound = sdpa_arguments(args, kwargs)
            q, k = bound["query"], bound["key"]
            n, s, d = q.shape[-2], k.shape[-2], q.shape[-1]
            heads = math.prod(q.shape[:-2])
            name = self.current[-1] if self.current else "?"
            self.macs[name] = self.macs.get(name, 0) + 2 * heads * n * s * d  # q k^T and p v
        return func(*args, **kwargs)


def ops_count(denoiser: nn.Module, kwargs: dict, call) -> dict:
    """MACs and OPs of one denoiser call on ``kwargs`` (use batch 1), per docs/methods.md §9.

    Args:
        denoiser: the (possibly binarized) denoiser.
        kwargs: one recorded call's keyword arguments, batch 1.
        call: ``call(denoiser, kwargs)`` runs it.

    Returns:
        ``{"macs", "ops", "fp_macs", "quantized_macs", "attention_macs", "ops_fp32", "ops_saving",
        "layers": {name: {"macs", "b_w", "b_a"}}}``.
    """
    layers: dict[str, dict] = {}
    current: list[str] = []
    attn_quant: dict[str, AttentionActQuant] = {}
    with ExitStack() as stack:
        handles = []
        for name, m in denoiser.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                def hook(mod, args, out, name=name):
                    if isinstance(mod, nn.Conv2d):
                        per_out = (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
                    else:
                        per_out = mod.in_features
                    bw, ba = _layer_bits(mod)
                    rec = layers.setdefault(name, {"macs": 0, "b_w": bw, "b_a": ba})
                    rec["macs"] += out.numel() * per_out
                    extra = {}  # the FP work beside a quantized layer (docs/methods.md §10)
                    if getattr(mod, "lowrank_rank", 0):  # down (the layer's geometry) then up, per output position
                        n_out = out.shape[1] if isinstance(mod, nn.Conv2d) else out.shape[-1]
                        extra["lowrank"] = (out.numel() // n_out) * mod.lowrank_rank * (per_out + n_out)
                    if getattr(mod, "smooth", None) is not None:  # one multiply per input element
                        extra["smoothing"] = args[0].numel()
                    for kind, macs in extra.items():
                        layers.setdefault(f"{name}#{kind}", {"macs": 0, "b_w": FP_BITS, "b_a": FP_BITS})["macs"] += macs
                handles.append(m.register_forward_hook(hook))
            if is_attention(m):
                q = getattr(m, "binarydm_act_quant", None)
                if isinstance(q, AttentionActQuant):
                    attn_quant[name] = q
                def enter(mod, a, name=name) -> None:
                    current.append(name)

                def leave(mod, a, o) -> None:
                    current.pop()

                handles.append(m.register_forward_pre_hook(enter))
                handles.append(m.register_forward_hook(leave))
        stack.callback(lambda: [h.remove() for h in handles])
        # attention quantizers off while counting, so the processor reaches F.scaled_dot_product_attention
        states = [(q, q.enabled) for aq in attn_quant.values() for q in aq.quantizers()]
        stack.callback(lambda: [setattr(q, "enabled", e) for q, e in states])
        attn_bits = {n: (aq.bits if all(e for q, e in states if q in aq.quantizers()) else FP_BITS)
                     for n, aq in attn_quant.items()}
        for q, _ in states:
            q.enabled = False
        mode = _CountSDPA(current)
        with torch.no_grad(), mode:
            call(denoiser, kwargs)
    for name, macs in mode.macs.items():
        b = attn_bits.get(name, FP_BITS)
        layers[f"{name}#attention"] = {"macs": macs, "b_w": b, "b_a": b}
    total = fp = qm = 0
    ops = 0.0
    for rec in layers.values():
        total += rec["macs"]
        if rec["b_w"] >= FP_BITS and rec["b_a"] >= FP_BITS:
            fp += rec["macs"]
            ops += rec["macs"]
        else:
            qm += rec["macs"]
            ops += rec["macs"] * rec["b_w"] * rec["b_a"] / 64
    return {"macs": total, "ops": ops, "fp_macs": fp, "quantized_macs": qm,
            "attention_macs": sum(mode.macs.values()), "ops_fp32": total,
            "ops_saving": round(total / ops, 3) if ops else None, "layers": layers}


# ---- storage -------------------------------------------------------------------------------------


def packed_state_dict(denoiser: nn.Module) -> tuple[dict[str, Tensor], dict[str, int]]:
    """The shippable state dict: binary layers as packed bits + FP32 scales, the rest FP32.

    Returns:
        ``(tensors, bytes_by_kind)`` with kinds ``binary_codes``, ``masks``, ``binary_scales``,
        ``fp`` (everything else, activation scales included).
    """
    out: dict[str, Tensor] = {}
    kinds = {"binary_codes": 0, "masks": 0, "binary_scales": 0, "fp": 0}
    binary = {n: m for n, m in denoiser.named_modules() if isinstance(m, BinaryMixin)}
    skip = set()
    for name, m in binary.items():
        w = m.weight.detach().float().cpu()
        wq = m.weight_quant
        a1 = wq.a1.detach().float().cpu()
        keep = (w != 0) if wq.masked else torch.ones_like(w, dtype=torch.bool)
        rows = w.reshape(w.shape[0], -1)
        b1 = rows >= 0
        out[f"{name}.codes1"] = pack_bool(b1)
        if wq.order == 2:
            s1 = torch.where(b1, 1.0, -1.0) * keep.reshape(rows.shape)
            out[f"{name}.codes2"] = pack_bool((rows - a1 * s1) >= 0)
        if wq.masked:
            out[f"{name}.keep"] = pack_bool(keep)
            kinds["masks"] += out[f"{name}.keep"].numel()
        kinds["binary_codes"] += sum(out[f"{name}.codes{i}"].numel() for i in range(1, wq.order + 1))
        out[f"{name}.weight_quant.a1"] = a1
        skip.update({f"{name}.weight", f"{name}.weight_quant.a1"})
        if wq.a2 is not None:
            out[f"{name}.weight_quant.a2"] = wq.a2.detach().float().cpu()
            skip.add(f"{name}.weight_quant.a2")
        kinds["binary_scales"] += 4 * (a1.numel() * wq.order)
    for key, t in denoiser.state_dict().items():
        if key in skip:
            continue
        t = t.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        out[key] = t.contiguous().clone()
        kinds["fp"] += t.numel() * t.element_size()
    return out, kinds


def write_packed(denoiser: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> dict:
    """Write :func:`packed_state_dict` to ``path`` (safetensors); return its real size and breakdown."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, kinds = packed_state_dict(denoiser)
    save_file(tensors, str(path), metadata=metadata)
    return {"path": str(path), "bytes": path.stat().st_size, "breakdown_bytes": kinds}


def fp32_bytes(module: nn.Module, path: Path) -> int:
    """Real size of ``module``'s state dict saved as FP32 safetensors at ``path`` (file kept).

    The size depends on names, shapes and dtypes only, so the file is written from zeros, one
    tensor at a time: neither a copy of the model in memory nor its values (a streamed teacher's
    parameters are on the meta device) are needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = ((k, torch.zeros(v.shape, dtype=torch.float32 if v.is_floating_point() else v.dtype))
               for k, v in module.state_dict().items())
    return write_streamed(path, tensors)


@torch.no_grad()
def read_packed(denoiser: nn.Module, path: Path) -> None:
    """Load a :func:`write_packed` file into a denoiser with the same binary swaps.

    Binary layers get latent weights chosen from the codes so that the binarizer reproduces the
    stored ``W_hat`` exactly (same sign and residual sign); everything else loads as stored.
    """
    tensors = load_file(str(path))
    binary = {n: m for n, m in denoiser.named_modules() if isinstance(m, BinaryMixin)}
    rest = {}
    used = set()
    for name, m in binary.items():
        w = m.weight
        rows = (w.shape[0], w[0].numel())
        keep = (unpack_bool(tensors[f"{name}.keep"], rows).float()
                if m.weight_quant.masked else torch.ones(rows))
        a1 = tensors[f"{name}.weight_quant.a1"]
        s1 = torch.where(unpack_bool(tensors[f"{name}.codes1"], rows), 1.0, -1.0) * keep
        mag = a1.abs().clamp(min=1e-12)
        latent = s1 * mag  # sign(latent) = s1
        used.update({f"{name}.codes1", f"{name}.keep", f"{name}.weight_quant.a1"})
        if m.weight_quant.order == 2:
            a2 = tensors[f"{name}.weight_quant.a2"]
            s2 = torch.where(unpack_bool(tensors[f"{name}.codes2"], rows), 1.0, -1.0) * keep
            # latent = s1 (a1 + s1 s2 a1/2): its sign is s1 and latent - a1 s1 = s2 a1/2 has sign s2
            latent = s1 * (a1 + s1 * s2 * mag / 2)
            m.weight_quant.a2.copy_(a2.to(m.weight_quant.a2))
            used.update({f"{name}.codes2", f"{name}.weight_quant.a2"})
        m.weight_quant.a1.copy_(a1.to(m.weight_quant.a1))
        m.weight.copy_((latent * keep).reshape(w.shape).to(w))
    for key, t in tensors.items():
        if key not in used:
            rest[key] = t
    missing = [k for k in denoiser.state_dict() if k not in rest and not any(k == f"{n}.weight" for n in binary)
               and not any(k.startswith(f"{n}.weight_quant.a") for n in binary)]
    if missing:
        raise KeyError(f"packed file {path} lacks {missing[:5]}")
    sd = denoiser.state_dict()
    for key, t in rest.items():
        sd[key].copy_(t.to(sd[key]))


def activation_bits_summary(denoiser: nn.Module) -> dict:
    """How many LSQ activation quantizers are on, and their bits."""
    qs = act_quantizers_of(denoiser)
    return {"quantizers": len(qs), "enabled": sum(q.enabled for q in qs),
            "bits": sorted({q.fmt.bits for q in qs})}
