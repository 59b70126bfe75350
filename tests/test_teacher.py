"""The teacher's DeepSpeed ZeRO-3 config, derived from the trainer's, and the FSDP refusal (no processes needed)."""

import pytest
import torch
from helpers import tiny_gpt2

from dts_llm.teacher import shard_like_student, teacher_deepspeed_config

TRAINER_CONFIG = {
    "train_batch_size": 64,
    "train_micro_batch_size_per_gpu": 8,
    "gradient_accumulation_steps": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 3,
        "offload_optimizer": {"device": "cpu"},
        "offload_param": {"device": "none"},
        "reduce_bucket_size": "auto",
        "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto",
        "stage3_gather_16bit_weights_on_model_save": True,
    },
}


def test_auto_sizes_are_resolved_from_the_teacher_width_as_nested_keys():
    config = teacher_deepspeed_config(TRAINER_CONFIG, width=2048, dtype=None)
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2048 * 2048
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 2048 * 2048)
    assert zero["stage3_param_persistence_threshold"] == 10 * 2048
    assert not any("." in key for key in config), "DeepSpeed ignores dotted top-level keys"
    assert zero["stage"] == 3 and zero["offload_param"] == {"device": "none"}


def test_training_sections_are_dropped_and_the_trainer_config_is_left_alone():
    config = teacher_deepspeed_config(TRAINER_CONFIG, width=64, dtype=None)
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        assert key not in config
    assert "offload_optimizer" not in config["zero_optimization"]
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["bf16"] == {"enabled": True}
    assert TRAINER_CONFIG["optimizer"]["params"]["lr"] == "auto"
    assert TRAINER_CONFIG["zero_optimization"]["reduce_bucket_size"] == "auto"


def test_explicit_sizes_are_kept():
    trainer_config = {**TRAINER_CONFIG, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    zero = teacher_deepspeed_config(trainer_config, width=64, dtype=None)["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["reduce_bucket_size"] == 64 * 64


def test_a_model_without_a_width_gets_deepspeed_defaults():
    zero = teacher_deepspeed_config(TRAINER_CONFIG, width=None, dtype=None)["zero_optimization"]
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"} & set(zero)


@pytest.mark.parametrize(
    ("dtype", "bf16", "fp16"), [("bfloat16", True, False), ("float16", False, True), ("float32", False, False)]
)
def test_teacher_dtype_sets_the_teacher_engine_precision(dtype, bf16, fp16):
    config = teacher_deepspeed_config(TRAINER_CONFIG, width=64, dtype=dtype)
    assert config["bf16"] == {"enabled": bf16} and config["fp16"] == {"enabled": fp16}


def test_an_unresolved_auto_value_is_named():
    trainer_config = {**TRAINER_CONFIG, "fp16": {"enabled": "auto"}}
    with pytest.raises(ValueError, match=r"fp16\.enabled"):
        teacher_deepspeed_config(trainer_config, width=64, dtype=None)


def test_a_teacher_with_weights_on_one_process_only_is_refused_before_sharding(tokenizer):
    """fsdp_cpu_ram_efficient_loading leaves meta tensors on every process but the first."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    with torch.device("meta"):
        teacher = tiny_gpt2(tokenizer)
    with pytest.raises(ValueError, match="fsdp_cpu_ram_efficient_loading"):
        shard_like_student(teacher, FullyShardedDataParallelPlugin(fsdp_version=2))
