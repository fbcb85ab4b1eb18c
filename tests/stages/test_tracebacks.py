"""Issue 23: inputs that ended in a library's traceback (or worse, half-written output) now end
in one line naming the file, field or setting and what to do.

(Damaged weights and unknown optimizers: tests/stages/test_one_line_errors.py; full disks and
read-only outputs: tests/storage/test_writes.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_kfp import configs
from qlora_kfp.app import cli, local_runner
from qlora_kfp.errors import ConfigError

# --- params files: values of the wrong type -------------------------------------------------


@pytest.fixture
def ran(monkeypatch):
    """Stand-ins for the pipeline run: the parameters a local run would start with."""
    seen: dict = {}

    def run_pipeline(pipeline, params, workdir, verbose=False):
        seen.update(params)
        return workdir

    monkeypatch.setattr(local_runner, "run_pipeline", run_pipeline)
    monkeypatch.setattr(local_runner, "demo", lambda *a, **kw: pytest.fail("the demo ran"))
    monkeypatch.setattr(local_runner, "collect", lambda run_dir: {})
    monkeypatch.setattr(local_runner, "local_tracking_env", lambda workdir: None)
    monkeypatch.setattr("qlora_kfp.preflight.check_services", lambda: None)
    monkeypatch.setattr("qlora_kfp.app.summary.print_summary", lambda *a: None)
    return seen


SOURCES = "base_model: org/m\ndata_source: d.jsonl\n"


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("learning_rate: 2e-4\n", "learning_rate", 0.0002),  # PyYAML: the text "2e-4"
        ("learning_rate: '2e-4'\n", "learning_rate", 0.0002),
        ("lora_r: '8'\n", "lora_r", 8),
        ("max_steps: 1e3\n", "max_steps", 1000),
        ("num_epochs: 3\n", "num_epochs", 3.0),
        ("lora_r: 8.0\n", "lora_r", 8),
    ],
    ids=[
        "yaml-2e-4-for-a-float",
        "quoted-number-for-a-float",
        "quoted-8-for-an-integer",
        "1e3-for-an-integer",
        "integer-for-a-float",
        "whole-float-for-an-integer",
    ],
)
def test_a_params_file_number_is_the_number_meant(ran, tmp_path, text, key, value):
    params = tmp_path / "p.yaml"
    params.write_text(SOURCES + text)
    assert cli.main(["run", "--workdir", str(tmp_path / "w"), "--params_file", str(params)]) == 0
    assert ran[key] == value and type(ran[key]) is type(value)


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("p.yaml", "lora_r: 8.5\n", "parameter 'lora_r' takes an integer, got float 8.5"),
        ("p.yaml", "lora_r: '8.5'\n", "parameter 'lora_r' takes an integer, got float 8.5"),
        ("p.yaml", "lora_r: eight\n", "parameter 'lora_r' takes an integer, got str 'eight'"),
        ("p.yaml", "lora_r:\n", "parameter 'lora_r' takes an integer, got null; give a value"),
        ("p.yaml", "learning_rate: null\n", "'learning_rate' takes a number, got null"),
        ("p.yaml", "learning_rate: .inf\n", "takes a number, got inf, not a finite number"),
        ("p.json", '{"learning_rate": Infinity}', "got inf, not a finite number"),
        ("p.json", '{"learning_rate": NaN}', "got nan, not a finite number"),
        ("p.yaml", "learning_rate: 1e999\n", "got inf, not a finite number"),
        ("p.yaml", "run_name:\n", "parameter 'run_name' takes text, got null"),
        ("p.yaml", "use_dora: 1\n", "parameter 'use_dora' takes true or false, got int 1"),
        ("p.yaml", b"run_name: caf\xe9\n", "line 3: not UTF-8 text; save the file as UTF-8"),
    ],
    ids=[
        "fraction-for-an-integer",
        "quoted-fraction-for-an-integer",
        "word-for-an-integer",
        "null-integer",
        "null-float",
        "yaml-inf",
        "json-infinity",
        "json-nan",
        "overflowing-float",
        "null-text",
        "number-for-a-boolean",
        "latin-1-file",
    ],
)
def test_a_params_file_value_of_the_wrong_type_is_one_line(
    ran, tmp_path, capsys, name, content, message
):
    params = tmp_path / name
    if isinstance(content, bytes):
        params.write_bytes(SOURCES.encode() + content)
    elif name.endswith(".json"):
        params.write_text(content[:-1] + ', "base_model": "m", "data_source": "d"}')
    else:
        params.write_text(SOURCES + content)
    assert cli.main(["run", "--workdir", str(tmp_path / "w"), "--params_file", str(params)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {params}") and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ran == {}, "nothing started"


@pytest.mark.parametrize(
    "text,key,value",
    [
        ("learning_rate: 2e-4\n", "learning_rate", 0.0002),
        ("lora_r: '8'\n", "lora_r", 8),
    ],
    ids=["yaml-2e-4", "quoted-8"],
)
def test_a_run_on_kfp_gets_the_number_meant_too(tmp_path, text, key, value):
    """``run-remote`` and ``schedule``: typed by the compiled pipeline's declared inputs."""
    import yaml

    from qlora_kfp.app import remote_params

    compiled = Path(__file__).parents[2] / "pipelines" / "compiled" / "qlora_finetune.yaml"
    spec = next(yaml.safe_load_all(compiled.read_text()))
    params = tmp_path / "p.yaml"
    params.write_text(SOURCES + text)
    typed = remote_params.load(str(params), []).typed(remote_params.root_inputs(spec))
    assert typed[key] == value and type(typed[key]) is type(value)


