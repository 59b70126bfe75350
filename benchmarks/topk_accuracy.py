"""How close top-k teachers come to the full-vocabulary KD loss: ours (exact normaliser) vs peers' (renormalised).

    python benchmarks/topk_accuracy.py [--teacher PATH --student PATH] [--quick] [--grid-study]

On real Dolly prompts + responses through the real GPT-2 tokenizer (the held-out last 200 records
of ``../shared/data/dolly/raw_sample.jsonl``), at each T and k it compares with the exact loss
T^2 KL(p_T || q_T) over the whole vocabulary (``distillation_objective`` on dense teacher logits,
kd_ratio 1) and its gradient w.r.t. the student's logits:

* ``ours``: ``TopKTeacher`` (top-k logits + the tail's log-partition on 8 inverse temperatures
  over T in [1, 10], Hermite-interpolated): the divergence over the k + 1 buckets;
* ``peers``: the renormalised top-k of DistillKit, axolotl and TRL's server teacher: both
  softmaxes taken over the teacher's top-k ids only at T, the tail dropped (written here, autograd).

Reported per (T, k), as medians over batches: the loss's relative error, the cosine between the
gradients and the exact one, the teacher's tail mass at T, and the interpolated log Z_tail's worst
error. Without ``--teacher``/``--student`` the models are the benchmark's own: small GPT-2s built
from ``GPT2Config`` over the real GPT-2 vocabulary and trained here (seeded) on the first 800
records; they are saved under ``outputs/topk_accuracy`` and reused by later runs.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics

import torch
from _common import ROOT, add_common_options, apply_common_options, gpt2_tokenizer, print_header, print_table
from _common import tiny_gpt2 as build_gpt2

DOLLY = ROOT.parent / "shared" / "data" / "dolly" / "raw_sample.jsonl"
MODELS_DIR = ROOT / "outputs" / "topk_accuracy"
TEMPERATURES = (1.0, 2.0, 3.0, 5.0, 10.0)
KS = (8, 32, 128, 512)
T_RANGE, GRID_SIZE = (1.0, 10.0), 8
HELD_OUT = 200
XL_HIDDEN = 1600  # GPT-2 XL: the exact kind caches its last hidden state, bf16
# (width, layers, heads, seed) of the benchmark's own models
OWN_MODELS = {"teacher": (128, 2, 2, 1), "student": (64, 2, 2, 2)}
TRAIN_LENGTH = 128  # training sequences are cut here: CPU time goes into the 50257-wide head


def encoded_records(tokenizer, max_length: int) -> list[dict[str, list[int]]]:
    from dts_llm.data import encode_example
    from dts_llm.records import read_records
    from dts_llm.template import format_prompt

    records = read_records(str(DOLLY))
    return [encode_example(tokenizer, format_prompt(r["instruction"], r["context"]), r["response"], max_length)
            for r in records]  # fmt: skip


def batches(examples, batch_size: int, pad_id: int):
    """(input_ids, attention_mask, labels) tensors, right-padded (padding labelled -100)."""
    for start in range(0, len(examples), batch_size):
        group = examples[start : start + batch_size]
        width = max(len(e["input_ids"]) for e in group)

        def column(name, fill):
            return torch.tensor([e[name] + [fill] * (width - len(e[name])) for e in group])  # noqa: B023

        yield column("input_ids", pad_id), column("attention_mask", 0), column("labels", -100)


def train_own_model(name: str, tokenizer, examples, steps: int, device: torch.device):
    """A small GPT-2 fine-tuned with plain next-token CE on Dolly (AdamW, seeded, batch 8)."""
    from dts_llm.losses import causal_lm_cross_entropy

    width, layers, heads, seed = OWN_MODELS[name]
    model = build_gpt2(len(tokenizer), tokenizer.eos_token_id, width, layers, heads, 256, seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        picks = torch.randint(len(examples), (8,), generator=generator).tolist()
        input_ids, mask, labels = next(batches([examples[i] for i in picks], 8, tokenizer.eos_token_id))
        logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
        loss = causal_lm_cross_entropy(logits, labels.to(device))
        loss.backward()
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"  {name} step {step}: CE {loss.item():.3f}", flush=True)
    return model.eval()


def load_models(args, tokenizer, train_examples, device):
    """(teacher, student, description): given folders, or the benchmark's own (trained once, then reused)."""
    from transformers import AutoModelForCausalLM

    if args.teacher or args.student:
        if not (args.teacher and args.student):
            raise SystemExit("--teacher and --student go together")
        models = [AutoModelForCausalLM.from_pretrained(p).to(device).eval() for p in (args.teacher, args.student)]
        return *models, f"teacher {args.teacher}, student {args.student}"
    folder = MODELS_DIR / f"steps{args.steps}"
    models = []
    for name in ("teacher", "student"):
        if (folder / name / "config.json").exists():
            models.append(AutoModelForCausalLM.from_pretrained(folder / name).to(device).eval())
        else:
            print(f"training the benchmark's own {name} ({args.steps} steps) ...", flush=True)
            models.append(train_own_model(name, tokenizer, train_examples, args.steps, device))
            if not args.quick:  # a smoke test leaves nothing behind
                models[-1].save_pretrained(folder / name)
    widths = ", ".join(f"{n} {w}x{layers}" for n, (w, layers, _, _) in OWN_MODELS.items())
    return *models, (
        f"the benchmark's own small GPT-2s ({widths} width x layers, real GPT-2 vocabulary), "
        f"trained {args.steps} steps on Dolly here; NOT pretrained models"
    )


