"""The ImageNet loaders with their distributed samplers: exact across ranks, light per core, strict about bad files.

DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG, or a pack of them (shards.py); `--data demo` and `synthetic` need
no files. Workers decode, crop and resize (transforms.py); normalisation happens once, on the device (DeviceLoader)."""
import atexit
import contextlib
import ctypes
import json
import math
import multiprocessing
import os
import re
import signal
import sys

import numpy as np
import torch
from PIL import Image

import gpu_decode
import shards
import utils
from transforms import TrainTransform, ValTransform, decode_rgb, sample_rng
from utils import DataError

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
DEMO_SIZES = {"train": 2560, "val": 500}
SYNTHETIC_SIZES = {"train": 1_281_167, "val": 50_000}  # ImageNet-1k, so epochs last as long
BUILT_IN_DATA = ("demo", "synthetic")  # --data names that are not folders


def sample_key(item):
    """A sampler's item (index, (index, epoch) or (index, epoch, copy)) -> (index, epoch, copy)."""
    if not isinstance(item, tuple):
        return item, 0, 0
    return (*item, 0) if len(item) == 2 else item


def need(path, what, kind="folder", hint=""):
    """DataError naming `path` as `what` (and the `hint`) unless it is a folder, or for kind "file" a regular file."""
    if not (os.path.isdir if kind == "folder" else os.path.isfile)(path):
        problem = ("does not exist" if not os.path.exists(path) else "is a file, not a folder" if kind == "folder"
                   else "is a folder, not a file" if os.path.isdir(path) else "is not a regular file")
        raise DataError(f"{what} {path} {problem}" + (f" ({hint})" if hint else ""))


# Datasets: items are an `index`, or what TrainSampler yields (sample_key)
def is_image_name(name):
    """An image extension, any case, and not hidden: dotfiles are metadata (macOS's ._x.JPEG)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def skipped_note(*datasets, show=5):
    """The line to print about what these datasets' class folders hold besides images, or None."""
    skipped = sorted(path for d in datasets for path in getattr(d, "skipped_files", ()))
    if not skipped:
        return None
    kinds = "files and folders" if any(path.endswith(os.sep) for path in skipped) else "files"
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    return f"skipped {len(skipped)} {kinds} that are not images: {', '.join(skipped[:show])}{more}"


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>, flat class folders as torchvision's ImageFolder; or with `pack` (a shards.ShardReader of
    PACK/<split>) the folders it was packed from. decode="gpu": `transform` is an EncodedTrainTransform."""

    def __init__(self, root, transform, seed=0, decode="cpu", pack=None):
        self.root, self.transform, self.seed, self.decode, self.pack = root, transform, seed, decode, pack
        self.read_retries = multiprocessing.Value("q", 0)  # inherited by the workers: one count for all
        if pack is not None:
            self.classes, self.skipped_files = pack.classes, pack.skipped_files
            self.samples = list(zip(pack.names, pack.labels))
            return
        need(root, "data folder", hint="expected DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG; "
                                       "--data demo runs without ImageNet")
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        if not self.classes:
            raise DataError(f"{root} has no class folders: expected {root}/<class>/<image> "
                            f"(ImageNet val must be sorted into class folders, as for torchvision's ImageFolder)")
        self.samples, self.skipped_files = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            entries = list(os.scandir(folder))
            images = {e.path for e in entries if e.is_file() and is_image_name(e.name)}
            others = sorted(e.path + os.sep if e.is_dir() else e.path for e in entries if e.path not in images)
            if not images:
                more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                held = f", only {', '.join(others[:3])}{more}" if others else ""
                raise DataError(f"class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)}){held}; "
                                f"remove it or add its images")
            self.samples += [(path, label) for path in sorted(images)]
            self.skipped_files += others

    def __len__(self):
        return len(self.samples)

    def read(self, index):
        """(the bytes of sample `index`, the name error messages give it)."""
        if self.pack is not None:
            return self.pack.read(index, self.read_retries)
        path = self.samples[index][0]
        return utils.read_file(path, self.read_retries), path

    def __getitem__(self, item):
        index, epoch, copy = sample_key(item)
        encoded, name = self.read(index)
        label = self.samples[index][1]
        rng = sample_rng(self.seed, epoch, index, copy)
        if self.decode == "gpu":  # the worker's half of GPU decoding: bytes, box and flip only
            return self.transform(name, encoded, rng, epoch), label
        return self.transform(decode_rgb(name, encoded), rng, epoch), label


# Other label orders and label sets for an ImageFolder's val set (train.py --evaluate).

def read_label_lines(path, expected):
    """[(line number, text)] of a text file's non-blank lines; none, or not text: DataError."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a text file: {expected}") from None
    if not lines:
        raise DataError(f"{path} is empty: {expected}")
    return lines


