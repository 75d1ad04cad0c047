"""Train or evaluate EfficientNet-B0..B7 on ImageNet with one hand-written DDP loop.

    torchrun --nproc_per_node=8 train.py --arch b0 --data /imagenet        # NVIDIA's B0 recipe
    python train.py --data demo --image-size 64 --epochs 8 ...             # CPU demo, no ImageNet
    python train.py --evaluate --weights efficientnet_b0.pth --data /imagenet
    python train.py --data my_classes --weights efficientnet_b0.pth --epochs 30 ...   # fine-tune

Exit codes: 0 finished (or --run-epochs done), 2 usage error (one line, no traceback),
3 non-finite loss (nothing saved after it), 4 another process hung or died (--dist-timeout;
rerun with --resume auto), 5 disk full (the previous last.pt kept), 75 preempted by
SIGTERM/SIGUSR1 (last.pt written: requeue with --resume auto). Under torchrun a worker's non-zero
code reaches the shell as 1.
"""
import argparse
import contextlib
import datetime
import importlib
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import utils
from efficientnet import SCALING, arch_config, canonical_arch, convert_state_dict, create_model, load_pretrained, member
from utils import UsageError

EXIT_USAGE, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_DISK_FULL, EXIT_PREEMPTED = 2, 3, 4, 5, 75


class Preempted(Exception):
    pass


