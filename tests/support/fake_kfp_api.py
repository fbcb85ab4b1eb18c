"""FakeKfpApiServer: a loopback HTTP server answering the KFP v2beta1 REST calls this project
makes the way the Kubeflow Pipelines 2.17 API server does.

It keeps pipelines, versions, experiments, runs and recurring runs, records every request,
and refuses what the real server refuses: single-user or multi-user mode (``multi_user``);
in multi-user mode a caller needs an identity and may use only its own namespaces, and runs,
recurring runs and experiments need one; run parameters are checked against the pipeline
spec's root inputs; cron, ``max_concurrency`` and ``sort_by`` are validated; recurring runs
without a version id follow the latest version. Each rule cites the Go file of
kubeflow/pipelines 2.17.0 it mirrors (paths under ``backend/src/``); the pure rules live in
``fake_kfp_rules.py``, the routes in ``fake_kfp_pipelines.py`` and ``fake_kfp_runs.py``, the
state and the namespace rules in ``fake_kfp_store.py``. A route the project does not use
answers 404 rather than guessing.
"""

from __future__ import annotations

import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from support import fake_kfp_rules as rules
from support.fake_kfp_runs import Api
from support.fake_kfp_store import V2, ApiError, Request, State

# gRPC code of each HTTP status the gateway maps (grpc-gateway runtime.HTTPStatusFromCode).
GRPC_CODE = {400: 3, 401: 16, 403: 7, 404: 5, 409: 6, 500: 13}

ROUTES = [  # (method, path pattern, Api method); path groups become arguments
    ("GET", rf"{V2}/healthz", "healthz"),
    ("POST", rf"{V2}/pipelines/upload", "upload_pipeline"),
    ("POST", rf"{V2}/pipelines/upload_version", "upload_version"),
    ("GET", rf"{V2}/pipelines", "list_pipelines"),
    ("DELETE", rf"{V2}/pipelines/([^/]+)", "delete_pipeline"),
    ("GET", rf"{V2}/pipelines/([^/]+)/versions", "list_versions"),
    ("GET", rf"{V2}/experiments", "list_experiments"),
    ("POST", rf"{V2}/experiments", "create_experiment"),
    ("POST", rf"{V2}/runs", "create_run"),
    ("POST", rf"{V2}/recurringruns", "create_recurring_run"),
    ("GET", rf"{V2}/recurringruns", "list_recurring_runs"),
    ("POST", rf"{V2}/recurringruns/([^/:]+):(enable|disable)", "change_recurring_run"),
    ("DELETE", rf"{V2}/recurringruns/([^/:]+)()", "change_recurring_run"),
]
KUBE_PROXY = re.compile(r"/api/v1/namespaces/([^/]+)/services/ml-pipeline:http/proxy/*(/.*)")
JSON_BODY = {"create_experiment", "create_run", "create_recurring_run"}
UPLOADS = {"upload_pipeline", "upload_version"}


def _kube_status(code: int, message: str) -> bytes:
    return json.dumps(
        {"kind": "Status", "status": "Failure", "message": message, "code": code}
    ).encode()


class Handler(BaseHTTPRequestHandler):
    api: Api

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, code: int, data: bytes, ctype: str = "application/json"):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        url = urllib.parse.urlparse(self.path)
        req = Request(
            self.command,
            url.path,
            urllib.parse.parse_qs(url.query),
            self.rfile.read(int(self.headers.get("Content-Length") or 0)),
            {k.lower(): v for k, v in self.headers.items()},
        )
        self.api.s.requests.append(req)
        path = req.path
        proxied = KUBE_PROXY.fullmatch(path)
        if proxied:
            # kfp.Client without a host goes through the kube API server's service proxy
            # (kfp/client/client.py _KUBE_PROXY_PATH) to ml-pipeline in the namespace it was
            # given; the Service lives where KFP is installed (manifests/kustomize/base).
            namespace, path = proxied.groups()
            if not req.headers.get("authorization"):
                return self._send(401, _kube_status(401, "Unauthorized"))
            if namespace != self.api.kfp_namespace:
                return self._send(404, _kube_status(404, 'services "ml-pipeline" not found'))
            # k8s.io/apiserver/pkg/endpoints/filters/authentication.go: once the kube API
            # server has authenticated a request it deletes the Authorization header, so
            # KFP behind the proxy never sees the caller's token.
            req.headers.pop("authorization")
        elif self.api.behind_kube_proxy:  # the kube API server has no /apis/v2beta1 routes
            return self._send(
                404, _kube_status(404, "the server could not find the requested resource")
            )
        for method, pattern, route in ROUTES:
            m = re.fullmatch(pattern, path)
            if m and method == self.command:
                name = route
                break
        else:
            return self._send(404, b'{"code": 5, "message": "Not Found"}')
        try:
            fn = getattr(self.api, name)
            out = fn(req, req.json()) if name in JSON_BODY else fn(req, *m.groups())
            return self._send(200, json.dumps(out).encode())
        except rules.RuleError as exc:
            err = ApiError(400, str(exc))
        except ApiError as exc:
            err = exc
        if name in UPLOADS:
            # pipeline_upload_server.go: writeErrorToResponse (apiv1beta1.Error JSON) or,
            # for validation errors, http.Error (plain text).
            if err.message.startswith("Namespace is required"):
                return self._send(err.status, (err.message + "\n").encode(), "text/plain")
            body = {"error_message": err.message, "error_details": err.message}
        else:  # grpc-gateway: a google.rpc.Status
            body = {"code": GRPC_CODE[err.status], "message": err.message, "details": []}
        return self._send(err.status, json.dumps(body).encode())

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class FakeKfpApiServer:
    """Start on a free 127.0.0.1 port; ``host`` is what ``kfp.Client(host=...)`` takes.

    Args:
        multi_user: answer as a multi-user (full Kubeflow) deployment.
        version: the ``tag_name`` healthz reports (the backend's release).
        user_namespaces: the profile namespaces the caller may use in multi-user mode.
        require_namespace: REQUIRE_NAMESPACE_FOR_PIPELINES (2.15+, default off).
        kfp_namespace: where KFP itself runs (writes on shared pipelines are checked there).
    """

    def __init__(
        self,
        *,
        multi_user=False,
        version="2.17.0",
        user_namespaces=("alice",),
        require_namespace=False,
        kfp_namespace="kubeflow",
    ):
        self.state = State()
        self.api = Api(
            self.state,
            multi_user=multi_user,
            version=version,
            user_namespaces=user_namespaces,
            require_namespace=require_namespace,
            kfp_namespace=kfp_namespace,
        )

    def __enter__(self):
        handler = type("BoundHandler", (Handler,), {"api": self.api})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # Polled every 10 ms: shutdown() waits for the poll (0.5 s by default, 80 times a run).
        threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.state.requests]
