"""What a run will cost, measured before it starts: train.py --dry-run's batch search, timings and projection."""
import itertools
import json
import math
import resource
import shutil
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import utils

WARMUP_STEPS, MEASURED_STEPS, EVAL_BATCHES = 5, 30, 10


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fits(model, batch, args, device, amp_dtype):
    """Whether one micro-batch of `batch` random images goes forward and backward through `model` (the
    unwrapped one: no collective, so that a rank which runs out of memory cannot hang the others)."""
    size = args.train_size or args.image_size  # the train crop (the largest with --progressive-resize)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=memory_format)
    labels = torch.randint(args.num_classes, (batch,), device=device)
    model.train()
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        sync(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        images = labels = loss = None
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest_batch(fit, batch):
    """The largest batch below `batch` for which `fit(b)` holds, found by trying: halve until one
    fits, then bisect between it and the last that did not. 0 when not even 1 fits."""
    low, high = 0, batch  # low fits (0 trivially), high does not
    while high > 1 and low == 0:
        low, high = (high // 2, high) if fit(high // 2) else (low, high // 2)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fit(middle) else (low, middle)
    return low


def global_advice(fit, batch, accum):
    """--batch-size B --accum-steps A with B <= fit and B x A the same images per step as now."""
    images = batch * accum
    size = max(b for b in range(1, fit + 1) if images % b == 0)
    return f"--batch-size {size} --accum-steps {images // size}"


def batch_that_fits(model, args, env, amp_dtype):
    """None when --batch-size fits on every rank; else the one-line answer: the largest batch that
    fits, with and without --grad-checkpointing, and the --accum-steps that keep the global batch."""
    fit = lambda b: fits(model, b, args, env.device, amp_dtype)  # noqa: E731
    if utils.all_reduce(torch.tensor(int(fit(args.batch_size)), device=env.device), env, op=dist.ReduceOp.MIN).item():
        return None
    answers, checkpointing = [], model.grad_checkpointing
    for enable in ((checkpointing,) if checkpointing else (False, True)):
        model.set_grad_checkpointing(enable)
        found = largest_batch(fit, args.batch_size)
        found = int(utils.all_reduce(torch.tensor(found, device=env.device), env, op=dist.ReduceOp.MIN).item())
        how = "with --grad-checkpointing" if enable else "without --grad-checkpointing"
        answers.append(f"{how} the largest that fits is {found} ("
                       f"{global_advice(found, args.batch_size, args.accum_steps)} keeps the global batch)"
                       if found else f"{how} not even a batch of 1 fits")
    model.set_grad_checkpointing(checkpointing)
    return (f"--batch-size {args.batch_size} does not fit in the {env.device.type} memory of a process (measured at "
            f"{args.train_size or args.image_size}px): " + "; ".join(answers))


def eval_timing(model, loader, amp_dtype, device, batches=EVAL_BATCHES):
    """(seconds to the first batch, seconds per later batch) of the forward passes over the first
    `batches` batches of `loader` (a slice of val)."""
    model.eval()
    start, first, count = time.perf_counter(), None, 0
    with torch.no_grad():
        for count, (images, _) in enumerate(itertools.islice(loader, batches), 1):
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                model(images)
            sync(device)
            if count == 1:
                first = time.perf_counter()
    rest = (time.perf_counter() - first) / (count - 1) if count > 1 else first - start
    return first - start, rest


def time_save(save, args, env):
    """Seconds that `save()` (collective) takes to write the run's checkpoint, written into a
    temporary folder beside --output-dir, on its disk, and removed."""
    folder = tempfile.mkdtemp(prefix=".dry-run-", dir=utils.existing_parent(args.output_dir)) if env.main else None
    output_dir, args.output_dir, start = args.output_dir, folder or args.output_dir, time.perf_counter()
    try:
        save()
        return time.perf_counter() - start
    finally:
        args.output_dir = output_dir
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def slowest(figures, env):
    """Each figure's largest value over the ranks: the slowest rank sets the pace."""
    values = torch.tensor(list(figures.values()), dtype=torch.float64, device=env.device)
    return dict(zip(figures, utils.all_reduce(values, env, op=dist.ReduceOp.MAX).tolist()))


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def project(m, args, env, steps_per_epoch, val_images, epochs_left, start_epoch):
    """The measured figures `m` -> the run's: per epoch (its loader start, steps, saves, and the
    evaluation when it has one) and in all, start-up included."""
    saves = 1 + (steps_per_epoch - 1) // args.save_every_steps if args.save_every_steps else 1
    train = m["loader_start"] + steps_per_epoch * m["step_seconds"] + saves * m["save_seconds"]
    val_batches = math.ceil(math.ceil(val_images / env.world_size) / args.batch_size)
    evaluation = m["eval_start"] + val_batches * m["eval_batch_seconds"]
    evaluated = sum(1 for e in range(start_epoch, start_epoch + epochs_left)
                    if args.eval_every and ((e + 1) % args.eval_every == 0 or e + 1 == args.epochs))
    rate = args.batch_size * env.world_size * args.accum_steps / m["step_seconds"]
    return {"images_per_sec": rate, "images_per_sec_per_process": rate / env.world_size,
            "data_share": m["data_seconds"] / (m["step_seconds"] * m["steps"]),
            "peak_memory_mb": m["peak_memory_mb"], "epoch_seconds": train + (evaluation if evaluated else 0.0),
            "run_seconds": m["build_seconds"] + epochs_left * train + evaluated * evaluation}


def report(figures, args, env, steps, say):
    f = figures
    say(f"dry run: {steps} steps of {args.arch} at {args.train_size or args.image_size}px, batch {args.batch_size} x "
        f"{env.world_size} process(es) x {args.accum_steps} accumulation, amp {args.amp}, {args.workers} worker(s)")
    say(f"  {f['images_per_sec']:.1f} img/s in all, {f['images_per_sec_per_process']:.1f} per process; "
        f"waiting for data {100 * f['data_share']:.0f}% of the step time")
    say(f"  peak memory {f['peak_memory_mb']:.0f} MiB per {'GPU' if env.device.type == 'cuda' else 'process'}")
    say(f"  an epoch {duration(f['epoch_seconds'])} (evaluation and saving included), the run "
        f"{duration(f['run_seconds'])} ({args.epochs} epochs)")
    say(json.dumps({k: round(v, 4) for k, v in f.items()}))


def duration(seconds):
    units = (("days", 86400), ("h", 3600), ("min", 60), ("s", 1))
    unit, size = next((unit, size) for unit, size in units if seconds >= 2 * size or size == 1)
    return f"{seconds / size:.1f} {unit}"


def steps_to_measure(available):
    """(warm-up steps, measured steps) that one pass of the train set allows."""
    warmup = min(WARMUP_STEPS, max(1, available // 4))
    return warmup, max(1, min(MEASURED_STEPS, available - warmup))
