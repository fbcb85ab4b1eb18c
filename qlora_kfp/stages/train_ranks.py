"""One process of a multi-GPU train stage: what ``torchrun`` starts once per GPU.

:func:`qlora_kfp.stages.train.run_train` checks its inputs, finds the checkpoint to resume
from and writes ``job.json``; :func:`qlora_kfp.training.distributed.launch` starts this module
in ``num_processes`` processes. Each trains (:func:`~qlora_kfp.stages.train.train_here`) on
its own GPU; rank 0 streams its logged rows to ``rows.jsonl`` and writes ``result.json``;
a rank that fails writes ``error-<rank>.json``, which the stage raises again.

Usage (by the stage only): ``python -m torch.distributed.run --nproc_per_node N -m
qlora_kfp.stages.train_ranks job.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from qlora_kfp import fast_exit
from qlora_kfp.configs import TrainConfig
from qlora_kfp.stages.train_loop import train_here
from qlora_kfp.training import distributed


def main(argv: list[str] | None = None) -> None:
    distributed.die_with_parent()  # torchrun's agent: gone means the stage is gone
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    folder = Path(job.pop("folder"))
    main_rank = distributed.is_main()
    # One progress line a step in the task's log, not one per rank.
    level = logging.INFO if main_rank else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    cfg = TrainConfig(**job.pop("config"))
    try:
        res = train_here(cfg, **job, on_log=distributed.row_writer(folder) if main_rank else None)
    except Exception as exc:
        distributed.write_error(folder, exc)
        raise
    if main_rank:
        (folder / distributed.RESULT).write_text(json.dumps(asdict(res)))


if __name__ == "__main__":
    main()
    fast_exit.at_exit_leave()  # trained, result written: no module teardown (2 s a rank)
