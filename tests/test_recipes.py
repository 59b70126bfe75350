"""Every recipe parses into the argument dataclasses and validates, without downloading anything."""

from pathlib import Path

import pytest

from dts_llm.errors import UserError
from dts_llm.recipe import parse_recipe

ALL_RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.yaml"))
GLUE_RECIPES = [path for path in ALL_RECIPES if path.parent.parent.name == "glue"]
CHAT_RECIPES = [path for path in ALL_RECIPES if path.parent.parent.name == "chat"]
RECIPES = [path for path in ALL_RECIPES if path not in GLUE_RECIPES + CHAT_RECIPES]  # the papers' instruction KD
FAMILIES = {"gpt2": "gpt2", "opt": "opt"}


def test_recipes_exist_for_both_families_and_every_glue_task():
    from dts_llm.glue import GLUE_TASKS

    assert {path.parent.name for path in RECIPES} == set(FAMILIES)
    assert len(RECIPES) >= 18
    assert {path.parent.name for path in GLUE_RECIPES} == set(GLUE_TASKS)
    # teacher SFT, TinyBERT-4 and DistilBERT x (KD, DTS); STS-B, a regression, has no temperature to schedule
    assert len(GLUE_RECIPES) == 5 * len(GLUE_TASKS) - 2


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
        if training.auto_temperature_fields:  # measured from the teacher before training: here, given
            assert training.auto_temperature_fields == ["temperature_min", "temperature_max", "temperature_init"]
            training.resolve_auto_temperatures(1.25, 2.5)
            assert (training.temperature_min, training.temperature_max, training.temperature_init) == (1.25, 2.5, 2.5)
        policy = training.make_temperature_policy()
        if training.temperature_policy == "ctkd":
            assert policy(0.0).item() == pytest.approx(training.temperature_init)
        elif training.temperature_policy == "annealing":
            assert policy.temperature == training.temperature_max
        else:
            assert policy.temperature == training.temperature_init
    assert (lora.lora_r is not None) == path.stem.endswith("-lora")
    method = path.stem.removesuffix("-lora").rsplit("-", 1)[-1]
    if command == "distill":
        assert {"kd": "constant", "dts": "dts", "ctkd": "ctkd", "annealing": "annealing"}[
            method
        ] == training.temperature_policy


