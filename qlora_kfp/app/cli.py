"""``qlora-kfp``: every stage, ``compile`` and ``run``, with flags generated from the configs.

Stage flags are the config dataclass fields (``--lora_r``, ``--max_seq_length``), with their
help text and defaults; ``run`` flags are the pipeline's parameters, so a name means the same
thing on the command line, in the component, in the pipeline and in MLflow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from qlora_kfp import configs, env
from qlora_kfp.errors import ConfigError, QloraError

LOCAL_PIPELINES = {  # what `qlora-kfp run --pipeline` runs: module under qlora_kfp.pipelines
    "qlora_finetune": "qlora_kfp.pipelines.qlora_finetune",
    "qlora_sweep": "qlora_kfp.pipelines.qlora_sweep",
}


def local_pipeline(name: str):
    import importlib

    return getattr(importlib.import_module(LOCAL_PIPELINES[name]), name)


def _all_pipeline_inputs() -> set[str]:
    return {k for name in LOCAL_PIPELINES for k in pipeline_inputs(local_pipeline(name))}


STAGE_PATHS = {  # positional artifact folders of each stage command
    "prepare": [("output", "folder to write the prepared dataset to")],
    "quantize": [("output", "folder to write the 4-bit model to")],
    "train": [
        ("model", "4-bit model folder (from quantize)"),
        ("dataset", "prepared dataset folder"),
        ("output", "adapter folder to write"),
    ],
    "evaluate": [
        ("model", "4-bit model folder"),
        ("adapter", "adapter folder"),
        ("dataset", "prepared dataset folder"),
        ("output", "report folder to write"),
    ],
    "merge": [("adapter", "adapter folder"), ("output", "merged model folder to write")],
    "register": [
        ("merged_model", "merged model folder"),
        ("evaluation", "evaluation folder (its tuned_eval_loss decides champion)"),
        ("dataset", "prepared dataset folder (its digest names the eval split)"),
    ],
}


def _arg_type(typ: type):
    """argparse's ``type`` for a field: JSON for dict and list fields (``--gpu_tolerations
    '[...]'``), else the type itself."""
    if typ not in (dict, list):
        return typ

    def parse(text: str):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"not JSON: {exc.msg}") from None
        if not isinstance(value, typ):
            raise argparse.ArgumentTypeError(f"expected a JSON {typ.__name__}")
        return value

    parse.__name__ = f"JSON {typ.__name__}"
    return parse


def _literal(text: str) -> str:
    """A help text as argparse prints it: ``%`` starts a format there (``%(default)s``)."""
    return text.replace("%", "%%")


def _add_field(p: argparse.ArgumentParser, name: str, typ: type, default, help_: str) -> None:
    flag = f"--{name}"
    help_ = _literal(help_)
    typ = _arg_type(typ)
    if typ is bool:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_)
    elif default is dataclasses.MISSING or default is None:
        p.add_argument(flag, type=typ, required=True, help=help_)
    else:
        p.add_argument(flag, type=typ, default=default, help=f"{help_} (default: {default})")


def add_config_flags(p: argparse.ArgumentParser, cls: type) -> None:
    hints, helps = typing.get_type_hints(cls), configs.field_help(cls)
    for f in dataclasses.fields(cls):
        _add_field(p, f.name, hints[f.name], configs.field_default(f), helps[f.name])


def pipeline_inputs(pipeline) -> dict[str, tuple[type, object]]:
    """``{name: (python type, default or None)}`` of a pipeline's parameters, in order."""
    import inspect

    fn = pipeline.pipeline_func
    hints = typing.get_type_hints(fn)
    return {
        name: (hints[name], None if p.default is inspect.Parameter.empty else p.default)
        for name, p in inspect.signature(fn).parameters.items()
    }


def add_pipeline_flags(p: argparse.ArgumentParser, pipeline, *others) -> None:
    """One flag per parameter of ``pipeline`` and of ``others`` (each name once, noted with the
    pipelines that take it when not all do); only flags given on the command line are set."""
    helps: dict[str, str] = {}
    for cls in configs.ALL_CONFIGS:
        for k, v in configs.field_help(cls).items():
            helps.setdefault(k, v)
    every = (pipeline, *others)
    inputs = [pipeline_inputs(one) for one in every]
    merged: dict[str, tuple[type, object]] = {}
    for one in inputs:
        for name, spec in one.items():
            merged.setdefault(name, spec)
    for one in every:  # the pipeline's own inputs (lora_grid) carry their help too
        for name, spec in one.component_spec.inputs.items():
            if spec.description:
                helps.setdefault(name, spec.description)
    for name, (typ, default) in merged.items():
        shown = "" if default is None else f" (pipeline default: {default})"
        takers = [
            (one.pipeline_func.__name__, ins[name][1])
            for one, ins in zip(every, inputs, strict=True)
            if name in ins
        ]
        if any(d != default for _, d in takers):  # e.g. each pipeline's own experiment
            shown = " (pipeline default: " + "; ".join(f"{t}: {d}" for t, d in takers) + ")"
        if len(takers) < len(every):
            shown += f" [{', '.join(t for t, _ in takers)} only]"
        kw = {"action": argparse.BooleanOptionalAction} if typ is bool else {"type": _arg_type(typ)}
        p.add_argument(
            f"--{name}",
            default=argparse.SUPPRESS,
            help=_literal(helps.get(name, "pipeline parameter") + shown),
            **kw,
        )


