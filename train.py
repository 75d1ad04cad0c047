"""Train or evaluate EfficientNet-B0..B7 on ImageNet with one hand-written DDP loop.

    torchrun --nproc_per_node=8 train.py --arch b0 --data /imagenet        # NVIDIA's B0 recipe
    python train.py --data demo --image-size 64 --epochs 8 ...             # CPU demo, no ImageNet
    python train.py --evaluate --resume runs/x/best.pt                     # with the run's own settings
    python train.py --evaluate --weights efficientnet_b0.pth --data /imagenet
    python train.py --data my_classes --weights efficientnet_b0.pth --epochs 30 ...   # fine-tune
    python train.py --predict photos/ --resume runs/x/best.pt --output predictions.csv
    python train.py --average runs/x --output runs/x/average.pt              # its --keep-best checkpoints
    python train.py --export model.pt2 --resume runs/x/best.pt               # or model.onnx

A run's checkpoint remembers its settings: --resume and --evaluate --resume use them, and a flag
given on the command line overrides one (said in a note); arch and class count cannot change.

Exit codes: 0 finished (or --run-epochs done), 2 usage error (one line, no traceback; also a CUDA
out-of-memory), 3 non-finite loss (nothing saved after it), 4 another process hung or died
(--dist-timeout; rerun with --resume auto), 5 disk full (the previous last.pt kept), 75 preempted by
SIGTERM/SIGUSR1 and 130 stopped by Ctrl-C (last.pt written: continue with --resume auto). Under
torchrun a worker's non-zero code reaches the shell as 1.
"""
import argparse
import contextlib
import copy
import csv
import datetime
import importlib.util
import io
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data
import launch
import recipes
import utils
from efficientnet import SCALING, arch_config, canonical_arch, convert_state_dict, create_model, load_pretrained, member
from utils import UsageError

EXIT_USAGE, EXIT_NONFINITE, EXIT_PEER_LOST, EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_INTERRUPTED = 2, 3, 4, 5, 75, 130

# What a run's checkpoint remembers: every setting that shapes its model, data, schedule and
# evaluation. --resume and --evaluate --resume take these from the checkpoint unless the command
# line gives them; the rest (speed, logging, where files go) are this invocation's own.
RUN_SETTINGS = ("arch", "num_classes", "image_size", "val_resize", "val_interpolation", "mean", "std", "dropout",
                "drop_path", "bn_eps", "bn_momentum", "data", "min_crop_scale", "autoaugment", "mixup", "seed",
                "opt", "lr", "min_lr", "warmup_epochs", "epochs", "weight_decay", "no_bn_weight_decay",
                "batch_size", "accum_steps", "label_smoothing", "grad_clip", "ema_decay", "steps_per_epoch",
                "weights") + recipes.RUN_SETTINGS
FIXED_SETTINGS = ("arch", "num_classes")  # another model: a new run (fine-tune with --weights CHECKPOINT)
# Images per process and step that fit an 80 GB GPU in bf16 (NVIDIA trains B4 at 128 per A100-80GB).
DEFAULT_BATCH = {"b0": 256, "b1": 256, "b2": 256, "b3": 256, "b4": 128, "b5": 64, "b6": 32, "b7": 32}


class Preempted(Exception):
    """A stop signal ended the run after last.pt was written; `code` is the exit code."""

    def __init__(self, message, signal_name):
        super().__init__(message)
        self.code = EXIT_INTERRUPTED if signal_name == "SIGINT" else EXIT_PREEMPTED


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
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser():
    p = Parser(description="Train or evaluate EfficientNet on ImageNet (torchrun for several GPUs).",
               formatter_class=HelpFormatter)
    add_model_flags(p.add_argument_group("model"))
    add_data_flags(p.add_argument_group("data"))
    add_optimisation_flags(p.add_argument_group("optimisation"))
    add_speed_flags(p.add_argument_group("speed"))
    add_run_flags(p.add_argument_group("run"))
    add_after_training_flags(p.add_argument_group(
        "after training (with --resume CHECKPOINT, whose run's settings apply, or --weights FILE)"))
    return p


def add_model_flags(g):
    g.add_argument("--arch", default="b0", help="b0..b7; tf_efficientnet_b0..b7 for Google's TF weights (timm's tf_ files): "
                                                "TF 'SAME' padding and BatchNorm")
    g.add_argument("--num-classes", type=int, default=None, help="classifier outputs (default: the data's class count)")
    g.add_argument("--image-size", type=int, default=None, help="eval size, and train size unless --train-size (default: the member's resolution)")
    g.add_argument("--train-size", type=int, default=None, help="train crop size (default: --image-size)")
    g.add_argument("--progressive-resize", type=int, default=0, metavar="START",
                   help="train from START px, growing linearly to --train-size at --progressive-epochs, sizes on the "
                        "way rounded to multiples of 32 (0: off)")
    g.add_argument("--progressive-epochs", type=float, default=None,
                   help="where --progressive-resize reaches --train-size (default: 3/4 of --epochs, EfficientNetV2's "
                        "last stage)")
    g.add_argument("--val-resize", type=int, default=None, help="eval: resize the short side to this, then center-crop (default: image size + 32)")
    g.add_argument("--dropout", type=float, default=None, help="before the classifier (default: the member's rate)")
    g.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth rate of the last block")
    g.add_argument("--bn-eps", type=float, default=None, help="BatchNorm eps (default: 1e-5, tf_ archs 1e-3; torchvision's b5-b7 weights: 1e-3)")
    g.add_argument("--bn-momentum", type=float, default=None, help="BatchNorm momentum (default: 0.1, tf_ archs 0.01; torchvision's b5-b7 weights: 0.01)")
    g.add_argument("--weights", default=None, help="start from (or --evaluate) a state dict: this repo's, torchvision's or timm's; "
                                                   "a classifier of another class count is re-initialised (fine-tuning)")


def add_data_flags(g):
    g.add_argument("--data", default=None, help="ImageNet root (train/ and val/ class folders), 'demo' or 'synthetic' "
                                                "(default with --resume: the run's own)")
    g.add_argument("--workers", type=int, default=None,
                   help=f"loader processes per GPU/process (default: this machine's cores per local process, "
                        f"less one for the process itself: {data.default_workers()} here)")
    g.add_argument("--decode", choices=["cpu", "gpu"], default="cpu",
                   help="training images: cpu = loader workers decode (libjpeg-turbo for JPEGs, PIL for the rest), "
                        "crop and resize; gpu = workers only read the files and draw the crops, the GPU decodes each "
                        "batch in one nvJPEG call and crops, resizes and flips it (CUDA only; evaluation stays on the CPU)")
    g.add_argument("--augment", choices=data.AUGMENTS, default="none",
                   help="torchvision's AutoAugment (ImageNet policy), RandAugment (2 ops), TrivialAugmentWide or "
                        "AugMix, after crop and flip, in the loader workers")
    g.add_argument("--autoaugment", action="store_true", help="the same as --augment autoaugment")
    g.add_argument("--randaugment-magnitude", type=float, default=9.0, metavar="M",
                   help="on timm's 0-10 scale (M/10 of each op's largest change), as torchvision's bin round(3 M) of 31")
    g.add_argument("--magnitude-std", type=float, default=0.0, metavar="S",
                   help="RandAugment: each op's magnitude drawn ~ N(M, S), clipped to 0-10 (timm's mstd)")
    g.add_argument("--random-erase", type=float, default=0.0, metavar="P",
                   help="probability of erasing a box of each image with per-pixel noise (timm's 'pixel' mode), "
                        "on the device after normalisation")
    g.add_argument("--min-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area fraction")
    g.add_argument("--val-interpolation", choices=["bicubic", "bilinear"], default="bicubic", help="eval resize filter (torchvision's b1 V2 weights: bilinear)")
    g.add_argument("--mean", type=float, nargs=3, default=list(data.IMAGENET_MEAN), metavar=("R", "G", "B"),
                   help="normalisation mean of the 0-1 pixels: ImageNet's (AdvProp tf_*_ap weights: 0.5 0.5 0.5)")
    g.add_argument("--std", type=float, nargs=3, default=list(data.IMAGENET_STD), metavar=("R", "G", "B"),
                   help="normalisation std: ImageNet's (AdvProp tf_*_ap weights: 0.5 0.5 0.5)")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off); with --mixup, each batch takes one of "
                                                              "the two at even odds")
    g.add_argument("--repeated-aug", type=int, default=1, metavar="N",
                   help="each image N times per epoch, differently augmented, on N different processes when there are "
                        "at least N (else side by side); the epoch keeps its length (DeiT's repeated augmentation; 1: off)")


