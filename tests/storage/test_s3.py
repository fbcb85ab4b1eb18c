"""S3 through boto3 against a real S3-compatible server on 127.0.0.1 (moto)."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from qlora_kfp.errors import ArtifactError, SourceError
from qlora_kfp.storage import s3, sources
from qlora_kfp.storage.manifest import MANIFEST, atomic_folder

pytestmark = pytest.mark.integration


def client(env):
    return boto3.client("s3", endpoint_url=env.s3_endpoint, region_name="us-east-1")


def test_folder_round_trip_with_manifest_last(s3_env, tmp_path):
    with atomic_folder(tmp_path / "art", "adapter") as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    s3.upload_folder(tmp_path / "art", "s3://data/runs/r1/adapter")
    keys = [
        o["Key"]
        for o in client(s3_env).list_objects_v2(Bucket="data", Prefix="runs/r1/")["Contents"]
    ]
    assert sorted(keys) == [
        "runs/r1/adapter/MANIFEST.json",
        "runs/r1/adapter/a.bin",
        "runs/r1/adapter/sub/b.json",
    ]
    got = s3.download_folder("s3://data/runs/r1/adapter", tmp_path / "back")
    assert (got / "a.bin").read_bytes() == b"x" * 1000 and (got / MANIFEST).is_file()


def test_download_detects_a_corrupted_object(s3_env, tmp_path):
    with atomic_folder(tmp_path / "art", "adapter") as tmp:
        (tmp / "a.bin").write_bytes(b"good")
    s3.upload_folder(tmp_path / "art", "s3://data/corrupt")
    client(s3_env).put_object(Bucket="data", Key="corrupt/a.bin", Body=b"evil")
    with pytest.raises(ArtifactError, match="a.bin: checksum mismatch"):
        s3.download_folder("s3://data/corrupt", tmp_path / "back")


def test_model_and_dataset_load_from_s3_uris(s3_env, demo_assets, tmp_path, monkeypatch):
    from qlora_kfp.configs import PrepareConfig
    from qlora_kfp.stages.prepare import run_prepare

    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    s3.upload_folder(demo_assets["base_model"], "s3://data/models/tiny")
    client(s3_env).upload_file(demo_assets["data_source"], "data", "datasets/antonyms.jsonl")
    local = sources.model_source("s3://data/models/tiny")
    assert Path(local).is_relative_to(tmp_path / "cache" / "s3" / "data" / "models" / "tiny")
    assert json.loads((Path(local) / "config.json").read_text())["model_type"] == "llama"
    res = run_prepare(
        PrepareConfig(
            data_source="s3://data/datasets/antonyms.jsonl",
            base_model="s3://data/models/tiny",
            max_seq_length=64,
        ),
        str(tmp_path / "prepared"),
    )
    assert res.stats["rows_read"] == 240 and local.endswith("tiny")


def _rows(n: int, answer: str = "cold") -> bytes:
    rows = [
        {"prompt": f"What is the opposite of hot ({i})?", "completion": answer} for i in range(n)
    ]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_an_object_replaced_under_the_same_key_is_downloaded_again(
    s3_env, demo_assets, tmp_path, monkeypatch
):
    """The cache (a PVC shared by pods in the cluster) must not serve the old file, or the
    dataset digest stays the same and retraining can be skipped on new data."""
    from qlora_kfp.configs import PrepareConfig
    from qlora_kfp.stages.prepare import run_prepare

    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    c = client(s3_env)
    c.put_object(Bucket="data", Key="replaced/train.jsonl", Body=_rows(40))
    first = sources.localize("s3://data/replaced/train.jsonl")
    assert Path(first).name == "train.jsonl" and Path(first).read_bytes() == _rows(40)
    downloads = []
    real = s3.download_folder
    monkeypatch.setattr(
        s3, "download_folder", lambda *a, **kw: downloads.append(a) or real(*a, **kw)
    )
    assert sources.localize("s3://data/replaced/train.jsonl") == first and not downloads

    def prepare(name):
        cfg = PrepareConfig(
            data_source="s3://data/replaced/train.jsonl",
            base_model=demo_assets["base_model"],
            max_seq_length=64,
        )
        return run_prepare(cfg, str(tmp_path / name))

    before = prepare("one")
    c.put_object(Bucket="data", Key="replaced/train.jsonl", Body=_rows(40, "freezing"))
    second = sources.localize("s3://data/replaced/train.jsonl")
    assert second != first and Path(second).read_bytes() == _rows(40, "freezing")
    assert len(downloads) == 1
    assert prepare("two").digest != before.digest, "new data, new dataset digest"


def test_a_folder_with_one_replaced_file_is_downloaded_again(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    c = client(s3_env)
    for name in ("a.jsonl", "b.jsonl"):
        c.put_object(Bucket="data", Key=f"folder/{name}", Body=_rows(3))
    first = Path(sources.localize("s3://data/folder"))
    assert first.name == "folder" and sorted(p.name for p in first.iterdir()) == [
        "a.jsonl",
        "b.jsonl",
    ]
    c.put_object(Bucket="data", Key="folder/b.jsonl", Body=_rows(3, "icy"))
    second = Path(sources.localize("s3://data/folder"))
    assert second != first and (second / "b.jsonl").read_bytes() == _rows(3, "icy")
    assert (second / "a.jsonl").read_bytes() == _rows(3)


@pytest.mark.parametrize(
    "days_unused,keep,removed",
    [
        pytest.param(8, "7", True, id="unused-past-keep-removed"),
        pytest.param(2, "7", False, id="used-within-keep-kept"),
        pytest.param(0.01, "0", True, id="keep-0-removes-at-once"),
    ],
)
def test_a_new_version_removes_old_unused_ones(
    s3_env, tmp_path, monkeypatch, days_unused, keep, removed
):
    import os
    import time

    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("QLORA_KFP_CACHE_KEEP_DAYS", keep)
    c = client(s3_env)
    c.put_object(Bucket="data", Key="daily/train.jsonl", Body=_rows(3))
    old = Path(sources.localize("s3://data/daily/train.jsonl")).parent
    then = time.time() - days_unused * 86400
    os.utime(old, (then, then))
    c.put_object(Bucket="data", Key="daily/train.jsonl", Body=_rows(3, "new"))
    new = Path(sources.localize("s3://data/daily/train.jsonl"))
    assert new.read_bytes() == _rows(3, "new")
    assert old.exists() is not removed
    leftovers = [p.name for p in old.parent.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_a_cache_hit_marks_its_version_used(s3_env, tmp_path, monkeypatch):
    import os
    import time

    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    c = client(s3_env)
    c.put_object(Bucket="data", Key="hit/train.jsonl", Body=_rows(3))
    entry = Path(sources.localize("s3://data/hit/train.jsonl")).parent
    os.utime(entry, (0, 0))
    sources.localize("s3://data/hit/train.jsonl")
    assert entry.stat().st_mtime > time.time() - 60


def test_a_bad_keep_days_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("QLORA_KFP_CACHE_KEEP_DAYS", "a week")
    with pytest.raises(SourceError, match="QLORA_KFP_CACHE_KEEP_DAYS='a week'"):
        sources.keep_days()


def test_an_interrupted_download_is_never_served(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("QLORA_KFP_CACHE", str(tmp_path / "cache"))
    c = client(s3_env)
    for name in ("a.jsonl", "b.jsonl"):
        c.put_object(Bucket="data", Key=f"cut/{name}", Body=_rows(3))
    real, calls = s3.download_folder, []

    def cut_off(uri, dest, *a, **kw):  # the first file lands, then the connection drops
        calls.append(uri)
        Path(dest).mkdir(parents=True)
        (Path(dest) / "a.jsonl").write_bytes(_rows(3))
        raise SourceError(f"{uri}: connection reset")

    monkeypatch.setattr(s3, "download_folder", cut_off)
    with pytest.raises(SourceError, match="connection reset"):
        sources.localize("s3://data/cut")
    monkeypatch.setattr(s3, "download_folder", real)
    c.delete_object(Bucket="data", Key="cut/a.jsonl")  # the folder changes before the retry
    c.put_object(Bucket="data", Key="cut/c.jsonl", Body=_rows(3))
    got = Path(sources.localize("s3://data/cut"))
    assert sorted(p.name for p in got.iterdir()) == ["b.jsonl", "c.jsonl"], "no leftover a.jsonl"
    # Nothing but the one complete entry is left in the cache.
    assert [p.name for p in got.parent.parent.iterdir()] == [got.parent.name]


@pytest.mark.parametrize(
    "uri,message",
    [
        ("s3://no-such-bucket/x", "the bucket does not exist"),
        ("s3://data/missing-object.jsonl", "no such object"),
        ("s3://data/../escape", "escapes its prefix"),
    ],
    ids=["missing-bucket", "missing-object", "key-escapes-prefix"],
)
def test_s3_errors_are_clear(s3_env, tmp_path, uri, message):
    with pytest.raises(SourceError, match=message):
        s3.download_folder(uri, tmp_path / "d")


def test_check_access_fails_fast_on_missing_bucket(s3_env):
    s3.check_access("s3://data/prefix")
    with pytest.raises(SourceError, match="no-bucket/prefix: the bucket does not exist"):
        s3.check_access("s3://no-bucket/prefix")


def test_unreachable_endpoint(monkeypatch):
    from support.servers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    with pytest.raises(SourceError, match="cannot reach the S3 endpoint"):
        s3.check_access("s3://bucket/x")


def test_checkpoint_mirror_resumes_on_a_new_machine(s3_env, tmp_path):
    """A sealed checkpoint uploaded by one pod is found and downloaded by the next."""
    from types import SimpleNamespace

    from qlora_kfp.training import resume

    root = tmp_path / "pod1"
    (root / "checkpoint-12").mkdir(parents=True)
    (root / "checkpoint-12" / "optimizer.pt").write_bytes(b"state")
    (root / "checkpoint-18").mkdir()  # cut off before its manifest: never uploaded
    cb = resume.callback(root, RUN_A, "s3://data/run-1/train-checkpoints")
    cb.on_save(None, SimpleNamespace(global_step=12), None)
    found = resume.find_resume_point(tmp_path / "pod2", RUN_A, "s3://data/run-1/train-checkpoints")
    assert found and found.endswith("checkpoint-12")
    assert (tmp_path / "pod2" / "checkpoint-12" / "optimizer.pt").read_bytes() == b"state"


RUN_A = {"config": {"learning_rate": 3e-3}, "dataset_digest": "d1", "model_digest": "m1"}
RUN_B = {**RUN_A, "config": {"learning_rate": 1e-3}}


def _save(root, step: int, made_from: dict, uri: str, payload: bytes) -> None:
    from types import SimpleNamespace

    from qlora_kfp.training import resume

    (root / f"checkpoint-{step}").mkdir(parents=True)
    (root / f"checkpoint-{step}" / "optimizer.pt").write_bytes(payload)
    resume.callback(root, made_from, uri).on_save(None, SimpleNamespace(global_step=step), None)


def test_the_mirror_resumes_only_checkpoints_of_the_same_run(s3_env, tmp_path, caplog):
    """Run B (another learning rate) under the same prefix as run A: each finds its own
    newest checkpoint and never the other's, and nothing of A's is deleted."""
    from qlora_kfp.training import resume

    uri = "s3://data/run-2/train-checkpoints"
    _save(tmp_path / "a", 12, RUN_A, uri, b"a12")
    _save(tmp_path / "b", 6, RUN_B, uri, b"b6")
    _save(tmp_path / "b", 18, RUN_B, uri, b"b18")
    found = resume.find_resume_point(tmp_path / "a-again", RUN_A, uri)
    assert found and found.endswith("checkpoint-12")
    assert (tmp_path / "a-again" / "checkpoint-12" / "optimizer.pt").read_bytes() == b"a12"
    assert "learning_rate 0.001 -> 0.003" in caplog.text  # says why 18 was not resumed
    found = resume.find_resume_point(tmp_path / "b-again", RUN_B, uri)
    assert found and found.endswith("checkpoint-18")
    other = {**RUN_A, "dataset_digest": "d9"}
    assert resume.find_resume_point(tmp_path / "c", other, uri) is None
    keys = client(s3_env).list_objects_v2(Bucket="data", Prefix="run-2/")["Contents"]
    assert len(keys) == 6  # optimizer.pt + MANIFEST.json of all three


def test_a_rewritten_checkpoint_never_pairs_an_old_manifest_with_new_files(
    s3_env, tmp_path, monkeypatch
):
    """Run B saves a step run A already mirrored: A's manifest is gone before B's files land."""
    from qlora_kfp.training import resume

    uri = "s3://data/run-3/train-checkpoints"
    _save(tmp_path / "a", 6, RUN_A, uri, b"a6")
    real, seen = s3.upload_folder, []

    def upload(folder, to, *a, **kw):  # what a reader could see while B's files upload
        listed = client(s3_env).list_objects_v2(Bucket="data", Prefix="run-3/")["Contents"]
        seen.append([o["Key"] for o in listed])
        return real(folder, to, *a, **kw)

    monkeypatch.setattr(s3, "upload_folder", upload)
    _save(tmp_path / "b", 6, RUN_B, uri, b"b6")
    monkeypatch.setattr(s3, "upload_folder", real)
    assert seen == [["run-3/train-checkpoints/checkpoint-6/optimizer.pt"]]
    found = resume.find_resume_point(tmp_path / "b-again", RUN_B, uri)
    assert (Path(found) / "optimizer.pt").read_bytes() == b"b6"
    assert resume.find_resume_point(tmp_path / "a-again", RUN_A, uri) is None


def test_wrong_credentials_fail_fast(tmp_path, monkeypatch):
    """moto with IAM auth on from the first request: unknown keys are refused as on AWS."""
    import os

    from support.servers import _serve, free_port

    port = free_port()
    exe = str(__import__("pathlib").Path(__import__("sys").executable).parent / "moto_server")
    env = {
        "INITIAL_NO_AUTH_ACTION_COUNT": "0",
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
    }
    with _serve(
        [exe, "-H", "127.0.0.1", "-p", str(port)],
        env,
        f"http://127.0.0.1:{port}/moto-api/",
        60,
        tmp_path / "moto-auth.log",
    ):
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        with pytest.raises(SourceError, match=r"s3://bucket/x: wrong AWS_ACCESS_KEY_ID"):
            s3.check_access("s3://bucket/x")
    assert os.environ["AWS_ACCESS_KEY_ID"] == "AKIAWRONGWRONGWRONG0"
