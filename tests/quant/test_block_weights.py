"""Block-scaled weight formats in the ptq stage (NVFP4, MXFP4, MXFP8; docs/methods.md §10): the weight
quantizer on rows padded to whole blocks, the recipe checks, packing with the real scale
encodings, and a run that exports and reloads pixel for pixel."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.export.save import pack_layer
from diffsqueeze.quant.nn.layers import make_quant_module
from diffsqueeze.quant.nn.quantizers import WeightQuantizer
from diffsqueeze.quant.primitives.block_formats import BLOCK_FORMATS, block_bytes, block_fake_quantize
from diffsqueeze.quant.ptq.config import PTQConfig, RoundingConfig, WeightQuantConfig
from tests.helpers import reload_and_check_pixels, run_tiny_ptq


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
def test_rows_are_padded_to_whole_blocks_and_cut_back(name):
    torch.manual_seed(0)
    fmt = BLOCK_FORMATS[name]
    w = torch.randn(8, 4, 3, 3)  # rows of 36: not a multiple of 16 or 32
    q = WeightQuantizer(name, tuple(w.shape))
    rows = torch.zeros(8, q.padded_row)
    rows[:, :36] = w.reshape(8, 36)
    want = block_fake_quantize(rows, fmt)[:, :36].reshape(w.shape)
    assert q.padded_row % fmt.block == 0 and q.padded_row - 36 < fmt.block
    assert torch.equal(q(w), want)
    assert torch.equal(q(q(w)), q(w))  # on the grid: quantizing again changes nothing


@pytest.mark.parametrize("name", sorted(BLOCK_FORMATS))
@pytest.mark.parametrize("layer", [nn.Linear(64, 24), nn.Conv2d(4, 8, 3, padding=1)])
def test_packs_with_real_encodings_and_decodes_bit_identical(name, layer):
    fmt = BLOCK_FORMATS[name]
    q = make_quant_module(layer, {"weight_format": name})
    packed, entry = pack_layer(q)
    assert packed is not None, entry.get("reason")
    part = entry["parts"][0]
    assert part["storage"] == "block" and part["format"] == name
    assert torch.equal(packed.quantized_weight(), q.quantized_weight().detach())
    n = layer.weight.shape[0] * part["padded_row"]
    assert entry["packed_bytes"] == block_bytes(n, fmt)  # elements + one byte per block (+ FP32 tensor scale)
    assert packed.wscale0.dtype == torch.uint8 and packed.wscale0.numel() == n // fmt.block


def test_recipe_checks():
    assert WeightQuantConfig(bits=4, format="nvfp4").spec == ("block", 4, "nvfp4")
    with pytest.raises(RecipeError, match="bits"):
        WeightQuantConfig(bits=8, format="mxfp4")
    with pytest.raises(RecipeError, match="granularity"):
        WeightQuantConfig(bits=4, format="nvfp4", granularity="group")
    with pytest.raises(RecipeError, match="round-to-nearest"):
        PTQConfig(weights=WeightQuantConfig(bits=4, format="nvfp4"), rounding=RoundingConfig(method="adaround"))


def test_run_nvfp4_weights_and_activations_with_branch_reloads_pixel_identical(tmp_path):
    run = run_tiny_ptq(tmp_path, {"weights": {"bits": 4, "format": "nvfp4"},
                                  "activations": {"bits": 4, "format": "nvfp4", "granularity": "group"},
                                  "rounding": {"method": "nearest"}, "lowrank": {"rank": 2}})
    qmap = json.loads((run / "model" / "diffsqueeze.json").read_text())["quantization"]
    parts = [p for e in qmap["components"]["unet"]["layers"].values() for p in e.get("parts", [])]
    assert parts and {p["format"] for p in parts} == {"nvfp4"} and {p["storage"] for p in parts} == {"block"}
    layers = json.loads((run / "manifest.json").read_text())["stages"][0]["summary"]["layers"]
    assert {a for v in layers.values() for a in v["activations"]} == {"nvfp4", "mxfp8"}  # first/last inputs 8-bit
    reload_and_check_pixels(run)
