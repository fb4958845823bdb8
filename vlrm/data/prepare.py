"""Preparing preference data once: canonical rows with their token lengths in a memory-mapped Arrow set on disk,
cached under a key of everything that changes it, and reused by every later run and every rank.

    python -m vlrm prepare training_configs/7b_config.yaml        # prepare ahead (the same cache train_rm.py reads)

    from vlrm.data.prepare import DataSettings, prepare_mixture
    dataset, reports = prepare_mixture(["a.parquet", "b.jsonl"], DataSettings(max_seq_length=4096), encoder,
                                       weights=[1.0, 2.0])

One preparation of one source, in ``num_proc`` processes (``datasets.Dataset.from_generator``, one shard each): read
the drawn rows (streamed, see ``vlrm.data.sources.RawRows``), map each onto the canonical row, decode every image once
to check it (it stays encoded, bytes or path: images are decoded again only in the collator, which may run in
DataLoader workers), decode and sample every video once (``vlrm.data.videos``: its sampled frames are stored in the
row, PNG-encoded, so no epoch and no rank decodes a video again), count its tokens (prompt with visual tokens, chosen, rejected), and leave out bad rows (an error
naming file, row and field, or a counted skip) and pairs longer than ``max_seq_length`` (counted, never truncated). The
rows are written in batches of ``WRITER_BATCH_ROWS``, so no process holds more than a few batches of images: memory
does not grow with the data set.

The cache. ``cache_dir/<source name>-<key>/`` holds the Arrow files and ``vlrm_prepared.json`` (the report). The key
hashes the source's identity (each file's path, size, mtime and content hash; a hub dataset's fingerprint), the
processor (tokenizer, chat template, image processor with its pixel limits, video processor and the ``video_*``
sampling settings), ``on_bad_sample``, ``max_seq_length``
and the drawn rows (so the sample limits, weights and seed). Image files named by path are not part of it: after
editing images in place, delete the cache dir. A build goes to a temporary dir renamed into place when complete,
under a file lock: a crashed build leaves nothing that looks finished, and two processes (say, the first rank of two
nodes over a shared cache dir) never build the same set at once; the second waits, then loads it.

Drawing rows, before anything is decoded: a source contributes all its rows once (the default), or ``target`` rows
drawn with the seed: fewer than it has, a seeded subset (topped up from the same seeded order when rows were left
out); more, every row ``target // n`` times and a seeded subset once more. A mixture's per-source targets come from
``weights`` (rows x weight) or ``num_samples``; ``max_samples`` scales the whole mixture down, keeping proportions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from filelock import FileLock

from vlrm.data.images import resolve_image
from vlrm.data.rankings import responses_of
from vlrm.data.rows import LENGTH_COLUMNS, images_key, map_row
from vlrm.data.sources import RawRows
from vlrm.data.videos import sample_video, stored_video
from vlrm.errors import BadSampleError, RowProblem, UnsupportedRow

logger = logging.getLogger(__name__)

PREPARE_VERSION = 5  # bump when a prepared row changes meaning: every cache entry is rebuilt (5: video benchmarks)
WRITER_BATCH_ROWS = 64  # rows buffered per Arrow write: bounds each worker's memory whatever the image sizes
AUTO_PARALLEL_ROWS = 2000  # below this many rows, starting worker processes costs more than it saves
MAX_REASONS = 20  # bad and over-long rows listed by name in a report (all are counted)
REPORT_FILE = "vlrm_prepared.json"
DATA_SUFFIXES = (".json", ".jsonl", ".parquet")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")

# A sampled video (vlrm.data.videos.sample_video): its frames stored once, as the processor will receive them.
VIDEO_FEATURE = {
    "frames": datasets.List(datasets.Image()),
    "fps": datasets.Value("float32"),
    "frames_indices": datasets.List(datasets.Value("int32")),
    "total_num_frames": datasets.Value("int32"),
    "key": datasets.Value("string"),
}

# Arrow schema of a canonical row. Message content is always a list of parts so that every row has the same type.
CANONICAL_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "prompt": datasets.List(
            {
                "role": datasets.Value("string"),
                "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
            }
        ),
        "images": datasets.List(datasets.Image()),
        "videos": datasets.List(VIDEO_FEATURE),
        "chosen": datasets.Value("string"),
        "rejected": datasets.Value("string"),
        "margin": datasets.Value("float32"),
        "category": datasets.Value("string"),
        "group": datasets.Value("string"),  # pairs judged together (MM-RLHF's Acc+), else null
        "preferred_position": datasets.Value("int8"),  # where the preferred answer stood in the source row, if known
        "benchmark": datasets.Value("string"),  # the benchmark layout it was read as (vlrm.data.benchmarks), or null
        # Rows of N responses (vlrm.data.rankings); null for a pair, whose chosen / rejected say it all.
        "responses": datasets.List(datasets.Value("string")),
        "ranks": datasets.List(datasets.Value("float32")),  # lower is better; equal ranks tie
        "scores": datasets.List(datasets.Value("float32")),
        "ratings": datasets.List(datasets.List(datasets.Value("float32"))),  # [N][A]; NaN: not rated
        "rating_names": datasets.List(datasets.Value("string")),
        "tie": datasets.Value("bool"),  # a pair whose two responses are equally good
        # Process rows (vlrm.data.steps): each solution's steps and one label per step (NaN: neutral); else null.
        "steps": datasets.List(datasets.List(datasets.Value("string"))),
        "step_labels": datasets.List(datasets.List(datasets.Value("float32"))),
    }
)

# A prepared row: the canonical row plus where it came from, what the irrelevant-query sampler compares, and its
# token lengths (null when prepared without a processor).
PREPARED_FEATURES = datasets.Features(
    {
        **CANONICAL_FEATURES,
        "source": datasets.Value("string"),
        "images_key": datasets.Value("string"),
        "prompt_length": datasets.Value("int32"),
        "chosen_length": datasets.Value("int32"),
        "rejected_length": datasets.Value("int32"),
        "response_lengths": datasets.List(datasets.Value("int32")),  # a row of N responses: each one's tokens
    }
)


def peak_memory_gb() -> float:
    """This process's peak resident memory: VmHWM where Linux has it (ru_maxrss carries a parent's peak over
    across fork and exec), else ru_maxrss."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 2**20
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def default_cache_dir() -> Path:
    return Path(os.environ.get("VLRM_CACHE_DIR") or Path.home() / ".cache" / "vlrm") / "prepared"