@pytest.mark.parametrize(
    "entry,message",
    [
        ({"lora_r": 8.5}, "lora_r=8.5 is invalid: takes an integer, got float 8.5"),
        ({"lora_r": None}, "lora_r=None is invalid: takes an integer, got null"),
        ({"lora_r": "eight"}, "lora_r='eight' is invalid: takes an integer, got str 'eight'"),
        ({"use_dora": "false"}, "use_dora='false' is invalid: takes true or false"),
        ({"learning_rate": float("nan")}, "takes a number, got nan, not a finite number"),
    ],
    ids=["fraction", "null", "word", "text-boolean", "nan"],
)
def test_a_sweep_grid_value_of_the_wrong_type_is_one_line(entry, message):
    """A grid entry reaches each stage as ``config_overrides`` (``configs.from_params``):
    8.5 trained a rank-8.5 adapter and ``"false"`` turned DoRA on."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        configs.from_params(configs.TrainConfig, entry)


def test_a_sweep_grid_number_is_the_number_meant():
    cfg = configs.from_params(
        configs.TrainConfig, {"learning_rate": "2e-4", "lora_r": 16.0, "max_steps": "10"}
    )
    assert (cfg.learning_rate, cfg.lora_r, cfg.max_steps) == (0.0002, 16, 10)
    assert type(cfg.lora_r) is int and type(cfg.max_steps) is int


# --- concurrency: two runs into one output --------------------------------------------------

HOLDER = """
import sys, time
from qlora_kfp.storage.manifest import atomic_folder
with atomic_folder(sys.argv[1], "adapter") as tmp:
    print("writing", flush=True)
    time.sleep(600)
"""


def test_a_second_train_into_the_same_output_stops_before_any_work(tmp_path, monkeypatch):
    """Before: both trained, shared ``<output>.checkpoints`` and replaced each other's
    adapter; now the second stops before reading its inputs, naming the first."""
    import subprocess
    import sys

    from qlora_kfp.errors import OutputError
    from qlora_kfp.stages import train

    final = tmp_path / "adapter"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(final)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline().strip() == "writing"
        monkeypatch.setattr(train, "verify", lambda *a: pytest.fail("the second run went on"))
        with pytest.raises(OutputError, match=rf"another run is writing it \(pid {first.pid} "):
            train.run_train(configs.TrainConfig(), "no-model", "no-data", str(final))
    finally:
        first.kill()
        first.wait()


# --- outputs no write could make: refused before the stage's work ---------------------------


def _symlink_to_empty_folder(tmp_path: Path) -> Path:
    (tmp_path / "real").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "real")
    return tmp_path / "out"


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("mine")
    return tmp_path / "notes.txt" / "out"


def _long_name(tmp_path: Path) -> Path:
    return tmp_path / ("d" * 300)


def _name_too_long_for_its_partial_folder(tmp_path: Path) -> Path:
    return tmp_path / ("d" * 250)  # fits, but ".<name>.partial-xxxxxxxx" does not


def _long_folder_on_the_way(tmp_path: Path) -> Path:
    return tmp_path / ("f" * 256) / "out"


@pytest.mark.parametrize(
    "make,message",
    [
        (_symlink_to_empty_folder, r"out: is a symbolic link \(to .*real\); give the folder"),
        (_under_a_file, r"notes\.txt is a file, not a folder, so nothing can be written"),
        (_long_name, r"its name is 300 bytes long; this file system takes at most 237"),
        (_name_too_long_for_its_partial_folder, r"its name is 250 bytes long"),
        (_long_folder_on_the_way, r"the folder name 'ffff.*is 256 bytes long.*at most 255"),
    ],
    ids=["symlink", "under-a-file", "300-byte-name", "250-byte-name", "256-byte-folder"],
)
def test_an_output_no_write_could_make_is_refused_before_the_work(
    demo_assets, tmp_path, monkeypatch, make, message
):
    """Before: the symlink failed in shutil.rmtree after all the work; the others in
    mkdir/mkdtemp with a NotADirectoryError or ENAMETOOLONG traceback."""
    from qlora_kfp.errors import ArtifactError
    from qlora_kfp.stages import prepare
    from qlora_kfp.storage import sources

    out = make(tmp_path)
    monkeypatch.setattr(sources, "load_tokenizer", lambda *a: pytest.fail("the work started"))
    cfg = configs.PrepareConfig(**demo_assets)
    with pytest.raises(ArtifactError, match=message) as got:
        prepare.run_prepare(cfg, str(out))
    assert str(got.value).startswith(f"{out}: ") and "\n" not in str(got.value)


def test_an_existing_output_folder_with_too_long_a_name_is_refused_too(tmp_path):
    """KFP creates the output folder first: its name fits, its partial folder's does not."""
    from qlora_kfp.errors import ArtifactError
    from qlora_kfp.storage.manifest import atomic_folder

    out = tmp_path / ("d" * 250)
    out.mkdir()
    with (
        pytest.raises(ArtifactError, match="its name is 250 bytes long"),
        atomic_folder(out, "adapter"),
    ):
        pytest.fail("the work started")


