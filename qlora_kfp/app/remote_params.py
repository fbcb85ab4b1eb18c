"""Pipeline parameters for a run on KFP, typed by the pipeline's declared inputs.

Values come from a params file (JSON or YAML, already typed by its syntax) and from
``--param key=value`` flags (text). Each is converted to the type the compiled pipeline
declares for that name in its root ``inputDefinitions`` (what the API server checks when it
builds the run's runtime config), so ``--param run_name=2024`` stays the text ``"2024"`` and
``--param lora_r=32`` becomes the number 32. Unknown names fail naming the closest one.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qlora_kfp import configs
from qlora_kfp.errors import ConfigError

TYPE_WORDS = {
    "STRING": "text",
    "NUMBER_INTEGER": "an integer",
    "NUMBER_DOUBLE": "a number",
    "BOOLEAN": "true or false",
    "LIST": "a JSON list",
    "STRUCT": "a JSON object",
}


def root_inputs(pipeline_spec: dict) -> dict[str, dict]:
    """``{name: parameter spec}`` of a pipeline spec's root inputs.

    Takes a compiled YAML's first document or the ``pipeline_spec`` the API server returns
    for a version, which wraps it as ``{"pipeline_spec": ..., "platform_spec": ...}`` when
    the package has a platform spec (backend/src/apiserver/server/api_util.go).
    """
    spec = pipeline_spec.get("pipeline_spec", pipeline_spec) if pipeline_spec else {}
    return ((spec.get("root") or {}).get("inputDefinitions") or {}).get("parameters") or {}


def _from_text(name: str, text: str, ptype: str):
    """A ``--param`` value, converted to the declared type."""
    if ptype == "STRING":
        return text
    try:
        if ptype == "NUMBER_INTEGER" and re.fullmatch(r"[+-]?\d+", text.strip()):
            return int(text)
        if ptype == "NUMBER_DOUBLE" and math.isfinite(value := float(text)):
            return value
        if ptype == "BOOLEAN" and text.strip().lower() in ("true", "false"):
            return text.strip().lower() == "true"
        if ptype in ("LIST", "STRUCT"):
            value = json.loads(text)
            if isinstance(value, list if ptype == "LIST" else dict):
                return value
    except ValueError:
        pass
    raise ConfigError(f"--param {name}={text}: {name} takes {TYPE_WORDS.get(ptype, ptype)}")


# The pipeline spec's parameter types, as the Python types of the pipeline's signature.
PYTHON_TYPES = {
    "STRING": str,
    "NUMBER_INTEGER": int,
    "NUMBER_DOUBLE": float,
    "BOOLEAN": bool,
    "LIST": list,
    "STRUCT": dict,
}


def _from_file(name: str, value, typ: type, source: str):
    """A params-file value (typed by JSON/YAML), as the declared type: a number written as
    text is the number meant (PyYAML reads ``2e-4`` as text), a whole float an integer;
    anything else that does not fit fails naming the file, the key and the type."""
    try:
        return configs.convert(value, typ)
    except ValueError as exc:
        hint = " (quote it)" if typ is str and value is not None else ""
        raise ConfigError(
            f"{source}: parameter {name!r} takes {configs.TYPE_WORDS[typ]}, {exc}{hint}"
        ) from None


def typed_file(values: dict, types: dict[str, type], source: str) -> dict:
    """A params file's values as the Python types of a pipeline's parameters (``qlora-kfp
    run``: ``{name: type}`` from the pipeline function's signature); unknown names fail."""
    configs.check_known(values, types, source)
    return {k: _from_file(k, v, types[k], source) for k, v in values.items()}


@dataclass
class Params:
    """Pipeline parameters as given: a params file's values and ``--param`` texts."""

    from_file: dict = field(default_factory=dict)
    from_flags: dict[str, str] = field(default_factory=dict)
    source: str = ""  # the params file, for messages

    def typed(self, inputs: dict[str, dict]) -> dict:
        """The values converted to the declared types; flags win over the file.

        Raises:
            ConfigError: an unknown name (with the closest valid one), a value that does
                not fit its type, or a required parameter left out.
        """
        configs.check_known(self.from_file, inputs, self.source)
        configs.check_known(self.from_flags, inputs, "--param")
        types = {k: PYTHON_TYPES[spec.get("parameterType", "STRING")] for k, spec in inputs.items()}
        out = typed_file(self.from_file, types, self.source)
        for k, text in self.from_flags.items():
            out[k] = _from_text(k, text, inputs[k].get("parameterType", ""))
        missing = [
            k
            for k, spec in inputs.items()
            if k not in out and not spec.get("isOptional") and "defaultValue" not in spec
        ]
        if missing:
            raise ConfigError(
                f"missing pipeline parameter(s) {', '.join(missing)}: set them in the params "
                "file or with --param key=value"
            )
        return out


def load(params_file: str | None, overrides: list[str]) -> Params:
    """Read a JSON/YAML params file and ``key=value`` overrides (not yet typed)."""
    from_file: dict = {}
    if params_file:
        path = Path(params_file)
        if not path.is_file():
            raise ConfigError(f"{params_file}: no such params file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            line = exc.object[: exc.start].count(b"\n") + 1
            raise ConfigError(
                f"{params_file}, line {line}: not UTF-8 text; save the file as UTF-8"
            ) from None
        is_yaml = params_file.endswith((".yaml", ".yml"))
        try:
            from_file = (yaml.safe_load(text) if is_yaml else json.loads(text)) or {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{params_file}, line {exc.lineno}: not valid JSON") from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{params_file}{where}: not valid YAML") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"{params_file}: expected a mapping of parameter names to values")
    flags: dict[str, str] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: use key=value")
        flags[key] = value
    return Params(from_file, flags, params_file or "")
