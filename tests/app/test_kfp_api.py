"""Finding the KFP API: the backend version floor, the profile namespace, the kube-context
path through the kube API server's service proxy, and links without a UI host."""

from __future__ import annotations

import pytest
from support import remote_cli
from support.fake_kfp_api import FakeKfpApiServer
from support.remote_cli import PACKAGE, REQUIRED


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """Start a fake with the given options, reached through KFP_HOST and a token."""
    remote_cli.isolate(monkeypatch, tmp_path)
    servers = []

    def start(**options):
        server = FakeKfpApiServer(**options).__enter__()
        servers.append(server)
        monkeypatch.setenv("KFP_HOST", server.host)
        monkeypatch.setenv("KFP_TOKEN", "secret-token")
        return server

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def qlora(capsys):
    return lambda *args: remote_cli.run(capsys, *args)


@pytest.fixture
def kube_context(monkeypatch, tmp_path):
    """Point the kube context at a fake (no KFP_HOST): kfp.Client then goes through the kube
    API server's service proxy with the kubeconfig's token."""

    def use(server):
        import kubernetes.config.kube_config as kube_config

        monkeypatch.delenv("KFP_HOST", raising=False)
        monkeypatch.delenv("KFP_TOKEN", raising=False)
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)  # not in a pod
        path = tmp_path / "kubeconfig"
        path.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters: [{{name: c, cluster: {{server: '{server.host}'}}}}]\n"
            "users: [{name: u, user: {token: kube-token}}]\n"
            "contexts: [{name: fake, context: {cluster: c, user: u}}]\n"
        )
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
        server.api.behind_kube_proxy = True

    return use


@pytest.mark.parametrize(
    "tag,warnings",
    [
        ("2.17.0", []),
        ("2.16.1", ["sees RUNNING for finished runs"]),
        ("v2.15.0", ["sees RUNNING for finished runs"]),
        ("unknown", ["cannot tell the Kubeflow Pipelines release (healthz tag_name 'unknown')"]),
    ],
    ids=["2.17", "2.16", "v-prefix", "custom-build"],
)
def test_upload_warns_on_backends_older_than_2_17(serve, qlora, tag, warnings):
    server = serve(version=tag)
    code, out, err = qlora("upload", "--package", PACKAGE)
    assert code == 0 and out["pipeline_id"] in server.state.pipelines
    lines = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(lines) == len(warnings)
    for line, expected in zip(lines, warnings, strict=True):
        assert expected in line


@pytest.mark.parametrize(
    "command",
    [["upload", "--package", PACKAGE], ["run-remote", *REQUIRED], ["schedule", "list"]],
    ids=["upload", "run-remote", "schedule"],
)
def test_backends_older_than_2_15_are_refused_before_any_change(serve, qlora, command):
    server = serve(version="2.14.4")
    code, _, err = qlora(*command)
    assert code == 2 and "Kubeflow Pipelines 2.14 is older than 2.15" in err
    assert [m for m, _ in server.calls() if m != "GET"] == []


@pytest.mark.parametrize(
    "tag,parsed",
    [("2.17.0", (2, 17)), ("v2.15.1-rc.0", (2, 15)), ("master", None), ("", None)],
    ids=["release", "rc", "branch", "empty"],
)
def test_parse_version(tag, parsed):
    from qlora_kfp.app import kfp_api

    assert kfp_api.parse_version(tag) == parsed


def test_an_unreachable_host_is_one_clear_line(qlora, monkeypatch, tmp_path):
    remote_cli.isolate(monkeypatch, tmp_path)
    monkeypatch.setenv("KFP_HOST", "http://127.0.0.1:9")  # discard port: nothing listens
    code, _, err = qlora("upload", "--package", PACKAGE)
    assert code == 2 and "cannot reach the KFP API at http://127.0.0.1:9" in err
    assert len(err.strip().splitlines()) == 1


def test_multi_user_without_a_profile_namespace_stops_before_creating_anything(serve, qlora):
    server = serve(multi_user=True)
    code, _, err = qlora("upload", "--package", PACKAGE)
    assert code == 2 and "set KFP_NAMESPACE to your profile namespace" in err
    assert server.state.pipelines == {}


def test_multi_user_namespace_the_caller_may_not_use_is_one_clear_line(serve, qlora, monkeypatch):
    serve(multi_user=True, user_namespaces=("alice",))
    monkeypatch.setenv("KFP_NAMESPACE", "bob")
    code, _, err = qlora("upload", "--package", PACKAGE)
    assert code == 2 and "answered 403" in err and "namespace 'bob' (KFP_NAMESPACE)" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "proxy_namespace,env",
    [("kubeflow", {}), ("kfp-system", {"KFP_PROXY_NAMESPACE": "kfp-system"})],
    ids=["default-kubeflow", "KFP_PROXY_NAMESPACE"],
)
def test_kube_context_finds_the_api_where_kfp_runs_not_in_the_profile_namespace(
    serve, kube_context, qlora, monkeypatch, proxy_namespace, env
):
    server = serve(kfp_namespace=proxy_namespace)
    kube_context(server)
    monkeypatch.setenv("KFP_NAMESPACE", "alice")  # a profile namespace, not where KFP runs
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = qlora("upload", "--package", PACKAGE)
    assert code == 0, err
    assert out["pipeline_id"] in server.state.pipelines
    proxy = f"/api/v1/namespaces/{proxy_namespace}/services/ml-pipeline:http/proxy"
    assert [p for _, p in server.calls() if not p.startswith(proxy)] == [], server.calls()


def test_without_a_ui_host_commands_print_ids_and_create_once(serve, kube_context, qlora):
    server = serve()
    kube_context(server)
    code, up, err = qlora("upload", "--package", PACKAGE)
    assert code == 0, err
    assert set(up) == {"pipeline_id", "version_id", "name"}  # no link to make, no crash
    code, run, err = qlora("run-remote", *REQUIRED)
    assert code == 0, err
    assert [r["run_id"] for r in server.state.runs] == [run["run_id"]] and "url" not in run


def test_ui_links_come_from_kfp_ui_url(serve, kube_context, qlora, monkeypatch):
    server = serve()
    kube_context(server)
    monkeypatch.setenv("KFP_UI_URL", "https://kubeflow.example.com/pipeline/")
    assert qlora("upload", "--package", PACKAGE)[0] == 0
    code, run, _ = qlora("run-remote", *REQUIRED)
    assert run["url"] == f"https://kubeflow.example.com/pipeline/#/runs/details/{run['run_id']}"


def test_multi_user_through_the_kube_proxy_says_no_identity_passes(
    serve, kube_context, qlora, monkeypatch
):
    server = serve(multi_user=True)
    kube_context(server)
    monkeypatch.setenv("KFP_NAMESPACE", "alice")
    code, _, err = qlora("upload", "--package", PACKAGE)
    assert code == 2 and "answered 401" in err and "set KFP_HOST (the Kubeflow gateway)" in err
    assert server.state.pipelines == {}