class NonFiniteLoss(Exception):
    pass


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except where there is none or the help text says it already
    (the arch-dependent ones)."""

    def _get_help_string(self, action):
        if action.default is None or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see train.py --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def seconds(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def parse_args(argv=None):
    p = Parser(description="Train or evaluate EfficientNet on ImageNet (torchrun for several GPUs).",
               formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="b0", help="b0..b7; tf_efficientnet_b0..b7 for Google's TF weights (timm's tf_ files): "
                                                "TF 'SAME' padding and BatchNorm")
    g.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data's class count)")
    g.add_argument("--image-size", type=int, default=None, help="train and eval size (default: the member's resolution)")
    g.add_argument("--val-resize", type=int, default=None, help="eval: resize the short side to this, then center-crop (default: image size + 32)")
    g.add_argument("--dropout", type=float, default=None, help="before the classifier (default: the member's rate)")
    g.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth rate of the last block")
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm eps (default: 1e-5, tf_ archs 1e-3; torchvision's b5-b7 weights: 1e-3)")
    g.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum (default: 0.1, tf_ archs 0.01; torchvision's b5-b7 weights: 0.01)")
    g.add_argument("--weights", default=None, help="start from (or --evaluate) a state dict: this repo's, torchvision's or timm's; "
                                                   "a classifier of another class count is re-initialised (fine-tuning)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="ImageNet root (train/ and val/ class folders), 'demo' or 'synthetic'")
    g.add_argument("--workers", type=int, default=None,
                   help=f"loader processes per GPU/process (default: this machine's cores per local process, "
                        f"less one for the process itself: {data.default_workers()} here)")
    g.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                   help="training images: cpu = loader workers decode (libjpeg-turbo for JPEGs, PIL for the rest), "
                        "crop and resize; gpu = workers only read the files and draw the crops, the GPU decodes each "
                        "batch in one nvJPEG call and crops, resizes and flips it (CUDA only; evaluation stays on the CPU)")
    g.add_argument("--autoaugment", action="store_true", help="torchvision's ImageNet AutoAugment policy")
    g.add_argument("--min-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--val-interpolation", choices=["bicubic", "bilinear"], default="bicubic", help="eval resize filter (torchvision's b1 V2 weights: bilinear)")
    g.add_argument("--mean", type=float, nargs=3, default=list(data.IMAGENET_MEAN), metavar=("R", "G", "B"),
                   help="normalisation mean of the 0-1 pixels: ImageNet's (AdvProp tf_*_ap weights: 0.5 0.5 0.5)")
    g.add_argument("--std", type=float, nargs=3, default=list(data.IMAGENET_STD), metavar=("R", "G", "B"),
                   help="normalisation std: ImageNet's (AdvProp tf_*_ap weights: 0.5 0.5 0.5)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--opt", choices=["rmsprop", "sgd"], default="rmsprop", help="RMSprop (alpha .9, eps .01, momentum .9) or SGD (Nesterov, momentum .9)")
    g.add_argument("--lr", type=float, default=None, help="learning rate per 4096 images, scaled to the real global batch (default: 0.08 for b0-b3, 0.16 for b4-b7)")
    g.add_argument("--min-lr", type=float, default=0.0, help="where the cosine ends")
    g.add_argument("--warmup-epochs", type=float, default=16, help="linear warmup length")
    g.add_argument("--epochs", type=int, default=400, help="length of the schedule")
    g.add_argument("--weight-decay", type=float, default=None, help="on all parameters, BatchNorm included (default: 1e-5 for b0-b3, 5e-6 for b4-b7)")
    g.add_argument("--no-bn-weight-decay", action="store_true", help="no weight decay on BatchNorm parameters and biases (NVIDIA)")
    g.add_argument("--batch-size", type=int, default=256, help="images per process and step")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights, e.g. 0.9999 (0: off)")
    g = p.add_argument_group("speed")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast dtype; auto: bf16 on GPUs with native bf16 (compute capability 8.0+), else fp16 (GradScaler); off on CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC memory format (default: on for CUDA)")
    g.add_argument("--lean-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="memory-saving BN+SiLU and squeeze-excite (efficientnet.py; default: on for the CPU, where it "
                        "is also faster, off for CUDA, where an earlier form measured 0.78x torchvision's speed on an H200)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic CUDA kernels, no cuDNN autotuning: a CUDA run then resumes bit for bit (on the "
                        "same GPU model and world size), at a cost in speed; CPU runs always do")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<arch>-<date-time>)")
    g.add_argument("--resume", default=None, help="checkpoint to continue, or 'auto': the newest good one in --output-dir")
    g.add_argument("--evaluate", action="store_true", help="only evaluate --resume or --weights on the val set")
    g.add_argument("--seed", type=int, default=0, help="every rank seeds with seed + rank")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (0: never)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress updates")
    g.add_argument("--save-every-steps", type=int, default=0, help="also write last.pt every N steps (0: only at epoch ends)")
    g.add_argument("--run-epochs", type=int, default=0, help="run this many epochs of the schedule, save and exit 0 (0: to the end)")
    g.add_argument("--steps-per-epoch", type=int, default=0, help="cap the steps of an epoch, e.g. for smoke tests and throughput runs (0: the whole train set)")
    g.add_argument("--dist-timeout", type=seconds, default=1800,
                   help="seconds a process waits for the others (set-up, every collective) before the run stops "
                        "with an error: a stopped, hung or lost process cannot block the run forever")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write the interval and epoch figures for TensorBoard under OUTPUT_DIR/tensorboard "
                        "(needs the tensorboard package)")
    g.add_argument("--max-nonfinite", type=int, default=20, help="fp16: stop after this many consecutive skipped steps (bf16/fp32 stop at the first)")
    return p.parse_args(argv)


def resolve_args(args):
    """Fill the arch-dependent defaults and check every value before any work is done."""
    try:
        args.arch = canonical_arch(args.arch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    scaling, large = SCALING[member(args.arch)], member(args.arch) in ("b4", "b5", "b6", "b7")
    defaults = arch_config(args.arch)  # tf_ archs: TF's BatchNorm
    args.bn_eps = defaults["bn_eps"] if args.bn_eps is None else args.bn_eps
    args.bn_momentum = defaults["bn_momentum"] if args.bn_momentum is None else args.bn_momentum
    args.image_size = args.image_size or scaling.resolution
    args.val_resize = args.val_resize or args.image_size + 32  # NVIDIA: 224 -> 256, 380 -> 412
    args.dropout = scaling.dropout if args.dropout is None else args.dropout
    args.workers = data.default_workers() if args.workers is None else args.workers
    args.lr = args.lr if args.lr is not None else (0.16 if large else 0.08)
    args.weight_decay = args.weight_decay if args.weight_decay is not None else (5e-6 if large else 1e-5)
    positive = ["image_size", "val_resize", "batch_size", "accum_steps", "epochs", "lr", "log_every"]
    non_negative = ["workers", "warmup_epochs", "min_lr", "weight_decay", "mixup", "grad_clip", "eval_every",
                    "save_every_steps", "run_epochs", "steps_per_epoch", "bn_eps", "max_nonfinite"]
    for name in positive:
        if not getattr(args, name) > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in non_negative:
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative, got {getattr(args, name)}")
    for name in ["dropout", "drop_path", "label_smoothing", "ema_decay", "bn_momentum"]:
        if not 0 <= getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not all(s > 0 for s in args.std):
        raise UsageError(f"--std must be positive, got {' '.join(map(str, args.std))}")
    if not 0 < args.min_crop_scale <= 1:
        raise UsageError(f"--min-crop-scale must be in (0, 1], got {args.min_crop_scale}")
    if args.val_resize < args.image_size:
        raise UsageError(f"--val-resize {args.val_resize} is smaller than --image-size {args.image_size}")
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be positive, got {args.num_classes}")
    if args.evaluate and not (args.resume or args.weights):
        raise UsageError("--evaluate needs --resume CHECKPOINT or --weights FILE")
    if args.resume and args.weights:
        raise UsageError("give --resume (continue a run) or --weights (start from weights), not both")
    if args.resume == "auto" and not args.output_dir:
        raise UsageError("--resume auto needs --output-dir (the run folder to continue)")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # optional: fails without the tensorboard package
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or leave the flag out)") from None
    if args.weights and not os.path.isfile(args.weights):
        raise UsageError(f"--weights file {args.weights} does not exist")
    return args


def native_bf16(device):
    """bf16 in hardware: compute capability 8.0+ (A100, H100, RTX 30xx on). is_bf16_supported()
    also says yes where bf16 is emulated (V100, T4): slow, without cuDNN's convolutions."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_amp(choice, device):
    cuda = device.type == "cuda"
    if choice == "auto":
        return (torch.bfloat16 if native_bf16(device) else torch.float16) if cuda else None
    if choice == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--amp bf16: this GPU has no bfloat16; use --amp fp16")
    if choice == "fp16" and not cuda:
        # PyTorch's float16 kernels on the CPU give NaN gradients here (torchvision's model too).
        raise UsageError("--amp fp16 is for GPUs: on the CPU use --amp bf16 or --amp off")
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def lr_at(step, base_lr, warmup_steps, total_steps, min_lr=0.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup reaching base_lr at the last
    warmup step, then a cosine from base_lr to min_lr at total_steps."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def criterion(logits, targets, label_smoothing):
    """Cross-entropy in float32 with label smoothing; `targets` are class indices or, with mixup,
    probabilities (smoothing then mixes those with the uniform distribution)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


@torch.no_grad()
def evaluate(model, loader, env, amp_dtype, expected_images):
    """Top-1 / top-5 (percent) and mean cross-entropy over the whole val set. Each rank sums over
    its shard (no padding duplicates); the sums meet in one all_reduce and the image count must
    equal the val set's size."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss, top-1 hits, top-5 hits, images
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not (env.main and sys.stderr.isatty())):
        with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
    loss, top1, top5, images = utils.all_reduce(totals, env).tolist()
    if int(images) != expected_images:
        raise RuntimeError(f"evaluation counted {int(images)} images but the val set has {expected_images}")
    return {"top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images, "loss": loss / images,
            "images": int(images)}


