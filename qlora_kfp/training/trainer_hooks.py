"""What the train stage hooks into transformers' Trainer: token counting and the recorder.

The recorder is what makes a long run watchable (every logged row streamed as it happens, a
progress line in the task log) and what stops a diverged run at once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from qlora_kfp.tracking.live import Progress
from qlora_kfp.training import batching


def counting_trainer(trainer_cls, tokens_seen: list[int]):
    """A Trainer that adds up the real tokens of the batches it trains on (and drops the key
    before the model sees it)."""

    class CountingTrainer(trainer_cls):
        def training_step(self, model, inputs, *args, **kwargs):
            tokens_seen[0] += inputs.pop(batching.REAL_TOKENS, 0)
            return super().training_step(model, inputs, *args, **kwargs)

        def prediction_step(self, model, inputs, *args, **kwargs):
            inputs.pop(batching.REAL_TOKENS, None)
            return super().prediction_step(model, inputs, *args, **kwargs)

    return CountingTrainer


def recorder(
    history: list[dict],
    tokens_seen: list[int],
    diverged: list[str],
    on_log: Callable[[dict], None] | None = None,
    ranks: int = 1,
):
    """A Trainer callback that records every logged row into ``history`` (step, tokens/s, GPU
    memory), hands it to ``on_log`` at once, logs a progress line, and stops training on a NaN
    or Inf loss (the reason goes into ``diverged``).

    With ``ranks`` processes (DDP) it runs in each: the logged loss, gradient norm and eval
    loss are already averaged over the ranks by the Trainer, so every rank sees the same NaN
    and stops at the same step. A row's ``tokens_seen`` is this rank's count times ``ranks``
    (exact when every micro-batch holds as many real tokens, as fixed-length bins do; the
    stage's final ``tokens_per_s`` adds up every rank's own count)."""
    import torch
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        """Keeps every logged row with its step, tokens/s and GPU memory, hands it to
        ``on_log`` at once and logs a progress line."""

        def on_train_begin(self, args, state, control, **kw):
            self.t0, self.tok0 = time.perf_counter(), 0
            self.start = self.t0
            self.progress = Progress()

        def on_log(self, args, state, control, logs=None, **kw):
            row = {
                "step": state.global_step,
                **{k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)},
            }
            row["time_s"] = round(time.perf_counter() - self.start, 4)
            row["tokens_seen"] = seen = tokens_seen[0] * ranks
            dt = time.perf_counter() - self.t0
            if "loss" in row and dt > 0:
                row["tokens_per_s"] = round((seen - self.tok0) / dt, 2)
                self.t0, self.tok0 = time.perf_counter(), seen
            if torch.cuda.is_available():
                row["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            history.append(row)
            self.progress(row, state.max_steps)
            if on_log is not None:
                on_log(row)
            bad = [
                k
                for k in ("loss", "grad_norm", "eval_loss")
                if k in row and not math.isfinite(row[k])
            ]
            if bad:  # stop now: every further step would only spend GPU time on NaNs
                diverged.append(f"{bad[0]} is {row[bad[0]]} at step {state.global_step}")
                control.should_training_stop = True
            return control

    return Recorder()
