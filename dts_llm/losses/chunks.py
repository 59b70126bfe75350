"""The chunk engine: scored rows read in fp32 chunks, a kernel's values summed, its gradient written once.

A kernel (one per objective) says what it reads (``Reads``) and turns one ``Chunk`` into
``TokenTerms``; everything else (finding the rows, copying them, buffers, the reduction, attaching
the gradients to the loss) happens here, the same for every objective.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

MIN_CHUNK_ELEMENTS = 1 << 22  # fp32 values in one temporary: 16 MiB
MAX_CHUNK_ELEMENTS = 1 << 24  # 64 MiB
MAX_CHUNKS = 16


def default_chunk_size(num_rows: int, vocab_size: int) -> int:
    """Rows per chunk: 16 chunks, with each fp32 temporary kept between 16 and 64 MiB.

    Few iterations keep Python off the critical path on a GPU; the bounds keep the temporaries
    small next to the logits for short batches and bounded for long ones.
    """
    rows = min(math.ceil(num_rows / MAX_CHUNKS), MAX_CHUNK_ELEMENTS // vocab_size)
    return max(1, MIN_CHUNK_ELEMENTS // vocab_size, rows)


class Reads(enum.Enum):
    """What a kernel's rows hold: a kernel that scores log-probabilities gets them from one in-place
    log-softmax per chunk; one that needs the raw logits (an MSE between them) gets those."""

    LOGITS = "logits"
    LOG_PROBS = "log-probabilities at T = 1"


class TokenTerms(NamedTuple):
    """Per-row loss values, the gradient with respect to the logits when asked for, optionally
    the per-row components (columns) the loss is made of, reported but not differentiated, and
    the per-row derivative with respect to the temperature when it is learnt (CTKD)."""

    value: Tensor
    grad: Tensor | None
    parts: Tensor | None = None
    temperature_grad: Tensor | None = None


class Chunk(NamedTuple):
    """One chunk of scored rows as a kernel gets them: fp32 rows cut to the vocabulary (the kernel
    may overwrite them), in what the kernel ``reads``, with their targets and temperature (a float,
    a 0-dim tensor or a ``[rows, 1]`` column), and which gradients to compute."""

    student: Tensor
    teacher: Tensor | None
    targets: Tensor
    temperature: Tensor | float | None
    need_grad: bool
    need_temperature_grad: bool


class Kernel(Protocol):
    """What an objective computes per chunk: values and the gradient w.r.t. the student logits."""

    reads: Reads

    def __call__(self, chunk: Chunk) -> TokenTerms: ...


class Reader(Protocol):
    """Where chunks of scored rows come from (``ChunkReader``: logits; ``fused.HeadReader``: hidden
    states through an output head) and where their gradient goes."""

    def read(self, reads: Reads) -> Iterator[tuple[int, int, list, Tensor, Tensor | None]]: ...

    def gradient_sink(self) -> GradientSink: ...


def _log_softmax_(rows: Tensor) -> Tensor:
    """log_softmax over the last dimension, in place (no chunk-sized temporary)."""
    return torch.log_softmax(rows, -1, out=rows)


def _row_runs(rows: Tensor) -> list[tuple[int, int]]:
    """Sorted flat row indices as maximal runs of consecutive rows, ``[(first, stop), ...]``.

    A causal LM's response positions form one or a few runs per sequence, so chunks are copied run
    by run (a slice and ``copy_``) instead of gathered index by index into a fresh tensor.
    """
    if rows.numel() == 0:
        return []
    breaks = ((rows[1:] != rows[:-1] + 1).nonzero(as_tuple=True)[0] + 1).tolist()
    starts, stops = [0, *breaks], [*breaks, rows.numel()]
    firsts = rows[starts].tolist()
    return [(first, first + stop - start) for first, start, stop in zip(firsts, starts, stops, strict=False)]


def _chunks(runs: list[tuple[int, int]], chunk_size: int):
    """Consecutive chunks of ``chunk_size`` scored rows: ``(start, stop, pieces)``, with ``start:stop``
    the chunk's place in scored order and ``pieces`` the ``(offset in the chunk, first, stop)`` flat
    row ranges it covers."""
    start, filled, pieces = 0, 0, []
    for first, stop in runs:
        while first < stop:
            take = min(stop - first, chunk_size - filled)
            pieces.append((filled, first, first + take))
            filled, first = filled + take, first + take
            if filled == chunk_size:
                yield start, start + filled, pieces
                start, filled, pieces = start + filled, 0, []
    if filled:
        yield start, start + filled, pieces


def _copy_rows(flat: Tensor, pieces, buffer: Tensor, width: int) -> Tensor:
    """The chunk's rows of ``flat``, cut to ``width`` (the vocabulary), copied into ``buffer`` (fp32, reused
    across chunks: on the CPU a fresh chunk-sized tensor costs as much again as the pass filling it)."""
    for offset, first, stop in pieces:
        buffer[offset : offset + stop - first].copy_(flat[first:stop, :width])
    return buffer[: pieces[-1][0] + pieces[-1][2] - pieces[-1][1]]


def _write_rows(grad: Tensor, pieces, row_grad: Tensor, scale: Tensor | float) -> None:
    """Scale the chunk's gradient rows into their places in ``grad`` (one pass, no temporary)."""
    vocab_size = row_grad.size(-1)
    for offset, first, stop in pieces:
        torch.mul(row_grad[offset : offset + stop - first], scale, out=grad[first:stop, :vocab_size])


