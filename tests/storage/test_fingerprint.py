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


class _Hub:
    """The hub's repo-info endpoint (``GET /api/{models,datasets}/<id>[/revision/<rev>]``,
    answering ``{"id", "sha"}``), on 127.0.0.1: no hub is reachable here, and the fingerprint
    must still be tested through huggingface_hub's own client."""

    def __init__(self):
        import http.server
        import json
        import threading

        hub = self
        self.sha = {"org/model": "1" * 40, "org/data": "a" * 40}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                parts = self.path.split("?")[0].split("/")
                repo = "/".join(parts[3:5]) if len(parts) >= 5 else ""
                if repo not in hub.sha:
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"id": repo, "sha": hub.sha[repo]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # Polled every 10 ms: shutdown() waits for the poll (0.5 s by default, 80 times a run).
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    server = _Hub()
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    yield server
    server.server.shutdown()


@pytest.mark.parametrize("kind,repo", [("model", "org/model"), ("dataset", "org/data")])
def test_a_new_hub_revision_changes_the_digest(hub, kind, repo):
    """A model or dataset pushed again under the same id must miss KFP's cache."""
    first = source_digest(repo, kind)
    assert first == f"hub:{repo}@{hub.sha[repo]}"
    hub.sha[repo] = "2" * 40
    assert source_digest(repo, kind) != first


def test_a_hub_that_cannot_answer_leaves_the_id(hub):
    assert source_digest("org/unknown", "model") == "hub:org/unknown"