def add_optimisation_flags(g):
    g.add_argument("--recipe", choices=list(recipes.RECIPES), default="seed",
                   help="the defaults of a published recipe (the README's table); flags given win")
    g.add_argument("--opt", choices=["rmsprop", "rmsproptf", "sgd", "adamw"], default="rmsprop",
                   help="torch's RMSprop (alpha .9, eps .01, momentum .9), TensorFlow's RMSprop (decay .9, momentum .9, "
                        "eps 1e-3 inside the root), SGD (Nesterov, momentum .9) or AdamW (decoupled weight decay)")
    g.add_argument("--lr", type=float, default=None, help="learning rate per 4096 images, scaled to the real global batch (default: 0.08 for b0-b3, 0.16 for b4-b7)")
    g.add_argument("--sched", choices=["cosine", "step"], default="cosine",
                   help="after the warmup: cosine to --min-lr, or step: lr x --decay-rate every --decay-epochs, "
                        "counted from step 0 (TF's staircase)")
    g.add_argument("--decay-epochs", type=float, default=2.4, help="--sched step: epochs between decays")
    g.add_argument("--decay-rate", type=float, default=0.97, help="--sched step: factor of each decay")
    g.add_argument("--min-lr", type=float, default=0.0, help="where the cosine ends (the step schedule's floor)")
    g.add_argument("--warmup-epochs", type=float, default=16, help="linear warmup length")
    g.add_argument("--warmup-lr", type=float, default=0.0, help="where the warmup starts, per 4096 images like --lr")
    g.add_argument("--epochs", type=int, default=400, help="length of the schedule")
    g.add_argument("--weight-decay", type=float, default=None, help="on all parameters, BatchNorm included (default: 1e-5 for b0-b3, 5e-6 for b4-b7)")
    g.add_argument("--no-bn-weight-decay", action="store_true", help="no weight decay on BatchNorm parameters and biases (NVIDIA)")
    g.add_argument("--batch-size", type=int, default=None,
                   help="images per process and step (default: 256 for b0-b3, 128 for b4, 64 for b5, 32 for b6-b7: "
                        "each fits an 80 GB GPU)")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights, e.g. 0.9999 (0: off)")


def add_speed_flags(g):
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


def add_run_flags(g):
    g.add_argument("--output-dir", default=None, help="where checkpoints and logs go (default: runs/<arch>-<date-time>)")
    g.add_argument("--resume", default=None, help="checkpoint to continue with its run's settings (flags given override them, with a note), or 'auto': "
                        "the newest good one in --output-dir, or a new run there when it holds none")
    g.add_argument("--evaluate", action="store_true", help="only evaluate --resume or --weights on the val set "
                   "(a checkpoint is evaluated with its run's settings unless flags say otherwise)")
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
    g.add_argument("--keep-best", type=int, default=0, metavar="N",
                   help="also keep the N best epoch-end checkpoints by val top-1, as best-epochE.pt (0: best.pt only)")


def add_after_training_flags(g):
    g.add_argument("--predict", nargs="+", default=None, metavar="PATH",
                   help="classify image files, folders (searched recursively) and file lists (.txt, one path a line, "
                        "relative to the list's folder) with the run's eval preprocessing; CSV on stdout or --output")
    g.add_argument("--top-k", type=int, default=5, help="--predict: the classes given per image")
    g.add_argument("--output", default=None, metavar="FILE",
                   help="--predict: FILE.csv or FILE.jsonl (default: CSV on stdout); --average: the checkpoint to write")
    g.add_argument("--average", nargs="+", default=None, metavar="CKPT",
                   help="average the weights (and EMAs) of these checkpoints, or of a run folder's --keep-best ones, "
                        "into --output")
    g.add_argument("--export", default=None, metavar="FILE",
                   help="write the model as FILE.pt2 (torch.export) or FILE.onnx (needs onnx, onnxscript, onnxruntime), "
                        "checked against eager, with its preprocessing and class names in FILE.json")
    g.add_argument("--class-map", default=None, metavar="FILE|imagenet-index",
                   help="--evaluate: label the val class folders by a file of folder names in label order, or by "
                        "their names as numbers (imagenet-index: ImageNet-V2's folders 0..999), not by sorted name")
    g.add_argument("--real-labels", default=None, metavar="REAL_JSON",
                   help="--evaluate: ReaL's real.json for the ImageNet val set; adds real_top1")
    g.add_argument("--eval-flip", action="store_true",
                   help="--evaluate, --predict: average the softmax of each image and of its mirror image")


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def given_flags(argv=None):
    """The settings named on the command line (whatever their value), as argparse dests."""
    p = build_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))


def flag(name):
    return "--" + name.replace("_", "-")


def read_checkpoint(args, env):
    """The checkpoint that --resume names (or, for 'auto', the newest good one in --output-dir),
    or None. Checks here: what is needed to find and read it."""
    if not args.resume:
        return None
    if args.resume != "auto":
        checkpoint = utils.load_checkpoint(args.resume)
        if "model" not in checkpoint or "epoch" not in checkpoint:
            raise UsageError(f"{args.resume} is not a train.py checkpoint (bare weights go to --weights)")
        return checkpoint
    if not args.output_dir:
        raise UsageError("--resume auto needs --output-dir (the run folder to continue)")
    path, checkpoint, skipped = utils.newest_good_checkpoint(args.output_dir)
    for problem in skipped:
        log(env, f"warning: skipping {problem}")
    if path:
        log(env, f"resuming from {path}")
        checkpoint["loaded_from"] = path  # for messages; never saved (save() builds its own state)
    return checkpoint


def resolve_args(args, env=None, given=(), checkpoint=None):
    """Every setting, resolved (the run's own from `checkpoint` where the command line does not give
    them, else the arch-dependent defaults), and every check that needs neither the data set nor
    the checkpoint's tensors, before any work is done and before any folder is made."""
    env = env or launch.Dist()
    given = recipes.before_checkpoint(args, given, checkpoint)
    check_flag_combinations(args, checkpoint)
    if checkpoint is not None:
        take_run_settings(args, env, given, checkpoint)
    fill_defaults(args, env)
    check_values(args, list(vars(args)))
    recipes.resolve(args, given, checkpoint)
    if args.val_resize < args.image_size:
        raise UsageError(f"--val-resize {args.val_resize} is smaller than --image-size {args.image_size}")
    if args.data is None and not (args.predict or args.export):
        raise UsageError("--data is needed: the ImageNet root (train/ and val/), 'demo' or 'synthetic'")
    check_device(args, env)
    if not inference_only(args):
        check_output_dir(args)
    if not inference_only(args) and args.warmup_epochs >= args.epochs:
        log(env, f"warning: the warmup ({args.warmup_epochs:g} epochs) is not shorter than the run ({args.epochs} "
                 f"epochs): the learning rate never reaches --lr; pass a smaller --warmup-epochs")
    return args


def check_flag_combinations(args, checkpoint):
    check_after_training_flags(args, checkpoint)
    if args.evaluate and not (args.resume or args.weights):
        raise UsageError("--evaluate needs --resume CHECKPOINT or --weights FILE")
    if args.resume and args.weights and (args.resume != "auto" or args.evaluate):
        raise UsageError("give --resume CHECKPOINT (continue a run) or --weights (start from weights), not both; "
                         "--resume auto --weights starts from the weights only when the folder holds no run")
    if args.evaluate and args.resume == "auto" and checkpoint is None:
        raise UsageError(f"--resume auto found no checkpoint in {args.output_dir} to evaluate")
    if args.weights and not os.path.isfile(args.weights) and checkpoint is None:
        raise UsageError(f"--weights file {args.weights} does not exist")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # optional: fails without the tensorboard package
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or leave the flag out)") from None
    if args.decode == "gpu" and not args.evaluate and args.data in data.BUILT_IN_DATA:
        raise UsageError(f"--decode gpu decodes image files, and --data {args.data} has none; use --decode cpu")
    if args.decode == "gpu" and not args.evaluate and args.autoaugment:
        # AutoAugment works on one uint8 image at a time; on the GPU that is a chain of small
        # kernels per image, launched by the training process itself and so taken from the step.
        raise UsageError("--autoaugment runs in the loader workers on decoded pixels, which --decode gpu does "
                         "not make; use --decode cpu with --autoaugment")


