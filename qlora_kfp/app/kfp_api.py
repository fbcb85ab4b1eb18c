"""The Kubeflow Pipelines API server: connecting, its version and mode, one-line errors.

``connect()`` finds the API (``--host`` / ``KFP_HOST``, else the kube context through the
API server proxy of ``ml-pipeline`` in ``KFP_PROXY_NAMESPACE``, default ``kubeflow``), reads
the server's healthz (release, single- or multi-user), stops below the oldest backend the
compiled pipeline runs on and warns below the one it fully works on. In multi-user mode
(full Kubeflow) every resource goes to the profile namespace ``KFP_NAMESPACE`` (or the one
the client finds in-cluster), which is a different thing from where KFP itself runs.
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any

from qlora_kfp import env
from qlora_kfp.errors import ConfigError

# 2.14's kubernetes_platform proto has no `optional` on secret/config-map env, and its
# compiler unmarshals each task's Kubernetes config strictly at run creation
# (backend/src/v2/compiler/argocompiler/container.go): it refuses every run of ours.
# tests/pipelines/test_kfp_releases.py parses the compiled YAML with each release's own protos.
MIN_BACKEND = (2, 15)
FULL_BACKEND = (2, 17)  # the exit handler's state under conditions/loops; KFP_RETRY_INDEX
SHORTFALLS = {  # what a backend below FULL_BACKEND does differently, oldest first
    (2, 17): "the exit handler sees RUNNING for finished runs and reads the outcome from "
    "MLflow, and retries rerun errors no retry can fix",
}


@dataclass
class Backend:
    """A connected API server and where this project's resources go on it."""

    client: Any  # kfp.Client: host, auth, kube proxy; its generated API objects make the calls
    host: str
    multi_user: bool
    version: str  # healthz tag_name, e.g. "2.17.0" ("unknown" on custom builds)
    namespace: str | None  # the profile namespace in multi-user mode, else None
    ui: str | None  # KFP UI base URL for links, when known

    def link(self, fragment: str) -> str | None:
        """A UI link (``#/runs/details/<id>``), or None without a UI base URL."""
        return f"{self.ui.rstrip('/')}/{fragment}" if self.ui else None


