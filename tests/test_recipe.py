"""Recipes: validation names the cause and key path before any work; overrides; shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffsqueeze.errors import RecipeError
from diffsqueeze.recipe import apply_overrides, load_recipe, recipe_from_dict

REPO = Path(__file__).resolve().parents[1]
GOOD = {"model": "builtin:tiny-sd", "output_dir": "unused", "stages": [{"prune": {"targets": {"unet": 0.3}}}]}


def with_(**changes):
    data = {**GOOD, **changes}
    return {k: v for k, v in data.items() if v is not ...}


BAD_RECIPES = [
    # (recipe data, words the message must contain)
    (with_(colour="red"), ["colour", "unknown key"]),
    (with_(seed="zero"), ["seed", "integer"]),
    (with_(device="tpu"), ["device", "'cpu'"]),
    (with_(dtype="float8"), ["dtype", "float16"]),
    (with_(model="builtin:nope"), ["model", "unknown builtin", "builtin:tiny-sd"]),
    (with_(model="./no/such/folder"), ["model", "no such folder"]),
    (with_(model=...), ["model", "required"]),
    (with_(stages=[{"shrink": {}}]), ["stages[0].shrink", "unknown stage", "prune"]),
    (with_(stages=[{"prune": {"targets": {"unet": 1.5}}}]), ["stages[0].prune.targets.unet", "[0, 1)"]),
    (with_(stages=[{"prune": {"targets": {}}}]), ["stages[0].prune.targets", "at least one"]),
    (with_(stages=[{"prune": {"targets": {"unet": 0.3}, "scope": "block"}}]), ["stages[0].prune.scope", "global"]),
    (with_(stages=[{"prune": {"targets": {"unet": 0.3}, "pattern": "2:4"}}]), ["targets.unet", "2:4", "0.5"]),
    (with_(stages=[{"prune": {"targets": {"unet": 0.3}, "pattern": "4:2"}}]), ["pattern", "N:M"]),
    (with_(stages=[{"prune": {"targets": {"unet": 0.3}, "layer_types": ["norm"]}}]), ["layer_types", "norm"]),
    (with_(stages=[{"prune": {"targets": {"unet": 0.3}}, "quant": {}}]), ["stages[0]", "exactly one key"]),
    (with_(stages={"prune": {}}), ["stages", "list"]),
    (with_(calibration={"timesteps": 50, "num_inference_steps": 20}), ["calibration.timesteps", "sampler steps"]),
    (with_(calibration={"num_samples": 0}), ["calibration.num_samples", ">= 1"]),
    (with_(eval={"num_images": -1}), ["eval.num_images", ">= 0"]),
    (with_(eval={"seeds": "one"}), ["eval.seeds[0]", "integer"]),
    (with_(calibration={"prompts": "builtin:nope"}), ["calibration.prompts", "unknown prompt set", "builtin:fashion"]),
    (with_(calibration={"prompts": "no/such/prompts.txt"}), ["calibration.prompts", "does not exist"]),
    (with_(eval={"prompts": "builtin:nope"}), ["eval.prompts", "unknown prompt set"]),
    (with_(eval={"reference": str(REPO / "diffsqueeze" / "pipelines")}), ["eval.reference", "holds no image files"]),
]


@pytest.mark.parametrize("data,words", BAD_RECIPES, ids=[w[0] for _, w in BAD_RECIPES])
def test_bad_recipe_names_the_cause(data, words):
    with pytest.raises(RecipeError) as info:
        recipe_from_dict(data)
    for word in words:
        assert word in str(info.value), f"{word!r} missing from: {info.value}"


def test_output_dir_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RecipeError, match="output_dir.*not a directory"):
        recipe_from_dict(with_(output_dir=str(f)))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)


def test_output_dir_and_model_must_not_overlap(tmp_path):
    model = tmp_path / "sd"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    for out, words in ((model, "model's own folder"), (model / "out", "inside the model folder"), (tmp_path, "holds the model")):
        with pytest.raises(RecipeError, match=f"output_dir: .*{words}"):
            recipe_from_dict(with_(model=str(model), output_dir=str(out)))
    recipe_from_dict(with_(model=str(model), output_dir=str(tmp_path / "sd-pruned")))  # a sibling is fine


def test_a_key_given_twice_names_the_key_and_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: builtin:tiny-sd\noutput_dir: out\nstages:\n  - prune: {targets: {unet: 0.3, unet: 0.5}}\n")
    with pytest.raises(RecipeError, match=r"line 4: duplicate key 'unet' \(first at line 4\)"):
        load_recipe(path)
    path.write_text("base: &b {seed: 1}\nrecipe:\n  <<: *b\n  seed: 2\n")  # a merge key may be overridden
    with pytest.raises(RecipeError, match="unknown key"):
        load_recipe(path)


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert "\n" not in str(info.value) and "line 2, column 1" in str(info.value)
    with pytest.raises(RecipeError, match=r"^seed: override value '\[1' is not valid YAML.*quote it"):
        apply_overrides(GOOD, ["seed=[1"])


def test_defaults_and_types():
    recipe = recipe_from_dict({**GOOD, "eval": {"seeds": [3, 4]}})
    assert recipe.seed == 0 and recipe.device == "auto"
    assert recipe.stages[0].name == "prune"
    assert recipe.stages[0].config.targets == {"unet": 0.3}
    assert recipe.eval.seeds == (3, 4)
    assert isinstance(recipe.stages[0].config.targets["unet"], float)


def test_overrides_reach_nested_keys_and_list_items():
    data = apply_overrides(GOOD, ["stages.0.prune.targets.unet=0.5", "seed=7", "eval.seeds=[1, 2]"])
    recipe = recipe_from_dict(data)
    assert recipe.stages[0].config.targets["unet"] == 0.5
    assert recipe.seed == 7 and recipe.eval.seeds == (1, 2)
    assert GOOD["stages"][0]["prune"]["targets"]["unet"] == 0.3  # the input is not modified
    with pytest.raises(RecipeError, match="no list item '3'"):
        apply_overrides(GOOD, ["stages.3.prune.scope=layer"])
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        apply_overrides(GOOD, ["seed"])


def test_stage_hash_chain_keeps_earlier_stages_when_a_later_one_changes():
    two = {**GOOD, "stages": GOOD["stages"] * 2}
    a = recipe_from_dict(two)
    b = recipe_from_dict(apply_overrides(two, ["stages.1.prune.targets.unet=0.6"]))
    c = recipe_from_dict(apply_overrides(two, ["seed=1"]))
    assert a.stage_hashes()[0] == b.stage_hashes()[0]
    assert a.stage_hashes()[1] != b.stage_hashes()[1]
    assert a.stage_hashes()[0] != c.stage_hashes()[0]
    assert a.recipe_hash() == recipe_from_dict({**two, "output_dir": "elsewhere", "device": "cpu"}).recipe_hash()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path, monkeypatch):
    # hub ids are checked for form only (nothing is downloaded)
    recipe = load_recipe(path)
    assert recipe.stages
