"""Shared fixtures: a tiny random Llama + tokenizer and the artifacts of each stage.

Session-scoped so the chain (prepare -> quantize -> train) is built once and each stage's
tests assert on real artifacts produced by the previous stage.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: a miss costs 25 s otherwise
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One OpenMP thread a process. `make test` runs a worker a core, and each worker starts
# training processes and pipeline tasks beside the other's: with torch's default (a thread a
# core) every process's OpenMP team spin-waits for threads the other processes hold, and a
# tiny model's steps, which two threads do not speed up, take several times longer.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests opt in to tracking explicitly
for _name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):  # set by KFP's MLflow plugin in a pod
    os.environ.pop(_name, None)
os.environ.pop("QLORA_KFP_ARTIFACT_URI", None)
os.environ.pop("KFP_RUN_ID", None)  # the pod label of a KFP run (tasks/context.py)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]  # the repository

sys.path.insert(0, os.path.dirname(__file__))  # `from support import servers` (tests/support/)

try:
    import torch  # noqa: E402

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # compile-only environments
    HAS_CUDA = False


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    unmarked = []
    for item in items:
        # Checked at collection, before the skip below: a gpu test that trains without `slow`
        # fails only where a GPU runs it, which CI never is.
        marks = {m.name for m in item.iter_markers()}
        for fixture, mark in MARK_OF_FIXTURE.items():
            if fixture in getattr(item, "fixturenames", ()) and not marks & {"slow", "integration"}:
                unmarked.append(f"{item.nodeid} uses the {fixture} fixture: mark it {mark}")
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)
        # A test on the real API server starts real servers: the `integration` marker's
        # meaning, set here so no such test can go without it.
        if {"kube_cluster", "kubeflow_trainer"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
    if unmarked:
        raise pytest.UsageError("make test-fast would run these:\n" + "\n".join(unmarked))
    _longest_files_first(items)
    _check_shared_files(items)


# Session fixtures dear enough (two training processes, ~25 s; the Trainer's and JobSet's
# managers, ~10 s) that the files sharing one go to one worker, which builds it once: each
# pytest-xdist worker builds its own session fixtures. Listed by hand because xdist's
# scheduler sees node ids only; the collection checks the list (_check_shared_files).
FILES_SHARING = {
    "two_processes": (
        "tests/training/test_ddp.py",
        "tests/training/test_fsdp.py",
        "tests/stages/test_train_nodes.py",
    ),
    "kubeflow_trainer": (
        "tests/backend/test_trainer_backend.py",
        "tests/training/test_trainjob_trainer.py",
    ),
}
GROUP_OF_FILE = {path: name for name, paths in FILES_SHARING.items() for path in paths}


def _check_shared_files(items) -> None:
    """A test using a fixture of FILES_SHARING from a file not listed with it fails the
    collection: its worker would build the fixture a second time."""
    missing = {
        f"{item.nodeid.split('::')[0]} uses {fixture}: list it in FILES_SHARING[{fixture!r}]"
        for item in items
        for fixture, paths in FILES_SHARING.items()
        if fixture in getattr(item, "fixturenames", ()) and file_of(item.nodeid) not in paths
    }
    if missing:
        raise pytest.UsageError("tests/conftest.py:\n" + "\n".join(sorted(missing)))


def pytest_xdist_make_scheduler(config, log):
    """Whole files to a worker, as ``--dist loadfile``, the files of a FILES_SHARING entry as
    one, in the order of the collection (:func:`_longest_files_first`). (xdist's own
    ``--dist loadgroup`` renames node ids, which pytest 9.2's no longer takes: every test
    became its own group, and module fixtures ran once a worker.)"""
    return file_group_scheduling(config, log)


def file_group_scheduling(config, log=None):
    from xdist.scheduler import LoadScopeScheduling

    class FileGroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

        def schedule(self) -> None:
            # xdist reorders the files by their number of tests unless told not to (its
            # --loadscope-reorder, on by default): a file of 79 quick tests went out before
            # the tracking suite's three pipeline runs, which then ran alone at the end.
            self.config.option.loadscopereorder = False
            super().schedule()

    return FileGroupScheduling(config, log)


def worker_scope(nodeid: str) -> str:
    """What goes to one worker: the test's file, or its FILES_SHARING entry."""
    path = file_of(nodeid)
    return GROUP_OF_FILE.get(path, path)