class ChunkReader:
    """The scored rows of the student's (and the teacher's) logits, chunk by chunk, as fp32 rows
    cut to the vocabulary in two buffers reused for every chunk.

    A ``packed_teacher`` (a compact teacher's rows, not logits) is copied at its own width and
    handed over as it is: no vocabulary cut, no log-softmax.
    """

    @torch.no_grad()
    def __init__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        rows: Tensor,
        vocab_size: int,
        chunk_size: int,
        packed_teacher: bool = False,
    ):
        self.student_shape = student_logits.shape
        self.student_flat = student_logits.reshape(-1, student_logits.size(-1))
        self.teacher_flat = None if teacher_logits is None else teacher_logits.reshape(-1, teacher_logits.size(-1))
        self.runs = _row_runs(rows)
        self.vocab_size, self.chunk_size, self.packed_teacher = vocab_size, chunk_size, packed_teacher
        self.teacher_width = self.teacher_flat.size(-1) if packed_teacher else vocab_size
        buffer_rows = min(chunk_size, rows.numel())
        self.student_buffer = self.student_flat.new_empty((buffer_rows, vocab_size), dtype=torch.float32)
        self.teacher_buffer = (
            None
            if self.teacher_flat is None
            else self.teacher_flat.new_empty((buffer_rows, self.teacher_width), dtype=torch.float32)
        )

    def read(self, reads: Reads) -> Iterator[tuple[int, int, list, Tensor, Tensor | None]]:
        """``(start, stop, pieces, student_rows, teacher_rows)`` per chunk (see ``_chunks``), the rows
        as ``reads`` says: logits, or log-probabilities at T = 1 computed in place in their buffer."""
        for start, stop, pieces in _chunks(self.runs, self.chunk_size):
            student_rows = _copy_rows(self.student_flat, pieces, self.student_buffer, self.vocab_size)
            teacher_rows = (
                None
                if self.teacher_flat is None
                else _copy_rows(self.teacher_flat, pieces, self.teacher_buffer, self.teacher_width)
            )
            if reads is Reads.LOG_PROBS:
                student_rows = _log_softmax_(student_rows)
                if teacher_rows is not None and not self.packed_teacher:
                    teacher_rows = _log_softmax_(teacher_rows)
            yield start, stop, pieces, student_rows, teacher_rows

    def gradient_buffer(self, dtype: torch.dtype) -> Tensor:
        """An uninitialised gradient the size of the student's logits with zeros wherever no scored
        row is written (unscored rows, columns beyond the vocabulary): each page is then written once."""
        grad = torch.empty(self.student_flat.shape, dtype=dtype, device=self.student_flat.device)
        done = 0
        for first, stop in self.runs:
            grad[done:first].zero_()
            done = stop
        grad[done:].zero_()
        if self.student_flat.size(-1) > self.vocab_size:
            grad[:, self.vocab_size :].zero_()
        return grad

    def gradient_sink(self) -> LogitsGradient:
        return LogitsGradient(self)


