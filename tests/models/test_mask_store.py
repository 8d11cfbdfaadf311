"""Pruning masks held at one bit per weight: the store, its file, and files of older releases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.models.state import MASKS_FILE, STATE_FILE, CompressionState, MaskStore


def _masks():
    g = torch.Generator().manual_seed(0)
    return {"unet/a.weight": torch.rand(5, 3, 3, 3, generator=g) > 0.4, "unet/b.weight": torch.rand(13, generator=g) > 0.5}


def test_store_packs_to_one_bit_and_reads_back_the_same_masks():
    masks = _masks()
    store = MaskStore(masks)
    assert set(store) == set(masks) and len(store) == 2 and "unet/a.weight" in store
    for key, mask in masks.items():
        assert torch.equal(store[key], mask) and store[key].dtype == torch.bool
        bits, shape = store.packed()[key]
        assert bits.dtype == torch.uint8 and bits.numel() == -(-mask.numel() // 8) and shape == tuple(mask.shape)
    store["unet/b.weight"] = store["unet/b.weight"] & ~masks["unet/b.weight"]
    assert not store["unet/b.weight"].any()
    del store["unet/a.weight"]
    assert list(store) == ["unet/b.weight"]


def test_state_file_holds_packed_masks_and_older_bool_files_still_load(tmp_path):
    masks = _masks()
    CompressionState(masks=masks).save(tmp_path)
    loaded = CompressionState.load(tmp_path)
    assert all(torch.equal(loaded.masks[k], m) for k, m in masks.items())
    # a state written before masks were packed: one bool tensor per key
    old = tmp_path / "old"
    old.mkdir()
    (old / STATE_FILE).write_text(json.dumps({"version": 1, "modules": {}, "history": [], "masks": MASKS_FILE}))
    save_file(masks, str(old / MASKS_FILE))
    assert all(torch.equal(CompressionState.load(old).masks[k], m) for k, m in masks.items())


def test_a_packed_mask_of_the_wrong_length_is_a_load_error(tmp_path):
    CompressionState(masks=_masks()).save(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / MASKS_FILE), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors["unet/b.weight"] = tensors["unet/b.weight"][:1]
    save_file(tensors, str(tmp_path / MASKS_FILE), metadata=meta)
    with pytest.raises(ModelLoadError, match="cannot read pruning masks .*unet/b.weight"):
        CompressionState.load(tmp_path)


def test_packed_masks_move_between_stores_without_unpacking():
    source = MaskStore(_masks())
    target = MaskStore()
    for key, (bits, shape) in source.packed().items():
        target.set_packed(key, bits, shape)
    assert all(torch.equal(target[k], source[k]) for k in source)
    with pytest.raises(ValueError, match="unet/x.*do not hold a \\(4, 4\\) mask"):
        target.set_packed("unet/x", torch.zeros(3, dtype=torch.uint8), (4, 4))
