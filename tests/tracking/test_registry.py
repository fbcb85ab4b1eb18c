"""The model registry: a registered model is named by what it is (base model and dataset), and
a version's promotion tags stay true whatever later versions do."""

from __future__ import annotations

import re

import pytest

from qlora_kfp import configs
from qlora_kfp.errors import ConfigError
from qlora_kfp.tracking import parent_run, registry


def _name(base_model: str, data_source: str, given: str = "") -> str:
    return configs.RegisterConfig(base_model, data_source, given).registered_model_name


# base model, data source, registered_model_name given, the name versions go to
NAMES = [
    ("meta-llama/Llama-3.1-8B", "s3://bucket/datasets/support-v2/", "", "llama-3-1-8b-support-v2"),
    ("/models/tiny-llama", "/data/antonyms.jsonl", "", "tiny-llama-antonyms"),
    ("./Mistral-7B-v0.3/", "chats.jsonl.gz", "", "mistral-7b-v0-3-chats"),
    ("s3://models/qwen2.5-0.5b", "tatsu-lab/alpaca", "", "qwen2-5-0-5b-alpaca"),
    ("org/Model_X", "s3://bucket/Données Support.parquet", "", "model-x-donnees-support"),
    ("s3://models/", "s3://bucket/", "", "models-bucket"),
    ("org/model", "data/---.csv", "", "model-data"),
    ("meta-llama/Llama-3.1-8B", "s3://b/x/", "support-bot.v2", "support-bot.v2"),
    ("meta-llama/Llama-3.1-8B", "s3://b/x/", "Support_Bot-2", "Support_Bot-2"),
]


@pytest.mark.parametrize("base_model, data_source, given, expected", NAMES)
def test_registered_model_name(base_model, data_source, given, expected):
    assert _name(base_model, data_source, given) == expected


def test_a_long_derived_name_is_bounded_and_keeps_different_sources_apart():
    model = "org/" + "very-long-model-name-" * 3 + "8b"
    a = _name(model, "s3://b/" + "customer-support-conversations-" * 2 + "q1/")
    b = _name(model, "s3://b/" + "customer-support-conversations-" * 2 + "q2/")
    assert a != b
    for name in (a, b):
        assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", name), name
        assert name.startswith("very-long-model-name-") and "-customer-support-" in name
    assert _name(model, "s3://b/short/") == _name(model, "s3://b/short/")  # no clock, no chance
    short = _name(model, "s3://b/short/")
    assert short.split("-")[-2] == "short" and len(short) <= 63  # the short part stays whole


def test_the_demo_registers_as_tiny_llama_antonyms(demo_assets):
    """tests/e2e/test_tracking_servers.py reads the demo's versions under this name."""
    assert _name(demo_assets["base_model"], demo_assets["data_source"]) == "tiny-llama-antonyms"


ALLOWED = "use 1 to 63 letters, digits, '.', '_' or '-', beginning and ending with a letter"


@pytest.mark.parametrize(
    "given",
    [
        "team/support",  # MLflow refuses '/' and ':'
        "support:v2",
        "support@champion",  # models:/<name>@<alias> would misread it
        "support bot",
        "-support",
        "support.",
        "x" * 64,
    ],
)
def test_an_invalid_name_is_refused_saying_what_is_allowed(given):
    with pytest.raises(ConfigError) as err:
        _name("org/model", "data.jsonl", given)
    assert str(err.value).startswith(f"registered_model_name={given!r} is invalid: {ALLOWED}")
    assert "or leave it empty for <base model>-<dataset>" in str(err.value)


def test_a_derived_name_needs_both_sources():
    with pytest.raises(ConfigError, match="data_source='' is invalid: give a path or URI"):
        _name("org/model", "")


# --- promotion tags ---------------------------------------------------------------------

KEYS = ("decision", "reason", "champion_before", "replaced_by")


def _register(name: str, loss: float, digest: str = "d1") -> registry.RegisterResult:
    return registry.register(name, "file:///nowhere", "", {"dataset_digest": digest}, loss)


def _tags(name: str) -> dict[str, tuple]:
    """``{version: (decision, reason, champion_before, replaced_by)}`` (None: no such tag)."""
    return {
        str(mv.version): tuple(mv.tags.get(f"promotion.{k}") for k in KEYS)
        for mv in parent_run.client().search_model_versions(f"name='{name}'")
    }


def _assert_nothing_false(name: str) -> None:
    """What every version's tags say holds now: exactly the champion was promoted and never
    replaced; a replaced version names a later promoted one that found it champion; no version
    keeps the old one-tag summary (``promotion: no champion yet``)."""
    c = parent_run.client()
    versions = {str(mv.version): mv.tags for mv in c.search_model_versions(f"name='{name}'")}
    champion = str(c.get_model_version_by_alias(name, "champion").version)
    standing = [
        v
        for v, t in versions.items()
        if t["promotion.decision"] == "promoted" and "promotion.replaced_by" not in t
    ]
    assert standing == [champion]
    for v, t in versions.items():
        assert "promotion" not in t
        assert t["promotion.decision"] in ("promoted", "not promoted")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", t["promotion.decided_at"])
        if "promotion.replaced_by" in t:
            by = versions[t["promotion.replaced_by"]]
            assert int(t["promotion.replaced_by"]) > int(v)
            assert by["promotion.decision"] == "promoted"
            assert by["promotion.champion_before"] == v
            assert t["promotion.replaced_at"] == by["promotion.decided_at"]


