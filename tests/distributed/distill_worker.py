"""One process of a multi-process distillation run (launched by torchrun from tests).

Writes, per rank, the temperature the policy returned at every optimizer step and the logged
metrics, and on rank 0 the final student weights, so the test can compare ranks with each other
and with a single-process run on the union of their batches.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import arithmetic_records, gpt2_tokenizer, tiny_gpt2, tokenize_records  # noqa: E402

from dts_llm import DistillationConfig, DistillationTrainer  # noqa: E402


class TemperatureRecorder(TrainerCallback):
    def __init__(self):
        self.temperatures = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.temperatures.append(self.trainer.temperature_policy.temperature)


def main(teacher_dir: str, output: str, per_device_batch: int) -> None:
    tokenizer = gpt2_tokenizer()
    args = DistillationConfig(
        output_dir=output,
        per_device_train_batch_size=per_device_batch,
        max_steps=4,
        optim="sgd",
        learning_rate=0.5,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        temperature="dts",
        temperature_progress="step",
        temperature_momentum=0.5,
    )
    recorder = TemperatureRecorder()
    trainer = DistillationTrainer(
        model=tiny_gpt2(tokenizer),
        teacher_model=teacher_dir,
        args=args,
        train_dataset=tokenize_records(tokenizer, arithmetic_records(32)),
        processing_class=tokenizer,
        callbacks=[recorder],
    )
    recorder.trainer = trainer
    trainer.train()
    rank = trainer.args.process_index
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    result = {"world_size": trainer.args.world_size, "temperatures": recorder.temperatures, "logs": logs}
    Path(output, f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        state = {k: v.contiguous() for k, v in trainer.model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(Path(output, "student.safetensors")))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
