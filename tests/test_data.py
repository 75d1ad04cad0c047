import importlib.util
import io
import multiprocessing
import os
import random
import struct
import subprocess
import sys
import threading
import time
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
from data import DataError, ShardSampler, TrainSampler, build_datasets, load_rgb
from utils import UsageError
from conftest import ROOT, make_folder, make_imagenet, photo


# ------------------------------------------------------------------------------------- samplers

@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [7, 10, 13, 50])
def test_val_shards_cover_every_index_exactly_once(world, size):
    seen = [i for rank in range(world) for i in ShardSampler(size, rank, world)]
    assert sorted(seen) == list(range(size))
    assert sum(len(ShardSampler(size, r, world)) for r in range(world)) == size


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [7, 10, 13, 50])
def test_train_shards_equal_complete_and_reshuffled(world, size):
    shards = [TrainSampler(size, rank, world, seed=5) for rank in range(world)]
    epoch0 = [[i for i, _ in s] for s in shards]
    lengths = {len(s) for s in shards} | {len(e) for e in epoch0}
    assert lengths == {-(-size // world)}  # ceil: equal on every rank
    union = [i for e in epoch0 for i in e]
    assert set(union) == set(range(size)) and len(union) - size < world  # padding only to even out
    for s in shards:
        s.set_epoch(1)
    epoch1 = [[i for i, _ in s] for s in shards]
    assert epoch1 != epoch0 and {e for s in shards for _, e in s} == {1}
    # DistributedSampler's permutation: same indices as torch's sampler for the same seed and epoch.
    reference = torch.utils.data.DistributedSampler(range(size), world, 0, shuffle=True, seed=5)
    reference.set_epoch(1)
    assert epoch1[0] == list(reference)


def test_train_sampler_skip_resumes_with_the_next_samples():
    # `skip` counts what all ranks used together: 10 steps of one sample on each of 3 ranks here.
    sampler = TrainSampler(100, rank=1, world_size=3, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=30)
    assert len(full) == 34 and len(sampler) == 24  # 70 left, padded to 72
    assert list(sampler)[:23] == full[10:33]  # the last one of each is padding


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (4, 2), (2, 3)])
def test_train_sampler_continues_an_epoch_on_another_world_size(before, after):
    # 50 images, global batch 12: 4 steps; 2 taken on `before` ranks, the other 2 on `after` ranks.
    size, global_batch, steps, taken = 50, 12, 4, 2

    def used(world, skip, count):
        per_rank = count * global_batch // world
        ranks = [TrainSampler(size, r, world, seed=3) for r in range(world)]
        for sampler in ranks:
            sampler.set_epoch(2, skip=skip)
        return [i for sampler in ranks for i, _ in list(sampler)[:per_rank]]

    resumed = used(before, 0, taken) + used(after, taken * global_batch, steps - taken)
    uninterrupted = used(before, 0, steps)
    assert len(resumed) == len(set(resumed)) == steps * global_batch
    assert set(resumed) == set(uninterrupted)


# ----------------------------------------------------------------------------------- decoding

def test_odd_files_load_as_rgb(tmp_path):
    base = photo(40, 30)
    Image.fromarray(base[..., 0]).save(tmp_path / "gray.jpg")
    Image.fromarray(base).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.dstack([base, np.full((30, 40), 128, np.uint8)])).save(tmp_path / "rgba.png")
    palette = Image.fromarray(base).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.fromarray(base).save(tmp_path / "png_named.JPEG", "PNG")
    for name in ("gray.jpg", "cmyk.jpg", "rgba.png", "palette.png", "png_named.JPEG"):
        img = load_rgb(str(tmp_path / name))
        assert img.mode == "RGB" and img.size == (40, 30), name
        out = data.ValTransform(24, 30)(img)
        assert out.shape == (24, 24, 3) and out.dtype == torch.uint8, name
    # CMYK really is converted (not read as garbage): close to the original colours.
    cmyk = np.asarray(load_rgb(str(tmp_path / "cmyk.jpg")), dtype=np.float32)
    assert np.abs(cmyk - base).mean() < 8


def png_16_bit(path, values):
    """Write uint16 (H, W) or (H, W, 3) `values` as a 16-bit gray or RGB PNG (PIL writes no 16-bit RGB)."""
    h, w = values.shape[:2]
    color = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)  # filter 0 per row
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def pnm_16_bit(path, values):
    """Write uint16 `values` as a PGM (H, W) or PPM (H, W, 3) of maxval 65535."""
    h, w = values.shape[:2]
    with open(path, "wb") as f:
        f.write(b"P6" if values.ndim == 3 else b"P5")
        f.write(b" %d %d 65535\n" % (w, h) + values.astype(">u2").tobytes())


SIXTEEN_BIT_FILES = {  # name: (writer of uint16 values, the mode Pillow 13 opens the file as)
    "gray.png": (png_16_bit, "I;16"),
    "gray_big_endian.tif": (lambda p, v: Image.frombytes("I;16B", v.shape[::-1], v.astype(">u2").tobytes()).save(p),
                            "I;16B"),
    "gray.tif": (lambda p, v: Image.fromarray(v).save(p), "I;16"),
    "gray.pgm": (pnm_16_bit, "I"),
    "gray_32_bit.tif": (lambda p, v: Image.fromarray(v.astype(np.int32)).save(p), "I"),
    "rgb.png": (png_16_bit, "RGB"),
    "rgb.ppm": (pnm_16_bit, "RGB"),
}