def test_the_dts_reference_setting_is_the_published_one(tmp_path):
    path = next(p for p in RECIPES if p.name == "13b-to-1.3b-dts.yaml")
    model, _, _, training = parse_recipe("distill", [str(path), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert (model.model_name_or_path, model.teacher_model_name_or_path) == ("facebook/opt-1.3b", "facebook/opt-13b")
    assert (training.kd_ratio, training.num_train_epochs, training.learning_rate) == (0.9, 7, 5e-5)
    assert training.per_device_train_batch_size == 4


@pytest.mark.parametrize("path", GLUE_RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in GLUE_RECIPES])
def test_glue_recipe_parses_and_validates(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# ")
    command = "distill" if "teacher_model_name_or_path" in text else "sft"
    model, data, _lora, training = parse_recipe(command, [str(path), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert data.glue_task == path.parent.name and data.dataset == "nyu-mll/glue" and data.max_length == 128
    if command == "sft":
        assert model.model_name_or_path == "bert-base-uncased"
        return
    assert model.tokenizer_name_or_path == "bert-base-uncased", "students share the teacher's vocabulary"
    assert model.teacher_model_name_or_path == f"outputs/glue/{data.glue_task}/bert-base-teacher"
    if path.stem.endswith("-dts"):
        assert training.temperature_policy == "dts"
        assert (training.temperature_init, training.temperature_max, training.temperature_min) == (8.0, 8.0, 4.0)
    else:
        assert (training.temperature_policy, training.temperature_init) == ("constant", 4.0)


@pytest.mark.parametrize("path", CHAT_RECIPES, ids=[f"{p.parent.name}/{p.name}" for p in CHAT_RECIPES])
def test_chat_recipe_parses_and_validates(path, tmp_path):
    text = path.read_text()
    assert text.startswith("# ") and "deepspeed_zero3.yaml" in text
    overrides = ["--output_dir", str(tmp_path), "--bf16", "false"]
    model, data, lora, training = parse_recipe("distill", [str(path), *overrides])
    assert (model.model_name_or_path, model.teacher_model_name_or_path) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        "Qwen/Qwen2.5-7B-Instruct",
    )
    assert (model.dtype, training.teacher_dtype) == ("bfloat16", "bfloat16")
    assert (data.dataset, data.dataset_split, data.template) == ("HuggingFaceH4/ultrachat_200k", "train_sft", "chat")
    assert data.last_turn_only is False and data.max_prompt_length < data.max_length == 2048
    assert training.temperature_policy == "dts"
    assert (lora.lora_r is not None) == path.stem.endswith("-lora") == model.merge_lora


def test_a_key_given_twice_is_refused_with_its_file_and_line(tmp_path):
    """YAML would silently keep the last value."""
    path = tmp_path / "twice.yaml"
    path.write_text(RECIPES[0].read_text() + "learning_rate: 0.5\n")
    line = len(path.read_text().splitlines())
    with pytest.raises(UserError, match=f"{path}, line {line}: the key 'learning_rate' is given twice"):
        parse_recipe("sft", [str(path), "--output_dir", str(tmp_path)])


def test_the_old_field_names_still_work_with_one_warning_each(tmp_path):
    """`temperature` (a policy's name) is now `temperature_policy`, `kd_loss` is `divergence`."""
    path = next(p for p in RECIPES if p.name == "xl-to-base-dts.yaml")
    text = (
        path.read_text().replace("temperature_policy: dts", "temperature: cosine").replace("divergence:", "kd_loss:")
    )
    old = tmp_path / "old.yaml"
    old.write_text(text)
    with pytest.warns(FutureWarning) as caught:
        *_, training = parse_recipe("distill", [str(old), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert (training.temperature_policy, training.divergence) == ("cosine", "forward_kl")
    assert (training.temperature, training.kd_loss) == (None, None)
    messages = sorted(str(w.message) for w in caught if "deprecated: it is now" in str(w.message))
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"{old}: kd_loss is deprecated: it is now divergence")
    assert messages[1].startswith(f"{old}: temperature is deprecated: it is now temperature_policy")


def test_an_old_and_a_new_name_for_one_field_are_refused(tmp_path):
    path = next(p for p in RECIPES if p.name == "xl-to-base-dts.yaml")
    both = tmp_path / "both.yaml"
    both.write_text(path.read_text() + "temperature: constant\n")
    with pytest.raises(UserError, match=f"{both}: temperature is the old name of temperature_policy"):
        parse_recipe("distill", [str(both), "--output_dir", str(tmp_path), "--bf16", "false"])


def test_an_old_name_without_a_value_is_ignored_silently(tmp_path, recwarn):
    """A resolved recipe (dts_llm_config.yaml, written from the config) lists the old names as null."""
    path = next(p for p in RECIPES if p.name == "xl-to-base-dts.yaml")
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(path.read_text() + "temperature: null\nkd_loss: null\n")
    *_, training = parse_recipe("distill", [str(resolved), "--output_dir", str(tmp_path), "--bf16", "false"])
    assert training.temperature_policy == "dts"
    assert not [w for w in recwarn if "deprecated: it is now" in str(w.message)]


GENERATING = [path for path in RECIPES if "-onpolicy-" in path.name or "-seqkd-" in path.name]


@pytest.mark.parametrize("path", GENERATING, ids=[f"{p.parent.name}/{p.name}" for p in GENERATING])
def test_on_policy_and_sequence_level_recipes_vary_their_off_policy_recipe(path, tmp_path):
    on_policy = "-onpolicy-" in path.name
    sibling = path.with_name(path.name.replace("-onpolicy", "").replace("-seqkd", ""))
    overrides = ["--output_dir", str(tmp_path), "--bf16", "false"]
    training = parse_recipe("distill", [str(path), *overrides])[-1]
    base = parse_recipe("distill", [str(sibling), *overrides])[-1]
    if on_policy:  # GKD's lmbda 0.5 and JSD beta 0.5, the divergence alone
        assert (training.lmbda, training.seq_kd, training.divergence, training.jsd_beta) == (0.5, False, "jsd", 0.5)
        assert training.kd_ratio == 1.0
    else:
        assert (training.lmbda, training.seq_kd, training.divergence) == (0.0, True, base.divergence)
    assert (training.max_new_tokens, training.generation_temperature, training.top_p, training.top_k) == (256, 1, 1, 0)
    assert training.temperature_settings() == base.temperature_settings()
    assert (training.learning_rate, training.num_train_epochs) == (base.learning_rate, base.num_train_epochs)


def test_both_families_have_on_policy_recipes():
    assert {path.parent.name for path in GENERATING if "-onpolicy-" in path.name} == set(FAMILIES)
    assert any("-seqkd-" in path.name for path in GENERATING)
