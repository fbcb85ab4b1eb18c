"""``qlora-kfp run``'s argument handling, without running a pipeline."""

from __future__ import annotations

import pytest

from qlora_kfp.app import cli, local_run


@pytest.fixture
def no_pipeline(monkeypatch):
    """Any pipeline run fails the test: these cases must stop before one starts."""

    def ran(*a, **kw):
        raise AssertionError("a pipeline ran")

    monkeypatch.setattr(local_run, "demo", ran)
    monkeypatch.setattr(local_run, "run_pipeline", ran)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize(
    "given, missing",
    [(["--data_source", "mine.jsonl"], "base_model"), (["--base_model", "org/m"], "data_source")],
)
def test_one_source_without_the_other_is_a_one_line_error(
    no_pipeline, tmp_path, capsys, given, missing
):
    assert cli.main(["run", "--workdir", str(tmp_path), *given]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"needs --{missing} too" in err
    assert "demo" in err


def test_a_params_file_with_one_source_is_the_same_error(no_pipeline, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("data_source: mine.jsonl\n")
    assert cli.main(["run", "--workdir", str(tmp_path), "--params_file", str(params)]) == 2
    assert "--data_source needs --base_model too" in capsys.readouterr().err
