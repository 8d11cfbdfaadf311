"""Prompt sets: builtin names, files, clear errors."""

from __future__ import annotations

import pytest

from diffsqueeze.errors import DiffsqueezeError
from diffsqueeze.models.prompts import load_prompts


def test_fashion_prompts_are_the_model_class_prompts():
    from diffsqueeze.models.fashion import CLASS_NAMES, class_prompt

    assert load_prompts("builtin:fashion") == [class_prompt(i) for i in range(len(CLASS_NAMES))]


def test_prompt_files_and_errors(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n  a dog  \n")
    assert load_prompts(str(f)) == ["a cat", "a dog"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(DiffsqueezeError, match="holds no prompt"):
        load_prompts(str(tmp_path / "empty.txt"))
    with pytest.raises(DiffsqueezeError, match="does not exist"):
        load_prompts(str(tmp_path / "missing.txt"))
    with pytest.raises(DiffsqueezeError, match="unknown prompt set 'builtin:cars'"):
        load_prompts("builtin:cars")


def test_prompt_files_too_large_or_with_runaway_lines_are_refused_naming_file_size_and_limit(tmp_path):
    from diffsqueeze.models.prompts import MAX_PROMPT_CHARS, MAX_PROMPT_FILE_BYTES

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # sparse: never read
        f.truncate(MAX_PROMPT_FILE_BYTES + 1)
    with pytest.raises(DiffsqueezeError, match=f"'{huge}' is {MAX_PROMPT_FILE_BYTES + 1:,} bytes, over the limit of "
                                               f"{MAX_PROMPT_FILE_BYTES:,} bytes"):
        load_prompts(str(huge))
    long = tmp_path / "long.txt"
    long.write_text("a cat\n" + "x" * (MAX_PROMPT_CHARS + 1) + "\n")
    with pytest.raises(DiffsqueezeError, match=f"'{long}' \\({long.stat().st_size:,} bytes\\): line 2 is "
                                               f"{MAX_PROMPT_CHARS + 1:,} characters long, over the limit of "
                                               f"{MAX_PROMPT_CHARS:,}"):
        load_prompts(str(long))
    long.write_text("a cat\n" + "x" * MAX_PROMPT_CHARS + "\n")
    assert len(load_prompts(str(long))[1]) == MAX_PROMPT_CHARS


def test_truncation_by_the_tokenizer_is_reported_once_with_counts(tmp_path, caplog, monkeypatch):
    """builtin:fashion's tokenizer passes 16 tokens: two of three prompts are longer."""
    import logging

    from diffsqueeze.loading import load_pipeline
    from diffsqueeze.models import conditioning
    from diffsqueeze.models.conditioning import pipeline_prompts

    monkeypatch.setattr(conditioning, "_TRUNCATION_CHECKED", set())
    monkeypatch.delenv("RANK", raising=False)
    f = tmp_path / "p.txt"
    f.write_text("a photo of a coat\n" + "a photo of a very long and richly detailed coat with many buttons\n" * 2)
    pipe = load_pipeline("builtin:fashion")
    with caplog.at_level(logging.WARNING, logger="diffsqueeze"):
        assert len(pipeline_prompts(pipe, str(f))) == 3
        pipeline_prompts(pipe, str(f))  # the run asks again (calibration, check, evaluation): said once
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert f"2 of 3 prompts of '{f}'" in record.getMessage() and "first 16 tokens" in record.getMessage()
    caplog.clear()
    monkeypatch.setattr(conditioning, "_TRUNCATION_CHECKED", set())
    monkeypatch.setenv("RANK", "1")  # another process of a multi-process launch stays quiet
    with caplog.at_level(logging.WARNING, logger="diffsqueeze"):
        pipeline_prompts(pipe, str(f))
        pipeline_prompts(pipe, "builtin:fashion")  # short prompts: nothing to say anywhere
    assert not caplog.records


def test_the_clip_score_says_which_prompts_it_cuts(tmp_path):
    from diffsqueeze.metrics.clip_score import ClipScorer

    clip = ClipScorer.from_spec("builtin:fashion-clip")
    assert clip.truncation_warning(["a photo of a coat"], "set") is None
    message = clip.truncation_warning(["a photo of a coat", "a photo of a very long coat " * 4], "set")
    assert "1 of 2 prompts of 'set'" in message and "first 16 tokens" in message
