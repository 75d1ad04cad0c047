"""train.py's command line: its flags, one table of their ranges, and how a run's settings are
resolved (checkpoint, recipe, arch and device defaults) and checked before any work is done."""
import argparse
import datetime
import importlib
import math
import os
import sys

import torch

import data
import launch
import recipes
import transforms
import utils
from efficientnet import SCALING, arch_config, canonical_arch, member
from utils import UsageError

EXIT_USAGE = 2
# What a run's checkpoint remembers: every setting that shapes its model, data, schedule and
# evaluation. --resume takes these from the checkpoint unless the command line gives them; the
# rest (speed, logging, where files go) are each invocation's own.
RUN_SETTINGS = ("arch", "num_classes", "image_size", "val_resize", "val_interpolation", "mean", "std", "dropout",
                "drop_path", "bn_eps", "bn_momentum", "data", "min_crop_scale", "autoaugment", "mixup", "seed",
                "opt", "lr", "min_lr", "warmup_epochs", "epochs", "weight_decay", "no_bn_weight_decay",
                "batch_size", "accum_steps", "label_smoothing", "grad_clip", "ema_decay", "steps_per_epoch",
                "weights") + recipes.RUN_SETTINGS
MODEL_SETTINGS = ("arch", "num_classes", "image_size", "val_resize", "val_interpolation", "mean", "std", "bn_eps",
                  "bn_momentum")  # what predict.py and export.py take from a checkpoint
# What evaluation uses; with --evaluate every other flag given gets a note that it does nothing.
EVALUATE_SETTINGS = MODEL_SETTINGS + ("weights", "data", "workers", "batch_size", "amp", "channels_last",
                                      "lean_activations", "compile", "deterministic", "resume", "output_dir",
                                      "evaluate", "class_map", "real_labels", "eval_flip", "dist_timeout")
# Images per process and step that fit an 80 GB GPU in bf16 (NVIDIA trains B4 at 128 per A100-80GB).
DEFAULT_BATCH = {"b0": 256, "b1": 256, "b2": 256, "b3": 256, "b4": 128, "b5": 64, "b6": 32, "b7": 32}
# `--data demo` brings its own sizes and schedule (flags given win): a few CPU minutes, no download.
DEMO = {"image_size": 32, "val_resize": 32, "batch_size": 32, "min_crop_scale": 0.35, "epochs": 12,
        "warmup_epochs": 3, "workers": min(2, len(os.sched_getaffinity(0)))}
# The range of every numeric setting, as intervals are written: [ ] closed, ( ) open.
RANGES = {
    "image_size": "[16, 4096]", "train_size": "[16, 4096]", "val_resize": "[16, 4096]",
    "num_classes": "[1, 100000]", "batch_size": "[1, inf)", "accum_steps": "[1, inf)", "epochs": "[1, inf)",
    "lr": "(0, inf)", "min_lr": "[0, inf)", "warmup_epochs": "[0, inf)", "warmup_lr": "[0, inf)",
    "decay_epochs": "(0, inf)", "decay_rate": "(0, 1]", "weight_decay": "[0, inf)", "grad_clip": "[0, inf)",
    "label_smoothing": "[0, 1)", "ema_decay": "[0, 1)", "dropout": "[0, 1)", "drop_path": "[0, 1)",
    "bn_eps": "(0, 1)", "bn_momentum": "[0, 1)", "mean": "(-inf, inf)", "std": "(0, inf)",
    "min_crop_scale": "(0, 1]", "randaugment_magnitude": "[0, 10]", "magnitude_std": "[0, inf)",
    "random_erase": "[0, 1]", "mixup": "[0, inf)", "cutmix": "[0, inf)", "repeated_aug": "[1, inf)",
    "progressive_epochs": "(0, inf)", "workers": "[0, inf)", "seed": "[0, 2147483647]", "eval_every": "[0, inf)",
    "log_every": "[1, inf)", "save_every_steps": "[0, inf)", "run_epochs": "[0, inf)", "steps_per_epoch": "[0, inf)",
    "max_nonfinite": "[1, inf)", "keep_best": "[0, inf)", "top_k": "[1, inf)"}
