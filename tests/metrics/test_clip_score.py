"""CLIP score: the transformers-5 shim for torchmetrics' CLIPScore, the formula, loading."""

import pytest
import torch
import transformers
from torchmetrics.functional.multimodal.clip_score import _clip_score_update
from torchmetrics.multimodal.clip_score import CLIPScore

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.clip_score import (
    ClipScorer,
    ProjectedFeatures,
    aggregate,
    load_clip,
    tiny_clip,
)

PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit", "x"]


@pytest.fixture(scope="module")
def scorer():
    model, processor = tiny_clip(seed=0)
    return ClipScorer(model, processor)


@pytest.fixture(scope="module")
def images():
    return torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))


@pytest.mark.skipif(int(transformers.__version__.split(".")[0]) < 5, reason="the bug needs transformers >= 5")
def test_plain_torchmetrics_breaks_on_transformers5(scorer, images):
    """The bug the shim fixes: get_*_features return a model output, torchmetrics calls .norm on it."""
    metric = CLIPScore(model_name_or_path=lambda: (scorer.model, scorer.processor))
    with pytest.raises(AttributeError, match="norm"):
        metric.update(images, PROMPTS)


def test_shim_returns_tensors(scorer, images):
    feats = ProjectedFeatures(scorer.model)
    pixels = scorer.processor(images=list(images), return_tensors="pt")["pixel_values"]
    out = feats.get_image_features(pixel_values=pixels)
    assert isinstance(out, torch.Tensor) and out.shape == (4, scorer.model.config.projection_dim)
    assert feats.config is scorer.model.config


def test_direct_formula_equals_torchmetrics(scorer, images):
    per_image = scorer.cosine_x100(images, PROMPTS)
    tm_per_image, n = _clip_score_update(images, PROMPTS, scorer.features, scorer.processor)
    assert n == 4
    torch.testing.assert_close(per_image, tm_per_image.detach().double(), rtol=0, atol=1e-4)
    metric = scorer.torchmetrics_metric()
    metric.update(images[:2], PROMPTS[:2])
    metric.update(images[2:], PROMPTS[2:])
    assert float(metric.compute()) == pytest.approx(max(float(per_image.mean()), 0.0), abs=1e-4)
    # Where every cosine is >= 0, torchmetrics' clamp-of-mean equals docs/methods.md's mean-of-clamp (§9).
    pos = per_image >= 0
    if pos.any():
        m2 = scorer.torchmetrics_metric()
        m2.update(images[pos], [p for p, k in zip(PROMPTS, pos) if k])
        assert float(m2.compute()) == pytest.approx(aggregate(per_image[pos]), abs=1e-4)


def test_aggregate_clamps_each_image():
    assert aggregate(torch.tensor([30.0, -10.0])) == pytest.approx(15.0)
    assert aggregate(torch.tensor([-1.0, -2.0])) == 0.0


def test_rejects_float_images_and_length_mismatch(scorer, images):
    with pytest.raises(TypeError, match="uint8"):
        scorer.cosine_x100(images.float() / 255, PROMPTS)
    with pytest.raises(ValueError, match="prompts"):
        scorer.cosine_x100(images, PROMPTS[:3])


def test_load_local_folder_round_trip(scorer, images, tmp_path):
    scorer.model.save_pretrained(tmp_path, safe_serialization=True)
    scorer.processor.save_pretrained(tmp_path)
    loaded = ClipScorer.from_spec(str(tmp_path))
    assert loaded.weights_hash == scorer.weights_hash
    torch.testing.assert_close(loaded.cosine_x100(images, PROMPTS), scorer.cosine_x100(images, PROMPTS))
    prov = loaded.provenance()
    assert prov["clip_model"] == str(tmp_path) and "torchmetrics" in prov["implementation"]


def test_load_errors(tmp_path):
    with pytest.raises(DiffsqueezeError, match="not a hub id"):
        load_clip(str(tmp_path / "missing"))
    with pytest.raises(DiffsqueezeError, match="cannot load CLIP"):
        load_clip(str(tmp_path))  # a folder without a model


def test_builtin_fashion_clip_when_trained(images):
    from diffsqueeze.models.fashion.clip import CLIP_DIR

    if not (CLIP_DIR / "model.safetensors").is_file():
        pytest.skip("builtin:fashion-clip weights not trained yet")
    s = ClipScorer.from_spec("builtin:fashion-clip")
    assert s.cosine_x100(images, PROMPTS).shape == (4,)
