"""Side-by-side scoring of benchmark image sets (diffsqueeze.metrics.compare)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from diffsqueeze.metrics.compare import (
    bench_prompts_and_seeds,
    score_image_sets,
    write_marked_section,
)
from diffsqueeze.metrics.feature_nets import tiny_feature_net
from diffsqueeze.metrics.fid_stats import reference_stats
from diffsqueeze.metrics.frechet import frechet_distance


def _images(seed: int, n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.fixture
def real_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFSQUEEZE_FID_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "real"
    folder.mkdir()
    for i, im in enumerate(_images(99, 30)):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    return folder


def test_prompts_and_seeds_follow_the_eval_convention():
    ps, seeds = bench_prompts_and_seeds(["a", "b", "c"], 7)
    assert ps == ["a", "b", "c", "a", "b", "c", "a"] and seeds == list(range(7))


def test_scores_against_fp_and_real(real_folder, tmp_path):
    fp = _images(0)
    noisy = (fp.int() + torch.randint(-8, 9, fp.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255).to(torch.uint8)
    other = _images(2)
    ext = tiny_feature_net()
    scores, prov = score_image_sets({"fp": fp, "copy": fp.clone(), "noisy": noisy, "other": other}, fp="fp",
                                    prompts=["x"], real_reference=str(real_folder), clip_model=None,
                                    cache_dir=tmp_path / "feats", extractor=ext)
    assert scores["fp"].fid_vs_fp is None and scores["fp"].psnr_vs_fp is None
    assert scores["copy"].identical_to_fp and abs(scores["copy"].fid_vs_fp) < 1e-6
    assert scores["copy"].fid_vs_real == pytest.approx(scores["fp"].fid_vs_real)
    assert scores["noisy"].psnr_vs_fp > scores["other"].psnr_vs_fp
    assert scores["noisy"].fid_vs_fp < scores["other"].fid_vs_fp
    # FID vs real equals the float64 Frechet distance of the two feature sets
    f = reference_stats(fp, extractor=ext, cache=False, progress=False)
    r = reference_stats(str(real_folder), extractor=ext, cache=False, progress=False)
    assert scores["fp"].fid_vs_real == pytest.approx(frechet_distance(f.mu, f.sigma, r.mu, r.sigma), rel=1e-9)
    assert prov.num_images == 24 and prov.num_reference == 30 and "not available" in prov.text()


def test_sets_of_different_sizes_are_refused(real_folder):
    with pytest.raises(ValueError, match="differ in size"):
        score_image_sets({"fp": _images(0, 8), "q": _images(1, 6)}, fp="fp", prompts=["x"],
                         real_reference=str(real_folder), clip_model=None, extractor=tiny_feature_net())
    with pytest.raises(KeyError, match="FP set"):
        score_image_sets({"q": _images(1, 6)}, fp="fp", prompts=["x"], clip_model=None, extractor=tiny_feature_net())


def test_marked_section_is_replaced_in_place(tmp_path):
    doc = tmp_path / "R.md"
    doc.write_text("# R\n\nintro\n", encoding="utf-8")
    write_marked_section(doc, "t", "one", "Table")
    write_marked_section(doc, "t", "two", "Table")
    text = doc.read_text(encoding="utf-8")
    assert text.count("## Table") == 1 and "two" in text and "one" not in text and text.startswith("# R\n\nintro")
    doc.write_text(text + "\nafter\n", encoding="utf-8")
    write_marked_section(doc, "t", "three", "Table")
    assert doc.read_text(encoding="utf-8").endswith("<!-- t:end -->\n\nafter\n")
