"""Checks that fail fast, before any long or GPU work, with a message that says what to fix."""

from __future__ import annotations

import os

from qlora_kfp import s3, tracking

ARTIFACT_URI_ENV = "QLORA_KFP_ARTIFACT_URI"


def check_services() -> None:
    """The tracking server answers and the artifact bucket exists and accepts the credentials.

    Raises:
        TrackingError: MLflow is unreachable.
        SourceError: the bucket is missing, the credentials are wrong or S3 is unreachable.
    """
    tracking.check_server()
    uri = os.environ.get(ARTIFACT_URI_ENV, "")
    if uri:
        s3.check_access(uri)
