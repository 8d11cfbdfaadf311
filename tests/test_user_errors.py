"""Nothing lost, nothing silent: every bad input and fault ends in one line (``diffsqueeze: error: ...``,
exit status != 0) before work is wasted, and a failed or interrupted run changes no file that
existed before it (every file of the folder is hashed before and after)."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diffsqueeze.cli import main
from diffsqueeze.errors import RecipeError
from diffsqueeze.prune.stage import PruneStage
from tests.helpers import is_lock, manifest, one_error_line, snapshot

TWO_STAGES = {"model": "builtin:tiny-sd", "device": "cpu",
              "stages": [{"prune": {"targets": {"unet": 0.3}}}, {"prune": {"targets": {"text_encoder": 0.2}}}]}


def fail_prune_at(monkeypatch, call: int, exc: BaseException) -> None:
    """PruneStage.apply raises ``exc`` on its ``call``-th call (1-based) of this test."""
    original, calls = PruneStage.apply, []

    def apply(self, pipe, ctx):
        calls.append(1)
        if len(calls) == call:
            raise exc
        return original(self, pipe, ctx)

    monkeypatch.setattr(PruneStage, "apply", apply)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished two-stage run (copied by the tests that need one)."""
    d = tmp_path_factory.mktemp("finished")
    (d / "r.yaml").write_text(yaml.safe_dump({**TWO_STAGES, "output_dir": str(d / "run")}))
    assert main(["run", str(d / "r.yaml")]) == 0
    return d / "run"