POSITIVE = ("image_size", "val_resize", "batch_size", "accum_steps", "epochs", "lr", "log_every", "num_classes",
            "top_k")
NON_NEGATIVE = ("workers", "warmup_epochs", "min_lr", "weight_decay", "mixup", "grad_clip", "eval_every",
                "save_every_steps", "run_epochs", "steps_per_epoch", "bn_eps", "max_nonfinite", "keep_best")
FRACTIONS = ("dropout", "drop_path", "label_smoothing", "ema_decay", "bn_momentum")


def check_values(args, names):
    """Each named setting that is set must be finite and in its range."""
    for name in names:
        value = getattr(args, name)
        if value is None or isinstance(value, (str, bool)) or isinstance(value, list) and isinstance(value[0], str):
            continue
        values = value if isinstance(value, list) else [value]
        shown = " ".join(map(str, values))
        if not all(math.isfinite(v) for v in values):
            raise UsageError(f"{flag(name)} must be a finite number, got {shown}")
        if name in POSITIVE and not value > 0:
            raise UsageError(f"{flag(name)} must be positive, got {shown}")
        if name in NON_NEGATIVE and value < 0:
            raise UsageError(f"{flag(name)} must not be negative, got {shown}")
        if name in FRACTIONS and not 0 <= value < 1:
            raise UsageError(f"{flag(name)} must be in [0, 1), got {shown}")
        if name == "std" and not all(v > 0 for v in values):
            raise UsageError(f"--std must be positive, got {shown}")
        if name == "min_crop_scale" and not 0 < value <= 1:
            raise UsageError(f"--min-crop-scale must be in (0, 1], got {shown}")


def take_run_settings(args, env, given, checkpoint):
    """The checkpoint's settings where the command line gives none; the ones it gives are kept and
    listed in one note. Checks here: those that need the checkpoint's settings."""
    stored = checkpoint["args"]
    try:
        args.arch = canonical_arch(args.arch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for name in FIXED_SETTINGS:
        if name in given and getattr(args, name) != stored[name]:
            if name == "arch":
                raise UsageError(f"checkpoint is for {stored['arch']}, not {args.arch}: leave --arch out "
                                 f"(or pass --arch {stored['arch']})")
            raise UsageError(f"the checkpoint's model has {stored['num_classes']} classes, not --num-classes "
                             f"{args.num_classes}: fine-tune from it with --weights CHECKPOINT (a new run)")
    if "weights" in given:  # the requeue of a fine-tune repeats its command
        log(env, f"note: --weights {args.weights} is not loaded: the run continues from its checkpoint "
                 f"(it started from {stored['weights'] or 'random weights'})")
        given = given - {"weights"}
    changed = []
    for name in RUN_SETTINGS:
        if name not in stored:
            continue  # a setting newer than the run: its default is what the run did (recipes.resolve)
        if name in given:
            if getattr(args, name) != stored[name]:
                changed.append(f"{flag(name)} {stored[name]} -> {getattr(args, name)}")
        elif name == "val_resize" and "image_size" in given:  # follows the new size, as its default does
            args.val_resize = args.image_size + 32
            changed.append(f"--val-resize {stored['val_resize']} -> {args.val_resize}")
        else:
            setattr(args, name, stored[name])
    if changed:
        log(env, f"note: the command line changes the run's {', '.join(changed)}; its other settings are "
                 f"the checkpoint's")
    if inference_only(args):
        return
    if args.ema_decay > 0 and checkpoint["ema"] is None:
        raise UsageError("--ema-decay is on but the checkpoint has no EMA; resume without it")
    ranks, per_step = len(checkpoint["ranks"]), args.batch_size * env.world_size
    then, now = global_batch(stored["batch_size"], ranks, stored["accum_steps"]), per_step * args.accum_steps
    if then != now:
        keep = (f"pass --accum-steps {then // per_step}" if then % per_step == 0 else
                f"choose --batch-size and --accum-steps with batch x {env.world_size} x accumulation = {then}")
        raise UsageError(f"the checkpoint's global batch is {then} ({stored['batch_size']} x {ranks} process(es) x "
                         f"{stored['accum_steps']} accumulation), this run's {now} ({args.batch_size} x "
                         f"{env.world_size} x {args.accum_steps}); the schedule and the sample order need the same: "
                         f"{keep} (or start anew from it with --weights)")


def fill_defaults(args, env):
    """The arch- and device-dependent defaults, resolved, so that args.json and the checkpoint
    hold the values the run used."""
    try:
        args.arch = canonical_arch(args.arch)
    except ValueError as e:
        raise UsageError(str(e)) from None
    name = member(args.arch)
    scaling, large = SCALING[name], name in ("b4", "b5", "b6", "b7")
    defaults = arch_config(args.arch)  # tf_ archs: TF's BatchNorm
    cuda = env.device.type == "cuda"
    resolved = {
        "bn_eps": defaults["bn_eps"], "bn_momentum": defaults["bn_momentum"], "image_size": scaling.resolution,
        "dropout": scaling.dropout, "workers": data.default_workers(), "lr": 0.16 if large else 0.08,
        "weight_decay": 5e-6 if large else 1e-5, "batch_size": DEFAULT_BATCH[name], "channels_last": cuda,
        "lean_activations": not cuda}
    for key, value in resolved.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.val_resize is None:
        args.val_resize = args.image_size + 32  # NVIDIA: 224 -> 256, 380 -> 412
    if args.output_dir is None or args.output_dir == "":
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        from_resume = args.resume and args.resume != "auto"
        args.output_dir = (os.path.dirname(os.path.abspath(args.resume)) if from_resume else
                           utils.broadcast_object(os.path.join("runs", f"{args.arch}-{stamp}"), env))


def check_device(args, env):
    """What this device cannot do; --amp auto becomes the dtype it picks."""
    cuda = env.device.type == "cuda"
    if args.decode == "gpu" and not cuda and not args.evaluate:
        raise UsageError("--decode gpu needs a CUDA GPU and none is visible; use --decode cpu")
    if args.sync_bn and not cuda:
        raise UsageError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); leave it off on the CPU")
    amp = resolve_amp(args.amp, env.device)
    args.amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    if amp == torch.bfloat16 and cuda and not native_bf16(env.device):
        log(env, "note: this GPU emulates bfloat16 (compute capability below 8.0), slowly; --amp fp16 is faster here")


def check_output_dir(args):
    """The run folder must be a folder (or creatable as one) that this process may write, and
    never clobbers a run: a folder that holds one is continued (--resume) or refused."""
    path = args.output_dir
    if not args.resume and os.path.exists(os.path.join(path, "last.pt")):
        raise UsageError(f"{path} already holds a run (last.pt): continue it with --resume auto, "
                         f"or choose another --output-dir")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"--output-dir {path}: {existing} is a file, not a folder; choose another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--output-dir {path}: no permission to write in {existing}; choose another --output-dir")


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


def lr_at(step, base_lr, warmup_steps, total_steps, min_lr=0.0, warmup_lr=0.0, decay_steps=0, decay_rate=1.0):
    """Learning rate of optimizer step `step` (0-based): linear warmup from warmup_lr reaching base_lr
    at the last warmup step, then a cosine from base_lr to min_lr at total_steps; or, with
    decay_steps, a staircase base_lr * decay_rate ** floor(step / decay_steps) counted from step 0
    (as TF's exponential_decay and timm's step schedule count it), never below min_lr."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * (step + 1) / warmup_steps
    if decay_steps:
        return max(min_lr, base_lr * decay_rate ** (step // decay_steps))
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_schedule(r):
    """lr_at's arguments for this run (--lr and --warmup-lr scaled to the global batch; the step
    schedule's --decay-epochs rounded to whole steps)."""
    args = r.args
    decay_steps = max(1, round(args.decay_epochs * r.steps_per_epoch)) if args.sched == "step" else 0
    return {"base_lr": r.base_lr, "warmup_steps": r.warmup_steps, "total_steps": r.total_steps,
            "min_lr": args.min_lr, "warmup_lr": args.warmup_lr * r.global_batch / 4096, "decay_steps": decay_steps,
            "decay_rate": args.decay_rate}


