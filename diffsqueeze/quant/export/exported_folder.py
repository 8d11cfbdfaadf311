"""What ``diffsqueeze inspect`` reports for an exported folder (``diffsqueeze export RUN --format
gguf|torchao``): bytes per stored format, read from the files themselves, not from the export's report.

A GGUF export holds one ``diffusion_pytorch_model.gguf`` per compressed component (read with the
``gguf`` package's reader: each tensor's GGML type, values and bytes); a torchao export one
``diffusion_pytorch_model.safetensors`` whose torchao weights are flattened into
``<layer>._weight_qdata`` (the codes), ``<layer>._weight_scale`` and the like (read from the
safetensors header: a weight is counted under ``torchao <dtype of its codes>`` with all its parts'
bytes, every other tensor under its dtype). Other component folders are counted as bytes on disk.
A file's bytes include its header (and GGUF's alignment padding), which the per-type sums do not.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["EXPORT_REPORTS", "describe_exported", "format_exported", "is_exported_folder"]

EXPORT_REPORTS = {"gguf": "gguf_export.json", "torchao": "torchao_export.json"}
"""Export format -> the report file an export of that format writes at its top."""

GGUF_FILE = "diffusion_pytorch_model.gguf"
SAFETENSORS_FILE = "diffusion_pytorch_model.safetensors"
# safetensors' dtype names, as torch spells them
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                      "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
TORCHAO_PART = "._weight_"  # torchao's flattened tensor parts: <layer>._weight_qdata, <layer>._weight_scale, ...


def is_exported_folder(path: Path) -> str | None:
    """The export format of ``path`` (None: not an export this project wrote)."""
    for fmt, report in EXPORT_REPORTS.items():
        if (Path(path) / report).is_file():
            return fmt
    return None


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _gguf_component(path: Path) -> dict:
    """Per GGML type of one ``.gguf`` file: tensors, values, bytes, bits per value; and per tensor."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    by_type: dict[str, dict] = {}
    tensors = {}
    for t in reader.tensors:
        name = t.tensor_type.name.lower()
        row = by_type.setdefault(name, {"tensors": 0, "values": 0, "bytes": 0})
        row["tensors"] += 1
        row["values"] += int(t.n_elements)
        row["bytes"] += int(t.n_bytes)
        tensors[t.name] = {"type": name, "values": int(t.n_elements), "bytes": int(t.n_bytes)}
    return {"file": path.name, "file_bytes": path.stat().st_size, "by_type": _summed(by_type), "tensors": tensors}


def _summed(by_type: dict[str, dict]) -> dict[str, dict]:
    for row in by_type.values():
        row["bits_per_value"] = round(8 * row["bytes"] / row["values"], 4) if row["values"] else 0.0
    return by_type


def _torchao_component(path: Path) -> dict:
    """Per stored kind of one torchao safetensors file (header only: no tensor is read)."""
    import struct

    with path.open("rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    header.pop("__metadata__", None)
    layers: dict[str, dict] = {}
    for key, info in header.items():
        nbytes = info["data_offsets"][1] - info["data_offsets"][0]
        values = 1
        for d in info["shape"]:
            values *= d
        layer, part, rest = key.partition(TORCHAO_PART)
        name = layer + ".weight" if part else key
        dtype = SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
        t = layers.setdefault(name, {"type": dtype, "values": 0, "bytes": 0})
        t["bytes"] += nbytes
        if not part or rest == "qdata":  # the codes: the weight's values and the kind it is stored as
            t["values"] = values
            if part:
                t["type"] = f"torchao {dtype}"
    by_type: dict[str, dict] = {}
    for t in layers.values():
        row = by_type.setdefault(t["type"], {"tensors": 0, "values": 0, "bytes": 0})
        row["tensors"] += 1
        row["values"] += t["values"]
        row["bytes"] += t["bytes"]
    return {"file": path.name, "file_bytes": path.stat().st_size, "by_type": _summed(by_type), "tensors": layers}


def describe_exported(path: str | Path) -> dict:
    """Bytes per component and per stored format of an exported folder.

    Raises:
        ValueError: ``path`` is not an export this project wrote (no export report at its top).
    """
    folder = Path(path)
    fmt = is_exported_folder(folder)
    if fmt is None:
        raise ValueError(f"{folder} is not an exported folder (no {' or '.join(EXPORT_REPORTS.values())})")
    report = json.loads((folder / EXPORT_REPORTS[fmt]).read_text())
    out: dict = {"format": fmt, "path": str(folder), "source": report.get("source"), "bytes_on_disk": _folder_bytes(folder),
                 "components": {}}
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        entry: dict = {"bytes_on_disk": _folder_bytes(child)}
        if (child / GGUF_FILE).is_file():
            entry["stored"] = _gguf_component(child / GGUF_FILE)
        elif fmt == "torchao" and (child / "config.json").is_file() and (child / SAFETENSORS_FILE).is_file() \
                and "quantization_config" in json.loads((child / "config.json").read_text()):
            entry["stored"] = _torchao_component(child / SAFETENSORS_FILE)
        out["components"][child.name] = entry
    return out


def format_exported(desc: dict, layers: bool = False) -> str:
    """Human-readable table of :func:`describe_exported`."""
    lines = [f"{desc['format']} export of {desc.get('source') or '?'}",
             f"on disk: {desc['bytes_on_disk'] / 2**20:.2f} MiB",
             f"{'component':<16} {'disk MiB':>9}  stored as"]
    for name, c in desc["components"].items():
        g = c.get("stored")
        kinds = "files as saved by diffusers" if g is None else ", ".join(
            f"{t} {r['tensors']} tensors {r['values']:,} values {r['bytes'] / 2**20:.3f} MiB ({r['bits_per_value']:g} bits/value)"
            for t, r in sorted(g["by_type"].items(), key=lambda kv: -kv[1]["bytes"]))
        lines.append(f"{name:<16} {c['bytes_on_disk'] / 2**20:>9.2f}  {kinds}")
    if layers:
        for name, c in desc["components"].items():
            if "stored" not in c:
                continue
            lines.append("")
            lines.append(f"[{name}] per tensor ({c['stored']['file']})")
            for tname, t in c["stored"]["tensors"].items():
                lines.append(f"  {tname:<64} {t['type']:<14} {t['values']:>10,} values {t['bytes']:>10,} bytes")
    return "\n".join(lines)
