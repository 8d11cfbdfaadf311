"""`eval` and `grid` refuse bad inputs in one line before any model loads or image is generated:
an image count no job can finish, undecodable reference images, model specs that name nothing
loadable, prompt files too large; and they say exactly what they did (sampling defaults, prompt
truncation, the torch threads the images were computed with)."""

from __future__ import annotations

import itertools
import json
import logging
import time

import PIL.Image
import pytest
import torch

from diffsqueeze.cli import main
from diffsqueeze.errors import DiffsqueezeError, RecipeError
from diffsqueeze.metrics.config import MAX_EVAL_IMAGES, EvalConfig
from diffsqueeze.metrics.eval_shards import process_batches
from diffsqueeze.metrics.evaluate import EvalJob, run_eval_job
from diffsqueeze.metrics.feature_nets import tiny_feature_net
from diffsqueeze.metrics.pipeline_info import sampling_note
from diffsqueeze.models.prompts import MAX_PROMPT_FILE_BYTES


def one_error_line(err: str, *words: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffsqueeze: error: "), err
    assert "Traceback" not in err and "--debug shows the traceback" not in lines[0], lines[0]  # the user's input, not a fault
    for word in words:
        assert word in lines[0], f"{word!r} missing from: {lines[0]}"
    return lines[0]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if any model is loaded or any evaluation starts."""
    import diffsqueeze.loading as loading
    import diffsqueeze.metrics.evaluate as evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(evaluate, "run_eval_job", refuse)


def _eval(tmp_path, *extra, ref="builtin:fashion-mnist", model="builtin:tiny-sd"):
    return main(["eval", "--model", model, "--ref", ref, "--num-images", "4", "--features", "tiny-random",
                 "--out", str(tmp_path / "out"), "--no-progress", *extra])


def _grid(tmp_path, *models, extra=()):
    return main(["grid", "--models", *models, "--steps", "1", "--out", str(tmp_path / "grid.png"), *extra])


# ---- 6. the image count --------------------------------------------------------------------------


def test_a_billion_images_is_refused_at_once_naming_the_limit(tmp_path, capsys, no_work):
    t0 = time.perf_counter()
    assert main(["eval", "--model", "builtin:tiny-sd", "--ref", "builtin:fashion-mnist", "--num-images", "1000000000",
                 "--out", str(tmp_path / "out")]) == 1
    assert time.perf_counter() - t0 < 5  # nothing proportional to the count was built
    one_error_line(capsys.readouterr().err, "--num-images", "1,000,000,000", f"{MAX_EVAL_IMAGES:,}")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match=f"num_images.*{MAX_EVAL_IMAGES:,}"):
        EvalConfig(num_images=MAX_EVAL_IMAGES + 1)
    assert EvalJob(model="builtin:tiny-sd", reference="builtin:fashion-mnist", num_images=MAX_EVAL_IMAGES).num_images


def test_batches_are_produced_one_at_a_time_and_cover_every_image_once():
    batches = process_batches(MAX_EVAL_IMAGES, 1, rank=1, world=3)
    assert not isinstance(batches, (list, tuple))
    assert list(itertools.islice(batches, 2)) == [(1, 1, 1), (4, 4, 1)]
    owned = [list(process_batches(23, 4, r, 3)) for r in range(3)]
    assert sorted(b for part in owned for b, _, _ in part) == list(range(6))
    assert sorted(i for part in owned for _, s, c in part for i in range(s, s + c)) == list(range(23))
    assert owned[2] == [(2, 8, 4), (5, 20, 3)]


# ---- 7. reference images -------------------------------------------------------------------------


def _image_folder(folder, n=3):
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        arr = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        PIL.Image.fromarray(arr).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("damage,cause", [
    (lambda b: b[: len(b) // 2], "truncated"),  # header fine, pixels cut off
    (lambda b: b"not an image at all" * 8, "UnidentifiedImageError"),  # no header
], ids=["truncated", "no-header"])
def test_a_damaged_reference_image_is_named_before_anything_is_generated(tmp_path, capsys, no_work, damage, cause):
    ref = _image_folder(tmp_path / "ref")
    bad = ref / "1.png"
    bad.write_bytes(damage(bad.read_bytes()))
    assert _eval(tmp_path, ref=str(ref)) == 1
    one_error_line(capsys.readouterr().err, "--ref", str(bad), cause)
    assert not (tmp_path / "out").exists()


def test_a_damaged_reference_image_is_named_where_the_features_are_extracted(tmp_path):
    """The late path (a run's eval.reference is read at the end of the run): the file is named there too."""
    from diffsqueeze.metrics.references import reference_statistics

    ref = _image_folder(tmp_path / "ref")
    (ref / "2.png").write_bytes((ref / "2.png").read_bytes()[:200])
    with pytest.raises(DiffsqueezeError, match="2.png' cannot be decoded"):
        reference_statistics(str(ref), tiny_feature_net(), "torchmetrics", cache_dir=str(tmp_path / "cache"))


# ---- 8. model specs ------------------------------------------------------------------------------


def test_grid_checks_every_model_before_generating_the_first(tmp_path, capsys, monkeypatch, no_work):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no request leaves the machine
    assert _grid(tmp_path, "builtin:tiny-sd", "builtin:tiny-sd", "missing") == 1
    one_error_line(capsys.readouterr().err, "'missing'", "no such folder")
    assert _grid(tmp_path, "builtin:tiny-sd", "builtin:tiny-sd", "some-org/missing-model") == 1
    one_error_line(capsys.readouterr().err, "'some-org/missing-model'", "not in the local Hugging Face cache",
                   "HF_HUB_OFFLINE")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    assert _grid(tmp_path, "builtin:tiny-sd", str(broken)) == 1
    one_error_line(capsys.readouterr().err, f"'{broken}'", "model_index.json", "JSONDecodeError")
    assert not (tmp_path / "grid.png").exists()


def test_eval_checks_model_and_baseline_before_generating(tmp_path, capsys, monkeypatch, no_work):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert _eval(tmp_path, "--baseline", "some-org/missing-model") == 1
    one_error_line(capsys.readouterr().err, "'some-org/missing-model'", "HF_HUB_OFFLINE")
    assert _eval(tmp_path, model="builtin:nope") == 1
    one_error_line(capsys.readouterr().err, "unknown builtin model 'builtin:nope'")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_the_hub_does_not_know_is_refused(capsys, monkeypatch):
    """Online: the hub is asked for the pipeline's model_index.json (here: a fake answer)."""
    import huggingface_hub

    from diffsqueeze.commands import check_models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo, name: False)
    with pytest.raises(DiffsqueezeError, match="'some-org/missing-model' is no local folder, and the Hugging Face hub "
                                               "has no diffusers pipeline"):
        check_models("builtin:tiny-sd", "some-org/missing-model")
    monkeypatch.setattr(huggingface_hub.HfApi, "file_exists", lambda self, repo, name: True)
    check_models("some-org/missing-model")


# ---- 9. prompts ----------------------------------------------------------------------------------


def test_a_huge_prompt_file_is_refused_before_it_is_read(tmp_path, capsys, no_work):
    huge = tmp_path / "prompts.txt"
    with open(huge, "wb") as f:  # sparse: 16 MiB + 1 byte without writing them
        f.truncate(MAX_PROMPT_FILE_BYTES + 1)
    size = f"{MAX_PROMPT_FILE_BYTES + 1:,} bytes"
    assert _grid(tmp_path, "builtin:tiny-sd", extra=["--prompts", str(huge)]) == 1
    one_error_line(capsys.readouterr().err, str(huge), size, f"{MAX_PROMPT_FILE_BYTES:,}")
    assert _eval(tmp_path, "--prompts", str(huge)) == 1
    one_error_line(capsys.readouterr().err, str(huge), size, f"{MAX_PROMPT_FILE_BYTES:,}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "grid.png").exists()


# ---- sampling defaults, truncation, threads: what the job says it did ---------------------------


def test_the_sampling_note_names_exactly_the_defaulted_values():
    assert sampling_note(2, None, 2, 7.5) == "the model's own default: guidance 7.5 (2 steps as given)"
    assert sampling_note(None, 3.0, 10, 3.0) == "the model's own default: 10 steps (guidance 3 as given)"
    assert sampling_note(None, None, 10, 2.0) == "the model's own defaults: 10 steps, guidance 2"
    assert sampling_note(4, 3.0, 4, 3.0) is None
    assert sampling_note(4, 3.0, 4, None) == "guidance 3 not used (the pipeline takes no guidance) (4 steps as given)"


def test_the_job_fixes_and_records_its_threads_and_says_which_sampling_values_it_defaulted(tmp_path, caplog,
                                                                                             monkeypatch):
    """In-process, with 2 torch threads: every batch runs on the job's 1 thread, the count is in
    the job's key and in every provenance record, and the process gets its 2 threads back."""
    import diffsqueeze.metrics.evaluate as evaluate
    from diffsqueeze.loading import load_pipeline

    seen = []
    original = evaluate.generate_images

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate, "generate_images", spy)
    monkeypatch.setenv("DIFFSQUEEZE_FID_CACHE", str(tmp_path / "cache"))
    pipe = load_pipeline("builtin:tiny-sd")
    job = EvalJob(model="builtin:tiny-sd", reference="fp", baseline="builtin:tiny-sd", num_images=2, batch_size=2,
                  num_inference_steps=1, features="tiny-random", kid_subset_size=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with caplog.at_level(logging.INFO, logger="diffsqueeze"):
            m = run_eval_job(job, tmp_path / "out", pipe=pipe, baseline_pipe=pipe, extractor=tiny_feature_net(),
                             progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert seen == [1, 1]  # the model's and the baseline's batch
    notes = [r.getMessage() for r in caplog.records if "sampling with" in r.getMessage()]
    assert notes == ["sampling with the model's own default: guidance 7.5 (1 step as given)"]
    for block in (m["generation"], m["fid"], m["fidelity"]):
        assert (block["torch_threads"], block["kernels"], block["decode"], block["device"]) == (1, "simulated",
                                                                                               "forward", "cpu")
    job_file = json.loads((tmp_path / "out" / "job.json").read_text())
    assert job_file["payload"]["threads"] == 1
    with pytest.raises(DiffsqueezeError, match="differs in: threads"):
        run_eval_job(EvalJob(**{**job.__dict__, "threads": 2}), tmp_path / "out", pipe=pipe, baseline_pipe=pipe,
                     extractor=tiny_feature_net(), progress=False)
