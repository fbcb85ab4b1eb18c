"""S3 transfers through boto3: folders up and down, multipart, retries, checksums.

Configuration is boto3's own: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto). ``MLFLOW_S3_ENDPOINT_URL``
is honoured as a fallback endpoint so one setting serves MLflow and the pipeline.
"""

from __future__ import annotations

import os
from pathlib import Path

from qlora_kfp.errors import ArtifactError, SourceError
from qlora_kfp.storage.manifest import MANIFEST, sha256_file, write_manifest

MULTIPART_THRESHOLD = 64 * 2**20


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``; rejects keys that escape with ``..``."""
    if not is_s3(uri):
        raise SourceError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[5:].partition("/")
    if not bucket:
        raise SourceError(f"{uri}: no bucket name")
    if ".." in key.split("/"):
        raise SourceError(f"{uri}: key escapes its prefix ('..' is not allowed)")
    return bucket, key.strip("/")


def client():
    """A boto3 S3 client with standard retries and the configured endpoint."""
    import boto3
    from botocore.config import Config

    endpoint = (
        os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or os.environ.get("MLFLOW_S3_ENDPOINT_URL")
    )
    cfg = Config(
        retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60
    )
    return boto3.client("s3", endpoint_url=endpoint or None, config=cfg)


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_THRESHOLD,
        max_concurrency=8,
    )


def _explain(uri: str, exc: Exception) -> SourceError:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(exc, NoCredentialsError):
        return SourceError(
            f"{uri}: no AWS credentials; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    if isinstance(exc, EndpointConnectionError):
        return SourceError(f"{uri}: cannot reach the S3 endpoint ({exc}); check AWS_ENDPOINT_URL")
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        hint = {
            "NoSuchBucket": "the bucket does not exist",
            "InvalidAccessKeyId": "wrong AWS_ACCESS_KEY_ID",
            "SignatureDoesNotMatch": "wrong AWS_SECRET_ACCESS_KEY",
            "AccessDenied": "the credentials may not read/write here",
            "404": "no such object",
            "NoSuchKey": "no such object",
        }.get(code, str(exc))
        return SourceError(f"{uri}: {hint} ({code})")
    return SourceError(f"{uri}: {exc}")


def check_access(uri: str) -> None:
    """Fail fast, before long work, when the bucket is missing or the credentials are wrong."""
    bucket, _ = split_uri(uri)
    from botocore.exceptions import ClientError

    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code in ("404", "NoSuchBucket"):
            raise SourceError(f"{uri}: the bucket does not exist (NoSuchBucket)") from None
        if code == "403":  # HEAD has no body: ask again with a GET to learn why
            try:
                client().list_objects_v2(Bucket=bucket, MaxKeys=1)
            except Exception as exc2:  # noqa: BLE001
                raise _explain(uri, exc2) from None
        raise _explain(uri, exc) from None
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear message
        raise _explain(uri, exc) from None


def upload_folder(folder: str | os.PathLike, uri: str, kind: str = "folder") -> str:
    """Upload a folder under ``uri``; the manifest goes last, so a partial upload is visible."""
    from tqdm.auto import tqdm

    root = Path(folder)
    if not (root / MANIFEST).is_file():
        write_manifest(root, kind)
    bucket, prefix = split_uri(uri)
    s3, cfg = client(), _transfer_config()
    files = [p for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    total = sum(p.stat().st_size for p in files)
    try:
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"upload {uri}",
            disable=total < MULTIPART_THRESHOLD,
        ) as bar:
            for p in files + [root / MANIFEST]:
                key = f"{prefix}/{p.relative_to(root).as_posix()}".lstrip("/")
                s3.upload_file(str(p), bucket, key, Config=cfg, Callback=bar.update)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None
    return uri


def download_folder(uri: str, dest: str | os.PathLike, verify_manifest: bool = True) -> Path:
    """Download every object under ``uri`` into ``dest`` and verify the manifest if present."""
    import json

    from tqdm.auto import tqdm

    bucket, prefix = split_uri(uri)
    s3, cfg = client(), _transfer_config()
    dest = Path(dest)
    try:
        keys = []
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=prefix + "/"
        ):
            keys += [(o["Key"], o["Size"]) for o in page.get("Contents", [])]
        if not keys:
            # A single object, e.g. s3://bucket/data.jsonl.
            head = s3.head_object(Bucket=bucket, Key=prefix)
            keys = [(prefix, head["ContentLength"])]
            dest = dest / Path(prefix).name
        with tqdm(
            total=sum(s for _, s in keys),
            unit="B",
            unit_scale=True,
            desc=f"download {uri}",
            disable=sum(s for _, s in keys) < MULTIPART_THRESHOLD,
        ) as bar:
            for key, _ in keys:
                rel = key[len(prefix) :].lstrip("/") if len(keys) > 1 or key != prefix else ""
                target = dest / rel if rel else dest
                if ".." in Path(rel).parts:
                    raise SourceError(f"s3://{bucket}/{key}: key escapes its prefix")
                target.parent.mkdir(parents=True, exist_ok=True)
                s3.download_file(bucket, key, str(target), Config=cfg, Callback=bar.update)
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None
    if verify_manifest and dest.is_dir() and (dest / MANIFEST).is_file():
        manifest = json.loads((dest / MANIFEST).read_text())
        for rel, meta in manifest["files"].items():
            if sha256_file(dest / rel) != meta["sha256"]:
                raise ArtifactError(f"{uri}/{rel}: checksum mismatch after download")
    return dest


def read_text(uri: str) -> str:
    """The text of one small object (e.g. a manifest), without downloading its folder."""
    bucket, key = split_uri(uri)
    try:
        return client().get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None


def delete_object(uri: str) -> None:
    """Delete one object (absent is fine: S3's DeleteObject succeeds on a missing key)."""
    bucket, key = split_uri(uri)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None


def delete_prefix(uri: str) -> int:
    """Delete every object under ``uri`` (temporary storage); returns how many."""
    bucket, prefix = split_uri(uri)
    s3, n = client(), 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys})
            n += len(keys)
    return n