@dataclass(frozen=True)
class DataSettings:
    """How sources are prepared (the config keys of the same names; see ``vlrm.train.config``)."""

    on_bad_sample: str = "error"
    max_seq_length: int | None = None
    seed: int = 0
    num_proc: int | None = None
    cache_dir: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    benchmark: str | None = (
        None  # a benchmark layout for every row (vlrm.data.benchmarks); None: each row's fields tell
    )


@dataclass
class SourceReport:
    """What preparing one source kept and left out, for the log."""

    source: str
    rows_read: int = 0  # rows in the source
    rows_drawn: int = 0  # rows drawn from it (repeats counted)
    rows_kept: int = 0
    num_skipped: int = 0
    skipped: list[str] = field(default_factory=list)  # the first MAX_REASONS
    num_overlong: int = 0
    overlong: list[str] = field(default_factory=list)
    num_unsupported: int = 0  # benchmark rows vlrm cannot score (UnsupportedRow; no layout raises it today)
    unsupported: list[str] = field(default_factory=list)
    max_seq_length: int | None = None
    cache_hits: int = 0
    builds: int = 0
    cache_paths: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, other: SourceReport) -> None:
        """Fold in the report of a top-up build of the same source."""
        for name in ("rows_drawn", "rows_kept", "num_skipped", "num_overlong", "num_unsupported", "cache_hits",
                     "builds", "seconds"):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("skipped", "overlong", "unsupported"):
            setattr(self, name, (getattr(self, name) + getattr(other, name))[:MAX_REASONS])
        self.cache_paths += other.cache_paths

    def summary(self) -> str:
        drawn = f" ({self.rows_drawn} drawn)" if self.rows_drawn != self.rows_read else ""
        text = f"{self.source}: {self.rows_kept} of {self.rows_read} pairs kept{drawn}"
        if self.num_skipped:
            text += f", {self.num_skipped} bad rows skipped (first: {'; '.join(self.skipped[:3])})"
        if self.num_overlong:
            text += (
                f", dropped {self.num_overlong} pairs longer than max_seq_length={self.max_seq_length} "
                f"(first: {', '.join(self.overlong[:3])})"
            )
        if self.num_unsupported:
            text += f", {self.num_unsupported} unsupported rows skipped (first: {'; '.join(self.unsupported[:3])})"
        how = "loaded from the prepared cache" if not self.builds else "prepared"
        return f"{text}; {how} in {self.seconds:.1f} s ({', '.join(self.cache_paths)})"


