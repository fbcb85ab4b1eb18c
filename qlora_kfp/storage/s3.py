"""S3 transfers through boto3: folders up and down, multipart, retries, checksums.

Configuration is boto3's own: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (MinIO, Ceph, moto). ``MLFLOW_S3_ENDPOINT_URL``
is honoured as a fallback endpoint so one setting serves MLflow and the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from qlora_kfp import env
from qlora_kfp.errors import ArtifactError, OutputError, SourceError
from qlora_kfp.storage.manifest import MANIFEST, sha256_file, write_manifest
from qlora_kfp.storage.writes import write_error

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
        env.text("AWS_ENDPOINT_URL_S3")
        or env.text("AWS_ENDPOINT_URL")
        or env.text("MLFLOW_S3_ENDPOINT_URL")
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


def list_objects(uri: str, missing_ok: bool = False) -> list[dict]:
    """What S3 says about every object under ``uri`` (or the one object at ``uri``).

    Each entry has ``key``, ``size``, ``etag`` and ``last_modified``; a single object also its
    ``version_id`` (on a versioned bucket). Replacing an object under the same key changes
    its ETag or LastModified, so :func:`version` of this list tells a replaced source apart.
    Nothing at ``uri`` is a :class:`SourceError`, or ``[]`` with ``missing_ok``.
    """
    bucket, prefix = split_uri(uri)
    s3 = client()
    try:
        found = [
            {
                "key": o["Key"],
                "size": o["Size"],
                "etag": o.get("ETag", ""),
                "last_modified": o["LastModified"].isoformat(),
            }
            for page in s3.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix + "/"
            )
            for o in page.get("Contents", [])
        ]
        if found:
            return found
        # A single object, e.g. s3://bucket/data.jsonl.
        head = s3.head_object(Bucket=bucket, Key=prefix)
    except Exception as exc:  # noqa: BLE001
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
        if missing_ok and code in ("404", "NoSuchKey"):
            return []
        raise _explain(uri, exc) from None
    return [
        {
            "key": prefix,
            "size": head["ContentLength"],
            "etag": head.get("ETag", ""),
            "last_modified": head["LastModified"].isoformat(),
            "version_id": head.get("VersionId") or "",
        }
    ]


def version(objects: list[dict]) -> str:
    """A short digest of :func:`list_objects`: it changes when any object is replaced."""
    h = hashlib.sha256()
    for o in sorted(objects, key=lambda o: o["key"]):
        h.update(json.dumps(o, sort_keys=True).encode())
    return h.hexdigest()[:16]


def is_single(uri: str, objects: list[dict]) -> bool:
    """Whether ``objects`` (of :func:`list_objects`) is the one object at ``uri``."""
    return len(objects) == 1 and objects[0]["key"] == split_uri(uri)[1]


def download_folder(
    uri: str,
    dest: str | os.PathLike,
    verify_manifest: bool = True,
    objects: list[dict] | None = None,
) -> Path:
    """Download every object under ``uri`` into ``dest`` and verify the manifest if present.

    A single object lands in ``dest/<its name>`` (the returned path). ``objects`` (from
    :func:`list_objects`) pins what is downloaded: a single object's version when the bucket
    keeps versions.
    """
    from tqdm.auto import tqdm

    bucket, prefix = split_uri(uri)
    objects = list_objects(uri) if objects is None else objects
    s3, cfg = client(), _transfer_config()
    dest = Path(dest)
    single = is_single(uri, objects)
    if single:
        dest = dest / Path(prefix).name
    total = sum(o["size"] for o in objects)
    try:
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"download {uri}",
            disable=total < MULTIPART_THRESHOLD,
        ) as bar:
            for o in objects:
                rel = "" if single else o["key"][len(prefix) :].lstrip("/")
                if ".." in Path(rel).parts:
                    raise SourceError(f"s3://{bucket}/{o['key']}: key escapes its prefix")
                target = dest / rel if rel else dest
                target.parent.mkdir(parents=True, exist_ok=True)
                extra = {"VersionId": o["version_id"]} if o.get("version_id") else None
                s3.download_file(
                    bucket, o["key"], str(target), ExtraArgs=extra, Config=cfg, Callback=bar.update
                )
    except (SourceError, OutputError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise write_error(exc, dest) or _explain(uri, exc) from None
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


def write_text(uri: str, text: str) -> str:
    """Write one small object (a job description, a result); returns ``uri``."""
    bucket, key = split_uri(uri)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=text.encode())
    except Exception as exc:  # noqa: BLE001
        raise _explain(uri, exc) from None
    return uri


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
