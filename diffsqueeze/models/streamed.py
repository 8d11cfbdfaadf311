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
old checkpoint diffusers renames while loading) raises :class:`NotStreamable` with the reason,
and the caller loads it whole and records why.

A deep copy of a streamed component is resident: a copy is made to be changed (the evaluation
loads a stage's checkpoint into a copy of the teacher to score that stage), and a streamed
module's weights are its files', which neither a loaded state dict (copied onto meta tensors)
nor a swapped layer can change: the copy would silently compute the original.
"""

from __future__ import annotations

import functools
import importlib
import json
import weakref
from pathlib import Path

import torch

from .tensor_files import SafetensorsTensors

__all__ = ["NotStreamable", "streamed_component", "is_streamed", "component_files", "tensor_value"]


class NotStreamable(Exception):
    """Why a component cannot stream; the caller loads it whole (never reaches the user as an error)."""


def component_files(folder: Path) -> list[Path]:
    """The safetensors files of one component folder: a single file, or the shards of its index."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if len(index) == 1:
        shards = json.loads(index[0].read_text(encoding="utf-8")).get("weight_map", {}).values()
        return [folder / name for name in sorted(set(shards))]
    files = sorted(folder.glob("*.safetensors"))
    return files if len(files) == 1 else []


def _component_class(model_folder: Path, name: str):
    """The diffusers ``ModelMixin`` class the folder's ``model_index.json`` names for ``name``."""
    meta = json.loads((model_folder / "model_index.json").read_text(encoding="utf-8"))
    library, class_name = meta.get(name, [None, None])
    if library != "diffusers" or not class_name:
        raise NotStreamable(f"{library}.{class_name} is not a diffusers model")
    from diffusers import ModelMixin

    cls = getattr(importlib.import_module("diffusers"), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise NotStreamable(f"diffusers.{class_name} is not a diffusers model class")
    return cls


def _set_tensor(module: torch.nn.Module, key: str, value: torch.Tensor) -> None:
    """Put ``value`` in place of the parameter or buffer ``key`` (a dotted state-dict name)."""
    owner, _, attr = key.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    if attr in sub._parameters:
        sub._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        sub._buffers[attr] = value


def streamed_component(model_folder: Path, name: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Component ``name`` of the diffusers folder ``model_folder``, its weights read per forward.

    Raises:
        NotStreamable: streaming does not apply (see the module docstring); the message says why.
    """
    from accelerate import cpu_offload, init_empty_weights

    folder = Path(model_folder) / name
    if not (Path(model_folder) / "model_index.json").is_file() or not folder.is_dir():
        raise NotStreamable("not a component folder of a diffusers model folder")
    cls, files = _component_class(Path(model_folder), name), component_files(folder)
    if not files:
        raise NotStreamable("no single safetensors file or shard index")
    with init_empty_weights():  # parameters on meta; buffers real (computed by __init__)
        module = cls.from_config(cls.load_config(folder))
    module.to(dtype)  # the hook casts each loaded tensor to its parameter's dtype
    weights = SafetensorsTensors(files)
    state_keys = set(module.state_dict())
    if set(weights) != state_keys:
        weights.close()  # renamed or missing keys: diffusers' own loading knows how to convert them
        raise NotStreamable("its files' tensor names are not the model's (a layout diffusers converts while loading)")
    params = {n for n, _ in module.named_parameters()}
    with torch.no_grad():  # persistent buffers are few and small: loaded once, kept resident
        for key in state_keys - params:
            _set_tensor(module, key, weights[key].to(device=device, dtype=module.get_buffer(key).dtype))
    # The CPU named by the string "cpu": accelerate empties the accelerator's cache after every
    # tensor it places unless the device is one of the strings "cpu"/"meta", and on the CPU that
    # call (an NVML probe each time) cost a tenth of a streamed forward.
    execution = "cpu" if torch.device(device).type == "cpu" else device
    # accelerate's sequential offload, the layout diffusers' enable_sequential_cpu_offload gives a
    # component: a hook on every module with tensors of its own, which loads them for its forward,
    # and one on the component itself. Pipelines create their latents and labels on
    # ``_execution_device``, which looks for that top hook and then reads the device from the
    # hooks below it; without it they fall back to the first component's parameters, which are on
    # meta here. That broke generation wherever the streamed denoiser is listed first (DDPM's
    # UNet, the only model in the pipeline; DiT's transformer, listed before the VAE).
    cpu_offload(module, execution_device=execution, state_dict=weights)
    module.eval()
    module.requires_grad_(False)
    module._diffsqueeze_weights = weights  # marks it streamed (is_streamed) and serves tensor_value
    # copy.deepcopy asks the instance for __deepcopy__; a weak reference keeps the module free of a
    # cycle through its own attribute (its files close when the last reference goes)
    module.__deepcopy__ = functools.partial(_resident_copy, weakref.ref(module), torch.device(device))
    return module


def _resident_copy(ref: weakref.ref, device: torch.device, memo: dict) -> torch.nn.Module:
    """A deep copy of a streamed component with its tensors in memory (why: the module docstring).

    Each parameter is the file's tensor converted to the parameter's dtype in a fresh allocation,
    as deep-copying a loaded module clones it, so the copy computes what a copy of the resident
    teacher computes, bit for bit; buffers are cloned from the streamed module.
    """
    from accelerate import init_empty_weights

    module = ref()
    with init_empty_weights():
        copy = type(module).from_config(module.config)
    weights = module._diffsqueeze_weights
    with torch.no_grad():
        for key, param in module.named_parameters():
            _set_tensor(copy, key, torch.empty(param.shape, dtype=param.dtype, device=device).copy_(weights[key]))
        for key, buffer in module.named_buffers():
            _set_tensor(copy, key, buffer.clone())
    return copy.eval().requires_grad_(False)


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
