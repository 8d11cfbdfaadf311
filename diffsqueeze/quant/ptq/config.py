"""Config of the ``ptq`` stage (YAML keys = field names); validated before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from diffsqueeze.errors import RecipeError
from diffsqueeze.quant.primitives.formats import NumberFormat, formats_for_bits, parse_format

DEFAULT_BLOCK_TYPES = (
    "ResnetBlock2D",
    "BasicTransformerBlock",
    "JointTransformerBlock",
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "PixArtTransformerBlock",
    "DiTBlock",
)
"""Module classes reconstructed as one block (docs/methods.md §4: ResNet and transformer blocks)."""

FORMAT_KINDS = ("int", "int_sym", "fp")


def format_spec(fmt: str, bits: int, where: str) -> tuple[str, int, str | None]:
    """Validate ``format``/``bits``: returns ``(kind, bits, explicit name or None)``.

    ``int`` / ``int_sym`` mean the INT format of ``bits`` bits; ``fp`` means a per-layer search
    among the FP formats of ``bits`` bits (docs/methods.md §3); any other value must be a known format
    name whose width equals ``bits`` (``kind`` is then the format's own: ``int``, ``fp``, ``block``).

    Raises:
        RecipeError: unknown format, bits out of range, or a width that disagrees with ``bits``.
    """
    key = fmt.strip().lower()
    if key in ("int", "int_sym"):
        if not 2 <= bits <= 8:
            raise RecipeError(f"{where}bits", f"integer bit-width {bits} is out of range; allowed: 2..8")
        return key, bits, f"int{bits}" + ("_sym" if key == "int_sym" else "")
    if key == "fp":
        try:
            formats_for_bits(bits)
        except ValueError as exc:
            raise RecipeError(f"{where}bits", str(exc)) from None
        return "fp", bits, None
    parsed = named_format(fmt, where)
    if parsed.bits != bits:
        if parsed.block:
            raise RecipeError(f"{where}bits", f"format {parsed.name} has {parsed.bits}-bit elements but bits is {bits}")
        raise RecipeError(f"{where}format", f"format '{fmt}' has {parsed.bits} bits but bits is {bits}")
    return parsed.kind, bits, parsed.name


def named_format(fmt: str, where: str) -> NumberFormat:
    """The format a recipe names (not ``int``/``int_sym``/``fp``).

    Raises:
        RecipeError: unknown name (the message lists the known ones).
    """
    try:
        return parse_format(fmt.strip().lower())
    except ValueError as exc:
        raise RecipeError(f"{where}format", f"{exc}; or one of {', '.join(FORMAT_KINDS)}") from None


def _block_format(fmt: str) -> NumberFormat | None:
    """The named format if it scales its own blocks (NVFP4, MXFP4, ...), else None."""
    key = fmt.strip().lower()
    if key in FORMAT_KINDS:
        return None
    parsed = named_format(key, "")
    return parsed if parsed.block else None


@dataclass(frozen=True)
class WeightQuantConfig:
    """Weight quantization.

    Attributes:
        bits: bit-width (INT 2..8; FP widths 4, 6, 8).
        format: ``int`` (asymmetric), ``int_sym``, ``fp`` (per-layer search among the FP
            formats of ``bits``) or a format name (``fp4_e2m1``, ``fp8_e4m3_hw``, ``int4``), or a
            block-scaled format (``nvfp4``, ``mxfp4``, ``mxfp8``: scales per block of inputs in
            their real encodings, round-to-nearest only; ``granularity`` stays ``channel``).
        granularity: ``channel`` (per output channel) or ``group`` (groups of inputs).
        group_size: inputs per group when ``granularity: group``.
        search: scale/bias search loss: ``mse`` of the weight or ``output`` (L2 of the layer
            output on calibration inputs, docs/methods.md §3).
        search_steps: FP bias candidates ``beta_0 * i / search_steps`` (paper: 100); INT
            scale candidates shrink the range by 1% each, 80 of them (docs/methods.md §2).
        scale_search: how the INT candidates are scored under ``search: mse``:
            ``coarse_to_fine`` (every 8th, then halving steps around each channel's best: 16
            passes over the weight instead of 80, the exhaustive optimum in almost every
            channel) or ``exhaustive`` (all 80).
    """

    bits: int = 8
    format: str = "int"
    granularity: Literal["channel", "group"] = "channel"
    group_size: int = 128
    search: Literal["mse", "output"] = "mse"
    search_steps: int = 100
    scale_search: Literal["coarse_to_fine", "exhaustive"] = "coarse_to_fine"

    def __post_init__(self) -> None:
        format_spec(self.format, self.bits, "")
        block = _block_format(self.format)
        if block is not None and self.granularity != "channel":
            raise RecipeError("granularity", f"format {block.name} scales its own blocks of {block.block} inputs: "
                              "leave granularity at channel")
        if self.search_steps < 1:
            raise RecipeError("search_steps", f"must be >= 1, got {self.search_steps}")
        if self.granularity == "group" and self.group_size < 1:
            raise RecipeError("group_size", f"must be >= 1, got {self.group_size}")

    @property
    def spec(self) -> tuple[str, int, str | None]:
        return format_spec(self.format, self.bits, "")


@dataclass(frozen=True)
class ActQuantConfig:
    """Activation (layer input) quantization.

    Attributes:
        bits / format: as for weights.
        granularity: ``tensor`` or ``channel`` (per conv channel / per token feature; use it at
            4 bits, docs/methods.md §5), static scales calibrated per timestep group; or ``group``: dynamic
            scales, one per token and group of ``group_size`` input channels, computed from the
            values as they arrive (SVDQuant, docs/methods.md §10); nothing is calibrated or learned, so
            ``timestep_groups`` must be 1 and ``lsq_iters`` 0. ``format`` may then also be a
            block-scaled format (``nvfp4``, ``mxfp4``, ``mxfp8``), in its own block size.
        group_size: input channels per dynamic group (clipped to the layer's width; a width that
            is not a multiple gets a shorter last group).
        timestep_groups: scale sets per calibration-timestep group (1 = not timestep-aware);
            at most ``calibration.timesteps``.
        init: scale initialization: ``mse`` (range-shrink search, docs/methods.md §2) or ``percentile``.
        lsq_iters: LSQ iterations per reconstruction unit (0 = keep the initialization).
        lsq_lr: LSQ learning rate (cosine schedule).
        first_last_bits: bits of the first and last layer's input (8, QuEST); 0 = same as ``bits``.
        search_values: activation values kept (random subsample) per layer and timestep group
            for the scale search.
    """

    bits: int = 8
    format: str = "int"
    granularity: Literal["tensor", "channel", "group"] = "tensor"
    group_size: int = 64
    timestep_groups: int = 1
    init: Literal["mse", "percentile"] = "mse"
    lsq_iters: int = 0
    lsq_lr: float = 4e-4
    first_last_bits: int = 8
    search_values: int = 2**20

    def __post_init__(self) -> None:
        block = _block_format(self.format)
        if block is not None and self.granularity != "group":
            raise RecipeError("granularity", f"format {block.name} has dynamic block scales: set granularity: group")
        format_spec(self.format, self.bits, "")
        if self.granularity == "group":
            if self.format.strip().lower() == "fp":
                raise RecipeError("format", "granularity group has no calibration to search an FP format "
                                  "on: name one (fp4_e2m1_hw, nvfp4, mxfp4, ...)")
            if self.group_size < 1:
                raise RecipeError("group_size", f"must be >= 1, got {self.group_size}")
            for key in ("timestep_groups", "lsq_iters"):
                if getattr(self, key) != (1 if key == "timestep_groups" else 0):
                    raise RecipeError(key, "granularity group computes its scales per token on the fly: "
                                      "set timestep_groups: 1 and lsq_iters: 0")
        if self.search_values < 1024:
            raise RecipeError("search_values", f"must be >= 1024, got {self.search_values}")
        if self.timestep_groups < 1:
            raise RecipeError("timestep_groups", f"must be >= 1, got {self.timestep_groups}")
        if self.lsq_iters < 0:
            raise RecipeError("lsq_iters", f"must be >= 0, got {self.lsq_iters}")
        if self.first_last_bits not in (0, 8):
            raise RecipeError("first_last_bits", f"0 (same as bits) or 8, got {self.first_last_bits}")

    @property
    def spec(self) -> tuple[str, int, str | None]:
        return format_spec(self.format, self.bits, "")

    @property
    def dynamic_group(self) -> int:
        """Channels per dynamic group (0: static calibrated scales)."""
        return self.group_size if self.granularity == "group" else 0


@dataclass(frozen=True)
class RoundingConfig:
    """Rounding of the weights (docs/methods.md §4).

    Attributes:
        method: ``nearest`` or ``adaround`` (learned rounding, block-wise reconstruction).
        iters: optimization steps per reconstruction unit (Q-Diffusion: 20000).
        lr: Adam learning rate of the rounding variables.
        batch_size: reconstruction minibatch (Q-Diffusion: 32).
        reg_weight: lambda of the rounding regularizer.
        warmup: fraction of iterations without the regularizer, beta held at ``beta_start``.
        beta_start / beta_end: annealing of beta after the warmup (20 -> 2).
        block_types: module classes reconstructed as one block; other quantized layers are
            reconstructed one by one.
        balance_timesteps: weigh each calibration timestep's reconstruction loss by the inverse
            of the unit's round-to-nearest loss at that timestep (capped at ``balance_cap``
            times the mean), so that the sum cannot fall by giving up the timesteps where the
            error is small but costly (high noise). Off: the plain BRECQ sum.
        balance_cap: largest timestep weight relative to an even weighting.
        keep_better: after hard rounding, keep round-to-nearest for a unit whose (balanced)
            calibration loss the learned rounding did not lower.
    """

    method: Literal["nearest", "adaround"] = "nearest"
    iters: int = 20000
    lr: float = 1e-3
    batch_size: int = 32
    reg_weight: float = 0.01
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    block_types: tuple[str, ...] = DEFAULT_BLOCK_TYPES
    balance_timesteps: bool = True
    balance_cap: float = 100.0
    keep_better: bool = True

    def __post_init__(self) -> None:
        if self.balance_cap < 1.0:
            raise RecipeError("balance_cap", f"must be >= 1, got {self.balance_cap}")
        for name in ("iters", "batch_size"):
            if getattr(self, name) < 1:
                raise RecipeError(name, f"must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.warmup < 1.0:
            raise RecipeError("warmup", f"must be in [0, 1), got {self.warmup}")
        if self.lr <= 0 or self.reg_weight < 0:
            raise RecipeError("lr", "lr must be > 0 and reg_weight >= 0")


@dataclass(frozen=True)
class LowRankConfig:
    """The 16-bit low-rank branch (SVDQuant, docs/methods.md §10): each layer's weight becomes
    ``up @ down`` (its top singular directions, kept in float16) plus a residual that is
    quantized with the layer's format and rounding. Off by default.

    Attributes:
        rank: the branch's rank in every layer (0: off unless ``fraction``).
        fraction: the rank as a fraction of each layer's full rank ``min(out, in * k * k)``
            (rounded, at least 1), for models whose layers differ much in width.
    """

    rank: int = 0
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise RecipeError("rank", f"must be >= 0, got {self.rank}")
        if not 0 <= self.fraction < 1:
            raise RecipeError("fraction", f"must be in [0, 1), got {self.fraction}")
        if self.rank and self.fraction:
            raise RecipeError("rank", "give rank or fraction, not both")

    def rank_for(self, out: int, row: int) -> int:
        """The branch rank of a layer with weight rows ``out`` x ``row`` (0: no branch)."""
        full = min(out, row)
        r = self.rank or (max(1, round(self.fraction * full)) if self.fraction else 0)
        return min(r, full - 1) if full > 1 else 0


@dataclass(frozen=True)
class SmoothingConfig:
    """Per-input-channel smoothing (SmoothQuant, docs/methods.md §10): activation outliers moved into
    the weights by ``s_j = max|x_j|^alpha / max|W_:,j|^(1-alpha)``. Off by default.

    Attributes:
        alpha: migration strength in [0, 1] (SmoothQuant's default 0.5), the same for every layer.
        search: candidate alphas tried per layer on calibration inputs (instead of ``alpha``):
            the one with the smallest quantized output error is kept, none if none beats the
            unsmoothed layer (docs/quantization.md, "Smoothing").
    """

    alpha: Optional[float] = None
    search: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.alpha is not None and self.search:
            raise RecipeError("alpha", "give alpha or search, not both")
        for a in ((self.alpha,) if self.alpha is not None else ()) + tuple(self.search):
            if not 0.0 <= float(a) <= 1.0:
                raise RecipeError("search" if self.search else "alpha", f"alpha must be in [0, 1], got {a}")

    @property
    def enabled(self) -> bool:
        return self.alpha is not None or bool(self.search)


@dataclass(frozen=True)
class PTQConfig:
    """Config of the ``ptq`` stage (docs/methods.md §1-5).

    Attributes:
        weights: weight quantization.
        activations: activation quantization, or null for weight-only quantization.
        rounding: round-to-nearest or learned rounding.
        component: component to quantize (``denoiser`` or a component name).
        include / exclude: globs on module names inside the component.
        keep_fp: globs of layers left in full precision.
        first_last_weights_fp: keep the first and last layer's weights in FP (QuEST option).
        softmax_bits: bits of the post-softmax attention probabilities (unsigned, z = 0);
            0 = not quantized. QuEST's SD command uses 16.
        shortcut_split: separate quantizers for the two channel ranges of concatenated skip
            inputs (docs/methods.md §5).
        batch_size: batch of streamed calibration data for statistics.
        samples_per_timestep: calibration samples used per timestep (0 = all recorded).
        lowrank: the 16-bit low-rank branch beside each quantized weight (off by default).
        smoothing: per-input-channel smoothing before quantization (off by default); needs
            ``activations``.
    """

    weights: WeightQuantConfig = field(default_factory=WeightQuantConfig)
    activations: Optional[ActQuantConfig] = field(default_factory=ActQuantConfig)
    rounding: RoundingConfig = field(default_factory=RoundingConfig)
    component: str = "denoiser"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    keep_fp: tuple[str, ...] = ()
    first_last_weights_fp: bool = False
    softmax_bits: int = 0
    shortcut_split: bool = True
    batch_size: int = 16
    samples_per_timestep: int = 0
    lowrank: LowRankConfig = field(default_factory=LowRankConfig)
    smoothing: SmoothingConfig = field(default_factory=SmoothingConfig)

    def __post_init__(self) -> None:
        name = self.weights.spec[2]
        if name and not parse_format(name).learnable_rounding and self.rounding.method != "nearest":
            raise RecipeError("rounding.method", f"weights {self.weights.format} are round-to-nearest only (their "
                              "scales come from each block of weights: nothing to learn): set rounding.method: nearest")
        if self.smoothing.enabled and self.activations is None:
            raise RecipeError("smoothing", "smoothing moves activation outliers into the weights: it needs "
                              "activations (weight-only quantization has none)")
        if self.softmax_bits and not 2 <= self.softmax_bits <= 16:
            raise RecipeError("softmax_bits", f"0 (off) or 2..16, got {self.softmax_bits}")
        if self.batch_size < 1:
            raise RecipeError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.samples_per_timestep < 0:
            raise RecipeError("samples_per_timestep", f"must be >= 0, got {self.samples_per_timestep}")