def renormalised_top_k(student_logits, teacher_logits, labels, *, k: int, temperature: float):
    """The peers' loss: T^2 KL over the teacher's top-k ids, both sides renormalised over them at T."""
    mask = labels[:, 1:] != -100
    teacher, student = teacher_logits[:, :-1][mask], student_logits[:, :-1][mask]
    top, ids = teacher.topk(k, -1)
    teacher_logp = (top / temperature).log_softmax(-1)
    student_logp = (student.gather(-1, ids) / temperature).log_softmax(-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return temperature**2 * kl.sum() / mask.sum()


def value_and_grad(loss, student_logits):
    leaf = student_logits.detach().requires_grad_(True)
    value = loss(leaf)
    (grad,) = torch.autograd.grad(value, leaf)
    return float(value.detach()), grad.flatten().double()


def scored_rows(logits, labels):
    mask = labels[:, 1:] != -100
    return logits[:, :-1][mask]


def exact_tail(teacher_rows, ids, beta):
    return (teacher_rows.double() * beta).scatter(1, ids, -math.inf).logsumexp(-1)


def measure_batch(teacher_logits, student_logits, labels, betas):
    """{(T, k): {metric: value}} for one batch."""
    from dts_llm.losses import TopKTeacher, distillation_objective, tail_log_partition

    def ours_loss(t, teacher):
        return lambda s: distillation_objective(s, teacher, labels, kd_ratio=1.0, temperature=t).loss

    results = {}
    teacher_rows = scored_rows(teacher_logits, labels)
    exact = {t: value_and_grad(ours_loss(t, teacher_logits), student_logits) for t in TEMPERATURES}
    for k in KS:
        compact = TopKTeacher.from_logits(teacher_logits, k, betas)
        packed = scored_rows(compact.packed, labels)
        ids = compact.layout.token_ids(packed)
        for t in TEMPERATURES:
            exact_value, exact_grad = exact[t]
            ours, ours_grad = value_and_grad(ours_loss(t, compact), student_logits)
            peers, peers_grad = value_and_grad(
                lambda s: renormalised_top_k(s, teacher_logits, labels, k=k, temperature=t),  # noqa: B023
                student_logits,
            )
            p_top = (teacher_rows.double() / t).softmax(-1).gather(1, ids).sum(-1)
            hermite = tail_log_partition(packed, betas, 1.0 / t) - exact_tail(teacher_rows, ids, 1.0 / t)
            results[t, k] = {
                "ours_err": abs(ours - exact_value) / exact_value,
                "peers_err": abs(peers - exact_value) / exact_value,
                "ours_cos": float(torch.cosine_similarity(ours_grad, exact_grad, 0)),
                "peers_cos": float(torch.cosine_similarity(peers_grad, exact_grad, 0)),
                "tail_mass": float((1 - p_top).mean()),
                "hermite": float(hermite.abs().max()),
            }
    return results


def grid_spacings(t_min: float, t_max: float, size: int) -> dict[str, torch.Tensor]:
    """The candidate grids the default spacing was chosen from."""
    lo, hi = 1.0 / t_max, 1.0 / t_min
    share = (1 - torch.cos(math.pi * torch.arange(size, dtype=torch.float64) / (size - 1))) / 2
    return {
        "even in 1/T (the default)": torch.linspace(lo, hi, size, dtype=torch.float64),
        "even in T": 1.0 / torch.linspace(t_max, t_min, size, dtype=torch.float64),
        "even in log(1/T)": torch.logspace(math.log10(lo), math.log10(hi), size, dtype=torch.float64),
        "Chebyshev in 1/T": lo + (hi - lo) * share,
    }


def grid_study(teacher_rows, k: int) -> None:
    """Hermite's worst |error| in log Z_tail over 100 temperatures spread over the range, per spacing."""
    from dts_llm.losses import CompactLayout, compact_teacher_rows, tail_log_partition

    print(f"\nspacing of the {GRID_SIZE}-point grid over T in {list(T_RANGE)}: worst |error| of log Z_tail, k = {k}")
    rows = []
    for name, betas in grid_spacings(*T_RANGE, GRID_SIZE).items():
        packed = compact_teacher_rows(teacher_rows, k, betas)
        ids = CompactLayout(k, GRID_SIZE).token_ids(packed)
        sweep = torch.linspace(float(betas[0]), float(betas[-1]), 100).tolist()
        errors = [float((tail_log_partition(packed, betas, b) - exact_tail(teacher_rows, ids, b)).abs().max())
                  for b in sweep]  # fmt: skip
        worst = max(range(len(sweep)), key=errors.__getitem__)
        rows.append([name, f"{errors[worst]:.1e}", f"{1 / sweep[worst]:.2f}", f"{statistics.median(errors):.1e}"])
    print_table(["spacing", "worst |error|", "at T", "median over T"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", help="a causal LM folder over the GPT-2 vocabulary (default: the own one)")
    parser.add_argument("--student", help="a causal LM folder over the GPT-2 vocabulary (default: the own one)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the benchmark's own models")
    parser.add_argument("--batches", type=int, default=4, help="held-out batches of 4 sequences (median over them)")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--grid-study", action="store_true", help="also compare grid spacings on these logits")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 training steps, 1 batch of 64 tokens")
    add_common_options(parser)
    args = parser.parse_args()
    apply_common_options(args)
    if args.quick:
        args.steps, args.batches, args.max_length = 2, 1, 64
    device = torch.device(args.device)
    from dts_llm.losses import inverse_temperature_grid

    tokenizer = gpt2_tokenizer()
    examples = encoded_records(tokenizer, args.max_length)
    train_examples = [{name: ids[:TRAIN_LENGTH] for name, ids in e.items()} for e in examples[:-HELD_OUT]]
    teacher, student, description = load_models(args, tokenizer, train_examples, device)
    betas = inverse_temperature_grid(*T_RANGE, GRID_SIZE)
    print_header(
        "top-k teacher accuracy: ours (exact normaliser) vs peers (renormalised top-k), forward KL x T^2",
        device,
        f"models: {description}; {args.batches} held-out Dolly batches of 4 (max length {args.max_length}); "
        f"grid {GRID_SIZE} points even in 1/T over T in {list(T_RANGE)}",
        "none (an accuracy report)",
    )
    per_batch, teacher_rows = [], []
    with torch.no_grad():
        for _, (input_ids, mask, labels) in zip(
            range(args.batches), batches(examples[-HELD_OUT:], 4, tokenizer.eos_token_id), strict=False
        ):
            input_ids, mask, labels = input_ids.to(device), mask.to(device), labels.to(device)
            teacher_logits = teacher(input_ids=input_ids, attention_mask=mask).logits.float()
            student_logits = student(input_ids=input_ids, attention_mask=mask).logits.float()
            with torch.enable_grad():
                per_batch.append(measure_batch(teacher_logits, student_logits, labels, betas))
            teacher_rows.append(scored_rows(teacher_logits, labels))
    rows = []
    for t in TEMPERATURES:
        for k in KS:
            med = {m: statistics.median(b[t, k][m] for b in per_batch) for m in per_batch[0][t, k]}
            hermite = max(b[t, k]["hermite"] for b in per_batch)
            rows.append([
                f"{t:g}", k, f"{med['tail_mass']:.3f}", f"{med['ours_err']:.1e}", f"{med['peers_err']:.1e}",
                f"{med['ours_cos']:.4f}", f"{med['peers_cos']:.4f}", f"{hermite:.1e}",
            ])  # fmt: skip
    print_table(
        ["T", "k", "tail mass", "rel err ours", "rel err peers", "grad cos ours", "grad cos peers", "Hermite max"],
        rows,
    )
    print(f"(medians over {len(per_batch)} batches; Hermite max: worst |error| of log Z_tail over every token)")
    print("\nbytes per response token (compact: float32 rows of top-k logits, ids, 8 tail values, 8 slopes)")
    print_table(
        ["kind", "bytes / token"],
        [[f"compact k={k}", 4 * 2 * (k + GRID_SIZE)] for k in KS] + [[f"exact, GPT-2 XL (hidden {XL_HIDDEN}, bf16)",
                                                                         2 * XL_HIDDEN]],
    )  # fmt: skip
    if args.grid_study:
        grid_study(torch.cat(teacher_rows)[:256], 32)
    print(json.dumps({"batches": len(per_batch)}))


if __name__ == "__main__":
    main()