SCALES = {"randaugment_magnitude": " (timm's scale)"}
# Flags that do nothing in some runs: (setting, when, why). Given there, they get a note.
IDLE = (("decay_epochs", lambda a: a.sched != "step", "the schedule is --sched cosine"),
        ("decay_rate", lambda a: a.sched != "step", "the schedule is --sched cosine"),
        ("randaugment_magnitude", lambda a: a.augment != "randaugment", "--augment is not randaugment"),
        ("magnitude_std", lambda a: a.augment != "randaugment", "--augment is not randaugment"),
        ("progressive_epochs", lambda a: not a.progressive_resize, "there is no --progressive-resize"),
        ("progressive_resize", lambda a: a.progressive_resize == a.train_size, "it starts at the train size"),
        ("warmup_lr", lambda a: a.warmup_epochs == 0, "there is no warmup"),
        ("keep_best", lambda a: a.eval_every == 0, "--eval-every 0 never evaluates"),
        ("max_nonfinite", lambda a: a.amp != "fp16", "only fp16 skips steps (bf16 and fp32 stop at the first)"),
        ("run_epochs", lambda a: a.run_epochs >= a.epochs, "the run has no more epochs than that"))
# Commands that left train.py for their own files.
MOVED = {"--predict": "python predict.py PATH ... --checkpoint CKPT", "--average": "python average.py RUN ... "
         "--output FILE", "--export": "python export.py FILE.pt2 --checkpoint CKPT", "--top-k": "python predict.py",
         "--output": "python predict.py or python average.py"}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it has none or its help says it already."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=100)

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help or "0:" in action.help:
            return action.help
        return super()._get_help_string(action)

    def _metavar_formatter(self, action, default_metavar):  # --image-size N, not --image-size IMAGE_SIZE
        if action.metavar is None and action.type in (int, float, seconds):
            action.metavar = {int: "N", float: "X", seconds: "S"}[action.type]
        return super()._metavar_formatter(action, default_metavar)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)

    def parse_args(self, args=None, namespace=None):
        for arg in sys.argv[1:] if args is None else map(str, args):
            if self.prog == "train.py" and arg.split("=")[0] in MOVED:
                self.error(f"{arg.split('=')[0]} is its own command now: {MOVED[arg.split('=')[0]]}")
        return super().parse_args(args, namespace)


def seconds(text):
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_model_flags(g):
    """The flags that build a model and its eval preprocessing: train.py's, predict.py's, export.py's."""
    g.add_argument("--arch", default="b0", help="b0..b7, or tf_efficientnet_b0..b7 for Google's TF weights")
    g.add_argument("--num-classes", type=int, help="classifier outputs (default: the data's or the weights' classes)")
    g.add_argument("--image-size", type=int, help="eval (and train) size (default: the member's resolution)")
    g.add_argument("--val-resize", type=int, help="eval: short side resized to this, then center-cropped (default: size + 32)")
    g.add_argument("--val-interpolation", choices=["bicubic", "bilinear"], default="bicubic", help="eval resize filter")
    g.add_argument("--mean", type=float, nargs=3, default=list(data.IMAGENET_MEAN), metavar=("R", "G", "B"),
                   help="normalisation mean of 0-1 pixels (AdvProp weights: 0.5 0.5 0.5)")
    g.add_argument("--std", type=float, nargs=3, default=list(data.IMAGENET_STD), metavar=("R", "G", "B"),
                   help="normalisation std")
    g.add_argument("--bn-eps", type=float, help="BatchNorm eps (default: 1e-5, tf_ archs 1e-3)")
    g.add_argument("--bn-momentum", type=float, help="BatchNorm momentum (default: 0.1, tf_ archs 0.01)")
    g.add_argument("--weights", help="a state dict to start from or to evaluate: this repo's, torchvision's or timm's")


def add_device_flags(g):
    g.add_argument("--batch-size", type=int, help="images per process and step (default: 256 for b0-b3, 128 b4, "
                                                  "64 b5, 32 b6-b7: each fits an 80 GB GPU)")
    g.add_argument("--workers", type=int, help=f"loader processes per process (default: cores per local process "
                                               f"less one, {data.default_workers()} here)")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="autocast dtype; auto: bf16 on GPUs that have it natively, else fp16; off on the CPU")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="NHWC (default: on for CUDA)")
    g.add_argument("--lean-activations", action=argparse.BooleanOptionalAction,
                   help="memory-saving BN+SiLU and squeeze-excite (default: on for the CPU, off for CUDA)")


