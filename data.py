"""ImageNet loaders for torchrun: exact across ranks, light per core, strict about bad files.

Layout: DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG (torchvision ImageFolder semantics).
`--data demo` and `--data synthetic` stand in for DATA without any files (see build_datasets).

Workers only decode, crop and resize: samples leave them as uint8 (H, W, 3) tensors, which is
exactly channels_last memory for the batch. Training crops are resized by torch's uint8 kernel;
evaluation uses PIL, exactly as torchvision's published accuracies were measured. Float conversion and normalisation happen once, on the
training device (DeviceLoader). Augmentation randomness is a pure function of (seed, epoch, sample
index), so the data of a step never depends on worker count, rank count or where a run resumed.

    python data.py check DATA    # decode every file before a multi-day run; exit 1 on bad files
"""
import argparse
import atexit
import ctypes
import math
import multiprocessing
import os
import random
import signal
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
BICUBIC = Image.Resampling.BICUBIC
DEMO_CLASSES = ("disc", "ring", "square", "frame", "triangle", "cross",
                "horizontal", "vertical", "diagonal", "checker")
DEMO_SIZES = {"train": 2560, "val": 500}
SYNTHETIC_SIZES = {"train": 1_281_167, "val": 50_000}  # ImageNet-1k, so epochs last as long


class DataError(Exception):
    """A problem with the data itself (layout or file); the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Decoding and transforms (run in the loader workers)

def load_rgb(path):
    """Decode any image file to an RGB PIL image; a file that cannot be decoded raises DataError."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode == "RGB":
                return img
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            return img.convert("RGB")  # grayscale, CMYK (incl. Adobe's inverted JPEGs), RGBA: drop alpha
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e} (fix or remove it; "
                        f"`python data.py check DIR` lists every bad file)") from None