@pytest.mark.parametrize("name", sorted(SIXTEEN_BIT_FILES))
def test_16_bit_images_scale_to_8_bits(tmp_path, name):
    write, mode = SIXTEEN_BIT_FILES[name]
    eight = photo(40, 30, seed=3)
    if not name.startswith("rgb"):
        eight = eight[..., 1]
    path = str(tmp_path / name)
    write(path, eight.astype(np.uint16) * 257)  # v * 257: the 16-bit value of 8-bit level v
    with Image.open(path) as img:
        assert img.mode == mode  # the variant this case covers
    expected = np.asarray(Image.fromarray(eight).convert("RGB"), np.int16)
    encoded = data.read_file(path)
    assert data.takes_jpeg_decoder(encoded) == ((40, 30), False)  # PIL's path, not libjpeg-turbo's
    for decoded in (load_rgb(path), data.decode_rgb(path, encoded)):
        assert isinstance(decoded, Image.Image) and decoded.mode == "RGB"
        pixels = np.asarray(decoded, np.int16)
        assert np.abs(pixels - expected).max() <= 1  # clipped, 16-bit grey levels would be 255
        assert abs(pixels.mean() - expected.mean()) <= 1
    said = {"RGB": None,  # Pillow itself keeps the high bytes of 16-bit RGB: nothing to report
            "I": "mode I, integer grayscale, scaled from 16 to 8 bits (above 65535: white)"}
    assert data._inspect(path)[2] == said.get(mode, f"mode {mode}, 16-bit grayscale, scaled to 8 bits")


def test_every_16_bit_gray_mode_keeps_the_high_byte():
    values = np.array([[0, 255, 256, 4660, 32768, 65535]], np.uint16)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")):
        img = Image.frombytes(mode, (6, 1), values.astype(dtype).tobytes())
        assert np.asarray(data.to_8_bit(img)).tolist() == [[0, 0, 1, 18, 128, 255]], mode
    wide = Image.fromarray(np.array([[-5, 4660, 70000]], np.int32))  # mode I: clipped to 16 bits first
    assert np.asarray(data.to_8_bit(wide)).tolist() == [[0, 18, 255]]


def test_gif_loads_its_first_frame(tmp_path):
    flat = np.zeros((30, 40, 3), np.uint8)  # three flat colours: a GIF palette holds them exactly
    flat[:15, :20], flat[:15, 20:], flat[15:] = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    frames = [Image.fromarray(flat), Image.fromarray(255 - flat)]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.array_equal(np.asarray(load_rgb(path)), flat)
    assert data._inspect(path)[2] == "mode P, palette colours; 2 frames, the first one used"
    make_folder(str(tmp_path / "set"), ("a",), per_class=1)
    os.replace(path, tmp_path / "set" / "a" / "anim.gif")
    dataset = data.ImageFolder(str(tmp_path / "set"), data.ValTransform(24, 28))
    assert [os.path.basename(p) for p, _ in dataset.samples] == ["a_0.jpeg", "anim.gif"]
    assert dataset.skipped_files == [] and dataset[1][0].shape == (24, 24, 3)


def test_truncated_and_garbage_files_raise_with_their_path(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo(200, 150)).save(buf, "JPEG")
    truncated = tmp_path / "truncated.JPEG"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    garbage = tmp_path / "garbage.JPEG"
    garbage.write_bytes(b"not an image at all")
    for path in (truncated, garbage):
        with pytest.raises(DataError, match=str(path)):
            load_rgb(str(path))


def test_bad_file_in_a_worker_names_the_file(tmp_path):
    root = make_imagenet(tmp_path)
    bad = os.path.join(root, "train", "b", "b_1.jpeg")
    open(bad, "wb").write(b"\xff\xd8\xff\xe0 truncated")
    train, _ = build_datasets(root, 32, 40)
    loader = data.build_loader(train, TrainSampler(len(train)), 4, workers=1, train=True)
    with pytest.raises(DataError, match="b_1.jpeg"):
        list(loader)


# --------------------------------------------------------------------------------- transforms

def test_val_transform_equals_torchvision_resize_center_crop():
    reference = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.PILToTensor()])
    for w, h in [(64, 48), (48, 64), (50, 50), (77, 41)]:
        img = Image.fromarray(photo(w, h, seed=w))
        ours = data.ValTransform(32, 40)(img)
        assert torch.equal(ours.permute(2, 0, 1), reference(img)), (w, h)


def test_train_crop_matches_torchvision_resized_crop():
    img = Image.fromarray(photo(120, 90))
    pixels = data.to_uint8_hwc(img)
    for seed in range(8):
        left, top, right, bottom = data.random_resized_crop_box(120, 90, random.Random(seed))
        ours = data.resized_crop(pixels, (left, top, right, bottom), 48).permute(1, 2, 0).numpy().astype(np.int16)
        reference = np.asarray(T.functional.resized_crop(
            img, top, left, bottom - top, right - left, [48, 48], T.InterpolationMode.BICUBIC), np.int16)
        diff = np.abs(ours - reference)
        # torch's uint8 bicubic vs PIL's: at most one level of rounding inside; edge pixels see the
        # neighbours outside the box and may differ by a few levels.
        assert diff[3:-3, 3:-3].max() <= 1
        assert diff.max() <= 8 and diff.mean() < 0.5


def test_random_resized_crop_box_statistics():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = data.random_resized_crop_box(500, 375, rng)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        areas.append((right - left) * (bottom - top) / (500 * 375))
        ratios.append((right - left) / (bottom - top))
    assert 0.07 < min(areas) < 0.1 and max(areas) > 0.95
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    # Tall images with no valid crop fall back to the centre crop with the ratio clamped to 3/4.
    assert data.random_resized_crop_box(10, 1000, random.Random(0), scale=(0.99, 1.0)) == (0, 493, 10, 506)


def test_train_samples_depend_only_on_seed_epoch_index(tmp_path):
    root = make_imagenet(tmp_path)
    train, _ = build_datasets(root, 32, 40, seed=3, autoaugment=True)
    a, b = train[(5, 2)], train[(5, 2)]
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(train[(5, 3)][0], a[0])
    state = torch.random.get_rng_state()
    train[(1, 0)]
    assert torch.equal(state, torch.random.get_rng_state())  # AutoAugment left the global RNG alone
    assert a[0].shape == (32, 32, 3) and a[0].dtype == torch.uint8


def test_loader_batches_identical_with_and_without_workers(tmp_path):
    root = make_imagenet(tmp_path, train=6)
    train, _ = build_datasets(root, 32, 40, seed=1)
    batches = []
    for workers in (0, 2):
        sampler = TrainSampler(len(train), 0, 1, seed=1)
        sampler.set_epoch(3)
        loader = data.build_loader(train, sampler, 4, workers, train=True)
        batches.append([(x.clone(), y.clone()) for x, y in loader])
    assert len(batches[0]) == len(batches[1]) == 18 // 4
    for (x0, y0), (x1, y1) in zip(*batches):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


