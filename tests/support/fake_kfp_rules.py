"""The KFP 2.17 API server's validation rules, as plain functions, for FakeKfpApiServer.

Each function mirrors one Go function of kubeflow/pipelines 2.17.0 (or of a library the API
server calls), named in its docstring, message texts included, so the fake refuses what the
real server refuses. Errors are ``RuleError(message)``; the server turns them into the gRPC
code the Go code returns.
"""

from __future__ import annotations

import re


class RuleError(ValueError):
    """A request the real API server refuses with InvalidArgument (HTTP 400)."""


# --- cron: github.com/robfig/cron v1.2.0 parser.go (go.mod pins v1.2.0) -------------------
# The API server validates with cron.Parse (backend/src/apiserver/server/api_converter.go,
# toModelJob) and the ScheduledWorkflow controller schedules with the same parser
# (backend/src/crd/controller/scheduledworkflow/util/cron_schedule.go); Argo's own cron
# (CronWorkflow) is not involved. cron.Parse is NewParser(Second | Minute | Hour | Dom |
# Month | DowOptional | Descriptor): 6 fields, seconds first, the day-of-week field may be
# left out (so a 5-field crontab line is read as seconds..month, not as minutes..weekday).
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
_BOUNDS = [  # spec.go: seconds, minutes, hours, dom, months, dow
    (0, 59, None),
    (0, 59, None),
    (0, 23, None),
    (1, 31, None),
    (1, 12, {m: i + 1 for i, m in enumerate(_MONTHS)}),
    (0, 6, {d: i for i, d in enumerate(_DAYS)}),
]
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+$|^[-+]?0$")


def _go_atoi(expr: str) -> int:
    # mustParseInt: strconv.Atoi (optional sign, ASCII digits only), then no negatives.
    if not re.fullmatch(r"[+-]?[0-9]+", expr):
        raise RuleError(
            f'Failed to parse int from {expr}: strconv.Atoi: parsing "{expr}": invalid syntax'
        )
    num = int(expr)
    if num < 0:
        raise RuleError(f"Negative number ({num}) not allowed: {expr}")
    return num


def _int_or_name(expr: str, names: dict | None) -> int:
    if names and expr.lower() in names:
        return names[expr.lower()]
    return _go_atoi(expr)


def _check_range(expr: str, lo: int, hi: int, names: dict | None) -> None:
    """getRange: ``*`` or ``?``, ``n``, ``n-m``, each with an optional ``/step``."""
    range_and_step = expr.split("/")
    low_high = range_and_step[0].split("-")
    if low_high[0] in ("*", "?"):
        start, end = lo, hi
    else:
        start = _int_or_name(low_high[0], names)
        if len(low_high) == 1:
            end = start
        elif len(low_high) == 2:
            end = _int_or_name(low_high[1], names)
        else:
            raise RuleError(f"Too many hyphens: {expr}")
    if len(range_and_step) == 2:
        step = _go_atoi(range_and_step[1])
        if len(low_high) == 1:  # "N/step" means "N-max/step"
            end = hi
    elif len(range_and_step) == 1:
        step = 1
    else:
        raise RuleError(f"Too many slashes: {expr}")
    if start < lo:
        raise RuleError(f"Beginning of range ({start}) below minimum ({lo}): {expr}")
    if end > hi:
        raise RuleError(f"End of range ({end}) above maximum ({hi}): {expr}")
    if start > end:
        raise RuleError(f"Beginning of range ({start}) beyond end of range ({end}): {expr}")
    if step == 0:
        raise RuleError(f"Step of range should be a positive number: {expr}")


def parse_cron(spec: str) -> None:
    """robfig/cron v1.2.0 ``cron.Parse``: raise RuleError with its message when invalid."""
    if not spec:
        raise RuleError("Empty spec string")
    if spec[0] == "@":
        if spec in _DESCRIPTORS:
            return
        if spec.startswith("@every "):
            if not _GO_DURATION.match(spec[len("@every ") :]):
                raise RuleError(f"Failed to parse duration {spec}")
            return
        raise RuleError(f"Unrecognized descriptor: {spec}")
    fields = spec.split()
    if not 5 <= len(fields) <= 6:
        raise RuleError(f"Expected 5 to 6 fields, found {len(fields)}: {spec}")
    for field, (lo, hi, names) in zip(fields, _BOUNDS, strict=False):
        for expr in filter(None, field.split(",")):  # strings.FieldsFunc drops empties
            _check_range(expr, lo, hi, names)


