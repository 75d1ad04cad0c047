"""The GPU check's measurements in ONE process (each Python start on a card costs ~30 s of CUDA
set-up): training images/s of the model variants (b0 224 px batch 256, b4 380 px batch 128, bf16,
channels_last), train.py end to end on synthetic data and on generated JPEGs (--decode cpu / gpu),
a --sync-bn run where there are 2+ GPUs, then one table and the 400-epoch projection.

    bash benchmarks/gpu.sh                              # on the card: the CUDA tests, then this
    python benchmarks/gpu_check.py --dry-run            # on a CPU: every row, shrunk, to prove it runs

Rows run in order of importance while --budget seconds last; a row that would not fit is listed
as not run. Model rows: bench_model.py's training step (forward, label-smoothed loss, backward,
the recipe's RMSprop) on one fixed batch, median-free: the mean of --steps steps after warm-up
(compiled rows: the first step compiles). train.py rows: the images/s train.py reports for its
last epoch (persistent loader workers, so no start-up inside it).
"""
import argparse
import contextlib
import gc
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import bench_data  # noqa: E402
import bench_model  # noqa: E402
import train  # noqa: E402

IMAGENET_TRAIN, EPOCHS, GPUS = 1_281_167, 400, 8  # NVIDIA's B0 recipe: 400 epochs on 8 GPUs


# ------------------------------------------------------------------------------ generated JPEGs

def _write_one(job):
    folder, index = job
    bench_data.photo_like(index).save(os.path.join(folder, f"img{index}.JPEG"), "JPEG", quality=90)


def make_jpegs(root, count, classes=8, val_per_class=2):
    """root/train/c<k>/ with `count` photo-like 500x375 JPEGs and a small root/val/ (train.py wants
    one), written by all cores. Returns root."""
    jobs = []
    for split, n in (("train", count), ("val", classes * val_per_class)):
        for k in range(classes):
            os.makedirs(os.path.join(root, split, f"c{k}"), exist_ok=True)
        jobs += [(os.path.join(root, split, f"c{i % classes}"), i + (0 if split == "train" else count))
                 for i in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_one, jobs, chunksize=16)
    return root


