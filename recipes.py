"""The published EfficientNet recipes behind train.py's `--recipe`, as one table, and how a recipe
becomes a run's settings.

Every value is a train.py setting (argparse dest). `None` keeps the default (the member's own for
dropout and learning rate by size, BatchNorm of the tf_ archs, ...); a function computes it from the
other resolved settings. A flag given on the command line wins over the recipe. Learning rates
are per 4096 images (train.py scales --lr and --warmup-lr to the real global batch), each
converted once from the batch it was published with: lr_4096 = lr_published * 4096 / batch.
"""
from efficientnet import member
from utils import UsageError

# Settings this module adds to flags.RUN_SETTINGS (stored in checkpoints, reused on --resume).
RUN_SETTINGS = ("recipe", "train_size", "progressive_resize", "progressive_epochs", "augment", "randaugment_magnitude",
                "magnitude_std", "random_erase", "cutmix", "repeated_aug", "sched", "decay_epochs", "decay_rate",
                "warmup_lr")
WORKER_AUGMENTS = ("autoaugment", "randaugment", "trivialaugment", "augmix")  # on decoded pixels, in the workers


# The seed's values (train.py's defaults) of every setting a recipe may set, in the order the start-up line shows
# them; each other recipe is written as its differences from these.
SEED = {"opt": "rmsprop", "lr": None, "sched": "cosine", "decay_epochs": None, "decay_rate": None, "warmup_epochs": 16,
        "warmup_lr": 0.0, "epochs": 400, "weight_decay": None, "no_bn_weight_decay": False, "label_smoothing": 0.1,
        "dropout": None, "drop_path": 0.2, "bn_eps": None, "bn_momentum": None, "ema_decay": 0.0, "augment": "none",
        "randaugment_magnitude": None, "magnitude_std": None, "random_erase": 0.0, "mixup": 0.0, "cutmix": 0.0,
        "repeated_aug": 1, "train_size": None, "val_resize": None, "val_interpolation": "bicubic"}
RECIPES = {
    "seed": {
        "source": "the seed's model card: NVIDIA DeepLearningExamples' EfficientNet recipe with weight decay on "
                  "BatchNorm and BatchNorm momentum 0.1 / eps 1e-5 (shared/reference/RECIPE.md)",
        "values": SEED},
    "nvidia": {
        "source": "NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets configs.yml, B0 and B4 "
                  "(lr 0.08 / 0.16 at their global batch of 4096)",
        "values": dict(SEED, no_bn_weight_decay=True, bn_eps=1e-3, bn_momentum=0.01, augment="autoaugment", mixup=0.2,
                       # no stochastic depth for B0, 0.2 for B4 (each carried to its half of the family)
                       drop_path=lambda args: 0.2 if member(args.arch) in ("b4", "b5", "b6", "b7") else 0.0)},
    "google": {
        "source": "Tan & Le 2019, section 5.2, and tensorflow/tpu models/official/efficientnet "
                  "(lr 0.016 per 256 images -> 0.256 per 4096)",
        "values": dict(SEED, opt="rmsproptf", lr=0.016 * 4096 / 256, sched="step", decay_epochs=2.4, decay_rate=0.97,
                       warmup_epochs=5, epochs=350, weight_decay=1e-5, bn_eps=1e-3, bn_momentum=0.01, ema_decay=0.9999,
                       augment="autoaugment", no_bn_weight_decay=True)},  # TF's L2 term skips batch_normalization/*
    "timm-ra": {
        "source": "pytorch-image-models hfdocs training_hparam_examples, EfficientNet-B0 with RandAugment, 77.7 % "
                  "(lr .048 at 2 x 384 = 768 images -> 0.256 per 4096; warmup: timm's train.py default, 3 epochs)",
        "values": dict(SEED, opt="rmsproptf", lr=0.048 * 4096 / 768, sched="step", decay_epochs=2.4, decay_rate=0.97,
                       warmup_epochs=3, warmup_lr=1e-6 * 4096 / 768, epochs=450, weight_decay=1e-5, ema_decay=0.9999,
                       no_bn_weight_decay=True,  # timm's optimizer factory skips 1-d parameters by default
                       augment="randaugment", randaugment_magnitude=9.0, magnitude_std=0.5, random_erase=0.2)},
    "torchvision": {
        "source": "pytorch/vision references/classification README, the EfficientNet-V2 command (SGD lr 0.5 at "
                  "8 x 128 = 1024 images -> 2.0 per 4096; EMA 0.99998 every 32 steps -> 0.999966 per step)",
        "values": dict(SEED, opt="sgd", lr=0.5 * 4096 / 1024, warmup_epochs=5, epochs=600, val_interpolation="bilinear",
                       warmup_lr=0.01 * 0.5 * 4096 / 1024,  # --lr-warmup-decay 0.01 (their default)
                       weight_decay=2e-5, no_bn_weight_decay=True, augment="trivialaugment", random_erase=0.1,
                       mixup=0.2, cutmix=1.0, repeated_aug=4, val_resize=lambda args: args.image_size,
                       # their EfficientNet-V2-S trains at 300 px for 384 px evaluation: the same ratio, to 8 px
                       train_size=lambda args: max(8, 8 * round(args.image_size * 300 / 384 / 8)),
                       # their EMA: every 32 steps with decay 1 - 2e-5 * 1024 * 32 / 600; per step, its 32nd root
                       ema_decay=(1 - 2e-5 * 1024 * 32 / 600) ** (1 / 32))},
}