def build_parser():
    p = Parser(prog="train.py", usage="torchrun --nproc_per_node=N train.py --data DATA [flags]", allow_abbrev=False,
               description="Train or evaluate EfficientNet on ImageNet.", formatter_class=HelpFormatter)
    g = p.add_argument_group("model")
    add_model_flags(g)
    g.add_argument("--train-size", type=int, help="train crop size (default: --image-size)")
    g.add_argument("--progressive-resize", type=int, default=0, metavar="START",
                   help="train from START px growing to --train-size by --progressive-epochs (0: off)")
    g.add_argument("--progressive-epochs", type=float, help="default: 3/4 of --epochs")
    g.add_argument("--dropout", type=float, help="before the classifier (default: the member's)")
    g.add_argument("--drop-path", type=float, default=0.2, help="stochastic depth of the last block")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageNet root (train/, val/), a pack, 'demo' or 'synthetic'")
    g.add_argument("--decode", choices=["cpu", "gpu"], default="cpu", help="training JPEGs decoded by the workers "
                   "or, in one nvJPEG call per batch, by the GPU")
    g.add_argument("--augment", choices=transforms.AUGMENTS, default="none", help="torchvision's policy, in the workers")
    g.add_argument("--autoaugment", action="store_true", help="--augment autoaugment")
    g.add_argument("--randaugment-magnitude", type=float, default=9.0, metavar="M", help="timm's 0-10 scale")
    g.add_argument("--magnitude-std", type=float, default=0.0, metavar="S", help="RandAugment magnitude ~ N(M, S)")
    g.add_argument("--random-erase", type=float, default=0.0, metavar="P", help="erase a box with noise (timm's pixel mode)")
    g.add_argument("--min-crop-scale", type=float, default=0.08, help="RandomResizedCrop's smallest area")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off; with --mixup, even odds)")
    g.add_argument("--repeated-aug", type=int, default=1, metavar="N", help="each image N times an epoch (DeiT's)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--recipe", choices=list(recipes.RECIPES), default="seed", help="a published recipe's defaults")
    g.add_argument("--opt", choices=["rmsprop", "rmsproptf", "sgd", "adamw"], default="rmsprop", help="optimizer")
    g.add_argument("--lr", type=float, help="per 4096 images, scaled to the global batch (default: 0.08 b0-b3, 0.16 b4-b7)")
    g.add_argument("--sched", choices=["cosine", "step"], default="cosine", help="after the warmup")
    g.add_argument("--decay-epochs", type=float, default=2.4, help="--sched step: epochs between decays")
    g.add_argument("--decay-rate", type=float, default=0.97, help="--sched step: factor of each decay")
    g.add_argument("--min-lr", type=float, default=0.0, help="where the schedule ends")
    g.add_argument("--warmup-epochs", type=float, default=16, help="linear warmup")
    g.add_argument("--warmup-lr", type=float, default=0.0, help="where the warmup starts, per 4096 images")
    g.add_argument("--epochs", type=int, default=400, help="length of the schedule")
    g.add_argument("--weight-decay", type=float, help="default: 1e-5 b0-b3, 5e-6 b4-b7")
    g.add_argument("--no-bn-weight-decay", action="store_true", help="none on BatchNorm and biases (NVIDIA)")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation steps")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="cross-entropy label smoothing")
    g.add_argument("--grad-clip", type=float, default=0.0, help="max gradient norm (0: off)")
    g.add_argument("--ema-decay", type=float, default=0.0, help="EMA of the weights, e.g. 0.9999 (0: off)")
    g = p.add_argument_group("speed")
    add_device_flags(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (bitwise CUDA resume)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", help="checkpoints and logs (default: runs/<arch>-<date-time>)")
    g.add_argument("--resume", help="a checkpoint to continue with its run's settings, or 'auto': the newest in "
                                    "--output-dir (a new run when it holds none)")
    g.add_argument("--seed", type=int, default=0, help="the run's seed")
    g.add_argument("--eval-every", type=int, default=1, help="epochs between evaluations (0: never)")
    g.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    g.add_argument("--save-every-steps", type=int, default=0, help="also write last.pt every N steps")
    g.add_argument("--run-epochs", type=int, default=0, help="stop (exit 0) after this many epochs (0: to the end)")
    g.add_argument("--steps-per-epoch", type=int, default=0, help="cap an epoch's steps (0: the whole train set)")
    g.add_argument("--dist-timeout", type=seconds, default=1800, help="seconds to wait for another process")
    g.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    g.add_argument("--max-nonfinite", type=int, default=20, help="fp16: stop after this many skipped steps in a row")
    g.add_argument("--keep-best", type=int, default=0, metavar="N", help="keep the N best epochs' checkpoints")
    g.add_argument("--dry-run", action="store_true", help="measure this run for a minute and project its time and "
                   "memory; writes nothing")
    g = p.add_argument_group("evaluate (with --resume CHECKPOINT or --weights FILE)")
    g.add_argument("--evaluate", action="store_true", help="only evaluate on the val set")
    g.add_argument("--class-map", metavar="FILE|imagenet-index", help="label val folders by a file of folder names "
                   "in label order, or by their names as numbers (ImageNet-V2)")
    g.add_argument("--real-labels", metavar="REAL_JSON", help="ReaL's real.json: adds real_top1")
    g.add_argument("--eval-flip", action="store_true", help="average each image's and its mirror's softmax")
    return p


def given_flags(parser, argv=None):
    """The settings named on the command line (whatever their value), as argparse dests."""
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv=None):
    return build_parser().parse_args(argv)


