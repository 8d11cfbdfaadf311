"""The evaluation job (``diffsqueeze eval``): generate, score, shard, resume.

The job generates ``N`` images with deterministic per-image inputs (image ``i``: seed ``i``,
prompt ``i mod P``), and scores FID / KID against a reference, the CLIP score, and the fidelity
to a baseline model (the original) for the same prompts and seeds.

Work is cut into global batches of ``batch_size`` images (batch ``b`` = images
``[b*B, (b+1)*B)``). Under accelerate (``accelerate launch -m diffsqueeze eval ...``) process
``r`` of ``W`` runs the batches ``b`` with ``b mod W == r``. A batch is computed the same way
whatever the number of processes, and the final numbers are computed on the main process from
the per-image values gathered in image order (float64), so 1 and W processes give identical
images and numbers. Each batch writes a shard (``shards/batch-000012.safetensors``: features,
per-image CLIP cosines, PSNR/SSIM, image hashes) atomically; a rerun skips the shards that exist
and match the job, so a killed job continues where it stopped (:mod:`~diffsqueeze.metrics.eval_shards`).

"The same way" includes the torch thread count: CPU kernels split their sums by thread, so the
same batch on 1 and 2 threads differs in the last bits, and those bits move an image's pixels
(builtin:fashion W8A8 at 24 images: FID 182.1 in one process on the machine's default threads,
187.0 in two processes of one thread each; one process on one thread gave the two-process images). Every process therefore runs its batches, and the reference
features, on ``EvalJob.threads`` torch threads (default 1), whatever the launcher or
``OMP_NUM_THREADS`` gave it; the count is part of the job's key and of every provenance record.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.metrics.atomic_files import atomic_write_text
from diffsqueeze.metrics.clip_score import ClipScorer, aggregate, module_hash
from diffsqueeze.metrics.config import num_images_problem
from diffsqueeze.metrics.eval_shards import (
    JOB_FILE,
    SHARD_DIR,
    gather,
    pngs_present,
    prepare_out_dir,
    process_batches,
    save_pngs,
    save_shard,
    shard_matches,
    shard_path,
)
from diffsqueeze.metrics.feature_nets import load_feature_net
from diffsqueeze.metrics.fid_features import extract_features
from diffsqueeze.metrics.fid_stats import ReferenceStats
from diffsqueeze.metrics.fidelity import (
    fidelity_summary,
    lpips_status,
    per_image_fidelity,
)
from diffsqueeze.metrics.frechet import (
    clipped_subset_size,
    frechet_distance,
    kernel_inception_distance,
)
from diffsqueeze.metrics.grid import generate_images
from diffsqueeze.metrics.pipeline_info import (
    denoiser_bytes,
    resolve_sampling,
    sampler_description,
    sampling_note,
)
from diffsqueeze.metrics.references import reference_statistics
from diffsqueeze.models.conditioning import (
    check_size,
    clip_not_applicable,
    conditioning_of,
    pipeline_prompts,
    warn_once,
)

__all__ = ["METRICS_FORMAT", "SHARD_DIR", "JOB_FILE", "EvalJob", "job_from_args", "run_eval_job", "torch_threads"]

log = logging.getLogger(__name__)

METRICS_FORMAT = 1
#: What a provenance record says about how the images were computed (with sampler, steps, ...).
COMPUTE_KEYS = ("kernels", "decode", "device", "torch_threads")


@dataclass(frozen=True)
class EvalJob:
    """What one evaluation computes. ``key()`` names everything that changes a shard."""

    model: str
    reference: str = "fp"
    num_images: int = 64
    batch_size: int = 8
    prompts: str = "builtin"
    num_inference_steps: Optional[int] = None  # None: the model's own (its pipeline's defaults)
    guidance_scale: Optional[float] = None
    baseline: Optional[str] = None
    clip_model: Optional[str] = None
    fid_backend: str = "torchmetrics"
    features: str = "inception"
    resize: str = "clean"
    save_images: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    height: Optional[int] = None  # None (both): the pipeline's own image size
    width: Optional[int] = None
    kernels: str = "simulated"  # how the evaluated model computes (diffsqueeze.loading.load_pipeline)
    decode: str = "forward"
    threads: int = 1  # torch threads of every process's batch work (see the module docstring)

    def __post_init__(self) -> None:
        if self.num_images < 2:
            raise DiffsqueezeError(f"--num-images must be >= 2 for FID, got {self.num_images}")
        if num_images_problem(self.num_images):
            raise DiffsqueezeError(f"--num-images {num_images_problem(self.num_images)}")
        if self.threads < 1:
            raise DiffsqueezeError(f"--threads must be >= 1, got {self.threads}")
        if self.batch_size < 1 or (self.num_inference_steps is not None and self.num_inference_steps < 1):
            raise DiffsqueezeError("--batch-size and --steps must be >= 1")
        if self.reference == "fp" and self.baseline is None:
            raise DiffsqueezeError("--ref fp means the baseline model's own outputs: give --baseline MODEL "
                                   "(or a folder of images / builtin:fashion-mnist as --ref)")
        if self.fid_backend not in ("torchmetrics", "clean-fid"):
            raise DiffsqueezeError(f"unknown FID backend '{self.fid_backend}'; known: torchmetrics, clean-fid")
        if self.fid_backend == "clean-fid" and self.resize != "clean":
            raise DiffsqueezeError("the clean-fid backend only does the 'clean' resize")


def job_from_args(**kw: Any) -> EvalJob:
    """Build an :class:`EvalJob` from keyword arguments, ignoring unknown ones (CLI helper)."""
    names = {f.name for f in dataclasses.fields(EvalJob)}
    return EvalJob(**{k: v for k, v in kw.items() if k in names})


def _prompt_for(prompts: list[str], i: int) -> str:
    return prompts[i % len(prompts)]


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block on ``n`` torch threads, then restore the count the process had."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pixel_digest(images: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.frombuffer(bytearray(hashlib.sha256(t.contiguous().numpy().tobytes()).digest()),
                                         dtype=torch.uint8) for t in images.cpu()])


class _Scorer:
    """Per-batch work shared by all processes: generate, extract features, CLIP, fidelity."""

    def __init__(self, job: EvalJob, pipe, baseline_pipe, extractor, clip: ClipScorer | None, prompts: list[str], out_dir: Path):
        self.job, self.pipe, self.baseline_pipe = job, pipe, baseline_pipe
        self.extractor, self.clip, self.prompts, self.out_dir = extractor, clip, prompts, out_dir
        self.gen_seconds = 0.0
        self.feat_seconds = 0.0

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        feats = extract_features(images, self.extractor, backend=self.job.fid_backend, batch_size=len(images),
                                 progress=False)
        self.feat_seconds += time.perf_counter() - t0
        return torch.from_numpy(feats)

    def batch(self, start: int, count: int) -> dict[str, torch.Tensor]:
        job = self.job
        seeds = list(range(start, start + count))
        prompts = [_prompt_for(self.prompts, i) for i in seeds]
        t0 = time.perf_counter()
        images = generate_images(self.pipe, prompts, seeds, job.num_inference_steps, job.guidance_scale,
                                 batch_size=count, height=job.height, width=job.width)
        self.gen_seconds += time.perf_counter() - t0
        out = {"features": self._features(images), "image_sha256": _pixel_digest(images)}
        if self.clip is not None:
            out["clip_cos_x100"] = self.clip.cosine_x100(images, prompts)
        if job.save_images:
            save_pngs(images, self.out_dir / "images", start)
        if self.baseline_pipe is not None:
            base = generate_images(self.baseline_pipe, prompts, seeds, job.num_inference_steps, job.guidance_scale,
                                   batch_size=count, height=job.height, width=job.width)
            out["baseline_features"] = self._features(base)
            out["baseline_image_sha256"] = _pixel_digest(base)
            out.update(per_image_fidelity(images, base))
            if self.clip is not None:
                out["baseline_clip_cos_x100"] = self.clip.cosine_x100(base, prompts)
            if job.save_images:
                save_pngs(base, self.out_dir / "images-baseline", start)
        return out


def _job_key(job: EvalJob, pipe, baseline_pipe, extractor, clip: ClipScorer | None, prompts: list[str], dtype: str,
             device_type: str) -> tuple[str, dict]:
    from diffsqueeze.models import module_components

    def fingerprint(p):
        if p is None:
            return None
        h = hashlib.sha256()
        for name, module in sorted(module_components(p).items()):
            h.update(f"{name}:{module_hash(module)}".encode())
        return h.hexdigest()[:16]

    payload = {
        "format": METRICS_FORMAT,
        "model": fingerprint(pipe),
        "baseline": fingerprint(baseline_pipe),
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "batch_size": job.batch_size,
        "steps": job.num_inference_steps,
        "guidance": job.guidance_scale,
        "size": [job.height, job.width], "kernels": [job.kernels, job.decode],
        "sampler": sampler_description(pipe),
        "features": f"{extractor.weights_sha256}:{extractor.resize}:{job.fid_backend}",
        "clip": clip.weights_hash if clip is not None else None,
        "dtype": dtype,
        "device": device_type,
        "threads": job.threads,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24], payload


def _distributed_state(device: str | None):
    """accelerate's process state; CPU runs (no CUDA, or ``device='cpu'``) use gloo across processes
    launched by ``torchrun`` / ``accelerate launch`` (accelerate needs ``cpu=True`` to see them)."""
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or (device or "").startswith("cpu")
    return PartialState(cpu=cpu)


def run_eval_job(
    job: EvalJob,
    out_dir: Path,
    *,
    pipe=None,
    baseline_pipe=None,
    extractor=None,
    clip: ClipScorer | None = None,
    device: str | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
) -> dict | None:
    """Run (or continue) an evaluation job; the main process returns the metrics dict.

    Args:
        job: what to compute.
        out_dir: shards, ``job.json``, ``metrics.json``, optional images.
        pipe / baseline_pipe / extractor / clip: already-loaded components (else loaded from
            ``job``); under several processes each process loads its own.
        device: torch device (default: accelerate's device for this process).
        overwrite: delete shards of a different job instead of refusing.

    Returns:
        The metrics (also written to ``out_dir/metrics.json``) on the main process, None on others.

    Raises:
        DiffsqueezeError: bad inputs, or ``out_dir`` holds shards of another job.
    """
    from diffsqueeze.loading import load_pipeline

    state = _distributed_state(device)
    device = device or str(state.device)
    out_dir = Path(out_dir)
    if pipe is None:
        pipe = load_pipeline(job.model, device=device, dtype=dtype, kernels=job.kernels, decode=job.decode)
    prompts = pipeline_prompts(pipe, job.prompts)
    check_size(pipe, job.height, job.width, "eval")
    steps, guidance = resolve_sampling(pipe, job.num_inference_steps, job.guidance_scale)
    note = sampling_note(job.num_inference_steps, job.guidance_scale, steps, guidance)
    if note:
        log.info("sampling with %s", note)
    job = dataclasses.replace(job, num_inference_steps=steps, guidance_scale=guidance)
    if baseline_pipe is None and job.baseline is not None:
        baseline_pipe = load_pipeline(job.baseline, device=device, dtype=dtype)
    if extractor is None:
        extractor = load_feature_net(job.features, device=device, resize=job.resize)
    if not conditioning_of(pipe).has_text:
        if job.clip_model is not None or clip is not None:
            log.info("%s", clip_not_applicable(pipe))
        clip = None
    elif clip is None and job.clip_model is not None:
        clip = ClipScorer.from_spec(job.clip_model, device=device)
    clip_cut = clip.truncation_warning(prompts, job.prompts) if clip is not None else None
    if clip_cut:
        warn_once(clip_cut)
    key, payload = _job_key(job, pipe, baseline_pipe, extractor, clip, prompts, dtype, torch.device(device).type)

    if state.is_main_process:
        prepare_out_dir(out_dir, key, payload, overwrite)
    state.wait_for_everyone()

    def pending(b: int, start: int, count: int) -> bool:
        return (not shard_matches(shard_path(out_dir, b), key, start, count)
                or (job.save_images and not pngs_present(out_dir, start, count, baseline_pipe is not None)))

    # Two passes over this process's batches, one at a time: count the finished ones, then do the rest.
    mine_images = todo_images = 0
    for b, start, count in process_batches(job.num_images, job.batch_size, state.process_index, state.num_processes):
        mine_images += count
        todo_images += count if pending(b, start, count) else 0
    if todo_images < mine_images:
        log.info("resuming: %d of this process's %d images already done", mine_images - todo_images, mine_images)
    scorer = _Scorer(job, pipe, baseline_pipe, extractor, clip, prompts, out_dir)
    t0 = time.perf_counter()
    n_done = 0
    bar = tqdm(total=todo_images, unit="img", desc=f"eval [{state.process_index + 1}/{state.num_processes}]",
               disable=not (progress and state.is_local_main_process), dynamic_ncols=True)
    with torch_threads(job.threads):
        for b, start, count in process_batches(job.num_images, job.batch_size, state.process_index, state.num_processes):
            if not pending(b, start, count):
                continue
            save_shard(scorer.batch(start, count), shard_path(out_dir, b), key, start, count)
            n_done += count
            bar.update(count)
            bar.set_postfix(img_s=f"{n_done / max(time.perf_counter() - t0, 1e-9):.2f}")
    bar.close()
    timing = {"process_index": state.process_index, "images": n_done, "generation_s": round(scorer.gen_seconds, 3),
              "features_s": round(scorer.feat_seconds, 3), "wall_s": round(time.perf_counter() - t0, 3)}
    atomic_write_text(out_dir / SHARD_DIR / f"timing-{state.process_index}.json", json.dumps(timing))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    per_image = gather(out_dir, job.num_images, job.batch_size, key)
    with torch_threads(job.threads):  # the reference features too (a folder or builtin set goes through the net)
        metrics = _final_metrics(job, per_image, pipe, baseline_pipe, extractor, clip, prompts, payload, dtype, device,
                                 state.num_processes, out_dir)
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def _fid_block(feats: torch.Tensor, ref, job: EvalJob, extractor, reference_name: str) -> dict:
    """FID/KID (float64, from features in image order) with the helper's math and provenance."""
    from diffsqueeze.metrics.fid import (
        FIDResult,  # imports torchmetrics: only when scoring
    )

    f64 = feats.double().numpy()
    mu, sigma = f64.mean(axis=0), np.cov(f64, rowvar=False)
    value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    kid_mean = kid_std = kid_size = None
    if ref.features is not None:
        kid_mean, kid_std = kernel_inception_distance(feats.numpy(), ref.features, subsets=job.kid_subsets,
                                                      subset_size=job.kid_subset_size, seed=0)
        kid_size = clipped_subset_size(len(feats), len(ref.features), job.kid_subset_size)
    extraction = ("uint8 batches through the feature network (its own resize)" if job.fid_backend == "torchmetrics"
                  else "clean-fid's clean resizer, then the feature network")
    # The implementation text is part of every metrics.json: it keeps the module path it was first
    # published with (the math now lives in diffsqueeze.metrics.frechet), so results stay byte-identical.
    result = FIDResult(
        fid=value, kid_mean=kid_mean, kid_std=kid_std, backend=job.fid_backend,
        implementation=f"features: {extraction}, per batch; FID/KID: diffsqueeze.metrics.fid.frechet_distance / "
        "kernel_inception_distance in float64 over the features gathered in image order (identical for any number of processes)",
        weights=extractor.weights_name, weights_sha256=extractor.weights_sha256, resize=extractor.resize,
        num_generated=int(len(feats)), num_reference=int(ref.num_images), reference=reference_name,
        reference_key=getattr(ref, "key", None), kid_subsets=job.kid_subsets if kid_mean is not None else None,
        kid_subset_size=kid_size, kid_seed=0 if kid_mean is not None else None,
    )
    out = result.to_dict()
    out["value"] = out["fid"]
    return out


def _final_metrics(job: EvalJob, per_image: dict, pipe, baseline_pipe, extractor, clip, prompts, payload, dtype, device,
                   world: int, out_dir: Path) -> dict:
    from diffsqueeze.models.io import model_folder

    n = job.num_images
    generation = {
        "sampler": sampler_description(pipe), "steps": job.num_inference_steps, "guidance": job.guidance_scale,
        "conditioning": conditioning_of(pipe).kind, "kernels": job.kernels, "decode": job.decode,
        "seeds": f"image i uses seed i, i = 0..{n - 1}", "prompts": f"image i uses prompt i mod {len(prompts)}",
        "prompt_source": job.prompts, "num_images": n, "batch_size": job.batch_size, "dtype": dtype,
        "device": torch.device(device).type, "torch_threads": job.threads, "num_processes": world,
    }
    compute = {k: generation[k] for k in COMPUTE_KEYS}
    if job.reference == "fp":
        ref = ReferenceStats.from_features(per_image["baseline_features"].numpy(), resize=extractor.resize,
                                           weights_sha256=extractor.weights_sha256,
                                           source=f"fp: outputs of {job.baseline} for the same prompts and seeds")
    else:
        ref = reference_statistics(job.reference, extractor, job.fid_backend, batch_size=max(job.batch_size, 32))
    provenance = {**generation}
    fid_block = _fid_block(per_image["features"], ref, job, extractor, ref.source)
    fid_block.update(sampler=generation["sampler"], steps=job.num_inference_steps, guidance=job.guidance_scale,
                     seeds=generation["seeds"], prompt_source=job.prompts, **compute)
    spec_folder = model_folder(job.model) if not job.model.startswith("builtin:") and Path(job.model).exists() else None
    size, measured = denoiser_bytes(pipe, spec_folder)
    metrics: dict[str, Any] = {
        "format": METRICS_FORMAT,
        "kind": "eval",
        "model": job.model,
        "baseline": job.baseline,
        "reference": job.reference,
        "size": {"denoiser_bytes": size, "measured": measured},
        "generation": generation,
        "fid": fid_block,
        "job_key": payload,
        "image_sha256": hashlib.sha256(per_image["image_sha256"].numpy().tobytes()).hexdigest(),
    }
    if clip is not None:
        metrics["clip_score"] = {"value": aggregate(per_image["clip_cos_x100"]), "n": n, **clip.provenance(), **provenance}
    elif job.clip_model is not None:
        metrics["clip_score"] = {"value": None, "note": clip_not_applicable(pipe)}
    if baseline_pipe is not None:
        metrics["fidelity"] = {**fidelity_summary({"psnr": per_image["psnr"], "ssim": per_image["ssim"]},
                                                  lpips_status()[1]), "baseline": job.baseline, **compute}
        bsize, bmeasured = denoiser_bytes(baseline_pipe, model_folder(job.baseline)
                                          if not job.baseline.startswith("builtin:") and Path(job.baseline).exists() else None)
        base: dict[str, Any] = {"model": job.baseline, "size": {"denoiser_bytes": bsize, "measured": bmeasured}}
        if job.reference != "fp":
            base["fid"] = {**_fid_block(per_image["baseline_features"], ref, job, extractor, ref.source),
                           **compute, "kernels": "simulated", "decode": "forward"}  # as load_pipeline loads it
        else:
            base["fid"] = {"value": 0.0, "note": "the reference is this model's own outputs"}
        if clip is not None:
            base["clip_score"] = {"value": aggregate(per_image["baseline_clip_cos_x100"]), "n": n}
        metrics["baseline_scores"] = base
    timings = [json.loads(p.read_text()) for p in sorted((out_dir / SHARD_DIR).glob("timing-*.json"))]
    metrics["timing"] = {"per_process": timings, "note": "wall-clock of the last (re)run; not part of the result"}
    return metrics