def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Inception crop (torchvision's RandomResizedCrop algorithm): area fraction uniform in `scale`,
    aspect ratio log-uniform in `ratio`, ten tries, then the central crop clamped to `ratio`.
    Returns a PIL box (left, top, right, bottom)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def to_uint8_hwc(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


def resized_crop(pixels, box, size):
    """Crop `box` (left, top, right, bottom) of uint8 (H, W, 3) `pixels` and resize it to
    (3, size, size) with antialiased bicubic interpolation: torch's uint8 kernel, twice as fast
    as PIL's resize and within one level of it inside the crop."""
    left, top, right, bottom = box
    crop = pixels[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # a channels_last view
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


class TrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip [+ AutoAugment], uint8 (H, W, 3) out.
    One resize of the crop region only; no float image is ever made."""

    def __init__(self, size, min_scale=0.08, autoaugment=False):
        self.size = size
        self.scale = (min_scale, 1.0)
        self.autoaugment = None
        if autoaugment:
            from torchvision.transforms import AutoAugment, AutoAugmentPolicy
            self.autoaugment = AutoAugment(AutoAugmentPolicy.IMAGENET)

    def __call__(self, img, rng):
        box = random_resized_crop_box(*img.size, rng, self.scale)
        x = resized_crop(to_uint8_hwc(img), box, self.size)
        if rng.random() < 0.5:
            x = x.flip(-1)
        if self.autoaugment is not None:
            # torchvision's AutoAugment draws from torch's global RNG: seed it from this sample's
            # generator inside fork_rng so that the caller's RNG stream is left as it was.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.getrandbits(63))
                x = self.autoaugment(x)
        return x.permute(1, 2, 0).contiguous()


class ValTransform:
    """Resize the short side to `resize` (bicubic), center-crop `size`: torchvision's Resize +
    CenterCrop to the pixel, uint8 (H, W, 3) out."""

    def __init__(self, size, resize):
        self.size, self.resize = size, resize

    def __call__(self, img, rng=None):
        w, h = img.size
        if w <= h:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        img = img.resize((new_w, new_h), BICUBIC)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return to_uint8_hwc(img.crop((left, top, left + self.size, top + self.size)))


def sample_rng(seed, epoch, index):
    """The generator of one sample's augmentation: a pure function of (seed, epoch, index)."""
    return random.Random(f"{seed}/{epoch}/{index}")


# ---------------------------------------------------------------------------------------------
# Datasets. Items are addressed by `index` or by `(index, epoch)` (what TrainSampler yields).

def find_classes(folder):
    if not os.path.isdir(folder):
        problem = "is a file, not a folder" if os.path.exists(folder) else "does not exist"
        raise DataError(f"data folder {folder} {problem} (expected DATA/train/<class>/*.JPEG "
                        f"and DATA/val/<class>/*.JPEG; --data demo runs without ImageNet)")
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    if not classes:
        raise DataError(f"{folder} has no class folders: expected {folder}/<class>/<image> "
                        f"(ImageNet val must be sorted into class folders, as for torchvision's ImageFolder)")
    return classes


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, root, transform, seed=0):
        self.root, self.transform, self.seed = root, transform, seed
        self.classes = find_classes(root)
        self.samples = []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files = sorted(entry.path for entry in os.scandir(folder)
                           if entry.is_file() and entry.name.lower().endswith(IMG_EXTENSIONS))
            if not files:
                raise DataError(f"class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)}); "
                                f"remove it or add its images")
            self.samples += [(path, label) for path in files]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        path, label = self.samples[index]
        return self.transform(load_rgb(path), sample_rng(self.seed, epoch, index)), label


class DemoShapes(torch.utils.data.Dataset):
    """Ten classes of shapes and gratings at random positions, scales and colours on noisy
    backgrounds: learnable from scratch in a few CPU minutes. Image i is a pure function of
    (split, i); the training transform then crops and flips it like an ImageNet photo."""

    classes = list(DEMO_CLASSES)

    def __init__(self, split, transform, seed=0, native_size=64):
        self.split, self.transform, self.seed, self.native_size = split, transform, seed, native_size
        self.length = DEMO_SIZES[split]

    def __len__(self):
        return self.length

    def render(self, index):
        g = np.random.default_rng([0 if self.split == "train" else 1, index])
        label = index % len(self.classes)
        n = self.native_size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        background, foreground = g.uniform(0, 255, 3), g.uniform(0, 255, 3)
        while np.abs(background - foreground).sum() < 200:  # keep the shape visible
            foreground = g.uniform(0, 255, 3)
        # Shapes and stripes stay a few pixels wide even after a crop resized to 32 px.
        cx, cy, r = g.uniform(0.35, 0.65), g.uniform(0.35, 0.65), g.uniform(0.2, 0.35)
        dx, dy = xx - cx, yy - cy
        name = self.classes[label]
        period = g.uniform(0.15, 0.3)
        if name == "disc":
            mask = dx ** 2 + dy ** 2 < r ** 2
        elif name == "ring":
            mask = np.abs(np.sqrt(dx ** 2 + dy ** 2) - r) < 0.35 * r
        elif name == "square":
            mask = np.maximum(np.abs(dx), np.abs(dy)) < r
        elif name == "frame":
            mask = np.abs(np.maximum(np.abs(dx), np.abs(dy)) - r) < 0.35 * r
        elif name == "triangle":
            mask = (dy < r) & (dy > 2 * np.abs(dx) - r)
        elif name == "cross":
            mask = ((np.abs(dx) < 0.35 * r) | (np.abs(dy) < 0.35 * r)) & (np.maximum(np.abs(dx), np.abs(dy)) < r)
        elif name == "horizontal":
            mask = np.sin(2 * np.pi * yy / period) > 0
        elif name == "vertical":
            mask = np.sin(2 * np.pi * xx / period) > 0
        elif name == "diagonal":
            mask = np.sin(2 * np.pi * (xx + yy) / (1.4 * period)) > 0
        else:  # checker
            mask = (np.sin(2 * np.pi * xx / period) > 0) ^ (np.sin(2 * np.pi * yy / period) > 0)
        img = np.where(mask[..., None], foreground, background)
        img += g.normal(0, 10, img.shape)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), label

    def __getitem__(self, item):
        index, epoch = item if isinstance(item, tuple) else (item, 0)
        img, label = self.render(index)
        return self.transform(img, sample_rng(self.seed, epoch, index)), label


class Synthetic(torch.utils.data.Dataset):
    """Random uint8 images without decoding, for throughput: ImageNet's sizes and 1000 classes.
    Samples come from a small pool generated once from the seed, so a sample costs a copy."""

    def __init__(self, split, size, seed=0, pool=32):
        g = torch.Generator().manual_seed(seed + (split == "val"))
        self.images = torch.randint(0, 256, (pool, size, size, 3), dtype=torch.uint8, generator=g)
        self.length = SYNTHETIC_SIZES[split]
        self.classes = [str(c) for c in range(1000)]

    def __len__(self):
        return self.length

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        return self.images[index % len(self.images)], (index * 7919) % 1000


def build_datasets(data, image_size, val_resize, seed=0, min_crop_scale=0.08, autoaugment=False,
                   with_train=True):
    """(train, val) datasets for DATA, 'demo' or 'synthetic'; train is None without `with_train`
    (evaluation only: DATA/train need not exist). Train and val must have the same classes."""
    if data == "synthetic":
        return Synthetic("train", image_size, seed) if with_train else None, Synthetic("val", image_size, seed)
    train_tf = TrainTransform(image_size, min_crop_scale, autoaugment)
    val_tf = ValTransform(image_size, val_resize)
    if data == "demo":
        return DemoShapes("train", train_tf, seed) if with_train else None, DemoShapes("val", val_tf, seed)
    if not os.path.isdir(data):
        problem = "is a file, not a folder" if os.path.exists(data) else "does not exist"
        raise DataError(f"data folder {data} {problem} (give the ImageNet root holding train/ "
                        f"and val/, or --data demo / --data synthetic)")
    val = ImageFolder(os.path.join(data, "val"), val_tf, seed)
    if not with_train:
        return None, val
    train = ImageFolder(os.path.join(data, "train"), train_tf, seed)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{data}/train and {data}/val have different class folders "
                        f"(only in train: {', '.join(only_train[:5]) or '-'}; only in val: "
                        f"{', '.join(only_val[:5]) or '-'}); both need the same classes")
    return train, val