def build_optimizer(model, args, lr, fused=False):
    """`fused` (CUDA): SGD's one-kernel step, which also lets the fp16 GradScaler skip a step
    without a device synchronisation. RMSprop has no fused form in torch."""
    decay, no_decay = [], []
    for p in model.parameters():
        # NVIDIA's variant leaves BatchNorm weights/biases and all biases (the 1-d tensors) alone.
        (no_decay if args.no_bn_weight_decay and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if args.opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.01, momentum=0.9)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)


def prepare_run(args, env):
    """-> (output_dir, checkpoint or None). Never clobbers a run: an output dir that holds one is
    continued (--resume auto) or refused; a checkpoint of another arch is refused."""
    checkpoint = None
    if args.resume and args.resume != "auto":
        checkpoint = utils.load_checkpoint(args.resume)
        if "model" not in checkpoint or "epoch" not in checkpoint:
            raise UsageError(f"{args.resume} is not a train.py checkpoint (bare weights go to --weights)")
        output_dir = args.output_dir or os.path.dirname(os.path.abspath(args.resume))
    else:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        output_dir = args.output_dir or utils.broadcast_object(os.path.join("runs", f"{args.arch}-{stamp}"), env)
        if args.resume == "auto":
            path, checkpoint, skipped = utils.newest_good_checkpoint(output_dir)
            for problem in skipped:
                log(env, f"warning: skipping {problem}")
            if path:
                log(env, f"resuming from {path}")
        elif not args.evaluate and os.path.exists(os.path.join(output_dir, "last.pt")):
            raise UsageError(f"{output_dir} already holds a run (last.pt): continue it with --resume auto, "
                             f"or choose another --output-dir")
    if checkpoint is not None and checkpoint["args"]["arch"] != args.arch:
        raise UsageError(f"checkpoint is for {checkpoint['args']['arch']}, not {args.arch}: "
                         f"pass --arch {checkpoint['args']['arch']}")
    if checkpoint is not None:  # weights only work on inputs normalised as in their training
        for flag, given, default in (("mean", args.mean, data.IMAGENET_MEAN), ("std", args.std, data.IMAGENET_STD)):
            trained = " ".join(map(str, checkpoint["args"].get(flag, default)))  # older checkpoints: ImageNet's
            if trained != " ".join(map(str, given)):
                raise UsageError(f"checkpoint was trained with --{flag} {trained}, not {' '.join(map(str, given))}: "
                                 f"pass --{flag} {trained}")
    return output_dir, checkpoint


def restore_rng(env, state):
    note = utils.set_rng_state(state, env.device)  # a note when an older checkpoint's GPU states are ambiguous
    if note:
        log(env, note)


def log(env, message):
    if env.main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def write_on_main(env, write, *args):
    """Collective: rank 0 calls `write(*args)`, which writes a file of the run; a full disk there
    raises DiskFull on every rank, so that all stop together. Doubles as a barrier: nobody exits
    (and so gets the others killed by torchrun) before the write."""
    problem = None
    if env.main:
        try:
            write(*args)
        except utils.DiskFull as e:
            problem = str(e)
    problem = utils.broadcast_object(problem, env)
    if problem:
        raise utils.DiskFull(problem)


