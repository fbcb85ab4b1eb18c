"""MLflow Model Registry: every run's model becomes a version; the best one is ``champion``.

Each registered version gets alias ``challenger``. ``champion`` moves to it only when its
evaluation beats the current champion's on the same eval split (same dataset digest, lower
``tuned_eval_loss``), or when there is no champion yet. A champion evaluated on other data is
not compared automatically: the decision and its reason are recorded as version tags.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from qlora_kfp.tracking import runs

log = logging.getLogger(__name__)
CHALLENGER, CHAMPION = "challenger", "champion"


@dataclass
class RegisterResult:
    version: str
    promoted: bool
    reason: str


def decide(champion_tags: dict | None, digest: str, eval_loss: float) -> tuple[bool, str]:
    """Whether a new version with ``eval_loss`` on data ``digest`` replaces the champion."""
    if champion_tags is None:
        return True, "no champion yet"
    if champion_tags.get("dataset_digest") != digest:
        return False, (
            f"champion was evaluated on other data ({champion_tags.get('dataset_digest')}"
            f" != {digest}); promote by hand after comparing"
        )
    old = float(champion_tags.get("tuned_eval_loss", "inf"))
    if eval_loss < old:
        return True, f"eval loss {eval_loss:.6g} < champion's {old:.6g}"
    return False, f"eval loss {eval_loss:.6g} >= champion's {old:.6g}"


def champion_tags(name: str) -> dict | None:
    """Tags of the current champion version, or None when there is none."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(runs.client().get_model_version_by_alias(name, CHAMPION).tags)
    except MlflowException:
        return None


def register(
    name: str, source: str, run_id: str, tags: dict[str, str], eval_loss: float
) -> RegisterResult:
    """Create a model version from ``source`` (a folder URI) and set the aliases."""
    from mlflow.exceptions import MlflowException

    c = runs.client()
    try:
        c.create_registered_model(name, description="QLoRA fine-tuned models (qlora-kfp)")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    promote, reason = decide(champion_tags(name), tags["dataset_digest"], eval_loss)
    mv = c.create_model_version(
        name,
        source=source,
        run_id=run_id,
        tags={**tags, "tuned_eval_loss": repr(eval_loss), "promotion": reason},
    )
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    if promote:
        c.set_registered_model_alias(name, CHAMPION, mv.version)
    log.info("registered %s version %s (%s)", name, mv.version, reason)
    return RegisterResult(str(mv.version), promote, reason)


def should_train(name: str, digest: str, force: bool) -> tuple[bool, str]:
    """Scheduled retraining: skip when the champion was trained on the same data (unless forced)."""
    if force:
        return True, "forced"
    if not (name and runs.enabled()):
        return True, "no registry to compare with"
    tags = champion_tags(name)
    if tags and tags.get("dataset_digest") == digest:
        return False, f"dataset unchanged since champion ({digest}); skipping training"
    return True, "new data" if tags else "no champion yet"
