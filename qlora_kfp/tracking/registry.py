"""MLflow Model Registry: every run's model becomes a version; the best one is ``champion``.

Each registered version gets alias ``challenger``. ``champion`` moves to it only when its
evaluation beats the current champion's on the same eval split (same dataset digest, lower
``tuned_eval_loss``), or when there is no champion yet. A champion evaluated on other data is
not compared automatically.

The decision is recorded as version tags that stay true whatever happens later: what was
decided when the version was registered and why (``promotion.*``, the champion then named by
its version), and, on a champion that a later version replaces, which one replaced it and when.
No tag says a version *is* champion or challenger: the aliases say that.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from qlora_kfp.configs import setting_changes
from qlora_kfp.tracking import parent_run

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"
# Version tag: what the model was made from (tasks/bookkeeping_tasks.training_made_from), as JSON.
MADE_FROM_TAG = "training.made_from"
# Version tags of the promotion decision made when the version was registered.
DECISION_TAG = "promotion.decision"  # PROMOTED or NOT_PROMOTED
REASON_TAG = "promotion.reason"  # why, e.g. "eval loss 0.41 < champion version 2's 0.52"
CHAMPION_BEFORE_TAG = "promotion.champion_before"  # the champion's version then, or "none"
DECIDED_AT_TAG = "promotion.decided_at"  # UTC, ISO 8601
# Set on a champion when a later version takes the alias from it.
REPLACED_BY_TAG = "promotion.replaced_by"  # that version
REPLACED_AT_TAG = "promotion.replaced_at"  # UTC, ISO 8601
PROMOTED, NOT_PROMOTED = "promoted", "not promoted"
FIRST_VERSION = "first version of this registered model"


@dataclass
class RegisterResult:
    version: str
    promoted: bool
    reason: str

    @property
    def summary(self) -> str:
        """``promoted: <why>`` or ``not promoted: <why>``."""
        return f"{PROMOTED if self.promoted else NOT_PROMOTED}: {self.reason}"


def decide(
    champion_tags: dict | None, digest: str, eval_loss: float, champion_version: str = ""
) -> tuple[bool, str]:
    """Whether a new version with ``eval_loss`` on data ``digest`` replaces the champion, and
    why, in words that stay true later (the champion named by ``champion_version``)."""
    if champion_tags is None:
        return True, "no version held alias champion"
    who = f"champion version {champion_version}" if champion_version else "the champion"
    if champion_tags.get("dataset_digest") != digest:
        return False, (
            f"{who} was evaluated on other data ({champion_tags.get('dataset_digest')}"
            f" != {digest}): not compared; compare them and promote by hand"
        )
    old = float(champion_tags.get("tuned_eval_loss", "inf"))
    if eval_loss < old:
        return True, f"eval loss {eval_loss:.6g} < {who}'s {old:.6g}"
    return False, f"eval loss {eval_loss:.6g} >= {who}'s {old:.6g}"


def champion(name: str):
    """The current champion ``ModelVersion``, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return parent_run.client().get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def champion_tags(name: str) -> dict | None:
    """Tags of the current champion version, or None when there is none."""
    mv = champion(name)
    return None if mv is None else dict(mv.tags)


def _utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def register(
    name: str, source: str, run_id: str, tags: dict[str, str], eval_loss: float
) -> RegisterResult:
    """Create a model version from ``source`` (a folder URI), set the aliases and record the
    promotion decision (on a champion it replaces too)."""
    from mlflow.exceptions import MlflowException

    c = parent_run.client()
    try:
        c.create_registered_model(name, description="QLoRA fine-tuned models (qlora-kfp)")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    before = champion(name)
    promote, reason = decide(
        None if before is None else dict(before.tags),
        tags["dataset_digest"],
        eval_loss,
        "" if before is None else str(before.version),
    )
    mv = c.create_model_version(
        name, source=source, run_id=run_id, tags={**tags, "tuned_eval_loss": repr(eval_loss)}
    )
    if before is None and str(mv.version) == "1":
        reason = FIRST_VERSION
    decided_at = _utc_now()
    for key, value in {
        DECISION_TAG: PROMOTED if promote else NOT_PROMOTED,
        REASON_TAG: reason,
        CHAMPION_BEFORE_TAG: "none" if before is None else str(before.version),
        DECIDED_AT_TAG: decided_at,
    }.items():
        c.set_model_version_tag(name, mv.version, key, value)
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    if promote:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
        if before is not None:  # it no longer is champion: say by whom and when
            c.set_model_version_tag(name, before.version, REPLACED_BY_TAG, str(mv.version))
            c.set_model_version_tag(name, before.version, REPLACED_AT_TAG, decided_at)
    result = RegisterResult(str(mv.version), promote, reason)
    log.info("registered %s version %s (%s)", name, mv.version, result.summary)
    return result


@dataclass
class Decision:
    """Whether to train, why, and the champion reused when not."""

    train: bool
    reason: str
    champion_run: str = ""  # the champion's pipeline (parent) run id
    champion_version: str = ""  # "<name>/<version>"


def made_from_changes(recorded: dict | None, wanted: dict) -> list[str]:
    """How a champion's record differs from this run's (empty: this run would make it again)."""
    if not recorded:
        return ["the champion does not record what it was made from (an older version made it)"]
    out = setting_changes(recorded.get("settings", {}), wanted["settings"])
    for key, what in (
        ("dataset_digest", "dataset"),
        ("base_model", "base model"),
        ("code", "code version"),
    ):
        if recorded.get(key) != wanted[key]:
            out.append(f"{what} {recorded.get(key)} -> {wanted[key]}")
    return out


def should_train(name: str, made_from: dict, force: bool) -> Decision:
    """Train unless the champion was made from exactly what this run would train on: the same
    prepared dataset, base model, code version and result-changing settings (``made_from``,
    tasks/bookkeeping_tasks.training_made_from). ``force`` always trains."""
    if force:
        return Decision(True, "forced (force_retrain)")
    if not (name and parent_run.enabled()):
        return Decision(True, "no registry to compare with")
    mv = champion(name)
    if mv is None:
        return Decision(True, "no champion yet")
    try:
        recorded = json.loads(mv.tags.get(MADE_FROM_TAG, ""))
    except json.JSONDecodeError:
        recorded = None
    changes = made_from_changes(recorded, made_from)
    if changes:
        shown = "; ".join(changes[:5]) + (
            f"; and {len(changes) - 5} more" if len(changes) > 5 else ""
        )
        return Decision(True, f"changed since champion {name}/{mv.version}: {shown}")
    run = mv.tags.get("mlflow.parent_run") or mv.run_id or ""
    return Decision(
        False,
        f"dataset unchanged since champion {name}/{mv.version} (run {run}), and so are the "
        "base model, the code version and every result-changing setting",
        run,
        f"{name}/{mv.version}",
    )