class GradientSink(Protocol):
    """Where a chunk's gradient w.r.t. its student logits goes, scaled; ``result`` gives the gradients
    of the inputs the reader read from, in their order."""

    def add(self, start: int, stop: int, pieces: list, row_grad: Tensor, scale: Tensor | float) -> None: ...

    def result(self) -> tuple[Tensor | None, ...]: ...


class LogitsGradient:
    """The gradient w.r.t. the student's logits, written row by row into one buffer their size.

    fp16 cannot hold small unscaled gradients (its smallest normal is 6e-5): they are kept in fp32
    until backward applies the upstream (loss-scaled) gradient.
    """

    def __init__(self, reader: ChunkReader):
        dtype = reader.student_flat.dtype
        self.grad = reader.gradient_buffer(torch.float32 if dtype == torch.float16 else dtype)
        self.shape = reader.student_shape

    def add(self, start: int, stop: int, pieces: list, row_grad: Tensor, scale: Tensor | float) -> None:
        _write_rows(self.grad, pieces, row_grad, scale)

    def result(self) -> tuple[Tensor]:
        return (self.grad.view(self.shape),)


def _chunk_temperature(temperature: Tensor | float | None, start: int, stop: int) -> Tensor | float | None:
    """The temperature of rows ``start:stop``: a scalar as it is, a per-row temperature as a column."""
    if torch.is_tensor(temperature):
        temperature = temperature.detach()
        return temperature[start:stop, None] if temperature.dim() == 1 else temperature
    return temperature


class Sums(NamedTuple):
    """A chunked pass's results, scaled: the total, its summed parts, and the gradients of the total
    w.r.t. what the reader read from (``GradientSink.result``) and the temperature (summed for a
    scalar one, per row otherwise)."""

    total: Tensor
    parts: Tensor
    grads: tuple[Tensor | None, ...] | None
    temperature_grad: Tensor | None


@torch.no_grad()
def _sum_rows(
    kernel: Kernel,
    reader: ChunkReader | Reader,
    targets: Tensor,
    temperature: Tensor | float | None,
    *,
    scale: Tensor | float,
    need_grad: bool,
    need_temperature_grad: bool,
) -> Sums:
    """Sum over the scored rows of ``kernel``'s terms and its gradients, chunk by chunk, times ``scale``.

    The gradient is scaled as the reader's sink takes it; nothing a chunk allocates outlives it.
    """
    sink = reader.gradient_sink() if need_grad else None
    device = targets.device
    temperature_grad = (
        torch.zeros(targets.numel(), dtype=torch.float64, device=device) if need_temperature_grad else None
    )
    total = torch.zeros((), dtype=torch.float32, device=device)
    parts = None
    for start, stop, pieces, student_rows, teacher_rows in reader.read(kernel.reads):
        chunk_temperature = _chunk_temperature(temperature, start, stop)
        terms = kernel(
            Chunk(student_rows, teacher_rows, targets[start:stop], chunk_temperature, need_grad, need_temperature_grad)
        )
        total += terms.value.sum().float()
        if terms.parts is not None:
            parts = terms.parts.sum(0) if parts is None else parts + terms.parts.sum(0)
        if sink is not None:
            sink.add(start, stop, pieces, terms.grad, scale)
        if need_temperature_grad:
            temperature_grad[start:stop] = terms.temperature_grad
        del terms
    if need_temperature_grad:
        temperature_grad = temperature_grad * scale
        temperature_grad = temperature_grad.sum() if temperature.dim() == 0 else temperature_grad
    parts = torch.zeros((0,), device=total.device) if parts is None else parts * scale
    return Sums(total * scale, parts, None if sink is None else sink.result(), temperature_grad)