# ---------------------------------------------------------------------------------------------
# Samplers: which indices each rank reads

class TrainSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics: a permutation from (seed, epoch) shared by all ranks, padded
    with its own first indices to a multiple of the world size, rank r taking every world-th index.
    Yields (index, epoch). `set_epoch(epoch, skip)` first drops the permutation's first `skip`
    samples, the ones all ranks together used in the steps already taken, so a run resumed
    mid-epoch, on this or on another number of ranks, continues with the very next samples."""

    def __init__(self, size, rank=0, world_size=1, seed=0):
        self.size, self.rank, self.world_size, self.seed = size, rank, world_size, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def indices(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()[self.skip:]
        total = len(self) * self.world_size
        while len(order) < total:  # pad with the first indices again, as DistributedSampler does
            order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        return ((i, self.epoch) for i in self.indices())

    def __len__(self):
        return math.ceil((self.size - self.skip) / self.world_size)


class ShardSampler(torch.utils.data.Sampler):
    """Every world-th index from `rank`, no padding: the shards cover each index exactly once, so a
    distributed evaluation counts every image once (shard lengths may differ by one)."""

    def __init__(self, size, rank=0, world_size=1):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self):
        return len(range(self.rank, self.size, self.world_size))


# ---------------------------------------------------------------------------------------------
# Loaders

def _worker_init(worker_id):
    # Preemption signals are the main process's business (train.py): SLURM signals every process
    # of a job step, and a worker killed by SIGTERM would crash the run before it can checkpoint.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _die_with_parent()
    torch.set_num_threads(1)


def _die_with_parent():
    """Linux: SIGKILL this worker as soon as its process dies. Otherwise the workers of a killed
    rank 0 live on for up to 5 s (PyTorch's watchdog interval), holding the run folder's lock that
    they inherited, and a job restarted sooner (torchrun --max-restarts) finds the folder in use."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl (not Linux): the watchdog still ends them
        pass


def _kill_workers_at_exit():
    # multiprocessing's own exit handler stops daemon children with SIGTERM, which the workers
    # ignore, and then joins them: it would wait forever. This handler is registered later, so it
    # runs first. (A loader that is garbage-collected shuts its workers down by itself.)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report the kill as a crash
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def build_loader(dataset, sampler, batch_size, workers, train, pin_memory=False):
    if workers > 0:
        atexit.unregister(_kill_workers_at_exit)  # once, however many loaders
        atexit.register(_kill_workers_at_exit)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=train,  # equal, full batches on every rank in training
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        # Workers draw nothing from their seeds (see sample_rng); a private generator keeps the
        # loader from consuming the global torch RNG, whose state the checkpoints restore.
        generator=torch.Generator())