def criterion(logits, targets, label_smoothing):
    """Cross-entropy in float32 with label smoothing; `targets` are class indices or, with mixup,
    probabilities (smoothing then mixes those with the uniform distribution)."""
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def global_batch(batch_size, processes, accum_steps):
    """Images per optimizer step: the schedule and the sample order are laid out in these."""
    return batch_size * processes * accum_steps


def class_scores(model, images, amp_dtype, flip=False):
    """float32 (N, classes) scores whose order is the prediction's: the logits; with `flip` (test-time
    augmentation) the log of the mean of the softmax of the images and of their mirror images.
    Either is what cross_entropy and softmax take (softmax gives the mean probabilities then)."""
    with torch.autocast(images.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = model(images)
        mirrored = model(images.flip(3)) if flip else None
    if not flip:
        return logits.float()
    # log((p + q) / 2) from the log-probabilities: no log(0) where a probability underflows
    return torch.logaddexp(logits.float().log_softmax(1), mirrored.float().log_softmax(1)) - math.log(2)


@torch.no_grad()
def evaluate(model, loader, env, amp_dtype, expected_images, flip=False, real_labels=None):
    """Top-1 / top-5 (percent) and mean cross-entropy over the whole val set. Each rank sums over
    its shard (no padding duplicates); the sums meet in one all_reduce and the image count must
    equal the val set's size. `flip`: horizontal-flip test-time augmentation (class_scores).
    `real_labels` (val images, L), -1-padded (data.read_real_labels): adds real_top1, the share of
    the images with any ReaL label whose top-1 is one of them (ReaL excludes the others)."""
    model.eval()
    # loss, top-1 hits, top-5 hits, images, ReaL top-1 hits, images with ReaL labels
    totals = torch.zeros(6, dtype=torch.float64, device=env.device)
    # The loader yields this rank's shard in order: its batches' sample indices, for the ReaL labels.
    shard = list(data.ShardSampler(expected_images, env.rank, env.world_size)) if real_labels is not None else None
    seen = 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not (env.main and sys.stderr.isatty())):
        logits = class_scores(model, images, amp_dtype, flip)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        totals[0] += F.cross_entropy(logits, labels, reduction="sum")
        totals[1] += hits[:, 0].sum()
        totals[2] += hits.any(dim=1).sum()
        totals[3] += labels.numel()
        if real_labels is not None:
            real = real_labels[shard[seen:seen + labels.numel()]].to(top.device)
            totals[4] += (real == top[:, :1]).any(dim=1).sum()
            totals[5] += (real >= 0).any(dim=1).sum()
        seen += labels.numel()
    loss, top1, top5, images, real_hits, real_images = utils.all_reduce(totals, env).tolist()
    if int(images) != expected_images:
        raise RuntimeError(f"evaluation counted {int(images)} images but the val set has {expected_images}")
    figures = {"top1": 100.0 * top1 / images, "top5": 100.0 * top5 / images, "loss": loss / images,
               "images": int(images)}
    if real_labels is not None:
        figures.update(real_top1=100.0 * real_hits / real_images, real_images=int(real_images))
    return figures


def build_optimizer(model, args, lr, fused=False):
    """`fused` (CUDA): SGD's and AdamW's one-kernel step, which also lets the fp16 GradScaler skip a
    step without a device synchronisation. RMSprop has no fused form in torch."""
    decay, no_decay = [], []
    for p in model.parameters():
        # NVIDIA's variant leaves BatchNorm weights/biases and all biases (the 1-d tensors) alone.
        (no_decay if args.no_bn_weight_decay and p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if args.opt == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=0.9, eps=0.01, momentum=0.9)
    if args.opt == "rmsproptf":
        return utils.RMSpropTF(groups, lr=lr, alpha=0.9, eps=1e-3, momentum=0.9)
    if args.opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused or None)


def log(env, message):
    """Progress and notes: rank 0, stdout."""
    if env is None or env.main:
        tqdm.write(message, file=sys.stdout)
        sys.stdout.flush()


def say_error(env, message):
    """What ended the run, when every rank knows it: rank 0, stderr."""
    if env.main:
        print(message, file=sys.stderr, flush=True)


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


# ---------------------------------------------------------------------------------------------
# main

def main(argv=None):
    args, given = parse_args(argv), given_flags(argv)
    with global_state_kept():
        try:
            env = launch.init_distributed(datetime.timedelta(seconds=args.dist_timeout))
        except UsageError as e:  # srun's variables do not tell how to form the group
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
            if args.average:
                return average_command(args, env)
            with notes_beside_predictions(args):
                checkpoint = read_checkpoint(args, env)
                resolve_args(args, env, given, checkpoint)
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


@contextlib.contextmanager
def global_state_kept():
    """main() changes process-wide state (signal handlers, TF32 and cuDNN flags, deterministic
    mode); whoever called it in-process (tests, a notebook, the GPU check) gets it back as it was."""
    handlers = {s: signal.getsignal(s) for s in utils.StopSignal.SIGNALS}
    backends = torch.backends.cudnn, torch.backends.cuda.matmul
    flags = [(m, name, getattr(m, name)) for m, name in ((backends[0], "benchmark"), (backends[0], "deterministic"),
                                                         (backends[0], "allow_tf32"), (backends[1], "allow_tf32"))]
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        for module, name, value in flags:
            setattr(module, name, value)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