# ----------------------------------------------------------------------------------------------------------------
# Sources


def open_source(source: str | Path, settings: DataSettings) -> RawRows:
    """A local file or dir; otherwise a Hugging Face Hub dataset id (``org/name``)."""
    text = str(source)
    path = Path(text).expanduser()
    local = path.exists() or text.startswith((".", "/", "~")) or path.suffix.lower() in DATA_SUFFIXES
    if local or not HUB_ID.fullmatch(text):
        return RawRows.open(path)
    try:
        dataset = datasets.load_dataset(text, settings.hub_config, split=settings.hub_split)
    except Exception as error:  # no network, no such dataset, gated: the hub client raises many types
        raise ValueError(
            f"`{text}` is not a local path, so it was read as a Hugging Face Hub dataset (config "
            f"{settings.hub_config!r}, split {settings.hub_split!r}), and that failed: {type(error).__name__}: "
            f"{error}. Without hub access, download it where there is (`hf download {text} --repo-type dataset "
            "--local-dir DIR`) and set dataset_path to its .parquet/.jsonl files, or point at a local copy."
        ) from error
    return RawRows.from_dataset(f"{text}:{settings.hub_split}", dataset)


def processor_identity(encoder: Any) -> str:
    """A hash of what turns a row into tokens: tokenizer, chat template, end-of-turn token, image processor."""
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    parts = [
        vocabulary,
        encoder.processor.chat_template or "",
        encoder.end_of_turn,
        json.dumps(encoder.processor.image_processor.to_dict(), sort_keys=True, default=str),
    ]
    video_processor = getattr(encoder.processor, "video_processor", None)
    if video_processor is not None:  # how videos are sampled and turned into tokens
        parts.append(json.dumps(video_processor.to_dict(), sort_keys=True, default=str))
        parts.append(json.dumps(encoder.video_settings.identity(), sort_keys=True))
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# One row, in a preparation worker


def prepared_row(raw: Any, index: int, rows: RawRows, encoder: Any, benchmark: str | None = None) -> dict[str, Any]:
    """The prepared row of raw row ``index``; raises ``RowProblem`` for a row that cannot be used."""
    if isinstance(raw, RowProblem):
        raise raw
    if not isinstance(raw, dict):
        raise RowProblem("row", f"expected an object, got {type(raw).__name__}")
    row = map_row(raw, benchmark)
    resolved = [resolve_image(image, rows.base_dir) for image in row["images"]]
    row["images"] = [image for image, _ in resolved]
    # Each video decoded and sampled here, once; its frames are stored with the row (vlrm.data.videos).
    video_settings, factor = (encoder.video_settings, encoder.video_factor) if encoder is not None else (None, 28)
    videos = [sample_video(video, video_settings, factor, rows.base_dir) for video in row["videos"]]
    row["videos"] = videos
    given_id = raw.get("id", raw.get("idx", raw.get("ID")))  # RLAIF-V names it idx, Multimodal RewardBench ID
    row["id"] = str(given_id) if given_id is not None else f"{rows.stem}-{index}"
    if row["group"] is not None:  # pairs of a group share the source's id: each pair gets its own
        row["id"] = f"{row['id']}#{index}"
    row["source"] = rows.source
    row["images_key"] = images_key(row["prompt"], row["images"], videos)
    row.update(dict.fromkeys(LENGTH_COLUMNS), response_lengths=None)
    if encoder is not None:
        prompt, responses = encoder.branch_lengths(row, [size for _, size in resolved])
        texts = responses_of(row)
        chosen, rejected = (
            responses[texts.index(row["chosen"])],
            responses[len(texts) - 1 - texts[::-1].index(row["rejected"])],
        )
        row.update(prompt_length=prompt, chosen_length=chosen, rejected_length=rejected)
        if row["responses"] is not None:
            row["response_lengths"] = responses
    row["videos"] = [stored_video(video) for video in videos]
    return row


