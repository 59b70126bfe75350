"""Every recipe parses into the argument dataclasses and validates, without downloading anything."""

from pathlib import Path

import pytest

from dts_llm.recipe import parse_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
FAMILIES = {"gpt2": "gpt2", "opt": "opt"}


def test_recipes_exist_for_both_families():
    assert {path.parent.name for path in RECIPES} == set(FAMILIES)
    assert len(RECIPES) >= 18


@pytest.mark.parametrize("path", RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in RECIPES])
def test_recipe_parses_and_validates(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# "), "each recipe opens with a comment saying what it reproduces"
    command = "distill" if "teacher_model_name_or_path" in text else "sft"
    # Recipes ask for bf16, which TrainingArguments refuses on a machine without a GPU: override it.
    overrides = ["--output_dir", str(tmp_path), "--bf16", "false"]
    model, data, lora, training = parse_recipe(command, [str(path), *overrides])
    assert training.output_dir == str(tmp_path) and training.bf16 is False
    family = FAMILIES[path.parent.name]
    assert family in model.model_name_or_path
    assert data.dataset == "databricks/databricks-dolly-15k"
    assert (data.max_length, data.max_prompt_length) == (512, 256)
    if command == "distill":
        assert family in model.teacher_model_name_or_path, "teacher and student share one tokenizer family"
        assert training.temperature in ("constant", "dts")
        policy = training.make_temperature_policy()
        assert policy.temperature == training.temperature_init
    assert (lora.lora_r is not None) == path.stem.endswith("-lora")
    method = path.stem.removesuffix("-lora").rsplit("-", 1)[-1]
    if command == "distill":
        assert {"kd": "constant", "dts": "dts"}[method] == training.temperature


def test_the_dts_reference_setting_is_the_published_one(tmp_path):
    path = next(p for p in RECIPES if p.name == "13b-to-1.3b-dts.yaml")
    model, _, _, training = parse_recipe("distill", [str(path), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert (model.model_name_or_path, model.teacher_model_name_or_path) == ("facebook/opt-1.3b", "facebook/opt-13b")
    assert (training.kd_ratio, training.num_train_epochs, training.learning_rate) == (0.9, 7, 5e-5)
    assert training.per_device_train_batch_size == 4
