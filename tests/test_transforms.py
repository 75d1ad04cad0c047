"""transforms.py: decoding bytes to RGB (PIL, libjpeg-turbo), the train and val transforms against
torchvision's, and the batch augmentations."""
import io
import os
import random
import struct
import zlib

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
import prepare
import transforms
import utils
from conftest import make_folder, photo
from transforms import load_rgb
from utils import DataError


# ----------------------------------------------------------------------------------- decoding

@pytest.mark.quick
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
        out = transforms.ValTransform(24, 30)(img)
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


@pytest.mark.quick
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
    encoded = utils.read_file(path)
    assert transforms.takes_jpeg_decoder(encoded) == ((40, 30), False)  # PIL's path, not libjpeg-turbo's
    for decoded in (load_rgb(path), transforms.decode_rgb(path, encoded)):
        assert isinstance(decoded, Image.Image) and decoded.mode == "RGB"
        pixels = np.asarray(decoded, np.int16)
        assert np.abs(pixels - expected).max() <= 1  # clipped, 16-bit grey levels would be 255
        assert abs(pixels.mean() - expected.mean()) <= 1
    said = {"RGB": None,  # Pillow itself keeps the high bytes of 16-bit RGB: nothing to report
            "I": "mode I, integer grayscale, scaled from 16 to 8 bits (above 65535: white)"}
    assert prepare._inspect(path)[2] == said.get(mode, f"mode {mode}, 16-bit grayscale, scaled to 8 bits")


@pytest.mark.quick
def test_every_16_bit_gray_mode_keeps_the_high_byte():
    values = np.array([[0, 255, 256, 4660, 32768, 65535]], np.uint16)
    for mode, dtype in (("I;16", "<u2"), ("I;16L", "<u2"), ("I;16B", ">u2")):
        img = Image.frombytes(mode, (6, 1), values.astype(dtype).tobytes())
        assert np.asarray(transforms.to_8_bit(img)).tolist() == [[0, 0, 1, 18, 128, 255]], mode
    wide = Image.fromarray(np.array([[-5, 4660, 70000]], np.int32))  # mode I: clipped to 16 bits first
    assert np.asarray(transforms.to_8_bit(wide)).tolist() == [[0, 18, 255]]


@pytest.mark.quick
def test_gif_loads_its_first_frame(tmp_path):
    flat = np.zeros((30, 40, 3), np.uint8)  # three flat colours: a GIF palette holds them exactly
    flat[:15, :20], flat[:15, 20:], flat[15:] = (200, 30, 30), (30, 200, 30), (30, 30, 200)
    frames = [Image.fromarray(flat), Image.fromarray(255 - flat)]
    path = str(tmp_path / "anim.gif")
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert np.array_equal(np.asarray(load_rgb(path)), flat)
    assert prepare._inspect(path)[2] == "mode P, palette colours; 2 frames, the first one used"
    make_folder(str(tmp_path / "set"), ("a",), per_class=1)
    os.replace(path, tmp_path / "set" / "a" / "anim.gif")
    dataset = data.ImageFolder(str(tmp_path / "set"), transforms.ValTransform(24, 28))
    assert [os.path.basename(p) for p, _ in dataset.samples] == ["a_0.jpeg", "anim.gif"]
    assert dataset.skipped_files == [] and dataset[1][0].shape == (24, 24, 3)


@pytest.mark.quick
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


# --------------------------------------------------------------------------------- transforms

@pytest.mark.quick
def test_val_transform_equals_torchvision_resize_center_crop():
    reference = T.Compose([T.Resize(40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                           T.PILToTensor()])
    for w, h in [(64, 48), (48, 64), (50, 50), (77, 41)]:
        img = Image.fromarray(photo(w, h, seed=w))
        ours = transforms.ValTransform(32, 40)(img)
        assert torch.equal(ours.permute(2, 0, 1), reference(img)), (w, h)


@pytest.mark.quick
def test_train_crop_matches_torchvision_resized_crop():
    img = Image.fromarray(photo(120, 90))
    pixels = transforms.to_uint8_hwc(img)
    for seed in range(8):
        left, top, right, bottom = transforms.random_resized_crop_box(120, 90, random.Random(seed))
        ours = transforms.resized_crop(pixels, (left, top, right, bottom), 48).permute(1, 2, 0).numpy().astype(np.int16)
        reference = np.asarray(T.functional.resized_crop(
            img, top, left, bottom - top, right - left, [48, 48], T.InterpolationMode.BICUBIC), np.int16)
        diff = np.abs(ours - reference)
        # torch's uint8 bicubic vs PIL's: at most one level of rounding inside; edge pixels see the
        # neighbours outside the box and may differ by a few levels.
        assert diff[3:-3, 3:-3].max() <= 1
        assert diff.max() <= 8 and diff.mean() < 0.5


@pytest.mark.quick
def test_random_resized_crop_box_statistics():
    rng = random.Random(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, right, bottom = transforms.random_resized_crop_box(500, 375, rng)
        assert 0 <= left < right <= 500 and 0 <= top < bottom <= 375
        areas.append((right - left) * (bottom - top) / (500 * 375))
        ratios.append((right - left) / (bottom - top))
    assert 0.07 < min(areas) < 0.1 and max(areas) > 0.95
    assert min(ratios) > 0.74 and max(ratios) < 1.35
    # Tall images with no valid crop fall back to the centre crop with the ratio clamped to 3/4.
    assert transforms.random_resized_crop_box(10, 1000, random.Random(0), scale=(0.99, 1.0)) == (0, 493, 10, 506)


@pytest.mark.quick
def test_mixup_blends_images_and_targets():
    images = torch.arange(3 * 3 * 2 * 2, dtype=torch.float32).view(3, 3, 2, 2)
    mixed, targets = transforms.mix(images, torch.tensor([0, 2, 1]), 4, lam=0.7)
    torch.testing.assert_close(mixed[0], 0.7 * images[0] + 0.3 * images[2])
    # partners are samples 2, 1, 0 (labels 1, 2, 0)
    torch.testing.assert_close(targets, torch.tensor([[0.7, 0.3, 0.0, 0.0],
                                                      [0.0, 0.0, 1.0, 0.0],
                                                      [0.3, 0.7, 0.0, 0.0]]))


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


@pytest.mark.quick
def test_libjpeg_turbo_decodes_what_it_takes_with_pils_pixels(tmp_path):
    names = jpeg_variants(str(tmp_path))
    turbo = {"rgb0.JPEG", "rgb1.JPEG", "rgb2.JPEG", "rgb3.JPEG", "gray.JPEG"}
    val, train = transforms.ValTransform(48, 56), transforms.TrainTransform(40)
    for name in names:
        path = str(tmp_path / name)
        decoded = transforms.decode_rgb(path, utils.read_file(path))
        assert isinstance(decoded, torch.Tensor) == (name in turbo), name
        reference = load_rgb(path)
        if name in turbo:
            assert torch.equal(decoded, transforms.to_uint8_hwc(reference)), name
        # Evaluation pixels equal PIL's decode + resize exactly; training crops too.
        assert torch.equal(val(decoded), val(reference)), name
        assert torch.equal(train(decoded, random.Random(name)), train(reference, random.Random(name))), name


@pytest.mark.quick
def test_turbo_failure_falls_back_to_pil_which_names_the_file(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo(200, 150)).save(buf, "JPEG")
    path = tmp_path / "cut.JPEG"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # the header is whole, the body not
    with pytest.raises(DataError, match=f"cannot decode image {path}"):
        transforms.decode_rgb(str(path), path.read_bytes())
