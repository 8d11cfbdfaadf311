"""Fidelity of a compressed model to the original: same prompt, same seed, compare the images.

PSNR and SSIM come from torchmetrics (per image, on ``[0, 1]`` RGB, data range 1). LPIPS needs
ImageNet backbone weights from torchvision that are downloaded on first use; diffsqueeze never
downloads, so LPIPS is computed only where those weights are already in the torch hub cache,
and the output says why it is missing otherwise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

#: PSNR of identical images is infinite; per-image values are capped here so JSON stays finite.
PSNR_CAP_DB = 100.0
LPIPS_NET = "alex"
_TV_WEIGHTS = {"alex": ("alexnet", "AlexNet_Weights"), "vgg": ("vgg16", "VGG16_Weights"),
               "squeeze": ("squeezenet1_1", "SqueezeNet1_1_Weights")}


def lpips_status(net: str = LPIPS_NET) -> tuple[bool, str]:
    """Whether LPIPS can run offline: its torchvision backbone weights must be cached already.

    Returns:
        ``(available, note)``; the note names the file that is missing.
    """
    import torchvision

    arch, weights_enum = _TV_WEIGHTS[net]
    url = getattr(torchvision.models, weights_enum).DEFAULT.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if path.is_file():
        return True, f"LPIPS ({net}) with torchvision {arch} weights from {path}"
    return False, (f"LPIPS not computed: its {arch} backbone weights are not available offline "
                   f"(expected {path}; diffsqueeze does not download weights)")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, 3, H, W)`` -> float64 in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 in [0, 255], got {images.dtype}")
    return images.double() / 255.0


def per_image_fidelity(images: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image PSNR (dB, capped at :data:`PSNR_CAP_DB`) and SSIM of ``images`` against ``reference``.

    Args:
        images: uint8 ``(N, 3, H, W)``, the compressed model's outputs.
        reference: uint8 ``(N, 3, H, W)``, the original model's outputs for the same prompts and seeds.
    """
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    if images.shape != reference.shape:
        raise ValueError(f"image shapes differ: {tuple(images.shape)} vs {tuple(reference.shape)}")
    x, y = to_unit(images), to_unit(reference)
    mse = ((x - y) ** 2).flatten(1).mean(1)
    psnr = peak_signal_noise_ratio(x, y, data_range=1.0, reduction="none", dim=(1, 2, 3))
    psnr = torch.where(mse == 0, torch.full_like(psnr, PSNR_CAP_DB), psnr.clamp(max=PSNR_CAP_DB))
    kernel = min(11, x.shape[-1] - (1 - x.shape[-1] % 2), x.shape[-2] - (1 - x.shape[-2] % 2))
    ssim = structural_similarity_index_measure(x, y, data_range=1.0, reduction="none", kernel_size=kernel)
    return {"psnr": psnr.double(), "ssim": ssim.double()}


class LpipsScorer:
    """LPIPS through torchmetrics, built only when :func:`lpips_status` says the weights are local."""

    def __init__(self, net: str = LPIPS_NET):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        self.metric = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="mean", normalize=True)

    @torch.no_grad()
    def per_image(self, images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        x, y = to_unit(images).float(), to_unit(reference).float()
        if min(x.shape[-2:]) < 64:  # the backbones' pooling needs room; upsample small images
            x = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
            y = torch.nn.functional.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False)
        return torch.stack([self.metric.net(x[i : i + 1], y[i : i + 1], normalize=True).reshape(()) for i in range(len(x))]).double()


def fidelity_summary(values: dict[str, torch.Tensor], lpips_note: str | None = None) -> dict:
    """Means of per-image values (in index order, float64) plus the provenance of each number."""
    import torchmetrics

    out: dict = {"n_pairs": int(len(values["psnr"])) if "psnr" in values else 0}
    for key in ("psnr", "ssim", "lpips"):
        if key in values and len(values[key]):
            out[key] = float(values[key].double().mean())
    out["lpips_note"] = lpips_note or lpips_status()[1]
    out["provenance"] = {
        "implementation": f"torchmetrics {torchmetrics.__version__} functional PSNR / SSIM per image "
        "(RGB in [0, 1], data_range=1, gaussian kernel 11 or the image size, sigma 1.5), mean over pairs",
        "psnr_cap_db": PSNR_CAP_DB,
        "pairs": "compressed vs original image for the same prompt, seed, sampler, steps and guidance",
    }
    return out
