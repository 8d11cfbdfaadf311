"""LSQ initialization of the binarized denoiser's activation quantizers (docs/methods.md §7), from the
inputs each quantizer sees on calibration batches (the formula is
:func:`diffsqueeze.quant.nn.binary_layers.lsq_init_scale`)."""

from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

from diffsqueeze.pipelines.calibration import CalibBatch
from diffsqueeze.pipelines.stage_helpers import call_denoiser
from diffsqueeze.quant.nn.binary_layers import (
    AttentionActQuant,
    act_quantizers_of,
    lsq_init_scale,
)
from diffsqueeze.quant.nn.quantizers import ActQuantizer
from diffsqueeze.quant.primitives.formats import int_code_range

log = logging.getLogger(__name__)


@torch.no_grad()
def init_act_scales(denoiser: nn.Module, batches: Iterable[CalibBatch]) -> None:
    """LSQ init ``s = 2 mean|x| / sqrt(Qp)`` from the inputs each quantizer sees (quantizers off).

    The mean of ``|x|`` (per tensor, or per channel for channel-wise quantizers) is averaged over
    the calls on ``batches`` (:func:`~diffsqueeze.quant.binarydm.data.act_init_batches`: every
    calibration timestep). Attention quantizers are set to observe, so the quantized SDPA runs
    and their hooks fire although they are disabled (the processor otherwise bypasses them).
    """
    quantizers = act_quantizers_of(denoiser)
    attn = [m for m in denoiser.modules() if isinstance(m, AttentionActQuant)]
    sums: dict[int, list] = {}
    handles = []

    def hook_for(q: ActQuantizer):
        def hook(module, args):
            x = args[0].detach().abs().float()
            if q.param_shape == (1,):
                v = x.mean().reshape(1)
            elif len(q.param_shape) == 4:
                v = x.mean(dim=tuple(i for i in range(x.dim()) if i != 1))
            else:
                v = x.reshape(-1, x.shape[-1]).mean(0)
            acc = sums.setdefault(id(q), [0, 0.0])
            acc[0] += 1
            acc[1] = acc[1] + v
        return hook

    states = [(q, q.enabled) for q in quantizers]
    try:
        for m in attn:
            m.observe = True
        for q in quantizers:
            q.enabled = False
            handles.append(q.register_forward_pre_hook(hook_for(q)))
        for b in batches:
            call_denoiser(denoiser, b.kwargs)
    finally:
        for h in handles:
            h.remove()
        for m in attn:
            m.observe = False
        for q, e in states:
            q.enabled = e
    missing = sum(1 for q in quantizers if id(q) not in sums)
    if missing:  # layers the denoiser never calls on these inputs: their scale stays 1
        log.warning("%d of %d activation quantizers saw no input during LSQ initialization", missing, len(quantizers))
    for q in quantizers:
        if id(q) not in sums:
            continue
        n, total = sums[id(q)]
        _, qp = int_code_range(q.fmt.bits, q.fmt.symmetric)
        scale = lsq_init_scale(total / n, qp)
        q.set_params(0, scale.reshape(q.param_shape))
