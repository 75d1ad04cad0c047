"""ImageNet loaders for torchrun: exact across ranks, light per core, strict about bad files.

Layout: DATA/train/<class>/*.JPEG and DATA/val/<class>/*.JPEG (torchvision ImageFolder semantics).
`--data demo` and `--data synthetic` stand in for DATA without any files (see build_datasets).

Workers only decode, crop and resize: samples leave them as uint8 (H, W, 3) tensors, which is
exactly channels_last memory for the batch. JPEGs are decoded by libjpeg-turbo through
torchvision.io / TorchCodec (the same pixels as PIL, faster), everything else by PIL. Training crops
are resized by torch's uint8 kernel; evaluation uses PIL, exactly as torchvision's published
accuracies were measured. Float conversion and normalisation happen once, on the training device
(DeviceLoader). With `decode="gpu"` the workers only read the bytes and draw the crop box and flip;
a thread of DeviceLoader's decodes each batch with one nvJPEG call and crops, resizes and flips on
the GPU, a batch ahead of the training step (the section "--decode gpu, both halves").
Augmentation randomness is a pure function of (seed, epoch, sample index), so the data of a step
never depends on worker count, rank count, decoder or where a run resumed.

    python data.py check DATA                          # decode every file before a multi-day run
    python data.py sort-val DATA/val --labels LOC_val_solution.csv   # val as downloaded -> class folders
    python data.py pack DATA PACK                      # tar shards + index for network file systems: --data PACK
"""
import argparse
import atexit
import contextlib
import concurrent.futures
import ctypes
import functools
import hashlib
import importlib.util
import io
import json
import math
import multiprocessing
import os
import queue
import random
import re
import signal
import sys
import tarfile
import threading
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import utils

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
BICUBIC = Image.Resampling.BICUBIC
DEMO_CLASSES = ("disc", "ring", "square", "frame", "triangle", "cross",
                "horizontal", "vertical", "diagonal", "checker")
DEMO_SIZES = {"train": 2560, "val": 500}
SYNTHETIC_SIZES = {"train": 1_281_167, "val": 50_000}  # ImageNet-1k, so epochs last as long
BUILT_IN_DATA = ("demo", "synthetic")  # --data names that are not folders


class DataError(Exception):
    """A problem with the data itself (layout or file); the message names it and the fix."""


# ---------------------------------------------------------------------------------------------
# Decoding and transforms (run in the loader workers)

READ_ATTEMPTS = 4  # a network file system's transient errors (EIO, ESTALE, timeouts) get 3 more tries
READ_BACKOFF_SECONDS = 0.05  # doubled after each failed try: 0.05 + 0.1 + 0.2 s at most


def read_retrying(read, what, fix, retries=None):
    """read()'s bytes. A read that raises OSError is tried again, after a short backoff, up to
    READ_ATTEMPTS times in all (each retry counted in `retries`, a multiprocessing.Value shared with
    the loader's workers: torch's DataLoader passes nothing else back from them); then DataError
    naming `what` and `fix`."""
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except OSError as e:
            if attempt + 1 == READ_ATTEMPTS:
                raise DataError(f"cannot read {what}: {e.strerror or e} ({READ_ATTEMPTS} attempts; {fix})") from None
            if retries is not None:
                with retries.get_lock():
                    retries.value += 1
            time.sleep(READ_BACKOFF_SECONDS * 2 ** attempt)


def read_file(path, retries=None):
    """The bytes of the file `path`, read with retries (read_retrying)."""
    def read():
        with open(path, "rb") as f:
            return f.read()
    return read_retrying(read, f"image {path}", "check the file system, or remove the file", retries)


def is_16_bit_gray(mode):
    """PIL's modes of one-channel images deeper than 8 bits: I;16 (16-bit PNG, TIFF), I;16B, I;16L,
    and I (32-bit integers: Pillow's mode for 16-bit PGM, 32-bit TIFF). Pillow's own
    conversion to RGB clips these at 255 (a 16-bit photo turns almost white)."""
    return mode == "I" or mode.startswith("I;16")


def to_8_bit(img):
    """A 16-bit grayscale PIL image -> mode L, each value v as v >> 8 (its high byte: what Pillow
    itself keeps of 16-bit RGB PNGs and TIFFs). Mode I values outside 0..65535 are clipped first."""
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))  # 2-D uint8: mode L


def load_rgb(path, encoded=None):
    """Decode any image file (or its bytes `encoded`, read from `path`) to an RGB PIL image; a file
    that cannot be decoded raises DataError. 16-bit samples are scaled to 8 bits (to_8_bit; Pillow
    opens 16-bit RGB(A) files as 8-bit RGB(A) already), GIFs give their first frame."""
    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as img:
            img.load()
            if img.mode == "RGB":
                return img
            if is_16_bit_gray(img.mode):
                return to_8_bit(img).convert("RGB")
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
            return img.convert("RGB")  # grayscale, CMYK (incl. Adobe's inverted JPEGs), RGBA: drop alpha
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot decode image {path}: {e} (fix or remove it; "
                        f"`python data.py check DIR` lists every bad file)") from None


def jpeg_decoder():
    """'torchcodec' when TorchCodec imports (torchvision 0.29 deprecates its decoders in its
    favour), else 'torchvision'. Both wrap libjpeg-turbo on the CPU and nvJPEG on CUDA."""
    if importlib.util.find_spec("torchcodec") is not None:
        try:
            import torchcodec.decoders  # noqa: F401 (loads native libraries: may not match torch)
            return "torchcodec"
        except (ImportError, OSError, RuntimeError):
            pass
    return "torchvision"


JPEG_DECODER = jpeg_decoder()


def decode_jpegs(encoded, device="cpu"):
    """[1-D uint8 CPU tensor of a JPEG file, ...] -> [(3, H, W) uint8 RGB on `device`, ...] in one
    call (one batched nvJPEG call on CUDA). Any bad file fails the whole call with RuntimeError."""
    if JPEG_DECODER == "torchcodec":
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg(list(encoded), mode="RGB", device=str(device))
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)


def as_tensor(encoded):
    return torch.frombuffer(bytearray(encoded), dtype=torch.uint8)


def takes_jpeg_decoder(encoded):
    """(width, height) and whether libjpeg-turbo / nvJPEG should decode these bytes (from the header
    only): baseline or progressive JPEGs in RGB or grayscale without an EXIF rotation (TorchCodec
    applies it, PIL and torchvision do not; CMYK is untested on CUDA). (None, False) when PIL cannot
    even read the header: the caller's PIL decode then names the problem."""
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return img.size, False
            return img.size, "exif" not in img.info or img.getexif().get(0x0112, 1) == 1
    except Exception:  # a bad header: PIL's full decode reports it with the path
        return None, False


def decode_rgb(path, encoded):
    """A file's bytes -> RGB pixels: a uint8 (H, W, 3) tensor from libjpeg-turbo for the JPEGs it
    takes (the same pixels as PIL's), else PIL's RGB image. Undecodable: DataError naming `path`."""
    size, jpeg = takes_jpeg_decoder(encoded)
    if jpeg:
        try:
            return decode_jpegs([as_tensor(encoded)])[0].permute(1, 2, 0)  # (H, W, 3) memory already
        except RuntimeError:  # libjpeg warnings PIL tolerates are errors here: let PIL decide
            pass
    return load_rgb(path, encoded)


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


AUGMENTS = ("none", "autoaugment", "randaugment", "trivialaugment", "augmix")  # --augment
RANDAUGMENT_BINS = 31  # torchvision's default: bin b applies b/30 of each op's largest change


def randaugment_bin(magnitude):
    """timm's RandAugment magnitude M (0..10: M/10 of each op's largest change) -> the nearest of
    torchvision's 31 bins (b/30 of it): round(3 M), exact for whole M and thirds (9 -> 27), at most
    half a bin (1/60 of the largest change) off otherwise. Clipped to 0..10 as timm clips."""
    return round(min(10.0, max(0.0, magnitude)) * 3)


def progressive_size(epoch, start, end, ramp_epochs):
    """--progressive-resize: the train size of `epoch` (0-based), linear from `start` at epoch 0 to
    `end` at `ramp_epochs` and after; sizes on the way rounded to multiples of 32 px (never above
    `end`, which is kept as it is). A pure function of the epoch: a resumed run trains each epoch at
    the size it would have had."""
    if epoch >= ramp_epochs:
        return end
    size = start + (end - start) * epoch / ramp_epochs
    return min(end, max(32, 32 * round(size / 32)))


