"""Distilling chat models of today's families (tiny Llama, Qwen2, Mistral over the GPT-2 BPE plus ChatML) on
conversations, through the Python API and the CLI: few steps, real Trainer."""

import json

import pytest
import yaml
from datasets import Dataset
from helpers import CHATML, base_recipe, chat_tokenizer, conversation, independent_count, tiny_chat_model, write_recipe

from dts_llm import DistillationConfig, DistillationTrainer
from dts_llm.cli import main
from dts_llm.formats import FormatArguments
from dts_llm.recipe import RECIPE_NAME


def settings(tmp_path, **fields) -> DistillationConfig:
    return DistillationConfig(
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **fields,
    )


@pytest.mark.parametrize(("teacher_family", "student_family"), [("llama", "qwen2"), ("mistral", "llama")])
def test_the_python_api_distils_a_chat_student_from_an_untokenised_conversational_dataset(
    tmp_path, teacher_family, student_family
):
    tokenizer = chat_tokenizer()
    teacher = tiny_chat_model(teacher_family, tokenizer, width=32, seed=1)
    student = tiny_chat_model(student_family, tokenizer, width=16, seed=2)
    records = [{"messages": conversation(i, turns=1 + i % 2)} for i in range(8)]
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=settings(tmp_path),
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        data_args=FormatArguments(max_length=128, max_prompt_length=96),
    )
    learned = sum(label != -100 for example in trainer.train_dataset for label in example["labels"])
    contents = [m["content"] for record in records for m in record["messages"] if m["role"] == "assistant"]
    assert learned == independent_count(tokenizer, contents)

    seen = {}

    def record(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, kwargs["input_ids"])

        return hook

    for name, model in (("teacher", trainer.teacher_model), ("student", student)):
        model.register_forward_pre_hook(record(name), with_kwargs=True)
    trainer.train()
    assert seen["teacher"].equal(seen["student"])
    losses = [entry["kd_loss"] for entry in trainer.state.log_history if "kd_loss" in entry]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_the_cli_distils_on_conversations_with_a_recipe_chat_template_and_records_the_choice(tmp_path):
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = None  # a base tokenizer: the recipe brings the template
    for name, family, width in (("teacher", "mistral", 32), ("student", "qwen2", 16)):
        tiny_chat_model(family, tokenizer, width=width).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    records = [{"messages": conversation(i)} for i in range(10)]
    records.append({"messages": conversation(1)[:2]})  # no assistant turn: counted
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    (tmp_path / "chatml.jinja").write_text(CHATML)
    recipe = base_recipe(
        tmp_path,
        "distilled",
        model_name_or_path=str(tmp_path / "student"),
        teacher_model_name_or_path=str(tmp_path / "teacher"),
        dataset=str(tmp_path / "chat.jsonl"),
        dev_num=2,
        chat_template=str(tmp_path / "chatml.jinja"),
        max_steps=2,
        per_device_train_batch_size=4,
    )
    assert main(["distill", write_recipe(tmp_path / "distill.yaml", **recipe)]) == 0
    output = tmp_path / "distilled"
    text = (output / RECIPE_NAME).read_text()
    resolved = yaml.safe_load(text)
    assert text.startswith("# rendered with: template chat (template: auto)\n")
    assert resolved["chat_template"] == str(tmp_path / "chatml.jinja") and resolved["last_turn_only"] is False
    report = json.loads((output / "data_report.json").read_text())
    assert (report["train"], report["validation"], report["no_assistant_turns"]) == (8, 2, 1)
    saved = json.loads((output / "tokenizer_config.json").read_text())
    assert saved.get("chat_template") == CHATML or (output / "chat_template.jinja").read_text() == CHATML
