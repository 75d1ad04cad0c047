"""gpu_decode.py (--decode gpu): the workers' and the device's halves run on the CPU against the CPU
path; the cases marked CUDA run on a card and are skipped elsewhere."""
import os
import threading
import time

import pytest
import torch

import data
import gpu_decode
import flags
import train
import transforms
from conftest import make_folder, make_imagenet, photo
from data import TrainSampler, build_datasets
from test_transforms import jpeg_variants
from transforms import ValTransform
from utils import DataError, UsageError


def images_0_255(x):
    """Normalised (N, 3, H, W) back to grey levels."""
    mean = torch.tensor(data.IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(data.IMAGENET_STD).view(1, 3, 1, 1) * 255
    return x * std + mean


@pytest.mark.quick
@pytest.mark.parametrize("max_downscale", [None, 2])
def test_device_decode_path_equals_cpu_path_image_by_image(tmp_path, monkeypatch, max_downscale):
    """The GPU path run on the CPU (libjpeg-turbo in place of nvJPEG): same boxes, same flips, the
    resize within two grey levels; JPEG, PNG, CMYK and rotated files mixed in the same batches.
    max_downscale 2: crops over 64 px are resized in stages (as CUDA needs them beyond 32x)."""
    if max_downscale:
        monkeypatch.setattr(gpu_decode, "AA_MAX_DOWNSCALE", max_downscale)
    root = tmp_path / "data"
    for c in ("a", "b"):
        jpeg_variants(str(root / c))
    cpu_set = data.ImageFolder(str(root), transforms.TrainTransform(32), seed=4)
    gpu_set = data.ImageFolder(str(root), gpu_decode.EncodedTrainTransform(32), seed=4, decode="gpu")
    outputs, pixel_samples, flips = [], [], []
    for dataset, workers in ((cpu_set, 0), (gpu_set, 2)):
        sampler = TrainSampler(len(dataset), rank=1, world_size=2, seed=4)
        sampler.set_epoch(2, skip=2)  # the first sample of each rank used
        loader = data.build_loader(dataset, sampler, 3, workers, train=True)
        if dataset is gpu_set:
            for encoded, _ in loader:
                assert isinstance(encoded, gpu_decode.EncodedBatch)
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


@pytest.mark.quick
def test_device_decode_names_a_corrupt_jpeg(tmp_path):
    root = tmp_path / "data"
    make_folder(str(root), ("a",), per_class=4, size=(200, 150))
    bad = root / "a" / "a_2.jpeg"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # header whole: it goes to the decoder
    dataset = data.ImageFolder(str(root), gpu_decode.EncodedTrainTransform(32), decode="gpu")
    loader = data.build_loader(dataset, TrainSampler(len(dataset)), 4, 0, train=True)
    batches = list(loader)
    assert batches[0][0].shapes == [None] * 4  # all four went to the (batched) decoder
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        list(data.DeviceLoader(batches, "cpu", decode="gpu"))


@pytest.mark.quick
def test_decode_gpu_refuses_what_it_cannot_do(tmp_path):
    root = make_imagenet(tmp_path)  # the refusals are train.py's argument checks, before any data is read
    for given, message in ((["--data", root, "--autoaugment"], "--augment autoaugment runs in the loader workers"),
                           (["--data", "demo"], "--data demo has none; use --decode cpu")):
        with pytest.raises(UsageError, match=message):
            flags.resolve_args(flags.parse_args([*given, "--decode", "gpu"]))
    train_set, val_set = build_datasets(root, 32, 40, decode="gpu")
    assert isinstance(train_set.transform, gpu_decode.EncodedTrainTransform) and isinstance(val_set.transform, ValTransform)
    assert (train_set.decode, val_set.decode) == ("gpu", "cpu")  # the mode travels with the dataset, to its loaders


def encoded_batches(root, batch_size=2, seed=2, **loader_args):
    """The EncodedBatches of a --decode gpu train set of `root`, one epoch, in the loader's order."""
    dataset = data.ImageFolder(str(root), gpu_decode.EncodedTrainTransform(32), seed=seed, decode="gpu")
    return list(data.build_loader(dataset, TrainSampler(len(dataset), seed=seed), batch_size, 0, train=True,
                                  **loader_args))


@pytest.mark.quick
def test_device_decode_runs_in_a_thread_of_its_own_at_most_two_batches_ahead(tmp_path, monkeypatch):
    make_folder(str(tmp_path), ("a", "b"), per_class=6, size=(80, 60))
    batches = encoded_batches(tmp_path)
    loader = data.DeviceLoader(batches, "cpu", decode="gpu")
    expected = [(loader.standardize(gpu_decode.BatchDecoder("cpu")(x)), y) for x, y in batches]
    threads = []
    decode = gpu_decode.BatchDecoder.__call__
    monkeypatch.setattr(gpu_decode.BatchDecoder, "__call__",
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


@pytest.mark.quick
def test_device_decode_stopped_mid_epoch_then_resumed_gives_the_uninterrupted_batches(tmp_path):
    """As train.py uses it: persistent workers, an epoch left after 2 steps (the generator dropped),
    then the same epoch resumed at its 3rd step with the sampler's skip."""
    make_folder(str(tmp_path), ("a", "b"), per_class=5, size=(70, 50))
    dataset = data.ImageFolder(str(tmp_path), gpu_decode.EncodedTrainTransform(32), seed=3, decode="gpu")
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


@pytest.mark.quick
def test_resize_stages_keep_every_stage_within_the_kernels_limit():
    assert gpu_decode.resize_stages(375, 500, 224) == [(224, 224)]  # ImageNet: one resize
    assert gpu_decode.resize_stages(3200, 100, 32) == [(1024, 100), (32, 32)]
    for height, width, size in [(6000, 4000, 32), (50_000, 20, 16), (17, 23, 224), (2048, 1024, 32)]:
        stages = gpu_decode.resize_stages(height, width, size)
        assert stages[-1] == (size, size)
        for (h0, w0), (h1, w1) in zip([(height, width)] + stages, stages):
            assert h0 / h1 <= gpu_decode.AA_MAX_DOWNSCALE and w0 / w1 <= gpu_decode.AA_MAX_DOWNSCALE
    assert len(gpu_decode.resize_stages(2048, 1024, 32)) == 2 and len(gpu_decode.resize_stages(1024, 1024, 32)) == 1


@pytest.mark.quick
def test_staged_resize_is_within_a_level_of_one_resize(monkeypatch):
    x = torch.from_numpy(photo(500, 375, seed=3)).permute(2, 0, 1)[None].float()
    direct = torch.nn.functional.interpolate(x, size=(12, 12), mode="bicubic", antialias=True)
    monkeypatch.setattr(gpu_decode, "AA_MAX_DOWNSCALE", 4)  # stages here as CUDA's kernel would need at 32x
    assert gpu_decode.resize_stages(375, 500, 12) == [(192, 192), (48, 48), (12, 12)]
    diff = (gpu_decode.antialiased_resize(x, 12) - direct).abs()
    assert diff.max() < 1 and diff.mean() < 0.2, (diff.max(), diff.mean())



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_decode_path_equals_cpu_decode_path_and_keeps_one_stream(tmp_path):
    root = tmp_path / "data"
    jpeg_variants(str(root / "a"))
    dataset = data.ImageFolder(str(root), gpu_decode.EncodedTrainTransform(32), seed=1, decode="gpu")
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
                        (transforms, "decode_jpegs")]:
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
    staged = gpu_decode.antialiased_resize(x.cuda(), 32).cpu()
    diff = (staged - on_cpu).abs()
    assert diff.max() < 1 and diff.mean() < 0.2, (diff.max(), diff.mean())
    at_limit = x[..., :32 * gpu_decode.AA_MAX_DOWNSCALE, :32 * gpu_decode.AA_MAX_DOWNSCALE]
    assert gpu_decode.resize_stages(*at_limit.shape[-2:], 32) == [(32, 32)]
    one = torch.nn.functional.interpolate(at_limit.cuda(), size=(32, 32), mode="bicubic", antialias=True)
    torch.testing.assert_close(one.cpu(), torch.nn.functional.interpolate(
        at_limit, size=(32, 32), mode="bicubic", antialias=True), rtol=1e-4, atol=1e-2)