def _generate(shards: list, rows: RawRows, encoder: Any, settings: DataSettings, notes: str):
    """The rows of ``shards`` (``(shard id, sorted row indices, repeats)``), each yielded ``repeats`` times. What was
    left out goes to ``notes/<shard id>.json``: a worker has no other way to report to the main process (an exception
    would reach it only as text). A bad row in ``error`` mode is noted, and a ``STOP`` file ends every worker early."""
    stop = Path(notes) / "STOP"
    for shard_id, indices, repeats in shards:
        left_out = []
        for (index, raw), repeat in zip(rows.read(indices), repeats.tolist(), strict=True):
            if stop.exists():
                break
            try:
                row = prepared_row(raw, index, rows, encoder, settings.benchmark)
            except UnsupportedRow as unsupported:
                left_out.append(
                    ["unsupported", f"row {index} `{unsupported.field_name}`: {unsupported.reason}", repeat]
                )
                continue
            except RowProblem as problem:
                if settings.on_bad_sample != "skip":
                    left_out.append(["error", [rows.source, index, problem.field_name, problem.reason], repeat])
                    stop.touch()
                    break
                left_out.append(["skipped", f"row {index} `{problem.field_name}`: {problem.reason}", repeat])
                continue
            if settings.max_seq_length is not None and row["prompt_length"] is not None:
                responses = row["response_lengths"] or [row["chosen_length"], row["rejected_length"]]
                longest = row["prompt_length"] + max(responses)
                if longest > settings.max_seq_length:
                    left_out.append(["overlong", f"{row['id']} ({longest} tokens)", repeat])
                    continue
            for _ in range(repeat):
                yield row
        (Path(notes) / f"{shard_id:06d}.json").write_text(json.dumps(left_out))


# ----------------------------------------------------------------------------------------------------------------
# Building and loading one cache entry


def _num_workers(requested: int | None, num_rows: int) -> int:
    if requested is not None:
        return max(1, min(requested, num_rows))
    if num_rows < AUTO_PARALLEL_ROWS:
        return 1
    return max(1, min(len(os.sched_getaffinity(0)), 16))


