"""One run per output folder (pipelines/run_lock.py): a second run, --overwrite, --resume, or a run
whose model is that folder, refuses with one line naming the holder; a killed holder frees it;
a folder read as a model cannot be re-run meanwhile; the lock follows symbolic links."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from diffsqueeze.errors import RunDirError
from diffsqueeze.pipelines.run_lock import hold_model_run, hold_output_dir, lock_path

TWO_STAGES = {"model": "builtin:tiny-sd", "device": "cpu",
              "stages": [{"prune": {"targets": {"unet": 0.3}}}, {"prune": {"targets": {"text_encoder": 0.2}}}]}


def _holder(folder: Path, how: str) -> subprocess.Popen:
    """A process that holds ``folder`` (``how``: hold_output_dir | hold_model_run) until killed."""
    code = textwrap.dedent(f"""
        import time
        from diffsqueeze.pipelines.run_lock import {how}
        lock = {how}({str(folder)!r})
        print("held", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_folder_is_refused_naming_the_holder_and_freed_when_it_dies(tmp_path):
    out = tmp_path / "run"
    proc = _holder(out, "hold_output_dir")
    try:
        with pytest.raises(RunDirError, match=rf"'{out}' is in use by another diffsqueeze run \(process {proc.pid}, "):
            hold_output_dir(out)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with hold_output_dir(out):  # the OS released the dead process's lock
        with hold_output_dir(out):  # re-entrant within one process
            pass


def test_a_run_directory_read_as_a_model_cannot_be_rerun_meanwhile(tmp_path):
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "manifest.json").write_text("{}")
    proc = _holder(run / "model", "hold_model_run")
    try:
        with pytest.raises(RunDirError, match="is the model of a diffsqueeze run in progress"):
            hold_output_dir(run)
        with hold_model_run(str(run)):  # other readers are welcome
            pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    writer = _holder(run, "hold_output_dir")
    try:
        with pytest.raises(RunDirError, match=rf"model '{run}' is the output_dir of a diffsqueeze run in progress "
                                              rf"\(process {writer.pid}"):
            hold_model_run(str(run))
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()


def test_the_lock_of_a_symbolic_link_is_its_target_s(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "target")
    assert lock_path(tmp_path / "link") == tmp_path / ".target.lock"


def _cli(recipe: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "diffsqueeze", "run", str(recipe), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONHASHSEED": "0"})


def test_two_concurrent_runs_on_one_folder_give_one_complete_run_and_one_refusal(tmp_path):
    out = tmp_path / "run"
    recipes = []
    for seed in (1, 2):
        path = tmp_path / f"r{seed}.yaml"
        path.write_text(yaml.safe_dump({**TWO_STAGES, "seed": seed, "output_dir": str(out)}))
        recipes.append(path)
    procs = [_cli(r, "--overwrite") for r in recipes]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 1], results
    winner = next(i for i, (code, _, _) in enumerate(results) if code == 0)
    refusal = [line for line in results[1 - winner][2].splitlines() if line.strip()]
    assert len(refusal) == 1 and refusal[0].startswith("diffsqueeze: error: output_dir") and "in use by another" \
        " diffsqueeze run (process" in refusal[0], refusal
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and all(s["status"] == "done" for s in m["stages"])
    assert f"seed: {winner + 1}" in (out / "recipe.yaml").read_text()
    assert sorted(p.name for p in (out / "stages").iterdir()) == ["0-prune", "1-prune"]
