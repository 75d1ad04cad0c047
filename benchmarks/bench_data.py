"""Images per second of one loader worker (one core): decode + train transform, decode + val
transform, this repo's pipeline against torchvision's ImageFolder with the textbook transforms
(RandomResizedCrop / Resize + CenterCrop, flip, ToTensor, Normalize), on the same files. This
repo's pipeline runs with each decoder: libjpeg-turbo (transforms.decode_rgb, the default) and PIL; and
the worker's share of `--decode gpu` (read the bytes, parse the header, draw the crop) is timed too,
and each `--augment` (torchvision's ops after the crop, in the worker), and the training process's
own batch augmentation (`--random-erase`, `--mixup`/`--cutmix`: per image of a batch, on the CPU).

    python benchmarks/bench_data.py                    # writes 256 photo-like ImageNet-sized JPEGs
    python benchmarks/bench_data.py --data /imagenet/val --images 2000

The same images are also read from a pack of them (`python prepare.py pack`: one positioned read per
image, see shards.py), and the files each pipeline opens per 1,000 images are counted.

What a worker does is timed whole: __getitem__ for every image, then the collation of batches (default_collate; gpu_decode.collate for --decode gpu)
(float32 batches for the textbook pipeline, uint8 or encoded ones for this one). Pipelines alternate A/B over
several rounds in one process with one thread; the table shows the median round.
"""
import argparse
import builtins
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder as TorchvisionImageFolder

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import gpu_decode  # noqa: E402
import prepare  # noqa: E402
import shards  # noqa: E402
import transforms  # noqa: E402