def file_of(nodeid: str) -> str:
    """The test file of a node id (``tests/x/test_y.py::test_z[a]`` -> ``tests/x/test_y.py``)."""
    return nodeid.split("::")[0]


# The longest work units (a file, or a FILES_SHARING group), longest first: seconds of one
# worker in `make test` on 2 cores (session 16). Handed out first, the other files fill the
# gaps: each worker then ends within a few seconds of the other (longest processing time
# first), where a long file handed out late ran alone at the end. A unit not listed goes after
# them, heavier marks first; a listed one that is gone fails the collection.
LONGEST_FIRST = (
    "tests/e2e/test_tracking_servers.py",  # 211: three pipeline runs against real servers
    "two_processes",  # 145: DDP, FSDP and two-node runs of 2 processes
    "tests/e2e/test_sweep_local.py",  # 53: the sweep pipeline, two trials
    "tests/training/test_resume.py",  # 46
    "tests/bench/test_build_4bit.py",  # 40
    "tests/bench/test_trl_peer.py",  # 39
    "tests/manifests/test_manifests_mlflow.py",  # 22
    "tests/bench/test_merge_bench.py",  # 21
)


def _check_longest_first() -> None:
    gone = [u for u in LONGEST_FIRST if u not in FILES_SHARING and not (ROOT / u).is_file()]
    if gone:
        raise pytest.UsageError(f"tests/conftest.py: LONGEST_FIRST lists {gone}: no such file")


def _longest_files_first(items) -> None:
    """The units of LONGEST_FIRST first, in its order, then the files that run pipelines or
    train (marked slow and integration, then slow); each file's tests in their order.
    ``make test`` hands whole files (or FILES_SHARING groups) to 2 workers in this order
    (``-n 2``, :func:`pytest_xdist_make_scheduler`)."""
    _check_longest_first()
    rank: dict[str, int] = {}
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        heavy = 2 if {"slow", "integration"} <= marks else 1 if "slow" in marks else 0
        path = file_of(item.nodeid)
        rank[path] = max(rank.get(path, 0), heavy)
    listed = {unit: i for i, unit in enumerate(LONGEST_FIRST)}

    def key(item) -> tuple[int, int]:
        unit = worker_scope(item.nodeid)
        return (listed.get(unit, len(listed)), -rank[file_of(item.nodeid)])

    items.sort(key=key)  # stable: a file's tests stay in their order


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test on the Trainer's backend shows the end of its controller managers' logs."""
    report = yield
    backend = getattr(item, "funcargs", {}).get("kubeflow_trainer")
    if report.failed and backend is not None:
        report.sections.append(("Trainer and JobSet controller managers", backend.logs()))
    return report


# `make test-fast` runs what is marked neither slow nor integration. What makes a test slow or
# integration is kept honest here rather than by memory: a session fixture that trains or
# starts servers, or the train stage's training loop run in this process.
MARK_OF_FIXTURE = {
    "trained": "slow",
    "services": "integration",
    "s3_only": "integration",
    "s3_env": "integration",
    "gpu_assets": "slow",  # tests/training/test_gpu_training.py: builds and trains on a GPU
    "two_processes": "slow",  # the train stage in two processes (tests/support/ranks.py)
    "preempted_fsdp": "slow",  # tests/training/test_fsdp.py: the same, under FSDP, killed and resumed
}


@pytest.fixture(autouse=True)
def _unmarked_tests_neither_train_nor_start_servers(request, monkeypatch):
    if any(request.node.get_closest_marker(m) for m in ("slow", "integration")):
        return
    for fixture, mark in MARK_OF_FIXTURE.items():
        if fixture in request.fixturenames:
            pytest.fail(f"uses the {fixture} fixture: mark it {mark} (make test-fast skips it)")
    try:
        from qlora_kfp.training import memory_fit
    except ImportError:  # compile-only environments
        return

    def refuse(*args, **kwargs):
        raise AssertionError("this test trains: mark it slow (make test-fast skips it)")

    monkeypatch.setattr(memory_fit, "train_in_memory", refuse)


def _root_handlers() -> list:
    """The root logger's handlers but pytest's own (re-added around each test phase)."""
    import logging

    return [h for h in logging.getLogger().handlers if not type(h).__module__.startswith("_pytest")]


@pytest.fixture(autouse=True)
def _no_root_log_handler_outlives_its_test():
    """A handler left on the root logger outlives its test and its stream: bound to a stream
    the test closed (a run's progress stream, capsys), it prints a "--- Logging error ---"
    traceback into whichever later test logs, on whichever worker runs after it."""
    import logging

    before = _root_handlers()
    yield
    left = [h for h in _root_handlers() if h not in before]
    if left:
        for h in left:
            logging.getLogger().removeHandler(h)
        pytest.fail(f"the test left {left} on the root logger: restore its handlers")


@pytest.fixture(autouse=True)
def _no_global_tracking_uri_outlives_its_test():
    """``mlflow.set_tracking_uri`` outlives the test and beats ``MLFLOW_TRACKING_URI``: every
    later test's ``local_mlflow`` store would be the server of the test that set it (a shared
    registry, other tests' runs). Tests set the variable with monkeypatch instead."""
    yield
    utils = sys.modules.get("mlflow.tracking._tracking_service.utils")
    if utils is not None and utils._tracking_uri is not None:
        leaked, utils._tracking_uri = utils._tracking_uri, None
        pytest.fail(
            f"mlflow.set_tracking_uri({leaked!r}) outlived the test: monkeypatch "
            "MLFLOW_TRACKING_URI instead"
        )


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory):
    """A new MLflow SQLite store, made once: creating its tables (MLflow's alembic migrations)
    takes seconds, copying the file takes milliseconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-db") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch, empty_mlflow_db):
    """MLflow tracking into a SQLite store under ``tmp_path`` (artifacts beside it): a copy of
    the same new store each test, as MLflow would have made it."""
    import shutil

    shutil.copyfile(empty_mlflow_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("QLORA_KFP_MLFLOW_ARTIFACT_ROOT", (tmp_path / "art").as_uri())
    return tmp_path


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory):
    from qlora_kfp.app.demo import make_demo_assets

    return make_demo_assets(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def tokenizer(demo_assets):
    """The demo model's tokenizer with the chat template prepare-dataset gives it."""
    from qlora_kfp.data.templates import apply_template
    from qlora_kfp.storage.sources import load_tokenizer

    tok = load_tokenizer(demo_assets["base_model"])
    apply_template(tok, "auto")
    return tok


