"""One exception family: every failure a user can cause maps to a message that says what to do."""

from __future__ import annotations


class StreamMergeError(Exception):
    """Base of every error streammerge raises on purpose; the CLI prints it as one `error:` line."""

    exit_code = 2


class InputError(StreamMergeError):
    """A base checkpoint or its files are missing, malformed or inconsistent."""


class AdapterError(StreamMergeError):
    """An adapter folder, its config or its tensors cannot be applied to this base."""


class UnsupportedError(StreamMergeError):
    """A feature we deliberately refuse rather than merge wrongly."""


class PlanError(StreamMergeError):
    """The merge plan failed validation (shapes, unused tensors, budget)."""


class OutputError(StreamMergeError):
    """The output folder cannot be written as asked."""


class OptionError(StreamMergeError):
    """A command-line or API option has a bad value."""


class ExecutionError(StreamMergeError):
    """Something failed while tensors were being computed or written."""

    exit_code = 1


class StreamMergeWarning(UserWarning):
    """Something the user must know although the merge can go on (e.g. an adapter that changes nothing)."""


class DiskFullError(OutputError):
    """The output's filesystem ran out of space (ENOSPC / EDQUOT) while writing."""

    exit_code = 1


class Interrupted(StreamMergeError):
    """The run was stopped (SIGINT / SIGTERM) and left resumable."""

    exit_code = 130