def photo_like(seed, width=500, height=375):
    """Smooth gradients, hard-edged shaded objects, fine texture and sensor noise: compresses to
    40-120 KB at JPEG quality 90, like ImageNet's photos (which average about 110 KB)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    for c in range(3):
        a, b, d = g.uniform(-0.4, 0.4, 3)
        img[..., c] = 128 + a * (xx - width / 2) + b * (yy - height / 2) + 40 * d
    for _ in range(g.integers(4, 9)):
        cx, cy, r = g.uniform(0, width), g.uniform(0, height), g.uniform(20, 120)
        if g.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * g.uniform(0.3, 1))
        shade = 1 + 0.3 * np.sin(xx / g.uniform(5, 30)) * np.cos(yy / g.uniform(5, 30))
        img[mask] = (g.uniform(0, 255, 3) * shade[..., None])[mask]
    img += 12 * g.uniform(0, 1) * np.sin(xx / g.uniform(1.5, 4) + g.uniform(0, 6))[..., None]
    img += g.normal(0, g.uniform(5, 30), img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_images(folder, count, classes=8):
    sizes = []
    for i in range(count):
        os.makedirs(os.path.join(folder, f"c{i % classes}"), exist_ok=True)
        buf = io.BytesIO()
        photo_like(i).save(buf, "JPEG", quality=90)
        with open(os.path.join(folder, f"c{i % classes}", f"img{i}.JPEG"), "wb") as f:
            f.write(buf.getvalue())
        sizes.append(len(buf.getvalue()))
    return sizes


class Ours(torch.utils.data.Dataset):
    """This repo's ImageFolder (or, with `pack`, that pack's train split) and
    transform, addressed like TrainSampler does: (index, epoch); `images` of its samples at most,
    in a shuffled order (random access, as in training)."""

    def __init__(self, root, transform, images, pil_decode=False, decode="cpu", pack=None):
        self.inner = data.open_split(pack, "train", transform, decode=decode, index=shards.read_index(pack)) if pack \
            else data.ImageFolder(root, transform, decode=decode)
        self.pil_decode, self.decode = pil_decode, decode
        self.indices = list(range(len(self.inner)))
        random.Random(0).shuffle(self.indices)
        del self.indices[images:]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        index = self.indices[i]
        if not self.pil_decode:
            return self.inner[(index, 0)]
        path, label = self.inner.samples[index]
        return self.inner.transform(transforms.load_rgb(path), transforms.sample_rng(0, 0, index)), label


def pack_images(root, images, folder, shard_size):
    """Pack the `images` files of `root` that Ours reads as the train split of a pack in `folder`
    (through links in folder/source/train), for the rows read from shards."""
    chosen = Ours(root, None, images)
    for i in chosen.indices:
        path = chosen.inner.samples[i][0]
        link = os.path.join(folder, "source", "train", os.path.relpath(path, root))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.abspath(path), link)
    listed = {"train": data.ImageFolder(os.path.join(folder, "source", "train"), None)}
    shards.pack(os.path.join(folder, "source"), os.path.join(folder, "pack"), listed, shard_size)
    return os.path.join(folder, "pack")


def opens_per_1000(dataset, batch_size):
    """Files opened (open() and os.open()) per 1,000 images in one worker_pass of `dataset`, as a
    fresh process makes it (a pack's shards not yet open)."""
    if getattr(getattr(dataset, "inner", None), "pack", None) is not None:
        dataset.inner.pack.close()
    count, builtin_open, os_open = [0], builtins.open, os.open

    def counted(opener):
        def wrapped(*args, **kwargs):
            count[0] += 1
            return opener(*args, **kwargs)
        return wrapped
    builtins.open, os.open = counted(builtin_open), counted(os_open)
    try:
        worker_pass(dataset, batch_size)
    finally:
        builtins.open, os.open = builtin_open, os_open
    return 1000 * count[0] / len(dataset)


def worker_pass(dataset, batch_size):
    """What one loader worker does for the whole dataset: items, then collated batches."""
    collate = gpu_decode.collate if data.decode_mode(dataset) == "gpu" else torch.utils.data.default_collate
    start = time.perf_counter()
    for first in range(0, len(dataset), batch_size):
        collate([dataset[i] for i in range(first, min(first + batch_size, len(dataset)))])
    return len(dataset) / (time.perf_counter() - start)


def batch_pass(size, batch_size, options, batches=8):
    """Images per second of transforms.augment_batch on normalised float CPU batches (the training
    process's share, where it runs on the CPU; on a GPU only the copy of the noise is added)."""
    images, labels = torch.randn(batch_size, 3, size, size), torch.arange(batch_size) % 10
    start = time.perf_counter()
    for step in range(batches):
        transforms.augment_batch(images, labels, 10, transforms.batch_seed(0, step, 0, 0), **options)  # in place
    return batches * batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", help="a folder of class folders of images (default: generate JPEGs)")
    parser.add_argument("--images", type=int, default=256, help="images to generate or to use")
    parser.add_argument("--size", type=int, default=224, help="crop size")
    parser.add_argument("--val-resize", type=int, default=256, help="eval resize (short side)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds; the median counts")
    parser.add_argument("--augments", nargs="*", default=["autoaugment", "randaugment", "trivialaugment", "augmix"],
                        choices=transforms.AUGMENTS[1:], help="--augment rows to time")
    parser.add_argument("--shard-size", type=prepare.parse_size, default=10 ** 9,
                        help="shard size of the rows read from a pack (python prepare.py pack --shard-size)")
    parser.add_argument("--json", default="bench_data.json", help="where to write the results")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as packed:
        root = args.data
        note = f"{root}"
        if root is None:
            root = tmp
            sizes = write_images(tmp, args.images)
            note = (f"{len(sizes)} generated 500x375 JPEGs, {min(sizes) // 1024}-{max(sizes) // 1024} KB "
                    f"(mean {sum(sizes) // len(sizes) // 1024} KB)")
        normalize = T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)
        bicubic = T.InterpolationMode.BICUBIC
        textbook_train = T.Compose([T.RandomResizedCrop(args.size, interpolation=bicubic), T.RandomHorizontalFlip(),
                                    T.ToTensor(), normalize])
        textbook_val = T.Compose([T.Resize(args.val_resize, interpolation=bicubic), T.CenterCrop(args.size),
                                  T.ToTensor(), normalize])
        pack = pack_images(root, args.images, packed, args.shard_size)
        n = args.images
        pipelines = {
            "train: torchvision ImageFolder + textbook": TorchvisionImageFolder(root, textbook_train),
            "train: data.py": Ours(root, transforms.TrainTransform(args.size), n),
            "train: data.py, from shards (data.py pack)": Ours(root, transforms.TrainTransform(args.size), n, pack=pack),
            "train: data.py, PIL decode": Ours(root, transforms.TrainTransform(args.size), n, pil_decode=True),
            "train: data.py --decode gpu, worker's share": Ours(root, gpu_decode.EncodedTrainTransform(args.size), n,
                                                                decode="gpu"),
            **{f"train: data.py --augment {name}{' (m9, mstd 0.5)' if name == 'randaugment' else ''}":
               Ours(root, transforms.TrainTransform(args.size, augment=name, magnitude_std=0.5), n)
               for name in args.augments},
            "val: torchvision ImageFolder + textbook": TorchvisionImageFolder(root, textbook_val),
            "val: data.py": Ours(root, transforms.ValTransform(args.size, args.val_resize), n),
            "val: data.py, from shards (data.py pack)": Ours(root, transforms.ValTransform(args.size, args.val_resize), n,
                                                             pack=pack),
            "val: data.py, PIL decode": Ours(root, transforms.ValTransform(args.size, args.val_resize), n,
                                             pil_decode=True),
        }
        for dataset in pipelines.values():  # torchvision's: keep the --images that Ours reads, in its order
            if hasattr(dataset, "samples"):
                random.Random(0).shuffle(dataset.samples)
                del dataset.samples[args.images:]
        batch_rows = {"batch: --random-erase 0.25 (training process)": {"erase": 0.25},
                      "batch: --mixup 0.2 --cutmix 1.0 (training process)": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
        rates = {name: [] for name in [*pipelines, *batch_rows]}
        for _ in range(args.rounds):
            for name, dataset in pipelines.items():  # A/B/A/B: drifts in machine speed hit both
                rates[name].append(worker_pass(dataset, args.batch_size))
            for name, options in batch_rows.items():
                rates[name].append(batch_pass(args.size, args.batch_size, options))
        opens = {name: opens_per_1000(pipelines[name], args.batch_size) for name in
                 ("train: torchvision ImageFolder + textbook", "train: data.py", "train: data.py, from shards (data.py pack)")}
        shard_count = len(shards.ShardReader(pack, "train").paths)
    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = {"train": median["train: data.py"] / median["train: torchvision ImageFolder + textbook"],
             "val": median["val: data.py"] / median["val: torchvision ImageFolder + textbook"]}
    print(f"data: {note}; {args.size}px crops, val resize {args.val_resize}, batches of {args.batch_size}, "
          f"1 thread, median of {args.rounds} rounds, JPEG decoder {transforms.JPEG_DECODER}")
    print("| pipeline | images/s per worker | range over rounds |")
    print("|---|---:|---:|")
    for name, value in median.items():
        print(f"| {name} | {value:.1f} | {min(rates[name]):.1f}-{max(rates[name]):.1f} |")
    print(f"| **ratio, train** | **{ratio['train']:.2f}x** | |")
    print(f"| **ratio, val** | **{ratio['val']:.2f}x** | |")
    for split in ("train", "val"):  # the same images, round by round: machine drift cancels
        paired = [a / b for a, b in zip(rates[f"{split}: data.py, from shards (data.py pack)"], rates[f"{split}: data.py"])]
        ratio[f"shards/folders, {split}"] = statistics.median(paired)
        print(f"| **from shards / from folders, {split}** (per round) | **{ratio[f'shards/folders, {split}']:.2f}x** | "
              f"{min(paired):.2f}-{max(paired):.2f}x |")
    print(f"\nfiles opened per 1,000 images, one pass over the {args.images} images in a shuffled order "
          f"(the pack: {shard_count} shard(s) of at most {args.shard_size:,} bytes; each process opens a shard once):")
    print("| pipeline | opens per 1,000 images |")
    print("|---|---:|")
    for name, value in opens.items():
        print(f"| {name} | {value:.1f} |")
    with open(args.json, "w") as f:
        json.dump({"note": note, "args": vars(args), "rates": rates, "median": median, "ratio": ratio,
                   "opens_per_1000": opens, "shards": shard_count}, f, indent=2)


if __name__ == "__main__":
    main()
