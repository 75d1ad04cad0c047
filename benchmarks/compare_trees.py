"""This checkout against another (e.g. the commit before a refactor) side by side, on the same data:
train.py's step rate and peak memory, the train loader's rate, and exact resume with its cost.

    git worktree add /tmp/before ae87dcc
    python benchmarks/compare_trees.py /tmp/before                 # 3 alternating rounds, ~10 min on 2 cores

Every figure is measured in a fresh process per tree, the trees alternating (A, B, A, B, ...) so
that a machine's drift hits both; the table gives each figure's median over the rounds.
  step:   train.py on --data demo at 64 px, batch 16, 1 loader worker: epoch 2's images/s
  memory: that run's peak resident memory (VmHWM)
  loader: the train loader alone over 256 generated JPEGs (RandomResizedCrop to 128 px, flip), 1 worker
  resume: 2 epochs straight against 1 epoch, exit, --resume auto, 1 epoch: the final weights must be
          bitwise equal (else the script stops); the figure is the resumed run's wall time
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--data", "demo", "--image-size", "64", "--val-resize", "64", "--batch-size", "16", "--epochs", "2",
       "--steps-per-epoch", "12", "--warmup-epochs", "1", "--eval-every", "0", "--workers", "1", "--log-every", "100"]
TRAIN = """import sys, train
code = train.main(sys.argv[1:])
print("VmHWM_kB", [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
sys.exit(code)"""
LOADER = """import sys, time, data
train_set, _ = data.build_datasets(sys.argv[1], 128, 146, seed=0)
sampler = data.TrainSampler(len(train_set), 0, 1, 0)
loader = data.build_loader(train_set, sampler, 32, 1, train=True)
for epoch in range(3):  # the first warms up: the worker's start and first decodes
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    images = sum(len(batch[0]) for batch in loader)
print("rate", images / (time.perf_counter() - start))"""


def python(tree, code, *argv, cwd):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run([sys.executable, "-c", code, *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"error: {tree}: exit {result.returncode}\n{result.stderr[-1500:]}")
    return result.stdout


def step_and_memory(tree, work):
    out = os.path.join(work, "step")
    stdout = python(tree, TRAIN, *RUN, "--output-dir", out, cwd=work)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    subprocess.run(["rm", "-rf", out])
    return rows[-1]["images_per_sec"], int(stdout.split("VmHWM_kB")[-1]) / 1024


def resume(tree, work):
    import time
    import torch
    straight, split = os.path.join(work, "straight"), os.path.join(work, "split")
    python(tree, TRAIN, *RUN, "--output-dir", straight, cwd=work)
    python(tree, TRAIN, *RUN, "--output-dir", split, "--run-epochs", "1", cwd=work)
    start = time.perf_counter()
    python(tree, TRAIN, *RUN, "--output-dir", split, "--resume", "auto", cwd=work)
    seconds = time.perf_counter() - start
    a, b = (torch.load(os.path.join(d, "last.pt"), weights_only=True)["model"] for d in (straight, split))
    if not all(torch.equal(a[k], b[k]) for k in a):
        sys.exit(f"error: {tree}: the resumed run's weights differ from the uninterrupted run's")
    subprocess.run(["rm", "-rf", straight, split])
    return seconds


def make_jpegs(root, count=256):
    import numpy as np
    from PIL import Image
    for i in range(count):
        folder = os.path.join(root, "train", f"c{i % 4}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.random.default_rng(i).integers(0, 255, (240, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{i}.JPEG"), quality=90)
    for c in range(4):
        os.makedirs(os.path.join(root, "val", f"c{c}"), exist_ok=True)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(root, "val", f"c{c}", "0.JPEG"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("other", help="the other checkout (a folder with its train.py)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trees = {"this": ROOT, "other": os.path.abspath(args.other)}
    figures = {name: {"step img/s": [], "peak MiB": [], "loader img/s": [], "resume s": []} for name in trees}
    with tempfile.TemporaryDirectory() as work:
        make_jpegs(os.path.join(work, "jpegs"))
        for round_ in range(args.rounds):
            for name, tree in (trees.items() if round_ % 2 == 0 else reversed(trees.items())):
                rate, memory = step_and_memory(tree, work)
                loader = float(python(tree, LOADER, os.path.join(work, "jpegs"), cwd=work).split()[-1])
                figures[name]["step img/s"].append(rate)
                figures[name]["peak MiB"].append(memory)
                figures[name]["loader img/s"].append(loader)
                figures[name]["resume s"].append(resume(tree, work))
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in figures[name].items()),
                      flush=True)
    print(f"\n| figure (median of {args.rounds}) | this ({ROOT}) | other ({trees['other']}) | ratio |\n|---|---:|---:|---:|")
    for key in figures["this"]:
        a, b = statistics.median(figures["this"][key]), statistics.median(figures["other"][key])
        print(f"| {key} | {a:.1f} | {b:.1f} | {a / b:.3f} |")


if __name__ == "__main__":
    main()
