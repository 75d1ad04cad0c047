"""One image into a sample (decode, crop, resize, augment), and the batch augmentations on the device.

Samples leave the workers as uint8 (H, W, 3) tensors. Randomness is a pure function of (seed, epoch,
sample index): a step's data never depends on workers, ranks, decoder or where a run resumed."""
import importlib
import io
import math
import random

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import v2

from utils import DataError


# Bytes to RGB pixels
def is_16_bit_gray(mode):
    """PIL's modes of 16-bit gray (and I: 16-bit PGM, 32-bit TIFF), which Pillow's RGB clips at 255."""
    return mode == "I" or mode.startswith("I;16")


def to_8_bit(img):
    """16-bit gray -> mode L, v >> 8 (the high byte, as Pillow keeps of 16-bit RGB); mode I clipped first."""
    values = np.asarray(img).astype(np.int64).clip(0, 65535)
    return Image.fromarray((values >> 8).astype(np.uint8))


def load_rgb(path, encoded=None):
    """An image file (or its bytes `encoded`) -> RGB PIL image, or DataError. GIFs give their first frame."""
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
                        f"`python prepare.py check DIR` lists every bad file)") from None


try:  # TorchCodec where it imports: torchvision 0.29 deprecates its decoders for it
    importlib.import_module("torchcodec.decoders")  # loads native libraries: may not match torch
    JPEG_DECODER = "torchcodec"
except (ImportError, OSError, RuntimeError):
    JPEG_DECODER = "torchvision"


def decode_jpegs(encoded, device="cpu"):
    """[JPEG bytes as uint8 CPU tensors] -> [(3, H, W) uint8 RGB on `device`] in one call (one batched
    nvJPEG call on CUDA). Any bad file fails the whole call with RuntimeError."""
    if JPEG_DECODER == "torchcodec":
        from torchcodec.decoders import decode_jpeg
        return decode_jpeg(list(encoded), mode="RGB", device=str(device))
    from torchvision.io import ImageReadMode, decode_jpeg
    return decode_jpeg(list(encoded), mode=ImageReadMode.RGB, device=device)


def takes_jpeg_decoder(encoded):
    """(width, height), and whether libjpeg-turbo / nvJPEG take these bytes: RGB or gray JPEGs without
    an EXIF rotation (TorchCodec applies it, PIL does not). (None, False) for a header PIL cannot read."""
    try:
        with Image.open(io.BytesIO(encoded)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return img.size, False
            return img.size, "exif" not in img.info or img.getexif().get(0x0112, 1) == 1
    except Exception:  # a bad header: PIL's full decode reports it with the path
        return None, False


def decode_rgb(path, encoded):
    """A file's bytes -> uint8 (H, W, 3) from libjpeg-turbo where it takes them, else PIL's RGB image."""
    if takes_jpeg_decoder(encoded)[1]:
        try:  # (3, H, W) out, in (H, W, 3) memory already
            return decode_jpegs([torch.frombuffer(bytearray(encoded), dtype=torch.uint8)])[0].permute(1, 2, 0)
        except RuntimeError:  # libjpeg warnings PIL tolerates are errors here: let PIL decide
            pass
    return load_rgb(path, encoded)


def to_uint8_hwc(img):
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True))


# One sample
def random_resized_crop_box(width, height, rng, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop box (left, top, right, bottom), drawn from `rng`."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target_area * aspect)), round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def resized_crop(pixels, box, size):
    """`box` of uint8 (H, W, 3) `pixels` -> (3, size, size), antialiased bicubic: torch's uint8 kernel,
    twice as fast as PIL's and within one level of it inside the crop."""
    left, top, right, bottom = box
    crop = pixels[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)  # a channels_last view
    return F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True)[0]


AUGMENTS = ("none", "autoaugment", "randaugment", "trivialaugment", "augmix")  # --augment
RANDAUGMENT_BINS = 31  # torchvision's default: bin b applies b/30 of each op's largest change


def randaugment_bin(magnitude):
    """timm's RandAugment magnitude (0..10, clipped) -> the nearest of torchvision's 31 bins."""
    return round(min(10.0, max(0.0, magnitude)) * 3)


def progressive_size(epoch, start, end, ramp_epochs):
    """--progressive-resize: the train size of `epoch`, from `start` to `end` at `ramp_epochs`, in
    steps of 32 px. A pure function of the epoch: a resumed run trains at the size it would have had."""
    if epoch >= ramp_epochs:
        return end
    size = start + (end - start) * epoch / ramp_epochs
    return min(end, max(32, 32 * round(size / 32)))


