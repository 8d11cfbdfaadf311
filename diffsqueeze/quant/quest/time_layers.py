"""Finding a denoiser's time-embedding layers by measurement (QuEST stage 1, docs/methods.md §6).

``time_layers: [auto]`` picks layers whose input changes with the timestep but not with the latent
or the text tokens (the time-embedding path), minus those whose output feeds another such layer
(the shared timestep MLP). On a diffusers UNet that is every ``resnets.*.time_emb_proj``; on an
SD3/DiT transformer the adaLN modulation projections (``norm1.linear``, ``norm1_context.linear``,
``norm_out.linear``).
"""

from __future__ import annotations

import torch
from torch import nn

from diffsqueeze.pipelines.stage_helpers import call_denoiser, take_rows
from diffsqueeze.quant.nn.layers import quant_layer_types


def _latent_key(kwargs: dict) -> str:
    for key in ("sample", "hidden_states"):
        if torch.is_tensor(kwargs.get(key)):
            return key
    raise ValueError("denoiser inputs have neither 'sample' nor 'hidden_states'")


def _rows(kwargs: dict, n: int) -> dict:
    """Sample 0 of a batch repeated ``n`` times (tensors with a batch dim, also nested ones)."""
    return take_rows(kwargs, torch.zeros(n, dtype=torch.long), kwargs[_latent_key(kwargs)].shape[0])


def detect_time_layers(teacher: nn.Module, kwargs: dict, other_t: float) -> list[str]:
    """Per-block time-embedding projections of a denoiser, found by measurement.

    1. One batch of three copies of a recorded input: as is; every spatial/token input changed
       (tensors with per-sample rank >= 2: the latent and the text-token embeddings; pooled
       vectors and the timestep kept); timestep changed. A Linear/Conv2d layer is on the *time
       path* when its input differs between rows 0 and 2 but not between rows 0 and 1. (On an
       MMDiT the first block's context projections ``add_q/k/v_proj`` see the timestep through
       the context's adaLN but also the text tokens, so they are not on it.)
    2. One forward where every time-path layer's output is cut into a fresh leaf tensor: a
       time-path layer whose output reaches another time-path layer's input is part of the
       shared timestep MLP; the others are the per-block projections (QuEST stage 1).
    """
    base = _rows(kwargs, 3)
    for v in base.values():
        if torch.is_tensor(v) and v.dim() >= 3 and v.is_floating_point():
            v[1] = torch.randn_like(v[1])
    base["timestep"] = base["timestep"].clone()
    base["timestep"][2] = other_t
    layers = {n: m for n, m in teacher.named_modules() if isinstance(m, quant_layer_types())}
    inputs: dict[str, torch.Tensor] = {}

    def grab(name):
        def hook(module, args):
            inputs.setdefault(name, args[0].detach())
        return hook

    handles = [m.register_forward_pre_hook(grab(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            call_denoiser(teacher, base)
    finally:
        for h in handles:
            h.remove()

    def same(a, b):
        return torch.allclose(a, b, rtol=1e-5, atol=1e-6)

    path = [n for n, x in inputs.items() if x.shape[0] == 3 and same(x[0], x[1]) and not same(x[0], x[2])]
    leaves: dict[str, torch.Tensor] = {}
    seen: dict[str, torch.Tensor] = {}

    def cut(name):
        def hook(module, args, out):
            leaves[name] = out.detach().requires_grad_(True)
            return leaves[name]
        return hook

    def see(name):
        def hook(module, args):
            seen.setdefault(name, args[0])
        return hook

    handles = [layers[n].register_forward_hook(cut(n)) for n in path]
    handles += [layers[n].register_forward_pre_hook(see(n)) for n in path]
    try:
        # Only the graph's shape is read (which leaves an input depends on), never a gradient, so
        # autograd keeps none of the tensors it would save for a backward pass: with them this
        # forward held every weight it used (a streamed teacher's whole denoiser).
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_drop, _never):
            call_denoiser(teacher, _rows(kwargs, 1))
        leaf_of = {id(t): m for m, t in leaves.items()}
        upstream = set()
        for n in path:
            x = seen.get(n)
            if x is None or not x.requires_grad:
                continue
            upstream.update(leaf_of[i] for i in _leaves_reached(x) if i in leaf_of and leaf_of[i] != n)
    finally:
        for h in handles:
            h.remove()
    return [n for n in path if n not in upstream]


def _drop(t: torch.Tensor) -> None:
    return None


def _never(_) -> torch.Tensor:
    raise RuntimeError("time-layer detection runs no backward pass")


def _leaves_reached(t: torch.Tensor) -> set[int]:
    """``id`` of every leaf tensor ``t``'s autograd graph reaches (the leaves ``autograd.grad``
    would give a gradient for, zero or not)."""
    found, seen, stack = set(), set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf
        if var is not None:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


__all__ = ["detect_time_layers"]