def parse(argv=None):
    """(train.py's settings as given, the names of those given)."""
    return parse_args(argv), given_flags(build_parser(), argv)


def resolve_args(args, env=None, given=(), checkpoint=None, say=print):
    """Every setting resolved (the run's own from `checkpoint` where the command line gives none,
    then the demo's, the recipe's, the arch's and the device's defaults) and checked, before any
    work is done and before any folder is made. Checks needing the data are in train.build_data."""
    env = env or launch.Dist()
    typed, given = set(given), recipes.before_checkpoint(args, given, checkpoint)
    check_flag_combinations(args, checkpoint)
    if checkpoint is not None:
        take_run_settings(args, given, checkpoint["args"], RUN_SETTINGS, say)
        if not args.evaluate:
            check_resumable(args, env, checkpoint)
    elif args.data == "demo":
        vars(args).update({name: value for name, value in DEMO.items() if name not in given})
        given = given | set(DEMO)  # the recipe keeps them too
    fill_defaults(args, env)
    check_values(args)
    recipes.resolve(args, given, checkpoint)
    check_values(args)  # the recipe's values, and the train size it derives
    if args.val_resize < args.image_size:
        raise UsageError(f"--val-resize {args.val_resize} is smaller than --image-size {args.image_size}")
    if args.data is None:
        raise UsageError("--data is needed: the ImageNet root (train/ and val/), a pack, 'demo' or 'synthetic'")
    check_device(args, env, say)
    if not args.evaluate:
        check_schedule(args, env, say)
        check_output_dir(args)
    note_idle(args, typed, say)
    return args


def check_flag_combinations(args, checkpoint):
    if args.dry_run and args.evaluate:
        raise UsageError("--dry-run measures a training run; --evaluate alone measures the evaluation")
    if args.evaluate and not (args.resume or args.weights):
        raise UsageError("--evaluate needs --resume CHECKPOINT or --weights FILE")
    if args.resume and args.weights and (args.resume != "auto" or args.evaluate):
        raise UsageError("give --resume CHECKPOINT (continue a run) or --weights (start from weights), not both; "
                         "--resume auto --weights starts from the weights only when the folder holds no run")
    if args.evaluate and args.resume == "auto" and checkpoint is None:
        raise UsageError(f"--resume auto found no checkpoint in {args.output_dir} to evaluate")
    if args.weights and not os.path.isfile(args.weights) and checkpoint is None:
        raise UsageError(f"--weights file {args.weights} does not exist")
    for name in ("class_map", "real_labels", "eval_flip"):
        if getattr(args, name) and not args.evaluate:
            raise UsageError(f"{flag(name)} is for --evaluate (training's evaluation stays plain)")
    if checkpoint is not None and "averaged_from" in checkpoint and not args.evaluate:
        raise UsageError(f"{checkpoint['loaded_from']} averages {len(checkpoint['averaged_from'])} checkpoints and "
                         f"has no optimizer state to continue from: evaluate it (--evaluate --resume), or fine-tune "
                         f"from it with --weights {checkpoint['loaded_from']} (a new run)")
    if args.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package: pip install tensorboard (or leave the flag "
                             "out)") from None
    if args.decode == "gpu" and not args.evaluate and args.data in data.BUILT_IN_DATA:
        raise UsageError(f"--decode gpu decodes image files, and --data {args.data} has none; use --decode cpu")


