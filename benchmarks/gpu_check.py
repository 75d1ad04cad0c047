"""The GPU check's measurements in ONE process (each Python start on a card costs ~30 s of CUDA
set-up): training images/s of the model variants (b0 224 px batch 256, b4 380 px batch 128, bf16,
channels_last), train.py on synthetic data and on generated JPEGs (--decode gpu / cpu), a
--sync-bn run where there are 2+ GPUs, then one table and the 400-epoch projection.

    bash benchmarks/gpu.sh                              # on the card: the CUDA tests, then this
    python benchmarks/gpu_check.py --dry-run            # on a CPU: every row, shrunk, to prove it runs

Each row is kept the moment it is measured: appended to OUT/rows.jsonl and the table OUT/table.md
rewritten, so a kill loses only the row in progress. Rows run in order of importance while
--budget seconds last: one that would not fit is listed as not run, one that runs past its own
limit (twice its estimate, or the budget plus 20 s) is cut and listed as such, and the next runs.

Model rows: bench_model.py's training step (forward, label-smoothed loss, backward, the recipe's
RMSprop) on one fixed batch: the mean of --steps steps after warm-up. Compiled rows: the first
step compiles; gpu.sh runs `--warm-compile` beside the tests, which puts the same graphs in
inductor's on-disk caches, so that the row pays for Dynamo's tracing but not inductor's codegen.
train.py rows: train.main in this process, 2 epochs; the rate is that of the second epoch's logged
intervals after its first (steady state: the GPU warm, the loader's workers refilled and no epoch
start inside: not the sampler's permutation, nor the first batches of empty workers).
"""
import argparse
import contextlib
import gc
import json
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

# torch reads this once, at its first cuBLAS use, so it is set before any row: the --deterministic
# row needs it, as train.py sets it. It is 32 MiB, the workspace torch takes on Hopper (sm_90)
# without it, so the other rows run as they would anyway.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
import bench_data  # noqa: E402
import bench_model  # noqa: E402
import data  # noqa: E402
import train  # noqa: E402
from time_limit import time_limit  # noqa: E402

IMAGENET_TRAIN, EPOCHS, GPUS = 1_281_167, 400, 8  # NVIDIA's B0 recipe: 400 epochs on 8 GPUs


def settings(dry):
    """Sizes, steps and the compile backend: the card's, or the dry run's shrunk ones."""
    s = argparse.Namespace(dry=dry, device="cpu" if dry else "cuda", amp="off" if dry else "bf16",
                           # the dry run proves that the rows run: Dynamo and AOTAutograd, no codegen
                           compile_backend="aot_eager" if dry else "inductor")
    s.b0 = ("b0", 32, 2) if dry else ("b0", 224, 256)  # (arch, image size, batch)
    s.b4 = ("b4", 32, 2) if dry else ("b4", 380, 128)
    s.b7 = ("b7", 32, 2) if dry else ("b7", 600, 32)  # the per-arch default batches, flags.DEFAULT_BATCH
    s.steps, s.warmup = (1, 1) if dry else (20, 3)
    s.loop_steps, s.log_every = (6, 2) if dry else (50, 10)  # per epoch; intervals of the 2nd are measured
    return s


# ------------------------------------------------------------------------------ generated JPEGs

def _write_one(job):
    folder, index = job
    bench_data.photo_like(index).save(os.path.join(folder, f"img{index}.JPEG"), "JPEG", quality=90)


def make_jpegs(root, count, links, classes=8, val_per_class=2):
    """root/train/c<k>/ with `count` photo-like 500x375 JPEGs (~85 KB), each under `links` names
    (hard links: an epoch long enough to measure, for `count` files' work; decoding costs the same
    whichever name is read), and a small root/val/ (train.py wants one); written by all cores."""
    jobs = []
    for split, n in (("train", count), ("val", classes * val_per_class)):
        for k in range(classes):
            os.makedirs(os.path.join(root, split, f"c{k}"), exist_ok=True)
        jobs += [(os.path.join(root, split, f"c{i % classes}"), i + (0 if split == "train" else count))
                 for i in range(n)]
    with multiprocessing.Pool(os.cpu_count()) as pool:
        pool.map(_write_one, jobs, chunksize=16)
    for i in range(count):
        path = os.path.join(root, "train", f"c{i % classes}", f"img{i}.JPEG")
        for copy in range(1, links):
            os.link(path, f"{path[:-len('.JPEG')]}_{copy}.JPEG")
    return root


