"""A component whose weights stay in its safetensors files: the run's FP teacher without a second
copy of the denoiser in memory.

The module is built from its config on the meta device; accelerate's ``AlignDevicesHook`` (the
offload hook behind ``device_map`` / ``disk_offload``) gives every submodule its own tensors,
read from the files (through the page cache, models/tensor_files.py) right before its forward,
and puts them back on the meta device after it. At any moment one layer's weights are resident,
not the model's. The values are the file's, converted to the run's dtype exactly as a resident
load converts them, so a streamed teacher computes what the resident one does, bit for bit.

Cost: every forward reads the weights again (a memory copy from the page cache; on a GPU also
the transfer), so the runner streams the teacher on the CPU, where the second copy is what does
not fit, and keeps it resident on a GPU unless the recipe asks (``teacher: stream``).

Only a plain diffusers model folder can stream (a ``ModelMixin`` whose state-dict keys are the
files' keys); anything else (a builtin, a compressed artifact, a transformers text encoder, an
old checkpoint diffusers renames while loading) answers ``None`` and the caller loads it whole.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from .tensor_files import SafetensorsTensors

__all__ = ["streamed_component", "is_streamed", "component_files", "tensor_value"]


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: a single file, or the shards of its index."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if len(index) == 1:
        shards = json.loads(index[0].read_text(encoding="utf-8")).get("weight_map", {}).values()
        return [folder / name for name in sorted(set(shards))]
    files = sorted(folder.glob("*.safetensors"))
    return files if len(files) == 1 else []


def _component_class(model_folder: Path, name: str):
    meta = json.loads((model_folder / "model_index.json").read_text(encoding="utf-8"))
    library, class_name = meta.get(name, [None, None])
    if library != "diffusers" or not class_name:
        return None
    from diffusers import ModelMixin

    cls = getattr(importlib.import_module("diffusers"), class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, ModelMixin) else None


def streamed_component(model_folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module | None:
    """Component ``name`` of the diffusers folder ``model_folder``, its weights read per forward.

    Returns ``None`` where streaming does not apply (see the module docstring).
    """
    from accelerate import init_empty_weights
    from accelerate.hooks import attach_align_device_hook

    folder = Path(model_folder) / name
    if not (Path(model_folder) / "model_index.json").is_file() or not folder.is_dir():
        return None
    cls, files = _component_class(Path(model_folder), name), component_files(folder)
    if cls is None or not files:
        return None
    with init_empty_weights():  # parameters on meta; buffers real (computed by __init__)
        module = cls.from_config(cls.load_config(folder))
    module.to(dtype)  # the hook casts each loaded tensor to its parameter's dtype
    weights = SafetensorsTensors(files)
    state_keys = set(module.state_dict())
    if set(weights) != state_keys:
        weights.close()
        return None  # renamed or missing keys: diffusers' own loading knows how to convert them
    params = {n for n, _ in module.named_parameters()}
    with torch.no_grad():  # persistent buffers are few and small: loaded once, kept resident
        for key in state_keys - params:
            owner, _, attr = key.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[attr] = weights[key].to(device=device, dtype=sub._buffers[attr].dtype)
    # The CPU named by the string "cpu": accelerate empties the accelerator's cache after every
    # tensor it places unless the device is one of the strings "cpu"/"meta", and on the CPU that
    # call (an NVML probe each time) cost a tenth of a streamed forward.
    execution = "cpu" if torch.device(device).type == "cpu" else device
    attach_align_device_hook(module, execution_device=execution, offload=True, weights_map=weights)
    module.eval()
    module.requires_grad_(False)
    module._diffsqueeze_weights = weights  # marks it streamed (is_streamed) and serves tensor_value
    return module


def is_streamed(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a :func:`streamed_component` (its parameters live on the meta device)."""
    return getattr(module, "_diffsqueeze_weights", None) is not None


def tensor_value(module: torch.nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    """The values of ``module.state_dict()[name]`` (given as ``t``): a streamed module's meta
    entries are read from its files (cast to the entry's dtype, as its forward casts them);
    anything else is ``t`` itself. One tensor at a time, so a pass over the state (a content
    hash) never holds the whole model."""
    weights = getattr(module, "_diffsqueeze_weights", None)
    if t.is_meta and weights is not None:
        return weights[name].to(t.dtype)
    return t