def add_remote_run_flags(p: argparse.ArgumentParser) -> None:
    """What a run on KFP is started from: the uploaded pipeline, experiment and parameters."""
    p.add_argument("--name", default="qlora-finetune", help="uploaded pipeline name")
    p.add_argument("--experiment", default="qlora-finetune")
    p.add_argument("--params_file", default=None, help="JSON or YAML of pipeline parameters")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        help="key=value (repeatable); typed by the pipeline's declared input type",
    )
    p.add_argument(
        "--service_account",
        default=env.text("KFP_SERVICE_ACCOUNT"),
        help="Kubernetes service account the run's pods use (env KFP_SERVICE_ACCOUNT; "
        "empty: the backend's default)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qlora-kfp",
        description="QLoRA fine-tuning stages and Kubeflow pipelines.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in configs.STAGE_CONFIGS.items():
        p = sub.add_parser(name, help=(cls.__doc__ or "").strip().splitlines()[0])
        for arg, help_ in STAGE_PATHS[name]:
            p.add_argument(arg, help=help_)
        if name == "quantize":
            p.add_argument(
                "--dataset",
                default=None,
                help="prepared dataset: also measure 16-bit vs 4-bit perplexity",
            )
        add_config_flags(p, cls)

    p = sub.add_parser(
        "generate", help="regenerate the component modules and README tables (configs, env)"
    )
    p.add_argument("--root", default=".", help="project root (where README.md is)")

    p = sub.add_parser("compile", help="compile every pipeline to YAML")
    p.add_argument("--output_dir", default="pipelines/compiled")

    from qlora_kfp.pipelines.qlora_finetune import qlora_finetune
    from qlora_kfp.pipelines.qlora_sweep import qlora_sweep

    p = sub.add_parser(
        "run",
        help="run qlora_finetune (or qlora_sweep) locally through kfp.local (default: the "
        "embedded demo: tiny model, sample data, local MLflow)",
    )
    p.add_argument(
        "--pipeline",
        choices=sorted(LOCAL_PIPELINES),
        default="qlora_finetune",
        help="which pipeline to run",
    )
    p.add_argument("--workdir", default="runs/local", help="where outputs and mlflow.db go")
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show the local runner's whole log (always kept as runner.log in the run folder)",
    )
    p.epilog = (
        "Without --base_model and --data_source, runs the embedded default: a tiny "
        "random Llama and an antonym dataset built on the spot, with the settings of "
        "examples/demo.yaml (--params_file and flags override them). Give both or neither."
    )
    p.add_argument("--params_file", default=None, help="JSON or YAML file of pipeline parameters")
    add_pipeline_flags(p, qlora_finetune, qlora_sweep)

    p = sub.add_parser(
        "upload", help="upload the compiled pipeline to KFP (same name: new version)"
    )
    p.add_argument("--package", default="pipelines/compiled/qlora_finetune.yaml")
    p.add_argument("--name", default="", help="pipeline name (default: from the YAML)")
    p.add_argument("--version", default="", help="version name (default: a timestamp)")

    p = sub.add_parser("run-remote", help="start a run on KFP with parameters from a file/flags")
    add_remote_run_flags(p)
    p.add_argument("--run_name", default="")

    p = sub.add_parser("schedule", help="recurring retraining runs: create, list, pause, ...")
    p.add_argument("action", choices=["create", "list", "pause", "resume", "delete"])
    p.add_argument("--id", default="", help="recurring run id (pause, resume, delete)")
    add_remote_run_flags(p)
    p.add_argument("--cron", default="0 0 3 * * 1", help="6-field cron, seconds first")
    p.add_argument("--job_name", default="")

    p = sub.add_parser("demo-assets", help="write the tiny demo model and dataset to a folder")
    p.add_argument("output")
    return parser


def _run_stage(name: str, args: argparse.Namespace) -> dict:
    cls = configs.STAGE_CONFIGS[name]
    cfg = configs.from_params(cls, vars(args))
    if name == "prepare":
        from qlora_kfp.stages.prepare import run_prepare

        r = run_prepare(cfg, args.output)
        return {"path": r.path, "digest": r.digest, **r.stats}
    if name == "quantize":
        from qlora_kfp.stages.quantize import run_quantize

        r = run_quantize(cfg, args.output, args.dataset)
    elif name == "train":
        from qlora_kfp.stages.train import run_train

        r = run_train(cfg, args.model, args.dataset, args.output)
    elif name == "evaluate":
        from qlora_kfp.stages.evaluate import run_evaluate

        r = run_evaluate(cfg, args.model, args.adapter, args.dataset, args.output)
    elif name == "merge":
        from qlora_kfp.stages.merge import run_merge

        r = run_merge(cfg, args.adapter, args.output)
    else:
        return _register(cfg, args)
    return {"path": r.path, **r.metrics}


