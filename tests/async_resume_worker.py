"""Subprocess of tests/test_async_rollout.py: a tiny run with rollout.max_staleness=1 against a spawned
jax server that appends, after every APPLIED update, the step and the dataset indices of its prompts
to WORKDIR/trained.jsonl (fsynced, so a SIGKILL loses nothing written), and `{"resumed": step}` first.

usage: python tests/async_resume_worker.py WORKDIR MAX_STEPS [OVERRIDES_JSON [SLOW_EVERY]]
(SLOW_EVERY: the prompts whose dataset index is a multiple of it wait 2 s before generating, stragglers)
"""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from test_async_rollout import RESUME  # noqa: E402
from test_train_e2e import tiny_config  # noqa: E402
from maxent_jax.trainer import Trainer  # noqa: E402


def main(workdir: Path, max_steps: int, overrides: dict, slow_every: int) -> None:
    trainer = Trainer(tiny_config(**{**RESUME, "train.max_steps": max_steps, **overrides}), workdir)
    index = {id(row): i for i, row in enumerate(trainer.task.train)}
    log = open(workdir / "trained.jsonl", "a", encoding="utf-8")

    def write(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        os.fsync(log.fileno())

    update, restore = trainer.update, trainer.restore

    def logged_update(ready):
        metrics = update(ready)
        write({"step": trainer.step, "ids": [index[id(row)] for row in ready.rows]})
        return metrics

    def logged_restore(point):
        restore(point)
        write({"resumed": trainer.step})

    trainer.update, trainer.restore = logged_update, logged_restore
    if slow_every:
        sampled = trainer._sampled

        def slow_sampled(rows, batch_index):
            if any(index[id(row)] % slow_every == 0 for row in rows):
                time.sleep(2.0)
            return sampled(rows, batch_index)

        trainer._sampled = slow_sampled
    try:
        trainer.run()
    finally:
        trainer.close()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else {},
         int(sys.argv[4]) if len(sys.argv) > 4 else 0)
