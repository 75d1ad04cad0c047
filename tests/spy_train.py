"""Run train.main (under torchrun or alone) and record, per rank, what tests cannot see from outside:
the state of the model each rank evaluates, the evaluation results, every write under $SPY_WATCH
that a rank other than 0 attempts, and the train indices the sampler gave with the losses of the
micro-batches trained. Results go to $SPY_DIR/rank<R>.json and rank<R>_eval<i>.pt. It can also make
chosen training losses NaN ($SPY_NAN_STEPS) or send rank 0 a SIGTERM ($SPY_SIGTERM_AT)."""
import builtins
import json
import os
import signal
import sys

import torch

import data
import evaluate
import train

rank = int(os.environ.get("RANK", "0"))
spy_dir = os.environ.get("SPY_DIR", ".")
watched = os.path.abspath(os.environ.get("SPY_WATCH", spy_dir))  # the folder whose writes count
real_open, real_save = builtins.open, torch.save
writes = []


def record(what, target):
    if isinstance(target, (str, os.PathLike)) and os.path.abspath(target).startswith(watched):
        writes.append(f"{what} {target}")


if rank != 0:
    def watched_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            record("open", file)
        return real_open(file, mode, *args, **kwargs)

    def watch(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            record(name, args[1] if name == "save" and len(args) > 1 else args[0] if args else None)
            return real(*args, **kwargs)
        setattr(module, name, wrapper)

    builtins.open = watched_open
    for name in ("replace", "rename", "makedirs", "mkdir", "link", "remove"):
        watch(os, name)
    watch(torch, "save")

real_evaluate = evaluate.evaluate
evaluations = []


def spy_evaluate(model, *args, **kwargs):
    result = real_evaluate(model, *args, **kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    real_save(state, os.path.join(spy_dir, f"rank{rank}_eval{len(evaluations)}.pt"))
    evaluations.append(result)
    return result


evaluate.evaluate = spy_evaluate

# $SPY_NAN_STEPS="a-b": the loss of this process's a-th to b-th training steps (1-based) is NaN.
if os.environ.get("SPY_NAN_STEPS"):
    first, last = map(int, os.environ["SPY_NAN_STEPS"].split("-"))
    real_criterion, calls = train.criterion, [0]

    def nan_criterion(*args, **kwargs):
        calls[0] += 1
        loss = real_criterion(*args, **kwargs)
        return loss * float("nan") if first <= calls[0] <= last else loss

    train.criterion = nan_criterion

# The sampler's indices in the order given; the micro-batches trained took the first
# len(losses) x batch size of them.
sampled, losses = [], []
real_iter, counted_criterion = data.TrainSampler.__iter__, train.criterion
signal_at = int(os.environ.get("SPY_SIGTERM_AT", "0"))  # rank 0's micro-batch (1-based) that gets it


def spy_iter(self):
    for item in real_iter(self):  # (index, epoch), or (index, epoch, copy) with --repeated-aug
        sampled.append(item[0])
        yield item


def spy_criterion(*args, **kwargs):
    loss = counted_criterion(*args, **kwargs)
    losses.append(loss.item())
    if rank == 0 and len(losses) == signal_at:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss


data.TrainSampler.__iter__ = spy_iter
train.criterion = spy_criterion
code = train.main(sys.argv[1:])
with real_open(os.path.join(spy_dir, f"rank{rank}.json"), "w") as f:
    json.dump({"writes": writes, "evaluations": evaluations, "code": code, "sampled": sampled,
               "losses": losses}, f)
sys.exit(code)
