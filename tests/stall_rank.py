"""train_pretrain.py with one rank misbehaving (used by tests/stages/test_distributed.py):

    STALL=stop     rank 1 stops itself (SIGSTOP) after its second step: a hung rank;
                   the others must give up after collective_timeout_minutes
    STALL=prepare  rank 0 takes 20 s more to prepare the data: the others must wait
                   for it even when that is longer than collective_timeout_minutes
"""

import os
import signal
import time

import train_pretrain
from nanobumble.base.errors import run_cli
from nanobumble.run.stage import Progress

rank, stall = os.environ.get("RANK"), os.environ.get("STALL")
if stall == "stop" and rank == "1":
    original_add = Progress.add

    def add_then_stop(self, *args, **kwargs):
        original_add(self, *args, **kwargs)
        if self.steps_done == 2:
            os.kill(os.getpid(), signal.SIGSTOP)

    Progress.add = add_then_stop
elif stall == "prepare" and rank == "0":
    original_ensure_shards = train_pretrain.ensure_shards

    def slow_ensure_shards(*args, **kwargs):
        time.sleep(20)
        return original_ensure_shards(*args, **kwargs)

    train_pretrain.ensure_shards = slow_ensure_shards

if __name__ == "__main__":
    run_cli(train_pretrain.main)