def exit_code(error, env, args):
    """Say in one line on stderr what ended the run and return its exit code; errors that are not
    the input's, the machine's or a peer's propagate with their traceback."""
    if isinstance(error, (UsageError, data.DataError)):
        # A bad file met in a loader worker arrives wrapped in the worker's traceback: keep its last
        # line, without the "data.DataError: " that the traceback puts in front.
        message = str(error).strip().splitlines()[-1].removeprefix(f"{type(error).__module__}.{type(error).__name__}: ")
        print(f"error: {message}", file=sys.stderr)  # every rank: the one that met it may not be rank 0
        return EXIT_USAGE
    if isinstance(error, torch.OutOfMemoryError):  # this rank's alone: it says so itself
        print(f"error: rank {env.rank}: the GPU ran out of memory ({launch.first_line(error)}); lower --batch-size "
              f"(keeping the global batch with --accum-steps) or add --grad-checkpointing", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(error, KeyboardInterrupt):  # before training started, or a second Ctrl-C
        hint = f" (continue with --resume auto --output-dir {args.output_dir})" if args.output_dir else ""
        print(f"error: interrupted: stopped at once, nothing saved since the last checkpoint{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteLoss):
        say_error(env, f"error: {error}")
        return EXIT_NONFINITE
    if isinstance(error, Preempted):
        say_error(env, str(error))
        return error.code
    if isinstance(error, utils.DiskFull):
        again = ", then run the same command again" if inference_only(args) or args.average else \
            " (or move the folder and pass it as --output-dir), then rerun with --resume auto"
        say_error(env, f"error: {error}. Free space there{again}")
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
    if args.predict:
        return predict_command(args, env, checkpoint)
    if args.export:
        return export_command(args, env, checkpoint)
    if checkpoint is not None and checkpoint["epoch"] >= args.epochs and not args.evaluate:
        log(env, f"the run in {args.output_dir} already finished its {args.epochs} epochs; nothing to do")
        return 0
    r = build(args, env, checkpoint)
    if args.evaluate:
        return evaluate_only(r, checkpoint)
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


def set_up_torch(args):
    torch.backends.cudnn.benchmark = not args.deterministic  # autotuning picks kernels by timing: run-dependent
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS (CUDA 10.2+)
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)  # warns naming any op that has no such kernel
    torch.backends.cuda.matmul.allow_tf32 = True  # TF32 as NVIDIA's recipe on A100
    torch.backends.cudnn.allow_tf32 = True


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
    lock_error = utils.broadcast_object(lock_error, env)
    if lock_error:
        raise UsageError(lock_error)
    return lock


# ---------------------------------------------------------------------------------------------
# The run's state, and the phases that build and move it

@dataclass
class Run:
    """What the phases of a run share: `build` fills it, `restore` rewinds it to a checkpoint,
    `start` opens the run, `train_one_epoch` and `evaluate_and_save` move it on."""
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
    build_model(r, checkpoint)
    if not args.evaluate:
        build_training(r)
    return r


def build_data(r, checkpoint):
    """Datasets and the val loader. Checks here: those that need the data set."""
    args, env = r.args, r.env
    r.train_set, r.val_set = data.build_datasets(
        args.data, args.image_size, args.val_resize, args.seed, args.min_crop_scale, args.autoaugment,
        with_train=not args.evaluate, decode="cpu" if args.evaluate else args.decode,
        val_interpolation=args.val_interpolation, train_size=args.train_size, augment=args.augment,
        magnitude=args.randaugment_magnitude, magnitude_std=args.magnitude_std,
        resize_from=args.progressive_resize, resize_epochs=args.progressive_epochs)
    if args.class_map:
        data.apply_class_map(r.val_set, args.class_map)
    skipped = data.skipped_note(r.train_set, r.val_set)
    if skipped:
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
        batch = global_batch(args.batch_size, env.world_size, args.accum_steps)
        if len(r.train_set) < batch:
            raise UsageError(f"a step needs {batch} images (--batch-size {args.batch_size} x {env.world_size} "
                             f"processes x --accum-steps {args.accum_steps}) but the train set has "
                             f"{len(r.train_set)}; lower --batch-size")
    r.val_loader = loader(r, r.val_set, data.ShardSampler(len(r.val_set), env.rank, env.world_size), train=False)


def loader(r, dataset, sampler, train):
    cuda = r.env.device.type == "cuda"
    batches = data.build_loader(dataset, sampler, r.args.batch_size, r.args.workers, train=train, pin_memory=cuda)
    return data.DeviceLoader(batches, r.env.device, r.args.channels_last, r.args.mean, r.args.std)


def build_model(r, checkpoint, weights=None):
    """The model, from the checkpoint, else from --weights (`weights`: that file, when read already)."""
    args, env = r.args, r.env
    utils.seed_everything(args.seed + env.rank)
    model = create_model(args.arch, args.num_classes, dropout=args.dropout, drop_path_rate=args.drop_path,
                         bn_eps=args.bn_eps, bn_momentum=args.bn_momentum, lean_activations=args.lean_activations)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        load_weights(model, args, env, weights or read_weights(args.weights))
    model.set_grad_checkpointing(args.grad_checkpointing)
    model.to(env.device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    r.model = model
    r.eval_model = torch.compile(model) if args.compile else model


def build_training(r):
    args, env = r.args, r.env
    cuda = env.device.type == "cuda"
    r.train_sampler = data.TrainSampler(len(r.train_set), env.rank, env.world_size, args.seed, args.repeated_aug)
    r.train_loader = loader(r, r.train_set, r.train_sampler, train=True)
    # Every step takes a global batch of distinct images (the sampler's padding is never reached), so
    # an epoch has as many steps on any number of processes that keeps the global batch.
    r.global_batch = global_batch(args.batch_size, env.world_size, args.accum_steps)
    r.steps_per_epoch = len(r.train_set) // r.global_batch
    if args.steps_per_epoch:
        r.steps_per_epoch = min(r.steps_per_epoch, args.steps_per_epoch)
    r.total_steps = r.steps_per_epoch * args.epochs
    r.warmup_steps = round(args.warmup_epochs * r.steps_per_epoch)
    r.base_lr = args.lr * r.global_batch / 4096

    if args.sync_bn and env.world_size > 1:
        r.model = nn.SyncBatchNorm.convert_sync_batchnorm(r.model)
        r.eval_model = torch.compile(r.model) if args.compile else r.model
    r.train_model = utils.data_parallel(r.model, env) if env.world_size > 1 else r.model
    if args.compile:
        r.train_model = torch.compile(r.train_model)
    r.optimizer = build_optimizer(r.model, args, r.base_lr, fused=cuda)
    r.scaler = torch.amp.GradScaler(env.device.type, enabled=r.amp_dtype == torch.float16)
    r.ema = utils.EMA(r.model, args.ema_decay) if args.ema_decay > 0 else None
    r.loss_sum = torch.zeros((), device=env.device)
    # Non-finite steps: bf16/fp32 stop at the first; fp16 stops after --max-nonfinite skips in a row.
    r.watch = utils.NonFiniteWatch(args.max_nonfinite if r.scaler.is_enabled() else 1, env.device)
    r.read_retries_seen = data.read_retries(r.train_set, r.val_set)


def read_weights(path):
    return utils.load_checkpoint(path, what="--weights file",
                                 advice="give a state dict saved by torch.save (this repo's, torchvision's or timm's)")


def load_weights(model, args, env, weights):
    try:
        if inference_only(args):  # every tensor, the classifier's too
            model.load_state_dict(convert_state_dict(weights, model))
        else:  # fine-tuning: a classifier of another size keeps its fresh init
            for line in load_pretrained(model, weights):
                log(env, f"--weights {args.weights}: {line}")
    except ValueError as e:
        raise UsageError(f"--weights {args.weights}: {e}") from None
    if os.path.basename(args.weights).startswith("tf_") and not args.arch.startswith("tf_"):
        log(env, f"warning: {args.weights} looks like Google's TF weights (timm's tf_ files), which need "
                 f"--arch tf_efficientnet_{member(args.arch)} (TF padding and BatchNorm)")


def evaluate_models(r, models, **options):
    """{prefix: model or None} -> the val figures of each model, keys prefixed. Every rank
    evaluates rank 0's BatchNorm statistics (and rank 0 saves them). `options` go to evaluate."""
    results = {}
    for prefix, model in models.items():
        if model is not None:
            utils.broadcast_buffers(model, r.env)
            figures = evaluate(model, r.val_loader, r.env, r.amp_dtype, len(r.val_set), **options)
            results.update({prefix + k: v for k, v in figures.items() if not k.endswith("images")})
    return results


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
    figures = evaluate_models(r, {"": r.eval_model, "ema_": ema}, flip=args.eval_flip, real_labels=real)
    log(r.env, json.dumps({**counts, **figures}))
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
    """Each rank's random streams and running sums. On as many processes as saved them, one to one;
    on another number (the same global batch), the sampler skips what all ranks consumed together,
    so the epoch goes on with exactly the samples not yet seen, but the random streams cannot pass
    one to one: ranks beyond the old count keep their fresh seed. The epoch's loss is a mean over
    ranks: the old ranks' sum is rescaled."""
    args, env = r.args, r.env
    if len(ranks) == env.world_size:
        utils.set_rng_state(ranks[env.rank]["rng"], env.device)
        r.loss_sum.fill_(ranks[env.rank]["loss_sum"])
        r.watch.skipped.fill_(ranks[env.rank]["skipped"])
    else:
        if env.rank < len(ranks):
            utils.set_rng_state(ranks[env.rank]["rng"], env.device)
        if env.main:
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
    write_on_main(env, utils.write_json, os.path.join(args.output_dir, "args.json"), vars(args))
    write_on_main(env, utils.write_jsonl, os.path.join(args.output_dir, "metrics.jsonl"), r.history)
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
    interval_data_seconds: float = 0.0

    def waited(self, seconds):
        self.data_seconds += seconds
        self.interval_data_seconds += seconds


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
            raise Preempted(f"stopped by {r.stop.name} at step {r.step} (epoch {epoch + 1}); wrote {r.ckpt_path}. "
                            f"{continue_hint(r)}", r.stop.name)
        if args.save_every_steps and r.step % args.save_every_steps == 0 and not last:
            save(r, epoch, epoch_step + 1)
    bar.close()
    return epoch_row(r, epoch, first_step, meter)


def continue_hint(r):
    code = EXIT_INTERRUPTED if r.stop.name == "SIGINT" else EXIT_PREEMPTED
    return f"Continue with the same command and --resume auto --output-dir {r.args.output_dir} (exit code {code})."


def forward_backward(r, batches, meter):
    """The micro-batches of one optimizer step, forward and backward; -> the step's loss (on the
    device). Gradients are all-reduced on the last micro-batch only."""
    args = r.args
    step_loss = torch.zeros((), device=r.env.device)
    for micro in range(args.accum_steps):
        wait_start = time.perf_counter()
        images, labels = next(batches)
        meter.waited(time.perf_counter() - wait_start)
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
    from its own seed, a function of (seed, step, rank, micro) (data.batch_seed)."""
    args = r.args
    if not (args.random_erase or args.mixup or args.cutmix):
        return images, labels
    seed = data.batch_seed(args.seed, r.step, r.env.rank, micro)
    return data.augment_batch(images, labels, args.num_classes, seed, args.random_erase, args.mixup, args.cutmix)


def report_interval(r, meter, bar, epoch, epoch_step, lr):
    """The logging interval's figures (the one device sync of the interval) to the bar, the log
    and TensorBoard; the next interval starts."""
    check_finite(r)
    now = time.time()
    elapsed = max(now - meter.interval_start, 1e-9)
    loss = (r.loss_sum - meter.loss_at_start).item() / meter.steps
    rate = meter.steps * r.global_batch / elapsed
    data_share = 100 * meter.interval_data_seconds / elapsed
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{rate:.0f}", data=f"{data_share:.0f}%")
    if not r.interactive:  # log files get one plain line per interval instead of a bar
        eta = (r.steps_per_epoch - epoch_step - 1) * r.global_batch / rate
        log(r.env, f"epoch {epoch + 1}/{r.args.epochs} step {epoch_step + 1}/{r.steps_per_epoch} loss {loss:.4f} "
                   f"lr {lr:.4g} {rate:.1f} img/s data {data_share:.0f}% epoch eta {eta / 60:.1f} min")
    if r.tensorboard:
        r.tensorboard.add("train", {"loss": loss, "lr": lr, "images_per_sec": rate, "data_percent": data_share},
                          r.step)
    meter.interval_start, meter.loss_at_start, meter.steps, meter.interval_data_seconds = \
        now, r.loss_sum.clone(), 0, 0.0


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


def evaluate_and_save(r, epoch, row):
    """Evaluate (every --eval-every epochs), add the row to metrics.jsonl, write last.pt (and
    best.pt), and stop here if a stop signal came during the epoch."""
    args, env = r.args, r.env
    evaluated = args.eval_every and ((epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs)
    if evaluated:
        row.update(evaluate_models(r, {"val_": r.eval_model, "val_ema_": r.ema and r.ema.module}))
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
    write_on_main(env, utils.write_jsonl, os.path.join(args.output_dir, "metrics.jsonl"), r.history)
    if is_best:
        write_on_main(env, utils.copy_atomic, r.ckpt_path, os.path.join(args.output_dir, "best.pt"))
    if args.keep_best and evaluated:
        write_on_main(env, keep_best_checkpoints, args.output_dir, r.history, args.keep_best, r.ckpt_path)
    if r.tensorboard:
        r.tensorboard.add("epoch", {k: v for k, v in row.items() if k != "epoch"}, epoch + 1)
    log(env, " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()))
    if stopping:
        raise Preempted(f"stopped by {r.stop.name} after epoch {epoch + 1}; wrote {r.ckpt_path}. "
                        f"{continue_hint(r)}", r.stop.name)


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
        write_on_main(r.env, utils.save_atomic, state, r.ckpt_path)
    except utils.DiskFull as e:
        raise utils.DiskFull(f"{e} ({r.kept()})") from None


# ---------------------------------------------------------------------------------------------
# After training: --keep-best's files, --predict, --average, --export

EXPORT_MIN_SIZE = 64  # height and width are dynamic from here (torch.export proves the shapes from 64 px)
EXPORT_MAX_SIZE = 4096
EXPORT_MAX_BATCH = 4096
# The largest difference from eager allowed, relative to the largest eager logit (at least 1): other
# kernels' rounding (ONNX Runtime's) stays near 1e-5, a wrong padding or operation is of order 1.
EXPORT_TOLERANCE = 1e-3


def inference_only(args):
    """Whether this invocation only runs a model: --evaluate, --predict, --export (no run folder)."""
    return bool(args.evaluate or args.predict or args.export)


def check_after_training_flags(args, checkpoint):
    modes = [flag(name) for name in ("evaluate", "predict", "export", "average") if getattr(args, name)]
    if len(modes) > 1:
        raise UsageError(f"give one of {', '.join(modes)}, not several")
    if (args.predict or args.export) and not (args.resume or args.weights):
        raise UsageError(f"{modes[0]} needs --resume CHECKPOINT (with its run's settings) or --weights FILE")
    if (args.predict or args.export) and args.resume and args.weights:
        raise UsageError(f"{modes[0]} takes --resume CHECKPOINT or --weights FILE, not both")
    if (args.predict or args.export) and args.resume == "auto" and checkpoint is None:
        raise UsageError(f"--resume auto found no checkpoint in {args.output_dir} for {modes[0]}")
    for name in ("output", "export"):
        path = getattr(args, name)
        if path and (os.path.isdir(path) or not os.path.isdir(os.path.dirname(os.path.abspath(path)))):
            problem = "is a folder" if os.path.isdir(path) else "is in a folder that does not exist"
            raise UsageError(f"{flag(name)} {path} {problem}: name a file to write")
    if args.output and not (args.predict or args.average):
        raise UsageError("--output is for --predict (FILE.csv or FILE.jsonl) and --average (the checkpoint); "
                         "training writes to --output-dir")
    if args.predict and args.output and not args.output.lower().endswith((".csv", ".jsonl")):
        raise UsageError(f"--output {args.output}: --predict writes FILE.csv or FILE.jsonl")
    if args.export and not args.export.lower().endswith((".pt2", ".onnx")):
        raise UsageError(f"--export {args.export}: the file must be FILE.pt2 (torch.export) or FILE.onnx")
    if args.export and args.export.lower().endswith(".onnx"):
        missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
        if missing:
            raise UsageError(f"--export {args.export} needs {', '.join(missing)} (torch.onnx's exporter: onnx and "
                             f"onnxscript; the check against eager: onnxruntime): pip install onnx onnxscript "
                             f"onnxruntime, or export FILE.pt2")
    for name in ("class_map", "real_labels"):
        if getattr(args, name) and not args.evaluate:
            raise UsageError(f"{flag(name)} is for --evaluate")
    if args.eval_flip and not (args.evaluate or args.predict):
        raise UsageError("--eval-flip is for --evaluate and --predict (training's evaluation stays plain)")
    if checkpoint is not None and "averaged_from" in checkpoint and not inference_only(args):
        raise UsageError(f"{checkpoint.get('loaded_from', args.resume)} averages {len(checkpoint['averaged_from'])} checkpoints and has no "
                         f"optimizer state to continue from: evaluate it (--evaluate --resume), or fine-tune "
                         f"from it with --weights {checkpoint.get('loaded_from', args.resume)} (a new run)")


def one_process(env, what):
    if env.world_size > 1:
        raise UsageError(f"{what} runs in one process: python train.py {what} ..., not under torchrun")


def kept_checkpoints(folder):
    """{epoch: path} of the --keep-best checkpoints (best-epochE.pt) in `folder`."""
    found = {}
    for name in os.listdir(folder):
        match = re.fullmatch(r"best-epoch(\d+)\.pt", name)
        if match:
            found[int(match[1])] = os.path.join(folder, name)
    return found


def keep_best_checkpoints(folder, history, keep, newest):
    """--keep-best: the folder's best-epochE.pt become the `keep` best evaluated epochs of `history`
    by val top-1 (the earlier epoch first on a tie, as for best.pt). `newest`, the epoch's checkpoint
    just written, is linked in when its epoch is one of them; then the ones that fell out are
    deleted (a crash in between leaves one too many, never one too few)."""
    ranked = sorted((row for row in history if "val_top1" in row), key=lambda row: (-row["val_top1"], row["epoch"]))
    best = {row["epoch"] for row in ranked[:keep]}
    epoch = history[-1]["epoch"]
    if epoch in best:
        utils.copy_atomic(newest, os.path.join(folder, f"best-epoch{epoch}.pt"))
    for old, path in kept_checkpoints(folder).items():
        if old not in best:
            os.remove(path)


@contextlib.contextmanager
def notes_beside_predictions(args):
    """With the predictions on stdout (--predict without --output), notes go to stderr, so that
    stdout is the CSV alone."""
    if args.predict and not args.output:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    else:
        yield


def imagenet_class_names():
    """ImageNet-1k's 1000 class names in label order (sorted wnids), from torchvision's weight
    metadata: shipped with the package, nothing is downloaded."""
    from torchvision.models import EfficientNet_B0_Weights
    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def class_names(args, checkpoint, weights):
    """The model's class names in label order: the run's class folders (a checkpoint's "classes",
    also when --weights names a checkpoint: `weights`, read), else ImageNet's for 1000 classes, else
    the label indices. With --weights and no --num-classes, args.num_classes becomes the file's."""
    names = checkpoint.get("classes") if checkpoint is not None else None
    if checkpoint is None:
        names = weights.get("classes") if isinstance(weights.get("model"), dict) else None
        if args.num_classes is None:
            try:
                args.num_classes = convert_state_dict(weights)["classifier.weight"].shape[0]
            except (ValueError, KeyError) as e:
                raise UsageError(f"--weights {args.weights}: {e}") from None
    if names is None and args.num_classes == 1000:
        names = imagenet_class_names()
    names = list(names or [])[:args.num_classes]
    return names + [str(label) for label in range(len(names), args.num_classes)]


def inference_model(args, env, checkpoint):
    """(Run with the model of --resume or --weights on the device, class names) for --predict and --export."""
    weights = read_weights(args.weights) if checkpoint is None else None  # read once, for both
    names = class_names(args, checkpoint, weights)
    r = Run(args, env, resolve_amp(args.amp, env.device))
    build_model(r, checkpoint, weights)
    r.model.eval()
    return r, names


def predict_command(args, env, checkpoint):
    """--predict: the --top-k classes of every file named, with the run's eval preprocessing, as CSV
    (stdout or FILE.csv) or JSON lines (FILE.jsonl); a file that cannot be read or decoded gets its
    reason in the `error` column and the others are predicted."""
    one_process(env, "--predict")
    files = data.list_images(args.predict)
    with notes_beside_predictions(args):  # e.g. load_weights' warning about tf_ weights
        r, names = inference_model(args, env, checkpoint)
    notes = sys.stdout if args.output else sys.stderr  # stdout carries the predictions alone
    k = min(args.top_k, args.num_classes)
    if k < args.top_k:
        print(f"note: --top-k {args.top_k}: the model has {args.num_classes} classes, so {k} per image", file=notes)
    start_time, errors = time.time(), {}
    rows = predict_files(r, files, names, k, errors)
    lines = prediction_lines(rows, k, jsonl=bool(args.output) and args.output.lower().endswith(".jsonl"))
    if args.output:
        utils.write_text(args.output, "".join(lines))
    else:
        for line in lines:
            sys.stdout.write(line)
    seconds = time.time() - start_time
    print(f"predicted {len(files)} files ({len(errors)} could not be read or decoded) in {seconds:.1f} s "
          f"({len(files) / seconds:.1f} img/s) with EfficientNet-{args.arch} at {args.image_size} px (resize "
          f"{args.val_resize}, {args.val_interpolation}{', flip averaged' if args.eval_flip else ''}) on "
          f"{env.device.type}{f' -> {args.output}' if args.output else ''}", file=notes)
    return 0


@torch.no_grad()
def predict_files(r, files, names, k, errors):
    """Yields (path, [(class name, probability), ...] best first, error or None) for each file, in
    order: batches of --batch-size decoded by --workers loader processes, the model on the device.
    `errors` gets {file index: why it could not be used} as the batches leave the loader."""
    args, env = r.args, r.env
    dataset = data.ImageFiles(files, data.ValTransform(args.image_size, args.val_resize, args.val_interpolation))
    batches = data.build_loader(dataset, None, args.batch_size, args.workers, train=False,
                                pin_memory=env.device.type == "cuda")
    loader = data.DeviceLoader(set_aside_errors(batches, errors), env.device, args.channels_last, args.mean, args.std)
    bar = tqdm(total=len(files), desc="predict", unit="img", disable=not sys.stderr.isatty(), dynamic_ncols=True)
    for images, indices in loader:
        scores = class_scores(r.eval_model, images, r.amp_dtype, args.eval_flip)
        top = scores.topk(k, dim=1)
        probs = scores.softmax(dim=1).gather(1, top.indices)
        for i, labels, p in zip(indices.tolist(), top.indices.tolist(), probs.tolist()):
            error = errors.get(i)
            yield files[i], [] if error else [(names[c], q) for c, q in zip(labels, p)], error
        bar.update(len(indices))
    bar.close()


def set_aside_errors(batches, errors):
    """(pixels, indices, reasons) batches -> (pixels, indices); the reasons of the files that could
    not be used go into `errors` {index: reason}."""
    for images, indices, reasons in batches:
        errors.update((i, reason) for i, reason in zip(indices.tolist(), reasons) if reason)
        yield images, indices


def prediction_lines(rows, k, jsonl):
    """predict_files' rows -> the output's lines: JSON objects {"path", "classes", "probs", "error"},
    or CSV with a header: path, class_1, prob_1, ..., class_k, prob_k, error."""
    if jsonl:
        for path, top, error in rows:
            yield json.dumps({"path": path, "classes": [c for c, _ in top], "probs": [p for _, p in top],
                              "error": error}) + "\n"
        return
    yield csv_line(["path", *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "prob")), "error"])
    for path, top, error in rows:
        cells = [cell for name, p in top for cell in (name, f"{p:.6g}")] or [""] * (2 * k)
        yield csv_line([path, *cells, error or ""])