def apply_class_map(dataset, class_map):
    """Relabel an ImageFolder by a file of folder names, one a line in label order, or "imagenet-index"
    (folders named by their label, as ImageNet-V2's 0..999), instead of its sorted folder names."""
    if not isinstance(dataset, ImageFolder):
        raise DataError("--class-map relabels class folders; --data demo and synthetic have none")
    folders = dataset.classes
    if class_map == "imagenet-index":
        bad = [name for name in folders if not re.fullmatch(r"0|[1-9][0-9]*", name)]
        if bad:
            raise DataError(f"--class-map imagenet-index needs folders named by their label (0, 1, ..., as "
                            f"ImageNet-V2's), but {dataset.root} has {', '.join(bad[:3])}")
        names = [str(label) for label in range(max(int(name) for name in folders) + 1)]
    else:
        if not os.path.isfile(class_map):
            raise DataError(f"--class-map {class_map} does not exist (a file of class-folder names, or imagenet-index)")
        lines = read_label_lines(class_map, "expected one class-folder name per line, in label order")
        names = [text for _, text in lines]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise DataError(f"--class-map {class_map} names {', '.join(repeated[:3])} more than once: "
                            f"one line per label")
        unknown = [name for name in folders if name not in names]
        if unknown:
            raise DataError(f"--class-map {class_map} does not list the class folders {', '.join(unknown[:3])}"
                            f"{' ...' if len(unknown) > 3 else ''} of {dataset.root}")
    label = {name: i for i, name in enumerate(names)}
    dataset.samples = [(path, label[folders[old]]) for path, old in dataset.samples]
    dataset.classes = names


def read_real_labels(path, dataset, num_classes):
    """ReaL's real.json (Beyer et al. 2020: a label list per val image, in sorted file-name order)
    -> int64 (len(dataset), longest list), -1-padded, in the dataset's sample order."""
    try:
        with open(path) as f:
            real = json.load(f)
    except FileNotFoundError:
        raise DataError(f"--real-labels {path} does not exist") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"--real-labels {path} is not JSON ({e}): expected ReaL's real.json") from None
    if not isinstance(real, list) or not all(isinstance(labels, list) for labels in real):
        raise DataError(f"--real-labels {path} is not a list of label lists, as ReaL's real.json is")
    names = sorted(os.path.basename(p) for p, _ in dataset.samples)
    if len(real) != len(names):
        raise DataError(f"--real-labels {path} labels {len(real)} images but the val set has {len(names)}: "
                        f"ReaL needs the whole ImageNet val set (50,000 images)")
    if len(set(names)) != len(names):
        raise DataError("--real-labels pairs the val images by file name, and some names repeat in other class folders")
    for n, labels in enumerate(real):
        if not all(type(c) is int and 0 <= c < num_classes for c in labels):
            raise DataError(f"--real-labels {path} entry {n} ({names[n]}) is {str(labels)[:40]}: expected label "
                            f"indices in 0..{num_classes - 1}")
    if not any(real):
        raise DataError(f"--real-labels {path} gives no image a label")
    row_of = {name: n for n, name in enumerate(names)}
    table = torch.full((len(names), max(len(labels) for labels in real)), -1, dtype=torch.int64)
    for i, (sample, _) in enumerate(dataset.samples):
        labels = real[row_of[os.path.basename(sample)]]
        table[i, :len(labels)] = torch.tensor(labels, dtype=torch.int64)
    return table