@pytest.fixture
def run_copy(finished, tmp_path, write_recipe) -> tuple[Path, Path]:
    """(run directory tmp_path/run holding a copy of the finished run, its recipe file)."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run", write_recipe(TWO_STAGES)


# ---- 1. data loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model,output_dir", [("run", "run"), ("run", "run/sub"), ("run/model", "run")],
                         ids=["same-folder", "output-inside-model", "model-inside-output"])
def test_model_and_output_dir_overlap_is_refused_before_anything_is_touched(run_copy, tmp_path, capsys, model, output_dir):
    run_dir, path = run_copy
    before = snapshot(tmp_path)
    assert main(["run", str(path), "--overwrite", f"model={tmp_path / model}", f"output_dir={tmp_path / output_dir}"]) == 1
    one_error_line(capsys.readouterr().err, "output_dir", "choose")
    assert snapshot(tmp_path) == before


def test_failed_overwrite_keeps_the_old_run_and_a_second_overwrite_replaces_it(run_copy, tmp_path, capsys, monkeypatch):
    run_dir, path = run_copy
    before = snapshot(tmp_path)
    fail_prune_at(monkeypatch, 2, RuntimeError("disk on fire"))
    assert main(["run", str(path), "--overwrite", "seed=5"]) == 1
    one_error_line(capsys.readouterr().err, "RuntimeError: disk on fire", "(--debug shows the traceback)")
    assert snapshot(run_dir) == {k[len("run/"):]: v for k, v in before.items() if k.startswith("run/")}
    monkeypatch.undo()
    assert main(["run", str(path), "--overwrite", "seed=5"]) == 0
    assert manifest(run_dir)["status"] == "complete" and "seed: 5" in (run_dir / "recipe.yaml").read_text()
    assert sorted(p.name for p in tmp_path.iterdir() if not is_lock(p)) == ["recipe.yaml", "run"]  # no replacement folder left


def test_interrupted_overwrite_keeps_the_old_run_and_resume_finishes_the_replacement(run_copy, tmp_path, capsys,
                                                                                     monkeypatch):
    run_dir, path = run_copy
    old_run = snapshot(run_dir)
    fail_prune_at(monkeypatch, 2, KeyboardInterrupt())
    assert main(["run", str(path), "--overwrite", "seed=5"]) == 130
    one_error_line(capsys.readouterr().err, "interrupted; the run state is saved, continue with --resume")
    assert snapshot(run_dir) == old_run
    staging = tmp_path / ".run.replacement"
    first = manifest(staging)["stages"][0]
    assert first["status"] == "done" and manifest(staging)["status"] == "failed"
    monkeypatch.undo()
    before = snapshot(tmp_path)
    assert main(["run", str(path), "--resume", "seed=5"]) == 1  # which run to continue is the user's choice
    one_error_line(capsys.readouterr().err, "'.run.replacement'", "unfinished --overwrite", "1 of 2 stages done",
                   "--resume --overwrite", "--overwrite alone")
    assert snapshot(tmp_path) == before
    assert main(["run", str(path), "--resume", "--overwrite", "seed=5"]) == 0
    m = manifest(run_dir)
    assert m["status"] == "complete" and m["stages"][0]["started"] == first["started"]  # stage 0 not run again
    assert sorted(p.name for p in tmp_path.iterdir() if not is_lock(p)) == ["recipe.yaml", "run"]


def test_failed_resume_keeps_the_old_model(run_copy, capsys, monkeypatch):
    run_dir, path = run_copy
    model_before, stage0_before = snapshot(run_dir / "model"), snapshot(run_dir / "stages" / "0-prune")
    fail_prune_at(monkeypatch, 1, RuntimeError("out of memory"))
    assert main(["run", str(path), "--resume", "stages.1.prune.targets.text_encoder=0.4"]) == 1
    one_error_line(capsys.readouterr().err, "RuntimeError: out of memory")
    assert snapshot(run_dir / "model") == model_before  # replaced only by a model that exists
    assert snapshot(run_dir / "stages" / "0-prune") == stage0_before
    m = manifest(run_dir)
    assert m["status"] == "failed" and m["stages"][1]["status"] == "failed" and "out of memory" in m["error"]


def test_resume_with_a_damaged_checkpoint_changes_nothing(run_copy, tmp_path, capsys):
    run_dir, path = run_copy
    weights = run_dir / "stages" / "1-prune" / "text_encoder.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    before = snapshot(tmp_path)
    assert main(["run", str(path), "--resume"]) == 1
    one_error_line(capsys.readouterr().err, "stages/1-prune cannot be read", "--overwrite")
    assert snapshot(tmp_path) == before


# ---- 2. finished as complete but wrong --------------------------------------------------------------


def test_a_key_given_twice_is_an_error_naming_key_and_line(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("model: builtin:tiny-sd\noutput_dir: out\nstages:\n  - prune: {targets: {unet: 0.3}}\n"
                    "seed: 1\nstages:\n  - prune: {targets: {unet: 0.5}}\n")
    assert main(["run", str(path)]) == 1
    one_error_line(capsys.readouterr().err, "line 6", "duplicate key 'stages'", "first at line 3")
    assert sorted(p.name for p in tmp_path.iterdir() if not is_lock(p)) == ["r.yaml"]


def test_a_crash_in_the_end_of_run_eval_is_recorded(write_recipe, tmp_path, capsys, monkeypatch):
    import diffsqueeze.run.runner as runner

    def crash(*args, **kwargs):
        raise RuntimeError("CLIP weights missing")

    monkeypatch.setattr(runner, "evaluate_run", crash)
    path = write_recipe({**TWO_STAGES, "stages": TWO_STAGES["stages"][:1], "eval": {"features": "tiny-random"}})
    assert main(["run", str(path)]) == 1
    one_error_line(capsys.readouterr().err, "RuntimeError: CLIP weights missing")
    m = manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["eval"]["status"] == "failed"
    assert m["eval"]["error"] == m["error"] == "RuntimeError: CLIP weights missing"


# ---- 3. one line instead of a traceback ---------------------------------------------------------------


def test_an_override_with_invalid_yaml(write_recipe, tmp_path, capsys):
    path = write_recipe(TWO_STAGES)
    assert main(["run", str(path), "stages.0.prune.targets.unet=[0.3"]) == 1
    one_error_line(capsys.readouterr().err, "stages.0.prune.targets.unet", "'[0.3' is not valid YAML")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["/proc/diffsqueeze-run", "{tmp}/recipe.yaml/run"], ids=["proc", "under-a-file"])
def test_an_output_dir_that_cannot_be_written_fails_before_the_model_loads(write_recipe, tmp_path, capsys, monkeypatch,
                                                                           where):
    import diffsqueeze.run.runner as runner
    from diffsqueeze.run.runner import run_recipe
    from diffsqueeze.recipe import load_recipe

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(runner, "load_with_state", no_load)
    where = where.format(tmp=tmp_path)
    path = write_recipe({**TWO_STAGES, "output_dir": where})
    before = snapshot(tmp_path)
    assert main(["run", str(path)]) == 1
    one_error_line(capsys.readouterr().err, "output_dir", where)
    if where.startswith("/proc"):  # the library path (no command line) probes before loading too
        with pytest.raises(RecipeError, match="cannot create files"):
            run_recipe(load_recipe(path))
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("content", ["[1, 2, 3]", '{"stages": 7}', '{"stages": [{"status": "done"}]}', "{"],
                         ids=["list", "stages-not-a-list", "stage-without-checkpoint", "truncated"])
def test_a_damaged_manifest_is_one_line_and_overwrite_replaces_the_run(write_recipe, tmp_path, capsys, content):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(content)
    (run_dir / "notes.txt").write_text("old")
    path = write_recipe(TWO_STAGES)
    before = snapshot(tmp_path)
    for flags in ([], ["--resume"]):
        assert main(["run", str(path), *flags]) == 1
        one_error_line(capsys.readouterr().err, "manifest.json is damaged", "--overwrite")
    assert main(["inspect", str(run_dir)]) == 1
    one_error_line(capsys.readouterr().err, "manifest.json is damaged")
    assert snapshot(tmp_path) == before
    assert main(["run", str(path), "--overwrite"]) == 0  # what the message says works
    assert manifest(run_dir)["status"] == "complete" and not (run_dir / "notes.txt").exists()


def test_ctrl_c_exits_130_with_one_line_and_resume_continues(write_recipe, tmp_path, capsys, monkeypatch):
    path = write_recipe(TWO_STAGES)
    fail_prune_at(monkeypatch, 2, KeyboardInterrupt())
    assert main(["run", str(path)]) == 130
    one_error_line(capsys.readouterr().err, "interrupted; the run state is saved, continue with --resume")
    m = manifest(tmp_path / "run")
    assert m["status"] == "failed" and m["stages"][0]["status"] == "done" and m["stages"][1]["error"] == "KeyboardInterrupt"
    monkeypatch.undo()
    assert main(["run", str(path), "--resume"]) == 0
    again = manifest(tmp_path / "run")
    assert again["status"] == "complete" and again["stages"][0]["started"] == m["stages"][0]["started"]


def test_debug_shows_the_traceback(write_recipe):
    path = write_recipe(TWO_STAGES)
    with pytest.raises(RecipeError, match="not valid YAML"):
        main(["--debug", "run", str(path), "seed=[1"])
    with pytest.raises(RecipeError, match="not valid YAML"):
        main(["run", str(path), "seed=[1", "--debug"])


def test_an_unexpected_exception_is_one_line_with_its_type(write_recipe, capsys, monkeypatch):
    import diffsqueeze.run.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("shape mismatch\n  in layer 3")

    monkeypatch.setattr(runner, "load_with_state", broken)
    assert main(["run", str(write_recipe(TWO_STAGES))]) == 1
    one_error_line(capsys.readouterr().err, "diffsqueeze: error: ValueError: shape mismatch in layer 3 "
                   "(--debug shows the traceback)")


# ---- 4. late or misleading -----------------------------------------------------------------------------


@pytest.mark.parametrize("ref,words", [
    ("{tmp}/missing", ["does not exist"]),
    ("{tmp}/empty", ["holds no image files"]),
    ("{tmp}/model", ["is a model folder", "baseline"]),
    ("builtin:tiny-sd", ["is a model", "baseline"]),
    ("builtin:nope", ["no builtin dataset", "builtin:fashion-mnist"]),
    ("some-org/some-model", ["hub model id is a model"]),
    ("fp", ["--baseline"]),
], ids=["missing", "empty", "model-folder", "builtin-model", "unknown-builtin", "hub-id", "fp-without-baseline"])
def test_eval_ref_is_checked_before_any_image_is_generated(tmp_path, capsys, monkeypatch, ref, words):
    import diffsqueeze.metrics.evaluate as evaluate

    def no_job(*args, **kwargs):
        raise AssertionError("images were generated")

    monkeypatch.setattr(evaluate, "run_eval_job", no_job)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    assert main(["eval", "--model", "builtin:tiny-sd", "--ref", ref.format(tmp=tmp_path), "--num-images", "2",
                 "--out", str(tmp_path / "out")]) == 1
    line = one_error_line(capsys.readouterr().err, "--ref", *words)
    if ref != "fp":
        assert "a folder of images" in line  # names what --ref accepts
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,words", [
    ("calibration.prompts=builtin:nope", ["calibration.prompts", "unknown prompt set 'builtin:nope'", "builtin:fashion"]),
    ("calibration.prompts=missing.txt", ["calibration.prompts", "'missing.txt' does not exist"]),
    ("eval.prompts=builtin:nope", ["eval.prompts", "unknown prompt set"]),
    ("eval.prompts=missing.txt", ["eval.prompts", "does not exist"]),
], ids=["calibration-builtin", "calibration-file", "eval-builtin", "eval-file"])
def test_unknown_prompt_sets_fail_when_the_recipe_is_validated(write_recipe, capsys, override, words):
    assert main(["run", str(write_recipe(TWO_STAGES)), override]) == 1
    one_error_line(capsys.readouterr().err, *words)


def test_a_stage_check_error_carries_the_stage_path(write_recipe, tmp_path, capsys):
    path = write_recipe({**TWO_STAGES, "stages": [TWO_STAGES["stages"][0], {"prune": {"targets": {"unet2": 0.3}}}]})
    assert main(["run", str(path)]) == 1
    one_error_line(capsys.readouterr().err, "stages[1].prune.targets.unet2: no component 'unet2'")
    assert not (tmp_path / "run").exists()


def test_an_unreachable_hub_id_says_so(capsys, monkeypatch):
    from diffsqueeze.models import io

    def offline(*args, **kwargs):
        try:
            raise ConnectionError("[Errno -2] Name or service not known")
        except ConnectionError as exc:
            raise OSError("Cannot load model some-org/some-model: the model is not fully cached locally and an error "
                          "occurred. Please check out the root cause in the stacktrace above.") from exc

    monkeypatch.setattr(io.DiffusionPipeline, "from_pretrained", offline)
    assert main(["inspect", "some-org/some-model"]) == 1
    line = one_error_line(capsys.readouterr().err, "'some-org/some-model' is not a local folder", "could not be reached")
    assert "stacktrace" not in line


def test_a_huge_calibration_warns_before_any_work(caplog):
    from diffsqueeze.recipe import recipe_from_dict

    data = {**TWO_STAGES, "output_dir": "unused"}
    with caplog.at_level(logging.WARNING, logger="diffsqueeze"):
        recipe_from_dict(data)
        assert not caplog.records  # the default calibration is quiet
        recipe = recipe_from_dict({**data, "calibration": {"num_samples": 1000000}})  # a warning, not an error
    assert recipe.calibration.num_samples == 1000000
    (record,) = caplog.records
    assert "20,000,000 inputs" in record.getMessage() and "40,000,000 denoiser calls" in record.getMessage()
    assert "x 2 for guidance" in record.getMessage() and "TB on disk" in record.getMessage()


def test_recipe_errors_come_before_heavy_imports(tmp_path):
    (tmp_path / "file").write_text("x")
    bad = {"stages.0.prune.targets.unet=[0.3": {},
           "": {"output_dir": str(tmp_path / "file" / "run")}}
    for override, changes in bad.items():
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump({**TWO_STAGES, "output_dir": str(tmp_path / "run"), **changes}))
        code = ("import sys; from diffsqueeze.cli import main; "
                f"rc = main(['run', {str(path)!r}] + ([{override!r}] if {override!r} else [])); "
                "print(rc, [m for m in ('torch', 'diffusers') if m in sys.modules])")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert proc.stdout.split("\n")[0] == "1 []", proc.stdout + proc.stderr
        one_error_line(proc.stderr, "diffsqueeze: error:")


def test_dependency_chatter_is_silenced_and_other_warnings_are_not():
    import diffsqueeze.console  # noqa: F401  (installs the filters on import)

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    for name, message in [
        ("torch.utils._pytree", "<enum 'X'> is an Enum subclass and is now natively supported by torch.compile as an "
         "opaque value type. Calling register_constant() on Enum subclasses is deprecated and will be an error"),
        ("diffusers.quantizers.torchao.torchao_quantizer",
         "Unable to import `torchao` Tensor objects. This may affect loading checkpoints serialized with `torchao`"),
        ("bitsandbytes.cextension", "could not load the optional CPU kernels"),
    ]:
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(message)
            logger.error("a real problem")
        finally:
            logger.removeHandler(handler)
    assert seen == ["a real problem"] * 3