class _AttachGradients(torch.autograd.Function):
    """A loss whose gradients were computed with its value: backward only scales them.

    ``apply(total, grads, *inputs)``: ``grads[i]`` is the gradient of ``total`` w.r.t. ``inputs[i]``
    (None for an input that gets none). (The chunk loop runs outside the Function because
    forward-mode AD, which gives the temperature's gradient, does not run inside an
    ``autograd.Function``'s forward.)
    """

    @staticmethod
    def forward(ctx, total, grads, *inputs):
        ctx.grads = grads
        ctx.dtypes = [x.dtype if torch.is_tensor(x) else None for x in inputs]
        return total.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.grads is None:
            raise RuntimeError("dts_llm losses support a single backward pass per forward")
        grads, ctx.grads = ctx.grads, None
        scaled = (None if g is None else g.mul_(grad_output).to(d) for g, d in zip(grads, ctx.dtypes, strict=True))
        return None, None, *scaled


def _scale(reduction: str, num_tokens: int, num_items_in_batch: Tensor | int | None) -> Tensor | float:
    """1 for a sum, else 1 / (tokens to average over), never 1 / 0: an empty batch gives 0, not NaN."""
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if num_items_in_batch is None:
        return 1.0 / max(num_tokens, 1)
    if torch.is_tensor(num_items_in_batch):
        return 1.0 / num_items_in_batch.float().clamp_min(1.0)
    return 1.0 / max(num_items_in_batch, 1)


def read_loss(
    kernel: Kernel,
    reader: ChunkReader | Reader,
    inputs: tuple[Tensor | None, ...],
    targets: Tensor,
    *,
    temperature: Tensor | float | None,
    scale: Tensor | float,
) -> tuple[Tensor, Tensor]:
    """``kernel`` summed over the rows ``reader`` gives, times ``scale``: (loss, parts).

    ``inputs`` are what the reader reads the student's rows from, in the order of its sink's
    gradients; the loss carries those gradients and a learnt temperature's.
    """
    need_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
    learnt = (
        temperature if torch.is_tensor(temperature) and temperature.requires_grad and torch.is_grad_enabled() else None
    )
    sums = _sum_rows(
        kernel,
        reader,
        targets,
        temperature,
        scale=scale,
        need_grad=need_grad,
        need_temperature_grad=learnt is not None,
    )
    total = sums.total
    if need_grad or learnt is not None:
        grads = sums.grads or (None,) * len(inputs)
        total = _AttachGradients.apply(total, (*grads, sums.temperature_grad), *inputs, learnt)
    return total, sums.parts


def chunked_loss(
    kernel: Kernel,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    rows: Tensor,
    targets: Tensor,
    *,
    temperature: Tensor | float | None = None,
    reduction: str,
    num_items_in_batch: Tensor | int | None,
    vocab_size: int,
    chunk_size: int | None,
    packed_teacher: bool = False,
) -> tuple[Tensor, Tensor]:
    """``kernel`` summed over ``rows`` chunk by chunk, scaled by the reduction: (loss, parts).

    The loss carries the gradients of the student logits and of a temperature that requires one.
    ``packed_teacher``: the teacher's rows reach the kernel as stored (see ``ChunkReader``).
    """
    scale = _scale(reduction, rows.numel(), num_items_in_batch)
    chunk_size = chunk_size or default_chunk_size(rows.numel(), vocab_size)
    teacher_logits = None if teacher_logits is None else teacher_logits.detach()
    reader = ChunkReader(student_logits, teacher_logits, rows, vocab_size, chunk_size, packed_teacher)
    return read_loss(kernel, reader, (student_logits,), targets, temperature=temperature, scale=scale)
