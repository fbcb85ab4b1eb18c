"""Errors a user can act on.

Every error raised for bad input or bad configuration is a :class:`QloraError` subclass whose
message names what is wrong and where (file, row, field), so that the CLI and the KFP
components can print it without a traceback from deep inside a library.
"""

from __future__ import annotations


class QloraError(Exception):
    """Base class for errors caused by the user's input or configuration.

    ``retryable`` says whether running the same task again can succeed: a bad setting or a
    malformed row fails the same way every time, so a KFP retry of it is not started
    (``tasks.context.stage``); an unreachable server or a missing object may be back.
    """

    retryable = False


class ConfigError(QloraError, ValueError):
    """A configuration value is invalid; the message says which field and what to do."""


class DataError(QloraError, ValueError):
    """The dataset is malformed; the message names the file, the row and the field."""

    def __init__(self, message: str, *, source: str = "", row: int | None = None, field: str = ""):
        where = source
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}" if where else message)
        self.source, self.row, self.field = source, row, field


class SourceError(QloraError, FileNotFoundError):
    """A model or dataset source (path, s3:// URI, hub id) cannot be read."""

    retryable = True


class ArtifactError(QloraError):
    """An artifact is incomplete or corrupt (missing manifest, checksum mismatch)."""


class TrackingError(QloraError):
    """The MLflow tracking server cannot be reached or refused a request."""

    retryable = True


class VerificationError(QloraError):
    """A numerical check failed (e.g. merged logits differ from base+adapter)."""


class TrainingDivergedError(QloraError):
    """The loss became NaN or Inf; training stopped and no adapter was written."""


class NotRetriedError(QloraError):
    """A retry was stopped because an earlier attempt failed with a non-retryable error."""


class OutputError(QloraError):
    """An artifact cannot be written: the disk is full, or the output is read-only or not ours
    to write; the message names the path. Only a full disk may have room on a retry (the
    failed write's files are removed), so ``retryable`` is set per error."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class TrainJobError(QloraError):
    """The train stage's TrainJob (``train_runner=trainjob``) failed, was deleted or refused,
    or the Kubernetes API failed; the message names the TrainJob and what happened. A failed
    TrainJob (a node lost, preempted) may succeed on a retry, which resumes from the
    checkpoints; a refused or deleted one will not: ``retryable`` is set per error."""

    def __init__(self, message: str, *, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


class TrainJobFailed(TrainJobError):
    """The TrainJob ended with its ``Failed`` condition; the message has its reason."""


class ProvenanceError(QloraError, ValueError):
    """An artifact was made from other inputs than the ones given (e.g. an adapter trained on
    another base model); the message names both."""


class PipelineFailed(QloraError):
    """A local pipeline run stopped at a failed task; the message names the task and its own
    one-line reason (the traceback stays in the runner's log)."""
