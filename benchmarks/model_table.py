"""Print the README's model table: parameters, resolution and multiply-adds of B0-B7.

    python benchmarks/model_table.py

GMACs are counted by torch.utils.flop_counter (convolutions and the classifier; 1 MAC = 2 FLOPs)
at each member's own resolution, one image; torchvision's docs report the same quantity as "GFLOPS".
"""
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from efficientnet import SCALING, create_model  # noqa: E402


def main():
    print("| member | params | resolution | GMACs | blocks | dropout |")
    print("|---|---:|---:|---:|---:|---:|")
    for arch, scaling in SCALING.items():
        model = create_model(arch).eval()
        size = scaling.resolution
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, 3, size, size))
        params = sum(p.numel() for p in model.parameters())
        print(f"| {arch} | {params:,} | {size} | {counter.get_total_flops() / 2e9:.3f} | "
              f"{len(model.blocks)} | {scaling.dropout} |")


if __name__ == "__main__":
    main()
