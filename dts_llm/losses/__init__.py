"""Token-level losses between causal-LM logits, computed in fp32 chunks with a fused gradient.

Every loss here looks only at positions that predict a response token: logits at position i are
scored against ``labels[:, i + 1]`` and positions whose label is ``-100`` (prompt, padding) are
skipped before any work is done (``rows``). Rows are processed ``chunk_size`` at a time (by default
in at most 16 chunks of at least 16 MiB per fp32 temporary) in fp32 whatever the model dtype, and
the gradient with respect to the student logits is written during the forward pass from its closed
form (``chunks``, ``kernels``, ``divergences``). So beyond the two logits tensors a loss holds one
gradient buffer the size of the student logits (the unavoidable floor) plus O(chunk_size x vocab)
temporaries, instead of the several B x L x V copies that autograd through ``log_softmax`` keeps
alive.

A temperature may be a float or a tensor (one value, or one per response token); a tensor that
requires grad (CTKD's learnt temperature) gets its exact derivative from the same pass.

A teacher may also be compact (``TopKTeacher``: its top-k logits and an exact normaliser for every
T of a range, ``compact``); the divergence then runs over its top-k tokens and one tail bucket (``topk``).

All divergences are multiplied by T^2 (Hinton et al.) so that their gradient scale does not shrink
as the temperature grows, and are normalised by the number of response tokens, or by
``num_items_in_batch`` when the Trainer passes it, so that gradient accumulation matches one large
batch.
"""

from .chunks import default_chunk_size
from .compact import CompactLayout, compact_teacher_rows, inverse_temperature_grid, tail_log_partition
from .divergences import DIVERGENCES, divergence_terms
from .objectives import (
    TOKEN_FEATURES,
    DistillationTerms,
    annealing_objective,
    causal_lm_cross_entropy,
    distillation_loss,
    distillation_objective,
    regression_objective,
    tempered_entropies,
    token_cross_entropies,
    token_features,
)
from .rows import IGNORE_INDEX, check_kd_ratio, response_rows
from .topk import TopKTeacher

__all__ = [
    "DIVERGENCES",
    "IGNORE_INDEX",
    "TOKEN_FEATURES",
    "CompactLayout",
    "DistillationTerms",
    "TopKTeacher",
    "annealing_objective",
    "causal_lm_cross_entropy",
    "check_kd_ratio",
    "compact_teacher_rows",
    "default_chunk_size",
    "distillation_loss",
    "distillation_objective",
    "divergence_terms",
    "inverse_temperature_grid",
    "regression_objective",
    "response_rows",
    "tail_log_partition",
    "tempered_entropies",
    "token_cross_entropies",
    "token_features",
]