# ------------------------------------------------------------------------------- device side

@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_device_normalisation_equals_totensor_normalize(device):
    images = [Image.fromarray(photo(40, 32, seed=i)) for i in range(3)]
    references = [T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(T.ToTensor()(img)) for img in images]
    # Three batches: on CUDA the next one is copied and normalised on a side stream meanwhile.
    batches = [(torch.stack([data.to_uint8_hwc(img)] * 2), torch.tensor([i, i])) for i, img in enumerate(images)]
    if device == "cuda":  # as the loader's pin_memory delivers them
        batches = [(x.pin_memory(), y.pin_memory()) for x, y in batches]
    for channels_last in (False, True):
        out = list(data.DeviceLoader(batches, device, channels_last))
        assert len(out) == 3
        for i, (x, y) in enumerate(out):
            assert x.shape == (2, 3, 32, 40) and x.dtype == torch.float32 and x.device.type == device
            assert x.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            assert y.tolist() == [i, i]
            assert (x[1].cpu() - references[i]).abs().max().item() < 1e-6


def test_mixup_blends_images_and_targets():
    images = torch.arange(3 * 3 * 2 * 2, dtype=torch.float32).view(3, 3, 2, 2)
    mixed, targets = data.mixup(images, torch.tensor([0, 2, 1]), 4, lam=0.7)
    torch.testing.assert_close(mixed[0], 0.7 * images[0] + 0.3 * images[2])
    # partners are samples 2, 1, 0 (labels 1, 2, 0)
    torch.testing.assert_close(targets, torch.tensor([[0.7, 0.3, 0.0, 0.0],
                                                      [0.0, 0.0, 1.0, 0.0],
                                                      [0.3, 0.7, 0.0, 0.0]]))


# ----------------------------------------------------------------------------- layout errors

def test_layout_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_datasets(str(tmp_path / "nowhere"), 32, 40)
    root = make_imagenet(tmp_path / "ok")
    os.makedirs(os.path.join(root, "train", "d"))
    with pytest.raises(DataError, match=r"class folder .*train/d has no images"):
        build_datasets(root, 32, 40)
    make_folder(os.path.join(root, "train"), ("d",))
    with pytest.raises(DataError, match=r"different class folders \(only in train: d; only in val: -\)"):
        build_datasets(root, 32, 40)
    flat = tmp_path / "flat"
    make_folder(str(flat / "train"))
    os.makedirs(flat / "val")
    Image.fromarray(photo(20, 20)).save(flat / "val" / "x.JPEG")
    with pytest.raises(DataError, match=r"val has no class folders"):
        build_datasets(str(flat), 32, 40)
    only_val = tmp_path / "only_val"
    make_folder(str(only_val / "val"))
    with pytest.raises(DataError, match=r"only_val/train does not exist"):
        build_datasets(str(only_val), 32, 40)


def test_image_folder_names_what_it_leaves_out(tmp_path):
    root = make_imagenet(tmp_path / "data")
    a = os.path.join(root, "train", "a")
    open(os.path.join(a, ".DS_Store"), "wb").write(b"\0\0\0\1Bud1")
    open(os.path.join(a, "._a_0.jpeg"), "wb").write(b"\0\5\x16\7 macOS resource fork")  # not a JPEG
    open(os.path.join(a, "notes.txt"), "w").write("where these came from")
    open(os.path.join(a, "photo.heic"), "wb").write(b"ftypheic")
    os.symlink(os.path.join(a, "gone.jpeg"), os.path.join(a, "broken.jpeg"))
    make_folder(os.path.join(a, "more"), ("x",), per_class=1)  # a nested folder: not searched
    train, val = build_datasets(root, 32, 40)
    assert len(train) == 12 and not any(os.path.basename(p).startswith(".") for p, _ in train.samples)
    names = [".DS_Store", "._a_0.jpeg", "broken.jpeg", "more" + os.sep, "notes.txt", "photo.heic"]
    assert train.skipped_files == [os.path.join(a, n) for n in names] and val.skipped_files == []
    assert data.skipped_note(train, val) == ("skipped 6 files and folders that are not images: "
                                             + ", ".join(os.path.join(a, n) for n in names[:5]) + " and 1 more")
    assert data.skipped_note(val) is None
    loader = data.build_loader(train, TrainSampler(len(train)), 4, workers=0, train=True)
    assert sum(len(y) for _, y in loader) == 12  # the ._ file is never decoded
    os.makedirs(os.path.join(root, "val", "d"))  # a class folder of nothing but non-images: refused, named
    open(os.path.join(root, "val", "d", "notes.txt"), "w").write("-")
    with pytest.raises(DataError, match=r"val/d has no images \(.*\.gif\), only .*val/d/notes\.txt; remove it"):
        data.ImageFolder(os.path.join(root, "val"), None)


def test_check_command_lists_skipped_files_and_what_odd_formats_become(tmp_path, capsys):
    root = make_imagenet(tmp_path)
    a = os.path.join(root, "train", "a")
    open(os.path.join(a, "._a_0.jpeg"), "wb").write(b"\0\5\x16\7 macOS resource fork")
    open(os.path.join(a, "notes.txt"), "w").write("-")
    gray16 = os.path.join(a, "gray16.png")
    Image.fromarray(photo(30, 20)[..., 0].astype(np.uint16) * 257).save(gray16)
    assert data.main(["check", root, "--workers", "1"]) == 0  # skipped files are no error
    out = capsys.readouterr().out
    assert f"not an image (training skips it): {os.path.join(a, '._a_0.jpeg')}\n" in out
    assert f"not an image (training skips it): {os.path.join(a, 'notes.txt')}\n" in out
    assert f"odd format (loads as RGB): {gray16}: mode I;16, 16-bit grayscale, scaled to 8 bits\n" in out
    assert "checked 22 files: 0 undecodable, 1 odd formats; 2 files skipped as not images" in out


