"""Load and save pipelines: hub ids, local diffusers folders, run directories, ``builtin:NAME``."""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.builtin import BUILTINS, build_builtin
from diffsqueeze.models.state import CompressionState
from diffsqueeze.models.streamed import is_streamed

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
# Pipeline classes that live outside diffusers, by the _class_name their model_index.json holds.
PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {}
# Shipped ones, imported on first use (their import is heavier than a dictionary entry).
SHIPPED_PIPELINE_CLASSES = {"FashionDiffusionPipeline": "diffsqueeze.models.fashion"}


def register_pipeline_class(cls: type[DiffusionPipeline]) -> type[DiffusionPipeline]:
    """Let :func:`load_pipeline` reload folders saved by a pipeline class defined outside diffusers."""
    PIPELINE_CLASSES[cls.__name__] = cls
    return cls


def model_folder(spec: str) -> Path | None:
    """The diffusers folder a local spec points at (a run directory points at its ``model/``)."""
    path = Path(spec)
    if (path / "model_index.json").is_file():
        return path
    if (path / "manifest.json").is_file():
        return path / "model" if (path / "model" / "model_index.json").is_file() else None
    return None


def check_model_spec(spec: str) -> None:
    """Fail fast on a spec that cannot name a model, without loading anything.

    Raises:
        ModelLoadError: unknown builtin, missing folder, folder without ``model_index.json``,
            a run directory without a finished model, or a string that is no hub id.
    """
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTINS:
            raise ModelLoadError(f"unknown builtin model '{spec}'; known: {', '.join('builtin:' + n for n in sorted(BUILTINS))}")
        return
    path = Path(spec)
    if path.exists():
        if model_folder(spec) is None:
            what = "a run directory without a finished model/" if (path / "manifest.json").exists() else "no model_index.json"
            raise ModelLoadError(f"'{spec}' is not a diffusers pipeline folder ({what})")
        return
    if spec.startswith((".", "/", "~")) or not HUB_ID.match(spec):
        raise ModelLoadError(f"model '{spec}': no such folder, and not a hub id of the form 'org/name'")


_OFFLINE = re.compile(r"not (fully )?cached locally|couldn't connect|outgoing traffic has been disabled|offline mode|"
                      r"connection|name or service not known|temporary failure in name resolution|timed? ?out", re.IGNORECASE)


def hub_unreachable(spec: str, exc: BaseException) -> str | None:
    """The message for a hub id that is not a local folder and could not be fetched (no network,
    ``HF_HUB_OFFLINE``), or None when ``exc`` is another failure. diffusers' own text points at a
    stack trace the command line does not show."""
    if Path(spec).exists() or not HUB_ID.match(spec):
        return None
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if not any(isinstance(e, (ConnectionError, TimeoutError)) or _OFFLINE.search(f"{type(e).__name__} {e}") for e in chain):
        return None
    return (f"model '{spec}' is not a local folder, and the Hugging Face hub could not be reached to fetch it (no network, "
            f"or HF_HUB_OFFLINE is set) nor is it in the local cache; download it while online, or give a local "
            f"diffusers folder")


def parse_dtype(name: str) -> torch.dtype:
    """``float32`` | ``float16`` | ``bfloat16`` -> torch dtype."""
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{name}'; known: {', '.join(DTYPES)}")
    return DTYPES[name]


class ArtifactFormat(Protocol):
    """A way diffsqueeze stores a compressed pipeline in a folder, beside plain diffusers files.

    :func:`read_pipeline` asks each format it is given, in order, whether it recognizes a
    folder; the first that does builds the pipeline. The formats themselves live with the code
    that writes them (:mod:`diffsqueeze.quant.export.load`); :mod:`diffsqueeze.loading` passes
    them in, so this module never imports compression code.
    """

    def detect(self, folder: Path, state: CompressionState) -> bool:
        """Whether this format wrote ``folder`` (its compression state already read)."""

    def build(self, folder: Path, state: CompressionState,
              from_pretrained: Callable[..., DiffusionPipeline]) -> tuple[DiffusionPipeline, CompressionState]:
        """The pipeline with its compressed modules in place and their weights loaded (before
        dtype and device placement), and the state to return."""

    def after_placement(self, pipe: DiffusionPipeline, dtype: torch.dtype) -> None:
        """Whatever must follow ``pipe.to(device, dtype)`` (compute dtypes, hooks)."""


