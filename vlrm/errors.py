"""The errors vlrm raises on purpose, one place for all of them: every wing can import this module (it imports
nothing), so a lower wing never has to import a higher one to raise or catch a shared error.

- ``ConfigError``: a configuration mistake, found before any weight is loaded (``vlrm.train.config``,
  ``vlrm.model.lora``'s settings).
- ``CheckpointError``: a checkpoint dir that cannot be loaded, with the reason and the fix (``vlrm.model``).
- ``RowProblem``: what is wrong with one data row, before its file and index are known; ``BadSampleError`` is the
  same with them (``FILE: row N: field `F`: reason``), raised when a data set is read (``vlrm.data``).
- ``UnsupportedRow``: a benchmark row vlrm cannot score: skipped and counted, never silent (``vlrm.data``).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration mistake found before any weight is loaded."""


class CheckpointError(ValueError):
    """A checkpoint dir that cannot be loaded, with the reason and the fix."""


class RowProblem(Exception):
    """What is wrong with a row, before the file and row index are known (``BadSampleError`` adds them)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name, self.reason = field_name, reason


class BadSampleError(ValueError):
    """A row that cannot be used, with the place it came from."""

    def __init__(self, source: str, row_index: int, field_name: str, reason: str):
        self.source, self.row_index, self.field_name, self.reason = source, row_index, field_name, reason
        super().__init__(f"{source}: row {row_index}: field `{field_name}`: {reason}")

    def __reduce__(self):  # raised in a preparation worker and re-raised in the main process
        return BadSampleError, (self.source, self.row_index, self.field_name, self.reason)


class UnsupportedRow(Exception):
    """A benchmark row vlrm cannot score: skipped and counted, never an error and never silent."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field_name, self.reason = field_name, reason
