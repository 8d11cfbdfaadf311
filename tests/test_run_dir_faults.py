"""Output folders that are symbolic links, a full disk, a stale replacement and a model folder that
changes under a run: each ends in one line (or is handled) without losing a file that existed."""

from __future__ import annotations

import errno
import json
from collections import namedtuple

import pytest

from diffsqueeze.cli import main
from tests.helpers import is_lock, manifest, one_error_line

ONE_STAGE = {"model": "builtin:tiny-sd", "device": "cpu", "stages": [{"prune": {"targets": {"unet": 0.3}}}]}


def test_a_symlinked_output_dir_stays_a_link_and_overwrite_works_through_it(tmp_path, write_recipe, capsys):
    target = tmp_path / "disk" / "runs"
    target.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(target)
    path = write_recipe(ONE_STAGE)
    assert main(["run", str(path)]) == 0
    assert link.is_symlink() and (target / "manifest.json").is_file() and (target / "model").is_dir()
    for seed in (3, 4):  # --overwrite twice: the second found a leftover link before the fix
        assert main(["run", str(path), "--overwrite", f"seed={seed}"]) == 0, capsys.readouterr().err
        assert link.is_symlink() and link.resolve() == target.resolve()
        assert f"seed: {seed}" in (target / "recipe.yaml").read_text() and manifest(target)["status"] == "complete"
    assert sorted(p.name for p in tmp_path.iterdir() if not is_lock(p)) == ["disk", "recipe.yaml", "run"]
    assert sorted(p.name for p in (tmp_path / "disk").iterdir() if not is_lock(p)) == ["runs"]


def test_a_leftover_replaced_link_of_an_earlier_version_is_removed_as_a_link(tmp_path, write_recipe):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not ours")
    (tmp_path / ".run.replaced").symlink_to(elsewhere)
    (tmp_path / "run").mkdir()
    assert main(["run", str(write_recipe(ONE_STAGE)), "--overwrite"]) == 0
    assert not (tmp_path / ".run.replaced").exists() and (elsewhere / "keep.txt").read_text() == "not ours"


def test_too_little_disk_for_the_export_is_refused_before_writing_it(tmp_path, write_recipe, capsys, monkeypatch):
    import diffsqueeze.run.disk_space as disk_space

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(disk_space.shutil, "disk_usage", lambda p: usage(10 * 2**20, 9 * 2**20, 2**20))
    assert main(["run", str(write_recipe(ONE_STAGE))]) == 1
    line = one_error_line(capsys.readouterr().err, f"no space left on device in {tmp_path / 'run'}",
                          "MB needed for the export of model/, 1 MB free", "--resume")
    assert "Traceback" not in line
    m = manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["stages"][0]["status"] == "done" and not (tmp_path / "run" / "model").exists()
    monkeypatch.undo()
    assert main(["run", str(write_recipe(ONE_STAGE)), "--resume"]) == 0
    assert manifest(tmp_path / "run")["status"] == "complete"


def test_disk_full_while_writing_a_checkpoint_is_one_line_and_the_stage_failed(tmp_path, write_recipe, capsys,
                                                                                  monkeypatch):
    import diffsqueeze.run.checkpoint as checkpoint

    def full(tensors, path):
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(checkpoint, "save_file", full)
    assert main(["run", str(write_recipe(ONE_STAGE))]) == 1
    one_error_line(capsys.readouterr().err, f"no space left on device in {tmp_path / 'run'}", "MB free now",
                   "--resume")
    m = manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["stages"][0]["status"] == "failed" and "No space left" in m["stages"][0]["error"]


def test_safetensors_own_disk_full_error_is_recognized(tmp_path):
    from safetensors import SafetensorError

    from diffsqueeze.run.disk_space import disk_error

    err = disk_error(SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                     "message: \"No space left on device\" })"), tmp_path)
    assert err is not None and str(err).startswith(f"no space left on device in {tmp_path}")
    assert disk_error(RuntimeError("something else"), tmp_path) is None


def test_a_run_reading_a_run_directory_pins_its_manifest(tmp_path, write_recipe):
    import hashlib

    from diffsqueeze.errors import RunDirError
    from diffsqueeze.run.runner import _check_model_unchanged, model_fingerprint

    assert main(["run", str(write_recipe(ONE_STAGE))]) == 0
    source = tmp_path / "run"
    second = write_recipe({**ONE_STAGE, "model": str(source), "output_dir": str(tmp_path / "second")}, "second.yaml")
    assert main(["run", str(second)]) == 0
    pin = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()
    assert manifest(tmp_path / "second")["model_manifest_sha256"] == pin
    assert model_fingerprint(str(source / "model")) == model_fingerprint(str(source)) == pin
    assert model_fingerprint("builtin:tiny-sd") is None
    _check_model_unchanged(str(source), pin)
    m = manifest(source)
    m["finished"] = "later"  # a re-run of the folder rewrites its manifest
    (source / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(RunDirError, match="changed after this run read it"):
        _check_model_unchanged(str(source), pin)


def test_a_corrupt_image_in_the_eval_reference_is_refused_before_any_stage(tmp_path, write_recipe, capsys):
    import numpy as np
    import PIL.Image

    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(3):
        PIL.Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(ref / f"{i}.png")
    good = (ref / "1.png").read_bytes()
    (ref / "1.png").write_bytes(good[: len(good) // 2])  # truncated
    recipe = {**ONE_STAGE, "eval": {"num_images": 2, "reference": str(ref), "features": "tiny-random"}}
    assert main(["run", str(write_recipe(recipe))]) == 1
    one_error_line(capsys.readouterr().err, "eval.reference", f"'{ref / '1.png'}' cannot be decoded")
    assert not (tmp_path / "run" / "stages").exists()
