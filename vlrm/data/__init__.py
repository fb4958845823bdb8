"""The data wing: reading files and the field's layouts into canonical rows, preparing and caching them.

``sources`` reads a file's raw rows by index; ``rows`` maps each onto the canonical row (``benchmarks``: the
benchmarks' own layouts and protocols); ``images`` checks and converts images; ``prepare`` runs all of it once per
data set into a cached, memory-mapped Arrow set; ``synthetic`` writes the demo's image preference set.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

# public name -> the module that defines it; each loads on first use (vlrm.lazy)
_PUBLIC = {
    "BENCHMARKS": "vlrm.data.benchmarks",
    "REFERENCE_RESULTS": "vlrm.data.benchmarks",
    "benchmark_of": "vlrm.data.benchmarks",
    "resolve_image": "vlrm.data.images",
    "to_rgb": "vlrm.data.images",
    "CANONICAL_FEATURES": "vlrm.data.prepare",
    "DataSettings": "vlrm.data.prepare",
    "SourceReport": "vlrm.data.prepare",
    "load_preference_dataset": "vlrm.data.prepare",
    "pair_lengths": "vlrm.data.prepare",
    "prepare_mixture": "vlrm.data.prepare",
    "prepare_training_data": "vlrm.data.prepare",
    "LENGTH_COLUMNS": "vlrm.data.rows",
    "images_key": "vlrm.data.rows",
    "map_row": "vlrm.data.rows",
    "user_prompt": "vlrm.data.rows",
    "RawRows": "vlrm.data.sources",
    "make_synthetic_dataset": "vlrm.data.synthetic",
}

__all__ = [
    "BENCHMARKS", "CANONICAL_FEATURES", "DataSettings", "LENGTH_COLUMNS", "REFERENCE_RESULTS", "RawRows",
    "SourceReport", "benchmark_of", "images_key", "load_preference_dataset", "make_synthetic_dataset", "map_row",
    "pair_lengths", "prepare_mixture", "prepare_training_data", "resolve_image", "to_rgb", "user_prompt",
]  # fmt: skip
__getattr__, __dir__ = public_names(__name__, _PUBLIC)

if TYPE_CHECKING:  # what editors and type checkers see
    from vlrm.data.benchmarks import BENCHMARKS, REFERENCE_RESULTS, benchmark_of
    from vlrm.data.images import resolve_image, to_rgb
    from vlrm.data.prepare import (
        CANONICAL_FEATURES,
        DataSettings,
        SourceReport,
        load_preference_dataset,
        pair_lengths,
        prepare_mixture,
        prepare_training_data,
    )
    from vlrm.data.rows import LENGTH_COLUMNS, images_key, map_row, user_prompt
    from vlrm.data.sources import RawRows
    from vlrm.data.synthetic import make_synthetic_dataset
