"""Config of the ``binarize`` stage (BinaryDM, docs/methods.md §7) and its validation.

:class:`BinarizeConfig` holds the layer policy and the nested activation, LRM and training
configs; every value is checked when the dataclass is built (a :class:`RecipeError` names the key).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from diffsqueeze.errors import RecipeError

DATASETS = ("fashion-mnist",)


@dataclass(frozen=True)
class BinaryActConfig:
    """Activation quantization of the binarized layers (LSQ, signed, docs/methods.md §7).

    Attributes:
        bits: input bits of every binarized layer (4 for W1A4).
        granularity: ``tensor`` (BinaryDM's LSQ) or ``channel``.
        attention: also quantize attention q, k, softmax probabilities and v (inside blocks).
        prob_bits: bits of the (unsigned) probability quantizer; 0 = ``bits``.
    """

    bits: int = 4
    granularity: Literal["tensor", "channel"] = "tensor"
    attention: bool = True
    prob_bits: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise RecipeError("bits", f"activation bits must be in 2..8, got {self.bits} (null activations = FP)")
        if self.prob_bits and not 2 <= self.prob_bits <= 8:
            raise RecipeError("prob_bits", f"0 (= bits) or 2..8, got {self.prob_bits}")


@dataclass(frozen=True)
class LRMConfig:
    """Low-rank representation mimicking.

    Attributes:
        weight: loss weight (BinaryDM: 1e-4); 0 switches LRM off.
        rank_divisor: projection rank ``r = d // rank_divisor`` (4).
        fit_batches: calibration batches of teacher features the PCA is computed from.
    """

    weight: float = 1e-4
    rank_divisor: int = 4
    fit_batches: int = 1

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise RecipeError("weight", f"must be >= 0, got {self.weight}")
        if self.rank_divisor < 1 or self.fit_batches < 1:
            raise RecipeError("rank_divisor", "rank_divisor and fit_batches must be >= 1")


@dataclass(frozen=True)
class BinaryTrainConfig:
    """Training of the binarized denoiser.

    Attributes:
        mode: ``distill`` (data-free: MSE to the FP teacher's output on the calibration inputs) or
            ``dataset`` (the diffusion loss on ``dataset``; UNet text-to-image pipelines).
        dataset: dataset of the ``dataset`` mode; known: ``fashion-mnist``.
        iters: optimizer steps (BinaryDM trains 150k-300k; 0 = binarize without training).
        batch_size: samples per step.
        lr: AdamW learning rate of the weights (BinaryDM: 2e-5).
        scale_lr: learning rate of ``a1``/``a2`` and activation scales; 0 = ``lr``.
        weight_decay: AdamW weight decay of the weights.
        schedule: ``cosine`` or ``constant``.
        grad_clip: gradient-norm clipping (0 = off).
        cfg_dropout: ``dataset`` mode: fraction of empty prompts (classifier-free guidance).
        shuffle: ``distill`` mode: every batch mixes calibration timesteps, reshuffled each
            epoch (False: stream the recording in sampling order, one timestep at a time).
    """

    mode: Literal["distill", "dataset"] = "distill"
    dataset: str = "fashion-mnist"
    iters: int = 1000
    batch_size: int = 8
    lr: float = 2e-5
    scale_lr: float = 0.0
    weight_decay: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = 1.0
    cfg_dropout: float = 0.1
    shuffle: bool = True

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise RecipeError("iters", f"must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise RecipeError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.lr <= 0 or self.scale_lr < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise RecipeError("lr", "lr must be > 0; scale_lr, weight_decay and grad_clip >= 0")
        if self.mode == "dataset" and self.dataset not in DATASETS:
            raise RecipeError("dataset", f"unknown dataset {self.dataset!r}; known: {', '.join(DATASETS)}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise RecipeError("cfg_dropout", f"must be in [0, 1), got {self.cfg_dropout}")


@dataclass(frozen=True)
class BinarizeConfig:
    """Config of the ``binarize`` stage (docs/methods.md §7).

    Attributes:
        component: the component to binarize (``denoiser`` or a component name).
        order: order of the binarized layers outside the order-2 groups (1).
        order2_groups: how many outermost block groups get order 2 (1: the first down and last
            up block, the high-resolution ones; 0: none, the order-1 baseline).
        order2: globs of further layers that get order 2.
        include / exclude: globs on layer names inside the component.
        keep_fp: globs of layers that stay FP (default: norms and AdaLN modulations).
        keep_stem_fp: keep every layer outside the blocks FP (first/last conv, time embedding, ...).
        learn_scales: learn ``a1``/``a2`` (False: fixed at their initialization).
        progressive: progressive initialization (False: everything binarized from step 0).
        progressive_fraction: fraction of the iterations over which groups switch on.
        activations: activation quantization, or null for FP activations (W1A32).
        lrm: low-rank representation mimicking.
        train: training.
    """

    component: str = "denoiser"
    order: int = 1
    order2_groups: int = 1
    order2: tuple[str, ...] = ()
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = ("*norm*",)
    keep_stem_fp: bool = True
    learn_scales: bool = True
    progressive: bool = True
    progressive_fraction: float = 0.3
    activations: Optional[BinaryActConfig] = field(default_factory=BinaryActConfig)
    lrm: LRMConfig = field(default_factory=LRMConfig)
    train: BinaryTrainConfig = field(default_factory=BinaryTrainConfig)

    def __post_init__(self) -> None:
        if self.order not in (1, 2):
            raise RecipeError("order", f"1 or 2, got {self.order}")
        if self.order2_groups < 0:
            raise RecipeError("order2_groups", f"must be >= 0, got {self.order2_groups}")
        if not 0.0 <= self.progressive_fraction < 1.0:
            raise RecipeError("progressive_fraction", f"must be in [0, 1), got {self.progressive_fraction}")
