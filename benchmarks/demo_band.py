"""The quick-start demo's reproducibility band: the README's demo command over seeds 0, 1, 2 with
1 and 2 threads (OMP_NUM_THREADS), one run at a time, then a table of final val top-1 per run.

    python benchmarks/demo_band.py                      # the 6 runs one after another, ~30 min on 2 idle cores
    python benchmarks/demo_band.py --seeds 0 --threads 2
    python benchmarks/demo_band.py -- --lr 0.04 --warmup-epochs 1  # a variant: later flags win

Accuracy at a given seed and thread count does not depend on load, so --parallel N runs N at once,
but the wall times it prints are then contended, and more threads than cores in all slows OpenMP
far more than in proportion (2-thread runs among others crawled at ~1/20 of their speed here)."""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The README's quick-start demo (the demo set brings its sizes and schedule), less --seed and --output-dir.
DEMO = ["--data", "demo"]


def run_one(seed, threads, out_root, extra):
    out = os.path.join(out_root, f"seed{seed}-threads{threads}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *DEMO, *extra, "--seed", str(seed),
                             "--output-dir", out], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: seed {seed}, {threads} thread(s) failed (exit {result.returncode}):\n{result.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return seed, threads, [r["val_top1"] for r in rows], seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (wall times then contended)")
    parser.add_argument("--output-dir", default=None, help="default: a fresh folder under the temp dir")
    parser.add_argument("extra", nargs="*", help="more train.py flags after --, e.g. -- --lr 0.04 --warmup-epochs 1 (later flags win)")
    args = parser.parse_args()
    out_root = args.output_dir or tempfile.mkdtemp(prefix="demo_band-")
    jobs = [(s, t) for t in args.threads for s in args.seeds]
    print(f"python train.py {' '.join(DEMO + args.extra)} --seed S  (OMP_NUM_THREADS=T; runs in {out_root})")
    with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda job: run_one(*job, out_root, args.extra), jobs))
    print(f"{'seed':>4} {'threads':>7} {'final top-1':>11} {'wall s':>7}  per-epoch val top-1")
    for seed, threads, top1, seconds in results:
        print(f"{seed:>4} {threads:>7} {top1[-1]:>11.1f} {seconds:>7.0f}  {' '.join(f'{t:.1f}' for t in top1)}")
    finals = [r[2][-1] for r in results]
    print(f"band: {min(finals):.1f} to {max(finals):.1f} % (spread {max(finals) - min(finals):.1f} points), "
          f"{len(finals)} runs{', ' + str(args.parallel) + ' at once' if args.parallel > 1 else ''}")


if __name__ == "__main__":
    main()