class DemoShapes(torch.utils.data.Dataset):
    """Ten classes of shapes and gratings on noisy backgrounds, learnable from scratch in a few CPU minutes."""

    classes = ["disc", "ring", "square", "frame", "triangle", "cross", "horizontal", "vertical", "diagonal", "checker"]

    def __init__(self, split, transform, seed=0, native_size=64):
        self.split, self.transform, self.seed, self.native_size = split, transform, seed, native_size

    def __len__(self):
        return DEMO_SIZES[self.split]

    def render(self, index):
        g = np.random.default_rng([0 if self.split == "train" else 1, index])
        label, n = index % len(self.classes), self.native_size
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float32) / n
        background, foreground = g.uniform(0, 255, 3), g.uniform(0, 255, 3)
        while np.abs(background - foreground).sum() < 200:  # keep the shape visible
            foreground = g.uniform(0, 255, 3)
        # Shapes and stripes stay a few pixels wide even after a crop resized to 32 px.
        cx, cy, r = g.uniform(0.35, 0.65), g.uniform(0.35, 0.65), g.uniform(0.2, 0.35)
        dx, dy = xx - cx, yy - cy
        name = self.classes[label]
        period = g.uniform(0.15, 0.3)
        big, wave = np.maximum(np.abs(dx), np.abs(dy)), lambda t, p=period: np.sin(2 * np.pi * t / p) > 0
        mask = {"disc": lambda: dx ** 2 + dy ** 2 < r ** 2,
                "ring": lambda: np.abs(np.sqrt(dx ** 2 + dy ** 2) - r) < 0.35 * r,
                "square": lambda: big < r, "frame": lambda: np.abs(big - r) < 0.35 * r,
                "triangle": lambda: (dy < r) & (dy > 2 * np.abs(dx) - r),
                "cross": lambda: ((np.abs(dx) < 0.35 * r) | (np.abs(dy) < 0.35 * r)) & (big < r),
                "horizontal": lambda: wave(yy), "vertical": lambda: wave(xx),
                "diagonal": lambda: wave(xx + yy, 1.4 * period), "checker": lambda: wave(xx) ^ wave(yy)}[name]()
        img = np.where(mask[..., None], foreground, background)
        img += g.normal(0, 10, img.shape)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), label

    def __getitem__(self, item):
        index, epoch, copy = sample_key(item)
        img, label = self.render(index)
        return self.transform(img, sample_rng(self.seed, epoch, index, copy), epoch), label


class Synthetic(torch.utils.data.Dataset):
    """Random uint8 images for throughput, ImageNet's sizes and classes: a sample costs a copy."""

    def __init__(self, split, size, seed=0, pool=32):
        g = torch.Generator().manual_seed(seed + (split == "val"))
        self.images = torch.randint(0, 256, (pool, size, size, 3), dtype=torch.uint8, generator=g)
        self.length, self.classes = SYNTHETIC_SIZES[split], [str(c) for c in range(1000)]

    def __len__(self):
        return self.length

    def __getitem__(self, item):
        index = sample_key(item)[0]
        return self.images[index % len(self.images)], (index * 7919) % 1000