# ------------------------------------------------------------------------------ built-in data

def test_demo_and_synthetic_are_deterministic():
    train, val = build_datasets("demo", 48, 56, seed=0)
    assert len(train) == data.DEMO_SIZES["train"] and len(val) == data.DEMO_SIZES["val"]
    again, _ = build_datasets("demo", 48, 56, seed=0)
    x, y = train[(7, 1)]
    assert torch.equal(x, again[(7, 1)][0]) and y == 7 % 10 and x.shape == (48, 48, 3)
    assert sorted(train[i][1] for i in range(10)) == list(range(10))
    s_train, s_val = build_datasets("synthetic", 32, 36, seed=0)
    assert len(s_train) == 1_281_167 and len(s_val) == 50_000
    assert torch.equal(s_train[3][0], build_datasets("synthetic", 32, 36, seed=0)[0][3][0])
    assert s_train[3][0].shape == (32, 32, 3) and 0 <= s_train[3][1] < 1000


def test_folder_named_like_a_built_in_set_is_refused_not_shadowed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(build_datasets("demo", 32, 36)[1]) == data.DEMO_SIZES["val"]  # no ./demo: the built-in set
    make_imagenet(tmp_path / "demo")
    os.makedirs(tmp_path / "synthetic")
    for name in ("demo", "synthetic"):
        with pytest.raises(DataError, match=rf"^--data {name} names the built-in {name} set, but \./{name} is also "
                                            rf"a folder here: pass --data \./{name} to train on the folder"):
            build_datasets(name, 32, 36)
    train, val = build_datasets("./demo", 32, 36)
    assert isinstance(train, data.ImageFolder) and val.classes == ["a", "b", "c"] and len(train) == 12
    assert build_datasets("demo/", 32, 36)[1].classes == ["a", "b", "c"]


# ----------------------------------------------------------------------------- data.py check

def test_check_command_reports_bad_and_odd_files(tmp_path):
    root = make_imagenet(tmp_path)
    run = lambda: subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "check", root,
                                  "--workers", "2"], capture_output=True, text=True, timeout=120)
    result = run()
    assert result.returncode == 0, result.stderr
    assert "checked 21 files: 0 undecodable, 0 odd formats" in result.stdout
    Image.fromarray(photo(30, 30)).convert("CMYK").save(os.path.join(root, "val", "a", "cmyk.JPEG"))
    bad = os.path.join(root, "train", "c", "c_2.jpeg")
    open(bad, "r+b").truncate(300)
    result = run()
    assert result.returncode == 1
    assert f"UNDECODABLE: {bad}" in result.stdout
    assert "cmyk.JPEG: mode CMYK" in result.stdout
    assert "checked 22 files: 1 undecodable, 1 odd formats" in result.stdout


# -------------------------------------------------------------------------- data.py sort-val

def make_loose_val(folder, wnids):
    """Val as downloaded: ILSVRC2012_val_<n>.JPEG files in one folder, image n of class wnids[n-1]."""
    os.makedirs(folder)
    for n in range(1, len(wnids) + 1):
        Image.fromarray(photo(20, 16, seed=n)).save(os.path.join(folder, f"ILSVRC2012_val_{n:08d}.JPEG"))
    return folder


