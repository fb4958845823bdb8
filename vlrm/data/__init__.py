"""The data wing: reading files and the field's layouts into canonical rows, preparing and caching them.

``sources`` reads a file's raw rows by index; ``rows`` maps each onto the canonical row (``benchmarks``: the
benchmarks' own layouts and protocols); ``images`` checks and converts images; ``prepare`` runs all of it once per
data set into a cached, memory-mapped Arrow set; ``synthetic`` writes the demo's image preference set.
"""

from vlrm.data.benchmarks import BENCHMARKS, REFERENCE_RESULTS, benchmark_of
from vlrm.data.images import resolve_image, to_rgb
from vlrm.data.prepare import (
    LENGTH_COLUMNS,
    DataSettings,
    SourceReport,
    load_preference_dataset,
    pair_lengths,
    prepare_mixture,
    prepare_training_data,
)
from vlrm.data.rows import CANONICAL_FEATURES, images_key, map_row, user_prompt
from vlrm.data.sources import RawRows
from vlrm.data.synthetic import make_synthetic_dataset

__all__ = [
    "BENCHMARKS", "CANONICAL_FEATURES", "DataSettings", "LENGTH_COLUMNS", "REFERENCE_RESULTS", "RawRows",
    "SourceReport", "benchmark_of", "images_key", "load_preference_dataset", "make_synthetic_dataset", "map_row",
    "pair_lengths", "prepare_mixture", "prepare_training_data", "resolve_image", "to_rgb", "user_prompt",
]  # fmt: skip