def build_datasets(data, image_size, val_resize, seed=0, min_crop_scale=0.08, autoaugment=False,
                   with_train=True, decode="cpu", val_interpolation="bicubic", train_size=None, augment=None,
                   magnitude=9.0, magnitude_std=0.0, resize_from=0, resize_epochs=0):
    """(train, val) for DATA (folders or a pack), 'demo' or 'synthetic'; decode="gpu": train yields EncodedSamples."""
    if data in BUILT_IN_DATA and os.path.isdir(data):  # refused, not shadowed: ./demo names the folder
        raise DataError(f"--data {data} names the built-in {data} set, but ./{data} is also a folder here: pass "
                        f"--data ./{data} to train on the folder, or run from another directory for the built-in set")
    train_size = train_size or image_size
    if data == "synthetic":
        return Synthetic("train", train_size, seed) if with_train else None, Synthetic("val", image_size, seed)
    resizing = {"resize_from": resize_from, "resize_epochs": resize_epochs}
    train_tf = gpu_decode.EncodedTrainTransform(train_size, min_crop_scale, **resizing) if decode == "gpu" else \
        TrainTransform(train_size, min_crop_scale, autoaugment, augment, magnitude, magnitude_std, **resizing)
    val_tf = ValTransform(image_size, val_resize, val_interpolation)
    if data == "demo":
        return DemoShapes("train", train_tf, seed) if with_train else None, DemoShapes("val", val_tf, seed)
    need(data, "data folder", hint="give the ImageNet root holding train/ and val/, or --data demo / --data synthetic")
    index = shards.read_index(data) if shards.looks_packed(data) else None
    val = open_split(data, "val", val_tf, seed, index=index)
    if not with_train:
        return None, val
    train = open_split(data, "train", train_tf, seed, decode, index)
    check_same_classes(data, train, val)
    return train, val


def open_split(data, split, transform, seed=0, decode="cpu", index=None):
    """DATA/<split>: from the pack DATA when its `index` is given, else from the class folders."""
    pack = shards.ShardReader(data, split, index) if index is not None else None
    return ImageFolder(os.path.join(data, split), transform, seed, decode, pack)


def check_same_classes(data, train, val):
    if train.classes != val.classes:
        only_train = ", ".join(sorted(set(train.classes) - set(val.classes))[:5]) or "-"
        only_val = ", ".join(sorted(set(val.classes) - set(train.classes))[:5]) or "-"
        raise DataError(f"{data}/train and {data}/val have different class folders (only in train: {only_train}; "
                        f"only in val: {only_val}); both need the same classes")


# Samplers: which indices each rank reads
class TrainSampler(torch.utils.data.Sampler):
    """DistributedSampler's semantics (one permutation from (seed, epoch), padded, every world-th to a rank); yields
    (index, epoch). `set_epoch(epoch, skip)` drops the first `skip` samples (those all ranks used before a resume), so a
    run resumed mid-epoch, on any number of ranks, continues exactly. `repeats` N > 1 (--repeated-aug, DeiT's
    RASampler): each index N times in a row, cut to the data set's length (size / N images an epoch, the copies on N
    ranks when N <= world); yields (index, epoch, copy), the copy entering the sample's generator."""

    def __init__(self, size, rank=0, world_size=1, seed=0, repeats=1):
        self.size, self.rank, self.world_size, self.seed, self.repeats = size, rank, world_size, seed, repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def order(self):
        """The epoch's global order (all ranks): indices, or (index, copy) pairs with repeats."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.repeats > 1:  # position p holds copy p % N of the (p // N)-th index: size items, not size * N
            order = [(order[p // self.repeats], p % self.repeats) for p in range(self.size)]
        return order

    def __iter__(self):
        order = self.order()[self.skip:]
        total = len(self) * self.world_size
        while len(order) < total:  # pad with the first indices again, as DistributedSampler does
            order += order[: total - len(order)]
        mine = order[self.rank:total:self.world_size]
        if self.repeats > 1:
            return ((index, self.epoch, copy) for index, copy in mine)
        return ((i, self.epoch) for i in mine)

    def __len__(self):
        return math.ceil((self.size - self.skip) / self.world_size)


class ShardSampler(torch.utils.data.Sampler):
    """Every world-th index from `rank`, no padding: an evaluation counts every image once."""

    def __init__(self, size, rank=0, world_size=1):
        self.indices = range(rank, size, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self):
        return len(self.indices)


# Loaders
def _worker_init(worker_id):
    # Preemption signals are the main process's business (train.py): SLURM signals every process of a
    # job step and Ctrl-C the whole process group, and a worker they killed would crash the run unsaved.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    # Linux: SIGKILL this worker when its process dies. Else a killed rank 0's workers live on for 5 s,
    # holding the run folder's lock, and a job restarted sooner (--max-restarts) finds it in use.
    with contextlib.suppress(OSError, AttributeError):  # no prctl (not Linux): the watchdog still ends them
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    torch.set_num_threads(1)


def _kill_workers_at_exit():
    # multiprocessing's exit handler sends daemon children SIGTERM, which the workers ignore, then joins
    # them: forever. This one, registered later, runs first (a collected loader stops its own workers).
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report the kill as a crash
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def default_workers():
    """Loader processes per training process: this process's cores shared among the node's training
    processes, less its own. A task srun bound to its --cpus-per-task cores has its share already."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" not in os.environ and cores <= int(os.environ.get("SLURM_CPUS_PER_TASK", "0")):
        sharing = 1
    return max(1, cores // sharing - 1)


def read_retries(*datasets):
    """File reads retried so far by these datasets' loaders (all their workers)."""
    return sum(d.read_retries.value for d in datasets if hasattr(d, "read_retries"))


def decode_mode(dataset):
    """Where a dataset's images are decoded: ImageFolder's `decode`, else "cpu" (pixels already)."""
    return getattr(dataset, "decode", "cpu")


def build_loader(dataset, sampler, batch_size, workers, train, pin_memory=False):
    if workers > 0:
        atexit.unregister(_kill_workers_at_exit)  # once, however many loaders
        atexit.register(_kill_workers_at_exit)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=train,  # equal, full batches on every rank in training
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None, worker_init_fn=_worker_init,
        collate_fn=gpu_decode.collate if decode_mode(dataset) == "gpu" else None,  # None: default_collate
        # Workers draw nothing from their seeds (see sample_rng); a private generator keeps the
        # loader from consuming the global torch RNG, whose state the checkpoints restore.
        generator=torch.Generator())


