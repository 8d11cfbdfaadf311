"""Module records are checked against their kind's schema: on reload before any module is rebuilt,
on export before anything is written; every record the stages write fits."""

from __future__ import annotations

import copy

import pytest

from diffsqueeze.errors import ModelLoadError
from diffsqueeze.quant.export.save import ExportError, export_pipeline
from diffsqueeze.quant.nn.records import check_records
from diffsqueeze.quant.nn.swaps import LAYER_KINDS, RECORD_SCHEMAS

ACT = {"format": "int8_sym", "shape": [1], "groups": 1, "n_timesteps": 2}
VALID = {
    "QuantLinear": {"kind": "QuantLinear", "weight_format": "int4", "group_size": 0, "act": ACT, "split": 0,
                    "lowrank": 4, "smooth": True},
    "QuantConv2d": {"kind": "QuantConv2d", "weight_format": None, "group_size": 0, "act": dict(ACT, format_2="int6_sym"),
                    "split": 8, "weight_format_2": "int8_sym"},
    "BinaryLinear": {"kind": "BinaryLinear", "order": 2, "masked": False, "act": None, "group": 0},
    "BinaryConv2d": {"kind": "BinaryConv2d", "order": 1, "masked": True, "act": ACT},
    "QuantSoftmax": {"kind": "QuantSoftmax", "bits": 8},
    "BinaryDMAttention": {"kind": "BinaryDMAttention", "bits": 8, "prob_bits": 8},
}


def test_every_kind_has_a_valid_sample():
    assert set(VALID) == set(LAYER_KINDS)
    check_records({f"unet/{k}": v for k, v in VALID.items()}, RECORD_SCHEMAS)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_unknown_key_is_named(kind):
    record = dict(VALID[kind], colour="red")
    with pytest.raises(ModelLoadError, match=rf"'unet/x' \({kind}\): unknown key\(s\) colour"):
        check_records({"unet/x": record}, RECORD_SCHEMAS)


@pytest.mark.parametrize("kind", sorted(k for k in VALID if RECORD_SCHEMAS[k].required))
def test_missing_required_key_is_named(kind):
    record = dict(VALID[kind])
    required = sorted(RECORD_SCHEMAS[kind].required)
    del record[required[0]]
    with pytest.raises(ModelLoadError, match=rf"missing key\(s\) {required[0]}"):
        check_records({"unet/x": record}, RECORD_SCHEMAS)


@pytest.mark.parametrize("record, message", [
    ({"kind": "QuantLinear", "weight_format": 4, "act": None}, "'weight_format' is 4, expected str or null"),
    ({"kind": "QuantLinear", "smooth": 1}, "'smooth' is 1, expected bool"),
    ({"kind": "QuantSoftmax", "bits": True}, "'bits' is True, expected int"),
    ({"kind": "BinaryLinear", "order": "2"}, "'order' is '2', expected int"),
    ({"kind": "QuantLinear", "weight_format": "int4", "act": {"format": "int8_sym"}}, r"act: missing key\(s\) shape"),
    ({"kind": "QuantLinear", "weight_format": "int4", "act": dict(ACT, clip=1)}, r"act: unknown key\(s\) clip"),
    ({"kind": "Quantlinear"}, "unknown kind 'Quantlinear'"),
    (["QuantLinear"], "is not an object"),
])
def test_wrong_values_are_named(record, message):
    with pytest.raises(ModelLoadError, match=message):
        check_records({"unet/x": record}, RECORD_SCHEMAS)


def test_reload_refuses_a_damaged_record_before_rebuilding(tmp_path, tiny_sd):
    from diffsqueeze.models.state import CompressionState
    from diffsqueeze.quant.nn.swaps import restore_modules

    pipe = copy.deepcopy(tiny_sd)
    name = next(n for n, m in pipe.unet.named_modules() if type(m).__name__ == "Linear")
    state = CompressionState(modules={f"unet/{name}": dict(VALID["QuantLinear"], smooth="yes")})
    before = type(pipe.unet.get_submodule(name))
    with pytest.raises(ModelLoadError, match="'smooth' is 'yes', expected bool"):
        restore_modules(pipe, state)
    assert type(pipe.unet.get_submodule(name)) is before


def test_export_refuses_a_record_reload_would_refuse(tmp_path, tiny_sd):
    from diffsqueeze.models.state import CompressionState

    state = CompressionState(modules={"unet/x": {"kind": "QuantLinear", "weight_format": "int4", "act": "int8"}})
    with pytest.raises(ExportError, match=r"'act' is 'int8', expected dict or null; a stage wrote"):
        export_pipeline(tiny_sd, state, tmp_path / "model")
    assert not (tmp_path / "model").exists()