class DeviceLoader:
    """Moves uint8 NHWC batches to `device` and normalises them there: float (N, 3, H, W) out,
    channels_last when asked. On CUDA the copy and normalisation of the next batch run on a side
    stream while the current batch computes (the host memory must be pinned for that)."""

    def __init__(self, loader, device, channels_last=False):
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255)

    def __len__(self):
        return len(self.loader)

    def normalize(self, images):
        """uint8 (N, H, W, 3) on the device -> normalised float32 (N, 3, H, W)."""
        x = images.permute(0, 3, 1, 2).float()  # NHWC bytes are already channels_last memory
        if not self.channels_last:
            x = x.contiguous()
        return x.sub_(self.mean).mul_(self.inv_std)

    def _to_device(self, batch):
        images, labels = batch
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        return self.normalize(images), labels

    def __iter__(self):
        if self.device.type != "cuda":
            yield from (self._to_device(batch) for batch in self.loader)
            return
        stream = torch.cuda.Stream(self.device)
        upcoming = None
        for batch in self.loader:
            with torch.cuda.stream(stream):
                ready = self._to_device(batch)
            if upcoming is not None:
                yield upcoming
            torch.cuda.current_stream(self.device).wait_stream(stream)
            for t in ready:  # tell the allocator the compute stream uses these now
                t.record_stream(torch.cuda.current_stream(self.device))
            upcoming = ready
        if upcoming is not None:
            yield upcoming


def mixup(images, labels, num_classes, lam):
    """Blend each sample with the batch's reverse order: lam * own + (1 - lam) * partner, for images
    and one-hot targets alike. Returns images and (N, num_classes) soft targets."""
    targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    images = images.mul(lam).add_(images.flip(0), alpha=1.0 - lam)
    targets = targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)
    return images, targets


# ---------------------------------------------------------------------------------------------
# python data.py check DATA

def _inspect(path):
    """(path, problem or None, odd format or None) for one file, decoded fully."""
    try:
        with Image.open(path) as img:
            fmt, mode = img.format, img.mode
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
    except Exception as e:  # every failure is a finding here, whatever its type
        return path, f"{type(e).__name__}: {e}", None
    ext = os.path.splitext(path)[1].lower()
    odd = []
    if mode != "RGB":
        odd.append(f"mode {mode}")
    if ext in (".jpg", ".jpeg") and fmt != "JPEG":
        odd.append(f"{fmt} file named {ext}")
    return path, None, ", ".join(odd) or None


def check(root, workers):
    from multiprocessing import Pool

    from tqdm import tqdm
    paths = sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                   if f.lower().endswith(IMG_EXTENSIONS))
    if not paths:
        raise DataError(f"no image files under {root}")
    bad, odd = [], []
    with Pool(workers) as pool:
        for path, problem, oddity in tqdm(pool.imap_unordered(_inspect, paths, chunksize=64),
                                          total=len(paths), desc="decoding", unit="img"):
            if problem:
                bad.append((path, problem))
            elif oddity:
                odd.append((path, oddity))
    for path, oddity in sorted(odd):
        print(f"odd format (loads as RGB): {path}: {oddity}")
    for path, problem in sorted(bad):
        print(f"UNDECODABLE: {path}: {problem}")
    print(f"checked {len(paths)} files: {len(bad)} undecodable, {len(odd)} odd formats")
    return 1 if bad else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Data tools. `check DATA` decodes every image "
                                     "file under DATA and lists the undecodable and odd ones.")
    parser.add_argument("command", choices=["check"])
    parser.add_argument("data", help="folder to scan (e.g. the ImageNet root)")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    args = parser.parse_args(argv)
    try:
        return check(args.data, max(1, args.workers))
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
