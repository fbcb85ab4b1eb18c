"""seed_recipe.py as it is, except that the Trainer logs every step's loss.

The numerics comparison needs the baseline's per-step losses; seed_recipe.py logs every 5
steps and prints none. This wrapper swaps in ``logging_steps=1`` and a callback that keeps the
losses, then calls the unchanged ``seed_recipe.main()`` and prints ``LOSSES [[step, loss], ...]``
after its JSON line. Logging each step adds one host sync a step; the project's runs in
train_bench.py log every step as well, so both sides pay it.
"""

from __future__ import annotations

import json

import seed_recipe
from transformers import Trainer, TrainerCallback, TrainingArguments

LOSSES: list[list[float]] = []


class _Losses(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            LOSSES.append([state.global_step, float(logs["loss"])])


def _every_step(*args, **kw):
    kw["logging_steps"] = 1
    return TrainingArguments(*args, **kw)


class _LoggedTrainer(Trainer):
    def __init__(self, *args, callbacks=None, **kw):
        super().__init__(*args, callbacks=[*(callbacks or []), _Losses()], **kw)


if __name__ == "__main__":
    seed_recipe.TrainingArguments = _every_step
    seed_recipe.Trainer = _LoggedTrainer
    seed_recipe.main()
    print("LOSSES " + json.dumps(LOSSES), flush=True)
