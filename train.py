"""The hand-written DDP loop that trains EfficientNet-B0..B7 on ImageNet, and `--evaluate`.

    python train.py --data demo                                               # a few CPU minutes, no ImageNet
    torchrun --nproc_per_node=8 train.py --arch b0 --data /imagenet --dry-run  # its time and memory first
    torchrun --nproc_per_node=8 train.py --arch b0 --data /imagenet            # NVIDIA's B0 recipe
    torchrun --nproc_per_node=8 train.py --output-dir runs/b0 --resume auto    # continue a run
    python train.py --evaluate --resume runs/b0/best.pt                        # with the run's own settings

A checkpoint remembers its run's settings (flags.RUN_SETTINGS); a flag given overrides one, in a note.
Exit codes: 0 done; 2 usage error (also a CUDA out-of-memory); 3 non-finite loss; 4 another process
hung or died; 5 disk full; 75 preempted (SIGTERM/SIGUSR1) and 130 Ctrl-C, last.pt written. Under
torchrun a worker's code reaches the shell as 1. What each means and its fix: docs/faults.md.
"""
import argparse
import contextlib
import copy
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import checkpoints
import cost
import data
import launch
import recipes
import transforms
import utils
from evaluate import evaluate_models
from flags import parse, resolve_amp, resolve_args
from optim import build_optimizer, criterion, lr_at
from utils import DiskFull, UsageError

EXIT_USAGE, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 4, 5, 75, 130


class Preempted(Exception):
    """A stop signal ended the run after last.pt was written; `code` is the exit code."""

    def __init__(self, signal_name, when, ckpt_path, output_dir):
        self.code = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED
        super().__init__(f"stopped by {signal_name} {when}; wrote {ckpt_path}. Continue with the same command and "
                         f"--resume auto --output-dir {output_dir} (exit code {self.code}).")


class NonFiniteLoss(Exception):
    pass


def log(env, message):
    """Progress and notes: rank 0, stdout."""
    if env is None or env.main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def say_error(env, message):
    """What ended the run, when every rank knows it: rank 0, stderr."""
    if env.main:
        print(message, file=sys.stderr, flush=True)