FIRST = "first version of this registered model"


def test_promotion_tags_stay_true_as_the_champion_moves(local_mlflow):
    name = "m-data"
    # eval loss of each new version, then every version's tags after it registered
    steps = [
        (0.5, {"1": ("promoted", FIRST, "none", None)}),
        (
            0.6,
            {
                "1": ("promoted", FIRST, "none", None),
                "2": ("not promoted", "eval loss 0.6 >= champion version 1's 0.5", "1", None),
            },
        ),
        (
            0.4,
            {
                "1": ("promoted", FIRST, "none", "3"),
                "2": ("not promoted", "eval loss 0.6 >= champion version 1's 0.5", "1", None),
                "3": ("promoted", "eval loss 0.4 < champion version 1's 0.5", "1", None),
            },
        ),
        (
            0.3,
            {
                "1": ("promoted", FIRST, "none", "3"),
                "2": ("not promoted", "eval loss 0.6 >= champion version 1's 0.5", "1", None),
                "3": ("promoted", "eval loss 0.4 < champion version 1's 0.5", "1", "4"),
                "4": ("promoted", "eval loss 0.3 < champion version 3's 0.4", "3", None),
            },
        ),
    ]
    for loss, expected in steps:
        res = _register(name, loss)
        assert _tags(name) == expected, f"after version {res.version}"
        assert res.summary == ": ".join(expected[res.version][:2])
        _assert_nothing_false(name)
    c = parent_run.client()
    assert str(c.get_model_version_by_alias(name, "champion").version) == "4"
    assert str(c.get_model_version_by_alias(name, "challenger").version) == "4"


def test_a_version_on_other_data_is_not_compared(local_mlflow):
    _register("m-data", 0.5, digest="d1")
    res = _register("m-data", 0.1, digest="d2")
    assert not res.promoted
    assert _tags("m-data")["2"] == (
        "not promoted",
        "champion version 1 was evaluated on other data (d1 != d2): not compared; compare "
        "them and promote by hand",
        "1",
        None,
    )
    _assert_nothing_false("m-data")


def test_with_no_champion_alias_a_later_version_says_so_not_first(local_mlflow):
    _register("m-data", 0.5)
    parent_run.client().delete_registered_model_alias("m-data", "champion")
    _register("m-data", 0.7)
    assert _tags("m-data")["2"] == ("promoted", "no version held alias champion", "none", None)


def test_register_and_the_retraining_gate_use_the_derived_name(local_mlflow, tmp_path):
    """With registered_model_name empty, the version goes to <base model>-<dataset>, and the
    next run's gate finds its champion there."""
    import json

    from qlora_kfp.tasks import bookkeeping_tasks, stage_tasks

    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "config.json").write_text("{}")
    fingerprint = json.dumps({"data": "file:d1", "model": "weights:m1", "code": "0.1.0+abc"})
    args = {
        "data_source": "s3://bucket/datasets/support-v2/",
        "base_model": "meta-llama/Llama-3.1-8B",
        "registered_model_name": "",
        "dataset_digest": "digest-1",
        "cache_fingerprint": fingerprint,
        "force_retrain": False,
        "kfp_run_id": "",
    }

    def parent(label: str) -> str:
        return parent_run.start_pipeline_run("gate", label, {"kfp.run_id": label})

    first = parent("first")
    assert bookkeeping_tasks.decide_training({**args, "mlflow_parent_run_id": first}) == "train"
    version = stage_tasks.register_model(
        {
            **args,
            "mlflow_parent_run_id": first,
            "merged_model_uri": str(merged),
            "tuned_eval_loss": 0.5,
        }
    )
    assert version == "1"
    mv = parent_run.client().get_model_version("llama-3-1-8b-support-v2", version)
    assert mv.tags["base_model"] == "meta-llama/Llama-3.1-8B"
    assert mv.tags["data_source"] == "s3://bucket/datasets/support-v2/"
    tags = parent_run.client().get_run(first).data.tags
    assert tags["registered_model"] == "llama-3-1-8b-support-v2/1"
    assert tags["promotion"] == f"promoted: {FIRST}"
    again = parent("again")
    assert bookkeeping_tasks.decide_training({**args, "mlflow_parent_run_id": again}) == "skip"
    tags = parent_run.client().get_run(again).data.tags
    assert tags["qlora.reused_champion_version"] == "llama-3-1-8b-support-v2/1"