# ------------------------------------------------------------------------------ measurements

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def deterministic_mode(on):
    """train.py --deterministic's settings, restored afterwards."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if on:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])


def model_row(opts, name, arch, size, batch, compiled=False, deterministic=False):
    """(images/s, peak GiB) of bench_model's training step."""
    device = torch.device(opts.device)
    settings = argparse.Namespace(arch=arch, batch_size=batch, image_size=size, device=opts.device, amp=opts.amp,
                                  channels_last=True, compile=False)
    with deterministic_mode(deterministic):
        bench = bench_model.Bench(name, settings)
        if compiled:
            bench.forward = torch.compile(bench.model, backend=opts.compile_backend)
        for _ in range(opts.warmup + (2 if compiled else 0)):
            bench.train_step()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(opts.steps):
            bench.train_step()
        sync(device)
        rate = batch * opts.steps / (time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    del bench
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rate, peak


def train_py_accepts(*flags):
    """Whether this train.py parses `flags` (a flag another branch adds may be missing)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            train.parse_args(["--data", "x", *flags])
        return True
    except SystemExit:
        return False


def train_py_row(opts, data, extra, log_path):
    """train.py in this process on `data`: the images/s of its last epoch, or an error text."""
    out = tempfile.mkdtemp(prefix="gpu_check_run_")
    argv = ["--data", data, "--arch", "b0", "--image-size", str(opts.b0_size), "--batch-size", str(opts.b0_batch),
            "--amp", opts.amp, "--channels-last", "--epochs", str(opts.loop_epochs), "--warmup-epochs", "1",
            "--steps-per-epoch", str(opts.loop_steps), "--eval-every", "0", "--log-every", str(opts.loop_steps),
            "--workers", str(opts.workers), "--output-dir", out, *extra]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        print(f"\n$ train.py {' '.join(argv)}", flush=True)
        try:
            code = train.main(argv)
        except SystemExit as e:  # argparse: an unknown flag or value
            code = e.code
        finally:  # train.py records SIGTERM instead of dying: give it back to the time limit of gpu.sh
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    if code != 0:
        with open(log_path) as f:
            last = [line.strip() for line in f if line.strip()][-1]
        return None, f"exit {code}: {last[:110]}"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows[-1]["images_per_sec"], None


def sync_bn_row(opts, log_path):
    """torchrun with 2 processes, --sync-bn, synthetic data: one GPU each (or gloo on the CPU)."""
    out = tempfile.mkdtemp(prefix="gpu_check_syncbn_")
    batch = opts.b0_batch // 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--data", "synthetic", "--arch", "b0", "--image-size", str(opts.b0_size),
           "--batch-size", str(batch), "--amp", opts.amp, "--channels-last", "--sync-bn", "--epochs", "2",
           "--warmup-epochs", "1", "--steps-per-epoch", str(opts.loop_steps), "--eval-every", "0",
           "--log-every", str(opts.loop_steps), "--workers", str(max(1, opts.workers // 2)), "--output-dir", out]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.sync_bn_timeout)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr[-5000:]}")
    if result.returncode != 0:
        return None, f"exit {result.returncode} (see log)"
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f][-1]["images_per_sec"], f"2 processes x batch {batch}"


# ------------------------------------------------------------------------------ the table

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, every size shrunk, compile with aot_eager")
    parser.add_argument("--budget", type=float, default=250, help="seconds for all rows; rows that would not fit are skipped")
    parser.add_argument("--jpegs", help="a folder made by --make-jpegs (default: make one here first)")
    parser.add_argument("--make-jpegs", metavar="DIR", help="only write the JPEG folder and exit")
    parser.add_argument("--images", type=int, default=6144, help="JPEGs to generate (~85 KB each)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="train.py loader workers")
    parser.add_argument("--tests", default="not run", help="the CUDA tests' pytest summary line, for the table")
    parser.add_argument("--out", default="gpu-results", help="folder for gpu_check.json and train_py.log")
    opts = parser.parse_args()
    if opts.make_jpegs:
        make_jpegs(opts.make_jpegs, opts.images)
        return
    dry = opts.dry_run
    opts.device = "cpu" if dry else "cuda"
    opts.amp = "off" if dry else "bf16"  # bf16 on a CPU is slow, and the dry run only proves the rows run
    opts.compile_backend = "aot_eager" if dry else "inductor"
    opts.b0_size, opts.b0_batch, opts.b4_size, opts.b4_batch = (32, 2, 32, 2) if dry else (224, 256, 380, 128)
    opts.steps, opts.warmup = (1, 1) if dry else (20, 5)
    opts.loop_steps, opts.loop_epochs = (3, 2) if dry else (20, 3)
    opts.sync_bn_timeout = 300
    if dry:
        opts.images = min(opts.images, 64)
    os.makedirs(opts.out, exist_ok=True)
    log_path = os.path.join(opts.out, "train_py.log")
    open(log_path, "w").close()
    started = time.time()
    if not dry and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --dry-run on a CPU")
    torch.backends.cudnn.benchmark = True  # as train.py
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    jpegs = opts.jpegs or make_jpegs(tempfile.mkdtemp(prefix="gpu_check_jpegs_"), opts.images)
    gpus = torch.cuda.device_count()

    b0 = ("b0", opts.b0_size, opts.b0_batch)
    b4 = ("b4", opts.b4_size, opts.b4_batch)
    decode = train_py_accepts("--decode", "cpu")
    # (group, label, estimated seconds on an H200, function returning (images/s, peak GiB or note))
    rows = [
        ("b0", "torchvision eager", 20, lambda: model_row(opts, "torchvision", *b0)),
        ("b0", "ours eager (default: plain on CUDA)", 20, lambda: model_row(opts, "ours-plain", *b0)),
        ("b0", "ours eager, lean activations", 20, lambda: model_row(opts, "ours-lean", *b0)),
        ("train.py b0", "--data synthetic", 40, lambda: train_py_row(opts, "synthetic", [], log_path)),
        ("train.py b0", "--data JPEGs --decode cpu" if decode else "--data JPEGs (CPU decode; no --decode flag)", 40,
         lambda: train_py_row(opts, jpegs, ["--decode", "cpu"] if decode else [], log_path)),
        ("train.py b0", "--data JPEGs --decode gpu", 40,
         lambda: train_py_row(opts, jpegs, ["--decode", "gpu"], log_path)),
        ("b0", "ours --compile", 120, lambda: model_row(opts, "ours", *b0, compiled=True)),
        ("b4", "torchvision eager", 25, lambda: model_row(opts, "torchvision", *b4)),
        ("b4", "ours eager (default: plain on CUDA)", 25, lambda: model_row(opts, "ours-plain", *b4)),
        ("b4", "ours eager, lean activations", 25, lambda: model_row(opts, "ours-lean", *b4)),
        ("b0", "ours --compile --grad-checkpointing", 120, lambda: model_row(opts, "ours+ckpt", *b0, compiled=True)),
        ("b0", "ours eager --deterministic", 25, lambda: model_row(opts, "ours-plain", *b0, deterministic=True)),
        ("b4", "ours --compile", 150, lambda: model_row(opts, "ours", *b4, compiled=True)),
        ("train.py b0", "--sync-bn, 2 processes", 60,
         (lambda: sync_bn_row(opts, log_path)) if gpus >= 2 or dry else
         (lambda: (None, f"not run: {gpus} GPU; SyncBatchNorm needs 2+ processes, one GPU each (train.py "
                         f"converts only when world size > 1, so a 1-process torchrun is plain BatchNorm)"))),
        ("b4", "ours --compile --grad-checkpointing", 150, lambda: model_row(opts, "ours+ckpt", *b4, compiled=True)),
    ]
    results = []
    for group, label, estimate, measure in rows:
        left = opts.budget - (time.time() - started)
        if not dry and estimate > left:
            results.append((group, label, None, f"not run: {left:.0f} s of the budget left, needs ~{estimate} s"))
            continue
        t0 = time.time()
        try:
            rate, extra = measure()
        except Exception as e:  # one broken row must not cost the others
            rate, extra = None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        note = extra if isinstance(extra, str) else (f"peak {extra:.1f} GiB" if extra else "")
        results.append((group, label, rate, f"{note}{'; ' if note else ''}{time.time() - t0:.0f} s"))
        print(f"[{time.time() - started:5.0f} s] {group} | {label} | {rate or '-'} | {results[-1][3]}", flush=True)

    reference = {g: r for g, label, r, _ in results if label == "torchvision eager" and r}
    reference["train.py b0"] = next((r for g, label, r, _ in results if label == "--data synthetic" and r), None)
    name = torch.cuda.get_device_name() if not dry else "CPU (dry run: shrunk sizes, not a measurement)"
    print(f"\n{name}, torch {torch.__version__}, {os.cpu_count()} cores; channels_last; "
          f"amp {opts.amp}; b0 {opts.b0_size} px batch {opts.b0_batch}, b4 {opts.b4_size} px batch {opts.b4_batch}; "
          f"{opts.steps} timed steps per model row; CUDA tests: {opts.tests}")
    print("| group | configuration | train img/s | vs first row of the group | note |")
    print("|---|---|---:|---:|---|")
    for group, label, rate, note in results:
        ref = reference.get(group)
        ratio = f"{rate / ref:.2f}x" if rate and ref else ""
        print(f"| {group} | {label} | {f'{rate:.1f}' if rate else '-'} | {ratio} | {note} |")
    rates = {label: rate for group, label, rate, _ in results if group == "train.py b0" and rate}
    end_to_end = [r for label, r in rates.items() if "JPEGs" in label]
    if end_to_end:
        best = max(end_to_end)
        hours = EPOCHS * IMAGENET_TRAIN / (GPUS * best) / 3600
        print(f"\nProjection, NVIDIA's {EPOCHS}-epoch B0 schedule on {GPUS} such GPUs from JPEGs at {best:.0f} img/s "
              f"per GPU: {hours:.1f} h with perfect scaling, {hours / 0.835:.1f} h at NVIDIA's measured 8-GPU B0 "
              f"scaling (6.68x of 8); evaluation adds ~{EPOCHS * 50_000 / GPUS / 15_000 / 3600:.2f} h at 15k img/s.")
    with open(os.path.join(opts.out, "gpu_check.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "tests": opts.tests, "dry_run": dry,
                   "rows": [{"group": g, "configuration": c, "images_per_sec": r, "note": n} for g, c, r, n in results]},
                  f, indent=2)


if __name__ == "__main__":
    main()