def run_sort_val(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "sort-val", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_sort_val_from_kaggle_csv_moves_once_and_loads_as_image_folder(tmp_path):
    wnids = ["n01440764", "n01443537", "n01440764", "n01484850", "n01443537", "n01484850"]
    val = make_loose_val(tmp_path / "val", wnids)
    csv = tmp_path / "LOC_val_solution.csv"
    rows = [f"ILSVRC2012_val_{n:08d},{w} 1 2 30 40 {w} 5 6 7 8" for n, w in enumerate(wnids, 1)]
    csv.write_text("ImageId,PredictionString\n" + "\n".join(reversed(rows)) + "\n")  # any row order
    before = {n: os.stat(val / f"ILSVRC2012_val_{n:08d}.JPEG").st_ino for n in range(1, 7)}
    result = run_sort_val(val, "--labels", csv)
    assert result.returncode == 0, result.stderr
    assert "moved 6 images" in result.stdout and "0 were already in place" in result.stdout
    dataset = data.ImageFolder(str(val), transform=lambda img, rng: img)
    assert dataset.classes == sorted(set(wnids))
    assert sorted((os.path.basename(p), dataset.classes[c]) for p, c in dataset.samples) == sorted(
        (f"ILSVRC2012_val_{n:08d}.JPEG", w) for n, w in enumerate(wnids, 1))
    # Moved, not copied: the same inodes.
    assert {n: os.stat(val / wnids[n - 1] / f"ILSVRC2012_val_{n:08d}.JPEG").st_ino for n in range(1, 7)} == before
    again = run_sort_val(val, "--labels", csv)
    assert again.returncode == 0 and "moved 0 images" in again.stdout and "6 were already in place" in again.stdout


def test_sort_val_from_wnid_list_links_into_another_folder(tmp_path):
    wnids = ["n00000002", "n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "flat", wnids)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(wnids) + "\n")
    out = tmp_path / "val"
    result = run_sort_val(val, "--labels", labels, "--out", out)
    assert result.returncode == 0, result.stderr
    assert "linked 4 images" in result.stdout
    for n, w in enumerate(wnids, 1):
        name = f"ILSVRC2012_val_{n:08d}.JPEG"
        assert os.path.samefile(val / name, out / w / name)  # a hard link: no second copy
    assert run_sort_val(val, "--labels", labels, "--out", out).stdout.startswith("linked 0 images")


def test_sort_val_refuses_mismatches_and_touches_nothing(tmp_path):
    wnids = ["n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "val", wnids)
    short = tmp_path / "short.txt"
    short.write_text("n00000001\nn00000002\n")
    result = run_sort_val(val, "--labels", short)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "labels 2 images but" in result.stderr and "holds 3" in result.stderr
    csv = tmp_path / "LOC_val_solution.csv"
    csv.write_text("ImageId,PredictionString\nILSVRC2012_val_00000001,n00000001 1 2 3 4\n"
                   "ILSVRC2012_val_00000009,n00000002 1 2 3 4\nILSVRC2012_val_00000003,n00000001 1 2 3 4\n")
    result = run_sort_val(val, "--labels", csv)
    assert result.returncode == 2 and "ILSVRC2012_val_00000009" in result.stderr
    assert "ILSVRC2012_val_00000002" in result.stderr
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n171\n")
    result = run_sort_val(val, "--labels", devkit)
    assert result.returncode == 2 and "--meta" in result.stderr
    assert sorted(os.listdir(val)) == [f"ILSVRC2012_val_{n:08d}.JPEG" for n in (1, 2, 3)]  # untouched
    # Sorted with one file, then offered another that disagrees: refused.
    good = tmp_path / "good.txt"
    good.write_text("\n".join(wnids) + "\n")
    assert run_sort_val(val, "--labels", good).returncode == 0
    swapped = tmp_path / "swapped.txt"
    swapped.write_text("n00000002\nn00000001\nn00000001\n")
    result = run_sort_val(val, "--labels", swapped)
    assert result.returncode == 2 and "another class folder" in result.stderr


def tree(folder):
    """Every path under `folder`, relative: a snapshot to compare before and after."""
    return sorted(os.path.relpath(os.path.join(d, n), folder)
                  for d, dirs, files in os.walk(folder) for n in dirs + files)


def sort_val_refused(capsys, val, *args):
    """data.main's sort-val on `val` must fail with one line and exit 2; returns that line."""
    assert data.main(["sort-val", str(val), *map(str, args)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured
    return captured.err


def kaggle_csv(path, rows):
    path.write_text("ImageId,PredictionString\n" + "".join(row + "\n" for row in rows))
    return path


def write_meta(path, synsets):
    """A devkit meta.mat of synsets [(ILSVRC2012_ID, wnid, num_children)]."""
    from scipy.io import savemat
    savemat(str(path), {"synsets": np.array(synsets, dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"),
                                                             ("num_children", "O")])})
    return path


@pytest.mark.parametrize("label", ["../x", "OUTSIDE", "a/b", "..", ".", ".hidden", "n00000001/../../x", "n0000001"])
@pytest.mark.parametrize("form", ["csv", "list", "meta"])
def test_sort_val_takes_only_class_names_and_moves_nothing_else(tmp_path, capsys, form, label):
    label = str(tmp_path / "outside") if label == "OUTSIDE" else label
    wnids = ["n00000001", "n00000002", "n00000001"]
    val = make_loose_val(tmp_path / "val", wnids)
    bad = wnids[:2] + [label]  # the last line only: the whole file is checked before anything moves
    labels, meta = tmp_path / "labels.txt", tmp_path / "meta.mat"
    if form == "csv":
        kaggle_csv(labels, [f"ILSVRC2012_val_{n:08d},{w} 1 2 3 4" for n, w in enumerate(bad, 1)])
    elif form == "list":
        labels.write_text("\n".join(bad) + "\n")
    else:
        pytest.importorskip("scipy")
        write_meta(meta, [(i, w, 0) for i, w in enumerate(bad, 1)])
        labels.write_text("1\n2\n3\n")
    before = tree(tmp_path)
    error = sort_val_refused(capsys, val, "--labels", labels, *(["--meta", meta] if form == "meta" else []))
    assert repr(label[:40]) in error and "is not a WordNet id" in error
    named = {"csv": f"{labels} line 4: class ", "list": f"{labels} line 3: class ",  # the header is line 1
             "meta": f"{meta} is not the devkit's meta.mat: "}[form]
    assert error.startswith("error: " + named)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("case", ["no comma", "empty prediction", "empty image id", "header only", "twice",
                                  "binary", "empty", "blank lines", "not labels", "word among ids"])
def test_sort_val_malformed_label_files_give_one_line(tmp_path, capsys, case):
    val = make_loose_val(tmp_path / "val", ["n00000001", "n00000002"])
    labels = tmp_path / "labels"
    row1 = "ILSVRC2012_val_00000001,n00000001 1 2 3 4"
    content, expected = {
        "no comma": ([row1, "ILSVRC2012_val_00000002 n00000002 1 2 3 4"], "line 3: 'ILSVRC2012_val_00000002 n0000"),
        "empty prediction": ([row1, "ILSVRC2012_val_00000002,"], "line 3: 'ILSVRC2012_val_00000002,' is not 'ImageId,"),
        "empty image id": ([row1, ",n00000002 1 2 3 4"], "line 3: ',n00000002 1 2 3 4' is not 'ImageId,"),
        "header only": ([], "has a header but no labels"),
        "twice": ([row1, row1.replace("n00000001", "n00000002")],
                  "line 3: image ILSVRC2012_val_00000001 again (first on line 2)"),
    }.get(case, (None, None))
    if content is not None:
        kaggle_csv(labels, content)
    elif case == "binary":
        buf = io.BytesIO()
        Image.fromarray(photo(20, 20)).save(buf, "JPEG")
        labels.write_bytes(buf.getvalue())
        expected = "is not a text file"
    elif case in ("empty", "blank lines"):
        labels.write_text("" if case == "empty" else "\n  \n\n")
        expected = "is empty"
    elif case == "not labels":
        labels.write_text("cat\ndog\n")
        expected = "is not a val label file (line 1: 'cat')"
    else:
        labels.write_text("490\nn00000001\n")
        expected = "line 2: 'n00000001' is not an ILSVRC2012_ID"
    before = tree(tmp_path)
    error = sort_val_refused(capsys, val, "--labels", labels)
    assert error.startswith(f"error: {labels}") and expected in error
    assert tree(tmp_path) == before


def test_sort_val_devkit_ground_truth_with_meta(tmp_path, capsys):
    """The devkit form end to end (needs scipy), and its meta.mat checked: a file that is not one,
    an ID it does not list, a synset with children (not a class)."""
    wnids = ["n00000002", "n00000001", "n00000002"]
    val = make_loose_val(tmp_path / "val", wnids)
    open(val / "._ILSVRC2012_val_00000001.JPEG", "wb").write(b"\0\5\x16\7")  # macOS metadata: not an image
    truth = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    truth.write_text("2\n1\n2\n")
    if importlib.util.find_spec("scipy") is None:
        assert "needs scipy" in sort_val_refused(capsys, val, "--labels", truth, "--meta", tmp_path / "meta.mat")
        pytest.skip("scipy is not installed: the devkit form is refused, in one line")
    garbage = tmp_path / "garbage.mat"
    garbage.write_bytes(b"MATLAB? no. " * 20)
    before = tree(tmp_path)
    assert sort_val_refused(capsys, val, "--labels", truth, "--meta", garbage).startswith(
        f"error: {garbage} is not the devkit's meta.mat (ValueError: ")
    meta = write_meta(tmp_path / "meta.mat", [(1, "n00000001", 0), (2, "n00000002", 0), (3, "n00000003", 2)])
    truth3 = tmp_path / "truth3.txt"
    truth3.write_text("2\n3\n2\n")
    assert f"line 2 has ILSVRC2012_ID 3, which {meta} does not list as a class" in sort_val_refused(
        capsys, val, "--labels", truth3, "--meta", meta)
    assert tree(tmp_path) == sorted(before + ["meta.mat", "truth3.txt"])
    assert data.main(["sort-val", str(val), "--labels", str(truth), "--meta", str(meta)]) == 0
    assert "moved 3 images" in capsys.readouterr().out
    assert tree(val) == ["._ILSVRC2012_val_00000001.JPEG",  # left where it was
                         "n00000001", "n00000001/ILSVRC2012_val_00000002.JPEG", "n00000002",
                         "n00000002/ILSVRC2012_val_00000001.JPEG", "n00000002/ILSVRC2012_val_00000003.JPEG"]


# ------------------------------------------------------------------- faster decoding, GPU path

def jpeg_variants(folder):
    """Photo-like files of every kind the loaders meet: JPEGs in several encodings, and the ones
    libjpeg-turbo / nvJPEG must not take (PNG, CMYK, a PNG named .JPEG, an EXIF-rotated JPEG)."""
    os.makedirs(folder, exist_ok=True)
    files = {}
    for i, (w, h, options) in enumerate([(120, 90, {}), (90, 120, {"subsampling": 0}),
                                         (101, 77, {"progressive": True}), (64, 64, {"quality": 60})]):
        files[f"rgb{i}.JPEG"] = (Image.fromarray(photo(w, h, seed=i)), "JPEG", options)
    files["gray.JPEG"] = (Image.fromarray(photo(80, 60, seed=9)[..., 0]), "JPEG", {})
    files["cmyk.JPEG"] = (Image.fromarray(photo(70, 100, seed=7)).convert("CMYK"), "JPEG", {})
    files["png.png"] = (Image.fromarray(photo(96, 72, seed=8)), "PNG", {})
    files["png_named.JPEG"] = (Image.fromarray(photo(72, 96, seed=6)), "PNG", {})
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: TorchCodec would apply it, PIL does not
    files["rotated.JPEG"] = (Image.fromarray(photo(110, 80, seed=5)), "JPEG", {"exif": exif.tobytes()})
    for name, (img, fmt, options) in files.items():
        img.save(os.path.join(folder, name), fmt, **options)
    return sorted(files)


def test_libjpeg_turbo_decodes_what_it_takes_with_pils_pixels(tmp_path):
    names = jpeg_variants(str(tmp_path))
    turbo = {"rgb0.JPEG", "rgb1.JPEG", "rgb2.JPEG", "rgb3.JPEG", "gray.JPEG"}
    val, train = data.ValTransform(48, 56), data.TrainTransform(40)
    for name in names:
        path = str(tmp_path / name)
        decoded = data.decode_rgb(path, data.read_file(path))
        assert isinstance(decoded, torch.Tensor) == (name in turbo), name
        reference = load_rgb(path)
        if name in turbo:
            assert torch.equal(decoded, data.to_uint8_hwc(reference)), name
        # Evaluation pixels equal PIL's decode + resize exactly; training crops too.
        assert torch.equal(val(decoded), val(reference)), name
        assert torch.equal(train(decoded, random.Random(name)), train(reference, random.Random(name))), name


def test_turbo_failure_falls_back_to_pil_which_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo(200, 150)).save(buf, "JPEG")
    path = tmp_path / "cut.JPEG"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header is whole, the body not
    with pytest.raises(DataError, match=f"cannot decode image {path}"):
        data.decode_rgb(str(path), path.read_bytes())


def images_0_255(x):
    """Normalised (N, 3, H, W) back to grey levels."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x * std + mean


@pytest.mark.parametrize("max_downscale", [None, 2])
def test_device_decode_path_equals_cpu_path_image_by_image(tmp_path, monkeypatch, max_downscale):
    """The GPU path run on the CPU (libjpeg-turbo in place of nvJPEG): same boxes, same flips, the
    resize within two grey levels; JPEG, PNG, CMYK and rotated files mixed in the same batches.
    max_downscale 2: crops over 64 px are resized in stages (as CUDA needs them beyond 32x)."""
    if max_downscale:
        monkeypatch.setattr(data, "AA_MAX_DOWNSCALE", max_downscale)
    root = tmp_path / "data"
    for c in ("a", "b"):
        jpeg_variants(str(root / c))
    cpu_set = data.ImageFolder(str(root), data.TrainTransform(32), seed=4)
    gpu_set = data.ImageFolder(str(root), data.EncodedTrainTransform(32), seed=4, decode="gpu")
    outputs, pixel_samples, flips = [], [], []
    for dataset, workers in ((cpu_set, 0), (gpu_set, 2)):
        sampler = TrainSampler(len(dataset), rank=1, world_size=2, seed=4)
        sampler.set_epoch(2, skip=2)  # the first sample of each rank used
        loader = data.build_loader(dataset, sampler, 3, workers, train=True)
        if dataset is gpu_set:
            for encoded, _ in loader:
                assert isinstance(encoded, data.EncodedBatch)
                pixel_samples += [os.path.basename(p) for p, s in zip(encoded.paths, encoded.shapes) if s is not None]
                flips += encoded.flips
        outputs.append([(images_0_255(x), y) for x, y in data.DeviceLoader(loader, "cpu", channels_last=True)])
    assert len(outputs[0]) == len(outputs[1]) == (18 // 2 - 1) // 3
    assert set(pixel_samples) <= {"cmyk.JPEG", "png.png", "png_named.JPEG", "rotated.JPEG"} and pixel_samples
    assert True in flips and False in flips
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(*outputs):
        assert torch.equal(y_cpu, y_gpu)
        assert x_gpu.is_contiguous(memory_format=torch.channels_last)
        diff = (x_cpu - x_gpu).abs()
        # uint8 rounding on the CPU path against float on the device path: within a level inside,
        # a couple at the edges; a different box or flip would differ by tens of levels.
        assert diff.max() <= 2.01 and diff.mean() < 0.5, (diff.max(), diff.mean())


def test_device_decode_names_a_corrupt_jpeg(tmp_path):
    root = tmp_path / "data"
    make_folder(str(root), ("a",), per_class=4, size=(200, 150))
    bad = root / "a" / "a_2.jpeg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # header whole: it goes to the decoder
    dataset = data.ImageFolder(str(root), data.EncodedTrainTransform(32), decode="gpu")
    loader = data.build_loader(dataset, TrainSampler(len(dataset)), 4, 0, train=True)
    batches = list(loader)
    assert batches[0][0].shapes == [None] * 4  # all four went to the (batched) decoder
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        list(data.DeviceLoader(batches, "cpu", decode="gpu"))


def test_decode_gpu_refuses_what_it_cannot_do(tmp_path):
    import train  # the refusals are train.py's argument checks, before any data is read
    root = make_imagenet(tmp_path)
    for flags, message in ((["--data", root, "--autoaugment"], "--autoaugment runs in the loader workers"),
                           (["--data", "demo"], "--data demo has none; use --decode cpu")):
        with pytest.raises(UsageError, match=message):
            train.resolve_args(train.parse_args([*flags, "--decode", "gpu"]))
    train_set, val_set = build_datasets(root, 32, 40, decode="gpu")
    assert isinstance(train_set.transform, data.EncodedTrainTransform) and isinstance(val_set.transform, data.ValTransform)
    assert (train_set.decode, val_set.decode) == ("gpu", "cpu")  # the mode travels with the dataset, to its loaders


def encoded_batches(root, batch_size=2, seed=2, **loader_args):
    """The EncodedBatches of a --decode gpu train set of `root`, one epoch, in the loader's order."""
    dataset = data.ImageFolder(str(root), data.EncodedTrainTransform(32), seed=seed, decode="gpu")
    return list(data.build_loader(dataset, TrainSampler(len(dataset), seed=seed), batch_size, 0, train=True,
                                  **loader_args))


def test_device_decode_runs_in_a_thread_of_its_own_at_most_two_batches_ahead(tmp_path, monkeypatch):
    make_folder(str(tmp_path), ("a", "b"), per_class=6, size=(80, 60))
    batches = encoded_batches(tmp_path)
    loader = data.DeviceLoader(batches, "cpu", decode="gpu")
    expected = [(loader.standardize(data.BatchDecoder("cpu")(x)), y) for x, y in batches]
    threads = []
    decode = data.BatchDecoder.__call__
    monkeypatch.setattr(data.BatchDecoder, "__call__",
                        lambda self, batch: threads.append(threading.current_thread().name) or decode(self, batch))
    outputs = iter(loader)
    first = next(outputs)
    deadline = time.time() + 30
    while len(threads) < 3 and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # While the training thread holds batch 0: batch 1 waits in the queue and batch 2 is decoded,
    # waiting for its turn; no further.
    assert len(threads) == 3 and set(threads) == {"DeviceLoader-decode"}
    received = [first, *outputs]
    assert len(received) == len(expected) == 6
    for (x, y), (x_ref, y_ref) in zip(received, expected):  # in the loader's order, the same pixels
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    outputs = iter(loader)
    next(outputs)
    outputs.close()  # a consumer that stops early (train.py: --steps-per-epoch) stops the thread
    assert not [t for t in threading.enumerate() if t.name == "DeviceLoader-decode"]


def test_device_decode_stopped_mid_epoch_then_resumed_gives_the_uninterrupted_batches(tmp_path):
    """As train.py uses it: persistent workers, an epoch left after 2 steps (the generator dropped),
    then the same epoch resumed at its 3rd step with the sampler's skip."""
    make_folder(str(tmp_path), ("a", "b"), per_class=5, size=(70, 50))
    dataset = data.ImageFolder(str(tmp_path), data.EncodedTrainTransform(32), seed=3, decode="gpu")
    sampler = TrainSampler(len(dataset), seed=3)
    loader = data.DeviceLoader(data.build_loader(dataset, sampler, 2, workers=1, train=True), "cpu")
    assert loader.decode == "gpu"  # from the dataset, through the DataLoader
    sampler.set_epoch(1)
    uninterrupted = [(x.clone(), y.clone()) for x, y in loader]
    sampler.set_epoch(1)
    batches = iter(loader)
    taken = [next(batches) for _ in range(2)]
    del batches  # as when train_one_epoch returns: the thread stops before the loader restarts
    sampler.set_epoch(1, skip=2 * 2)
    resumed = taken + list(loader)
    assert len(resumed) == len(uninterrupted) == 5
    for (x, y), (x_ref, y_ref) in zip(resumed, uninterrupted):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


def test_resize_stages_keep_every_stage_within_the_kernels_limit():
    assert data.resize_stages(375, 500, 224) == [(224, 224)]  # ImageNet: one resize
    assert data.resize_stages(3200, 100, 32) == [(1024, 100), (32, 32)]
    for height, width, size in [(6000, 4000, 32), (50_000, 20, 16), (17, 23, 224), (2048, 1024, 32)]:
        stages = data.resize_stages(height, width, size)
        assert stages[-1] == (size, size)
        for (h0, w0), (h1, w1) in zip([(height, width)] + stages, stages):
            assert h0 / h1 <= data.AA_MAX_DOWNSCALE and w0 / w1 <= data.AA_MAX_DOWNSCALE
    assert len(data.resize_stages(2048, 1024, 32)) == 2 and len(data.resize_stages(1024, 1024, 32)) == 1


def test_staged_resize_is_within_a_level_of_one_resize(monkeypatch):
    x = torch.from_numpy(photo(500, 375, seed=3)).permute(2, 0, 1)[None].float()
    direct = torch.nn.functional.interpolate(x, size=(12, 12), mode="bicubic", antialias=True)
    monkeypatch.setattr(data, "AA_MAX_DOWNSCALE", 4)  # stages here as CUDA's kernel would need at 32x
    assert data.resize_stages(375, 500, 12) == [(192, 192), (48, 48), (12, 12)]
    diff = (data.antialiased_resize(x, 12) - direct).abs()
    assert diff.max() < 1 and diff.mean() < 0.2, (diff.max(), diff.mean())


# ------------------------------------------------------------------------ a flaky file system

def flaky_open(monkeypatch, target, failures):
    """Make the first `failures` opens of `target` raise EIO, as a flaky NFS mount does."""
    left = [failures]

    def opener(path, *args, **kwargs):
        if str(path) == str(target) and left[0] > 0:
            left[0] -= 1
            raise OSError(5, "Input/output error", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(data, "open", opener, raising=False)
    monkeypatch.setattr(data, "READ_BACKOFF_SECONDS", 0.001)


def test_flaky_reads_are_retried_and_counted(tmp_path, monkeypatch):
    path = tmp_path / "x.JPEG"
    Image.fromarray(photo(20, 20)).save(path)
    retries = multiprocessing.Value("q", 0)
    flaky_open(monkeypatch, path, failures=data.READ_ATTEMPTS - 1)
    assert data.read_file(str(path), retries) == path.read_bytes()
    assert retries.value == data.READ_ATTEMPTS - 1
    flaky_open(monkeypatch, path, failures=data.READ_ATTEMPTS)
    with pytest.raises(DataError, match=rf"cannot read image {path}: Input/output error \(4 attempts"):
        data.read_file(str(path), retries)
    assert retries.value == 2 * (data.READ_ATTEMPTS - 1)


def test_default_workers_share_the_cores_among_local_processes(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert data.default_workers() == max(1, cores - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert data.default_workers() == max(1, cores // 8 - 1)
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(12)))  # srun: 12 cores of its own
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "12")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    assert data.default_workers() == 11
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(96)))  # not bound: the node's 96
    assert data.default_workers() == 96 // 8 - 1
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")  # torchrun in a one-task allocation of 12 cores: 8 share them
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda pid: set(range(12)))
    assert data.default_workers() == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_path_equals_cpu_decode_path_and_keeps_one_stream(tmp_path):
    root = tmp_path / "data"
    jpeg_variants(str(root / "a"))
    dataset = data.ImageFolder(str(root), data.EncodedTrainTransform(32), seed=1, decode="gpu")
    batches = list(data.build_loader(dataset, TrainSampler(len(dataset), seed=1), 3, 0, train=True))
    on_cpu = [x for x, _ in data.DeviceLoader(batches, "cpu", decode="gpu")]
    loader = data.DeviceLoader(batches, "cuda", decode="gpu")
    stream = loader.stream
    for _ in range(2):
        on_gpu = [x.cpu() for x, _ in loader]
        assert loader.stream is stream
    for a, b in zip(on_cpu, on_gpu):  # nvJPEG's IDCT and upsampling may differ from libjpeg-turbo's
        assert (images_0_255(a) - images_0_255(b)).abs().mean() < 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_waits_only_in_its_own_thread(tmp_path, monkeypatch):
    """The training thread queues its steps while the decode thread waits for the side stream and
    for nvJPEG (issue 19): every host wait of the decode path happens in the decode thread."""
    make_folder(str(tmp_path), ("a", "b"), per_class=6, size=(200, 150))
    batches = encoded_batches(tmp_path, batch_size=3, pin_memory=True)  # pinned: EncodedBatch.pin_memory
    assert batches[0][0].payload.is_pinned()
    waits = []
    for owner, name in [(torch.cuda.Stream, "synchronize"), (torch.cuda.Event, "synchronize"), (torch.cuda, "synchronize"),
                        (data, "decode_jpegs")]:
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, real=real, what=name, **k:
                            waits.append((what, threading.current_thread().name)) or real(*a, **k))
    weights = torch.randn(3 * 32 * 32, 10, device="cuda")
    for x, y in data.DeviceLoader(batches, "cuda", channels_last=True, decode="gpu"):
        (x.flatten(1) @ weights).relu_()  # a "step" on the compute stream, queued without waiting
    monkeypatch.undo()
    assert ("decode_jpegs", "DeviceLoader-decode") in waits
    assert {thread for _, thread in waits} == {"DeviceLoader-decode"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_resizes_crops_far_beyond_the_kernels_limit():
    """A 3200 x 2400 crop to 32 px (100x, 75x): one CUDA resize would refuse it; in stages it is
    within a level of the CPU's single resize. A resize at the staging limit itself runs as one."""
    x = torch.from_numpy(photo(2400, 3200, seed=1)).permute(2, 0, 1)[None].float()
    on_cpu = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", antialias=True)
    staged = data.antialiased_resize(x.cuda(), 32).cpu()
    diff = (staged - on_cpu).abs()
    assert diff.max() < 1 and diff.mean() < 0.2, (diff.max(), diff.mean())
    at_limit = x[..., :32 * data.AA_MAX_DOWNSCALE, :32 * data.AA_MAX_DOWNSCALE]
    assert data.resize_stages(*at_limit.shape[-2:], 32) == [(32, 32)]
    one = torch.nn.functional.interpolate(at_limit.cuda(), size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(one.cpu(), torch.nn.functional.interpolate(
        at_limit, size=(32, 32), mode="bicubic", antialias=True), rtol=1e-4, atol=1e-2)