@pytest.fixture(scope="session")
def prepared(demo_assets, tmp_path_factory):
    from qlora_kfp.configs import PrepareConfig
    from qlora_kfp.stages.prepare import run_prepare

    out = tmp_path_factory.mktemp("prepared") / "dataset"
    cfg = PrepareConfig(
        data_source=demo_assets["data_source"],
        base_model=demo_assets["base_model"],
        max_seq_length=64,
        eval_fraction=0.15,
    )
    return run_prepare(cfg, str(out))


@pytest.fixture(scope="session")
def quantized(demo_assets, prepared, tmp_path_factory):
    from qlora_kfp.configs import QuantizeConfig
    from qlora_kfp.stages.quantize import run_quantize

    out = tmp_path_factory.mktemp("quantized") / "model"
    return run_quantize(
        QuantizeConfig(base_model=demo_assets["base_model"]), str(out), prepared.path
    )


TRAIN_KW = dict(
    learning_rate=5e-3,
    num_epochs=8.0,  # tuned/base eval loss measured 0.17 (asserted: < 0.5); last/first loss 0.14
    batch_size=8,
    lora_r=16,
    lora_alpha=32,
    lora_dropout=0.0,
    logging_steps=10,
    warmup_ratio=0.05,
)


@pytest.fixture(scope="session")
def trained(quantized, prepared, tmp_path_factory):
    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    out = tmp_path_factory.mktemp("adapter") / "adapter"
    return run_train(TrainConfig(**TRAIN_KW), quantized.path, prepared.path, str(out))


@pytest.fixture(scope="session")
def rank_site(tmp_path_factory):
    """The test hooks of the train stage's processes (tests/support/ranks.py), on their PYTHONPATH."""
    from support.ranks import write_site

    return write_site(tmp_path_factory.mktemp("site"))