def main(argv=None):
    args = parse_args(argv)
    timeout = f"--dist-timeout {args.dist_timeout:g} s"
    try:
        env = utils.init_distributed(datetime.timedelta(seconds=args.dist_timeout))
    except RuntimeError as e:  # torchrun's next restart (or the scheduler) takes over from here
        print(f"error: rank {os.environ.get('RANK')}: the process group did not form within {timeout} "
              f"({utils.first_line(e)}); start the job again (--resume auto continues the run)", file=sys.stderr)
        return EXIT_PEER_LOST
    try:
        return run(resolve_args(args), env)
    except (UsageError, data.DataError) as e:
        # A bad file met in a loader worker arrives wrapped in the worker's traceback: keep its last
        # line, without the "data.DataError: " that the traceback puts in front.
        message = str(e).strip().splitlines()[-1].removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        print(f"error: {message}", file=sys.stderr)  # every rank: the one that met it may not be rank 0
        return EXIT_USAGE
    except NonFiniteLoss as e:
        log(env, f"error: {e}")
        return EXIT_NONFINITE
    except Preempted as e:
        log(env, str(e))
        return EXIT_PREEMPTED
    except utils.DiskFull as e:
        log(env, f"error: {e}. Free space there (or move the folder and pass it as --output-dir), then "
                 f"rerun with --resume auto")
        return EXIT_DISK_FULL
    except RuntimeError as e:
        if env.world_size == 1 or not utils.is_peer_failure(e):
            raise
        # Every rank that gets here says so: the one still running may not be rank 0.
        waited = any(word in str(e).lower() for word in ("timed out", "timeout"))
        what = (f"waited {timeout} for another process, which is stopped, hung or unreachable" if waited
                else "lost another process, which crashed or whose host went down")
        print(f"error: rank {env.rank} {what} ({utils.first_line(e)}); nothing was saved after the last "
              f"checkpoint: rerun with --resume auto (exit code {EXIT_PEER_LOST})", file=sys.stderr)
        return EXIT_PEER_LOST
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Run:
    """The state that the phases of a training run share, one plain object: `build` fills it,
    `restore` rewinds it to a checkpoint, `start` opens the run, `train_one_epoch` and
    `evaluate_and_save` move it on. It holds
    - set-up: args, env, amp_dtype, channels_last, lean, output_dir, ckpt_path;
    - data: train_set, val_set, num_classes, train_sampler, train_loader, val_loader;
    - model: model (unwrapped: what is saved), train_model (DDP / compiled), eval_model, ddp,
      optimizer, scaler, ema;
    - schedule: global_batch, steps_per_epoch, total_steps, warmup_steps, base_lr;
    - where the run stands: start_epoch, start_step, step, best_top1, history, loss_sum, watch,
      read_retries_seen;
    - from `start`: lock, stop, interactive, tensorboard."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


def run(args, env):
    amp_dtype, cuda = set_up_torch(args, env)
    output_dir, checkpoint = prepare_run(args, env)
    if args.evaluate and checkpoint is None and not args.weights:
        raise UsageError(f"--resume auto found no checkpoint in {output_dir} to evaluate")
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs and not args.evaluate:
        log(env, f"the run in {output_dir} already finished its {args.epochs} epochs; nothing to do")
        return 0
    lock = None if args.evaluate else take_run_dir(output_dir, env)  # held while the run lasts
    r = build(args, env, amp_dtype, cuda, output_dir, checkpoint)
    if args.evaluate:
        return evaluate_only(r, checkpoint)
    if checkpoint is not None:
        restore(r, checkpoint)
    start(r, lock)
    for epoch in range(r.start_epoch, args.epochs):
        if args.run_epochs and epoch - r.start_epoch == args.run_epochs:
            log(env, f"ran {args.run_epochs} epoch(s) as asked (--run-epochs); continue with --resume auto")
            return 0
        row = train_one_epoch(r, epoch)
        evaluate_and_save(r, epoch, row)
    log(env, f"done: best val top-1 {r.best_top1:.3f}" if r.best_top1 >= 0 else "done")
    return 0


def set_up_torch(args, env):
    """-> (autocast dtype or None, whether on CUDA); refuses what this device cannot do."""
    amp_dtype = resolve_amp(args.amp, env.device)
    cuda = env.device.type == "cuda"
    if args.decode == "gpu" and not cuda and not args.evaluate:
        raise UsageError("--decode gpu needs a CUDA GPU and none is visible; use --decode cpu")
    if args.sync_bn and not cuda:
        raise UsageError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); leave it off on the CPU")
    if amp_dtype == torch.bfloat16 and cuda and not native_bf16(env.device):
        log(env, "note: this GPU emulates bfloat16 (compute capability below 8.0), slowly; --amp fp16 is faster here")
    torch.backends.cudnn.benchmark = not args.deterministic  # autotuning picks kernels by timing: run-dependent
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA 10.2+)
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns naming any op that has no such kernel
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 as NVIDIA's recipe on A100
    torch.backends.cudnn.allow_tf32 = True
    return amp_dtype, cuda


def take_run_dir(output_dir, env):
    """Rank 0 locks the run folder (the lock lives as long as the returned handle) and clears the
    temporaries of a run killed while saving; every rank learns the outcome."""
    lock = lock_error = None
    if env.main:
        os.makedirs(output_dir, exist_ok=True)
        try:
            lock = utils.lock_run_dir(output_dir)
            utils.remove_stale_temporaries(output_dir)  # left by a run killed while saving
        except UsageError as e:
            lock_error = str(e)
    lock_error = utils.broadcast_object(lock_error, env)
    if lock_error:
        raise UsageError(lock_error)
    return lock


def build(args, env, amp_dtype, cuda, output_dir, checkpoint):
    """Data, model (with --weights or the checkpoint's weights), and for training the loaders,
    schedule, DDP wrapper, optimizer, GradScaler and EMA: a Run at step 0."""
    channels_last = cuda if args.channels_last is None else args.channels_last
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    train_set, val_set = data.build_datasets(args.data, args.image_size, args.val_resize, args.seed,
                                             args.min_crop_scale, args.autoaugment, with_train=not args.evaluate,
                                             decode=args.decode if not args.evaluate else "cpu",
                                             val_interpolation=args.val_interpolation)
    num_classes = args.num_classes or len(val_set.classes)
    val_loader = data.DeviceLoader(
        data.build_loader(val_set, data.ShardSampler(len(val_set), env.rank, env.world_size),
                          args.batch_size, args.workers, train=False, pin_memory=cuda), env.device, channels_last,
        args.mean, args.std)

    utils.seed_everything(args.seed + env.rank)
    lean = not cuda if args.lean_activations is None else args.lean_activations
    model = create_model(args.arch, num_classes, dropout=args.dropout, drop_path_rate=args.drop_path,
                         bn_eps=args.bn_eps, bn_momentum=args.bn_momentum, lean_activations=lean)
    if args.weights:
        load_weights(model, args, env)
    if checkpoint is not None:
        classes_then = checkpoint["model"]["classifier.weight"].shape[0]
        if classes_then != num_classes:
            raise UsageError(f"the checkpoint was trained on {classes_then} classes, this run has {num_classes} "
                             f"({'--num-classes' if args.num_classes else f'--data {args.data}'}): resume it with "
                             f"its own data, or fine-tune from it with --weights CHECKPOINT (a new run)")
        model.load_state_dict(checkpoint["model"])
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(env.device, memory_format=memory_format)
    r = Run(args=args, env=env, amp_dtype=amp_dtype, output_dir=output_dir, channels_last=channels_last,
            lean=lean, train_set=train_set, val_set=val_set, val_loader=val_loader, model=model)
    if args.evaluate:
        return r

    global_batch = args.batch_size * env.world_size * args.accum_steps
    if len(train_set) < global_batch:
        raise UsageError(f"a step needs {global_batch} images (--batch-size {args.batch_size} x {env.world_size} "
                         f"processes x --accum-steps {args.accum_steps}) but the train set has {len(train_set)}; "
                         f"lower --batch-size")
    r.train_sampler = data.TrainSampler(len(train_set), env.rank, env.world_size, args.seed)
    r.train_loader = data.DeviceLoader(
        data.build_loader(train_set, r.train_sampler, args.batch_size, args.workers, train=True, pin_memory=cuda),
        env.device, channels_last, args.mean, args.std)
    # Every step takes a global batch of distinct images (the sampler's padding is never reached), so
    # an epoch has as many steps on any number of processes that keeps the global batch.
    steps_per_epoch = len(train_set) // global_batch
    if args.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, args.steps_per_epoch)
    r.num_classes, r.global_batch, r.steps_per_epoch = num_classes, global_batch, steps_per_epoch
    r.total_steps = steps_per_epoch * args.epochs
    r.warmup_steps = round(args.warmup_epochs * steps_per_epoch)
    r.base_lr = args.lr * global_batch / 4096

    if args.sync_bn and env.world_size > 1:
        model = r.model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    r.ddp = env.world_size > 1
    r.train_model = utils.data_parallel(model, env) if r.ddp else model
    if args.compile:
        r.train_model = torch.compile(r.train_model)
    r.eval_model = torch.compile(model) if args.compile else model
    r.optimizer = build_optimizer(model, args, r.base_lr, fused=cuda)
    r.scaler = torch.amp.GradScaler(env.device.type, enabled=amp_dtype == torch.float16)
    r.ema = utils.EMA(model, args.ema_decay) if args.ema_decay > 0 else None

    # Where the run stands: the counters that restore() rewinds and the epochs move on.
    r.start_epoch, r.start_step, r.step, r.best_top1, r.history = 0, 0, 0, -1.0, []
    r.loss_sum = torch.zeros((), device=env.device)  # sum of this epoch's step losses on this rank
    # Non-finite steps: bf16/fp32 stop at the first; fp16 stops after --max-nonfinite skips in a row.
    r.watch = utils.NonFiniteWatch(args.max_nonfinite if r.scaler.is_enabled() else 1, env.device)
    r.read_retries_seen = data.read_retries(train_set, val_set)
    r.ckpt_path = os.path.join(output_dir, "last.pt")
    return r


def load_weights(model, args, env):
    weights = utils.load_checkpoint(args.weights, what="--weights file",
                                    advice="give a state dict saved by torch.save (this repo's, torchvision's or timm's)")
    try:
        if args.evaluate:  # every tensor, the classifier's too
            model.load_state_dict(convert_state_dict(weights, model))
        else:  # fine-tuning: a classifier of another size keeps its fresh init
            for line in load_pretrained(model, weights):
                log(env, f"--weights {args.weights}: {line}")
    except ValueError as e:
        raise UsageError(f"--weights {args.weights}: {e}") from None
    if os.path.basename(args.weights).startswith("tf_") and not args.arch.startswith("tf_"):
        log(env, f"warning: {args.weights} looks like Google's TF weights (timm's tf_ files), which need "
                 f"--arch tf_efficientnet_{member(args.arch)} (TF padding and BatchNorm)")


def evaluate_only(r, checkpoint):
    """--evaluate: one JSON line of val figures (and the EMA's, when the checkpoint has one)."""
    model, env = r.model, r.env  # (--sync-bn changes nothing here: eval mode uses the running statistics)
    results = evaluate(torch.compile(model) if r.args.compile else model, r.val_loader, env, r.amp_dtype,
                       len(r.val_set))
    if checkpoint is not None and checkpoint.get("ema") is not None:
        model.load_state_dict(checkpoint["ema"])
        ema_results = evaluate(model, r.val_loader, env, r.amp_dtype, len(r.val_set))
        results.update({f"ema_{k}": v for k, v in ema_results.items() if k != "images"})
    log(env, json.dumps(results))
    return 0


def restore(r, checkpoint):
    """Rewind the Run to the checkpoint: optimizer, GradScaler, EMA, counters, metrics and every
    rank's random streams, so that training continues with the very next batch."""
    args, env = r.args, r.env
    r.optimizer.load_state_dict(checkpoint["optimizer"])
    if r.scaler.is_enabled() and not checkpoint["scaler"]:  # saved by a bf16 or fp32 run
        log(env, "note: the checkpoint was not trained with --amp fp16; the GradScaler starts afresh")
    else:
        r.scaler.load_state_dict(checkpoint["scaler"])
    if r.ema is not None:
        if checkpoint["ema"] is None:
            raise UsageError("--ema-decay is on but the checkpoint has no EMA; resume without it")
        r.ema.load_state_dict(checkpoint["ema"])
    r.start_epoch, r.start_step, r.step = checkpoint["epoch"], checkpoint["epoch_step"], checkpoint["step"]
    r.best_top1, r.history = checkpoint["best_top1"], checkpoint["history"]
    ranks, then = checkpoint["ranks"], checkpoint["args"]  # ranks: per-rank RNG streams and running sums
    global_then = then["batch_size"] * len(ranks) * then["accum_steps"]
    if global_then != r.global_batch:
        per_step = args.batch_size * env.world_size
        keep = (f"pass --accum-steps {global_then // per_step}" if global_then % per_step == 0 else
                f"choose --batch-size and --accum-steps with batch x {env.world_size} x accumulation = {global_then}")
        raise UsageError(f"the checkpoint's global batch is {global_then} ({then['batch_size']} x {len(ranks)} "
                         f"process(es) x {then['accum_steps']} accumulation), this run's {r.global_batch} "
                         f"({args.batch_size} x {env.world_size} x {args.accum_steps}); the schedule and the "
                         f"sample order need the same: {keep} (or start anew from it with --weights)")
    if len(ranks) == env.world_size:
        restore_rng(env, ranks[env.rank]["rng"])
        r.loss_sum.fill_(ranks[env.rank]["loss_sum"])
        r.watch.skipped.fill_(ranks[env.rank]["skipped"])
    else:
        # The sampler skips what all ranks consumed together, so the epoch goes on with exactly the
        # samples not yet seen. Random streams cannot pass one to one: ranks beyond the old count keep
        # their fresh seed. The epoch's loss is a mean over ranks: the old ranks' sum is rescaled.
        if env.rank < len(ranks):
            restore_rng(env, ranks[env.rank]["rng"])
        if env.main:
            r.loss_sum.fill_(sum(rank["loss_sum"] for rank in ranks) * env.world_size / len(ranks))
            r.watch.skipped.fill_(max(rank["skipped"] for rank in ranks))
    if (len(ranks), then["batch_size"], then["accum_steps"]) != (env.world_size, args.batch_size, args.accum_steps):
        left = len(r.train_set) - r.start_step * r.global_batch if r.start_step else len(r.train_set)
        log(env, f"resuming on {env.world_size} process(es) x {args.batch_size} x {args.accum_steps} accumulation "
                 f"(the checkpoint: {len(ranks)} x {then['batch_size']} x {then['accum_steps']}), the same global "
                 f"batch {r.global_batch}: epoch {r.start_epoch + 1} continues with the {left} images not yet seen; "
                 f"schedule and step count go on, but not bit for bit as it would have")
    changed = {k: (v, getattr(args, k)) for k, v in then.items()
               if k in ("lr", "epochs", "warmup_epochs", "opt", "weight_decay", "mixup", "label_smoothing")
               and getattr(args, k) != v}
    if changed:
        log(env, "note: the command line changes " + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))


def start(r, lock):
    """Keep the run folder's lock, write args.json and the metrics so far, say what runs, and start
    listening for stop signals."""
    args, env = r.args, r.env
    r.lock = lock
    write_on_main(env, utils.write_json, os.path.join(r.output_dir, "args.json"), vars(args))
    write_on_main(env, utils.write_jsonl, os.path.join(r.output_dir, "metrics.jsonl"), r.history)
    log(env, f"EfficientNet-{args.arch}: {sum(p.numel() for p in r.model.parameters()):,} parameters, "
             f"{args.image_size}px (eval {args.val_resize} -> {args.image_size}), {r.num_classes} classes, "
             f"{env.world_size} process(es) on {env.device.type}, amp {r.amp_dtype or 'off'}, "
             f"{'channels_last' if r.channels_last else 'NCHW'}{', lean activations' if r.lean and not args.compile else ''}"
             f"{', deterministic' if args.deterministic else ''}")
    log(env, f"global batch {r.global_batch} = {args.batch_size} x {env.world_size} process(es) x "
             f"{args.accum_steps} accumulation; lr {args.lr:g} per 4096 -> {r.base_lr:.6g}; "
             f"{r.steps_per_epoch} steps/epoch, {args.epochs} epochs, warmup {r.warmup_steps} steps; "
             f"{args.workers} loader worker(s) per process, decode on {args.decode}; output {r.output_dir}")
    r.interactive = sys.stderr.isatty()
    r.stop = utils.StopSignal(env, max_interval=args.log_every)  # checked without waiting, at most a log interval apart
    r.tensorboard = utils.TensorBoard(os.path.join(r.output_dir, "tensorboard")) if args.tensorboard and env.main else None


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
    start_time = interval_start = time.time()
    interval_loss, interval_steps = r.loss_sum.clone(), 0
    data_seconds = interval_data_seconds = 0.0  # wall time spent waiting for the next batch
    for epoch_step in range(first_step, r.steps_per_epoch):
        lr = lr_at(r.step, r.base_lr, r.warmup_steps, r.total_steps, args.min_lr)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=env.device)
        for micro in range(args.accum_steps):
            wait_start = time.perf_counter()
            images, labels = next(batches)
            waited = time.perf_counter() - wait_start
            data_seconds += waited
            interval_data_seconds += waited
            targets = labels
            if args.mixup > 0:
                images, targets = data.mixup(images, labels, r.num_classes, random.betavariate(args.mixup, args.mixup))
            # Gradients are all-reduced on the last micro-batch only.
            sync = contextlib.nullcontext() if not r.ddp or micro == args.accum_steps - 1 else r.train_model.no_sync()
            with sync:
                with torch.autocast(env.device.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
                    logits = r.train_model(images)
                loss = criterion(logits, targets, args.label_smoothing) / args.accum_steps
                r.scaler.scale(loss).backward()
            step_loss += loss.detach()
        r.loss_sum += step_loss
        optimizer_step(r, step_loss)
        r.step += 1
        interval_steps += 1
        bar.update(1)

        last = epoch_step + 1 == r.steps_per_epoch
        if r.step % args.log_every == 0 or last:
            check_finite(r)  # the one sync of the interval (reads the device counters)
            now = time.time()
            interval_mean = (r.loss_sum - interval_loss).item() / interval_steps
            rate = interval_steps * r.global_batch / max(now - interval_start, 1e-9)
            data_share = 100 * interval_data_seconds / max(now - interval_start, 1e-9)
            bar.set_postfix(loss=f"{interval_mean:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", data=f"{data_share:.0f}%")
            if not r.interactive:  # log files get one plain line per interval instead of a bar
                eta = (r.steps_per_epoch - epoch_step - 1) * r.global_batch / rate
                log(env, f"epoch {epoch + 1}/{args.epochs} step {epoch_step + 1}/{r.steps_per_epoch} "
                         f"loss {interval_mean:.4f} lr {lr:.4g} {rate:.1f} img/s data {data_share:.0f}% "
                         f"epoch eta {eta / 60:.1f} min")
            if r.tensorboard:
                r.tensorboard.add("train", {"loss": interval_mean, "lr": lr, "images_per_sec": rate,
                                            "data_percent": data_share}, r.step)
            interval_start, interval_loss, interval_steps = now, r.loss_sum.clone(), 0
            interval_data_seconds = 0.0
        if r.stop.requested():
            save(r, epoch, epoch_step + 1)
            bar.close()
            raise Preempted(f"stopped by {r.stop.name} at step {r.step} (epoch {epoch + 1}); wrote {r.ckpt_path}. "
                            f"Requeue with --resume auto (exit code {EXIT_PREEMPTED}).")
        if args.save_every_steps and r.step % args.save_every_steps == 0 and not last:
            save(r, epoch, epoch_step + 1)
    bar.close()
    train_seconds = time.time() - start_time

    row = {"epoch": epoch + 1, "lr": lr_at(r.step - 1, r.base_lr, r.warmup_steps, r.total_steps, args.min_lr),
           "train_loss": utils.all_reduce(r.loss_sum.clone(), env).item() / (r.steps_per_epoch * env.world_size),
           "images_per_sec": (r.steps_per_epoch - first_step) * r.global_batch / train_seconds,
           "epoch_seconds": train_seconds,
           # the slowest rank's wait holds every rank up (gradients meet in the all_reduce)
           "data_seconds": utils.all_reduce(torch.tensor(data_seconds, dtype=torch.float64, device=env.device),
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


def evaluate_and_save(r, epoch, row):
    """Evaluate (every --eval-every epochs), add the row to metrics.jsonl, write last.pt (and
    best.pt), and stop here if a stop signal came during the epoch."""
    args, env = r.args, r.env
    evaluated = args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs)
    if evaluated:
        utils.broadcast_buffers(r.model, env)  # all ranks evaluate (and rank 0 saves) the same model
        row.update({f"val_{k}": v for k, v in evaluate(r.eval_model, r.val_loader, env, r.amp_dtype,
                                                          len(r.val_set)).items() if k != "images"})
        if r.ema is not None:
            utils.broadcast_buffers(r.ema.module, env)
            row.update({f"val_ema_{k}": v for k, v in evaluate(r.ema.module, r.val_loader, env, r.amp_dtype,
                                                                len(r.val_set)).items() if k != "images"})
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
    write_on_main(env, utils.write_jsonl, os.path.join(r.output_dir, "metrics.jsonl"), r.history)
    if is_best:
        write_on_main(env, utils.copy_atomic, r.ckpt_path, os.path.join(r.output_dir, "best.pt"))
    if r.tensorboard:
        r.tensorboard.add("epoch", {k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
    log(env, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if stopping:
        raise Preempted(f"stopped by {r.stop.name} after epoch {epoch + 1}; wrote {r.ckpt_path}. "
                        f"Requeue with --resume auto (exit code {EXIT_PREEMPTED}).")


def check_finite(r):
    """Collective, syncs: stop when a non-finite loss (fp16: too many skipped steps) was seen."""
    trip = r.watch.tripped_at(r.env)
    if trip is not None:
        kept = f"{r.ckpt_path} kept as it was" if os.path.exists(r.ckpt_path) else "no checkpoint written"
        what = "the loss was not finite" if r.watch.limit == 1 else f"{r.watch.limit} consecutive steps overflowed"
        raise NonFiniteLoss(f"{what} at step {trip} (epoch {(trip - 1) // r.steps_per_epoch + 1}); stopped "
                            f"without saving ({kept}). Try a lower --lr, --grad-clip or --amp bf16.")


def save(r, epoch, epoch_step):
    """Collective (gathers every rank's RNG state and sums); rank 0 writes last.pt atomically."""
    check_finite(r)
    state = {"args": vars(r.args), "epoch": epoch, "epoch_step": epoch_step, "step": r.step,
             "model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(), "scaler": r.scaler.state_dict(),
             "ema": r.ema.state_dict() if r.ema else None, "best_top1": r.best_top1, "history": r.history,
             "ranks": utils.gather_objects({"rng": utils.rng_state(r.env.device), "loss_sum": r.loss_sum.item(),
                                            "skipped": r.watch.skipped.item()}, r.env)}
    try:
        write_on_main(r.env, utils.save_atomic, state, r.ckpt_path)
    except utils.DiskFull as e:
        kept = f"{r.ckpt_path} is kept as it was" if os.path.exists(r.ckpt_path) else "no checkpoint written yet"
        raise utils.DiskFull(f"{e} ({kept})") from None


if __name__ == "__main__":
    sys.exit(main())