def _load(entry: Path) -> datasets.Dataset:
    files = sorted(entry.rglob("*.arrow"))
    if not files:
        return datasets.Dataset.from_dict({name: [] for name in PREPARED_FEATURES}, features=PREPARED_FEATURES)
    parts = [datasets.Dataset.from_file(str(file)) for file in files]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _build(entry: Path, rows: RawRows, indices: np.ndarray, repeats: np.ndarray, settings: DataSettings,
           encoder: Any, key: str) -> dict[str, Any]:  # fmt: skip
    """Prepare the drawn rows into ``entry`` (via a temporary dir); returns the report fields."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    for stale in (tmp, entry):  # an earlier build of this pid, or an entry whose report was deleted
        shutil.rmtree(stale, ignore_errors=True)
    (tmp / "notes").mkdir(parents=True)
    num_proc = _num_workers(settings.num_proc, len(indices))
    bounds = np.linspace(0, len(indices), num_proc + 1).astype(int)
    shards = [
        (shard, indices[a:b], repeats[a:b]) for shard, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True))
    ]
    try:
        failure = None
        try:
            datasets.Dataset.from_generator(
                _generate,
                features=PREPARED_FEATURES,
                cache_dir=str(tmp / "arrow"),
                fingerprint=key,
                num_proc=num_proc if num_proc > 1 else None,
                writer_batch_size=WRITER_BATCH_ROWS,
                gen_kwargs={
                    "shards": shards,
                    "rows": rows,
                    "encoder": encoder,
                    "settings": settings,
                    "notes": str(tmp / "notes"),
                },
            )  # the returned set maps files in tmp, which moves: it is loaded again from its final place
        except (ValueError, datasets.exceptions.DatasetGenerationError) as error:
            failure = error  # also raised when every row was left out ("corresponds to no data")
        left_out = [note for file in sorted((tmp / "notes").glob("*.json")) for note in json.loads(file.read_text())]
        errors = sorted((note[1] for note in left_out if note[0] == "error"), key=lambda place: place[1])
        if errors:
            raise BadSampleError(*errors[0])
        report = {"rows_drawn": int(repeats.sum()), "rows_kept": int(repeats.sum())}
        for kind in ("skipped", "overlong", "unsupported"):
            notes = [(text, repeat) for note_kind, text, repeat in left_out if note_kind == kind]
            report[f"num_{kind}"] = len(notes)
            report[kind] = [text for text, _ in notes[:MAX_REASONS]]
            report["rows_kept"] -= sum(repeat for _, repeat in notes)
        if failure is not None and report["rows_kept"]:
            raise failure
        if failure is not None:
            shutil.rmtree(tmp / "arrow", ignore_errors=True)  # an empty set: no Arrow files
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
        os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def prepare_rows(rows: RawRows, indices: np.ndarray, repeats: np.ndarray, settings: DataSettings,
                 encoder: Any = None) -> tuple[datasets.Dataset, SourceReport]:  # fmt: skip
    """The prepared set of the given rows of one source (each ``repeats`` times), from the cache or built now."""
    started = time.perf_counter()
    material = {
        "version": PREPARE_VERSION,
        "source": rows.identity(),
        "processor": processor_identity(encoder) if encoder is not None else None,
        "on_bad_sample": settings.on_bad_sample,
        "max_seq_length": settings.max_seq_length,
        "benchmark": settings.benchmark,
        "rows": hashlib.sha256(indices.astype(np.int64).tobytes() + repeats.astype(np.int64).tobytes()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:24]
    cache_dir = Path(settings.cache_dir) if settings.cache_dir else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    entry = cache_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', rows.stem)}-{key}"
    report = SourceReport(rows.source, max_seq_length=settings.max_seq_length, cache_paths=[str(entry)])
    with FileLock(str(entry) + ".lock"):
        if (entry / REPORT_FILE).is_file():
            fields = json.loads((entry / REPORT_FILE).read_text())
            report.cache_hits = 1
        else:
            fields = _build(entry, rows, indices, repeats, settings, encoder, key)
            report.builds = 1
    for name, value in fields.items():
        setattr(report, name, value)
    dataset = _load(entry)
    report.seconds = time.perf_counter() - started
    return dataset, report


# ----------------------------------------------------------------------------------------------------------------
# Drawing rows and mixing sources


def mixture_targets(
    num_rows: Sequence[int],
    weights: Sequence[float] | None = None,
    num_samples: Sequence[int] | None = None,
    max_samples: int | None = None,
) -> list[int | None]:
    """Rows each source contributes (None: all, once): ``num_samples``, else rows x ``weights``; ``max_samples``
    caps the total, scaling every source alike (largest remainders get the rounding)."""
    for name, values in (("dataset_weights", weights), ("dataset_num_samples", num_samples)):
        if values is not None and len(values) != len(num_rows):
            raise ValueError(f"{name} has {len(values)} entries for {len(num_rows)} sources")
    if num_samples is not None:
        targets = [int(n) for n in num_samples]
    elif weights is not None:
        targets = [round(rows * weight) for rows, weight in zip(num_rows, weights, strict=True)]
    else:
        targets = list(num_rows)
    total = sum(targets)
    if max_samples is not None and max_samples < total:
        shares = [max_samples * target / total for target in targets]
        targets = [math.floor(share) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda i: targets[i] - shares[i])
        for i in by_remainder[: max_samples - sum(targets)]:
            targets[i] += 1
    return [None if target == rows else target for target, rows in zip(targets, num_rows, strict=True)]


def prepare_source(rows: RawRows, settings: DataSettings, encoder: Any = None, target: int | None = None,
                   stream: int = 0) -> tuple[datasets.Dataset, SourceReport]:  # fmt: skip
    """``target`` rows of one source (None: all, in file order), drawn with (seed, stream) before any decoding."""
    num_rows = rows.num_rows
    if target is None or target == num_rows:
        everything = np.arange(num_rows)
        dataset, report = prepare_rows(rows, everything, np.ones(num_rows, dtype=np.int64), settings, encoder)
        report.rows_read = num_rows
        return dataset, report
    order = np.random.default_rng([settings.seed, stream]).permutation(num_rows)
    if target > num_rows:  # upsampling: every row target // n times, a seeded subset once more
        repeats = np.full(num_rows, target // num_rows, dtype=np.int64)
        repeats[order[: target % num_rows]] += 1
        dataset, report = prepare_rows(rows, np.arange(num_rows), repeats, settings, encoder)
        report.rows_read = num_rows
        return dataset, report
    parts, report, start, end = [], None, 0, target
    while True:  # a seeded subset, topped up from the same order for rows left out
        chunk = np.sort(order[start:end])
        part, part_report = prepare_rows(rows, chunk, np.ones(len(chunk), dtype=np.int64), settings, encoder)
        parts.append(part)
        if report is None:
            report = part_report
        else:
            report.add(part_report)
        missing = target - report.rows_kept
        if missing <= 0 or end >= num_rows:
            break
        start, end = end, min(num_rows, end + math.ceil(missing * report.rows_drawn / max(report.rows_kept, 1)))
    report.rows_read = num_rows
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) > target:
        dataset = dataset.select(range(target))  # contiguous: a slice, no index mapping
        report.rows_kept = target
    return dataset, report


def prepare_mixture(
    sources: str | Path | Sequence[str | Path],
    settings: DataSettings,
    encoder: Any = None,
    weights: Sequence[float] | None = None,
    num_samples: Sequence[int] | None = None,
    max_samples: int | None = None,
) -> tuple[datasets.Dataset, list[SourceReport]]:
    """Prepare every source (cached) and concatenate them in order; each row's ``source`` names its file."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    opened = [open_source(source, settings) for source in sources]
    targets = mixture_targets([rows.num_rows for rows in opened], weights, num_samples, max_samples)
    parts, reports = [], []
    for stream, (rows, target) in enumerate(zip(opened, targets, strict=True)):
        dataset, report = prepare_source(rows, settings, encoder, target, stream)
        parts.append(dataset)
        reports.append(report)
    if not any(len(part) for part in parts):
        raise ValueError(f"{', '.join(map(str, sources))}: no usable preference pairs ({reports[0].summary()})")
    # Every part is one or more whole Arrow files, so the concatenation is memory-mapped too (no index mapping, and
    # adding a column later copies nothing).
    return (parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)), reports


