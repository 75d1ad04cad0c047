"""Throughput of `predict.py`: files read, decoded and resized by the loader workers, the model's
top-5 per image, written as CSV. Generated 500x375 JPEGs (ImageNet's typical size) and random
1000-class weights (nothing is downloaded); each round is a predict.py process of its own, and its
rate is the one predict.py prints (from the first batch asked for to the last row written).

    python benchmarks/bench_predict.py                      # b0, 224 px, 512 images, 3 rounds
    python benchmarks/bench_predict.py --arch b3 --images 256 --rounds 5 -- --batch-size 64
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from efficientnet import create_model  # noqa: E402


def make_images(folder, count, seed=0):
    """`count` smooth, noisy 500x375 RGB JPEGs (they compress like photos), 10 per sub-folder."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(count):
        phase = g.uniform(0, 6.3, 3)
        img = np.stack([xx * 0.4 + 40 * np.sin(yy / 9 + phase[0]), yy * 0.5 + 40 * np.cos(xx / 13 + phase[1]),
                        (xx + yy) * 0.2 + 40 * np.sin((xx - yy) / 17 + phase[2])], -1)
        img = np.clip(img + g.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        sub = os.path.join(folder, f"{i // 10:04d}")
        os.makedirs(sub, exist_ok=True)
        Image.fromarray(img).save(os.path.join(sub, f"{i:06d}.jpg"), quality=90)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="b0")
    p.add_argument("--images", type=int, default=512, help="files predicted per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("extra", nargs="*", help="flags for predict.py after --, e.g. --batch-size 64 --workers 2")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        make_images(os.path.join(tmp, "images"), args.images)
        torch.manual_seed(0)
        torch.save(create_model(args.arch, 1000).state_dict(), os.path.join(tmp, "weights.pth"))
        command = [sys.executable, os.path.join(ROOT, "predict.py"), os.path.join(tmp, "images"),
                   "--arch", args.arch, "--weights", os.path.join(tmp, "weights.pth"),
                   "--output", os.path.join(tmp, "predictions.csv"), *args.extra]
        rates = []
        for round_ in range(1, args.rounds + 1):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(result.stderr.strip())
            summary = result.stdout.strip().splitlines()[-1]
            rates.append(float(re.search(r"\(([0-9.]+) img/s\)", summary)[1]))
            print(f"round {round_}: {summary}")
    print(f"{args.arch}, {args.images} files, {os.cpu_count()} cores, torch {torch.__version__}: "
          f"{min(rates):.1f} to {max(rates):.1f} img/s (median {sorted(rates)[len(rates) // 2]:.1f}) over "
          f"{len(rates)} rounds")


if __name__ == "__main__":
    main()
