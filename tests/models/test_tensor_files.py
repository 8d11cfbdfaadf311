"""SafetensorsTensors (models/tensor_files.py) reads what safetensors' own loader reads, for every
dtype the format names, across shards, and holds no mapping of the files."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffsqueeze.models.tensor_files import SafetensorsTensors


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, generator=g, dtype=torch.float64)
    return {"f64": x, "f32": x.float(), "f16": x.half(), "bf16": x.bfloat16(),
            "i64": (x * 1e6).long(), "i32": (x * 1e4).int(), "i16": (x * 100).short(),
            "i8": (x * 40).clamp(-128, 127).to(torch.int8), "u8": (x.abs() * 40).clamp(0, 255).to(torch.uint8),
            "bool": x > 0, "e4m3": x.to(torch.float8_e4m3fn), "e5m2": x.to(torch.float8_e5m2),
            "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4), "transposed_then_saved": x[0].t().contiguous()}


def test_reads_every_dtype_as_safetensors_does(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    tensors = _tensors()
    names = sorted(tensors)
    save_file({k: tensors[k] for k in names[::2]}, str(a), metadata={"format": "pt"})
    save_file({k: tensors[k] for k in names[1::2]}, str(b))
    reference = {**load_file(str(a)), **load_file(str(b))}
    files = SafetensorsTensors([a, b])
    try:
        assert sorted(files) == names and len(files) == len(names) and "f32" in files and "missing" not in files
        assert copy.deepcopy(files) is files  # a copied module shares the open files, never closes them twice
        for name in names:
            got = files[name]
            want = reference[name]
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name
        first, second = files["f32"], files["f32"]
        first.add_(1)  # each read is fresh memory: changing one leaves the next read alone
        assert torch.equal(second, reference["f32"]) and torch.equal(files["f32"], reference["f32"])
        with pytest.raises(KeyError):
            files["missing"]
    finally:
        files.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps (Linux)")
def test_no_file_stays_mapped(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(256, 256)}, str(path))
    files = SafetensorsTensors([path])
    try:
        files["w"]
        with open(f"/proc/{os.getpid()}/maps", encoding="utf-8") as maps:
            assert str(path) not in maps.read()
    finally:
        files.close()


def test_a_truncated_file_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    os.truncate(path, path.stat().st_size - 100)
    files = SafetensorsTensors([path])
    try:
        with pytest.raises(OSError, match="'w'.*100 bytes early"):
            files["w"]
    finally:
        files.close()


def test_a_tensor_sits_where_a_mapping_of_the_file_puts_it(tmp_path):
    """CPU kernels can sum in an alignment-dependent order: a streamed weight must sit at the
    address, modulo the page, that a loaded (mapped) one has, or the teacher's outputs differ."""
    from safetensors import safe_open

    path = tmp_path / "w.safetensors"
    save_file(_tensors(), str(path))
    files = SafetensorsTensors([path])
    try:
        with safe_open(str(path), framework="pt") as mapped:
            for name in mapped.keys():
                assert files[name].data_ptr() % 4096 == mapped.get_tensor(name).data_ptr() % 4096, name
    finally:
        files.close()
