"""Under torchrun: every rank asks utils.StopSignal.requested() once per fake step, rank 1 sends
itself SIGUSR1 at step $SIGNAL_AT; each rank writes the step it stopped at and how many all_reduces
the signal check started to $OUT_DIR/rank<R>.json. Ranks take different times per step."""
import json
import os
import signal
import sys
import time

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import launch  # noqa: E402
import utils  # noqa: E402

env = launch.init_distributed()
started = [0]
real_all_reduce = dist.all_reduce


def counting_all_reduce(*args, **kwargs):
    started[0] += 1
    return real_all_reduce(*args, **kwargs)


dist.all_reduce = counting_all_reduce
stop = utils.StopSignal(env)
signal_at, stopped = int(os.environ["SIGNAL_AT"]), None
for step in range(1, 1001):
    time.sleep(0.002 * (env.rank + 1))  # rank 1 is the slow one
    if env.rank == 1 and step == signal_at:
        os.kill(os.getpid(), signal.SIGUSR1)
    if stop.requested():
        stopped = step
        break
at_end = stop.requested(now=True)  # the blocking form agrees at once (the signal is known by now)
with open(os.path.join(os.environ["OUT_DIR"], f"rank{env.rank}.json"), "w") as f:
    json.dump({"stopped": stopped, "name": stop.name, "all_reduces": started[0], "at_end": at_end}, f)
dist.barrier()  # as train.py's last save: gloo may abort a rank whose peer leaves right after an all_reduce
dist.destroy_process_group()
