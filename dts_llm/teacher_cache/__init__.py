"""The offline teacher: run the teacher once, write what it predicts, distil from that at any temperature.

Two kinds of cache. ``exact``: the teacher's final hidden state at every response position and its
output head, so that training recomputes the teacher's logits with one matmul and the teacher's
distribution is exact at any T. ``compact``: the top-k logits with the exact log-partition of the other
tokens over a temperature range (``dts_llm.losses.TopKTeacher``), smaller, exact on the top k and one
tail bucket. Both keep the teacher's log-probability of each label, which DTS's cross-entropy reads.
"""

from .cached import CACHE_COLUMNS, COMPACT_REFUSED_POLICIES, CachedTeacher, cache_column, open_cached_teacher
from .fingerprints import data_fingerprint, recipe_provenance, tokenizer_fingerprint
from .head import TeacherHead
from .store import COMPACT, EXACT, TeacherCache
from .writer import CacheSettings, Processes, finished_cache, write_teacher_cache

__all__ = [
    "CACHE_COLUMNS",
    "COMPACT",
    "COMPACT_REFUSED_POLICIES",
    "EXACT",
    "CacheSettings",
    "CachedTeacher",
    "Processes",
    "TeacherCache",
    "TeacherHead",
    "cache_column",
    "data_fingerprint",
    "finished_cache",
    "open_cached_teacher",
    "recipe_provenance",
    "tokenizer_fingerprint",
    "write_teacher_cache",
]