def load_preference_dataset(
    path: str | Path | Sequence[str | Path],
    on_bad_sample: str = "error",
    max_samples: int | None = None,
    seed: int = 0,
    encoder: Any = None,
    max_seq_length: int | None = None,
    cache_dir: str | None = None,
    num_proc: int | None = None,
    benchmark: str | None = None,
) -> tuple[datasets.Dataset, SourceReport]:
    """Prepared canonical rows of ``path`` (one source, or several concatenated) and the (first) source's report.
    With an ``encoder``, rows carry their token lengths and ``max_seq_length`` drops longer pairs."""
    settings = DataSettings(on_bad_sample, max_seq_length, seed, num_proc, cache_dir, benchmark=benchmark)
    dataset, reports = prepare_mixture(path, settings, encoder, max_samples=max_samples)
    return dataset, reports[0]


SAMPLE_RUNS = 32


def contiguous_sample(num_rows: int, count: int, seed: int, runs: int = SAMPLE_RUNS) -> np.ndarray:
    """``count`` sorted row indices of a prepared set drawn as ``runs`` contiguous runs at seeded random places (all
    rows when ``count >= num_rows``).

    Why runs and not single rows: a prepared set is memory-mapped, and the kernel maps a touched page-cache folio
    whole (up to 2 MB: a dozen 160 KB images), so 1,000 scattered rows map hundreds of MB of the file into the
    process, more the larger the file (each row in a folio of its own), while 1,000 rows in 32 runs map what they
    read and a folio at each end (measured with bench/bench_data.py). The runs start at a seeded random permutation's
    places, so they cover the set (and a mixture's sources) evenly."""
    if count >= num_rows:
        return np.arange(num_rows)
    runs = max(1, min(runs, count))
    lengths = np.full(runs, count // runs) + (np.arange(runs) < count % runs)
    rng = np.random.default_rng(seed)
    # The rows not drawn, cut at random into runs + 1 gaps (stars and bars): run i starts after the rows not drawn
    # before it (a non-decreasing draw) and the runs before it.
    skipped_before = np.sort(rng.choice(num_rows - count + runs, runs, replace=False)) - np.arange(runs)
    starts = skipped_before + np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.concatenate([np.arange(start, start + length) for start, length in zip(starts, lengths, strict=True)])


def row_kinds(dataset: datasets.Dataset) -> dict[str, dict[str, int]]:
    """Per source: rows with images, rows with videos, text-only rows (no image or video: no vision forward) and rows
    of N responses; counted on Arrow batches from the columns' list lengths, no image or frame read."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kinds: dict[str, dict[str, int]] = {}
    columns = dataset.select_columns(["source", "images", "videos", "responses"]).with_format("arrow")
    for batch in columns.iter(batch_size=65536):
        with_images = pc.greater(pc.fill_null(pc.list_value_length(batch.column("images")), 0), 0)
        with_videos = pc.greater(pc.fill_null(pc.list_value_length(batch.column("videos")), 0), 0)
        counts = pa.table({
            "source": batch.column("source"),
            "with_images": with_images,
            "with_videos": with_videos,
            "text_only": pc.invert(pc.or_(with_images, with_videos)),
            "ranking": pc.is_valid(batch.column("responses")),
        }).group_by("source").aggregate([("with_images", "sum"), ("with_videos", "sum"), ("text_only", "sum"),
                                         ("ranking", "sum")])  # fmt: skip
        for row in counts.to_pylist():
            kind = kinds.setdefault(row["source"], {"images": 0, "videos": 0, "text_only": 0, "rankings": 0})
            kind["images"] += row["with_images_sum"]
            kind["videos"] += row["with_videos_sum"]
            kind["text_only"] += row["text_only_sum"]
            kind["rankings"] += row["ranking_sum"]
    return kinds


def branch_lengths(dataset: datasets.Dataset) -> list[tuple[int, list[int], int]]:
    """(prompt, [each response], best response) tokens of every prepared row: a pair's chosen and rejected (the best:
    chosen), a ranking's N (the best: its chosen)."""
    if any(name not in dataset.column_names for name in LENGTH_COLUMNS):
        raise ValueError("the dataset has no token-length columns: prepare it with a processor (vlrm.data.prepare)")
    columns = dataset.select_columns([*LENGTH_COLUMNS, "response_lengths"]).to_dict()
    return [
        (prompt, list(responses) if responses is not None else [chosen, rejected], chosen)
        for prompt, chosen, rejected, responses in zip(
            *(columns[name] for name in LENGTH_COLUMNS), columns["response_lengths"], strict=True
        )
    ]