class DeviceLoader:
    """Moves batches to `device` and normalises them there: float (N, 3, H, W), channels_last when asked. decode "cpu":
    uint8 NHWC batches; on CUDA the next one is copied and normalised on a side stream while the current one computes
    (pinned memory). "gpu": EncodedBatches, decoded a batch ahead in a thread (gpu_decode.decode_ahead). The side stream
    lives as long as the loader: the caching allocator keeps each stream's memory apart. `mean`, `std` of 0-1 pixels."""

    def __init__(self, loader, device, channels_last=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, decode=None):
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self.decode = decode or decode_mode(getattr(loader, "dataset", None))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.decoder = gpu_decode.BatchDecoder(self.device, channels_last) if self.decode == "gpu" else None

    def __len__(self):
        return len(self.loader)

    def standardize(self, x):
        """float (N, 3, H, W) in 0..255 -> ImageNet-normalised, in place."""
        return x.sub_(self.mean).mul_(self.inv_std)

    def _to_device(self, batch):
        images, labels = batch
        labels = labels.to(self.device, non_blocking=True)
        if self.decode == "gpu":
            return self.standardize(self.decoder(images)), labels
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # NHWC bytes: channels_last already
        return self.standardize(x if self.channels_last else x.contiguous()), labels

    def __iter__(self):
        if self.decode == "gpu":
            return gpu_decode.decode_ahead(self.loader, self._to_device, self.stream, self.device)
        if self.stream is None:
            return (self._to_device(batch) for batch in self.loader)
        return self._copy_ahead()

    def _copy_ahead(self):
        upcoming = None
        for batch in self.loader:
            with torch.cuda.stream(self.stream):
                ready = self._to_device(batch)
            if upcoming is not None:
                yield upcoming
            compute = torch.cuda.current_stream(self.device)  # waits for the side stream (the host does not)
            compute.wait_stream(self.stream)
            for t in ready:
                t.record_stream(compute)  # and owns its tensors
            upcoming = ready
        if upcoming is not None:
            yield upcoming


if __name__ == "__main__":
    print("error: the data commands are python prepare.py check|sort-val|pack ...", file=sys.stderr)
    sys.exit(2)
