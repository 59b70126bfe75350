"""How the KD loss's forward+backward time and peak extra memory grow with sequence length and vocabulary.

    python benchmarks/scaling.py [--batch 2] [--lengths 128 256 512 1024 2048] [--vocabs 8192 ... 151936]
        [--plot scaling.png] [--quick]

Two sweeps of the ``kd_loss.py`` measurement (same loss, T=2, a quarter of each row prompt, fresh
worker process per method and sweep with the peak reset before each shape): sequence length at
V = 50257, and vocabulary at B x L = 2 x 1024 (as many positions as kd_loss.py's 4 x 512). For ours
the table splits the peak into the gradient buffer (the student logits' size: the gradient itself,
which no method avoids) and the rest, next to one fp32 chunk temporary (chunk rows x V x 4 bytes):
the rest stays a few chunk temporaries, O(chunk x V), while dense grows with B x L x V.
"""

from __future__ import annotations

import argparse

import torch
from _common import add_common_options, apply_common_options, mib, print_header, print_table, resolve_device
from kd_loss import DTYPES, PROMPT_FRACTION, TEMPERATURE, measure

SWEEP_VOCAB = 50257
SWEEP_LENGTH = 1024
METHODS = ("dense", "ours")


def sweep_rows(shapes, by_method, element_bytes):
    rows = []
    for shape, dense, ours in zip(shapes, by_method["dense"], by_method["ours"], strict=False):
        batch, length, vocab = shape
        grad_buffer = batch * length * vocab * element_bytes
        rows_per_chunk = ours["chunk_rows"]
        temporary = rows_per_chunk * vocab * 4
        rest = ours["memory_bytes"] - grad_buffer
        rows.append([
            length, vocab, f"{dense['time_s'] * 1e3:,.0f} ms", f"{ours['time_s'] * 1e3:,.0f} ms",
            f"{ours['time_s'] / dense['time_s']:.2f}x", mib(dense["memory_bytes"]), mib(ours["memory_bytes"]),
            f"{ours['memory_bytes'] / dense['memory_bytes']:.2f}x", mib(grad_buffer), mib(rest),
            f"{rows_per_chunk} ({mib(temporary)})", f"{rest / temporary:.1f}",
        ])  # fmt: skip
    return rows


def plot(path, sweeps):
    """Peak extra memory against the swept size, log-log, one panel per sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(sweeps), figsize=(5 * len(sweeps), 4))
    for ax, (name, (shapes, by_method)) in zip(axes, sweeps.items(), strict=False):
        x = [shape[1] if name == "length" else shape[2] for shape in shapes]
        for method, results in by_method.items():
            ax.plot(x, [r["memory_bytes"] / 2**20 for r in results], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="sequence length" if name == "length" else "vocabulary",
               ylabel="peak extra memory (MiB)", title=f"{name} sweep")  # fmt: skip
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"\nplot written to {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32000, 50257, 100277, 151936])
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    add_common_options(parser)
    parser.add_argument("--plot", help="also write a PNG of memory against length and vocabulary here")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: lengths 32 64 at V=1000, vocabs 500 1000 at L=64"
    )
    args = parser.parse_args()
    sweep_vocab, sweep_length = SWEEP_VOCAB, SWEEP_LENGTH
    if args.quick:
        args.lengths, args.vocabs, args.repeats, sweep_vocab, sweep_length = [32, 64], [500, 1000], 1, 1000, 64
    apply_common_options(args)
    args.chunk_size = 0  # the library default

    shapes = {
        "length": [(args.batch, length, sweep_vocab) for length in sorted(args.lengths)],
        "vocabulary": [(args.batch, sweep_length, vocab) for vocab in sorted(args.vocabs)],
    }
    sweeps = {name: (s, {method: measure(method, s, args) for method in METHODS}) for name, s in shapes.items()}

    print_header(
        f"KD loss scaling: T^2 KL(teacher || student) at T={TEMPERATURE:g}, forward + backward, "
        "dts_llm vs dense autograd",
        resolve_device(args.device),
        f"device={args.device} dtype={args.dtype} batch {args.batch}; "
        f"lengths {sorted(args.lengths)} at V={sweep_vocab}; "
        f"vocabularies {sorted(args.vocabs)} at L={sweep_length}; {PROMPT_FRACTION:.0%} prompt; time = median of "
        f"{args.repeats} after warm-up; memory = peak beyond the inputs, the student's .grad included",
        "ours' memory beyond the gradient buffer stays O(chunk x V): a few fp32 chunk temporaries at every size",
    )
    element_bytes = torch.empty((), dtype=DTYPES[args.dtype]).element_size()
    headers = [
        "L", "V", "time dense", "time ours", "ratio", "mem dense", "mem ours", "ratio",
        "ours: grad buffer", "ours: rest", "chunk rows (1 fp32 temporary)", "rest / temporary",
    ]  # fmt: skip
    for name, (sweep_shapes, by_method) in sweeps.items():
        print(f"\n{name} sweep")
        print_table(headers, sweep_rows(sweep_shapes, by_method, element_bytes))
    if args.plot:
        plot(args.plot, sweeps)


if __name__ == "__main__":
    main()
