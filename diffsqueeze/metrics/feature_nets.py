"""Feature networks for FID/KID by name: the FID Inception-v3, or a tiny random net for tests.

``--features`` / ``eval.features`` name one of :data:`~diffsqueeze.metrics.config.FEATURE_NETS`;
both come back as a :class:`~diffsqueeze.metrics.inception.FeatureExtractor`.
"""

from __future__ import annotations

import torch

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.clip_score import module_hash
from diffsqueeze.metrics.config import FEATURE_NETS
from diffsqueeze.metrics.inception import (
    FeatureExtractor,
    InceptionWeightsNotFound,
    load_inception,
)

__all__ = ["tiny_feature_net", "load_feature_net"]


def tiny_feature_net(seed: int = 0, resize: str = "bilinear"):
    """A tiny random conv net with the :class:`~diffsqueeze.metrics.inception.FeatureExtractor`
    interface (64 features). For tests and smoke runs only: its FID means nothing."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 8, stride=8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4),
                                  torch.nn.Flatten())
    return FeatureExtractor(net, num_features=64, weights_sha256=module_hash(net), weights_name="tiny-random-test-net",
                            resize=resize)


def load_feature_net(name: str, device: str = "cpu", resize: str = "clean"):
    """``inception`` (the FID Inception-v3, see :func:`~diffsqueeze.metrics.inception.load_inception`)
    or ``tiny-random`` (:func:`tiny_feature_net`)."""
    if name == "tiny-random":
        return tiny_feature_net().to(device)
    if name != "inception":
        raise DiffsqueezeError(f"unknown feature network '{name}'; known: {', '.join(FEATURE_NETS)}")
    try:
        return load_inception(resize=resize, device=device)
    except InceptionWeightsNotFound as exc:
        raise DiffsqueezeError(str(exc)) from exc