def parse_version(tag: str) -> tuple[int, int] | None:
    """``(2, 17)`` from a healthz ``tag_name`` such as ``2.17.0`` or ``v2.15.1-rc.0``."""
    m = re.match(r"v?(\d+)\.(\d+)", tag or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_version(tag: str, host: str) -> list[str]:
    """Raise below MIN_BACKEND; return the warnings for an older or unknown backend."""
    version = parse_version(tag)
    floor = ".".join(map(str, MIN_BACKEND))
    full = ".".join(map(str, FULL_BACKEND))
    if version is None:
        return [
            f"{host}: cannot tell the Kubeflow Pipelines release (healthz tag_name {tag!r}); "
            f"this pipeline needs {floor} or later and works fully on {full}"
        ]
    shown = ".".join(map(str, version))
    if version < MIN_BACKEND:
        raise ConfigError(
            f"{host}: Kubeflow Pipelines {shown} is older than {floor}, the oldest backend the "
            f"compiled pipeline runs on (it refuses the runs: no `optional` on secret and "
            f"config-map env vars); upgrade KFP"
        )
    return [
        f"{host}: Kubeflow Pipelines {shown} is older than {full}: {what}"
        for below, what in SHORTFALLS.items()
        if version < below
    ]


def api_error(what: str, exc: Exception, backend: Backend | None = None) -> ConfigError:
    """One line for an ApiException: what was refused, the HTTP status, the server's reason."""
    status = getattr(exc, "status", 0)
    body = getattr(exc, "body", None) or ""
    body = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    try:  # grpc-gateway: {"message"}; the upload endpoints: {"error_message"}; else text
        data = json.loads(body)
        reason = data.get("message") or data.get("error_message") or body
    except (ValueError, AttributeError):
        reason = body or getattr(exc, "reason", "") or str(exc)
    reason = " ".join(str(reason).split())[:500]
    hint = ""
    proxied = backend is not None and "/services/ml-pipeline" in backend.host
    if status == 401 and proxied:  # the kube API proxy drops the caller's credentials
        hint = "; the kube API proxy passes no identity on: set KFP_HOST (the Kubeflow gateway) and KFP_TOKEN"
    elif status == 401:
        hint = "; set KFP_TOKEN (a token the API server accepts)"
    elif status == 403 and backend is not None and backend.namespace:
        hint = f"; check that your account may use namespace {backend.namespace!r} (KFP_NAMESPACE)"
    return ConfigError(f"{what}: the KFP API answered {status}: {reason}{hint}")


def call(what: str, fn, *args, backend: Backend | None = None, **kwargs):
    """Call a generated API method; a refusal or an unreachable host becomes a ConfigError."""
    import kfp_server_api
    import urllib3

    try:
        return fn(*args, **kwargs)
    except kfp_server_api.ApiException as exc:
        raise api_error(what, exc, backend) from None
    except urllib3.exceptions.HTTPError as exc:
        host = backend.host if backend else "the KFP API"
        raise ConfigError(
            f"{what}: cannot reach {host} ({type(exc).__name__}); check KFP_HOST"
        ) from None


def _client(host: str | None, proxy_namespace: str):
    import kfp

    class Client(kfp.Client):
        def _load_config(self, *args, **kwargs):
            config = super()._load_config(*args, **kwargs)
            hook, proxied = config.refresh_api_key_hook, config.host
            if hook is not None and "/services/ml-pipeline" in (proxied or ""):
                # A kube context with a token: the kube config loader's refresh hook, run
                # before every request, copies the cluster's bare address back into host and
                # drops the service-proxy path the client appended (kubeflow/pipelines#8313,
                # still so in kfp 2.17), so every call would miss ml-pipeline. The hook also
                # reinstalls itself, hence ours does the same after it.
                def keep_proxy_path(cfg):
                    hook(cfg)
                    cfg.host, cfg.refresh_api_key_hook = proxied, keep_proxy_path

                config.refresh_api_key_hook = keep_proxy_path
            return config

    with warnings.catch_warnings():  # "This client only works with ... v2.0.0-beta.2 and later"
        warnings.simplefilter("ignore", FutureWarning)
        # kfp.Client's namespace is where it looks for the ml-pipeline service through the
        # kube API proxy (and in-cluster DNS), not where resources go. Without a host the kube
        # context's own credentials are used: the client would send a KFP_TOKEN to
        # http://localhost instead.
        return Client(
            host=host,
            existing_token=(env.text("KFP_TOKEN") or None) if host else None,
            namespace=proxy_namespace,
        )


def connect(host: str | None = None) -> Backend:
    """Connect, check the backend's release, and settle the namespace resources go to."""
    host = host or env.text("KFP_HOST") or None
    proxy_namespace = env.text("KFP_PROXY_NAMESPACE")
    import kfp_server_api
    import urllib3

    try:
        client = _client(host, proxy_namespace)
    # The constructor itself reads healthz: refused, unreachable, or 5 failed tries.
    except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ConfigError(
            f"cannot reach the KFP API at {host or 'the kube context'} ({type(exc).__name__}); "
            "check KFP_HOST, KFP_TOKEN or your kube context"
        ) from None
    where = client._existing_config.host
    # healthz's generated model drops tag_name and commit_sha: read the raw answer.
    raw = call("healthz", client._healthz_api.healthz_service_get_healthz, _preload_content=False)
    health = json.loads(raw.data or b"{}")
    for line in check_version(health.get("tag_name", ""), where):
        print(f"warning: {line}", file=sys.stderr)
    multi_user = bool(health.get("multi_user"))
    namespace = None
    if multi_user:
        # The client fills its context namespace from the pod's service account in-cluster;
        # with a proxy namespace of its own that slot holds the proxy's, so it is no profile.
        found = client.get_user_namespace() if proxy_namespace == "kubeflow" else ""
        namespace = env.text("KFP_NAMESPACE") or found or None
        if not namespace:
            raise ConfigError(
                f"{where} runs multi-user Kubeflow Pipelines: set KFP_NAMESPACE to your "
                "profile namespace (pipelines, runs and schedules are created there)"
            )
    ui = env.text("KFP_UI_URL") or host
    return Backend(client, where, multi_user, health.get("tag_name", ""), namespace, ui)
