"""Measured sensitivity ranking (QuEST stage 2 selection): only the measured layer is quantized,
the ranking is sorted, written to the run directory and shown by ``inspect --sensitivity``."""

from __future__ import annotations

import json

import torch

from diffsqueeze.cli import main
from diffsqueeze.describe import sensitivity_for_run
from diffsqueeze.loading import load_pipeline
from diffsqueeze.pipelines.calibration import collect_calibration
from diffsqueeze.quant.ptq.stage import PTQStage
from diffsqueeze.quant.quest.sensitivity import (
    SENSITIVITY_FILE,
    format_sensitivity,
    measure_sensitivity,
    write_sensitivity,
)
from tests.helpers import make_ctx

CALIB = {"num_samples": 1, "timesteps": 2, "num_inference_steps": 2, "batch_size": 1}
LAYERS = ["conv_out", "mid_block.resnets.0.conv1", "down_blocks.0.resnets.0.time_emb_proj"]


def test_ranking_measures_one_layer_at_a_time(tmp_path, capsys):
    stages = [{"ptq": {"weights": {"bits": 4, "search_steps": 10},
                       "activations": {"bits": 4, "granularity": "channel", "timestep_groups": 2,
                                       "search_values": 4096},
                       "include": LAYERS}}]
    recipe, ctx = make_ctx("builtin:tiny-sd", tmp_path, stages, CALIB)
    pipe = load_pipeline("builtin:tiny-sd")
    PTQStage(recipe.stages[0].config).apply(pipe, ctx)
    off = pipe.unet.get_submodule("mid_block.resnets.0.conv1")
    off.quant_weights = off.quant_acts = False  # this one now computes exactly the FP layer
    teacher = ctx.teacher().unet
    data = collect_calibration(ctx)
    before = {n: p.clone() for n, p in teacher.state_dict().items()}
    rows = measure_sensitivity(pipe.unet, teacher, data, samples_per_timestep=1)
    assert [r["name"] for r in rows][-1] == "mid_block.resnets.0.conv1" and rows[-1]["mse"] == 0.0
    assert sorted(r["name"] for r in rows) == sorted(LAYERS)
    assert all(a["mse"] >= b["mse"] for a, b in zip(rows, rows[1:])) and rows[0]["mse"] > 0
    # the teacher is left as it was (modules swapped back), the student's routing untouched
    assert {n: p for n, p in teacher.state_dict().items()} .keys() == before.keys()
    assert all(torch.equal(before[n], p) for n, p in teacher.state_dict().items())
    assert all(type(m).__name__ in ("Linear", "Conv2d") for n, m in teacher.named_modules() if n in LAYERS)

    run = tmp_path / "run"
    (run / "manifest.json").write_text(json.dumps({"stages": [], "status": "complete"}), encoding="utf-8")
    write_sensitivity(run, rows, {"component": "unet", "samples_per_timestep": 1, "timesteps": 2})
    report = sensitivity_for_run(run)
    assert report["layers"] == json.loads((run / SENSITIVITY_FILE).read_text())["layers"]
    table = format_sensitivity(report)
    assert table.splitlines()[2].split()[-1] == rows[0]["name"]
    assert main(["inspect", str(run), "--sensitivity"]) == 0
    assert rows[0]["name"] in capsys.readouterr().out


def test_calibration_subset_spreads_over_uncond_and_cond(tmp_path):
    from safetensors.torch import save_file

    from diffsqueeze.pipelines.calibration import CalibrationData, record_arguments
    from diffsqueeze.quant.quest.sensitivity import calibration_subset

    files = []
    for k, t in enumerate((900.0, 100.0)):
        for j in range(2):  # two recorded calls of [uncond x2, cond x2]
            name = f"s{k}_b{j}.safetensors"
            ids = torch.arange(4.0) + 4 * j
            tensors, structure, n = record_arguments({"sample": ids.reshape(4, 1), "timestep": torch.full((4,), t),
                                                      "encoder_hidden_states": ids.reshape(4, 1, 1).clone()}, "sample")
            save_file(tensors, str(tmp_path / name))
            files.append({"file": name, "step": k, "step_index": k, "timestep": t, "n": n, "structure": structure})
    (tmp_path / "meta.json").write_text(json.dumps({"format": 2, "steps": [0, 1], "timesteps": [900.0, 100.0],
                                                    "files": files}), encoding="utf-8")
    batches = list(calibration_subset(CalibrationData(tmp_path), 4, 3, "cpu"))
    assert [b.step for b in batches] == [0, 0, 1, 1] and [b.size for b in batches] == [3, 1, 3, 1]
    picked = torch.cat([b.kwargs["sample"] for b in batches[:2]]).flatten().tolist()
    assert picked == [0.0, 2.0, 5.0, 7.0]  # both calls, unconditional and conditional rows
    assert batches[0].timestep == 900.0 and torch.equal(batches[0].kwargs["encoder_hidden_states"].flatten(),
                                                        torch.tensor([0.0, 2.0, 5.0]))
