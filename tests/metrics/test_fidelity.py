"""PSNR / SSIM of compressed vs original images, LPIPS availability."""

import math

import pytest
import torch

from diffsqueeze.metrics.fidelity import (
    PSNR_CAP_DB,
    fidelity_summary,
    lpips_status,
    per_image_fidelity,
)


def _images(seed, n=3, size=32):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_identical_images_are_perfect():
    a = _images(0)
    v = per_image_fidelity(a, a.clone())
    assert torch.all(v["psnr"] == PSNR_CAP_DB)
    torch.testing.assert_close(v["ssim"], torch.ones(3, dtype=torch.float64))


def test_psnr_matches_the_formula():
    a, b = _images(0), _images(1)
    v = per_image_fidelity(a, b)
    for i in range(3):
        mse = ((a[i].double() - b[i].double()) / 255).pow(2).mean()
        assert float(v["psnr"][i]) == pytest.approx(10 * math.log10(1 / float(mse)), rel=1e-6)
    assert torch.all(v["ssim"] < 0.5)


def test_closer_images_score_better():
    a = _images(0)
    noise = torch.randint(-8, 9, a.shape, generator=torch.Generator().manual_seed(2))
    near = (a.int() + noise).clamp(0, 255).to(torch.uint8)
    far = _images(3)
    v_near, v_far = per_image_fidelity(near, a), per_image_fidelity(far, a)
    assert torch.all(v_near["psnr"] > v_far["psnr"]) and torch.all(v_near["ssim"] > v_far["ssim"])


def test_per_image_values_do_not_depend_on_batching():
    a, b = _images(0, n=4), _images(1, n=4)
    whole = per_image_fidelity(a, b)
    parts = [per_image_fidelity(a[i : i + 1], b[i : i + 1]) for i in range(4)]
    for key in ("psnr", "ssim"):
        assert torch.equal(whole[key], torch.cat([p[key] for p in parts]))


def test_small_images_and_errors():
    v = per_image_fidelity(_images(0, size=8), _images(1, size=8))
    assert v["ssim"].shape == (3,)
    with pytest.raises(ValueError, match="shapes differ"):
        per_image_fidelity(_images(0), _images(1, n=2))
    with pytest.raises(TypeError, match="uint8"):
        per_image_fidelity(_images(0).float(), _images(1).float())


def test_summary_reports_lpips_availability():
    available, note = lpips_status()
    s = fidelity_summary(per_image_fidelity(_images(0), _images(1)))
    assert s["n_pairs"] == 3 and set(s) >= {"psnr", "ssim", "lpips_note", "provenance"}
    assert s["lpips_note"] == note
    if not available:
        assert "not available offline" in note and "lpips" not in s