class TrainTransform:
    """RandomResizedCrop (bicubic) + horizontal flip [+ one of torchvision's AutoAugment, RandAugment,
    TrivialAugmentWide, AugMix], uint8 (H, W, 3) out. One resize of the crop region only; no float
    image is ever made. `size` is the train size; with `resize_from`, epoch e trains at
    progressive_size(e, resize_from, size, resize_epochs). RandAugment's magnitude is on timm's
    0..10 scale; with `magnitude_std` each of its two ops draws its own ~ N(magnitude, std), as
    timm's `rand-m9-mstd0.5` does."""

    def __init__(self, size, min_scale=0.08, autoaugment=False, augment=None, magnitude=9.0, magnitude_std=0.0,
                 resize_from=0, resize_epochs=0):
        self.size, self.resize_from, self.resize_epochs = size, resize_from, resize_epochs
        self.scale = (min_scale, 1.0)
        self.augment = augment or ("autoaugment" if autoaugment else "none")
        self.magnitude, self.magnitude_std = magnitude, magnitude_std
        if self.augment == "randaugment":  # one op per call, so that each op can have its own magnitude
            self.op = [augment_op("randaugment", b) for b in range(RANDAUGMENT_BINS)]
        else:
            self.op = augment_op(self.augment)

    def size_at(self, epoch):
        return progressive_size(epoch, self.resize_from, self.size, self.resize_epochs) if self.resize_from else self.size

    def __call__(self, img, rng, epoch=0):
        """`img`: a PIL image or uint8 (H, W, 3) pixels."""
        pixels = img if isinstance(img, torch.Tensor) else to_uint8_hwc(img)
        box = random_resized_crop_box(pixels.shape[1], pixels.shape[0], rng, self.scale)
        x = resized_crop(pixels, box, self.size_at(epoch))
        if rng.random() < 0.5:
            x = x.flip(-1)
        if self.op is not None:
            x = self.augmented(x, rng)
        return x.permute(1, 2, 0).contiguous()

    def augmented(self, x, rng):
        # torchvision's ops draw from torch's global RNG: seed it from this sample's generator
        # inside fork_rng, so that the caller's RNG stream is left as it was.
        seed = rng.getrandbits(63)
        if self.augment == "randaugment":  # timm draws each op's magnitude; the ops' choice stays torchvision's
            draws = [rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
                     for _ in range(2)]
            ops = [self.op[randaugment_bin(m)] for m in draws]
        else:
            ops = [self.op]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for op in ops:
                x = op(x)
        return x


def augment_op(name, magnitude_bin=None):
    """torchvision's op for --augment `name` at its defaults (ImageNet policy; TrivialAugment's wide
    space, 31 bins; AugMix severity 3, width 3; RandAugment: one op of `magnitude_bin` of 31), on
    uint8 (3, H, W), with bilinear geometric ops as torchvision's reference training passes them;
    None for "none"."""
    import torchvision.transforms as T
    bilinear = T.InterpolationMode.BILINEAR
    return {"autoaugment": lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, bilinear),
            "randaugment": lambda: T.RandAugment(1, magnitude_bin, RANDAUGMENT_BINS, bilinear),
            "trivialaugment": lambda: T.TrivialAugmentWide(RANDAUGMENT_BINS, bilinear),
            "augmix": lambda: T.AugMix(interpolation=bilinear), "none": lambda: None}[name]()


class ValTransform:
    """Resize the short side to `resize` (bicubic, or "bilinear"), center-crop `size`: torchvision's
    Resize + CenterCrop (and so timm's eval transform) to the pixel, uint8 (H, W, 3) out."""

    def __init__(self, size, resize, interpolation="bicubic"):
        self.size, self.resize = size, resize
        self.interpolation = {"bicubic": BICUBIC, "bilinear": Image.Resampling.BILINEAR}[interpolation]

    def __call__(self, img, rng=None, epoch=0):
        if isinstance(img, torch.Tensor):  # libjpeg-turbo's pixels: PIL resizes them as its own
            img = Image.fromarray(img.numpy())
        w, h = img.size
        if w <= h:
            new_w, new_h = self.resize, int(self.resize * h / w)
        else:
            new_w, new_h = int(self.resize * w / h), self.resize
        img = img.resize((new_w, new_h), self.interpolation)
        left = int(round((new_w - self.size) / 2.0))
        top = int(round((new_h - self.size) / 2.0))
        return to_uint8_hwc(img.crop((left, top, left + self.size, top + self.size)))


def sample_rng(seed, epoch, index, copy=0):
    """The generator of one sample's augmentation: a pure function of (seed, epoch, index), and of
    which of its --repeated-aug copies it is (copy 0 draws what a run without repeats draws)."""
    return random.Random(f"{seed}/{epoch}/{index}" if copy == 0 else f"{seed}/{epoch}/{index}/{copy}")


def sample_key(item):
    """A sampler's item -> (index, epoch, copy): a plain index, TrainSampler's (index, epoch), or
    with --repeated-aug (index, epoch, copy)."""
    if not isinstance(item, tuple):
        return item, 0, 0
    return (*item, 0) if len(item) == 2 else item


# ---------------------------------------------------------------------------------------------
# --decode gpu, both halves. The workers' half: read the file, draw the crop box and flip from its
# header (EncodedTrainTransform), batch the bytes (collate -> EncodedBatch). The device's half:
# decode a batch's JPEGs in one nvJPEG call, then crop, resize and flip each sample (BatchDecoder),
# in a thread of DeviceLoader's, a batch ahead of the training step. The mode is carried as a
# string: build_datasets(decode=) -> ImageFolder.decode -> build_loader's collate and DeviceLoader.

class EncodedTrainTransform:
    """The worker's half of decoding on the GPU: the file's bytes, plus the crop box and flip drawn
    exactly as TrainTransform draws them (same generator calls, image size from the header).
    Files nvJPEG cannot take (PNG, CMYK, rotated JPEGs, ...) are decoded here to full-size pixels;
    BatchDecoder crops and resizes both kinds alike. ImageFolder(..., decode="gpu") calls it with
    the file's path and bytes in place of decoded pixels."""

    def __init__(self, size, min_scale=0.08, resize_from=0, resize_epochs=0):
        self.size, self.resize_from, self.resize_epochs = size, resize_from, resize_epochs
        self.scale = (min_scale, 1.0)

    size_at = TrainTransform.size_at

    def __call__(self, path, encoded, rng, epoch=0):
        size, jpeg = takes_jpeg_decoder(encoded)
        if jpeg:
            content, shape = encoded, None
        else:
            pixels = to_uint8_hwc(load_rgb(path, encoded))
            size, content, shape = (pixels.shape[1], pixels.shape[0]), pixels.numpy().tobytes(), pixels.shape
        box = random_resized_crop_box(*size, rng, self.scale)
        flip = rng.random() < 0.5
        return EncodedSample(path, content, shape, box, flip, self.size_at(epoch))


class EncodedSample:
    """A training sample before decoding: JPEG bytes (`shape` None) or uint8 (H, W, 3) pixel bytes."""

    def __init__(self, path, content, shape, box, flip, size):
        self.path, self.content, self.shape, self.box, self.flip, self.size = path, content, shape, box, flip, size


class EncodedBatch:
    """A batch of EncodedSamples as one byte tensor (one shared-memory block per batch, not one
    per image) and the per-sample spans, boxes and flips."""

    def __init__(self, samples):
        self.paths = [s.path for s in samples]
        self.shapes = [s.shape for s in samples]
        self.boxes = [s.box for s in samples]
        self.flips = [s.flip for s in samples]
        self.size = samples[0].size
        ends = np.cumsum([len(s.content) for s in samples]).tolist()
        self.spans = list(zip([0] + ends[:-1], ends))
        self.payload = torch.frombuffer(bytearray(b"".join(s.content for s in samples)), dtype=torch.uint8)

    def __len__(self):
        return len(self.paths)

    def content(self, i):
        start, end = self.spans[i]
        return self.payload[start:end]

    def pin_memory(self):
        """The DataLoader's pin-memory thread calls this: page-locked bytes, so that the pixels the
        workers decoded reach the GPU by an asynchronous copy."""
        self.payload = self.payload.pin_memory()
        return self


def collate(samples, decode="cpu"):
    """The loaders' collate_fn: default_collate of (pixels, label) samples; with decode="gpu" the
    EncodedSamples make one EncodedBatch (and the labels one tensor)."""
    if decode == "gpu":
        return EncodedBatch([s[0] for s in samples]), torch.tensor([s[1] for s in samples])
    return torch.utils.data.default_collate(samples)


# CUDA's antialiased resize keeps a block's filter weights in its 48 KiB of shared memory. By the
# kernel's block-size formula (read, not run), for bicubic float32 past about 47x downscale on both
# axes no row of threads fits (a launch with no rows: an error, or a host division by zero), past
# about 94x it refuses ("Too much shared memory required"); at 32x a block still has one row. The
# CPU kernels have no limit. Crops more than AA_MAX_DOWNSCALE x the output are resized in stages.
AA_MAX_DOWNSCALE = 32


def resize_stages(height, width, size, max_factor=None):
    """The (h, w) sizes of the successive resizes that take (height, width) to (size, size), none
    shrinking an axis more than `max_factor` (AA_MAX_DOWNSCALE) times: [(size, size)] for all but
    extreme crops. The last stages shrink most and the first least, so the blur stays close to that
    of one resize; an axis with fewer stages keeps its length until its own (the identity)."""
    max_factor = max_factor or AA_MAX_DOWNSCALE

    def lengths(n):
        out = [size]
        while n > out[0] * max_factor:
            out.insert(0, out[0] * max_factor)
        return out
    hs, ws = lengths(height), lengths(width)
    count = max(len(hs), len(ws))
    return list(zip([height] * (count - len(hs)) + hs, [width] * (count - len(ws)) + ws))