def main(argv=None):
    args, given = parse(argv)
    try:
        env = launch.init_distributed(datetime.timedelta(seconds=args.dist_timeout))
    except UsageError as e:  # the launcher's variables do not tell how to form the group
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # torchrun's next restart (or the scheduler) takes over from here
        print(f"error: rank {os.environ.get('RANK')}: the process group did not form within --dist-timeout "
              f"{args.dist_timeout:g} s ({launch.first_line(e)}); start the job again (--resume auto continues "
              f"the run)", file=sys.stderr)
        return EXIT_PEER_LOST
    if env.launcher == "srun":
        log(env, f"srun: {env.world_size} tasks, process group formed from SLURM's variables at "
                 f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}")
    try:
        say = lambda message: log(env, message)  # noqa: E731
        checkpoint = checkpoints.read_checkpoint(args.resume, args.output_dir, say) if args.resume else None
        resolve_args(args, env, given, checkpoint, say)
        return run(args, env, checkpoint)
    except (Exception, KeyboardInterrupt) as e:
        code = exit_code(e, env, args)
        if code == EXIT_PEER_LOST:
            # The group is broken, with gloo work still pending: tearing it down (here or at
            # interpreter exit) can abort the process (SIGABRT) after the line above. Leave now;
            # the loader workers die with this process (PR_SET_PDEATHSIG), the lock is released.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def exit_code(error, env, args):
    """Say in one line on stderr what ended the run and return its exit code; errors that are not
    the input's, the machine's or a peer's propagate with their traceback."""
    if isinstance(error, (UsageError, utils.DataError)):
        # A bad file met in a loader worker arrives wrapped in the worker's traceback: keep its last
        # line, without the "DataError: " that the traceback puts in front.
        message = str(error).strip().splitlines()[-1]
        message = message.removeprefix(f"{type(error).__module__}.{type(error).__name__}: ")
        print(f"error: {message}", file=sys.stderr)  # every rank: the one that met it may not be rank 0
        return EXIT_USAGE
    if isinstance(error, torch.OutOfMemoryError):  # this rank's alone: it says so itself
        print(f"error: rank {env.rank}: the GPU ran out of memory ({launch.first_line(error)}); lower --batch-size "
              f"(keeping the global batch with --accum-steps) or add --grad-checkpointing", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(error, KeyboardInterrupt):  # before training started, or a second Ctrl-C
        hint = ("nothing written; run the same command again" if args.evaluate or args.dry_run else
                f"nothing saved since the last checkpoint (continue with --resume auto --output-dir {args.output_dir})"
                if args.output_dir else "nothing saved")
        print(f"error: interrupted: stopped at once, {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteLoss):
        say_error(env, f"error: {error}")
        return EXIT_NONFINITE
    if isinstance(error, Preempted):
        say_error(env, str(error))
        return error.code
    if isinstance(error, DiskFull):
        say_error(env, f"error: {error}. Free space there (or move the folder and pass it as --output-dir), "
                       f"then rerun with --resume auto")
        return EXIT_DISK_FULL
    if isinstance(error, RuntimeError) and env.world_size > 1 and launch.is_peer_failure(error):
        # Every rank that gets here says so: the one still running may not be rank 0.
        waited = any(word in str(error).lower() for word in ("timed out", "timeout"))
        what = (f"waited --dist-timeout {args.dist_timeout:g} s for another process, which is stopped, hung or "
                f"unreachable" if waited else "lost another process, which crashed or whose host went down")
        print(f"error: rank {env.rank} {what} ({launch.first_line(error)}); nothing was saved after the last "
              f"checkpoint: rerun with --resume auto (exit code {EXIT_PEER_LOST})", file=sys.stderr)
        return EXIT_PEER_LOST
    raise error


def run(args, env, checkpoint):
    set_up_torch(args)
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs and not args.evaluate:
        log(env, f"the run in {args.output_dir} already finished its {args.epochs} epochs; nothing to do")
        return 0
    started = time.perf_counter()
    r = build(args, env, checkpoint)
    if args.evaluate:
        return evaluate_only(r, checkpoint)
    if args.dry_run:
        return dry_run(r, checkpoint["epoch"] if checkpoint else 0, time.perf_counter() - started)
    r.lock = take_run_dir(args.output_dir, env)
    try:
        if checkpoint is not None:
            restore(r, checkpoint)
        start(r)
        for epoch in range(r.start_epoch, args.epochs):
            if args.run_epochs and epoch - r.start_epoch == args.run_epochs:
                log(env, f"ran {args.run_epochs} epoch(s) as asked (--run-epochs); continue with --resume auto")
                return 0
            row = train_one_epoch(r, epoch)
            evaluate_and_save(r, epoch, row)
        log(env, f"done: best val top-1 {r.best_top1:.3f}" if r.best_top1 >= 0 else "done")
        return 0
    finally:
        utils.unlock_run_dir(r.lock)
        if r.stop is not None:
            r.stop.close()


def set_up_torch(args):
    """Kernel choices, both ways (a process that runs main() again gets each run's own)."""
    torch.backends.cudnn.benchmark = not args.deterministic  # autotuning picks kernels by timing: run-dependent
    torch.backends.cudnn.deterministic = args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA 10.2+)
    torch.use_deterministic_algorithms(args.deterministic, warn_only=True)  # warns naming an op without one
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 as NVIDIA's recipe on A100


def take_run_dir(output_dir, env):
    """Rank 0 makes and locks the run folder (the lock lives as long as the returned handle) and
    clears the temporaries of a run killed while saving; every rank learns the outcome."""
    lock = lock_error = None
    if env.main:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock = utils.lock_run_dir(output_dir)
            utils.remove_stale_temporaries(output_dir)  # left by a run killed while saving
        except UsageError as e:
            lock_error = str(e)
    if lock_error := utils.broadcast_object(lock_error, env):
        raise UsageError(lock_error)
    return lock


@dataclass
class Run:
    """What the phases below share, in the order they run: `build` fills it, `restore` rewinds it to
    a checkpoint, `start` opens the run, `train_one_epoch` and `evaluate_and_save` move it on."""
    # set-up
    args: argparse.Namespace  # every setting, resolved (what args.json and the checkpoints hold)
    env: launch.Dist
    amp_dtype: torch.dtype = None  # autocast's dtype; None: float32
    # data
    train_set: torch.utils.data.Dataset = None
    val_set: torch.utils.data.Dataset = None
    train_sampler: data.TrainSampler = None
    train_loader: data.DeviceLoader = None  # normalised float batches on the device
    val_loader: data.DeviceLoader = None
    # model
    model: nn.Module = None  # unwrapped: what is saved and evaluated
    train_model: nn.Module = None  # the model under DDP and/or torch.compile
    eval_model: nn.Module = None  # the model, compiled with --compile
    ema: utils.EMA = None
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None  # enabled for fp16 only
    # schedule
    global_batch: int = 0  # images per optimizer step: processes x batch x accumulation
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    base_lr: float = 0.0  # --lr (per 4096 images) scaled to the global batch
    # where the run stands: what checkpoints hold and restore() rewinds
    start_epoch: int = 0
    start_step: int = 0  # steps of start_epoch already taken
    step: int = 0  # optimizer steps taken in all
    best_top1: float = -1.0
    history: list = field(default_factory=list)  # metrics.jsonl's rows
    loss_sum: torch.Tensor = None  # this epoch's step losses on this rank, on the device (no sync)
    watch: utils.NonFiniteWatch = None  # non-finite steps, counted on the device
    read_retries_seen: int = 0
    # while it runs
    lock: object = None  # rank 0's lock on the run folder
    stop: utils.StopSignal = None
    interactive: bool = False  # a terminal: a progress bar instead of log lines
    tensorboard: utils.TensorBoard = None

    @property
    def ckpt_path(self):
        return os.path.join(self.args.output_dir, "last.pt")

    def kept(self):
        """What is left of the run on disk when it stops without saving."""
        return f"{self.ckpt_path} kept as it was" if os.path.exists(self.ckpt_path) else "no checkpoint written yet"


def build(args, env, checkpoint):
    """Data, model (the checkpoint's or --weights), and for training the loaders, schedule, DDP
    wrapper, optimizer, GradScaler and EMA: a Run at step 0."""
    r = Run(args, env, resolve_amp(args.amp, env.device))
    build_data(r, checkpoint)
    utils.seed_everything(args.seed + env.rank)  # the model's initialisation
    r.model = checkpoints.build_model(args, env.device, checkpoint, whole=args.evaluate, say=lambda m: log(env, m))
    if not args.evaluate:
        build_training(r)
    r.eval_model = torch.compile(r.model) if args.compile else r.model  # after --sync-bn's conversion
    return r


def build_data(r, checkpoint):
    """Datasets and the val loader. Checks here: those that need the data set."""
    args, env = r.args, r.env
    r.train_set, r.val_set = data.build_datasets(
        args.data, args.image_size, args.val_resize, args.seed, args.min_crop_scale, args.autoaugment,
        with_train=not args.evaluate, decode="cpu" if args.evaluate else args.decode, augment=args.augment,
        val_interpolation=args.val_interpolation, train_size=args.train_size, magnitude=args.randaugment_magnitude,
        magnitude_std=args.magnitude_std, resize_from=args.progressive_resize, resize_epochs=args.progressive_epochs)
    if args.class_map:
        data.apply_class_map(r.val_set, args.class_map)
    if checkpoint is not None:
        where = f"--class-map {args.class_map}" if args.class_map else f"--data {args.data}"
        checkpoints.check_same_labels(checkpoint.get("classes"), r.val_set.classes, where)
    if skipped := data.skipped_note(r.train_set, r.val_set):
        log(env, skipped)
    classes = len(r.val_set.classes)
    if args.num_classes is None:
        args.num_classes = classes
    elif args.num_classes < classes:
        raise UsageError(f"the checkpoint was trained on {args.num_classes} classes, this run has {classes} "
                         f"(--data {args.data}): resume it with its own data, or fine-tune from it with --weights "
                         f"CHECKPOINT (a new run)" if checkpoint is not None else
                         f"--num-classes {args.num_classes} is smaller than the {classes} classes of --data "
                         f"{args.data}: every label needs an output; leave --num-classes out")
    elif args.num_classes > classes:
        log(env, f"note: --num-classes {args.num_classes}: {args.num_classes - classes} outputs more than the "
                 f"{classes} classes of --data {args.data} (they are never a label)")
    if not args.evaluate:
        check_train_set(args, env, len(r.train_set))
    r.val_loader = loader(r, r.val_set, data.ShardSampler(len(r.val_set), env.rank, env.world_size), train=False)


def check_train_set(args, env, images):
    """What the train set's size bounds: a step's images, and the repeats of an image in an epoch."""
    batch = args.batch_size * env.world_size * args.accum_steps
    if images < batch:
        raise UsageError(f"a step needs {batch} images (--batch-size {args.batch_size} x {env.world_size} "
                         f"processes x --accum-steps {args.accum_steps}) but the train set has {images}; "
                         f"lower --batch-size")
    if args.repeated_aug > images // env.world_size:
        raise UsageError(f"--repeated-aug {args.repeated_aug} repeats each image more often than a process has "
                         f"images ({images} over {env.world_size} process(es)): give 1 to {images // env.world_size}")


def loader(r, dataset, sampler, train):
    cuda = r.env.device.type == "cuda"
    batches = data.build_loader(dataset, sampler, r.args.batch_size, r.args.workers, train=train, pin_memory=cuda)
    return data.DeviceLoader(batches, r.env.device, r.args.channels_last, r.args.mean, r.args.std)


def build_training(r):
    args, env = r.args, r.env
    r.train_sampler = data.TrainSampler(len(r.train_set), env.rank, env.world_size, args.seed, args.repeated_aug)
    r.train_loader = loader(r, r.train_set, r.train_sampler, train=True)
    # Every step takes a global batch of distinct images (the sampler's padding is never reached), so
    # an epoch has as many steps on any number of processes that keeps the global batch.
    r.global_batch = args.batch_size * env.world_size * args.accum_steps
    r.steps_per_epoch = len(r.train_set) // r.global_batch
    if args.steps_per_epoch:
        r.steps_per_epoch = min(r.steps_per_epoch, args.steps_per_epoch)
    r.total_steps = r.steps_per_epoch * args.epochs
    r.warmup_steps = round(args.warmup_epochs * r.steps_per_epoch)
    r.base_lr = args.lr * r.global_batch / 4096
    if args.sync_bn and env.world_size > 1:
        r.model = nn.SyncBatchNorm.convert_sync_batchnorm(r.model)
    r.train_model = utils.data_parallel(r.model, env) if env.world_size > 1 else r.model
    if args.compile:
        r.train_model = torch.compile(r.train_model)
    r.optimizer = build_optimizer(r.model, args.opt, r.base_lr, args.weight_decay, args.no_bn_weight_decay,
                                  fused=env.device.type == "cuda")
    r.scaler = torch.amp.GradScaler(env.device.type, enabled=r.amp_dtype == torch.float16)
    r.ema = utils.EMA(r.model, args.ema_decay) if args.ema_decay > 0 else None
    r.loss_sum = torch.zeros((), device=env.device)
    # Non-finite steps: bf16/fp32 stop at the first; fp16 stops after --max-nonfinite skips in a row.
    r.watch = utils.NonFiniteWatch(args.max_nonfinite if r.scaler.is_enabled() else 1, env.device)
    r.read_retries_seen = data.read_retries(r.train_set, r.val_set)


def evaluate_only(r, checkpoint):
    """--evaluate: one JSON line of val figures (and the EMA's, when the checkpoint has one)."""
    args = r.args
    ema = None  # (--sync-bn changes nothing here: eval mode uses the running statistics)
    if checkpoint is not None and checkpoint.get("ema") is not None:
        ema = copy.deepcopy(r.model)
        ema.load_state_dict(checkpoint["ema"])
    counts = {"images": len(r.val_set)}
    real = data.read_real_labels(args.real_labels, r.val_set, args.num_classes) if args.real_labels else None
    if real is not None:
        counts["real_images"] = int((real >= 0).any(dim=1).sum())
    figures = evaluate_models({"": r.eval_model, "ema_": ema}, r.val_loader, r.env, r.amp_dtype, len(r.val_set),
                              flip=args.eval_flip, real_labels=real)
    log(r.env, json.dumps({**counts, **figures}))
    return 0


def dry_run(r, start_epoch, build_seconds):
    """--dry-run: does --batch-size fit (else the batch that does, cost.batch_that_fits); then the
    run as configured for a few dozen steps after a warm-up, a slice of val, and one checkpoint
    written to a temporary folder beside the output folder and removed: the figures measured and the
    run projected from them (cost.py). No run folder, no file left."""
    args, env = r.args, r.env
    if problem := cost.batch_that_fits(r.model, args, env, r.amp_dtype):
        raise UsageError(problem)
    warmup, measured = cost.steps_to_measure(len(r.train_set) // r.global_batch)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    r.train_sampler.set_epoch(start_epoch)
    r.train_model.train()
    batches, meter = iter(r.train_loader), Meter(r.loss_sum.clone())
    for step in range(warmup + measured):
        if step == warmup:
            cost.sync(env.device)
            meter.data_seconds, timed = 0.0, time.perf_counter()
        optimizer_step(r, forward_backward(r, batches, meter))
        r.step += 1
        if step == 0:
            loader_start = meter.data_seconds  # the wait for the first batch: the workers' start
    cost.sync(env.device)
    m = {"steps": measured, "step_seconds": (time.perf_counter() - timed) / measured, "build_seconds": build_seconds,
         "data_seconds": meter.data_seconds, "loader_start": loader_start}
    m["eval_start"], m["eval_batch_seconds"] = cost.eval_timing(r.eval_model, r.val_loader, r.amp_dtype, env.device)
    m["save_seconds"] = cost.time_save(lambda: save(r, start_epoch, 0), args, env)
    m["peak_memory_mb"] = cost.peak_memory_mb(env.device)
    m = cost.slowest(m, env)
    figures = cost.project(m, args, env, r.steps_per_epoch, len(r.val_set), args.epochs - start_epoch, start_epoch)
    cost.report(figures, args, env, measured, lambda message: log(env, message))
    return 0


def restore(r, checkpoint):
    """Rewind the Run to the checkpoint: optimizer, GradScaler, EMA, counters, metrics and every
    rank's random streams, so that training continues with the very next batch."""
    r.optimizer.load_state_dict(checkpoint["optimizer"])
    if r.scaler.is_enabled() and not checkpoint["scaler"]:  # saved by a bf16 or fp32 run
        log(r.env, "note: the checkpoint was not trained with --amp fp16; the GradScaler starts afresh")
    else:
        r.scaler.load_state_dict(checkpoint["scaler"])
    if r.ema is not None:
        r.ema.load_state_dict(checkpoint["ema"])
    r.start_epoch, r.start_step, r.step = checkpoint["epoch"], checkpoint["epoch_step"], checkpoint["step"]
    r.best_top1, r.history = checkpoint["best_top1"], checkpoint["history"]
    restore_ranks(r, checkpoint["ranks"], checkpoint["args"])


def restore_ranks(r, ranks, then):
    """Each rank's random streams and running sums, one to one on as many processes as saved them.
    On another number (the same global batch) the sampler skips what all ranks consumed together, so
    the epoch goes on with exactly the samples not yet seen, but the random streams cannot pass one
    to one; the epoch's loss is a mean over ranks: the old ranks' sum is rescaled."""
    args, env = r.args, r.env
    if env.rank < len(ranks):  # ranks beyond the old count keep their fresh seed
        utils.set_rng_state(ranks[env.rank]["rng"], env.device)
    if len(ranks) == env.world_size:
        r.loss_sum.fill_(ranks[env.rank]["loss_sum"])
        r.watch.skipped.fill_(ranks[env.rank]["skipped"])
    elif env.main:
        r.loss_sum.fill_(sum(rank["loss_sum"] for rank in ranks) * env.world_size / len(ranks))
        r.watch.skipped.fill_(max(rank["skipped"] for rank in ranks))
    if (len(ranks), then["batch_size"], then["accum_steps"]) != (env.world_size, args.batch_size, args.accum_steps):
        left = len(r.train_set) - r.start_step * r.global_batch if r.start_step else len(r.train_set)
        log(env, f"resuming on {env.world_size} process(es) x {args.batch_size} x {args.accum_steps} accumulation "
                 f"(the checkpoint: {len(ranks)} x {then['batch_size']} x {then['accum_steps']}), the same global "
                 f"batch {r.global_batch}: epoch {r.start_epoch + 1} continues with the {left} images not yet seen; "
                 f"schedule and step count go on, but not bit for bit as it would have")


def start(r):
    """Write args.json and the metrics so far, say what runs, and start listening for stop signals."""
    args, env = r.args, r.env
    utils.write_on_main(env, utils.write_json, os.path.join(args.output_dir, "args.json"), vars(args))
    utils.write_on_main(env, utils.write_jsonl, os.path.join(args.output_dir, "metrics.jsonl"), r.history)
    log(env, f"EfficientNet-{args.arch}: {sum(p.numel() for p in r.model.parameters()):,} parameters, "
             f"{args.image_size}px (eval {args.val_resize} -> {args.image_size}), {args.num_classes} classes, "
             f"{env.world_size} process(es) on {env.device.type}, amp {r.amp_dtype or 'off'}, "
             f"{'channels_last' if args.channels_last else 'NCHW'}"
             f"{', lean activations' if args.lean_activations and not args.compile else ''}"
             f"{', deterministic' if args.deterministic else ''}")
    log(env, recipes.describe(args))
    log(env, f"global batch {r.global_batch} = {args.batch_size} x {env.world_size} process(es) x "
             f"{args.accum_steps} accumulation; lr {args.lr:g} per 4096 -> {r.base_lr:.6g}; "
             f"{r.steps_per_epoch} steps/epoch, {args.epochs} epochs, warmup {r.warmup_steps} steps; "
             f"{args.workers} loader worker(s) per process, decode on {args.decode}; output {args.output_dir}")
    r.interactive = sys.stderr.isatty()
    r.stop = utils.StopSignal(env)
    if args.tensorboard and env.main:
        r.tensorboard = utils.TensorBoard(os.path.join(args.output_dir, "tensorboard"))


@dataclass
class Meter:
    """Wall-clock figures of an epoch and of its current logging interval."""
    loss_at_start: torch.Tensor  # Run.loss_sum when the interval began
    epoch_start: float = field(default_factory=time.time)
    interval_start: float = field(default_factory=time.time)
    steps: int = 0  # in the interval
    data_seconds: float = 0.0  # waiting for batches, in the epoch
    data_at_start: float = 0.0  # data_seconds when the interval began


def train_one_epoch(r, epoch):
    """Train the steps of `epoch` that are left; -> the epoch's row of training figures."""
    args, env = r.args, r.env
    first_step = r.start_step if epoch == r.start_epoch else 0
    if first_step == 0:
        r.loss_sum.zero_()
        r.watch.skipped.zero_()
    r.train_sampler.set_epoch(epoch, skip=first_step * r.global_batch)
    r.train_model.train()
    batches = iter(r.train_loader)
    bar = tqdm(total=r.steps_per_epoch, initial=first_step, desc=f"epoch {epoch + 1}/{args.epochs}",
               disable=not (env.main and r.interactive), dynamic_ncols=True)
    meter = Meter(r.loss_sum.clone())
    for epoch_step in range(first_step, r.steps_per_epoch):
        lr = lr_at(r.step, **lr_schedule(r))
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        step_loss = forward_backward(r, batches, meter)
        r.loss_sum += step_loss
        optimizer_step(r, step_loss)
        r.step += 1
        meter.steps += 1
        bar.update(1)
        last = epoch_step + 1 == r.steps_per_epoch
        if r.step % args.log_every == 0 or last:
            report_interval(r, meter, bar, epoch, epoch_step, lr)
        if r.stop.requested():
            save(r, epoch, epoch_step + 1)
            bar.close()
            raise Preempted(r.stop.name, f"at step {r.step} (epoch {epoch + 1})", r.ckpt_path, args.output_dir)
        if args.save_every_steps and r.step % args.save_every_steps == 0 and not last:
            save(r, epoch, epoch_step + 1)
    bar.close()
    return epoch_row(r, epoch, first_step, meter)


def forward_backward(r, batches, meter):
    """The micro-batches of one optimizer step, forward and backward; -> the step's loss (on the
    device). Gradients are all-reduced on the last micro-batch only."""
    args = r.args
    step_loss = torch.zeros((), device=r.env.device)
    for micro in range(args.accum_steps):
        wait_start = time.perf_counter()
        images, labels = next(batches)
        meter.data_seconds += time.perf_counter() - wait_start
        images, targets = augment_batch(r, images, labels, micro)
        last = micro == args.accum_steps - 1
        with contextlib.nullcontext() if r.env.world_size == 1 or last else r.train_model.no_sync():
            with torch.autocast(r.env.device.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
                logits = r.train_model(images)
            loss = criterion(logits, targets, args.label_smoothing) / args.accum_steps
            r.scaler.scale(loss).backward()
        step_loss += loss.detach()
    return step_loss


def augment_batch(r, images, labels, micro):
    """Random erasing, then mixup or cutmix, of a micro-batch on the device; each micro-batch draws
    from its own seed, a function of (seed, step, rank, micro) (transforms.batch_seed)."""
    args = r.args
    if not (args.random_erase or args.mixup or args.cutmix):
        return images, labels
    seed = transforms.batch_seed(args.seed, r.step, r.env.rank, micro)
    return transforms.augment_batch(images, labels, args.num_classes, seed, args.random_erase, args.mixup, args.cutmix)


def report_interval(r, meter, bar, epoch, epoch_step, lr):
    """The logging interval's figures (the one device sync of the interval) to the bar, the log
    and TensorBoard; the next interval starts."""
    check_finite(r)
    now = time.time()
    elapsed = max(now - meter.interval_start, 1e-9)
    loss = (r.loss_sum - meter.loss_at_start).item() / meter.steps
    rate = meter.steps * r.global_batch / elapsed
    data_share = 100 * (meter.data_seconds - meter.data_at_start) / elapsed
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", data=f"{data_share:.0f}%")
    if not r.interactive:  # log files get one plain line per interval instead of a bar
        eta = (r.steps_per_epoch - epoch_step - 1) * r.global_batch / rate
        log(r.env, f"epoch {epoch + 1}/{r.args.epochs} step {epoch_step + 1}/{r.steps_per_epoch} loss {loss:.4f} "
                   f"lr {lr:.4g} {rate:.1f} img/s data {data_share:.0f}% epoch eta {eta / 60:.1f} min")
    if r.tensorboard:
        r.tensorboard.add("train", {"loss": loss, "lr": lr, "images_per_sec": rate, "data_percent": data_share}, r.step)
    meter.interval_start, meter.loss_at_start, meter.steps, meter.data_at_start = \
        now, r.loss_sum.clone(), 0, meter.data_seconds


def epoch_row(r, epoch, first_step, meter):
    """The epoch's training figures, agreed over the ranks (collective)."""
    env, seconds = r.env, time.time() - meter.epoch_start
    row = {"epoch": epoch + 1, "lr": lr_at(r.step - 1, **lr_schedule(r)),
           "train_loss": utils.all_reduce(r.loss_sum.clone(), env).item() / (r.steps_per_epoch * env.world_size),
           "images_per_sec": (r.steps_per_epoch - first_step) * r.global_batch / seconds,
           "epoch_seconds": seconds,
           # the slowest rank's wait holds every rank up (gradients meet in the all_reduce)
           "data_seconds": utils.all_reduce(torch.tensor(meter.data_seconds, dtype=torch.float64, device=env.device),
                                            env, op=dist.ReduceOp.MAX).item()}
    if r.scaler.is_enabled():
        row["skipped_steps"] = int(utils.all_reduce(r.watch.skipped.clone(), env, op=dist.ReduceOp.MAX).item())
    return row


def optimizer_step(r, step_loss):
    """Unscale (fp16), clip, step, EMA; non-finite steps are counted on the device, without a sync."""
    args, model = r.args, r.model
    if r.scaler.is_enabled():
        r.scaler.unscale_(r.optimizer)  # true gradients for the overflow check and for clipping
    if r.scaler.is_enabled() or args.grad_clip > 0:  # one norm serves both
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if args.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(model.parameters(), args.grad_clip, grad_norm)
    bad = ~torch.isfinite(grad_norm if r.scaler.is_enabled() else step_loss)
    # Skips the update when fp16 gradients overflowed; deciding that costs a device sync per
    # step unless the optimizer is fused (SGD on CUDA), RMSprop's case.
    r.scaler.step(r.optimizer)
    r.scaler.update()
    r.optimizer.zero_grad(set_to_none=True)
    if r.ema is not None:
        r.ema.update(r.step)
    r.watch.update(bad, r.step + 1)  # on the device; read at log and save time only


def lr_schedule(r):
    """lr_at's arguments for this run (--lr and --warmup-lr scaled to the global batch; the step
    schedule's --decay-epochs rounded to whole steps)."""
    args = r.args
    decay_steps = max(1, round(args.decay_epochs * r.steps_per_epoch)) if args.sched == "step" else 0
    return {"base_lr": r.base_lr, "warmup_steps": r.warmup_steps, "total_steps": r.total_steps,
            "min_lr": args.min_lr, "warmup_lr": args.warmup_lr * r.global_batch / 4096, "decay_steps": decay_steps,
            "decay_rate": args.decay_rate}


def evaluate_and_save(r, epoch, row):
    """Evaluate (every --eval-every epochs), add the row to metrics.jsonl, write last.pt (and
    best.pt), and stop here if a stop signal came during the epoch."""
    args, env = r.args, r.env
    evaluated = args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs)
    if evaluated:
        row.update(evaluate_models({"val_": r.eval_model, "val_ema_": r.ema and r.ema.module}, r.val_loader, env,
                                   r.amp_dtype, len(r.val_set)))
    reads = data.read_retries(r.train_set, r.val_set)  # this rank's train and val reads
    retries = int(utils.all_reduce(torch.tensor(reads - r.read_retries_seen, device=env.device), env).item())
    r.read_retries_seen = reads
    if retries:
        row["read_retries"] = retries
    r.history.append(row)
    is_best = evaluated and row["val_top1"] > r.best_top1
    if is_best:
        r.best_top1 = row["val_top1"]
    # Before saving: the save ends with a barrier, so no rank exits straight out of an all_reduce
    # (gloo may abort a rank whose peer tears the group down at that moment).
    stopping = r.stop.requested(now=True)
    save(r, epoch + 1, 0)
    utils.write_on_main(env, utils.write_jsonl, os.path.join(args.output_dir, "metrics.jsonl"), r.history)
    if is_best:
        utils.write_on_main(env, utils.copy_atomic, r.ckpt_path, os.path.join(args.output_dir, "best.pt"))
    if args.keep_best and evaluated:
        utils.write_on_main(env, checkpoints.keep_best_checkpoints, args.output_dir, r.history, args.keep_best, r.ckpt_path)
    if r.tensorboard:
        r.tensorboard.add("epoch", {k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
    log(env, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if stopping:
        raise Preempted(r.stop.name, f"after epoch {epoch + 1}", r.ckpt_path, args.output_dir)


def check_finite(r):
    """Collective, syncs: stop when a non-finite loss (fp16: too many skipped steps) was seen."""
    trip = r.watch.tripped_at(r.env)
    if trip is not None:
        what = "the loss was not finite" if r.watch.limit == 1 else f"{r.watch.limit} consecutive steps overflowed"
        raise NonFiniteLoss(f"{what} at step {trip} (epoch {(trip - 1) // r.steps_per_epoch + 1}); stopped "
                            f"without saving ({r.kept()}). Try a lower --lr, --grad-clip or --amp bf16.")


def save(r, epoch, epoch_step):
    """Collective (gathers every rank's RNG state and sums); rank 0 writes last.pt atomically."""
    check_finite(r)
    state = {"args": vars(r.args), "epoch": epoch, "epoch_step": epoch_step, "step": r.step,
             "model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(), "scaler": r.scaler.state_dict(),
             "ema": r.ema.state_dict() if r.ema else None, "best_top1": r.best_top1, "history": r.history,
             "classes": list(r.val_set.classes),  # the class folders, in label order
             "ranks": utils.gather_objects({"rng": utils.rng_state(r.env.device), "loss_sum": r.loss_sum.item(),
                                            "skipped": r.watch.skipped.item()}, r.env)}
    try:
        utils.write_on_main(r.env, utils.save_atomic, state, r.ckpt_path)
    except DiskFull as e:
        raise DiskFull(f"{e} ({r.kept()})") from None


if __name__ == "__main__":
    sys.exit(main())
