"""Average the weights (and EMAs) of train.py checkpoints of one model into one checkpoint."""
import os
import sys

import torch

import checkpoints
import flags
import utils
from utils import UsageError


def build_parser():
    p = flags.Parser(prog="average.py", allow_abbrev=False, formatter_class=flags.HelpFormatter,
                     usage="python average.py CKPT_OR_RUN_FOLDER... --output FILE",
                     description="One checkpoint whose weights (and EMA) are the inputs' mean.")
    p.add_argument("inputs", nargs="+", metavar="CKPT_OR_RUN_FOLDER",
                   help="train.py checkpoints, or run folders: their --keep-best checkpoints (best-epochE.pt)")
    p.add_argument("--output", metavar="FILE", required=True, help="the averaged checkpoint to write")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return utils.run_command(lambda: average(args.inputs, args.output), args.output)


def average(inputs, output):
    """The average of `inputs` (checkpoints, run folders) into `output`, atomically, after every check."""
    utils.check_writable(output)
    paths = averaged_paths(inputs)
    utils.refuse_overwriting(output, paths, "--output")
    state, lines = average_checkpoints(paths)
    print("\n".join(lines), flush=True)
    with utils.writing(output):
        utils.save_atomic(state, output)
    print(f"wrote {output}: train.py --evaluate --resume, predict.py and export.py --checkpoint take it, train.py "
          f"--weights fine-tunes from it; training cannot --resume it (no optimizer state)")
    return 0


def averaged_paths(names):
    """The checkpoints to average: files as given, a run folder's --keep-best checkpoints by epoch;
    a file named twice (a folder and one of its files, a link) counts once."""
    paths = []
    for name in names:
        if os.path.isdir(name):
            kept = [path for _, path in sorted(checkpoints.kept_checkpoints(name).items())]
            if not kept:
                raise UsageError(f"{name} holds no best-epochE.pt (train with --keep-best N): name the checkpoints")
            paths += kept
        else:
            paths.append(name)
    unique = [path for i, path in enumerate(paths) if not any(utils.same_file(path, seen) for seen in paths[:i])]
    if len(unique) < 2:
        raise UsageError(f"average.py needs two or more checkpoints, got {', '.join(unique)}")
    return unique


def average_checkpoints(paths):
    """-> (the averaged checkpoint, the lines that say what was averaged: one per input, a summary). Tensor for
    tensor: floating-point ones the mean (float64 sums), integer buffers (BatchNorm's num_batches_tracked) their
    largest value. The result holds the newest input's args and classes, and no optimizer state."""
    model_sums, ema_sums, sources, lines, first, newest, with_ema = {}, {}, [], [], None, None, 0
    for n, path in enumerate(paths, 1):
        checkpoint = utils.load_checkpoint(path, advice="average.py takes checkpoints of train.py")
        if not all(key in checkpoint for key in ("model", "args", "epoch")):
            raise UsageError(f"{path} is not a train.py checkpoint (model, args, epoch): average.py takes those")
        settings, classes, ema = checkpoint["args"], checkpoint.get("classes"), checkpoint.get("ema")
        model = (settings["arch"], settings["num_classes"], classes)
        first = first or (path, model)
        if model != first[1]:
            other = "arch" if model[0] != first[1][0] else "classes"
            raise UsageError(f"cannot average {path} ({describe(model)}) with {first[0]} ({describe(first[1])}): "
                             f"another {other}; the checkpoints must be of one model")
        add_state(model_sums, checkpoint["model"], path)
        if ema is not None:
            add_state(ema_sums, ema, path)
            with_ema += 1
        top1 = next((row["val_top1"] for row in checkpoint.get("history", [])
                     if row.get("epoch") == checkpoint["epoch"] and "val_top1" in row), None)
        lines.append(f"{n}/{len(paths)} {path}: epoch {checkpoint['epoch']}, step {checkpoint.get('step', '?')}, "
                     f"{f'val top-1 {top1:.3f}' if top1 is not None else 'not evaluated'}, "
                     f"{'with EMA' if ema is not None else 'no EMA'}")
        sources.append({"path": os.path.abspath(path), "epoch": checkpoint["epoch"], "step": checkpoint.get("step")})
        order = (checkpoint["epoch"], checkpoint.get("step") or 0)
        if newest is None or order >= newest[0]:  # a tie: the later input
            newest = (order, path, settings, classes)
        del checkpoint, ema  # one input in memory at a time
    averaged = mean_state(model_sums, len(paths))
    ema = mean_state(ema_sums, len(paths)) if with_ema == len(paths) else None
    ema_said = ("averaged the same way" if ema is not None else "none (no input has one)" if not with_ema else
                f"not averaged: {with_ema} of the {len(paths)} have one, the result has none")
    integers = sorted({name.rsplit(".", 1)[-1] for name, t in averaged.items() if not t.is_floating_point()})
    count = sum(1 for t in averaged.values() if not t.is_floating_point())
    lines.append(f"averaged {len(paths)} checkpoints of EfficientNet-{first[1][0]} ({first[1][1]} classes): "
                 f"{len(averaged) - count} floating-point tensors as their mean (BatchNorm running statistics too: "
                 f"averaged, not recomputed on data), {count} integer buffers ({', '.join(integers) or 'none'}) as "
                 f"their largest value; EMA {ema_said}; args and classes of the newest, {newest[1]} (epoch "
                 f"{newest[0][0]})")
    return {"args": newest[2], "classes": newest[3], "model": averaged, "ema": ema, "epoch": newest[0][0],
            "averaged_from": sources}, lines


def describe(model):  # (arch, num_classes, classes)
    shown = ", ".join(model[2][:3]) + " ..." * (len(model[2]) > 3) if model[2] else "unnamed"
    return f"{model[0]}, {model[1]} outputs, classes {shown}"


def add_state(sums, state, path):
    """Add a state dict into `sums` {name: (float64 sum, or integer maximum; dtype)}."""
    if sums and set(state) != set(sums):
        raise UsageError(f"{path} holds other tensors than the checkpoints before it: not the same model")
    for name, tensor in state.items():
        floating = tensor.is_floating_point()
        total = sums[name][0] if name in sums else torch.zeros_like(tensor, dtype=torch.float64) if floating else tensor
        if tensor.shape != total.shape:
            raise UsageError(f"{path}: {name} is {tuple(tensor.shape)}, {tuple(total.shape)} before: another model")
        sums[name] = (total + tensor.double() if floating else torch.maximum(total, tensor), tensor.dtype)


def mean_state(sums, count):
    return {name: (total / count).to(dtype) if dtype.is_floating_point else total
            for name, (total, dtype) in sums.items()}


if __name__ == "__main__":
    sys.exit(main())