def antialiased_resize(x, size):
    """float (N, 3, h, w) -> (N, 3, size, size): antialiased bicubic, in stages where one resize
    would shrink too much for CUDA's kernel (resize_stages)."""
    for stage in resize_stages(x.shape[-2], x.shape[-1], size):
        x = F.interpolate(x, size=stage, mode="bicubic", antialias=True)
    return x


class BatchDecoder:
    """The device's half of decoding on the GPU: EncodedBatch -> float32 (N, 3, size, size) pixels
    in 0..255 on `device`. The batch's JPEGs are decoded in one call (one batched nvJPEG call on
    CUDA), then each sample's box is resized (antialiased bicubic in float: CUDA has no uint8 kernel
    for it) and flipped as TrainTransform does on the CPU. Work goes on the current stream; on CUDA
    the calling thread waits twice a batch (below), which is why DeviceLoader calls it from a
    thread of its own."""

    def __init__(self, device, channels_last=False):
        self.device, self.channels_last = torch.device(device), channels_last

    def __call__(self, batch):
        jpegs = [i for i, shape in enumerate(batch.shapes) if shape is None]
        decoded = dict(zip(jpegs, self.decode_jpegs(batch, jpegs)))
        crops = []
        for i, (left, top, right, bottom) in enumerate(batch.boxes):
            if i in decoded:
                image = decoded[i]
            else:  # decoded by the worker: (H, W, 3) pixel bytes
                image = batch.content(i).to(self.device, non_blocking=True).view(batch.shapes[i]).permute(2, 0, 1)
            crops.append(antialiased_resize(image[None, :, top:bottom, left:right].float(), batch.size))
        x = torch.cat(crops).clamp_(0, 255)  # bicubic overshoots; the CPU path's uint8 clamps too
        flips = torch.tensor(batch.flips).to(self.device, non_blocking=True).view(-1, 1, 1, 1)
        x = torch.where(flips, x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def decode_jpegs(self, batch, indices):
        if not indices:
            return []
        encoded = [batch.content(i) for i in indices]
        if self.device.type == "cuda":
            # nvJPEG writes from its own stream, which does not wait for this one: kernels still
            # queued here could read memory it reuses (torchvision PR #9606). Drain this stream
            # (the caller's thread waits; nvJPEG then waits for its own stream as well).
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return decode_jpegs(encoded, self.device)
        except RuntimeError:  # one bad file fails the whole call: find it
            return [self.decode_one(content, batch.paths[i]) for i, content in zip(indices, encoded)]

    def decode_one(self, content, path):
        try:
            return decode_jpegs([content], self.device)[0]
        except RuntimeError:  # PIL decodes what it can (libjpeg warnings) and names the rest
            pixels = to_uint8_hwc(load_rgb(path, content.numpy().tobytes()))
            return pixels.to(self.device).permute(2, 0, 1)


# ---------------------------------------------------------------------------------------------
# Datasets. Items are addressed by `index`, or by what TrainSampler yields: `(index, epoch)`, and
# `(index, epoch, copy)` with --repeated-aug (sample_key).

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


def is_image_name(name):
    """Whether the loaders take a file of this name: an image extension (IMG_EXTENSIONS, any case)
    and not hidden. Dotfiles are metadata even with an image extension (macOS's ._x.JPEG)."""
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def list_class_folder(folder):
    """(image files, other entries) of one class folder, as sorted paths. The others are what the
    data set leaves out: files that is_image_name refuses, broken links, and subfolders (with a
    trailing separator: their images are not searched)."""
    images, others = [], []
    for entry in os.scandir(folder):
        if entry.is_file() and is_image_name(entry.name):
            images.append(entry.path)
        else:
            others.append(entry.path + os.sep if entry.is_dir() else entry.path)
    return sorted(images), sorted(others)


def skipped_note(*datasets, show=5):
    """The line to print at start about what these datasets' class folders hold besides images
    ("skipped 3 files that are not images: ..."), naming the first `show`; None when nothing was."""
    return skipped_line([path for d in datasets for path in getattr(d, "skipped_files", ())], show)


def skipped_line(paths, show=5):
    """skipped_note for a list of skipped paths."""
    skipped = sorted(paths)
    if not skipped:
        return None
    kinds = "files and folders" if any(path.endswith(os.sep) for path in skipped) else "files"
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    return f"skipped {len(skipped)} {kinds} that are not images: {', '.join(skipped[:show])}{more}"


class ImageFolder(torch.utils.data.Dataset):
    """root/<class>/<image>: torchvision's ImageFolder, flat class folders. `skipped_files` lists
    (sorted paths) what the class folders hold besides images: see list_class_folder.
    decode="gpu": `transform` is an EncodedTrainTransform, which takes the file's bytes."""

    def __init__(self, root, transform, seed=0, decode="cpu"):
        self.root, self.transform, self.seed, self.decode = root, transform, seed, decode
        self.read_retries = multiprocessing.Value("q", 0)  # inherited by the workers: one count for all
        self.classes = find_classes(root)
        self.samples, self.skipped_files = [], []
        for label, name in enumerate(self.classes):
            folder = os.path.join(root, name)
            files, others = list_class_folder(folder)
            if not files:
                more = f" and {len(others) - 3} more" if len(others) > 3 else ""
                held = f", only {', '.join(others[:3])}{more}" if others else ""
                raise DataError(f"class folder {folder} has no images ({', '.join(IMG_EXTENSIONS)}){held}; "
                                f"remove it or add its images")
            self.samples += [(path, label) for path in files]
            self.skipped_files += others

    def __len__(self):
        return len(self.samples)

    def read(self, index):
        """(the bytes of sample `index`, the name error messages give it)."""
        path = self.samples[index][0]
        return read_file(path, self.read_retries), path

    def __getitem__(self, item):
        index, epoch, copy = sample_key(item)
        encoded, name = self.read(index)
        label = self.samples[index][1]
        rng = sample_rng(self.seed, epoch, index, copy)
        if self.decode == "gpu":  # the worker's half of GPU decoding: bytes, box and flip only
            return self.transform(name, encoded, rng, epoch), label
        return self.transform(decode_rgb(name, encoded), rng, epoch), label


# Other label orders and label sets for an ImageFolder's val set (train.py --evaluate), and the
# plain file lists of --predict.

IMAGENET_INDEX = "imagenet-index"  # --class-map: folders named by their label, as ImageNet-V2's 0..999


def read_class_names(path):
    """The class names of a --class-map file: one a line, in label order (blank lines skipped)."""
    if not os.path.isfile(path):
        raise DataError(f"--class-map {path} does not exist (a file of class-folder names, or {IMAGENET_INDEX})")
    names = [text for _, text in read_label_lines(path, "expected one class-folder name per line, in label order")]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise DataError(f"--class-map {path} names {', '.join(repeated[:3])} more than once: one line per label")
    return names


def apply_class_map(dataset, class_map):
    """Relabel `dataset` (an ImageFolder) by `class_map` instead of by its sorted folder names, which
    would put folder "10" before "2": a file of class-folder names in label order, or "imagenet-index"
    (folder "7" is label 7). `dataset.classes` becomes the names in label order."""
    if not isinstance(dataset, ImageFolder):
        raise DataError("--class-map relabels class folders; --data demo and synthetic have none")
    folders = dataset.classes
    if class_map == IMAGENET_INDEX:
        bad = [name for name in folders if not re.fullmatch(r"0|[1-9][0-9]*", name)]
        if bad:
            raise DataError(f"--class-map {IMAGENET_INDEX} needs folders named by their label (0, 1, ..., as "
                            f"ImageNet-V2's), but {dataset.root} has {', '.join(bad[:3])}")
        names = [str(label) for label in range(max(int(name) for name in folders) + 1)]
    else:
        names = read_class_names(class_map)
        unknown = [name for name in folders if name not in names]
        if unknown:
            raise DataError(f"--class-map {class_map} does not list the class folders {', '.join(unknown[:3])}"
                            f"{' ...' if len(unknown) > 3 else ''} of {dataset.root}")
    label = {name: i for i, name in enumerate(names)}
    dataset.samples = [(path, label[folders[old]]) for path, old in dataset.samples]
    dataset.classes = names


def read_real_labels(path, dataset, num_classes):
    """ReaL's real.json (Beyer et al. 2020: a list with one list of label indices per ImageNet val
    image, in sorted file-name order, ILSVRC2012_val_00000001.JPEG first; empty where no label was
    agreed) -> an int64 tensor (len(dataset), longest list) of each sample's labels, padded with -1,
    in the dataset's sample order (class folders: not the file-name order)."""
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


def list_images(paths):
    """The files that --predict names, in order: a file as given; a folder's image files (by name,
    as the loaders take them), searched recursively and sorted; a .txt file read as a list of paths,
    one a line, relative to the list's folder. A path that does not exist raises DataError; a listed
    file that cannot be read is reported by the prediction itself."""
    files = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path, followlinks=True)
                           for name in names if is_image_name(name))
            if not found:
                raise DataError(f"--predict {path}: the folder holds no image files ({', '.join(IMG_EXTENSIONS)})")
            files += found
        elif os.path.isfile(path) and path.lower().endswith(".txt"):
            listed = [text for _, text in read_label_lines(path, "expected one image path per line")]
            files += [os.path.join(os.path.dirname(path), name) for name in listed]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise DataError(f"--predict {path} does not exist")
    return files


