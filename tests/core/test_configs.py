"""Typed configs: validation messages, and one name = one meaning across CLI/KFP/pipeline."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from qlora_kfp import configs
from qlora_kfp.errors import ConfigError

PIPE = configs.PipelineConfig
BAD = [
    ("prepare-unknown-format", configs.PrepareConfig, {"data_format": "xml"}, "data_format"),
    ("prepare-eval-fraction-1", configs.PrepareConfig, {"eval_fraction": 1.0}, "eval_fraction"),
    ("prepare-tiny-seq", configs.PrepareConfig, {"max_seq_length": 4}, "max_seq_length"),
    ("prepare-overlong-keep", configs.PrepareConfig, {"overlong": "keep"}, "overlong"),
    ("quantize-int3", configs.QuantizeConfig, {"quant_type": "int3"}, "quant_type"),
    ("quantize-dtype", configs.QuantizeConfig, {"compute_dtype": "fp8"}, "compute_dtype"),
    ("train-rank-0", configs.TrainConfig, {"lora_r": 0}, "lora_r"),
    ("train-dropout-1", configs.TrainConfig, {"lora_dropout": 1.0}, "lora_dropout"),
    ("train-lr-negative", configs.TrainConfig, {"learning_rate": -1.0}, "learning_rate"),
    ("train-lr-nan", configs.TrainConfig, {"learning_rate": float("nan")}, "learning_rate"),
    ("train-weight-decay-huge", configs.TrainConfig, {"weight_decay": 1e30}, "weight_decay"),
    ("train-weight-decay-nan", configs.TrainConfig, {"weight_decay": float("nan")}, "weight_decay"),
    ("train-epochs-inf", configs.TrainConfig, {"num_epochs": float("inf")}, "num_epochs"),
    ("train-grad-norm-inf", configs.TrainConfig, {"max_grad_norm": float("inf")}, "max_grad_norm"),
    ("train-empty-targets", configs.TrainConfig, {"target_modules": " "}, "target_modules"),
    ("train-no-length", configs.TrainConfig, {"num_epochs": 0.0, "max_steps": 0}, "num_epochs"),
    ("train-scheduler", configs.TrainConfig, {"lr_scheduler": "step"}, "lr_scheduler"),
    ("train-processes", configs.TrainConfig, {"num_processes": -1}, "num_processes"),
    ("train-runner-unknown", configs.TrainConfig, {"train_runner": "slurm"}, "train_runner"),
    ("train-nodes-in-one-pod", configs.TrainConfig, {"num_nodes": 2}, "num_nodes"),
    (
        "train-no-nodes",
        configs.TrainConfig,
        {"num_nodes": 0, "train_runner": "trainjob"},
        "num_nodes",
    ),
    (
        "train-runtime-not-a-name",
        configs.TrainConfig,
        {"training_runtime": "Torch Distributed"},
        "training_runtime",
    ),
    ("merge-dtype", configs.MergeConfig, {"merge_dtype": "int8"}, "merge_dtype"),
    ("merge-tolerance", configs.MergeConfig, {"merge_tolerance": 0.0}, "merge_tolerance"),
    (
        "merge-tolerance-negative",
        configs.MergeConfig,
        {"merge_tolerance": -1e-3},
        "merge_tolerance",
    ),
    (
        "merge-tolerance-inf",
        configs.MergeConfig,
        {"merge_tolerance": float("inf")},
        "merge_tolerance",
    ),
    (
        "merge-tolerance-nan",
        configs.MergeConfig,
        {"merge_tolerance": float("nan")},
        "merge_tolerance",
    ),
    ("pool-accelerator", PIPE, {"gpu_accelerator": "nvidia gpu"}, "gpu_accelerator"),
    ("pool-selector-list", PIPE, {"gpu_node_selector": ["gpu"]}, "gpu_node_selector"),
    ("pool-selector-number", PIPE, {"gpu_node_selector": {"pool": 1}}, "gpu_node_selector"),
    ("pool-selector-bad-key", PIPE, {"gpu_node_selector": {"a b": "x"}}, "gpu_node_selector"),
    (
        "pool-toleration-typo",
        PIPE,
        {"gpu_tolerations": [{"key": "k", "efect": "NoSchedule"}]},
        r"gpu_tolerations\[0\]",
    ),
    (
        "pool-toleration-op",
        PIPE,
        {"gpu_tolerations": [{"key": "k", "operator": "In"}]},
        r"gpu_tolerations\[0\]",
    ),
    (
        "pool-exists-value",
        PIPE,
        {"gpu_tolerations": [{"key": "k", "operator": "Exists", "value": "v"}]},
        r"gpu_tolerations\[0\]",
    ),
    (
        "pool-effect",
        PIPE,
        {"gpu_tolerations": [{"key": "k", "effect": "NoRun"}]},
        r"gpu_tolerations\[0\]",
    ),
    (
        "pool-seconds",
        PIPE,
        {"gpu_tolerations": [{"key": "k", "tolerationSeconds": 5}]},
        r"gpu_tolerations\[0\]",
    ),
]
REQUIRED = {"data_source": "data.jsonl", "base_model": "model"}


@pytest.mark.parametrize("cls,overrides,field", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_invalid_values_name_the_field(cls, overrides, field):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in REQUIRED.items() if k in names}
    with pytest.raises(ConfigError, match=rf"^{field}=.* is invalid: "):
        cls(**kwargs, **overrides)


def test_target_module_list_parses_names():
    assert configs.TrainConfig(target_modules="q_proj, v_proj").target_module_list == [
        "q_proj",
        "v_proj",
    ]
    assert configs.TrainConfig().target_module_list == "all-linear"


def test_every_field_has_help():
    for cls in configs.STAGE_CONFIGS.values():
        assert all(configs.field_help(cls).values()), cls


def _component_params(component):
    fn = component.python_func
    return {
        n: p.default
        for n, p in inspect.signature(fn).parameters.items()
        if "Annotation" not in str(p.annotation)
    }  # Input[...]/Output[...] artifacts


RUNTIME_INPUTS = {
    "dataset_digest",
    "tuned_eval_loss",
    "cache_fingerprint",
    "config_overrides",
    "merged_model_uri",
}  # upstream outputs and per-trial overrides, not configuration
STAGES = [
    "prepare_dataset:prepare",
    "quantize:quantize",
    "train:train",
    "evaluate:evaluate",
    "merge:merge",
    "register_model:register",
]


@pytest.mark.parametrize("pair", STAGES, ids=[s.split(":")[0] for s in STAGES])
def test_component_parameters_are_config_fields(pair):
    import qlora_kfp.components as comps
    from qlora_kfp.components.spec import CONTEXT as COMMON_PARAMS

    comp_name, stage = pair.split(":")
    params = _component_params(getattr(comps, comp_name))
    fields = {f.name: f.default for f in dataclasses.fields(configs.STAGE_CONFIGS[stage])}
    assert set(params) - set(COMMON_PARAMS) - RUNTIME_INPUTS == set(fields)
    for name, default in fields.items():
        if default is not dataclasses.MISSING:
            assert params[name] == default, f"{comp_name}.{name}: {params[name]} != {default}"


def test_every_config_field_is_a_pipeline_parameter_with_its_default():
    from qlora_kfp.pipelines.qlora_finetune import qlora_finetune

    from qlora_kfp.app.cli import pipeline_inputs

    fields = {p.name: p.default for p in configs.params_of(*configs.ALL_CONFIGS)}
    inputs = pipeline_inputs(qlora_finetune)
    assert set(inputs) == set(fields)
    for name, (_, default) in inputs.items():
        expected = None if fields[name] is dataclasses.MISSING else fields[name]
        assert default == expected, name


def test_unknown_parameter_names_the_closest_one():
    with pytest.raises(
        ConfigError, match=r"params\.json: unknown parameter 'lora_rank'; did you mean lora_r\?"
    ):
        configs.check_known(
            {"lora_rank": 8}, configs.TrainConfig.__dataclass_fields__, "params.json"
        )


@pytest.mark.parametrize(
    "name,classes,internal,defaults",
    [
        ("qlora_finetune", configs.ALL_CONFIGS, set(), {}),
        (
            "qlora_sweep",
            (
                *[configs.STAGE_CONFIGS[s] for s in ("prepare", "quantize", "train", "evaluate")],
                configs.PipelineConfig,
            ),
            {"force_retrain"},  # pipelines/qlora_sweep.py exclude=: a sweep never skips
            {"mlflow_experiment": "qlora-sweep"},
        ),
    ],
    ids=["finetune", "sweep"],
)
def test_the_compiled_yaml_has_every_field_with_its_default(name, classes, internal, defaults):
    from pathlib import Path

    import yaml

    path = Path(__file__).resolve().parents[2] / "pipelines" / "compiled" / f"{name}.yaml"
    spec = next(yaml.safe_load_all(path.read_text()))
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    for p in configs.params_of(*classes):
        if p.name in internal:
            assert p.name not in inputs
            continue
        assert p.name in inputs, f"{p.name} cannot be set from Kubeflow"
        if not p.required:
            assert inputs[p.name]["defaultValue"] == defaults.get(p.name, p.default), p.name


@pytest.mark.parametrize(
    "given,expected",
    [(8, "8"), (8.0, "8"), (-1.0, "-1"), (" auto ", "auto")],
    ids=["int", "json-float", "json-minus-one", "padded"],
)
def test_a_checkpointed_layer_count_may_come_as_a_number(given, expected):
    """A sweep's grid entry reaches its trial as JSON: 8 becomes 8.0."""
    assert (
        configs.TrainConfig(gradient_checkpointing_layers=given).gradient_checkpointing_layers
        == expected
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "no such params file"),
        ('{"lora_r": 8,', "line 1: not valid JSON"),
        ('{"lora_rank": 8}', "unknown parameter 'lora_rank'; did you mean lora_r"),
    ],
    ids=["missing", "broken-json", "misspelt"],
)
def test_a_bad_local_params_file_is_one_line(tmp_path, capsys, content, message):
    """``qlora-kfp run --params_file``: no traceback, nothing started."""
    from qlora_kfp.app.cli import main

    path = tmp_path / "params.json"
    if content is not None:
        path.write_text(content)
    assert main(["run", "--workdir", str(tmp_path / "w"), "--params_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "w").exists()