@pytest.fixture(scope="session")
def two_processes(quantized, prepared, rank_site, tmp_path_factory):
    """An uninterrupted DDP run of 2 processes x 2 rows a step (tests/support/ranks.py's CFG):
    ``(adapter folder, result)``. Shared by the DDP and FSDP tests, which compare with it."""
    from support.ranks import result, start

    out = tmp_path_factory.mktemp("ddp") / "adapter"
    proc = start(quantized.path, prepared.path, out, rank_site, num_processes=2, batch_size=2)
    return out, result(proc)


@pytest.fixture
def write_rows(tmp_path):
    """Write rows to a file of the given format and return its path."""
    import csv
    import json

    def _write(rows, fmt="jsonl", name="data"):
        path = tmp_path / f"{name}.{fmt}"
        if fmt == "jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif fmt == "json":
            path.write_text(json.dumps(rows))
        elif fmt == "csv":
            with open(path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=list(rows[0]))
                w.writeheader()
                w.writerows(rows)
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            pq.write_table(pa.Table.from_pylist(rows), path)
        return str(path)

    return _write


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """Real S3-compatible (moto) and MLflow servers on 127.0.0.1, with their buckets."""
    import boto3
    from support.servers import AWS_ENV, Services, mlflow_server, s3_server

    work = tmp_path_factory.mktemp("servers")
    with s3_server(work) as endpoint:
        s3 = boto3.client(
            "s3",
            endpoint_url=endpoint,
            **{
                "aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
                "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                "region_name": AWS_ENV["AWS_DEFAULT_REGION"],
            },
        )
        for bucket in ("mlflow", "pipeline"):
            s3.create_bucket(Bucket=bucket)
        with mlflow_server(work, endpoint, "mlflow") as uri:
            yield Services(endpoint, uri)


@pytest.fixture(scope="session")
def s3_only(tmp_path_factory):
    """Just the S3-compatible server (fast), for transfer tests."""
    import boto3
    from support.servers import Services, s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as endpoint:
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        ).create_bucket(Bucket="data")
        yield Services(endpoint)


@pytest.fixture
def s3_env(s3_only, monkeypatch):
    for k, v in s3_only.env().items():
        monkeypatch.setenv(k, v)
    return s3_only


@pytest.fixture(scope="session")
def kube_cluster(tmp_path_factory):
    """A real etcd, kube-apiserver and kube-controller-manager on 127.0.0.1
    (tests/support/kube_apiserver.py), with the CRDs of Istio's security policies, KServe's
    InferenceService, the Trainer's TrainJob and Training Operator's PyTorchJob installed
    before the controller manager starts: its garbage collector finds the kinds to watch at
    start and then every 30 s, and a foreground deletion of a kind it does not watch yet
    (the runner replacing an earlier attempt's PyTorchJob) waited for that, 28 s."""
    from support.kube_api import Kube
    from support.kube_apiserver import kube_apiserver
    from support.trainjob_cluster import PLURAL, pytorchjob_crd, trainer_crds

    def install_crds(cluster) -> None:
        admin = Kube(cluster.url, cluster.ca, cluster.admin_token)
        for schemas in ("istio-security.json", "kserve-inferenceservice.json"):
            admin.install_crds(schemas)
        admin.apply_crds([*trainer_crds(PLURAL), pytorchjob_crd()])

    with kube_apiserver(
        tmp_path_factory.mktemp("kube"), before_controllers=install_crds
    ) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def kubeflow_trainer(tmp_path_factory):
    """Kubeflow Trainer's own controller manager and webhooks on a real API server of their own
    (tests/support/trainer_backend.py), with the ``torch-distributed`` ClusterTrainingRuntime."""
    from support.trainer_backend import trainer_backend

    with trainer_backend(tmp_path_factory.mktemp("trainer")) as backend:
        yield backend


@pytest.fixture(scope="session")
def kube(kube_cluster):
    """The real API server as cluster-admin (tests/support/kube_api.py)."""
    from support.kube_api import Kube

    return Kube(kube_cluster.url, kube_cluster.ca, kube_cluster.admin_token)


@pytest.fixture(scope="session")
def example_namespace(kube):
    """The example overlay applied for real by cluster-admin, into its own namespace, once the
    controller manager has counted its quota. Returns the namespace."""
    from support.kube import kustomize

    docs = kustomize("manifests/overlays/example")
    (namespace,) = {d["metadata"]["namespace"] for d in docs}
    kube.namespace(namespace)
    assert kube.refused(docs) == {}
    kube.wait_quotas_counted(namespace)
    return namespace
