"""Reports from metrics.json: markdown, HTML, the quality-vs-size SVG, the report subcommand."""

import json
import xml.etree.ElementTree as ET

import pytest

from diffsqueeze.cli import main
from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.report import (
    PLOT_FILE,
    points_of,
    quality_size_svg,
    read_metrics,
    verdict,
    write_report,
)

SVG = "{http://www.w3.org/2000/svg}"


def _metrics(size, fid, clip, grid=None):
    return {
        "format": 1, "kind": "run", "model": "runs/x/model", "baseline": "original",
        "size": {"denoiser_bytes": size, "measured": "disk"},
        "fid": {"value": fid, "fid": fid, "kid_mean": 0.012, "kid_std": 0.002, "backend": "torchmetrics",
                "weights": "inception-2015-12-05", "weights_sha256": "7ff4a85c", "resize": "clean",
                "num_generated": 64, "num_reference": 64, "reference": "fp", "sampler": "DDIMScheduler()", "steps": 20,
                "guidance": 7.5, "seeds": "image i uses seed i, i = 0..63", "prompt_source": "builtin"},
        "clip_score": {"value": clip, "n": 64, "clip_model": "builtin:fashion-clip"},
        "fidelity": {"psnr": 24.5, "ssim": 0.81, "n_pairs": 64, "lpips_note": "LPIPS not computed: offline",
                     "provenance": {"implementation": "torchmetrics"}},
        "baseline_scores": {"size": {"denoiser_bytes": 3.4e6}, "fid": {"value": 0.0}, "clip_score": {"value": 31.0}},
        "stages": [{"index": 0, "name": "prune", "summary": {"sparsity": 0.5}}],
        **({"grid": grid} if grid else {}),
    }


@pytest.fixture
def runs(tmp_path):
    dirs = []
    for k, (size, fid, clip) in enumerate([(1.7e6, 14.2, 30.1), (0.9e6, 19.5, 28.4)]):
        d = tmp_path / f"run{k}"
        (d / "grids").mkdir(parents=True)
        (d / "grids" / "g.png").write_bytes(b"\x89PNG")
        (d / "metrics.json").write_text(json.dumps(_metrics(size, fid, clip, grid="grids/g.png")))
        dirs.append(d)
    return dirs


def test_single_report_has_numbers_provenance_grid_and_plot(runs):
    md_path = write_report(runs[0])
    md = md_path.read_text()
    assert md.index("Quality lost: PSNR 24.5 dB < 25") < md.index("![grid")  # the verdict comes first
    assert "| denoiser size (MB) | 3.40 | 1.70 | 2.00x smaller |" in md and "| CLIP score | 31 | 30.10 | -0.90 (kept" in md
    assert "n/a: 64 generated vs 64 reference images; FID needs >= 200 on each side" in md
    assert "weights_sha256: 7ff4a85c" in md and "resize: clean" in md and "seeds: image i uses seed i" in md
    assert "![grid" in md and "(grids/g.png)" in md and f"({PLOT_FILE})" in md
    assert "LPIPS not computed" in md and "| 0 | prune |" in md
    page = (runs[0] / "report.html").read_text()
    assert "<svg" in page and 'src="grids/g.png"' in page and "7ff4a85c" in page
    ET.fromstring((runs[0] / PLOT_FILE).read_text())  # well-formed SVG


def test_comparison_plot_has_a_point_per_model(runs, tmp_path):
    out = tmp_path / "cmp"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out)]) == 0
    root = ET.fromstring((out / PLOT_FILE).read_text())
    circles = root.findall(f".//{SVG}circle")
    assert len(circles) == 10  # 2 runs x (original, compressed) x (FID, CLIP) + 2 compressed x PSNR
    md = (out / "report.md").read_text()
    assert "## run0" in md and "## run1" in md and "(../run0/grids/g.png)" in md


def test_points_and_missing_values():
    pts = points_of(_metrics(2e6, 10.0, 25.0), "a")
    assert [(p.label, p.size_mb, p.fid, p.clip, p.psnr) for p in pts] == [
        ("a: original", 3.4, 0.0, 31.0, None), ("a: compressed", 2.0, 10.0, 25.0, 24.5)]
    m = _metrics(2e6, 10.0, 25.0)
    m["stages"] = [{"index": 0, "name": "prune", "size": {"denoiser_bytes": 3e6}, "fidelity": {"psnr": 30.0, "ssim": 0.9}},
                   {"index": 1, "name": "ptq"}]
    pts = points_of(m, "a")
    assert [p.label for p in pts] == ["a: original", "a: 0-prune", "a: compressed"] and pts[1].psnr == 30.0
    m = _metrics(2e6, 10.0, 25.0)
    m["fid"] = {"value": None, "note": "FID/KID skipped"}
    svg = quality_size_svg(points_of(m, "a"))
    assert "no FID values" not in svg  # the original still has an FID (0)
    del m["baseline_scores"]
    assert "no FID values" in quality_size_svg(points_of(m, "a"))


def test_errors(tmp_path, capsys):
    with pytest.raises(DiffsqueezeError, match="no metrics.json"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.json").write_text("{")
    with pytest.raises(DiffsqueezeError, match="not valid JSON"):
        read_metrics(tmp_path)
    assert main(["report", str(tmp_path), str(tmp_path)]) == 1
    assert "--out" in capsys.readouterr().err


def test_verdict_fid_only_with_enough_images_and_kid_without_a_fake_spread():
    m = _metrics(1.0e6, 14.2, 30.5)
    m["fidelity"]["psnr"] = 27.0
    m["fid"].update(num_generated=500, num_reference=500, kid_subset_size=500)
    sentence, rows = verdict(m)
    assert sentence == "Compression worked: the denoiser is 3.40x smaller and the images are kept (PSNR 27.0 dB, CLIP -0.50)."
    cells = {r[0]: r[2] for r in rows}
    assert cells["FID vs the original's images"] == "14.2" and cells["KID"] == "0.012 (one subset: the whole sets, no spread)"
    m["fid"].update(num_generated=5000, num_reference=5000, kid_subset_size=1000)
    assert {r[0]: r[2] for r in verdict(m)[1]}["KID"] == "0.012 ± 0.002"
    m["size"]["denoiser_bytes"] = 3.4e6  # a pruned model stored dense
    assert verdict(m)[0].startswith("The images are kept, but the denoiser is not smaller (1.00x")
    m["clip_score"]["value"] = 29.0  # 2 below the original's 31
    assert verdict(m)[0].startswith("Quality lost: CLIP -2.00, more than 1.5 below the original")
