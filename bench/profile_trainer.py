"""Where a step of the train stage itself (Trainer and all) spends its time: torch.profiler.

Runs ``qlora_kfp.stages.train.run_train`` on a benchmark dataset (``train_bench.py`` writes one) with
one extra Trainer callback that profiles steps ``--start`` + 1 to ``--start`` + ``--steps``, and
prints the same summary as ``profile_step.py`` (GPU busy share, GPU time by kernel family, top
kernels) plus the CPU operations that take the most time: the difference to the plain loop of
``profile_step.py`` is what the Trainer adds.

Usage (GPU machine): python bench/profile_trainer.py --model /tmp/bench/model4 \\
    --data /tmp/bench/dataset --variant "bs=8,pack=bins,pl=2048,fused=on"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a quantized-model folder")
    p.add_argument("--data", required=True, help="a prepared-dataset folder")
    p.add_argument("--variant", default="bs=8,pack=bins,pl=2048,fused=on", help="train_bench keys")
    p.add_argument("--start", type=int, default=3, help="steps to run before profiling")
    p.add_argument("--steps", type=int, default=2, help="steps to profile")
    p.add_argument("--out", default="/tmp/profile-trainer")
    a = p.parse_args()

    import torch
    import transformers
    from profile_step import summarize
    from torch.profiler import ProfilerActivity, profile
    from train_bench import parse_variant, stage_config

    from qlora_kfp.configs import TrainConfig
    from qlora_kfp.stages.train import run_train

    found: dict = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    class Profiler(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            if state.global_step == a.start:
                sync()
                self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self.prof.__enter__()
                self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == a.start + a.steps:
                sync()
                wall = time.perf_counter() - self.t
                self.prof.__exit__(None, None, None)
                found.update(summarize(self.prof, wall, a.steps))
                control.should_training_stop = True

    init = transformers.Trainer.__init__

    def with_profiler(self, *args, callbacks=None, **kw):
        init(self, *args, callbacks=[*(callbacks or []), Profiler()], **kw)

    transformers.Trainer.__init__ = with_profiler
    _, kw = parse_variant("v:" + a.variant)
    cfg = TrainConfig(**stage_config(kw, a.start + a.steps + 1))
    run_train(cfg, a.model, a.data, a.out)
    print("PROFILE " + json.dumps({"variant": a.variant, **found}), flush=True)


if __name__ == "__main__":
    main()