class ImageFiles(torch.utils.data.Dataset):
    """Files to classify: (uint8 (S, S, 3) pixels through `transform`, index, "") per file, each read
    and decoded once; for a file that cannot be read or decoded, black pixels and the reason, so that
    the batch goes on and the caller reports it."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        path = self.paths[index]
        try:
            return self.transform(decode_rgb(path, read_file(path))), index, ""
        except DataError as e:
            return torch.zeros(self.transform.size, self.transform.size, 3, dtype=torch.uint8), index, str(e)


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
        index, epoch, copy = sample_key(item)
        img, label = self.render(index)
        return self.transform(img, sample_rng(self.seed, epoch, index, copy), epoch), label


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
        index = sample_key(item)[0]
        return self.images[index % len(self.images)], (index * 7919) % 1000


def build_datasets(data, image_size, val_resize, seed=0, min_crop_scale=0.08, autoaugment=False,
                   with_train=True, decode="cpu", val_interpolation="bicubic", train_size=None, augment=None,
                   magnitude=9.0, magnitude_std=0.0, resize_from=0, resize_epochs=0):
    """(train, val) datasets for DATA, 'demo' or 'synthetic'; train is None without `with_train`
    (evaluation only: DATA/train need not exist). Train and val must have the same classes.
    `image_size` is the eval size, `train_size` the train size (default: the same; see
    TrainTransform for the augmentation and progressive resizing arguments).
    decode="gpu": the train set yields EncodedSamples for DeviceLoader to decode (DATA only)."""
    if data in BUILT_IN_DATA and os.path.isdir(data):  # refused, not shadowed: ./demo names the folder
        raise DataError(f"--data {data} names the built-in {data} set, but ./{data} is also a folder here: pass "
                        f"--data ./{data} to train on the folder, or run from another directory for the built-in set")
    train_size = train_size or image_size
    if data == "synthetic":
        return Synthetic("train", train_size, seed) if with_train else None, Synthetic("val", image_size, seed)
    resizing = {"resize_from": resize_from, "resize_epochs": resize_epochs}
    train_tf = EncodedTrainTransform(train_size, min_crop_scale, **resizing) if decode == "gpu" else \
        TrainTransform(train_size, min_crop_scale, autoaugment, augment, magnitude, magnitude_std, **resizing)
    val_tf = ValTransform(image_size, val_resize, val_interpolation)
    if data == "demo":
        return DemoShapes("train", train_tf, seed) if with_train else None, DemoShapes("val", val_tf, seed)
    if not os.path.isdir(data):
        problem = "is a file, not a folder" if os.path.exists(data) else "does not exist"
        raise DataError(f"data folder {data} {problem} (give the ImageNet root holding train/ "
                        f"and val/, or --data demo / --data synthetic)")
    pack_index = read_pack_index(data) if is_pack(data) else None
    val = open_split(data, "val", val_tf, seed, pack_index=pack_index)
    if not with_train:
        return None, val
    train = open_split(data, "train", train_tf, seed, decode=decode, pack_index=pack_index)
    check_same_classes(data, train, val)
    return train, val


# ---------------------------------------------------------------------------------------------
# Packed shards. `python data.py pack DATA OUT` writes each split as tar shards in WebDataset's
# layout (<key>.jpg, .png, ... holding the file's bytes unchanged, then <key>.cls holding the label),
# which `tar` and the webdataset package read, plus an index of where every sample's bytes lie.
# `--data OUT` then reads sample i by one os.pread from its shard (ShardFolder): the samples, order
# and labels of the folders it was packed from, so runs, resumes and evaluations are the same.
# Written by hand rather than with webdataset or wids: webdataset streams shards (no access by
# index, so no exact sampler order, sharding or resume), and wids scans every shard's tar headers in
# each process that opens it and copies shards into a local cache; here the index is written once,
# when packing, and Python's tarfile writes the shards.

PACK_FORMAT = "efficientnet-pack/1"
PACK_INDEX = "index.json"  # written last: a folder holding it is a complete pack
PACK_PROGRESS = "pack-in-progress.json"  # while packing: what is being packed, so a rerun continues
TAR_BLOCK = 512
MAX_OPEN_SHARDS = 256  # per process; the one opened first is closed to open another
READ_AHEAD = 64  # files read at once, by as many threads, while packing (a network file system's latency)


def is_pack(folder):
    return os.path.isfile(os.path.join(folder, PACK_INDEX))


def read_pack_index(pack, name=PACK_INDEX):
    """The pack's index (or, with `name`, its packing's progress file), checked to be one."""
    path = os.path.join(pack, name)
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the pack index {path} ({e}): pack again with python data.py pack DATA {pack}") from None
    if not isinstance(index, dict) or index.get("format") != PACK_FORMAT:
        raise DataError(f"{path} is not the index of a {PACK_FORMAT} pack: pack again with python data.py pack DATA {pack}")
    return index


class ShardFolder(ImageFolder):
    """One split of a pack: the samples (relative names), labels, classes and skipped files of the
    ImageFolder it was packed from, in its order. Sample i's bytes are one os.pread from its shard,
    each shard opened once per process (at most MAX_OPEN_SHARDS open at a time). `root` is
    PACK/<split>, as DATA/<split> is a folder's. `index`: the pack's read_pack_index, when read."""

    def __init__(self, pack, split, transform, seed=0, decode="cpu", index=None):
        self.root, self.transform, self.seed, self.decode = os.path.join(pack, split), transform, seed, decode
        self.read_retries = multiprocessing.Value("q", 0)
        index = index or read_pack_index(pack)
        if split not in index["splits"]:
            raise DataError(f"the pack {pack} has no {split} set ({index['source']} had no {split}/ when it was "
                            f"packed): pack a DATA that has {split}/")
        entry = index["splits"][split]
        self.classes, self.skipped_files = entry["classes"], entry["skipped_files"]
        self.shards = [os.path.join(pack, name) for name in entry["shards"]]
        for path, expected in zip(self.shards, entry["shard_bytes"]):
            size = file_size(path)
            if size != expected:
                found = "is missing" if size is None else f"is {size:,} bytes, the index says {expected:,}"
                raise DataError(f"shard {path} {found}: copy the pack again, or pack again into {pack}")
        table = np.load(os.path.join(pack, f"{split}.npy"))
        self.shard_of, self.offsets, self.sizes = table["shard"], table["offset"], table["size"]
        self.samples = list(zip(entry["names"], table["label"].tolist()))
        self.files = {}  # shard -> file descriptor, in this process

    def __getstate__(self):  # descriptors do not cross a spawn; each process opens its own
        return dict(self.__dict__, files={})

    def close(self):
        """Close the shards this process opened (the next read opens them again)."""
        while self.files:
            os.close(self.files.popitem()[1])

    def read_span(self, shard, offset, size, what):
        """`size` bytes at `offset` of shard number `shard` (holding `what`, for messages): one
        os.pread, retried as read_retrying does, the shard opened again for each retry (a stale
        handle: ESTALE)."""
        def read():
            try:
                if shard not in self.files:
                    if len(self.files) >= MAX_OPEN_SHARDS:  # small shards: stay far below the fd limit
                        os.close(self.files.pop(next(iter(self.files))))
                    self.files[shard] = os.open(self.shards[shard], os.O_RDONLY)
                content = os.pread(self.files[shard], size, offset)
            except OSError:
                with contextlib.suppress(KeyError, OSError):
                    os.close(self.files.pop(shard))
                raise
            if len(content) != size:
                raise DataError(f"shard {self.shards[shard]} ends inside {what}: copy the pack again")
            return content
        return read_retrying(read, f"{what} in {self.shards[shard]}", "check the file system", self.read_retries)

    def read(self, index):
        shard, name = int(self.shard_of[index]), self.samples[index][0]
        encoded = self.read_span(shard, int(self.offsets[index]), int(self.sizes[index]), f"image {name}")
        return encoded, f"{name} in {self.shards[shard]}"


def open_split(data, split, transform, seed=0, decode="cpu", pack_index=None):
    """DATA/<split>: a ShardFolder when DATA is a pack (its `pack_index`), else an ImageFolder."""
    if pack_index is not None:
        return ShardFolder(data, split, transform, seed, decode, pack_index)
    return ImageFolder(os.path.join(data, split), transform, seed, decode)


def file_size(path):
    """The size of file `path`; None when there is none."""
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def check_same_classes(data, train, val):
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"{data}/train and {data}/val have different class folders "
                        f"(only in train: {', '.join(only_train[:5]) or '-'}; only in val: "
                        f"{', '.join(only_val[:5]) or '-'}); both need the same classes")


def parse_size(text):
    """'1GB', '500MB', '64KiB', '1000000' -> bytes (kB/MB/GB/TB decimal, KiB/MiB/GiB/TiB binary)."""
    match = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)\s*([kKMGT]i?B|B)?", text.strip())
    if not match or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 1GB, 500MB, 256MiB)")
    unit = (match[2] or "B").upper()
    scale = 1024 ** "BKMGT".index(unit[0]) if "I" in unit else 1000 ** "BKMGT".index(unit[0])
    return max(1, int(float(match[1]) * scale))


def tar_member_bytes(size):
    """Bytes of one file in a tar: its 512-byte header, then its data padded to whole blocks."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def tar_file_bytes(members_end):
    """A tar file's size: its members, two zero blocks, padded to whole records (as tarfile ends it)."""
    return -(-(members_end + 2 * TAR_BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def member_name(index, name, label=None):
    """The tar name of sample `index` (relative name `name`): <key>.jpg/.png/... or <key>.cls. The
    key has no dots (WebDataset's key ends at the first one): the index, then the file's stem."""
    stem, ext = os.path.splitext(os.path.basename(name))
    key = f"{index:08d}_{re.sub(r'[^A-Za-z0-9_-]', '_', stem)[:60]}"
    if label is not None:
        return key + ".cls"
    return key + (".jpg" if ext.lower() in (".jpg", ".jpeg") else ext.lower())


def plan_split(folder, shard_size):
    """Where each sample of `folder` (an ImageFolder) goes: shard, data offset; and each shard's
    size as a tar file."""
    names = [os.path.relpath(path, folder.root) for path, _ in folder.samples]
    with concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:  # a network file system's latency
        stats = list(pool.map(os.stat, [path for path, _ in folder.samples]))
    shard_of, offsets, shard_bytes, pos = [], [], [], 0
    for (_, label), st in zip(folder.samples, stats):
        need = tar_member_bytes(st.st_size) + tar_member_bytes(len(str(label)))
        if pos and tar_file_bytes(pos + need) > shard_size:
            shard_bytes.append(tar_file_bytes(pos))
            pos = 0
        shard_of.append(len(shard_bytes))
        offsets.append(pos + TAR_BLOCK)
        pos += need
    shard_bytes.append(tar_file_bytes(pos))
    return {"classes": folder.classes, "names": names, "labels": [label for _, label in folder.samples],
            "sources": [path for path, _ in folder.samples], "sizes": [st.st_size for st in stats],
            "mtimes": [st.st_mtime_ns for st in stats], "shard_of": shard_of, "offsets": offsets,
            "shard_bytes": shard_bytes, "skipped_files": folder.skipped_files}


def pack_plan(data, shard_size):
    """The pack of DATA: a plan per split (plan_split) and the plan's identity, a hash of every
    sample's name, label, size and modification time and of the shard size."""
    listed = {split: ImageFolder(os.path.join(data, split), None)
              for split in ("train", "val") if os.path.isdir(os.path.join(data, split))}
    if not listed:
        raise DataError(f"{data} has neither train/ nor val/ to pack (expected DATA/train/<class>/*.JPEG "
                        f"and DATA/val/<class>/*.JPEG)")
    if len(listed) == 2:
        check_same_classes(data, listed["train"], listed["val"])
    plans = {split: plan_split(folder, shard_size) for split, folder in listed.items()}
    what = [PACK_FORMAT, shard_size] + [[split, p["classes"], p["names"], p["labels"], p["sizes"], p["mtimes"]]
                                        for split, p in plans.items()]
    return plans, hashlib.sha256(json.dumps(what).encode()).hexdigest()


def shard_names(split, plan):
    return [f"{split}-{n:06d}.tar" for n in range(len(plan["shard_bytes"]))]


def write_shard(path, plan, members):
    """Shard `path` of samples `members` (indices into `plan`), written as utils.write_atomic
    writes (a temporary file, fsynced, then renamed): a shard that exists is whole. Each offset
    is checked against the plan's."""
    def write(tmp):
        with tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT) as tar, \
                concurrent.futures.ThreadPoolExecutor(READ_AHEAD) as pool:
            for start in range(0, len(members), READ_AHEAD):
                chunk = members[start:start + READ_AHEAD]
                for i, encoded in zip(chunk, pool.map(read_file, [plan["sources"][i] for i in chunk])):
                    if len(encoded) != plan["sizes"][i]:
                        raise DataError(f"{plan['sources'][i]} changed while packing: pack again into a new folder")
                    add_member(tar, member_name(i, plan["names"][i]), encoded)
                    if tar.offset - tar_member_bytes(len(encoded)) + TAR_BLOCK != plan["offsets"][i]:
                        raise RuntimeError(f"tarfile placed {plan['sources'][i]} elsewhere than planned in {path}")
                    add_member(tar, member_name(i, plan["names"][i], plan["labels"][i]), str(plan["labels"][i]).encode())
    utils.write_atomic(path, write, sum(plan["sizes"][i] for i in members))


def add_member(tar, name, content):
    """A regular file in `tar`, with nothing of this machine in its header (same bytes every time)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(content), 0o644, 0
    tar.addfile(info, io.BytesIO(content))


def save_npy(path, table):
    with open(path, "wb") as f:  # np.save(path) would add ".npy" to a temporary's name
        np.save(f, table)


def check_pack_output(out, identity, plans):
    """Whether OUT already holds this pack (True), or nothing or its unfinished packing (False);
    a folder holding another pack, or other files, raises DataError."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise DataError(f"{out} is a file: give a new or empty folder to pack into")
    held = set(os.listdir(out)) if os.path.isdir(out) else set()
    for name in (PACK_INDEX, PACK_PROGRESS):
        held_pack = read_pack_index(out, name) if name in held else {"identity": identity}
        if held_pack.get("identity") != identity:
            raise DataError(f"{out} holds the pack of other files or another --shard-size "
                            f"({held_pack.get('source')}): give another folder, or remove {out}")
    ours = {PACK_INDEX, PACK_PROGRESS} | {f"{split}.npy" for split in plans}
    ours |= {name for split, plan in plans.items() for name in shard_names(split, plan)}
    stale = {name for name in held if name.startswith(".") and name[1:].split(".tmp.")[0] in ours}
    others = sorted(held - ours - stale)  # stale: what utils.write_atomic left of a killed packing
    if others:
        raise DataError(f"{out} holds files that are not this pack's ({', '.join(others[:3])}): "
                        f"give a new or empty folder to pack into")
    if held:
        utils.remove_stale_temporaries(out)  # all of them ours, as just checked
    return PACK_INDEX in held


def pack(data, out, shard_size=10 ** 9):
    """Pack DATA's train and val (those it has) into OUT, resuming an unfinished packing of the same
    files. Returns ({split: (images, shards, skipped files)}, whether OUT held the whole pack already). The layout:
    OUT/<split>-000000.tar, ... (the shards), OUT/<split>.npy (each sample's shard, offset, size and
    label), OUT/index.json (classes, shard names and sizes, each sample's relative name)."""
    from tqdm import tqdm
    plans, identity = pack_plan(data, shard_size)
    counts = {split: (len(p["names"]), len(p["shard_bytes"]), p["skipped_files"]) for split, p in plans.items()}
    whole = {os.path.join(out, name): size for split, plan in plans.items()
             for name, size in zip(shard_names(split, plan), plan["shard_bytes"])}
    if check_pack_output(out, identity, plans) and all(file_size(path) == size for path, size in whole.items()):
        return counts, True  # else a shard went missing or was cut: written again below
    os.makedirs(out, exist_ok=True)
    head = {"format": PACK_FORMAT, "source": os.path.abspath(data), "shard_size": shard_size, "identity": identity}
    utils.write_text(os.path.join(out, PACK_PROGRESS), json.dumps(head))
    splits = {}
    for split, plan in plans.items():
        shards = shard_names(split, plan)
        members = [[] for _ in shards]
        for i, n in enumerate(plan["shard_of"]):
            members[n].append(i)
        for name, expected, chunk in tqdm(list(zip(shards, plan["shard_bytes"], members)), desc=f"packing {split}", unit="shard"):
            path = os.path.join(out, name)
            if file_size(path) != expected:
                write_shard(path, plan, chunk)
        table = np.zeros(len(plan["names"]), [("shard", "<i4"), ("offset", "<i8"), ("size", "<i8"), ("label", "<i4")])
        table["shard"], table["offset"], table["size"], table["label"] = (
            plan["shard_of"], plan["offsets"], plan["sizes"], plan["labels"])
        utils.write_atomic(os.path.join(out, f"{split}.npy"), functools.partial(save_npy, table=table), table.nbytes)
        splits[split] = {"classes": plan["classes"], "shards": shards, "shard_bytes": plan["shard_bytes"],
                         "skipped_files": plan["skipped_files"], "names": plan["names"]}
    utils.write_text(os.path.join(out, PACK_INDEX), json.dumps(dict(head, splits=splits)))
    os.remove(os.path.join(out, PACK_PROGRESS))
    return counts, False


# ---------------------------------------------------------------------------------------------
# Samplers: which indices each rank reads

class TrainSampler(torch.utils.data.Sampler):
    """DistributedSampler semantics: a permutation from (seed, epoch) shared by all ranks, padded
    with its own first indices to a multiple of the world size, rank r taking every world-th index.
    Yields (index, epoch). `set_epoch(epoch, skip)` first drops the permutation's first `skip`
    samples, the ones all ranks together used in the steps already taken, so a run resumed
    mid-epoch, on this or on another number of ranks, continues with the very next samples.

    `repeats` N > 1 (--repeated-aug, DeiT's and torchvision's RASampler): the epoch's order is the
    permutation with each index N times in a row, cut to the data set's length, so an epoch keeps
    its length and covers size / N images, each N times; the N copies sit side by side, so rank r
    takes copy c of an image from position p = N * k + c, and with N <= world size the copies
    land on N different ranks. Yields (index, epoch, copy): the copy enters the sample's generator,
    so the copies are augmented apart. The order is one list for all ranks, so `skip` and another
    world size work exactly as without repeats."""

    def __init__(self, size, rank=0, world_size=1, seed=0, repeats=1):
        self.size, self.rank, self.world_size, self.seed, self.repeats = size, rank, world_size, seed, repeats
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def order(self):
        """The epoch's global order (all ranks): indices, or (index, copy) pairs with repeats."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        if self.repeats > 1:
            order = [(index, copy) for index in order for copy in range(self.repeats)][: self.size]
        return order

    def indices(self):
        order = self.order()[self.skip:]
        total = len(self) * self.world_size
        while len(order) < total:  # pad with the first indices again, as DistributedSampler does
            order += order[: total - len(order)]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        if self.repeats > 1:
            return ((index, self.epoch, copy) for index, copy in self.indices())
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
    # Ctrl-C reaches the whole process group: the main process stops the run, workers stay quiet.
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
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


def default_workers():
    """Loader processes per training process: this process's cores shared among the node's
    training processes (LOCAL_WORLD_SIZE), less the one the training process uses. A task that srun
    bound to its own --cpus-per-task cores (no torchrun in between) has its share already."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if "TORCHELASTIC_RUN_ID" not in os.environ and cores <= int(os.environ.get("SLURM_CPUS_PER_TASK", "0")):
        sharing = 1
    return max(1, cores // sharing - 1)


def read_retries(*datasets):
    """File reads retried so far by these datasets' loaders (all their workers)."""
    return sum(d.read_retries.value for d in datasets if hasattr(d, "read_retries"))


def decode_mode(dataset):
    """Where a dataset's images are decoded: ImageFolder's `decode` ("cpu" or "gpu"); datasets
    without one (demo, synthetic, a list of batches) hold pixels: "cpu"."""
    return getattr(dataset, "decode", "cpu")


def build_loader(dataset, sampler, batch_size, workers, train, pin_memory=False):
    if workers > 0:
        atexit.unregister(_kill_workers_at_exit)  # once, however many loaders
        atexit.register(_kill_workers_at_exit)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=pin_memory, drop_last=train,  # equal, full batches on every rank in training
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        collate_fn=functools.partial(collate, decode=decode_mode(dataset)),
        # Workers draw nothing from their seeds (see sample_rng); a private generator keeps the
        # loader from consuming the global torch RNG, whose state the checkpoints restore.
        generator=torch.Generator())


class DeviceLoader:
    """Moves batches to `device` and normalises them there: float (N, 3, H, W) out, channels_last
    when asked. `decode` is the mode of the loader's dataset (decode_mode; give it for a plain list
    of batches). "cpu": uint8 NHWC pixel batches; on CUDA the copy and normalisation of the next
    batch run on a side stream while the current batch computes (the host memory must be pinned
    for that). "gpu": EncodedBatches, which a BatchDecoder turns into pixels in a thread of this
    loader's, on the side stream, a batch ahead: the training thread never waits for nvJPEG nor
    queues its step behind the decode's per-sample kernels (see _decode_ahead). The side stream
    lives as long as the loader, since the caching allocator keeps each stream's memory apart.
    `mean` and `std` are of 0-1 pixels (AdvProp weights: 0.5, 0.5)."""

    def __init__(self, loader, device, channels_last=False, mean=IMAGENET_MEAN, std=IMAGENET_STD, decode=None):
        self.loader, self.device, self.channels_last = loader, torch.device(device), channels_last
        self.decode = decode or decode_mode(getattr(loader, "dataset", None))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1.0 / (torch.tensor(std, device=self.device).view(1, 3, 1, 1) * 255)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.decoder = BatchDecoder(self.device, channels_last) if self.decode == "gpu" else None

    def __len__(self):
        return len(self.loader)

    def standardize(self, x):
        """float (N, 3, H, W) in 0..255 -> ImageNet-normalised, in place."""
        return x.sub_(self.mean).mul_(self.inv_std)

    def normalize(self, images):
        """uint8 (N, H, W, 3) on the device -> normalised float32 (N, 3, H, W)."""
        x = images.permute(0, 3, 1, 2).float()  # NHWC bytes are already channels_last memory
        if not self.channels_last:
            x = x.contiguous()
        return self.standardize(x)

    def _to_device(self, batch):
        images, labels = batch
        labels = labels.to(self.device, non_blocking=True)
        if self.decode == "gpu":
            return self.standardize(self.decoder(images)), labels
        return self.normalize(images.to(self.device, non_blocking=True)), labels

    def __iter__(self):
        if self.decode == "gpu":
            return self._decode_ahead()
        if self.stream is None:
            return (self._to_device(batch) for batch in self.loader)
        return self._copy_ahead()

    def _hand_over(self, ready):
        """Make the compute stream wait for the side stream's work on `ready` (not the host), and
        tell the allocator that the compute stream uses its tensors from now on."""
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in ready:
            t.record_stream(compute)
        return ready

    def _copy_ahead(self):
        upcoming = None
        for batch in self.loader:
            with torch.cuda.stream(self.stream):
                ready = self._to_device(batch)
            if upcoming is not None:
                yield upcoming
            upcoming = self._hand_over(ready)
        if upcoming is not None:
            yield upcoming

    def _decode_ahead(self):
        """decode="gpu": a decode thread takes the loader's batches in order and queues their
        decoding on the side stream; this generator yields each once the thread has queued it,
        with the compute stream made to wait for it. The thread waits for the side stream before
        each nvJPEG call (and nvJPEG for its own stream), so those waits overlap the training step
        that this thread meanwhile queues. At most two batches are ahead: one in `ready`, one in
        the making. Stopping early (fewer steps than batches), or an error on either side, stops
        and joins the thread before the loader is iterated again."""
        batches = iter(self.loader)  # in this thread: a DataLoader sets up signal handling here
        ready, stop = queue.Queue(maxsize=1), threading.Event()
        thread = threading.Thread(target=self._decode_all, args=(batches, ready, stop), daemon=True,
                                  name="DeviceLoader-decode")
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                images, labels, queued = item
                if queued is not None:  # CUDA: the event recorded after the batch's work
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_event(queued)
                    images.record_stream(compute)
                    labels.record_stream(compute)
                yield images, labels
        finally:
            stop.set()
            thread.join()

    def _decode_all(self, batches, ready, stop):
        """The decode thread: each batch decoded and normalised into `ready`, then None, or the
        exception that ended it (the training thread raises it)."""
        cuda = self.stream is not None
        try:
            with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():  # also its device
                for batch in batches:
                    if stop.is_set():
                        return
                    images, labels = self._to_device(batch)
                    queued = torch.cuda.Event() if cuda else None
                    if cuda:
                        queued.record(self.stream)
                    _put_unless_stopped(ready, (images, labels, queued), stop)
            _put_unless_stopped(ready, None, stop)
        except BaseException as e:  # handed over, not swallowed
            _put_unless_stopped(ready, e, stop)


def _put_unless_stopped(q, item, stop):
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return
        except queue.Full:
            pass


# ---------------------------------------------------------------------------------------------
# Batch augmentation on the device, after normalisation: random erasing, mixup, cutmix. Their
# random draws come from one seed per micro-batch, batch_seed(seed, step, rank, micro): a pure
# function of where the run stands, so a resumed run draws what it would have drawn. The draws are
# made on the CPU, the way torchvision's RandomErasing, MixUp and CutMix make them (tested equal),
# with torch's CPU generator seeded inside fork_rng: the run's own random streams are untouched.

def batch_seed(seed, step, rank, micro):
    """The seed of micro-batch `micro` of optimizer step `step` on `rank`."""
    return random.Random(f"batch/{seed}/{step}/{rank}/{micro}").getrandbits(63)


def mixup(images, labels, num_classes, lam):
    """Blend each sample with the batch's reverse order: lam * own + (1 - lam) * partner, for images
    and one-hot targets alike. Returns images and (N, num_classes) soft targets."""
    targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    images = images.flip(0).mul_(1.0 - lam).add_(images.mul(lam))  # torchvision's MixUp's rounding
    targets = targets.flip(0).mul_(1.0 - lam).add_(targets.mul(lam))
    return images, targets


def cutmix(images, labels, num_classes, box):
    """Paste the box (left, top, right, bottom) of each sample's partner (the batch's reverse order,
    as in mixup) into it; targets mix by the pasted area. Returns images and soft targets."""
    left, top, right, bottom = box
    lam = 1.0 - (right - left) * (bottom - top) / (images.shape[-1] * images.shape[-2])
    images = images.clone()
    images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    targets = torch.nn.functional.one_hot(labels, num_classes).to(images.dtype)
    return images, targets.mul(lam).add_(targets.flip(0), alpha=1.0 - lam)


def beta_sample(alpha):
    """One draw of Beta(alpha, alpha) from torch's CPU generator, as torchvision's MixUp and CutMix draw it."""
    return float(torch.distributions.Beta(torch.tensor([alpha]), torch.tensor([alpha])).sample(()))


def cutmix_box(lam, height, width):
    """torchvision's CutMix box for `lam`: a centre uniform over the image (drawn from torch's CPU
    generator), sides sqrt(1 - lam) of the image's, clipped at the borders."""
    x = int(torch.randint(width, size=(1,)))
    y = int(torch.randint(height, size=(1,)))
    half_w, half_h = int(0.5 * math.sqrt(1.0 - lam) * width), int(0.5 * math.sqrt(1.0 - lam) * height)
    return max(x - half_w, 0), max(y - half_h, 0), min(x + half_w, width), min(y + half_h, height)


def random_erase_(images, p, scale=(0.02, 1 / 3), ratio=(0.3, 10 / 3)):
    """timm's random erasing in "pixel" mode, as torchvision's RandomErasing(value="random") draws
    it: each image, with probability p, gets one box (area a fraction in `scale` of the image,
    aspect ratio log-uniform in `ratio`, ten tries to fit) filled with N(0, 1) noise per pixel and
    channel, on the normalised (N, 3, H, W) `images`, in place. Draws from torch's CPU generator
    (the noise too); the noise of all boxes then reaches the images' device in one copy, from
    pinned memory without waiting when that is a GPU (no sync in the training step)."""
    height, width = images.shape[-2:]
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision has it
    boxes, noises = [], []
    for n in range(len(images)):
        if not torch.rand(1) < p:
            continue
        for _ in range(10):
            area = height * width * torch.empty(1).uniform_(*scale).item()
            aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                noises.append(torch.empty(images.shape[1], h, w).normal_())
                top = int(torch.randint(0, height - h + 1, size=(1,)))
                left = int(torch.randint(0, width - w + 1, size=(1,)))
                boxes.append((n, top, left, h, w))
                break
    if boxes:
        flat = torch.cat([noise.flatten() for noise in noises])
        flat = (flat.pin_memory() if images.is_cuda else flat).to(images.device, images.dtype, non_blocking=True)
        for (n, top, left, h, w), part in zip(boxes, flat.split([noise.numel() for noise in noises])):
            images[n, :, top:top + h, left:left + w] = part.view(images.shape[1], h, w)
    return images


def augment_batch(images, labels, num_classes, seed, erase=0.0, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Random erasing (probability `erase` per image), then mixup or cutmix for the whole batch
    (one of the two, even odds, when both alphas are on, as timm and torchvision's references
    switch); -> images and targets (class indices, or soft targets when mixed). All draws from
    `seed` (batch_seed)."""
    targets = labels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if erase > 0:
            images = random_erase_(images, erase)
        if mixup_alpha > 0 or cutmix_alpha > 0:
            use_cutmix = cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand(1).item() < 0.5)
            lam = beta_sample(cutmix_alpha if use_cutmix else mixup_alpha)
            if use_cutmix:
                images, targets = cutmix(images, labels, num_classes, cutmix_box(lam, *images.shape[-2:]))
            else:
                images, targets = mixup(images, labels, num_classes, lam)
    return images, targets


# ---------------------------------------------------------------------------------------------
# python data.py check DATA

def conversion(mode):
    """What load_rgb does to an image of PIL `mode` that is not RGB, in words."""
    if is_16_bit_gray(mode):
        return "16-bit grayscale, scaled to 8 bits" if mode != "I" else \
            "integer grayscale, scaled from 16 to 8 bits (above 65535: white)"
    return {"L": "grayscale, copied to R, G and B", "1": "black and white, copied to R, G and B",
            "P": "palette colours", "CMYK": "CMYK, converted to RGB", "F": "float grayscale, clipped to 0..255",
            "RGBA": "alpha dropped", "LA": "grayscale, alpha dropped", "PA": "palette colours, alpha dropped",
            }.get(mode, "converted to RGB")


def _inspect(path, encoded=None, shown=None):
    """(shown or path, problem or None, odd format or None) for one file (or its bytes `encoded`),
    decoded fully as load_rgb does."""
    try:
        with Image.open(path if encoded is None else io.BytesIO(encoded)) as img:
            fmt, mode, frames = img.format, img.mode, getattr(img, "n_frames", 1)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                img.load()
                transparent = "transparency" in img.info
    except Exception as e:  # every failure is a finding here, whatever its type
        return shown or path, f"{type(e).__name__}: {e}", None
    ext = os.path.splitext(path)[1].lower()
    odd = []
    if mode != "RGB":
        alpha = ", alpha dropped" if transparent and mode not in ("RGBA", "LA", "PA") else ""
        odd.append(f"mode {mode}, {conversion(mode)}{alpha}")
    if frames > 1:
        odd.append(f"{frames} frames, the first one used")
    if ext in (".jpg", ".jpeg") and fmt != "JPEG":
        odd.append(f"{fmt} file named {ext}")
    return shown or path, None, "; ".join(odd) or None


_CHECKED = {}  # split -> ShardFolder, in each process of `data.py check` on a pack


def _open_pack(pack):
    """Pool initializer of `data.py check` on a pack: the process's own ShardFolders."""
    index = read_pack_index(pack)
    _CHECKED.update({split: ShardFolder(pack, split, None, index=index) for split in index["splits"]})


def _inspect_packed(job):
    """_inspect for sample `index` of split `split`, read with its tar headers and label in one
    positioned read; a header that does not name this sample's file, size and label is a finding."""
    split, index = job
    folder = _CHECKED[split]
    (name, label), shard = folder.samples[index], int(folder.shard_of[index])
    offset, size, shown = int(folder.offsets[index]), int(folder.sizes[index]), f"{name} in {folder.shards[shard]}"
    span = tar_member_bytes(size) - TAR_BLOCK
    try:
        block = folder.read_span(shard, offset - TAR_BLOCK, span + 3 * TAR_BLOCK, f"sample {name}")
        header = tarfile.TarInfo.frombuf(block[:TAR_BLOCK], "utf-8", "surrogateescape")
        cls = tarfile.TarInfo.frombuf(block[TAR_BLOCK + span:2 * TAR_BLOCK + span], "utf-8", "surrogateescape")
        cls_text = block[2 * TAR_BLOCK + span:2 * TAR_BLOCK + span + cls.size]
    except DataError as e:
        return shown, str(e), None
    except tarfile.HeaderError as e:
        return shown, f"no tar header where the index says ({e}): pack again", None
    if (header.name, header.size, cls.name, cls_text) != (member_name(index, name), size,
                                                          member_name(index, name, label), str(label).encode()):
        return shown, f"the shard holds {header.name} ({header.size} bytes), {cls.name} = {cls_text[:10]!r} where the " \
                      f"index says {member_name(index, name)} ({size} bytes) of label {label}: pack again", None
    return _inspect(name, block[TAR_BLOCK:TAR_BLOCK + size], shown)


def check(root, workers):
    """Decode every image file under `root` (or every sample of the pack `root`); 1 if any is bad."""
    from multiprocessing import Pool

    from tqdm import tqdm
    start = None
    if is_pack(root):
        _open_pack(root)  # checks every shard's size here, before the pool starts
        jobs = [(split, i) for split, folder in _CHECKED.items() for i in range(len(folder))]
        skipped = [path for folder in _CHECKED.values() for path in folder.skipped_files]
        inspect, start = _inspect_packed, (_open_pack, (root,))
    else:
        files = sorted(os.path.join(d, f) for d, _, names in os.walk(root, followlinks=True) for f in names)
        jobs, inspect = [p for p in files if is_image_name(os.path.basename(p))], _inspect
        skipped = [p for p in files if not is_image_name(os.path.basename(p))]
    if not jobs:
        raise DataError(f"no image files under {root} ({', '.join(IMG_EXTENSIONS)})")
    bad, odd = [], []
    with Pool(workers, *(start or ())) as pool:
        for path, problem, oddity in tqdm(pool.imap_unordered(inspect, jobs, chunksize=64),
                                          total=len(jobs), desc="decoding", unit="img"):
            if problem:
                bad.append((path, problem))
            elif oddity:
                odd.append((path, oddity))
    for path in skipped:
        print(f"not an image (training skips it): {path}")
    for path, oddity in sorted(odd):
        print(f"odd format (loads as RGB): {path}: {oddity}")
    for path, problem in sorted(bad):
        print(f"UNDECODABLE: {path}: {problem}")
    print(f"checked {len(jobs)} {'samples' if is_pack(root) else 'files'}: {len(bad)} undecodable, {len(odd)} odd "
          f"formats; {len(skipped)} files skipped as not images")
    return 1 if bad else 0


# ---------------------------------------------------------------------------------------------
# python data.py sort-val VAL --labels FILE

WNID = re.compile(r"n[0-9]{8}")  # a WordNet id: the only class names sort-val creates folders for
LABEL_FILES = "expected LOC_val_solution.csv, one wnid per line, or the devkit's ILSVRC2012_validation_ground_truth.txt"


def read_label_lines(labels, expected=LABEL_FILES):
    """[(line number, text)] of the non-blank lines of a text file; DataError when it is not text or
    holds none (the message ends with `expected`)."""
    try:
        with open(labels, encoding="utf-8-sig") as f:
            lines = [(n, line.strip()) for n, line in enumerate(f, 1) if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{labels} is not a text file: {expected}") from None
    if not lines:
        raise DataError(f"{labels} is empty: {expected}")
    return lines


def wnid_at(labels, n, text):
    """`text`, the class of line `n` of `labels`, if it is a WordNet id: a plain folder name."""
    if not WNID.fullmatch(text):
        raise DataError(f"{labels} line {n}: class {text[:40]!r} is not a WordNet id (n and 8 digits, e.g. "
                        f"n01440764): sort-val makes a folder of each class, and takes no other names")
    return text


def read_kaggle_labels(labels, rows):
    """{image id: wnid} from LOC_val_solution.csv's rows [(line number, 'id,wnid x y x y ...')]."""
    labelled, line_of = {}, {}
    for n, text in rows:
        image_id, comma, prediction = text.partition(",")
        image_id, tokens = image_id.strip(), prediction.split()
        if not comma or not image_id or not tokens:
            raise DataError(f"{labels} line {n}: {text[:40]!r} is not 'ImageId,PredictionString' (e.g. "
                            f"'ILSVRC2012_val_00000001,n01751748 50 40 300 200')")
        if image_id in labelled:
            raise DataError(f"{labels} line {n}: image {image_id} again (first on line {line_of[image_id]})")
        labelled[image_id], line_of[image_id] = wnid_at(labels, n, tokens[0]), n
    if not labelled:
        raise DataError(f"{labels} has a header but no labels")
    return labelled


def read_devkit_meta(meta):
    """{ILSVRC2012_ID: wnid} of the 1000 leaf synsets in the devkit's meta.mat."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataError("reading the devkit's meta.mat needs scipy (pip install scipy), or use Kaggle's "
                        "LOC_val_solution.csv instead") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            synsets = loadmat(meta, squeeze_me=True)["synsets"]
        wnid_of = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    except OSError:
        raise
    except Exception as e:  # scipy's many ways to refuse a file that is not the devkit's
        raise DataError(f"{meta} is not the devkit's meta.mat ({type(e).__name__}: {e}); "
                        f"pass DEVKIT/data/meta.mat") from None
    bad = [w for w in wnid_of.values() if not WNID.fullmatch(w)]
    if not wnid_of or bad:
        problem = f"{bad[0][:40]!r} is not a WordNet id" if bad else "no leaf synsets"
        raise DataError(f"{meta} is not the devkit's meta.mat: {problem}; pass DEVKIT/data/meta.mat")
    return wnid_of


def read_val_labels(labels, meta=None):
    """The wnid of each val image from one of the three published label files:
    - Kaggle's LOC_val_solution.csv: {image id: wnid} (the first token of PredictionString);
    - one wnid per line in file-name order (e.g. TF-slim's imagenet_2012_validation_synset_labels.txt);
    - the devkit's ILSVRC2012_validation_ground_truth.txt (ILSVRC2012_IDs 1..1000 in file-name order,
      an order that is NOT the sorted-wnid one) with the devkit's meta.mat to map them (needs scipy).
    Returns a dict {image id: wnid} for the first, a list in file-name order for the others.
    The file is untrusted: the whole of it is checked, and every class must be a WordNet id (so a
    plain folder name, never a path), else DataError naming the line."""
    lines = read_label_lines(labels)
    if lines[0][1].replace(" ", "").lower().startswith("imageid,predictionstring"):
        return read_kaggle_labels(labels, lines[1:])
    if WNID.fullmatch(lines[0][1]):
        return [wnid_at(labels, n, text) for n, text in lines]
    if not re.fullmatch(r"[0-9]+", lines[0][1]):
        raise DataError(f"{labels} is not a val label file (line {lines[0][0]}: {lines[0][1][:40]!r}): {LABEL_FILES}")
    for n, text in lines:
        if not re.fullmatch(r"[0-9]+", text):
            raise DataError(f"{labels} line {n}: {text[:40]!r} is not an ILSVRC2012_ID (a number, 1 to 1000)")
    if meta is None:
        raise DataError(f"{labels} holds ILSVRC2012_IDs, whose order is not the wnids' order: add --meta "
                        f"DEVKIT/data/meta.mat to map them")
    wnid_of = read_devkit_meta(meta)
    for n, text in lines:
        if int(text) not in wnid_of:
            raise DataError(f"{labels} line {n} has ILSVRC2012_ID {int(text)}, which {meta} does not list as a class")
    return [wnid_of[int(text)] for _, text in lines]


def sort_val(val_dir, labels, meta=None, out=None):
    """Move (or, with `out`, hard-link) the loose val images of `val_dir` into <out or val_dir>/<wnid>/.
    Idempotent: images already in their class folder are left alone. Nothing is touched unless
    every image has a label and every label an image. Returns (placed now, already in place)."""
    if not os.path.isdir(val_dir):
        raise DataError(f"val folder {val_dir} does not exist")
    out = out or val_dir
    labelled = read_val_labels(labels, meta)
    loose = sorted(e.name for e in os.scandir(val_dir) if e.is_file() and is_image_name(e.name))
    placed = {e.name: c.name for c in os.scandir(out) if c.is_dir()
              for e in os.scandir(c.path) if e.is_file() and is_image_name(e.name)} if os.path.isdir(out) else {}
    if isinstance(labelled, list):  # in file-name order: pair with every image, loose or sorted
        names = sorted(set(loose) | set(placed))
        if len(names) != len(labelled):
            raise DataError(f"{labels} labels {len(labelled)} images but {val_dir} holds {len(names)}: "
                            f"is it the label file of this val set?")
        labelled = dict(zip(names, labelled))
    else:  # keyed by image id (file name without extension)
        ids = {os.path.splitext(name)[0]: name for name in set(loose) | set(placed)}
        unknown = sorted(set(ids) - set(labelled))
        missing = sorted(set(labelled) - set(ids))
        if unknown or missing:
            raise DataError(f"{labels} and {val_dir} disagree: {len(missing)} labelled images missing "
                            f"(e.g. {', '.join(missing[:2]) or '-'}), {len(unknown)} images without a label "
                            f"(e.g. {', '.join(unknown[:2]) or '-'})")
        labelled = {ids[i]: wnid for i, wnid in labelled.items()}
    wrong = [f"{name} in {placed[name]}/" for name in placed if labelled[name] != placed[name]]
    if wrong:
        raise DataError(f"{len(wrong)} images sit in another class folder than {labels} says "
                        f"(e.g. {wrong[0]}): was the folder sorted with another label file?")
    todo = [name for name in loose if name not in placed]
    for name in todo:
        os.makedirs(os.path.join(out, labelled[name]), exist_ok=True)
        src, dst = os.path.join(val_dir, name), os.path.join(out, labelled[name], name)
        if out == val_dir:
            os.replace(src, dst)
        else:
            os.link(src, dst)  # no copy of 6 GB: the same file under a second name
    return len(todo), len(placed)


def pack_command(data, out, shard_size):
    try:
        counts, already = pack(data, out, shard_size)
    except KeyboardInterrupt:
        print(f"error: packing stopped; the same command continues it (finished shards in {out} are kept)",
              file=sys.stderr)
        return 130
    done = ", ".join(f"{images} {split} images in {shards} shards" for split, (images, shards, _) in counts.items())
    print(f"{out} already holds this pack: {done}" if already else f"packed {done} into {out}; train and evaluate "
          f"with --data {out}")
    note = skipped_line([path for _, _, skipped in counts.values() for path in skipped])
    if note and not already:
        print(note)
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="ImageNet data tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("check", help="decode every image file under DATA and list the undecodable "
                                          "and odd ones (exit 1 on undecodable files)")
    p.add_argument("data", help="folder to scan (e.g. the ImageNet root)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    p = commands.add_parser("sort-val", help="sort the 50,000 loose val images into VAL/<wnid>/ folders")
    p.add_argument("val", help="the folder holding the val images (ILSVRC2012_val_*.JPEG)")
    p.add_argument("--labels", required=True, help="LOC_val_solution.csv (Kaggle), a file of one wnid per "
                   "line, or the devkit's ILSVRC2012_validation_ground_truth.txt (with --meta)")
    p.add_argument("--meta", default=None, help="the devkit's data/meta.mat (with the devkit's ground truth; needs scipy)")
    p.add_argument("--out", default=None, help="hard-link into OUT/<wnid>/ and leave VAL as it is (default: move within VAL)")
    p = commands.add_parser("pack", help="write DATA's train and val as tar shards (WebDataset's layout) with an "
                                         "index, for --data OUT; a rerun continues an unfinished packing")
    p.add_argument("data", help="the ImageNet root (DATA/train/<class>/*, DATA/val/<class>/*)")
    p.add_argument("out", help="a new or empty folder, or one that holds this packing unfinished")
    p.add_argument("--shard-size", type=parse_size, default=10 ** 9, metavar="SIZE",
                   help="most bytes a shard holds (but one sample at least), e.g. 1GB (the default), 500MB, 256MiB")
    args = parser.parse_args(argv)
    try:
        if args.command == "check":
            return check(args.data, max(1, args.workers))
        if args.command == "pack":
            return pack_command(args.data, args.out, args.shard_size)
        moved, present = sort_val(args.val, args.labels, args.meta, args.out)
        print(f"{'linked' if args.out else 'moved'} {moved} images into class folders of "
              f"{args.out or args.val}; {present} were already in place")
        return 0
    except (DataError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except utils.DiskFull as e:  # packing: the shard being written is removed, the finished ones kept
        print(f"error: {e}; free space and run the same command to continue", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