def before_checkpoint(args, given, checkpoint):
    """Before the checkpoint's settings are taken: --autoaugment is --augment autoaugment, and a run
    keeps its recipe. -> the flags given, the alias's target included."""
    given = set(given)
    if args.autoaugment:
        if "augment" in given and args.augment != "autoaugment":
            raise UsageError(f"--autoaugment is --augment autoaugment and cannot go with --augment {args.augment}; "
                             f"give one of them")
        args.augment = "autoaugment"
        given.add("augment")
    if checkpoint is not None and "recipe" in given:
        stored = checkpoint["args"].get("recipe", "seed")
        if args.recipe != stored:
            raise UsageError(f"the run was started with --recipe {stored}; a run keeps its recipe: leave --recipe "
                             f"out and give the settings to change as flags (or start a new run)")
    return given


def resolve(args, given, checkpoint):
    """After the checkpoint's settings and the arch defaults: a new run takes its recipe's values
    where no flag was given; then the train size and the progressive ramp get their defaults."""
    if checkpoint is None and args.recipe != "seed":  # the seed's values are train.py's defaults
        for name, value in RECIPES[args.recipe]["values"].items():
            if name not in given and value is not None:
                setattr(args, name, value(args) if callable(value) else value)
    elif checkpoint is not None:
        stored = checkpoint["args"]
        if "augment" not in stored and "augment" not in given and stored.get("autoaugment"):
            args.augment = "autoaugment"  # a checkpoint from before --augment
        if "image_size" in given and "train_size" not in given and stored.get("train_size") == stored["image_size"]:
            args.train_size = None  # followed the eval size: it still does
    if args.train_size is None:
        args.train_size = args.image_size
    if args.progressive_epochs is None:
        # EfficientNetV2's progressive learning: four stages, the last one at the final size.
        args.progressive_epochs = 0.75 * args.epochs
    args.autoaugment = args.augment == "autoaugment"
    check(args)


def check(args):
    """What this module's settings cannot go with (their ranges are flags.RANGES)."""
    if args.progressive_resize and not 32 <= args.progressive_resize <= args.train_size:
        raise UsageError(f"--progressive-resize {args.progressive_resize} must lie between 32 and the train size "
                         f"{args.train_size} (--train-size, default --image-size)")
    if args.decode == "gpu" and not args.evaluate and args.augment in WORKER_AUGMENTS:
        raise UsageError(f"--augment {args.augment} runs in the loader workers on decoded pixels, which --decode gpu "
                         f"does not make; use --decode cpu with --augment {args.augment}")


def describe(args):
    """The start-up line: the recipe, where its numbers come from, and every setting it covers as
    resolved for this run (flags given included)."""
    shown = []
    for name in SEED:
        value = getattr(args, name)
        if (name in ("decay_epochs", "decay_rate") and args.sched != "step") or \
                (name in ("randaugment_magnitude", "magnitude_std") and args.augment != "randaugment"):
            continue
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):  # a switch: shown when on
            shown += [flag] if value else []
        else:
            shown.append(f"{flag} {value:.6g}" if isinstance(value, float) else f"{flag} {value}")
    if args.progressive_resize:
        shown.append(f"--progressive-resize {args.progressive_resize} --progressive-epochs {args.progressive_epochs:g}")
    return f"recipe {args.recipe} ({RECIPES[args.recipe]['source']}): {' '.join(shown)}"
