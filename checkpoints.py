"""Checkpoints and weights in and out: the checkpoint a command reads, the model it builds from
it or from a weights file, the class names it carries, and the best epochs a run keeps."""
import os
import re

import torch

import utils
from efficientnet import convert_state_dict, create_model, load_pretrained, member
from utils import UsageError


def read_checkpoint(resume, output_dir, say=print):
    """The train.py checkpoint that --resume names, or for "auto" the newest good one in
    `output_dir` (None when it holds none). The file read is in the checkpoint's "loaded_from"."""
    if resume != "auto":
        checkpoint = utils.load_checkpoint(resume)
        if "model" not in checkpoint or "epoch" not in checkpoint:
            raise UsageError(f"{resume} is not a train.py checkpoint (bare weights go to --weights)")
        return dict(checkpoint, loaded_from=resume)
    if not output_dir:
        raise UsageError("--resume auto needs --output-dir (the run folder to continue)")
    path, checkpoint, skipped = utils.newest_good_checkpoint(output_dir)
    for problem in skipped:
        say(f"warning: skipping {problem}")
    if path is None:
        return None
    say(f"resuming from {path}")
    return dict(checkpoint, loaded_from=path)


def read_weights(path):
    return utils.load_checkpoint(path, what="--weights file",
                                 advice="give a state dict saved by torch.save (this repo's, torchvision's or timm's)")


def weights_num_classes(weights, path):
    """The class count of the classifier in a weights file (a state dict or a checkpoint)."""
    try:
        return convert_state_dict(weights)["classifier.weight"].shape[0]
    except (ValueError, KeyError) as e:
        raise UsageError(f"--weights {path}: {e}") from None


def build_model(args, device, checkpoint=None, weights=None, whole=False, say=print):
    """The model `args` describe on `device`, from the checkpoint, else from `weights` (read from
    args.weights; `whole`: every tensor, the classifier's too, as inference needs; else a classifier
    of another class count keeps its fresh init, as fine-tuning needs), else randomly initialised."""
    model = create_model(args.arch, args.num_classes, dropout=args.dropout, drop_path_rate=args.drop_path,
                         bn_eps=args.bn_eps, bn_momentum=args.bn_momentum, lean_activations=args.lean_activations)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    elif args.weights:
        load_weights(model, weights if weights is not None else read_weights(args.weights), args.weights, whole, say)
        if os.path.basename(args.weights).startswith("tf_") and not args.arch.startswith("tf_"):
            say(f"warning: {args.weights} looks like Google's TF weights (timm's tf_ files), which need "
                f"--arch tf_efficientnet_{member(args.arch)} (TF padding and BatchNorm)")
    model.set_grad_checkpointing(getattr(args, "grad_checkpointing", False))
    return model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)


def load_weights(model, weights, path, whole, say):
    try:
        if whole:
            model.load_state_dict(convert_state_dict(weights, model))
        else:
            for line in load_pretrained(model, weights):
                say(f"--weights {path}: {line}")
    except ValueError as e:
        raise UsageError(f"--weights {path}: {e}") from None


def class_names(checkpoint, weights, num_classes):
    """The model's class names in label order: the run's class folders (a checkpoint's "classes",
    also when --weights names a checkpoint), else ImageNet's for 1000 classes, else the indices."""
    source = checkpoint if checkpoint is not None else weights if isinstance(weights.get("model"), dict) else {}
    names = source.get("classes")
    if names is None and num_classes == 1000:  # torchvision weight metadata, in label order: nothing is downloaded
        from torchvision.models import EfficientNet_B0_Weights
        names = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    names = list(names or [])[:num_classes]
    return names + [str(label) for label in range(len(names), num_classes)]


def check_same_labels(checkpoint_classes, data_classes, where):
    """Evaluating a checkpoint on data whose class names it knows at other labels (a --class-map in
    another order, another sorting) would count right answers as wrong: refuse, naming the first."""
    label_of = {name: label for label, name in enumerate(checkpoint_classes or [])}
    for label, name in enumerate(data_classes):
        if label_of.get(name, label) != label:
            raise UsageError(f"{where} gives class {name} label {label}, but the checkpoint was trained with it "
                             f"as label {label_of[name]}: list the class folders in the checkpoint's order "
                             f"({', '.join(checkpoint_classes[:3])}, ...), or leave --class-map out")


def kept_checkpoints(folder):
    """{epoch: path} of the --keep-best checkpoints (best-epochE.pt) in `folder`."""
    matches = (re.fullmatch(r"best-epoch(\d+)\.pt", name) for name in os.listdir(folder))
    return {int(match[1]): os.path.join(folder, match[0]) for match in matches if match}


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