class RowCut(BaseException):
    """A row past its limit (BaseException, so that no `except Exception` on the way swallows it)."""


# ------------------------------------------------------------------------------ measurements

def set_up_cuda():
    torch.backends.cudnn.benchmark = True  # as train.py
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@contextlib.contextmanager
def deterministic_mode(on):
    """train.py --deterministic's settings (CUBLAS_WORKSPACE_CONFIG is set at the top), restored
    afterwards."""
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


def make_bench(s, name, arch, size, batch, compiled=False):
    args = argparse.Namespace(arch=arch, batch_size=batch, image_size=size, device=s.device, amp=s.amp,
                              channels_last=True, compile=False)
    bench = bench_model.Bench(name, args)
    if compiled:
        bench.forward = torch.compile(bench.model, backend=s.compile_backend)
    return bench


def model_row(s, name, arch, size, batch, compiled=False, deterministic=False):
    """(images/s, peak GiB) of bench_model's training step."""
    device = torch.device(s.device)
    try:
        with deterministic_mode(deterministic):
            bench = make_bench(s, name, arch, size, batch, compiled)
            for _ in range(s.warmup + (2 if compiled else 0)):
                bench.train_step()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(s.steps):
                bench.train_step()
            sync(device)
            rate = batch * s.steps / (time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
        return rate, f"peak {peak:.1f} GiB" if peak else ""
    finally:
        bench = None
        free_memory(device)


INTERVAL = re.compile(r"epoch (\d+)/\d+ step (\d+)/\d+ .*? ([\d.]+) img/s data (\d+)%")


def steady_rate(log_text, epoch, batch):
    """(images/s, data-wait %) over train.py's logged intervals of `epoch` after its first, from
    its log lines ("epoch E/N step S/M ... R img/s data D% ..."); (None, None) without them."""
    intervals, previous = [], 0
    for e, step, rate, share in INTERVAL.findall(log_text):
        if int(e) == epoch:
            intervals.append((int(step) - previous, float(rate), float(share)))
            previous = int(step)
    measured = intervals[1:]
    if not measured or any(rate <= 0 for _, rate, _ in measured):
        return None, None
    seconds = [steps * batch / rate for steps, rate, _ in measured]
    images = sum(steps * batch for steps, _, _ in measured)
    share = sum(t * d for t, (_, _, d) in zip(seconds, measured)) / sum(seconds)
    return images / sum(seconds), share


def run_main(argv, log_path):
    """train.main(argv) in this process, its output appended to the log: (exit code, its output)."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        start = os.path.getsize(log_path)
        with open(log_path, "a") as log:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                print(f"\n$ train.py {' '.join(argv)}", flush=True)
                try:
                    code = train.main(argv)
                except SystemExit as e:  # argparse: an unknown flag or value
                    code = e.code
        with open(log_path) as log:
            log.seek(start)
            return code, log.read()
    finally:  # train.py records SIGTERM instead of dying: give it back to the time limit of gpu.sh
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def last_line(text):
    return [line.strip() for line in text.splitlines() if line.strip()][-1]


def train_py_row(s, data_arg, extra, log_path):
    """train.py (train.main, in this process) on `data_arg` for 2 epochs: its steady rate."""
    out = tempfile.mkdtemp(prefix="gpu_check_run_")
    arch, size, batch = s.b0
    argv = ["--data", data_arg, "--arch", arch, "--image-size", str(size), "--batch-size", str(batch),
            "--amp", s.amp, "--channels-last", "--epochs", "2", "--warmup-epochs", "1",
            "--steps-per-epoch", str(s.loop_steps), "--eval-every", "0", "--log-every", str(s.log_every),
            "--output-dir", out, *extra]
    try:
        code, text = run_main(argv, log_path)
        if code != 0:
            return None, f"exit {code}: {last_line(text)[:110]}"
        workers = f"workers {data.default_workers()}"  # train.py's default: the cores less one
        rate, share = steady_rate(text, 2, batch)
        if rate is not None:
            return rate, f"{workers}, data wait {share:.0f} %, steps {s.log_every + 1}-{s.loop_steps} of epoch 2"
        with open(os.path.join(out, "metrics.jsonl")) as f:  # the log's format changed: the epoch's mean
            return [json.loads(line) for line in f][-1]["images_per_sec"], f"{workers}, epoch 2 mean (no interval lines)"
    finally:
        shutil.rmtree(out, ignore_errors=True)
        free_memory(torch.device(s.device))


def dry_run_row(s, arch, size, batch, extra, log_path):
    """train.py --dry-run on synthetic data at the recipe's batch: its rate, peak memory and the
    400-epoch projection on this one GPU; or, when the batch does not fit, the batches that do."""
    argv = ["--data", "synthetic", "--arch", arch, "--image-size", str(size), "--batch-size", str(batch),
            "--amp", s.amp, "--dry-run", *extra]
    try:
        code, text = run_main(argv, log_path)
        if code != 0:
            return None, f"exit {code}: {last_line(text)[:400]}"
        f = json.loads(last_line(text))
        return f["images_per_sec"], (f"peak {f['peak_memory_mb']:.0f} MiB, data wait {100 * f['data_share']:.0f} %, "
                                     f"epoch {f['epoch_seconds'] / 60:.1f} min, 400 epochs "
                                     f"{f['run_seconds'] / 3600:.0f} h on this GPU")
    finally:
        free_memory(torch.device(s.device))


def sync_bn_row(s, log_path, timeout):
    """torchrun with 2 processes, --sync-bn, synthetic data: one GPU each."""
    out = tempfile.mkdtemp(prefix="gpu_check_syncbn_")
    arch, size, batch = s.b0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), "--data", "synthetic", "--arch", arch, "--image-size", str(size),
           "--batch-size", str(batch // 2), "--amp", s.amp, "--channels-last", "--sync-bn", "--epochs", "2",
           "--warmup-epochs", "1", "--steps-per-epoch", str(s.loop_steps), "--eval-every", "0",
           "--log-every", str(s.log_every), "--output-dir", out]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    with open(log_path, "a") as log:
        log.write(f"\n$ {' '.join(cmd)}\n{result.stdout}\n{result.stderr[-5000:]}")
    shutil.rmtree(out, ignore_errors=True)
    if result.returncode != 0:
        return None, f"exit {result.returncode} (see train_py.log)"
    rate, share = steady_rate(result.stdout, 2, batch)  # rank 0 logs the global rate
    return rate, f"2 processes x batch {batch // 2}" + (f", data wait {share:.0f} %" if rate else ", no interval lines")


def warm_compile(s):
    """Compile the compiled rows' graphs once (two steps each), for inductor's on-disk caches (the
    dry run, which has no such caches, only proves the path, with b0)."""
    set_up_cuda()
    for arch, size, batch in (s.b0,) if s.dry else (s.b0, s.b4):
        started = time.time()
        bench = make_bench(s, "ours", arch, size, batch, compiled=True)
        for _ in range(2):  # forward and backward both compile in the first
            bench.train_step()
        sync(torch.device(s.device))
        print(f"warm-compile: {arch} compiled in {time.time() - started:.0f} s", flush=True)
        bench = None
        free_memory(torch.device(s.device))


# ------------------------------------------------------------------------------ the table

def row_plan(s, jpegs, log_path, gpus, warmed):
    """(group, configuration, estimated seconds on an H200, measure) in order of importance;
    `warmed`: the archs whose compiled graphs --warm-compile has cached (else a cold compile)."""
    b0, b4 = s.b0, s.b4
    if gpus >= 2:
        sync_bn = lambda: sync_bn_row(s, log_path, timeout=120)  # noqa: E731
    else:
        sync_bn = lambda: (None, f"not run: {gpus} GPU; SyncBatchNorm needs 2+ processes, one GPU each")  # noqa: E731
    return [
        ("b0", "torchvision eager", 15, lambda: model_row(s, "torchvision", *b0)),
        ("b0", "ours eager (the default)", 10, lambda: model_row(s, "ours", *b0)),
        ("train.py b0", "--data synthetic", 25, lambda: train_py_row(s, "synthetic", [], log_path)),
        ("dry run b0", f"--dry-run, batch {b0[2]}", 40, lambda: dry_run_row(s, *b0, [], log_path)),
        ("dry run b7", f"--dry-run, batch {s.b7[2]}", 70, lambda: dry_run_row(s, *s.b7, [], log_path)),
        ("dry run b7", "--dry-run --grad-checkpointing", 80,
         lambda: dry_run_row(s, *s.b7, ["--grad-checkpointing"], log_path)),
        ("dry run b0", "--dry-run --grad-checkpointing", 45,
         lambda: dry_run_row(s, *b0, ["--grad-checkpointing"], log_path)),
        ("train.py b0", "--data JPEGs --decode gpu", 25, lambda: train_py_row(s, jpegs, ["--decode", "gpu"], log_path)),
        ("train.py b0", "--data JPEGs --decode cpu", 25, lambda: train_py_row(s, jpegs, ["--decode", "cpu"], log_path)),
        ("b0", "ours --compile", 30 if "b0" in warmed else 75, lambda: model_row(s, "ours", *b0, compiled=True)),
        ("b4", "torchvision eager", 20, lambda: model_row(s, "torchvision", *b4)),
        ("b4", "ours eager (the default)", 15, lambda: model_row(s, "ours", *b4)),
        ("b4", "ours --compile", 40 if "b4" in warmed else 110, lambda: model_row(s, "ours", *b4, compiled=True)),
        ("b0", "ours eager --deterministic", 15, lambda: model_row(s, "ours", *b0, deterministic=True)),
        ("b0", "ours eager, lean activations", 10, lambda: model_row(s, "ours-lean", *b0)),
        ("train.py b0", "--sync-bn, 2 processes", 60 if gpus >= 2 else 0, sync_bn),
        ("b4", "ours eager, lean activations", 15, lambda: model_row(s, "ours-lean", *b4)),
        ("b0", "ours --compile --grad-checkpointing", 90, lambda: model_row(s, "ours+ckpt", *b0, compiled=True)),
    ]


class Results:
    """The rows so far, kept on disk at each one: OUT/rows.jsonl (one JSON line per row, flushed
    to disk) and OUT/table.md (the whole table, rewritten)."""

    def __init__(self, out, header):
        self.out, self.header, self.rows = out, header, []
        open(os.path.join(out, "rows.jsonl"), "w").close()

    def add(self, group, configuration, rate, note):
        row = {"group": group, "configuration": configuration, "images_per_sec": rate, "note": note}
        self.rows.append(row)
        with open(os.path.join(self.out, "rows.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        with open(os.path.join(self.out, "table.md"), "w") as f:
            f.write("\n".join(self.table()) + "\n")

    def reference(self, group):
        """The group's first row (torchvision eager; for train.py, --data synthetic; the dry runs' without
        checkpointing)."""
        return next((r["images_per_sec"] for r in self.rows if r["group"] == group), None)

    def table(self):
        lines = [self.header, "", "| group | configuration | train img/s | vs first row of the group | note |",
                 "|---|---|---:|---:|---|"]
        for r in self.rows:
            rate, ref = r["images_per_sec"], self.reference(r["group"])
            ratio = f"{rate / ref:.2f}x" if rate and ref else ""
            lines.append(f"| {r['group']} | {r['configuration']} | {f'{rate:.1f}' if rate else '-'} | {ratio} | {r['note']} |")
        return lines

    def projection(self):
        jpeg = [(r["images_per_sec"], r["configuration"]) for r in self.rows
                if r["group"] == "train.py b0" and "JPEGs" in r["configuration"] and r["images_per_sec"]]
        if not jpeg:
            return "Projection: no JPEG row measured."
        best, which = max(jpeg)
        hours = EPOCHS * IMAGENET_TRAIN / (GPUS * best) / 3600
        return (f"Projection, NVIDIA's {EPOCHS}-epoch B0 schedule on {GPUS} such GPUs from JPEGs at {best:.0f} img/s "
                f"per GPU ({which.removeprefix('--data JPEGs ')}): {hours:.1f} h with perfect scaling, "
                f"{hours / 0.835:.1f} h at NVIDIA's measured 8-GPU B0 scaling (6.68x of 8); evaluation adds "
                f"~{EPOCHS * 50_000 / GPUS / 15_000 / 3600:.2f} h at 15k img/s.")


def measure(results, plan, budget, started, s):
    """Each row of `plan` in turn, into `results` the moment it is done."""
    slow = 10 if s.dry else 1  # a busy CPU: limits only against hangs
    for group, label, estimate, run in plan:
        left = budget - (time.time() - started)
        if not s.dry and estimate > left:
            results.add(group, label, None, f"not run: {left:.0f} s of the budget left, needs ~{estimate} s")
            continue
        t0 = time.time()
        limit = max(min(2 * estimate, left + 20), 10) * slow  # the budget overrun by 20 s at most
        try:
            with time_limit(limit, RowCut(f"cut at its {limit:.0f} s limit")):
                rate, note = run()
        except RowCut as e:
            rate, note = None, str(e)
        except Exception as e:  # one broken row must not cost the others
            rate, note = None, f"error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
        free_memory(torch.device(s.device))
        note = f"{note}{'; ' if note else ''}{time.time() - t0:.0f} s"
        results.add(group, label, rate, note)
        print(f"[{time.time() - started:5.0f} s] {group} | {label} | {f'{rate:.1f}' if rate else '-'} | {note}",
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, every size shrunk, compile with aot_eager")
    parser.add_argument("--budget", type=float, default=225, help="seconds for all rows; rows that would not fit are skipped")
    parser.add_argument("--jpegs", help="a folder made by --make-jpegs (default: make one here first)")
    parser.add_argument("--make-jpegs", metavar="DIR", help="only write the JPEG folder and exit")
    parser.add_argument("--images", type=int, default=4096, help="JPEGs to generate (~85 KB each)")
    parser.add_argument("--links", type=int, default=4, help="names per generated JPEG (train set: images x links)")
    parser.add_argument("--warm-compile", action="store_true", help="only compile the compiled rows' graphs and exit")
    parser.add_argument("--warmed", default="", help="archs (b0,b4) that --warm-compile compiled: their rows are estimated warm")
    parser.add_argument("--tests", default="not run", help="the CUDA tests' outcome, for the table")
    parser.add_argument("--out", default="gpu-results", help="folder for rows.jsonl, table.md, gpu_check.json, train_py.log")
    opts = parser.parse_args()
    if opts.make_jpegs:
        make_jpegs(opts.make_jpegs, opts.images, opts.links)
        return
    s = settings(opts.dry_run)
    if not s.dry and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here: run with --dry-run on a CPU")
    if opts.warm_compile:
        return warm_compile(s)
    started = time.time()
    os.makedirs(opts.out, exist_ok=True)
    log_path = os.path.join(opts.out, "train_py.log")
    open(log_path, "w").close()
    set_up_cuda()
    jpegs = opts.jpegs or make_jpegs(tempfile.mkdtemp(prefix="gpu_check_jpegs_"), opts.images, opts.links)
    gpus = torch.cuda.device_count()
    name = torch.cuda.get_device_name() if not s.dry else "CPU (dry run: shrunk sizes, not a measurement)"
    header = (f"{name}, torch {torch.__version__}, {os.cpu_count()} cores; channels_last; amp {s.amp}; "
              f"{'x'.join(map(str, s.b0[1:]))} b0 (px x batch), {'x'.join(map(str, s.b4[1:]))} b4; model rows: "
              f"{s.steps} timed steps after {s.warmup} warm-up; train.py rows: 2 epochs of {s.loop_steps} steps; "
              f"compiled graphs cached beforehand: {opts.warmed or 'none'}; CUDA tests: {opts.tests}")
    results = Results(opts.out, header)
    print(header, flush=True)
    measure(results, row_plan(s, jpegs, log_path, gpus, opts.warmed.split(",")), opts.budget, started, s)
    print("\n" + "\n".join(results.table()) + "\n\n" + results.projection())
    with open(os.path.join(opts.out, "gpu_check.json"), "w") as f:
        json.dump({"device": name, "torch": torch.__version__, "tests": opts.tests, "dry_run": s.dry,
                   "rows": results.rows, "projection": results.projection()}, f, indent=2)


if __name__ == "__main__":
    main()