def csv_line(cells):
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def average_command(args, env):
    """--average CKPT... --output FILE: one checkpoint whose weights (and EMA, when every input has
    one) are the inputs' mean, tensor for tensor; integer buffers (BatchNorm's num_batches_tracked)
    take their largest value. It holds the newest input's args and classes and no optimizer state:
    --evaluate/--predict/--export --resume and --weights take it, a training --resume refuses it."""
    check_after_training_flags(args, None)
    one_process(env, "--average")
    if not args.output:
        raise UsageError("--average needs --output FILE: where the averaged checkpoint goes")
    paths = averaged_paths(args.average)
    utils.refuse_overwriting(args.output, paths, "--output")
    state, lines = average_checkpoints(paths)
    for line in lines:
        log(env, line)
    utils.save_atomic(state, args.output)  # a full disk: exit_code's one line, exit 5
    log(env, f"wrote {args.output}: --evaluate --resume {args.output} evaluates it (also --predict, --export), "
             f"--weights {args.output} fine-tunes from it; training cannot --resume it (no optimizer state)")
    return 0


def averaged_paths(names):
    """--average's inputs: checkpoint files as given, a run folder's --keep-best checkpoints by epoch."""
    paths = []
    for name in names:
        if os.path.isdir(name):
            kept = [path for _, path in sorted(kept_checkpoints(name).items())]
            if not kept:
                raise UsageError(f"--average {name}: the folder holds no best-epochE.pt (train with --keep-best N), "
                                 f"or name the checkpoints")
            paths += kept
        else:
            paths.append(name)
    unique = []  # a file named twice (a folder and one of its files, a link) counts once
    for path in paths:
        if not any(utils.same_file(path, seen) for seen in unique):
            unique.append(path)
    paths = unique
    if len(paths) < 2:
        raise UsageError(f"--average needs two or more checkpoints, got {', '.join(paths)}")
    return paths


