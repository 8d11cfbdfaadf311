"""Atomic, safetensors-only training checkpoints (model + optimizer + step) for the scripts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``path`` (a .safetensors file) atomically: temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            t = v if torch.is_tensor(v) else torch.tensor(v)
            tensors[f"opt.{pid}.{k}"] = t.detach().contiguous().clone()
    for k, v in (extra or {}).items():
        tensors[f"extra.{k}"] = v.detach().contiguous().clone()
    meta = dict(meta, param_groups=[{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]])
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata={"meta": json.dumps(meta)})
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Restore model and optimizer from ``path``; returns ``(meta, extra_tensors)``."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, pid, name = k.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    opt = optimizer.state_dict()
    for g, saved in zip(opt["param_groups"], meta.pop("param_groups")):
        g.update(saved)
    opt["state"] = state
    optimizer.load_state_dict(opt)
    extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
    return meta, extra