# --- damaged model files --------------------------------------------------------------------


def _cut_in_half(f: Path) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _not_utf8(f: Path) -> None:
    f.write_bytes(b"\xff\xfe" + f.read_bytes())


@pytest.mark.parametrize(
    "name,damage,message",
    [
        ("tokenizer.json", _cut_in_half, r"tokenizer\.json: not valid JSON \(line \d+\), cut off"),
        ("tokenizer_config.json", _cut_in_half, r"tokenizer_config\.json: not valid JSON"),
        ("tokenizer.json", _not_utf8, r"tokenizer\.json: not valid JSON.*, cut off or corrupt"),
    ],
    ids=["truncated-tokenizer-json", "truncated-tokenizer-config", "garbled-tokenizer-json"],
)
def test_a_damaged_tokenizer_file_is_named(demo_assets, tmp_path, name, damage, message):
    """Before: a JSONDecodeError traceback from inside ``json`` (via tokenizers)."""
    import shutil

    from qlora_kfp.errors import ArtifactError
    from qlora_kfp.stages.prepare import run_prepare

    base = tmp_path / "base"
    shutil.copytree(demo_assets["base_model"], base)
    damage(base / name)
    cfg = configs.PrepareConfig(data_source=demo_assets["data_source"], base_model=str(base))
    with pytest.raises(ArtifactError, match=message) as got:
        run_prepare(cfg, str(tmp_path / "out"))
    assert "download or copy the model again" in str(got.value)
    assert not (tmp_path / "out").exists()


def _prepare(out: str) -> None:
    from qlora_kfp.stages import prepare

    prepare.run_prepare(configs.PrepareConfig(base_model="m", data_source="d.jsonl"), out)


def _quantize(out: str) -> None:
    from qlora_kfp.stages import quantize

    quantize.run_quantize(configs.QuantizeConfig(base_model="m"), out, "no-data")


def _evaluate(out: str) -> None:
    from qlora_kfp.stages import evaluate

    evaluate.run_evaluate(configs.EvaluateConfig(), "no-model", "no-adapter", "no-data", out)


def _merge(out: str) -> None:
    from qlora_kfp.stages import merge

    merge.run_merge(configs.MergeConfig(base_model="m"), "no-adapter", out)


@pytest.mark.parametrize(
    "run,kind",
    [
        (_prepare, "dataset"),
        (_quantize, "quantized-model"),
        (_evaluate, "evaluation"),
        (_merge, "merged-model"),
    ],
    ids=["prepare", "quantize", "evaluate", "merge"],
)
def test_a_second_writer_of_any_stage_stops_before_any_work(tmp_path, monkeypatch, run, kind):
    """Before: prepare, quantize, evaluate and merge took the output's lock only in
    ``atomic_folder``, after all their work: the second did it all and was then refused."""
    import subprocess
    import sys

    from qlora_kfp.errors import OutputError
    from qlora_kfp.stages import evaluate, merge
    from qlora_kfp.storage import artifacts, sources

    def went_on(*a, **kw):
        pytest.fail("the second run went on")

    for module, name in [
        (sources, "load_tokenizer"),
        (artifacts, "load_split"),
        (evaluate, "verify"),
        (merge, "verify"),
    ]:
        monkeypatch.setattr(module, name, went_on)
    final = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDER.replace('"adapter"', repr(kind)), str(final)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "writing"
        with pytest.raises(OutputError, match=rf"another run is writing it \(pid {first.pid} "):
            run(str(final))
    finally:
        first.kill()
        first.wait()


