"""FakeKfpApiServer: a loopback HTTP server speaking the KFP v2beta1 REST calls we use.

It keeps just enough state (pipelines, versions, experiments, runs, recurring runs) to answer
``kfp.Client`` the way a real KFP API server would, and records every request so tests can
assert on what was sent. It is a test double for the API server, not a KFP implementation.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Request:
    method: str
    path: str
    query: dict
    body: bytes
    headers: dict = field(default_factory=dict)

    def json(self):
        return json.loads(self.body or b"{}")


@dataclass
class State:
    pipelines: dict = field(default_factory=dict)  # id -> {"name", "versions": [ids]}
    experiments: dict = field(default_factory=dict)  # id -> name
    runs: list = field(default_factory=list)
    recurring: dict = field(default_factory=dict)  # id -> body + status
    requests: list = field(default_factory=list)
    ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"


def _filter_name(query: dict) -> str | None:
    raw = query.get("filter", [""])[0]
    m = re.search(r'"string_value":\s*"([^"]*)"', raw) or re.search(
        r'"stringValue":\s*"([^"]*)"', raw
    )
    return m.group(1) if m else None


class Handler(BaseHTTPRequestHandler):
    state: State

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, obj, code=200):
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self):
        url = urllib.parse.urlparse(self.path)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        req = Request(
            self.command,
            url.path,
            urllib.parse.parse_qs(url.query),
            body,
            {k.lower(): v for k, v in self.headers.items()},
        )
        self.state.requests.append(req)
        s, p = self.state, url.path
        if p == "/apis/v2beta1/healthz":
            return self._send({"multi_user": False})
        if p == "/apis/v2beta1/pipelines" and self.command == "GET":
            name = _filter_name(req.query)
            found = [
                {"pipeline_id": k, "display_name": v["name"]}
                for k, v in s.pipelines.items()
                if name is None or v["name"] == name
            ]
            return self._send({"pipelines": found, "total_size": len(found)} if found else {})
        if p == "/apis/v2beta1/pipelines/upload":
            pid, vid = s.new_id("pipeline"), s.new_id("version")
            name = req.query.get("name", ["?"])[0]
            s.pipelines[pid] = {"name": name, "versions": [vid]}
            return self._send({"pipeline_id": pid, "display_name": name})
        if p == "/apis/v2beta1/pipelines/upload_version":
            pid = req.query.get("pipelineid", [""])[0]
            vid = s.new_id("version")
            s.pipelines[pid]["versions"].append(vid)
            return self._send(
                {
                    "pipeline_id": pid,
                    "pipeline_version_id": vid,
                    "display_name": req.query.get("name", [""])[0],
                }
            )
        m = re.fullmatch(r"/apis/v2beta1/pipelines/([^/]+)/versions", p)
        if m:
            versions = list(reversed(s.pipelines[m.group(1)]["versions"]))  # newest first
            return self._send(
                {
                    "pipeline_versions": [
                        {"pipeline_id": m.group(1), "pipeline_version_id": v} for v in versions
                    ]
                }
            )
        if p == "/apis/v2beta1/experiments" and self.command == "GET":
            name = _filter_name(req.query)
            found = [
                {"experiment_id": k, "display_name": v}
                for k, v in s.experiments.items()
                if v == name
            ]
            return self._send({"experiments": found} if found else {})
        if p == "/apis/v2beta1/experiments" and self.command == "POST":
            eid = s.new_id("experiment")
            s.experiments[eid] = req.json()["display_name"]
            return self._send({"experiment_id": eid, "display_name": s.experiments[eid]})
        if p == "/apis/v2beta1/runs" and self.command == "POST":
            run = {**req.json(), "run_id": s.new_id("run")}
            s.runs.append(run)
            return self._send(run)
        if p == "/apis/v2beta1/recurringruns" and self.command == "POST":
            rr = {**req.json(), "recurring_run_id": s.new_id("rr"), "status": "ENABLED"}
            s.recurring[rr["recurring_run_id"]] = rr
            return self._send(rr)
        if p == "/apis/v2beta1/recurringruns" and self.command == "GET":
            # The v2beta1 swagger names this list field in camelCase (json_name).
            return self._send({"recurringRuns": list(s.recurring.values())})
        m = re.fullmatch(r"/apis/v2beta1/recurringruns/([^/:]+)(:enable|:disable)?", p)
        if m:
            rid, action = m.groups()
            if self.command == "DELETE":
                s.recurring.pop(rid)
            elif action:
                s.recurring[rid]["status"] = "ENABLED" if action == ":enable" else "DISABLED"
            return self._send({})
        return self._send({"error": f"FakeKfpApiServer: no route for {self.command} {p}"}, 404)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = _handle


class FakeKfpApiServer:
    """Start on a free 127.0.0.1 port; ``host`` is what ``kfp.Client(host=...)`` takes."""

    def __enter__(self):
        self.state = State()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.host = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def calls(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.state.requests]
