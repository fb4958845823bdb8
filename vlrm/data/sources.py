"""Reading preference data files: one source's raw rows by index, streamed in bounded memory (nothing here decodes an
image). ``vlrm.data.rows`` maps each raw row onto the canonical row; ``vlrm.data.prepare`` runs both over a whole
source once and caches the result.

Accepted sources: .json (a list of rows), .jsonl, .parquet, directories written by ``datasets.save_to_disk``, and
hub datasets (loaded by ``vlrm.data.prepare``).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq

from vlrm.errors import RowProblem


class RawRows:
    """The raw rows of one source, read by index in a bounded amount of memory: a .jsonl file (line offsets), a
    .json list, a .parquet file (streamed in small batches) or an Arrow dataset (a ``save_to_disk`` dir, or a hub
    dataset loaded by ``vlrm.prepare``). Picklable, so the workers of a parallel preparation each read their share.

    ``num_rows`` counts rows; ``identity()`` is what the prepared cache is keyed on; ``read(indices)`` yields
    ``(index, row)`` for the given sorted row indices."""

    def __init__(self, source: str, path: Path | None = None, dataset: datasets.Dataset | None = None):
        self.source, self.path, self.dataset = source, path, dataset
        self.base_dir = None if path is None else (path if path.is_dir() else path.parent)
        self.kind = "arrow" if dataset is not None else _file_kind(path)
        self._offsets: np.ndarray | None = None

    @classmethod
    def from_dataset(cls, source: str, dataset: datasets.Dataset) -> RawRows:
        return cls(source, dataset=_undecoded(dataset))

    @property
    def stem(self) -> str:
        """The prefix of derived row ids (``<stem>-<row>``) and of the prepared cache's dir name."""
        return self.path.stem if self.path is not None else self.source.split(":")[0].split("/")[-1]

    @classmethod
    def open(cls, path: str | Path) -> RawRows:
        path = Path(path)
        if path.is_dir():
            return cls(str(path), path, _undecoded(_load_from_disk(path)))
        if not path.is_file():
            raise FileNotFoundError(f"preference data not found: {path}")
        return cls(str(path), path)

    @property
    def num_rows(self) -> int:
        if self.kind == "arrow":
            return len(self.dataset)
        if self.kind == "parquet":
            return pq.ParquetFile(self.path).metadata.num_rows
        if self.kind == "json":
            return len(self._json_list())
        return len(self._line_offsets())

    def identity(self) -> dict[str, Any]:
        if self.kind == "arrow" and self.path is None:  # a hub dataset: its fingerprint names its files
            return {"source": self.source, "fingerprint": self.dataset._fingerprint}
        files = sorted(p for p in self.path.rglob("*") if p.is_file()) if self.path.is_dir() else [self.path]
        return {"source": str(self.path.resolve()), "files": [_file_identity(file) for file in files]}

    def read(self, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
        if self.kind == "arrow":
            for index in indices:
                yield int(index), _drop_nan(self.dataset[int(index)])
        elif self.kind == "json":
            rows = self._json_list()
            for index in indices:
                yield int(index), rows[index]
        elif self.kind == "parquet":
            yield from self._read_parquet(indices)
        else:
            offsets = self._line_offsets()
            with open(self.path, "rb") as file:
                for index in indices:
                    file.seek(offsets[index])
                    line = file.readline()
                    try:
                        yield int(index), json.loads(line)
                    except ValueError as error:
                        yield int(index), RowProblem("row", f"not valid JSON: {error}")

    def _line_offsets(self) -> np.ndarray:
        """Byte offset of every non-blank line (one pass over the file, kept as one int64 per row)."""
        if self._offsets is None:
            offsets, position = [], 0
            with open(self.path, "rb") as file:
                for line in file:
                    if line.strip():
                        offsets.append(position)
                    position += len(line)
            self._offsets = np.asarray(offsets, dtype=np.int64)
        return self._offsets

    def _json_list(self) -> list:
        # A .json file is one document: it is parsed whole (in each worker). Large sets belong in .jsonl or .parquet.
        try:
            rows = json.loads(self.path.read_bytes())
        except ValueError as error:
            raise ValueError(f"{self.path}: not valid JSON: {error}") from error
        if not isinstance(rows, list):
            raise ValueError(
                f"{self.path}: expected a list of rows, got {type(rows).__name__} (use .jsonl for one row a line)"
            )
        return rows

    def _read_parquet(self, indices: np.ndarray) -> Iterator[tuple[int, Any]]:
        # Buffered column reads and small batches: memory stays bounded however large the row group is.
        parquet = pq.ParquetFile(self.path, buffer_size=1 << 20, pre_buffer=False)
        group_starts = np.cumsum([0] + [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)])
        groups = sorted(set(np.searchsorted(group_starts, indices, side="right") - 1))
        wanted = iter(indices.tolist())
        target = next(wanted, None)
        for group in groups:
            position = int(group_starts[group])
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[group]):
                end = position + batch.num_rows
                here = []
                while target is not None and target < end:
                    here.append(target)
                    target = next(wanted, None)
                if here:
                    taken = batch.take([index - position for index in here]).to_pylist()
                    yield from ((index, _drop_nan(row)) for index, row in zip(here, taken, strict=True))
                position = end
                if target is None or target >= group_starts[group + 1]:
                    break


PARQUET_BATCH_ROWS = 64


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_json_lines(path)):
        return "jsonl"
    if suffix in (".json", ".parquet"):
        return suffix[1:]
    raise ValueError(
        f"{path}: unsupported data file type `{suffix}` (use .json, .jsonl, .parquet or a save_to_disk dir)"
    )


def _file_identity(path: Path) -> list:
    """(path, size, mtime) and a hash of the content: all of it for files up to 64 MiB, else its first and last
    MiB, so that a file rewritten within one mtime tick is still told apart while a large one is not read whole."""
    stat = path.stat()
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if stat.st_size <= 64 << 20:
            digest.update(file.read())
        else:
            digest.update(file.read(1 << 20))
            file.seek(-(1 << 20), io.SEEK_END)
            digest.update(file.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def _load_from_disk(path: Path) -> datasets.Dataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path}: a DatasetDict with splits {list(loaded)}; point at one split's directory")
        loaded = loaded["train"]
    return loaded


def _undecoded(dataset: datasets.Dataset) -> datasets.Dataset:
    """Image columns cast to undecoded ``{"bytes", "path"}``: images are checked and decoded by us, once."""
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(name, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(
            getattr(feature, "feature", None), datasets.Image
        ):
            dataset = dataset.cast_column(name, datasets.List(datasets.Image(decode=False)))
    return dataset


def _looks_like_json_lines(path: Path) -> bool:
    with open(path, "rb") as file:
        head = file.read(64).lstrip()
    return head[:1] == b"{"


LAYOUT_MARKERS = ("video",)  # columns whose presence, even null, identifies a layout (MM-RLHF-RewardBench)


def _drop_nan(row: dict[str, Any]) -> dict[str, Any]:
    """pandas fills a field missing from some rows with NaN (and parquet with null); treat it as absent, except for
    the columns that mark a benchmark's layout."""
    return {
        key: value
        for key, value in row.items()
        if key in LAYOUT_MARKERS or (value is not None and not (isinstance(value, float) and math.isnan(value)))
    }