def average_checkpoints(paths):
    """-> (the averaged checkpoint, the lines that say what was averaged: one per input, a summary).
    Inputs must be train.py checkpoints of one model (arch, classes); they are read one at a time."""
    model_sums, ema_sums, sources, lines, first, newest, with_ema = {}, {}, [], [], None, None, 0
    for n, path in enumerate(paths, 1):
        checkpoint = utils.load_checkpoint(path, advice="--average takes checkpoints of train.py")
        if not all(key in checkpoint for key in ("model", "args", "epoch")):
            raise UsageError(f"{path} is not a train.py checkpoint (model, args, epoch): --average takes those")
        settings, classes = checkpoint["args"], checkpoint.get("classes")
        model = (settings["arch"], settings["num_classes"], classes)
        first = first or (path, model)
        if model != first[1]:
            what = "arch" if model[0] != first[1][0] else "classes"
            raise UsageError(f"cannot average {path} ({describe_model(model)}) with {first[0]} "
                             f"({describe_model(first[1])}): another {what}; the checkpoints must be of one model")
        add_state(model_sums, checkpoint["model"], path)
        if checkpoint.get("ema") is not None:
            add_state(ema_sums, checkpoint["ema"], path)
            with_ema += 1
        top1 = next((row["val_top1"] for row in checkpoint.get("history", [])
                     if row.get("epoch") == checkpoint["epoch"] and "val_top1" in row), None)
        lines.append(f"{n}/{len(paths)} {path}: epoch {checkpoint['epoch']}, step {checkpoint.get('step', '?')}, "
                     f"{f'val top-1 {top1:.3f}' if top1 is not None else 'not evaluated'}"
                     f"{', with EMA' if checkpoint.get('ema') is not None else ', no EMA'}")
        sources.append({"path": os.path.abspath(path), "epoch": checkpoint["epoch"], "step": checkpoint.get("step")})
        order = (checkpoint["epoch"], checkpoint.get("step") or 0)
        if newest is None or order >= newest[0]:  # a tie: the later input
            newest = (order, path, settings, classes)
        del checkpoint
    averaged = mean_state(model_sums, len(paths))
    ema = mean_state(ema_sums, len(paths)) if with_ema == len(paths) else None
    ema_said = ("averaged the same way" if ema is not None else
                f"not averaged: {with_ema} of the {len(paths)} have one, the result has none" if with_ema else
                "none (no input has one)")
    floats = sum(1 for t in averaged.values() if t.is_floating_point())
    integers = [name for name, t in averaged.items() if not t.is_floating_point()]
    lines.append(f"averaged {len(paths)} checkpoints of EfficientNet-{first[1][0]} ({first[1][1]} classes): {floats} "
                 f"floating-point tensors as their mean (BatchNorm running statistics too: averaged, not "
                 f"recomputed on data), {len(integers)} integer buffers ({summarise_names(integers)}) as their "
                 f"largest value; EMA {ema_said}; "
                 f"args and classes of the newest, {newest[1]} (epoch {newest[0][0]})")
    state = {"args": newest[2], "classes": newest[3], "model": averaged, "ema": ema, "epoch": newest[0][0],
             "averaged_from": sources}
    return state, lines


