"""The pruning sweep: the knee rule, and one small real sweep through the CLI."""

import json

import pytest

from diffsqueeze.cli import main
from diffsqueeze.run.prune_sweep import knee


def test_knee_is_where_the_curve_bends_most():
    # flat, then steep: the bend is at 0.3
    assert knee([0, 0.1, 0.2, 0.3, 0.4, 0.5], [0, 1, 2, 3, 30, 60]) == 0.3
    # a straight line has no bend, and a curve that does not rise has no knee
    assert knee([0, 0.1, 0.2], [0, 10, 20]) is None
    assert knee([0, 0.1, 0.2], [5, 4, 3]) is None
    assert knee([0, 0.5], [0, 9]) is None


def test_prune_sweep_cli(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nintro\n")
    out = tmp_path / "sweep"
    rc = main(["prune-sweep", "--model", "builtin:tiny-sd", "--components", "unet", "unet+text_encoder",
               "--patterns", "unstructured", "--sparsities", "0.2", "0.5", "--num-images", "4", "--steps", "2",
               "--batch-size", "4", "--features", "tiny-random", "--out", str(out), "--results", str(results)])
    assert rc == 0
    data = json.loads((out / "sweep.json").read_text())
    series = [r["series"] for r in data["rows"]]
    assert series == ["unet"] * 3 + ["unet+text_encoder"] * 3
    rows = {(r["series"], r["sparsity"]): r for r in data["rows"]}
    assert rows[("unet", 0.0)]["fid_vs_fp"] == 0.0 and rows[("unet", 0.5)]["achieved"] == pytest.approx(0.5, abs=1e-3)
    assert rows[("unet", 0.5)]["psnr_vs_fp"] < rows[("unet", 0.2)]["psnr_vs_fp"]
    assert (out / "quality_vs_sparsity.svg").read_text().startswith("<svg")
    text = results.read_text()
    assert "intro" in text and "<!-- prune_sweep:begin -->" in text and "Command: `diffsqueeze prune-sweep" in text
    assert "knee of **unet**" in capsys.readouterr().out


def test_prune_sweep_rejects_bad_input_before_work(tmp_path, capsys):
    assert main(["prune-sweep", "--model", "builtin:tiny-sd", "--components", "nope", "--out", str(tmp_path / "s")]) == 1
    assert "no component 'nope'" in capsys.readouterr().err
    assert main(["prune-sweep", "--model", "builtin:tiny-sd", "--sparsities", "1.5", "--out", str(tmp_path / "s")]) == 1
    assert "sparsities must be in [0, 1)" in capsys.readouterr().err
    assert main(["prune-sweep", "--model", "builtin:tiny-sd", "--ref", "builtin:tiny-sd", "--out", str(tmp_path / "s")]) == 1
    assert "--ref: 'builtin:tiny-sd' is a model" in capsys.readouterr().err
