"""The runner: manifest, checkpoints, determinism, refusal to mix runs, and kill -9 + --resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffsqueeze.errors import RunDirError
from diffsqueeze.run.runner import run_recipe
from diffsqueeze.recipe import load_recipe

TWO_STAGES = {
    "model": "builtin:tiny-sd",
    "seed": 0,
    "device": "cpu",
    "stages": [
        {"prune": {"targets": {"unet": 0.3, "text_encoder": 0.4}}},
        {"prune": {"targets": {"denoiser": 0.5}, "scope": "layer"}},
    ],
}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    model = run_dir / "model"
    out = {}
    for comp in ("unet", "text_encoder", "vae"):
        for f in sorted((model / comp).glob("*.safetensors")):
            out.update({f"{comp}/{k}": v for k, v in load_file(str(f)).items()})
    out.update({f"mask/{k}": v for k, v in load_file(str(model / "masks.safetensors")).items()})
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """An uninterrupted run of TWO_STAGES."""
    import yaml

    d = tmp_path_factory.mktemp("ref")
    (d / "r.yaml").write_text(yaml.safe_dump({**TWO_STAGES, "output_dir": str(d / "run")}))
    return run_recipe(load_recipe(d / "r.yaml"))


def test_manifest_records_every_stage(reference_run):
    m = json.loads((reference_run / "manifest.json").read_text())
    assert m["status"] == "complete" and len(m["stages"]) == 2
    for s in m["stages"]:
        assert s["status"] == "done" and s["wall_time_s"] >= 0 and s["peak_rss_mb"] > 0
        assert (reference_run / s["checkpoint"] / "components.json").exists()
    assert m["stages"][0]["summary"]["components"]["unet"]["target"] == 0.3
    assert (reference_run / "recipe.yaml").exists() and (reference_run / "model" / "model_index.json").exists()
    assert not list((reference_run / "stages").glob(".tmp-*"))


def test_same_recipe_same_weights(reference_run, write_recipe):
    again = run_recipe(load_recipe(write_recipe(TWO_STAGES)))
    assert_same_weights(reference_run, again)


def test_existing_run_needs_resume_or_overwrite(reference_run, write_recipe, tmp_path):
    path = write_recipe(TWO_STAGES)
    run_recipe(load_recipe(path))
    with pytest.raises(RunDirError, match="already holds a run.*--resume.*--overwrite"):
        run_recipe(load_recipe(path))
    other = write_recipe({**TWO_STAGES, "model": "builtin:tiny-dit", "stages": [{"prune": {"targets": {"denoiser": 0.2}}}]}, "o.yaml")
    with pytest.raises(RunDirError, match="different model"):
        run_recipe(load_recipe(other), resume=True)
    # --resume of a finished run reuses every stage; --overwrite starts again
    assert_same_weights(reference_run, run_recipe(load_recipe(path), resume=True))
    assert_same_weights(reference_run, run_recipe(load_recipe(path), overwrite=True))


def test_resume_reuses_matching_prefix_only(reference_run, write_recipe):
    path = write_recipe(TWO_STAGES)
    run_dir = run_recipe(load_recipe(path))
    first = json.loads((run_dir / "manifest.json").read_text())["stages"][0]["finished"]
    changed = load_recipe(path, ["stages.1.prune.targets.denoiser=0.6"])
    run_recipe(changed, resume=True)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["stages"][0]["finished"] == first  # stage 0 was not run again
    assert m["stages"][1]["summary"]["components"]["unet"]["target"] == 0.6


def test_non_run_folder_is_never_deleted(tmp_path, write_recipe):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "precious.txt").write_text("keep me")
    path = write_recipe(TWO_STAGES)
    for kwargs in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(RunDirError, match="not a diffsqueeze run"):
            run_recipe(load_recipe(path), **kwargs)
    assert (tmp_path / "run" / "precious.txt").read_text() == "keep me"


def test_failed_stage_leaves_run_not_complete(write_recipe):
    from diffsqueeze.errors import RecipeError

    path = write_recipe({**TWO_STAGES, "stages": [{"prune": {"targets": {"unet": 0.3}, "include": ["none.*"]}}]})
    with pytest.raises(RecipeError, match="matches include"):
        run_recipe(load_recipe(path))
    manifest = Path(load_recipe(path).output_dir) / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"


@pytest.mark.parametrize("kill_at", ["tick:20", "checkpoint:2", "export:1"], ids=["mid-stage", "mid-checkpoint", "mid-export"])
def test_kill_and_resume_gives_identical_weights(reference_run, write_recipe, kill_at):
    path = write_recipe(TWO_STAGES)
    env = {**os.environ, "DIFFSQUEEZE_KILL_AT": kill_at}
    proc = subprocess.run([sys.executable, "-m", "diffsqueeze", "run", str(path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_dir = Path(load_recipe(path).output_dir)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "running" and m["stages"][0]["status"] == "done"
    assert m["stages"][1]["status"] == ("done" if kill_at.startswith("export") else "running")
    if kill_at.startswith("export"):
        assert (run_dir / ".tmp-model").is_dir() and not (run_dir / "model").exists()
    if kill_at.startswith("checkpoint"):
        assert list((run_dir / "stages").glob(".tmp-*")), "the kill should have hit a half-written checkpoint"
    run_recipe(load_recipe(path), resume=True)
    m = json.loads((run_dir / "manifest.json").read_text())
    assert m["status"] == "complete"
    assert not list((run_dir / "stages").glob(".tmp-*"))
    assert_same_weights(reference_run, run_dir)


def test_overwrite_writes_beside_and_a_cut_off_swap_is_finished(reference_run, write_recipe, tmp_path, monkeypatch):
    import shutil

    import diffsqueeze.run.runner as runner
    from diffsqueeze.pipelines.manifest import replaced_dir, replacement_dir

    path = write_recipe(TWO_STAGES)
    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    (run_dir / "old-marker").write_text("old run")
    seen = {}

    def cut_off(new, final):  # the swap dies after its first rename
        seen["during"] = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
        final.rename(replaced_dir(final))
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "swap_in", cut_off)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path, ["seed=4"]), overwrite=True)
    assert seen["during"] == [".run.replacement", "recipe.yaml", "run"]  # the old run stayed until the swap
    assert not run_dir.exists() and (replacement_dir(run_dir) / "model").is_dir()
    monkeypatch.undo()
    run_recipe(load_recipe(path, ["seed=4"]), resume=True)  # finishes the swap, then resumes the new run
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["recipe.yaml", "run"]
    assert not (run_dir / "old-marker").exists() and json.loads((run_dir / "manifest.json").read_text())["status"] == "complete"
    assert "seed: 4" in (run_dir / "recipe.yaml").read_text()


def test_stage_check_errors_carry_the_stage_path(write_recipe):
    from diffsqueeze.errors import RecipeError

    path = write_recipe({**TWO_STAGES, "stages": [TWO_STAGES["stages"][0], {"prune": {"targets": {"vae2": 0.3}}}]})
    with pytest.raises(RecipeError, match=r"^stages\[1\]\.prune\.targets\.vae2: no component 'vae2'"):
        run_recipe(load_recipe(path))
    assert not Path(load_recipe(path).output_dir).exists()
