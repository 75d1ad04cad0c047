"""Classify image files with a trained model, preprocessed as its evaluation was: CSV or JSON lines out."""
import csv
import io
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import checkpoints
import data
import flags
import launch
import utils
from evaluate import class_scores
from transforms import ValTransform, decode_rgb
from utils import DataError, UsageError


def build_parser():
    p = flags.Parser(prog="predict.py", allow_abbrev=False, formatter_class=flags.HelpFormatter,
                     usage="python predict.py PATH... (--checkpoint CKPT | --weights FILE) [flags]",
                     description="The top-k classes of image files, preprocessed as the model was evaluated.")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, .txt lists of files")
    p.add_argument("--checkpoint", metavar="CKPT", help="a train.py checkpoint: its model and its run's eval settings")
    p.add_argument("--output", metavar="FILE", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    p.add_argument("--top-k", type=int, default=5, help="classes per image")
    p.add_argument("--eval-flip", action="store_true", help="average each image's and its mirror's softmax")
    flags.add_model_flags(p)
    flags.add_device_flags(p)
    return p


def main(argv=None):
    args, given = build_parser().parse_args(argv), flags.given_flags(build_parser(), argv)
    return utils.run_command(lambda: predict(args, given), args.output)


def predict(args, given):
    """The --top-k classes of every file named, as CSV (stdout or FILE.csv) or JSON lines (FILE.jsonl)."""
    notes = sys.stdout if args.output else sys.stderr  # stdout carries the predictions alone
    source = check_source(args)
    if args.output and not args.output.lower().endswith((".csv", ".jsonl")):
        raise UsageError(f"--output {args.output}: predict.py writes FILE.csv or FILE.jsonl")
    if args.output:
        utils.check_writable(args.output)
    files = list_images(args.paths)
    if args.output:
        utils.refuse_overwriting(args.output, [*files, source], "--output")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, names = load_model(args, given, device, lambda line: print(line, file=notes))
    k = min(args.top_k, args.num_classes)
    if k < args.top_k:
        print(f"note: --top-k {args.top_k}: the model has {args.num_classes} classes, so {k} per image", file=notes)
    start, errors = time.time(), {}
    rows = predict_files(model, files, names, k, args, device, errors)
    out = io.StringIO() if args.output else sys.stdout  # a file is written whole, atomically, at the end
    write_predictions(rows, k, out, jsonl=(args.output or "").lower().endswith(".jsonl"))
    if args.output:
        with utils.writing(args.output):
            utils.write_text(args.output, out.getvalue())
    seconds = time.time() - start
    print(f"predicted {len(files)} files ({len(errors)} could not be read or decoded) in {seconds:.1f} s "
          f"({len(files) / seconds:.1f} img/s) with EfficientNet-{args.arch} at {args.image_size} px (resize "
          f"{args.val_resize}, {args.val_interpolation}{', flip averaged' if args.eval_flip else ''}) on "
          f"{device.type}{f' -> {args.output}' if args.output else ''}", file=notes)
    return 0


def check_source(args):
    """The checks that read no file, before any work; returns --checkpoint or --weights, the one given."""
    flags.check_values(args)
    if bool(args.checkpoint) == bool(args.weights):
        raise UsageError("give --checkpoint CKPT or --weights FILE, not both" if args.checkpoint else
                         "needs --checkpoint CKPT (a train.py checkpoint) or --weights FILE (a state dict)")
    return args.checkpoint or args.weights


def load_model(args, given, device, say):
    """(the eval-mode model of --checkpoint or --weights on `device`, its class names), `args`
    resolved: a checkpoint's model and eval settings (flags.MODEL_SETTINGS) where no flag gives one
    (a note lists those that do); for --weights, the flags' and the arch's defaults."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("this command runs in one process: start it with python, not torchrun")
    checkpoint = checkpoints.read_checkpoint(args.checkpoint, None, say) if args.checkpoint else None
    weights = checkpoints.read_weights(args.weights) if args.weights else None
    if checkpoint is not None:
        flags.take_run_settings(args, given, checkpoint["args"], flags.MODEL_SETTINGS, say)
    elif args.num_classes is None:
        args.num_classes = checkpoints.weights_num_classes(weights, args.weights)
    args.dropout = args.drop_path = 0.0  # neither acts in eval mode
    flags.fill_defaults(args, launch.Dist(device=device))  # alone: no process group
    if args.val_resize < args.image_size:
        raise UsageError(f"--val-resize {args.val_resize} is smaller than --image-size {args.image_size}")
    model = checkpoints.build_model(args, device, checkpoint, weights, whole=True, say=say)
    return model.eval(), checkpoints.class_names(checkpoint, weights, args.num_classes)


def list_images(paths):
    """The files named, in order: a file as given; a folder's image files (as the loaders name them),
    searched recursively and sorted; a .txt file's lines, paths relative to its folder."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path, followlinks=True)
                           for name in names if data.is_image_name(name))
            if not found:
                raise DataError(f"{path}: the folder holds no image files ({', '.join(data.IMG_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path) and path.lower().endswith(".txt"):
            listed = [text for _, text in data.read_label_lines(path, "expected one image path per line")]
            files += [os.path.join(os.path.dirname(path), name) for name in listed]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"{path} does not exist: predict.py takes image files, folders and .txt lists of files")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """(uint8 (S, S, 3) pixels through `transform`, index, "") per file; for a file that cannot be read
    or decoded, black pixels and the reason, so that the batch goes on and the caller reports it."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return self.transform(decode_rgb(path, utils.read_file(path))), index, ""
        except DataError as e:
            return torch.zeros(self.transform.size, self.transform.size, 3, dtype=torch.uint8), index, str(e)


@torch.no_grad()
def predict_files(model, files, names, k, args, device, errors):
    """Yields (path, [(class name, probability), ...] best first, error or None) for each file, in order;
    `errors` gets {file index: why it could not be used} as the batches leave the loader."""
    dataset = ImageFiles(files, ValTransform(args.image_size, args.val_resize, args.val_interpolation))
    batches = data.build_loader(dataset, None, args.batch_size, args.workers, train=False,
                                pin_memory=device.type == "cuda")
    loader = data.DeviceLoader(set_aside_errors(batches, errors), device, args.channels_last, args.mean, args.std)
    amp_dtype = flags.resolve_amp(args.amp, device)
    with tqdm(total=len(files), desc="predict", unit="img", disable=not sys.stderr.isatty()) as bar:
        for images, indices in loader:
            scores = class_scores(model, images, amp_dtype, args.eval_flip)
            top = scores.topk(k, dim=1)
            probs = scores.softmax(dim=1).gather(1, top.indices)
            for i, labels, p in zip(indices.tolist(), top.indices.tolist(), probs.tolist()):
                error = errors.get(i)
                yield files[i], [] if error else [(names[c], q) for c, q in zip(labels, p)], error
            bar.update(len(indices))


def set_aside_errors(batches, errors):
    """(pixels, indices, reasons) batches -> (pixels, indices); the reasons given go into `errors` {index: reason}."""
    for images, indices, reasons in batches:
        errors.update((i, reason) for i, reason in zip(indices.tolist(), reasons) if reason)
        yield images, indices


def write_predictions(rows, k, out, jsonl):
    """predict_files' rows into the text stream `out`, each as it comes: JSON lines {"path", "classes",
    "probs", "error"}, or CSV with a header: path, class_1, prob_1, ..., class_k, prob_k, error."""
    if jsonl:
        for path, top, error in rows:
            out.write(json.dumps({"path": path, "classes": [c for c, _ in top], "probs": [p for _, p in top],
                                  "error": error}) + "\n")
        return
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["path", *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "prob")), "error"])
    for path, top, error in rows:
        writer.writerow([path, *([cell for name, p in top for cell in (name, f"{p:.6g}")] or [""] * (2 * k)),
                         error or ""])


if __name__ == "__main__":
    sys.exit(main())