# --- weights that do not fit their config.json ----------------------------------------------

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


def _narrower(t):
    return t[:, :-1].contiguous()


def _as_int8(t):
    import torch

    return t.to(torch.int8)


def _transposed(t):
    return t[:, :100].t().contiguous()


@pytest.mark.parametrize(
    "change,message",
    [
        (_narrower, r"is bfloat16 of shape \[128, 127\], but .* expects shape \[128, 128\]"),
        (_as_int8, r"is int8 of shape \[128, 128\], but .* expects a float dtype \(bfloat16"),
        (_transposed, r"is bfloat16 of shape \[100, 128\], but .* expects shape \[128, 128\]"),
    ],
    ids=["narrower-tensor", "int8-tensor", "transposed-tensor"],
)
def test_a_tensor_that_does_not_fit_the_config_is_named(
    demo_assets, tmp_path, monkeypatch, change, message
):
    """Before: quantize loaded it without an error (transformers initialized a tensor of
    another shape at random, and cast int8 to float)."""
    import shutil

    from safetensors.torch import load_file, save_file

    from qlora_kfp.errors import ArtifactError
    from qlora_kfp.stages import quantize

    base = tmp_path / "base"
    shutil.copytree(demo_assets["base_model"], base)
    weights = load_file(base / "model.safetensors")
    weights[Q_PROJ] = change(weights[Q_PROJ])
    save_file(weights, base / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(quantize, "atomic_folder", lambda *a: pytest.fail("it was written"))
    cfg = configs.QuantizeConfig(base_model=str(base))
    with pytest.raises(ArtifactError, match=message) as got:
        quantize.run_quantize(cfg, str(tmp_path / "out"))
    text = str(got.value)
    assert text.startswith(f"{base / 'model.safetensors'}: tensor {Q_PROJ} is ")
    assert "download or copy the model again" in text and "\n" not in text


# --- optimizers whose package is not installed ----------------------------------------------


@pytest.mark.parametrize(
    "name,module,package",
    [
        ("lomo", "lomo_optim", "lomo-optim"),
        ("galore_adamw", "galore_torch", "galore-torch"),
        ("apollo_adamw", "apollo_torch", "apollo-torch"),
        ("adamw_torch_4bit", "torchao", "torchao"),
        ("schedule_free_adamw", "schedulefree", "schedulefree"),
        ("stable_adamw", "optimi", "torch-optimi"),
        ("grokadamw", "grokadamw", "grokadamw"),
    ],
    ids=["lomo", "galore", "apollo", "torchao-4bit", "schedule-free", "stable-adamw", "grok"],
)
def test_an_optimizer_whose_package_is_absent_is_refused_in_the_config(name, module, package):
    """Before: the name passed (transformers knows it) and the train stage ended in
    transformers' ImportError traceback when it created the trainer."""
    import importlib.util

    if importlib.util.find_spec(module):
        pytest.skip(f"{module} is installed here")
    with pytest.raises(ConfigError) as got:
        configs.TrainConfig(optimizer=name)
    assert str(got.value) == (
        f"optimizer={name!r} is invalid: optimizer {name} needs the package {package}, which "
        f"is not installed: pip install {package}, or choose auto, adamw_torch, "
        "paged_adamw_32bit or adamw_8bit"
    )


# --- chat templates that refuse a conversation ----------------------------------------------

NO_SYSTEM = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "where",
    ["chat_template.jinja", "tokenizer_config.json"],
    ids=["template-file", "template-in-tokenizer-config"],
)
def test_a_template_that_refuses_the_system_role_is_one_line(
    demo_assets, tmp_path, write_rows, where
):
    """Before: a jinja2 TemplateError traceback from inside transformers (as with Gemma's)."""
    import json
    import shutil

    from qlora_kfp.errors import DataError
    from qlora_kfp.stages.prepare import run_prepare

    base = tmp_path / "base"
    shutil.copytree(demo_assets["base_model"], base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    if where == "chat_template.jinja":
        (base / where).write_text(NO_SYSTEM)
    else:
        conf = json.loads((base / where).read_text())
        (base / where).write_text(json.dumps({**conf, "chat_template": NO_SYSTEM}))
    turns = [("system", "Be brief."), ("user", "Opposite of hot?"), ("assistant", "cold")]
    data = write_rows([{"messages": [{"role": r, "content": c} for r, c in turns]}] * 4)
    cfg = configs.PrepareConfig(data_source=data, base_model=str(base))
    with pytest.raises(DataError) as got:
        run_prepare(cfg, str(tmp_path / "out"))
    text = str(got.value)
    assert text.startswith(f"{data}, row 1: the chat template of ")
    assert f"{base / where}" in text and "System role not supported" in text
    assert "drop the system message from the data, or set chat_template" in text
    assert "\n" not in text


# --- models with code of their own ----------------------------------------------------------

OWN_CONFIG = (
    "from transformers import LlamaConfig\n\n\n"
    "class MyConfig(LlamaConfig):\n    model_type = 'my_llama'\n"
)
OWN_MODEL = (
    "from transformers import LlamaForCausalLM\n\nfrom .configuration_my import MyConfig\n\n\n"
    "class MyForCausalLM(LlamaForCausalLM):\n    config_class = MyConfig\n"
)


def _custom_model(demo_assets, tmp_path: Path, auto_map: bool, files: bool) -> Path:
    import json
    import shutil

    base = tmp_path / "base"
    shutil.copytree(demo_assets["base_model"], base)
    conf = json.loads((base / "config.json").read_text())
    conf["model_type"] = "my_llama"
    if auto_map:
        conf["auto_map"] = {
            "AutoConfig": "configuration_my.MyConfig",
            "AutoModelForCausalLM": "modeling_my.MyForCausalLM",
        }
    (base / "config.json").write_text(json.dumps(conf))
    if files:
        (base / "configuration_my.py").write_text(OWN_CONFIG)
        (base / "modeling_my.py").write_text(OWN_MODEL)
    return base


@pytest.mark.parametrize(
    "auto_map,files,trust,error,message",
    [
        (False, False, False, ConfigError, "config.json: model_type 'my_llama' is not one "),
        (False, False, True, ConfigError, r"names no code of the model's own \(auto_map\); upg"),
        (True, True, False, ConfigError, r"own code \(configuration_my\.py, modeling_my\.py\)"),
        (True, False, False, ConfigError, "runs only with trust_remote_code=true; read that"),
        (True, False, True, "ArtifactError", r"configuration_my\.py: missing \(config\.json's"),
    ],
    ids=[
        "unknown-model-type",
        "unknown-model-type-trusted",
        "own-code-untrusted",
        "own-code-untrusted-files-missing",
        "own-code-trusted-files-missing",
    ],
)
@pytest.mark.parametrize("stage", ["prepare", "quantize"])
def test_a_model_transformers_cannot_build_is_one_line(
    demo_assets, tmp_path, monkeypatch, stage, auto_map, files, trust, error, message
):
    """Before: transformers' ValueError traceback (unknown model_type; custom code without
    trust_remote_code), or a retried SourceError naming a hub URL made of the local path."""
    from qlora_kfp import errors
    from qlora_kfp.stages import prepare, quantize

    error = getattr(errors, error) if isinstance(error, str) else error
    base = _custom_model(demo_assets, tmp_path, auto_map, files)
    for module in (prepare, quantize):
        monkeypatch.setattr(module, "atomic_folder", lambda *a: pytest.fail("it was written"))
    out = str(tmp_path / "out")
    with pytest.raises(error, match=message) as got:
        if stage == "prepare":
            cfg = configs.PrepareConfig(
                data_source=demo_assets["data_source"],
                base_model=str(base),
                trust_remote_code=trust,
            )
            prepare.run_prepare(cfg, out)
        else:
            cfg = configs.QuantizeConfig(base_model=str(base), trust_remote_code=trust)
            quantize.run_quantize(cfg, out)
    assert str(got.value).startswith(str(base)) and "\n" not in str(got.value)
    assert not got.value.retryable


@pytest.mark.slow
def test_a_model_with_its_own_code_loads_when_trusted(demo_assets, tmp_path):
    from qlora_kfp.training import modeling

    base = _custom_model(demo_assets, tmp_path, auto_map=True, files=True)
    model = modeling.load_model(str(base), trust_remote_code=True, complete=True)
    assert type(model).__name__ == "MyForCausalLM"
