"""Helpers every stage shares: calling the denoiser on recorded inputs, finding a component and
layers by name, the order in which modules are first called, and slicing batches.

One copy each: the prune, ptq, quest and binarize stages (and the sensitivity ranking) all use
these, so a change of convention (how a denoiser is called, what a glob matches) is made once.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch
from diffusers import DiffusionPipeline
from tqdm.auto import tqdm

from diffsqueeze.errors import ModelLoadError, RecipeError
from diffsqueeze.models.roles import module_components, resolve_component
from diffsqueeze.pipelines.distributed import row_share, sum_gradients, sum_value
from diffsqueeze.pipelines.faults import maybe_kill


def call_denoiser(denoiser: torch.nn.Module, kwargs: dict) -> torch.Tensor:
    """Run the denoiser on recorded inputs; returns its prediction tensor."""
    out = denoiser(**{**kwargs, "return_dict": False})
    return out[0] if isinstance(out, (tuple, list)) else out


def stage_component(pipe: DiffusionPipeline, key: str, where: str = "component") -> str:
    """The component a stage config names (``denoiser`` or a component name).

    Raises:
        RecipeError: at ``where`` (the config key), naming the pipeline's components.
    """
    try:
        return resolve_component(pipe, key)
    except ModelLoadError:
        comps = module_components(pipe)
        raise RecipeError(where, f"no component '{key}' in {type(pipe).__name__}; "
                                 f"its components: {', '.join(comps)} (or 'denoiser')") from None


def matches_any(name: str, globs: Iterable[str]) -> bool:
    """Whether a module name matches one of the shell-style globs (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, g) for g in globs)


def first_call_order(root: torch.nn.Module, names: list[str], kwargs: dict, called_only: bool = False) -> list[str]:
    """``names`` (submodules of the denoiser ``root``) sorted by their first call in one forward
    pass on ``kwargs``; modules that are not called come last, in their given order, or are
    left out with ``called_only``."""
    order: list[str] = []
    handles = [root.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    try:
        with torch.no_grad():
            call_denoiser(root, kwargs)
    finally:
        for h in handles:
            h.remove()
    return order if called_only else order + [n for n in names if n not in order]


@contextmanager
def capture_outputs(root: torch.nn.Module, names: list[str], store: dict | None = None) -> Iterator[dict]:
    """Inside the block, every forward of the submodules ``names`` of ``root`` writes its output to
    ``store[name]`` (the dict yielded; a later call of the same module replaces the earlier one).
    The hooks are removed in ``finally``."""
    store = {} if store is None else store
    handles = [root.get_submodule(n).register_forward_hook(lambda m, a, out, n=n: store.__setitem__(n, out))
               for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def leading_batch_size(args: tuple, kwargs: dict) -> int:
    """The leading dimension of the first batched tensor among a call's arguments (1 if none)."""
    for v in (*args, *kwargs.values()):
        if torch.is_tensor(v) and v.dim() > 0:
            return v.shape[0]
    return 1


def take_rows(obj: Any, idx: torch.Tensor, n: int) -> Any:
    """Rows ``idx`` of every tensor in ``obj`` (nested lists, tuples, dicts) whose leading
    dimension is the batch size ``n``; everything else is returned as it is."""
    if torch.is_tensor(obj) and obj.dim() > 0 and obj.shape[0] == n:
        return obj[idx]
    if isinstance(obj, (list, tuple)):
        return type(obj)(take_rows(o, idx, n) for o in obj)
    if isinstance(obj, dict):
        return {k: take_rows(v, idx, n) for k, v in obj.items()}
    return obj


def detached(obj: Any) -> Any:
    """``obj`` with every tensor (in nested lists, tuples, dicts) detached."""
    if torch.is_tensor(obj):
        return obj.detach()
    if isinstance(obj, (list, tuple)):
        return type(obj)(detached(o) for o in obj)
    if isinstance(obj, dict):
        return {k: detached(v) for k, v in obj.items()}
    return obj


def own_rows(args: tuple, kwargs: dict, *extra: Any) -> tuple[tuple, dict, list, float]:
    """This process's rows of a training batch (its call arguments and ``extra`` batched
    objects, e.g. targets) and their share of the batch; all of it and 1.0 for one process.

    A step multiplies its loss (and its reported value) by the share: :func:`train_loop` then
    sums the gradients over the processes (:mod:`diffsqueeze.pipelines.distributed`).
    """
    n = leading_batch_size(args, kwargs)
    idx, share = row_share(n)
    if idx is None:
        return args, kwargs, list(extra), 1.0
    idx = idx.to(next((v.device for v in (*args, *kwargs.values()) if torch.is_tensor(v)), torch.device("cpu")))
    return take_rows(args, idx, n), take_rows(kwargs, idx, n), [take_rows(e, idx, n) for e in extra], share


StepLoss = Callable[[int], tuple[torch.Tensor, torch.Tensor, dict[str, str]]]
"""``fn(iteration) -> (loss to minimize, value to report, progress-bar fields)``; under several
processes both are this process's share-weighted part (:func:`own_rows`)."""


def train_loop(optimizer: torch.optim.Optimizer, iters: int, step_loss: StepLoss, desc: str,
               scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
               after_step: Callable[[], None] | None = None) -> tuple[float | None, float | None]:
    """The gradient loop every training stage runs (AdaRound, LSQ, QuEST, BinaryDM).

    Per iteration: the loss from ``step_loss``, the gradients summed over the processes of a
    data-parallel launch (nothing with one), one optimizer step, the scheduler's step, then
    ``after_step`` (e.g. clamping scales). The progress bar shows the step's fields every 10
    iterations, and the fault-injection point ``tick`` follows every step (crash tests).

    Returns:
        The reported value of the first and of the last iteration (``None`` when ``iters`` is 0).
    """
    first = last = None
    with torch.enable_grad():
        bar = tqdm(range(iters), desc=desc, leave=False, dynamic_ncols=True)
        for it in bar:
            loss, report, fields = step_loss(it)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            sum_gradients(p for group in optimizer.param_groups for p in group["params"])
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            if after_step is not None:
                after_step()
            value = sum_value(float(report.detach()))
            first = value if first is None else first
            last = value
            if it % 10 == 0:
                bar.set_postfix(**fields)
            maybe_kill("tick")
    return first, last