def pair_lengths(dataset: datasets.Dataset) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) tokens of every prepared row, from its length columns."""
    if any(name not in dataset.column_names for name in LENGTH_COLUMNS):
        raise ValueError("the dataset has no token-length columns: prepare it with a processor (vlrm.prepare)")
    columns = dataset.select_columns(list(LENGTH_COLUMNS)).to_dict()
    return list(zip(*(columns[name] for name in LENGTH_COLUMNS), strict=True))


# ----------------------------------------------------------------------------------------------------------------
# What train_rm.py and `python -m vlrm prepare` share


def data_settings(config: Any, hub_split: str | None = None) -> DataSettings:
    return DataSettings(
        on_bad_sample=config.on_bad_sample,
        max_seq_length=config.max_seq_length,
        seed=config.seed,
        num_proc=config.dataset_num_proc,
        cache_dir=config.data_cache_dir,
        hub_config=config.dataset_config,
        hub_split=hub_split or config.dataset_split,
    )


def prepare_training_data(config: Any, encoder: Any) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """The training set (a mixture when ``dataset_path`` lists several) and the eval set, each logged per source."""

    def prepare(paths, split, **mixing):
        dataset, reports = prepare_mixture(paths, data_settings(config, split), encoder, **mixing)
        for report in reports:
            (logger.warning if report.num_overlong else logger.info)(report.summary())
        if len(reports) > 1:
            counts = ", ".join(f"{report.source}: {report.rows_kept}" for report in reports)
            logger.info("mixture of %d sources, %d pairs (%s)", len(reports), len(dataset), counts)
        kinds = row_kinds(dataset)
        if any(kind["text_only"] or kind["rankings"] or kind["videos"] for kind in kinds.values()):
            logger.info("%s rows by kind: %s", split, "; ".join(
                f"{source}: {kind['images']} with images, {kind['videos']} with videos, {kind['text_only']} "
                f"text-only, {kind['rankings']} of N responses" for source, kind in kinds.items()
            ))  # fmt: skip
        return dataset

    train = prepare(
        config.dataset_path,
        config.dataset_split,
        weights=config.dataset_weights,
        num_samples=config.dataset_num_samples,
        max_samples=config.max_train_samples,
    )
    evaluation = None
    if config.eval_dataset_path:
        evaluation = prepare(config.eval_dataset_path, config.eval_dataset_split, max_samples=config.max_eval_samples)
    return train, evaluation
