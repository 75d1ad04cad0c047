"""The training loop's overhead: train.py on --data synthetic against the bare model step of
bench_model.py (forward, label-smoothed loss, backward, the recipe's RMSprop step), same arch,
size, batch, memory format and precision.

    python benchmarks/bench_loop.py                               # b0, 224 px, batch 32, CPU
    python benchmarks/bench_loop.py --device cuda --amp bf16 --batch-size 256 --steps 100 --workers 12

The loop runs two epochs of --steps steps and logs every --steps/2 steps; its figure is the rate
of the last logged interval (steady state: everything train.py does per step, loading, the
hand-off to the device, the logging sync, but not the start of an epoch's loader). The model's is
the mean of as many steps of bench_model.py's Bench, after as many warm-up steps as the loop had,
in a process of its own. They alternate for --rounds rounds; the table gives the medians and the
overhead 1 - loop / model.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

MODEL_STEP = """
import json, sys, time
sys.path.insert(0, {here!r})
import bench_model
args = bench_model.argparse.Namespace(arch={arch!r}, batch_size={batch}, image_size={size}, device={device!r},
                                      amp={amp!r}, channels_last=True, compile={compile})
bench = bench_model.Bench({name!r}, args)
for _ in range({warmup}):  # as many steps as the loop had before its timed interval
    bench.train_step()
times = [bench_model.timed(bench, bench.train_step) for _ in range({timed})]
print(json.dumps({{"images_per_sec": {batch} * len(times) / sum(times)}}))
"""


def run(cmd):
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result.stdout


def loop_rate(args, folder):
    lean = "--lean-activations" if args.lean_activations else "--no-lean-activations"
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--data", "synthetic", "--arch", args.arch,
           "--image-size", str(args.image_size), "--batch-size", str(args.batch_size), "--epochs", "2",
           "--warmup-epochs", "1", "--steps-per-epoch", str(args.steps), "--eval-every", "0",
           "--workers", str(args.workers), "--channels-last", "--amp", args.amp, "--output-dir", folder,
           "--log-every", str(args.steps // 2), lean] + (["--compile"] if args.compile else [])
    out = run(cmd)
    rates = re.findall(r" ([0-9.]+) img/s epoch eta", out)  # one line per logged interval
    return float(rates[-1])


def model_rate(args):
    timed = args.steps - args.steps // 2
    code = MODEL_STEP.format(here=HERE, name="ours-lean" if args.lean_activations else "ours-plain", arch=args.arch,
                             batch=args.batch_size, size=args.image_size, device=args.device, amp=args.amp,
                             compile=args.compile, warmup=2 * args.steps - timed, timed=timed)
    out = run([sys.executable, "-c", code])
    return json.loads(out.strip().splitlines()[-1])["images_per_sec"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="b0")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu", help="the loop takes CUDA when it sees it; match it here")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--lean-activations", action=argparse.BooleanOptionalAction, default=None,
                        help="the model variant of both (default: as train.py, on for the CPU, off for CUDA)")
    parser.add_argument("--steps", type=int, default=10, help="steps per epoch of the loop (even)")
    parser.add_argument("--workers", type=int, default=1, help="loader workers of the loop")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default="bench_loop.json")
    args = parser.parse_args()
    if args.lean_activations is None:
        args.lean_activations = args.device == "cpu"
    loops, models = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            loops.append(loop_rate(args, os.path.join(tmp, f"run{i}")))
            models.append(model_rate(args))
    loop, model = statistics.median(loops), statistics.median(models)
    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {args.device}, amp {args.amp}, channels_last"
          f"{', compiled' if args.compile else ''}{', lean activations' if args.lean_activations else ''}; "
          f"{args.steps} steps, {args.workers} loader worker(s), "
          f"median of {args.rounds} rounds")
    print("| measured | images/s | rounds |")
    print("|---|---:|---|")
    print(f"| bare model step (bench_model.py) | {model:.1f} | {', '.join(f'{m:.1f}' for m in models)} |")
    print(f"| train.py --data synthetic | {loop:.1f} | {', '.join(f'{m:.1f}' for m in loops)} |")
    print(f"| **loop overhead** | **{100 * (1 - loop / model):.1f} %** | |")
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "loop": loops, "model": models, "overhead": 1 - loop / model}, f, indent=2)


if __name__ == "__main__":
    main()
