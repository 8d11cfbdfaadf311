"""Low-rank representation mimicking (LRM) of BinaryDM (docs/methods.md §7).

Forward hooks capture each block's output in the FP teacher and in the binarized student. Every
output feature map is flattened to ``(rows, d)`` over its last (channel) dimension: ``(B, C, H, W)``
gives ``(B H W, C)``, tokens ``(B, T, D)`` give ``(B T, D)``. A projection ``K`` (``d x r``,
``r = d // 4`` by default) holds the top-``r`` principal directions of the *teacher's*
features, computed once with ``torch.pca_lowrank`` before training, and::

    L_LRM = mean over block outputs of MSE(student_features @ K, teacher_features @ K)

(the PCA centering cancels in the difference). The training loss adds ``weight * L_LRM``
(1e-4 by default). Blocks that return several tensors (a UNet down block returns its hidden
state and the skip tuple; an MMDiT block returns context and image tokens) contribute each
top-level tensor as its own output; nested tuples (the skips) are not used.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def output_tensors(out) -> list[Tensor | None]:
    """Top-level tensors of a block's output, by position (None where that position is not a tensor)."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, (tuple, list)):
        return [x if torch.is_tensor(x) else None for x in out]
    if hasattr(out, "sample") and torch.is_tensor(out.sample):
        return [out.sample]
    return []


def features_2d(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B H W, C)``; ``(B, T, D) -> (B T, D)``; 2-D stays."""
    if x.dim() == 4:
        return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
    if x.dim() >= 2:
        return x.reshape(-1, x.shape[-1])
    return x.reshape(-1, 1)


def block_outputs(raw: dict) -> dict[str, Tensor]:
    """``{"<block>#<i>": tensor}``: the floating-point tensors of each captured block output
    (``diffsqueeze.pipelines.stage_helpers.capture_outputs``), by position."""
    return {f"{name}#{i}": t for name, out in raw.items() for i, t in enumerate(output_tensors(out))
            if t is not None and t.is_floating_point()}


@torch.no_grad()
def pca_projection(features: Tensor, rank: int, seed: int = 0) -> Tensor:
    """Top-``rank`` principal directions (``d x rank``) of ``features`` ``(rows, d)`` by ``torch.pca_lowrank``."""
    x = features.detach().float()
    rank = max(1, min(rank, x.shape[0], x.shape[1]))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _, _, v = torch.pca_lowrank(x, q=rank, center=True, niter=4)
    return v[:, :rank].contiguous()


class LowRankMimicking(nn.Module):
    """The fitted projections (buffers ``K``, one per block output) and the LRM loss.

    Args:
        blocks: module names (inside the denoiser) whose outputs are mimicked.
        rank_divisor: ``r = d // rank_divisor`` (4 in BinaryDM).
    """

    def __init__(self, blocks: list[str], rank_divisor: int = 4):
        super().__init__()
        self.blocks = list(blocks)
        self.rank_divisor = rank_divisor
        self.keys: list[str] = []
        self.proj: dict[str, Tensor] = {}

    @torch.no_grad()
    def fit(self, teacher_outputs: dict[str, Tensor], max_rows: int = 65536, seed: int = 0) -> None:
        """Compute each output's projection once from the teacher's features (rows subsampled)."""
        gen = torch.Generator().manual_seed(seed)
        for key in sorted(teacher_outputs):
            f = features_2d(teacher_outputs[key])
            if f.shape[0] > max_rows:
                f = f[torch.randperm(f.shape[0], generator=gen)[:max_rows].to(f.device)]
            rank = max(1, f.shape[1] // self.rank_divisor)
            self.proj[key] = pca_projection(f, rank, seed)
        self.keys = sorted(self.proj)

    def loss(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
        """Mean over the fitted outputs of ``MSE(student K, teacher K)``."""
        if not self.keys:
            raise RuntimeError("LowRankMimicking.fit must run before loss (projections come from the teacher)")
        terms = []
        for key in self.keys:
            if key not in student or key not in teacher:
                continue
            k = self.proj[key].to(student[key].device, student[key].dtype)
            s = features_2d(student[key]) @ k
            t = features_2d(teacher[key].detach()) @ k
            terms.append(torch.mean((s - t) ** 2))
        if not terms:
            raise RuntimeError("no block output was captured for LRM")
        return torch.stack(terms).mean()
