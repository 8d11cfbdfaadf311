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
