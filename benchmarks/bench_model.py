"""One training step and one inference step of this repo's EfficientNet against torchvision's
(and timm's, when installed): images/s and memory, same arch, batch, resolution, memory format,
precision and optimizer, on the same random batch.

    python benchmarks/bench_model.py                                   # b0, 224 px, batch 32, CPU
    python benchmarks/bench_model.py --device cuda --amp bf16 --batch-size 256 --compile

Speed: the models alternate (A, B, A, B, ...) for --rounds rounds of --steps steps in one process
after warm-up; the table gives the median step. Memory of a training step: on CUDA the peak of
torch.cuda.max_memory_allocated above what the model, optimizer and batch hold; on the CPU each
model runs in a child process of its own and reports its peak resident memory (VmHWM) above the
resident memory it had before its first step. "saved for backward" is the exact size of the
tensors autograd keeps between forward and backward (the activation memory).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import efficientnet  # noqa: E402

try:
    import timm
except ImportError:
    timm = None


def build(name, arch):
    if name == "ours":
        return efficientnet.create_model(arch)
    if name == "ours-lean":
        return efficientnet.create_model(arch, lean_activations=True)
    if name == "ours-plain":
        return efficientnet.create_model(arch, lean_activations=False)
    if name == "ours+ckpt":
        model = efficientnet.create_model(arch)
        model.set_grad_checkpointing(True)
        return model
    if name == "torchvision":
        return getattr(torchvision.models, f"efficientnet_{arch}")()
    if name == "timm":
        return timm.create_model(f"efficientnet_{arch}")
    raise ValueError(name)


class Bench:
    """A model with its optimizer and a fixed batch; `train_step()` and `infer_step()`."""

    def __init__(self, name, args):
        torch.manual_seed(0)
        self.device = torch.device(args.device)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        self.model = build(name, args.arch).to(self.device, memory_format=fmt)
        self.amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
        self.optimizer = torch.optim.RMSprop(self.model.parameters(), lr=1e-4, alpha=0.9, eps=0.01, momentum=0.9,
                                             weight_decay=1e-5)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)
        g = torch.Generator().manual_seed(1)
        size = args.image_size
        # Random pixels normalised as train.py does (float32 randn differs: denormals, other range).
        pixels = torch.randint(0, 256, (args.batch_size, 3, size, size), generator=g).float()
        mean, std = torch.tensor(data.IMAGENET_MEAN) * 255, torch.tensor(data.IMAGENET_STD) * 255
        self.x = ((pixels - mean.view(3, 1, 1)) / std.view(3, 1, 1)).to(self.device, memory_format=fmt)
        self.y = torch.randint(0, 1000, (args.batch_size,), generator=g).to(self.device)
        self.forward = torch.compile(self.model) if args.compile else self.model

    def loss(self):
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            logits = self.forward(self.x)
        return F.cross_entropy(logits.float(), self.y, label_smoothing=0.1)

    def train_step(self):
        self.model.train()
        self.scaler.scale(self.loss()).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step(self):
        self.model.eval()
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            self.forward(self.x)

    def saved_bytes(self):
        """Bytes of the distinct storages autograd saves for backward in one training forward."""
        self.model.train()
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss()
        params = {p.untyped_storage().data_ptr() for p in self.model.parameters()}
        inputs = {self.x.untyped_storage().data_ptr(), self.y.untyped_storage().data_ptr()}
        del loss
        return sum(n for ptr, n in storages.items() if ptr not in params and ptr not in inputs)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(bench, step):
    bench.sync()
    start = time.perf_counter()
    step()
    bench.sync()
    return time.perf_counter() - start


def status_mb(field):
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in MB (Linux)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def child_memory(args):
    """Runs in a child process: one model's training-step memory in MB above its baseline."""
    bench = Bench(args.child, args)
    if bench.device.type == "cuda":
        bench.train_step()  # optimizer state exists from here on, like in a running job
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(2):
            bench.train_step()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        # ru_maxrss would not do: a child keeps the parent's high-water mark across fork + exec.
        base = status_mb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        for _ in range(3):
            bench.train_step()
        peak = status_mb("VmHWM") - base
    print(json.dumps({"peak_mb": peak, "saved_mb": bench.saved_bytes() / 2 ** 20}))


def memory(name, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name] + [
        a for a in sys.argv[1:] if a not in ("--child",)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--arch", default="b0")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--models", default="ours,torchvision" + (",timm" if timm else ""),
                        help="comma-separated: ours (the default: lean on the CPU only), ours-lean, ours-plain "
                             "(lean_activations True / False), ours+ckpt, torchvision, timm")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=8, help="untimed steps per model first (CPU allocators settle slowly)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--json", default="bench_model.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.backends.cudnn.benchmark = True  # as train.py
    if args.child:
        return child_memory(args)

    names = args.models.split(",")
    benches = {name: Bench(name, args) for name in names}
    times = {(name, kind): [] for name in names for kind in ("train", "infer")}
    for bench in benches.values():
        for _ in range(args.warmup):
            bench.train_step()
            bench.infer_step()
    for _ in range(args.rounds):
        for kind in ("train", "infer"):
            for name, bench in benches.items():  # alternate: slow drifts of the machine hit all
                step = bench.train_step if kind == "train" else bench.infer_step
                times[name, kind] += [timed(bench, step) for _ in range(args.steps)]
    del benches
    rate = {f"{name} {kind}": args.batch_size / statistics.median(t) for (name, kind), t in times.items()}
    mem = {} if args.no_memory else {name: memory(name, args) for name in names}

    print(f"{args.arch}, {args.image_size} px, batch {args.batch_size}, {args.device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if args.device.startswith('cuda') else ''}, "
          f"amp {args.amp}, {'channels_last' if args.channels_last else 'NCHW'}"
          f"{', compiled' if args.compile else ''}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"median of {args.rounds * args.steps} steps")
    ref = "torchvision" if "torchvision" in names else names[0]
    print("| model | train img/s | vs " + ref + " | infer img/s | vs " + ref +
          " | train peak MB | vs " + ref + " | saved for backward MB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in names:
        row = f"| {name} | {rate[name + ' train']:.1f} | {rate[name + ' train'] / rate[ref + ' train']:.2f}x | " \
              f"{rate[name + ' infer']:.1f} | {rate[name + ' infer'] / rate[ref + ' infer']:.2f}x |"
        if mem:
            row += f" {mem[name]['peak_mb']:.0f} | {mem[name]['peak_mb'] / mem[ref]['peak_mb']:.2f}x | " \
                   f"{mem[name]['saved_mb']:.0f} |"
        print(row)
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "images_per_sec": rate, "memory": mem,
                   "step_seconds": {f"{n} {k}": t for (n, k), t in times.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
