"""Export a trained model as FILE.pt2 (torch.export) or FILE.onnx, kept only when it computes what eager does."""
import contextlib
import importlib.util
import io
import os
import sys

import torch

import flags
import utils
from predict import check_source, load_model
from utils import UsageError

MIN_SIZE = 64  # height and width are dynamic from here (torch.export proves the shapes from 64 px)
MAX_SIZE = MAX_BATCH = 4096
# The largest difference from eager allowed, relative to the largest eager logit (at least 1): other
# kernels' rounding (ONNX Runtime's) stays near 1e-5, a wrong padding or operation is of order 1.
TOLERANCE = 1e-3


def build_parser():
    p = flags.Parser(prog="export.py", allow_abbrev=False, formatter_class=flags.HelpFormatter,
                     usage="python export.py FILE.pt2|FILE.onnx (--checkpoint CKPT | --weights FILE) [flags]",
                     description="The model with a dynamic batch (and size from 64 px), kept if it computes what "
                                 "eager does; preprocessing and class names in FILE.json.")
    p.add_argument("file", metavar="FILE.pt2|FILE.onnx", help="torch.export's file, or ONNX (pip install onnx "
                   "onnxscript onnxruntime)")
    p.add_argument("--checkpoint", metavar="CKPT", help="a train.py checkpoint: its model and its run's eval settings")
    flags.add_model_flags(p)
    p.set_defaults(channels_last=False, lean_activations=None)
    return p


def main(argv=None):
    args, given = build_parser().parse_args(argv), flags.given_flags(build_parser(), argv)
    return utils.run_command(lambda: export(args, given), args.file)


def export(args, given):
    """Writes args.file (atomically) once its outputs equal eager's on random images (two batch
    sizes, and another size when dynamic), then FILE.json: preprocessing, dynamic ranges, classes."""
    source, path, onnx = check_source(args), args.file, args.file.lower().endswith(".onnx")
    if not path.lower().endswith((".pt2", ".onnx")):
        raise UsageError(f"export.py {path}: the file must be FILE.pt2 (torch.export) or FILE.onnx")
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if onnx and not importlib.util.find_spec(name)]
    if missing:
        raise UsageError(f"export.py {path} needs {', '.join(missing)} (torch.onnx's exporter: onnx and onnxscript; "
                         f"the check against eager: onnxruntime): pip install onnx onnxscript onnxruntime, or export "
                         f"FILE.pt2")
    for output in (path, path + ".json"):
        utils.check_writable(output, "export.py")
    utils.refuse_overwriting(path, [source], "export.py")
    model, names = load_model(args, given, torch.device("cpu"), print)
    size, g = args.image_size, torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, size, size, generator=g)
    samples = [torch.randn(1, 3, size, size, generator=g), torch.randn(3, 3, size, size, generator=g)]
    shapes = {0: torch.export.Dim("batch", min=1, max=MAX_BATCH)}
    dynamic = {"batch": [1, MAX_BATCH], "height": size, "width": size}
    if size >= MIN_SIZE:
        shapes[2] = torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE)
        shapes[3] = torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)
        dynamic.update(height=[MIN_SIZE, MAX_SIZE], width=[MIN_SIZE, MAX_SIZE])
        samples.append(torch.randn(2, 3, size + 17, size + 40, generator=g))
    with torch.no_grad():
        expected = [model(x) for x in samples]
    write = write_onnx if onnx else write_pt2
    with utils.writing(path):
        utils.write_atomic(path, lambda tmp: check_exported(write(model, example, shapes, tmp), samples,
                                                            expected, path), utils.tensor_bytes(model.state_dict()))
        utils.write_json(path + ".json", {
            "file": os.path.basename(path), "format": "onnx" if onnx else "torch.export (torch.export.load)",
            "from": source, "arch": args.arch, "num_classes": args.num_classes, "image_size": size,
            "val_resize": args.val_resize, "val_interpolation": args.val_interpolation, "mean": args.mean,
            "std": args.std, "input": "float32 (batch, 3, height, width), RGB: the short side resized to val_resize "
            "(val_interpolation, PIL), center-cropped to image_size, divided by 255, minus mean, divided by std",
            "output": "logits (batch, num_classes); softmax gives the probabilities, classes[i] names output i",
            "dynamic": dynamic, "classes": names})
    shown = "batch" + (", height and width" if 2 in shapes else f" (height and width fixed at {size})")
    print(f"exported EfficientNet-{args.arch} ({args.num_classes} classes) to {path}, dynamic {shown}, outputs "
          f"checked against eager at {', '.join('x'.join(map(str, x.shape)) for x in samples)}; preprocessing and "
          f"class names in {path}.json")
    return 0


def write_pt2(model, example, shapes, path):
    """Writes the program to `path`; returns it as read back, to run."""
    program = torch.export.export(model, (example,), dynamic_shapes=(shapes,))
    with open(path, "wb") as f:  # a file object: torch.export wants the name to end in .pt2
        torch.export.save(program, f)
    with open(path, "rb") as f:
        return torch.export.load(f).module()


def write_onnx(model, example, shapes, path):
    """Writes the ONNX file to `path`; returns a function that runs it in ONNX Runtime."""
    import onnxruntime
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(model, (example,), path, dynamo=True, dynamic_shapes=(shapes,), external_data=False)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def check_exported(run_file, samples, expected, path):
    for x, want in zip(samples, expected):
        with torch.no_grad():
            got = run_file(x)
        error = ((got - want).abs().max() / want.abs().max().clamp(min=1)).item()
        if not error <= TOLERANCE:
            raise UsageError(f"the exported model ({path}) differs from eager by {error:.3g} (relative) on a "
                             f"{'x'.join(map(str, x.shape))} input, more than {TOLERANCE}; not written: "
                             f"export the other format (.pt2 or .onnx)")


if __name__ == "__main__":
    sys.exit(main())