class TrainTransform:
    """RandomResizedCrop (bicubic) + flip [+ one --augment op], uint8 (H, W, 3) out, no float image. RandAugment's
    magnitude is timm's 0..10; with `magnitude_std` each of its two ops draws ~ N(magnitude, std), as timm's mstd."""

    def __init__(self, size, min_scale=0.08, autoaugment=False, augment=None, magnitude=9.0, magnitude_std=0.0,
                 resize_from=0, resize_epochs=0):
        self.size, self.scale, self.resize_from, self.resize_epochs = size, (min_scale, 1.0), resize_from, resize_epochs
        self.augment = augment or ("autoaugment" if autoaugment else "none")
        self.magnitude, self.magnitude_std = magnitude, magnitude_std
        bilinear = T.InterpolationMode.BILINEAR  # torchvision's ops at their defaults, bilinear as its reference
        self.op = {"none": None, "autoaugment": T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, bilinear),
                   # RandAugment: one op per magnitude bin, applied one at a time, so that each has its own
                   "randaugment": [T.RandAugment(1, b, RANDAUGMENT_BINS, bilinear) for b in range(RANDAUGMENT_BINS)],
                   "trivialaugment": T.TrivialAugmentWide(RANDAUGMENT_BINS, bilinear),
                   "augmix": T.AugMix(interpolation=bilinear)}[self.augment]

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
            # torchvision's ops draw from torch's global RNG: seeded from `rng`, inside fork_rng (the caller's stays)
            seed, ops = rng.getrandbits(63), [self.op]
            if self.augment == "randaugment":  # timm draws each op's magnitude; the ops' choice stays torchvision's
                ops = [self.op[randaugment_bin(rng.gauss(self.magnitude, self.magnitude_std) if self.magnitude_std > 0
                                               else self.magnitude)] for _ in range(2)]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                for op in ops:
                    x = op(x)
        return x.permute(1, 2, 0).contiguous()


class ValTransform:
    """torchvision's Resize(resize) + CenterCrop(size) on PIL images, uint8 (H, W, 3) out."""

    def __init__(self, size, resize, interpolation="bicubic"):
        self.size, self.resize = size, resize
        mode = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
        self.resize_crop = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size)])

    def __call__(self, img, rng=None, epoch=0):
        if isinstance(img, torch.Tensor):  # libjpeg-turbo's pixels: PIL resizes them as its own
            img = Image.fromarray(img.numpy())
        return to_uint8_hwc(self.resize_crop(img))


def sample_rng(seed, epoch, index, copy=0):
    """One sample's generator, from (seed, epoch, index) and its --repeated-aug copy (0: none)."""
    return random.Random(f"{seed}/{epoch}/{index}" if copy == 0 else f"{seed}/{epoch}/{index}/{copy}")


# Batch augmentation on the device, after normalisation. The draws are torchvision's own (tested equal),
# from torch's CPU generator seeded by batch_seed inside fork_rng: the run's random streams are untouched.

def batch_seed(seed, step, rank, micro):
    """The seed of micro-batch `micro` of optimizer step `step` on `rank`: a resumed run draws what it would have."""
    return random.Random(f"batch/{seed}/{step}/{rank}/{micro}").getrandbits(63)


def mix(images, labels, num_classes, lam, box=None):
    """Mixup (lam * own + (1 - lam) * partner) or, given `box`, cutmix (the partner's box pasted in, `lam` the
    area kept); one-hot targets mix by `lam`. The partner is timm's, the batch reversed (v2's is the one before)."""
    if box is None:
        images = images.flip(0).mul_(1.0 - lam).add_(images.mul(lam))  # torchvision's MixUp's rounding
    else:
        left, top, right, bottom = box
        images = images.clone()
        images[..., top:bottom, left:right] = images.flip(0)[..., top:bottom, left:right]
    targets = F.one_hot(labels, num_classes).to(images.dtype)
    return images, targets.flip(0).mul_(1.0 - lam).add_(targets.mul(lam))


def random_erase_(images, p, scale=(0.02, 1 / 3), ratio=(0.3, 10 / 3)):
    """timm's "pixel" random erasing in place, drawn as torchvision's RandomErasing(value="random") draws. All
    the noise reaches the device in one copy from pinned memory (torchvision's copies per image, each a sync)."""
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
                top, left = int(torch.randint(0, height - h + 1, (1,))), int(torch.randint(0, width - w + 1, (1,)))
                boxes.append((n, top, left, h, w))
                break
    if boxes:
        flat = torch.cat([noise.flatten() for noise in noises])
        flat = (flat.pin_memory() if images.is_cuda else flat).to(images.device, images.dtype, non_blocking=True)
        for (n, top, left, h, w), part in zip(boxes, flat.split([noise.numel() for noise in noises])):
            images[n, :, top:top + h, left:left + w] = part.view(images.shape[1], h, w)
    return images


def augment_batch(images, labels, num_classes, seed, erase=0.0, mixup_alpha=0.0, cutmix_alpha=0.0):
    """Random erasing, then mixup or cutmix (even odds when both are on, as timm switches) -> images,
    targets (soft when mixed). lam and the box are torchvision's v2 MixUp / CutMix draws."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if erase > 0:
            images = random_erase_(images, erase)
        if cutmix_alpha > 0 and (mixup_alpha == 0 or torch.rand(1).item() < 0.5):
            params = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes).make_params([images])
            return mix(images, labels, num_classes, params["lam_adjusted"], params["box"])
        if mixup_alpha > 0:
            params = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes).make_params([images])
            return mix(images, labels, num_classes, params["lam"])
    return images, labels
