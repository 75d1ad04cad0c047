"""What `--save-every-steps` costs: the time of one checkpoint save (what train.py writes: model,
RMSprop state, EMA, 1000 classes; fsynced and renamed) against the time of one training step.
Saves and steps alternate in one process, so that both see the same machine load.

    python benchmarks/save_cost.py --folder /where/runs/go --arch b0 --batch-size 32 --image-size 224
    python benchmarks/save_cost.py --folder /where/runs/go --arch b7 --steps 0   # save only
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import utils  # noqa: E402
from efficientnet import create_model  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--folder", default=".", help="a folder on the file system the run's checkpoints go to")
    p.add_argument("--arch", default="b0")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=5, help="saves (and steps) measured")
    p.add_argument("--steps", type=int, default=1, help="training steps per round (0: time the saves only)")
    args = p.parse_args()

    torch.manual_seed(0)
    model = create_model(args.arch, 1000)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=0.01, momentum=0.9)
    ema = utils.EMA(model, 0.9999)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    labels = torch.randint(0, 1000, (args.batch_size,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(0)

    if args.steps == 0:  # the optimizer state must exist to be saved: one tiny step
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        step()  # warm-up, creates the optimizer state
    save_times, step_times = [], []
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        path = os.path.join(folder, "last.pt")
        for _ in range(args.rounds):
            start = time.perf_counter()
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "ema": ema.state_dict(),
                     "ranks": [{"rng": utils.rng_state()}]}
            utils.save_atomic(state, path)
            save_times.append(time.perf_counter() - start)
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                step_times.append(time.perf_counter() - start)
        size = os.path.getsize(path)
    save = statistics.median(save_times)
    print(f"{args.arch}: checkpoint {size / 2 ** 20:.0f} MB, save {save:.3f} s (median of {len(save_times)}, "
          f"min {min(save_times):.3f} s) to {os.path.abspath(args.folder)}")
    if step_times:
        step_time = statistics.median(step_times)
        print(f"step (batch {args.batch_size}, {args.image_size} px, {torch.get_num_threads()} threads): "
              f"{step_time:.3f} s (median of {len(step_times)}); one save = {save / step_time:.2f} steps")


if __name__ == "__main__":
    main()