def in_range(value, interval):
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    return (value > low if interval[0] == "(" else value >= low) and (value < high if interval[-1] == ")" else value <= high)


def check_values(args):
    """Every numeric setting that is set lies in its RANGES interval (NaN and infinity never do)."""
    for name, interval in RANGES.items():
        value = getattr(args, name, None)
        if value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        if not all(in_range(v, interval) for v in values):
            need = {"(-inf, inf)": "must be a finite number", "[0, inf)": "must not be negative",
                    "(0, inf)": "must be positive", "[1, inf)": "must be positive"}.get(interval, f"must be in {interval}")
            if not all(math.isfinite(v) for v in values):
                need = "must be a finite number"
            raise UsageError(f"{flag(name)} {need}{SCALES.get(name, '')}, got {' '.join(map(str, values))}")
    cores = len(os.sched_getaffinity(0))
    if getattr(args, "workers", None) is not None and args.workers > cores:
        raise UsageError(f"--workers {args.workers}: this process has {cores} cores, and workers beyond them only "
                         f"compete for them; give at most {cores}")


def take_run_settings(args, given, stored, names, say):
    """The checkpoint's settings `names` where the command line gives none; the ones it gives are
    kept and listed in one note. The model (arch, class count) cannot change."""
    args.arch = arch_name(args.arch)
    if "arch" in given and args.arch != stored["arch"]:
        raise UsageError(f"checkpoint is for {stored['arch']}, not {args.arch}: leave --arch out "
                         f"(or pass --arch {stored['arch']})")
    if "num_classes" in given and args.num_classes != stored["num_classes"]:
        raise UsageError(f"the checkpoint's model has {stored['num_classes']} classes, not --num-classes "
                         f"{args.num_classes}: fine-tune from it with --weights CHECKPOINT (a new run)")
    if "weights" in given and "weights" in names:  # the requeue of a fine-tune repeats its command
        say(f"note: --weights {args.weights} is not loaded: the run continues from its checkpoint "
            f"(it started from {stored['weights'] or 'random weights'})")
        given = given - {"weights"}
    changed = []
    for name in names:
        if name not in stored:
            continue  # a setting newer than the run: its default is what the run did (recipes.resolve)
        if name in given:  # (with --evaluate, a training setting is left to note_idle)
            if getattr(args, name) != stored[name] and (name in EVALUATE_SETTINGS or not getattr(args, "evaluate", 0)):
                changed.append(f"{flag(name)} {stored[name]} -> {getattr(args, name)}")
        elif name == "val_resize" and "image_size" in given:  # follows the new size, as its default does
            args.val_resize = args.image_size + 32
            changed.append(f"--val-resize {stored['val_resize']} -> {args.val_resize}")
        else:
            setattr(args, name, stored[name])
    if changed:
        say(f"note: the command line changes the run's {', '.join(changed)}; its other settings are the checkpoint's")


def check_resumable(args, env, checkpoint):
    """Training can continue this checkpoint: the same global batch (the schedule and the sample
    order are laid out in it), an EMA if the run had one."""
    stored = checkpoint["args"]
    if args.ema_decay > 0 and checkpoint["ema"] is None:
        raise UsageError("--ema-decay is on but the checkpoint has no EMA; resume without it")
    ranks, per_step = len(checkpoint["ranks"]), args.batch_size * env.world_size
    then, now = stored["batch_size"] * ranks * stored["accum_steps"], per_step * args.accum_steps
    if then != now:
        keep = (f"pass --accum-steps {then // per_step}" if then % per_step == 0 else
                f"choose --batch-size and --accum-steps with batch x {env.world_size} x accumulation = {then}")
        raise UsageError(f"the checkpoint's global batch is {then} ({stored['batch_size']} x {ranks} process(es) x "
                         f"{stored['accum_steps']} accumulation), this run's {now} ({args.batch_size} x "
                         f"{env.world_size} x {args.accum_steps}); the schedule and the sample order need the same: "
                         f"{keep} (or start anew from it with --weights)")