def check_finite_weights(pipe: DiffusionPipeline, spec: str) -> None:
    """Raise if a weight holds NaN or Inf, naming the component and parameter (compression would
    carry them through, or blame calibration for them later).

    Raises:
        ModelLoadError: the first parameter with non-finite values.
    """
    for comp, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        for name, param in module.named_parameters():
            if param.is_floating_point() and not param.is_meta and not bool(torch.isfinite(param).all()):
                n_nan = int(torch.isnan(param).sum())
                n_inf = int((~torch.isfinite(param)).sum()) - n_nan
                raise ModelLoadError(f"model '{spec}': weight {comp}/{name} holds {n_nan} NaN and {n_inf} Inf value(s) "
                                     f"out of {param.numel()}; the model file is damaged or was saved from a diverged run")


def read_pipeline(spec: str, device: str = "cpu", dtype: str = "float32",
                  formats: Sequence[ArtifactFormat] = (),
                  shared: dict[str, torch.nn.Module] | None = None) -> tuple[DiffusionPipeline, CompressionState]:
    """Read a pipeline and its compression state, recognizing the artifact ``formats`` it is given.

    The model layer's reader: users and the rest of the package call
    :func:`diffsqueeze.loading.load_with_state`, which passes every format diffsqueeze writes.

    Args:
        spec: ``builtin:NAME``, a local diffusers folder, a run directory, or a hub id.
        device: torch device string.
        dtype: ``float32`` | ``float16`` | ``bfloat16``.
        formats: the compressed-artifact formats to recognize (:mod:`diffsqueeze.loading`
            passes every format diffsqueeze writes); a folder none of them claims loads as a
            plain diffusers folder plus its pruning masks.
        shared: components to use as given instead of reading them (a plain diffusers folder or
            hub id only: a builtin or compressed artifact loads whole). The run's teacher takes
            the components no stage changes from the student this way: one copy in memory, and
            the changed ones as :func:`~diffsqueeze.models.streamed.streamed_component` on the CPU.

    Raises:
        ModelLoadError: nothing loadable at ``spec`` or its files are damaged.
    """
    check_model_spec(spec)
    torch_dtype = parse_dtype(dtype)
    state, fmt = CompressionState(), None
    if spec.startswith("builtin:"):
        pipe = build_builtin(spec.split(":", 1)[1])
    else:
        folder = model_folder(spec)
        if folder is not None:
            state = CompressionState.load(folder)
            fmt = next((f for f in formats if f.detect(folder, state)), None)
        if fmt is not None:
            pipe, state = fmt.build(folder, state, _from_pretrained)
        else:
            pipe = _from_pretrained(str(folder) if folder else spec, **(shared or {}))
    for module in pipe.components.values():  # models built from configs are in training mode until told
        if isinstance(module, torch.nn.Module):
            module.eval()
    check_finite_weights(pipe, spec)
    streamed = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module) and is_streamed(c)]
    if streamed:  # placed by their offload hooks (meta tensors cannot move): the others one by one
        for c in pipe.components.values():
            if isinstance(c, torch.nn.Module) and not is_streamed(c):
                c.to(device=device, dtype=torch_dtype)
    else:
        if any(p.dtype != torch_dtype for c in pipe.components.values() if isinstance(c, torch.nn.Module)
               for p in c.parameters()):
            pipe.to(dtype=torch_dtype)
        pipe.to(device)
    if fmt is not None:
        fmt.after_placement(pipe, torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, state


def _from_pretrained(where: str, **components) -> DiffusionPipeline:
    cls, absent = DiffusionPipeline, {}
    index = Path(where) / "model_index.json"
    if index.is_file():
        try:
            meta = json.loads(index.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{index} is not valid JSON: {exc}") from exc
        class_name = meta.get("_class_name")
        if class_name in SHIPPED_PIPELINE_CLASSES and class_name not in PIPELINE_CLASSES:
            module = importlib.import_module(SHIPPED_PIPELINE_CLASSES[class_name])
            register_pipeline_class(getattr(module, class_name))
        cls = PIPELINE_CLASSES.get(class_name, DiffusionPipeline)
        # Optional components saved as absent ([null, null]) must be passed as None explicitly.
        absent = {k: None for k, v in meta.items() if isinstance(v, list) and v == [None, None]}
        pickles = [p.name for p in Path(where).rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
        if pickles:
            raise ModelLoadError(f"'{where}' holds pickle files ({', '.join(sorted(pickles)[:3])}); diffsqueeze reads safetensors only")
    try:
        return cls.from_pretrained(where, use_safetensors=True, **absent, **components)
    except Exception as exc:  # diffusers raises many types; the cause goes into the message
        unreachable = hub_unreachable(where, exc)
        if unreachable:
            raise ModelLoadError(unreachable) from exc
        raise ModelLoadError(f"cannot load pipeline from '{where}': {type(exc).__name__}: {' '.join(str(exc).split())}") from exc


def save_pipeline(pipe: DiffusionPipeline, folder: Path, state: CompressionState | None = None) -> None:
    """Save a pipeline as a diffusers folder (safetensors) plus its compression state."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (state or CompressionState()).save(folder)