# --- run parameters: backend/src/apiserver/template/v2_template.go validatePipelineJobInputs
_JSON_KIND = {  # structpb kind each ParameterType accepts (protojson: JSON value kinds)
    "NUMBER_DOUBLE": ("number", "double or integer"),
    "NUMBER_INTEGER": ("number", "double or integer"),
    "STRING": ("string", "string"),
    "BOOLEAN": ("bool", "bool"),
    "LIST": ("list", "list"),
    "STRUCT": ("struct", "struct"),
}


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "struct"
    return "null"


def check_runtime_parameters(root_params: dict, runtime_config: dict | None) -> None:
    """Refuse missing required, mistyped and unknown parameters, as the server does when it
    builds the run's runtime config (runs) or validates a recurring run's inputs."""
    if runtime_config is None:
        if root_params:
            raise RuleError(
                "pipeline requiring input has no parameter(s) provided. Need parameter(s): "
                + ", ".join(root_params)
            )
        return
    values = runtime_config.get("parameters") or {}
    for name, spec in root_params.items():
        if spec.get("literals"):
            raise NotImplementedError("FakeKfpApiServer: literal-constrained parameters")
        if name not in values:
            if not spec.get("isOptional") and "defaultValue" not in spec:
                raise RuleError(
                    f"parameter {name} is not optional, yet has neither default value "
                    "nor user provided value"
                )
            continue
        ptype = spec.get("parameterType", "PARAMETER_TYPE_ENUM_UNSPECIFIED")
        if ptype == "TASK_FINAL_STATUS":
            raise RuleError(
                f"input parameter {name} requires type TASK_FINAL_STATUS, which is invalid "
                "for root component"
            )
        if ptype not in _JSON_KIND:
            raise RuleError(f"input parameter {name} has unspecified type")
        kind, shown = _JSON_KIND[ptype]
        if _kind(values[name]) != kind:
            raise RuleError(
                f"input parameter {name} requires type {shown}, but the "
                f"{'parameter value' if kind == 'number' else 'input parameter'} is not of "
                f"{kind} value type"
            )
    extra = [name for name in values if name not in root_params]
    if extra:
        raise RuleError("parameter(s) provided are not required by pipeline: " + ", ".join(extra))


def root_parameters(stored_spec: dict) -> dict:
    """The root inputDefinitions parameters of a stored pipeline spec (either shape)."""
    spec = stored_spec.get("pipeline_spec", stored_spec)
    return (spec.get("root", {}).get("inputDefinitions") or {}).get("parameters") or {}


# --- listing: backend/src/apiserver/list/list.go NewOptions + validatePageSize ------------
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 20, 200


def list_options(sort_by: str, fields: dict[str, str], model: str) -> tuple[str, bool]:
    """``(model field, descending)`` from ``sort_by`` ("field", "field desc" or "field asc");
    the default is CreatedAtInSec ascending (every model's DefaultSortField: oldest first)."""
    words = sort_by.lower().split()
    if len(words) > 2 or (len(words) == 2 and words[1] not in ("desc", "asc")):
        raise RuleError(
            f'Received invalid sort by format {sort_by!r}. Supported format: "field_name", '
            '"field_name desc", or "field_name asc"'
        )
    if not words:
        return "CreatedAtInSec", False
    if words[0] not in fields:
        raise RuleError(f"Invalid sorting field: {words[0]!r} on listable type {model}")
    return fields[words[0]], len(words) == 2 and words[1] == "desc"


def page_size(raw: str) -> int:
    size = int(raw or 0)
    if size < 0:
        raise RuleError(f"The page size should be greater than 0. Got {size}")
    return DEFAULT_PAGE_SIZE if size == 0 else min(size, MAX_PAGE_SIZE)


# The API field names each model sorts by (backend/src/apiserver/model/*.go APIToModelFieldMap).
PIPELINE_FIELDS = {
    "id": "UUID",
    "pipeline_id": "UUID",
    "name": "Name",
    "display_name": "DisplayName",
    "created_at": "CreatedAtInSec",
    "description": "Description",
    "namespace": "Namespace",
}
VERSION_FIELDS = {
    "id": "UUID",
    "pipeline_version_id": "UUID",
    "name": "Name",
    "display_name": "DisplayName",
    "created_at": "CreatedAtInSec",
    "status": "Status",
    "description": "Description",
}
JOB_FIELDS = {
    "id": "UUID",
    "recurring_run_id": "UUID",
    "name": "DisplayName",
    "display_name": "DisplayName",
    "created_at": "CreatedAtInSec",
    "updated_at": "UpdatedAtInSec",
    "description": "Description",
}
EXPERIMENT_FIELDS = {
    "id": "UUID",
    "experiment_id": "UUID",
    "name": "Name",
    "display_name": "Name",
    "created_at": "CreatedAtInSec",
    "description": "Description",
    "namespace": "Namespace",
}

# backend/src/apiserver/common/utils.go ValidatePipelineName (v2 pipelineInfo.name)
PIPELINE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,127}$")