def arch_name(arch):
    try:
        return canonical_arch(arch)
    except ValueError as e:
        raise UsageError(str(e)) from None


def fill_defaults(args, env):
    """The arch- and device-dependent defaults of the settings `args` has, resolved, so that
    args.json and the checkpoint hold the values the run used."""
    args.arch = arch_name(args.arch)
    name = member(args.arch)
    scaling, large = SCALING[name], name in ("b4", "b5", "b6", "b7")
    cuda = env.device.type == "cuda"
    resolved = {**arch_config(args.arch), "image_size": scaling.resolution, "dropout": scaling.dropout,
                "workers": data.default_workers(), "lr": 0.16 if large else 0.08, "weight_decay": 5e-6 if large
                else 1e-5, "batch_size": DEFAULT_BATCH[name], "channels_last": cuda, "lean_activations": not cuda}
    for key, value in resolved.items():
        if getattr(args, key, 0) is None:
            setattr(args, key, value)
    if args.val_resize is None:
        args.val_resize = args.image_size + 32  # NVIDIA: 224 -> 256, 380 -> 412
    if hasattr(args, "output_dir") and not args.output_dir:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        from_resume = args.resume and args.resume != "auto"
        args.output_dir = (os.path.dirname(os.path.abspath(args.resume)) if from_resume else
                           utils.broadcast_object(os.path.join("runs", f"{args.arch}-{stamp}"), env))


def check_device(args, env, say=print):
    """What this device cannot do; --amp auto becomes the dtype it picks."""
    cuda = env.device.type == "cuda"
    training = not getattr(args, "evaluate", True)
    if training and args.decode == "gpu" and not cuda:
        raise UsageError("--decode gpu needs a CUDA GPU and none is visible; use --decode cpu")
    if training and args.sync_bn and not cuda:
        raise UsageError("--sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); leave it off on the CPU")
    amp = resolve_amp(args.amp, env.device)
    args.amp = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}[amp]
    if amp == torch.bfloat16 and cuda and not native_bf16(env.device):
        say("note: this GPU emulates bfloat16 (compute capability below 8.0), slowly; --amp fp16 is faster here")


def check_schedule(args, env, say):
    base_lr = args.lr * args.batch_size * env.world_size * args.accum_steps / 4096
    if args.min_lr > base_lr:
        raise UsageError(f"--min-lr {args.min_lr:g} is above the learning rate {base_lr:.6g} (--lr {args.lr:g} "
                         f"per 4096 images, at this global batch): the schedule would climb; give a smaller --min-lr")
    if args.warmup_epochs >= args.epochs:
        say(f"warning: the warmup ({args.warmup_epochs:g} epochs) is not shorter than the run ({args.epochs} "
            f"epochs): the learning rate never reaches --lr; pass a smaller --warmup-epochs")


def note_idle(args, given, say):
    """A note for each flag given that does nothing in this run."""
    if args.evaluate:
        idle = sorted(flag(name) for name in given - set(EVALUATE_SETTINGS) if name != "recipe" or args.recipe != "seed")
        if idle:
            say(f"note: {', '.join(idle)} shape training and do nothing with --evaluate")
        return
    for name, when, why in IDLE:
        if name in given and when(args):
            say(f"note: {flag(name)} does nothing in this run: {why}")


def check_output_dir(args):
    """The run folder must be a folder (or creatable as one) that this process may write, and
    never clobbers a run: a folder that holds one is continued (--resume) or refused."""
    path = args.output_dir
    if not args.resume and os.path.exists(os.path.join(path, "last.pt")):
        raise UsageError(f"{path} already holds a run (last.pt): continue it with --resume auto, "
                         f"or choose another --output-dir")
    existing = utils.existing_parent(path)
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