def _register(cfg, args: argparse.Namespace) -> dict:
    from qlora_kfp.errors import TrackingError
    from qlora_kfp.stages.evaluate import read_metrics
    from qlora_kfp.storage.artifacts import dataset_digest
    from qlora_kfp.tasks import stage_tasks
    from qlora_kfp.tracking import parent_run

    if not parent_run.enabled():
        raise TrackingError("register needs MLFLOW_TRACKING_URI")
    parent = parent_run.start_pipeline_run("qlora-finetune", "register", {"kfp.run_id": "cli"})
    version = stage_tasks.register_model(
        {
            **vars(args),
            "merged_model_uri": args.merged_model,  # a folder, or where merge published it
            "mlflow_parent_run_id": parent,
            "dataset_digest": dataset_digest(args.dataset),
            "tuned_eval_loss": read_metrics(args.evaluation)["tuned_eval_loss"],
        }
    )
    parent_run.close_pipeline_run(parent, "SUCCEEDED")
    return {"registered_model_name": cfg.registered_model_name, "version": version}


def _run_local(args: argparse.Namespace) -> dict:
    from qlora_kfp.app import local_runner
    from qlora_kfp.app.remote_params import load, typed_file

    pipeline = local_pipeline(args.pipeline)
    inputs = pipeline_inputs(pipeline)
    flags = {k: v for k, v in vars(args).items() if k in _all_pipeline_inputs()}
    configs.check_known(flags, inputs, f"--pipeline {args.pipeline}")
    from_file = load(args.params_file, []).from_file if args.params_file else {}
    types = {k: typ for k, (typ, _) in inputs.items()}
    from_file = typed_file(from_file, types, args.params_file)  # as the flags are typed
    given = {**from_file, **flags}
    sources = [k for k in ("base_model", "data_source") if given.get(k)]
    if len(sources) == 1:
        # The demo's tiny random model is no model for anyone's data (nor its data for yours).
        missing = ({"base_model", "data_source"} - set(sources)).pop()
        raise ConfigError(
            f"--{sources[0]} needs --{missing} too (the built-in demo model and data are only "
            "for the demo: qlora-kfp run with neither)"
        )
    from qlora_kfp import preflight

    preflight.check_services()  # unreachable MLflow or a bad bucket: fail before any task
    if not sources:  # the demo: its own settings (examples/demo.yaml) under these
        result = local_runner.demo(args.workdir, given, args.verbose, pipeline)
    else:
        local_runner.local_tracking_env(Path(args.workdir))
        run_dir = local_runner.run_pipeline(pipeline, given, args.workdir, args.verbose)
        result = {
            "run_dir": str(run_dir),
            "params": given,
            "tracking_uri": env.text("MLFLOW_TRACKING_URI"),
            "tasks": local_runner.collect(run_dir),
        }
    from qlora_kfp.app.summary import print_summary

    print_summary(result, args.pipeline)
    return {"run_dir": result["run_dir"]}


def _remote(args: argparse.Namespace):
    from qlora_kfp.app import remote

    if args.command == "upload":
        return remote.upload(args.package, args.name, args.version)
    params = remote.load_params(args.params_file, args.param)
    if args.command == "run-remote":
        return remote.run(args.name, params, args.experiment, args.run_name, args.service_account)
    if args.action == "create":
        return remote.schedule(
            args.name, args.cron, params, args.experiment, args.job_name, args.service_account
        )
    if args.action == "list":
        return remote.schedules()
    if not args.id:
        raise ConfigError(f"schedule {args.action} needs --id (see: qlora-kfp schedule list)")
    return remote.set_schedule(args.action, args.id)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in configs.STAGE_CONFIGS:
            from qlora_kfp.tasks.context import setup_logging

            setup_logging()
            out = _run_stage(args.command, args)
        elif args.command == "generate":
            from qlora_kfp.app import generate

            out = {"changed": generate.write(args.root)}
        elif args.command == "compile":
            from qlora_kfp.app.compile import compile_all

            out = {"compiled": compile_all(args.output_dir)}
        elif args.command == "run":
            out = _run_local(args)
        elif args.command in ("upload", "run-remote", "schedule"):
            out = _remote(args)
        else:
            from qlora_kfp.app.demo import make_demo_assets

            out = make_demo_assets(args.output)
    except QloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=1, default=str))
    return 0


def entry() -> typing.NoReturn:
    """The ``qlora-kfp`` command: :func:`main`, then an exit that does not finalize the
    modules it imported (torch, kfp, MLflow: seconds; :mod:`qlora_kfp.fast_exit`)."""
    from qlora_kfp import fast_exit

    status = main()
    fast_exit.at_exit_leave(status)
    sys.exit(status)


if __name__ == "__main__":
    entry()
