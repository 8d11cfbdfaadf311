"""What ``diffsqueeze inspect`` reports: per-component parameters, bytes, sparsity, per-layer detail,
and the measured layer-sensitivity ranking of a quantized run (``--sensitivity``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.loading import load_pipeline, load_with_state
from diffsqueeze.models.roles import find_roles, module_components
from diffsqueeze.models.state import CompressionState
from diffsqueeze.pipelines.calibration import CALIB_DIR, META, CalibrationData
from diffsqueeze.pipelines.manifest import read_manifest
from diffsqueeze.quant.export.kernels import kernel_plan
from diffsqueeze.quant.quest.sensitivity import (
    SENSITIVITY_FILE,
    measure_sensitivity,
    quantized_layers,
    write_sensitivity,
)


def folder_bytes(path: Path) -> int:
    """Real bytes on disk of every file under ``path``."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def describe_pipeline(pipe: DiffusionPipeline, state: CompressionState, folder: Path | None = None,
                      device: str = "cpu") -> dict:
    """Per component: role, parameters, bytes in memory (and on disk if saved), zero fraction of
    conv/linear weights, masked sparsity, and per-layer records (sparsity; module records of later
    stages; which kernel would compute each layer on ``device``, ``cpu`` or ``cuda``).
    """
    roles = find_roles(pipe)
    out = {"pipeline": type(pipe).__name__, "components": {}}
    plan = kernel_plan(pipe, state, device)
    out["kernel_device"] = device
    for name, module in module_components(pipe).items():
        role = "denoiser" if name == roles.denoiser else "text_encoder" if name in roles.text_encoders else (
            "vae" if name == roles.vae else "other")
        params = sum(p.numel() for p in module.parameters())
        mem = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
        layers = {}
        counted = zeros = 0
        for lname, sub in module.named_modules():
            if isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                w = sub.weight.detach()
                z = int((w == 0).sum())
                counted += w.numel()
                zeros += z
                rec = {"type": type(sub).__name__, "numel": w.numel(), "zero_fraction": round(z / w.numel(), 6),
                       "dtype": str(w.dtype).replace("torch.", "")}
                mask = state.masks.get(f"{name}/{lname}.weight")
                if mask is not None:
                    rec["masked_sparsity"] = round(1 - int(mask.sum()) / mask.numel(), 6)
                rec.update(state.modules.get(f"{name}/{lname}", {}))
                rec.update(_packed_record(sub, plan.get(f"{name}/{lname}")))
                layers[lname] = rec
        entry = {
            "role": role,
            "parameters": params,
            "bytes_in_memory": mem,
            "linear_conv_weights": counted,
            "zero_fraction": round(zeros / counted, 6) if counted else 0.0,
            "layers": layers,
        }
        if folder is not None and (Path(folder) / name).is_dir():
            entry["bytes_on_disk"] = folder_bytes(Path(folder) / name)
        out["components"][name] = entry
    if folder is not None:
        out["bytes_on_disk"] = folder_bytes(Path(folder))
    return out


def _packed_record(sub: torch.nn.Module, plan: dict | None) -> dict:
    """Real bytes of a packed layer's storage, and real vs simulated compute."""
    rec = {}
    if hasattr(sub, "packed_nbytes"):
        rec["packed_bytes"] = sub.packed_nbytes()
        rec["storage"] = sub.packed_spec.get("summary", "packed")
    if plan:
        rec["compute"] = plan["compute"] + (f" ({plan['kernel']})" if plan.get("kernel") else "")
        if plan.get("reason"):
            rec["compute_reason"] = plan["reason"]
    return rec