def describe_model(model):
    arch, num_classes, classes = model
    return f"{arch}, {num_classes} outputs, classes {', '.join(classes[:3]) + (' ...' if len(classes) > 3 else '') if classes else 'unnamed'}"


def add_state(sums, state, path):
    """Add a state dict into `sums` {name: (float64 sum, or integer maximum; dtype)}."""
    if sums and set(state) != set(sums):
        raise UsageError(f"{path} holds other tensors than the checkpoints before it: not the same model")
    for name, tensor in state.items():
        if name not in sums:
            sums[name] = (tensor.double() if tensor.is_floating_point() else tensor.clone(), tensor.dtype)
            continue
        total = sums[name][0]
        if tensor.shape != total.shape:
            raise UsageError(f"{path}: {name} is {tuple(tensor.shape)}, {tuple(total.shape)} before: not the same model")
        total = total + tensor.double() if tensor.is_floating_point() else torch.maximum(total, tensor)
        sums[name] = (total, tensor.dtype)


def mean_state(sums, count):
    return {name: (total / count).to(dtype) if dtype.is_floating_point else total for name, (total, dtype) in sums.items()}


def summarise_names(names):
    """'num_batches_tracked' (49 buffers of that name), or the first few names."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    return ", ".join(leaves[:3]) + (" ..." if len(leaves) > 3 else "") if names else "none"


def export_command(args, env, checkpoint):
    """--export FILE.pt2|FILE.onnx: the model in eval mode with a dynamic batch (and height and
    width from EXPORT_MIN_SIZE, when the run's size is at least that), checked against eager on
    random images (two batch sizes, and another size when dynamic) before the file is kept
    (atomically); its preprocessing and class names go beside it, in FILE.json."""
    one_process(env, "--export")
    r, names = inference_model(args, env, checkpoint)
    model = r.model.to("cpu", memory_format=torch.contiguous_format)
    size = args.image_size
    shapes = {0: torch.export.Dim("batch", min=1, max=EXPORT_MAX_BATCH)}
    if size >= EXPORT_MIN_SIZE:
        shapes[2] = torch.export.Dim("height", min=EXPORT_MIN_SIZE, max=EXPORT_MAX_SIZE)
        shapes[3] = torch.export.Dim("width", min=EXPORT_MIN_SIZE, max=EXPORT_MAX_SIZE)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=g)
    samples = [torch.randn(1, 3, size, size, generator=g), torch.randn(3, 3, size, size, generator=g)]
    if 2 in shapes:
        samples.append(torch.randn(2, 3, size + 17, size + 40, generator=g))
    with torch.no_grad():
        expected = [model(x) for x in samples]
    onnx = args.export.lower().endswith(".onnx")
    write = write_onnx if onnx else write_pt2
    weights_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    utils.write_atomic(args.export, lambda tmp: write(model, example, shapes, tmp, samples, expected), weights_bytes)
    dynamic = {"batch": [1, EXPORT_MAX_BATCH]}
    dynamic.update({"height": [EXPORT_MIN_SIZE, EXPORT_MAX_SIZE], "width": [EXPORT_MIN_SIZE, EXPORT_MAX_SIZE]}
                   if 2 in shapes else {"height": size, "width": size})
    description = {
        "file": os.path.basename(args.export), "format": "onnx" if onnx else "torch.export (torch.export.load)",
        "from": args.weights or (args.resume if args.resume != "auto" else f"the newest checkpoint of {args.output_dir}"),
        "arch": args.arch, "num_classes": args.num_classes,
        "image_size": size, "val_resize": args.val_resize, "val_interpolation": args.val_interpolation,
        "mean": args.mean, "std": args.std,
        "input": "float32 (batch, 3, height, width), RGB: the short side resized to val_resize (val_interpolation, "
                 "PIL), center-cropped to image_size, divided by 255, minus mean, divided by std",
        "output": "logits (batch, num_classes); softmax gives the probabilities, classes[i] names output i",
        "dynamic": dynamic, "classes": names}
    utils.write_json(args.export + ".json", description)
    shown = "batch" + (", height and width" if 2 in shapes else f" (height and width fixed at {size})")
    log(env, f"exported EfficientNet-{args.arch} ({args.num_classes} classes) to {args.export}, dynamic {shown}, "
             f"outputs checked against eager at {', '.join('x'.join(map(str, x.shape)) for x in samples)}; "
             f"preprocessing and class names in {args.export}.json")
    return 0


def write_pt2(model, example, shapes, path, samples, expected):
    program = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
    with open(path, "wb") as f:  # a file object: torch.export wants the name to end in .pt2
        torch.export.save(program, f)
    with open(path, "rb") as f:
        check_exported(torch.export.load(f).module(), samples, expected, path)


def write_onnx(model, example, shapes, path, samples, expected):
    import onnxruntime
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=(shapes,), external_data=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    check_exported(lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0]), samples, expected, path)


def check_exported(run_file, samples, expected, path):
    for x, want in zip(samples, expected):
        with torch.no_grad():
            got = run_file(x)
        error = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
        if not error <= EXPORT_TOLERANCE:
            raise UsageError(f"the exported model ({path}) differs from eager by {error:.3g} (relative) on a "
                             f"{'x'.join(map(str, x.shape))} input, more than {EXPORT_TOLERANCE}; not written: "
                             f"export the other format (.pt2 or .onnx)")


if __name__ == "__main__":
    sys.exit(main())
