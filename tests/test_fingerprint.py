"""Cache fingerprints change when the content or the code changes, not when nothing does."""

from __future__ import annotations

import boto3
import pytest

from qlora_kfp.storage.fingerprint import fingerprint, source_digest


def test_same_path_new_content_changes_the_digest(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "a", "completion": "b"}\n')
    first = source_digest(str(f))
    assert source_digest(str(f)) == first
    f.write_text('{"prompt": "a", "completion": "c"}\n')
    assert source_digest(str(f)) != first


def test_rebuilt_image_changes_the_fingerprint(tmp_path, monkeypatch):
    (tmp_path / "d.jsonl").write_text("{}\n")
    monkeypatch.setenv("QLORA_KFP_IMAGE", "reg/qlora-kfp-cpu:0.1.0@sha256:aaa")
    a = fingerprint(str(tmp_path / "d.jsonl"), "org/model")
    monkeypatch.setenv("QLORA_KFP_IMAGE", "reg/qlora-kfp-cpu:0.1.0@sha256:bbb")
    assert fingerprint(str(tmp_path / "d.jsonl"), "org/model") != a


@pytest.mark.integration
def test_s3_object_replaced_under_the_same_key(s3_env):
    s3 = boto3.client("s3", endpoint_url=s3_env.s3_endpoint, region_name="us-east-1")
    s3.put_object(Bucket="data", Key="fp/train.jsonl", Body=b"one")
    first = source_digest("s3://data/fp/train.jsonl")
    s3.put_object(Bucket="data", Key="fp/train.jsonl", Body=b"two")
    assert source_digest("s3://data/fp/train.jsonl") != first