def format_description(desc: dict, manifest: dict | None = None, layers: bool = False) -> str:
    """Human-readable table of :func:`describe_pipeline` (plus the run's stages from its manifest)."""
    lines = [f"pipeline: {desc['pipeline']}"]
    if "bytes_on_disk" in desc:
        lines.append(f"on disk: {desc['bytes_on_disk'] / 2**20:.2f} MiB")
    lines.append(f"{'component':<16} {'role':<13} {'params':>12} {'memory MiB':>11} {'disk MiB':>9} {'zeros':>8}")
    for name, c in desc["components"].items():
        disk = f"{c['bytes_on_disk'] / 2**20:.2f}" if "bytes_on_disk" in c else "-"
        lines.append(f"{name:<16} {c['role']:<13} {c['parameters']:>12,} {c['bytes_in_memory'] / 2**20:>11.2f} "
                     f"{disk:>9} {c['zero_fraction']:>8.2%}")
        computes = [r["compute"].split(" ")[0] for r in c["layers"].values() if "compute" in r]
        if computes:
            packed = sum(r.get("packed_bytes", 0) for r in c["layers"].values())
            lines.append(f"{'':<16} packed layers {sum('packed_bytes' in r for r in c['layers'].values())} "
                         f"({packed / 2**20:.3f} MiB real bytes); loaded with kernels='real' on "
                         f"{desc.get('kernel_device', 'cpu')}: {computes.count('real')} real kernel, "
                         f"{computes.count('simulated')} simulated (--layers says which; the default load decodes "
                         f"every packed layer, bit-identical to the run)")
    if manifest:
        lines.append("")
        lines.append(f"run: status {manifest.get('status')}, recipe {manifest.get('recipe_hash')}")
        for s in manifest.get("stages", []):
            t = f"{s['wall_time_s']:.1f} s" if "wall_time_s" in s else ""
            lines.append(f"  stage {s['index']} {s['name']:<10} {s['status']:<8} {t}")
            for comp, c in (s.get("summary") or {}).get("components", {}).items():
                if "target" in c:
                    lines.append(f"    {comp}: sparsity target {c['target']:.4f}, achieved {c['achieved']:.4f} "
                                 f"({c['pruned_weights']:,} of {c['counted_weights']:,} weights)")
            summary = s.get("summary") or {}
            if "storage" in summary and "ops" in summary:  # binarize: packed size and OPs (docs/methods.md §9)
                st, ops = summary["storage"], summary["ops"]
                lines.append(f"    {summary.get('component', '')}: packed {st['packed_bytes'] / 2**20:.2f} MiB vs FP32 "
                             f"{st['fp32_bytes'] / 2**20:.2f} MiB ({st['ratio_fp32_to_packed']:.1f}x); OPs {ops['ops']:.4g} "
                             f"vs FP32 {ops['ops_fp32']:.4g} ({ops['saving_vs_fp32']:.1f}x), {ops['per']}")
    if layers:
        for name, c in desc["components"].items():
            lines.append("")
            lines.append(f"[{name}] per layer")
            for lname, rec in c["layers"].items():
                extra = " ".join(f"{k}={v}" for k, v in rec.items()
                                 if k not in ("type", "numel", "zero_fraction", "compute", "compute_reason", "act"))
                act = rec.get("act") or {}
                if act:  # static (per tensor / channel, timestep groups) or dynamic per token group
                    extra += f" acts={act.get('format')}" + (
                        f" dynamic g{act['group_size']}" if act.get("group_size") else f" {act.get('groups', 1)} timestep groups")
                if "compute" in rec:
                    extra += f" | {rec['compute']}" + (f": {rec['compute_reason']}" if "compute_reason" in rec else "")
                lines.append(f"  {lname:<60} {rec['type']:<8} {rec['numel']:>10,} zeros {rec['zero_fraction']:>7.2%} {extra}")
    return "\n".join(lines)


def sensitivity_for_run(path: str | Path, samples_per_timestep: int = 2) -> dict:
    """The ranking of a run directory: read ``sensitivity.json``, or measure and write it.

    Measuring needs the run's quantized model (``model/``), its recorded calibration data and
    the original model named in its manifest.

    Raises:
        DiffsqueezeError: not a run directory, no quantized layers, or no calibration data.
    """
    run_dir = Path(path)
    file = run_dir / SENSITIVITY_FILE
    if file.is_file():
        return json.loads(file.read_text(encoding="utf-8"))
    manifest = read_manifest(run_dir) if run_dir.is_dir() else None
    if manifest is None:
        raise DiffsqueezeError(f"{run_dir} is not a run directory; --sensitivity needs a run with a ptq stage")
    calib = sorted((run_dir / CALIB_DIR).glob(f"*/{META}"))
    if not calib or not (run_dir / "model").is_dir():
        raise DiffsqueezeError(f"{run_dir} has no {SENSITIVITY_FILE}, and no finished model with calibration data "
                               f"to measure it from (run a recipe with a ptq stage first)")
    pipe, _ = load_with_state(str(run_dir))
    role = find_roles(pipe).denoiser
    student = getattr(pipe, role)
    if not quantized_layers(student):
        raise DiffsqueezeError(f"the model in {run_dir} has no quantized layers; nothing to rank")
    teacher = getattr(load_pipeline(manifest["model"]), role).eval().requires_grad_(False)
    data = CalibrationData(calib[0].parent)
    t0 = time.perf_counter()
    rows = measure_sensitivity(student, teacher, data, samples_per_timestep=samples_per_timestep)
    meta = {"component": role, "timesteps": len(data.timesteps), "samples_per_timestep": samples_per_timestep, "wall_time_s": round(time.perf_counter() - t0, 3)}
    write_sensitivity(run_dir, rows, meta)
    return {**meta, "layers": rows}
