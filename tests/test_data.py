"""data.py: the samplers (exact across ranks, resumable, memory bounded by the data set), the datasets
and their layout errors, the built-in sets, the loaders and the device side."""
import gc
import multiprocessing
import os
import runpy
import tracemalloc

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import data
import transforms
import utils
from conftest import ROOT, make_folder, make_imagenet, photo
from data import ShardSampler, TrainSampler, build_datasets
from utils import DataError


# ------------------------------------------------------------------------------------- samplers

@pytest.mark.quick
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [7, 10, 13, 50])
def test_val_shards_cover_every_index_exactly_once(world, size):
    seen = [i for rank in range(world) for i in ShardSampler(size, rank, world)]
    assert sorted(seen) == list(range(size))
    assert sum(len(ShardSampler(size, r, world)) for r in range(world)) == size


@pytest.mark.quick
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


@pytest.mark.quick
def test_train_sampler_skip_resumes_with_the_next_samples():
    # `skip` counts what all ranks used together: 10 steps of one sample on each of 3 ranks here.
    sampler = TrainSampler(100, rank=1, world_size=3, seed=0)
    sampler.set_epoch(4)
    full = list(sampler)
    sampler.set_epoch(4, skip=30)
    assert len(full) == 34 and len(sampler) == 24  # 70 left, padded to 72
    assert list(sampler)[:23] == full[10:33]  # the last one of each is padding


@pytest.mark.quick
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

def repeated_order_before(size, seed, epoch, repeats):
    """TrainSampler.order() as it was built before: every index N times, then cut (size * N items)."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [(index, copy) for index in order for copy in range(repeats)][:size]


@pytest.mark.quick
def test_repeated_aug_order_is_as_before_and_its_memory_does_not_grow_with_the_repeats():
    for size, repeats in [(23, 2), (23, 3), (50, 7), (10, 10), (9, 40)]:
        sampler = TrainSampler(size, seed=4, repeats=repeats)
        sampler.set_epoch(2)
        assert sampler.order() == repeated_order_before(size, 4, 2, repeats)
    size, peaks = 10_000, {}
    for repeats in (1, 4, 1000):
        sampler = TrainSampler(size, rank=1, world_size=2, seed=0, repeats=repeats)
        sampler.set_epoch(1)
        tracemalloc.start()
        count = sum(1 for _ in sampler)  # an epoch's indices, built as the loader builds them
        peaks[repeats] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert count == size // 2
    # O(data set): 10,000 (index, copy) pairs, about 1 MB, whatever the repeats (before: 10 million pairs
    # for 1000 repeats, ~1 GB; --repeated-aug 100000 on ImageNet was killed at ~24 GB)
    assert max(peaks.values()) < 150 * size and peaks[1000] < 1.5 * peaks[4] < 4 * peaks[1], peaks


# ------------------------------------------------------------------------------ datasets, loaders

@pytest.mark.quick
def test_bad_file_in_a_worker_names_the_file(tmp_path):
    root = make_imagenet(tmp_path)
    bad = os.path.join(root, "train", "b", "b_1.jpeg")
    open(bad, "wb").write(b"\xff\xd8\xff\xe0 truncated")
    train, _ = build_datasets(root, 32, 40)
    loader = data.build_loader(train, TrainSampler(len(train)), 4, workers=1, train=True)
    with pytest.raises(DataError, match="b_1.jpeg"):
        list(loader)
    gc.collect()  # the failed epoch's workers stop now; collected during a later test, they took 10 s


@pytest.mark.quick
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


@pytest.mark.quick
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

@pytest.mark.quick
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_device_normalisation_equals_totensor_normalize(device):
    images = [Image.fromarray(photo(40, 32, seed=i)) for i in range(3)]
    references = [T.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD)(T.ToTensor()(img)) for img in images]
    # Three batches: on CUDA the next one is copied and normalised on a side stream meanwhile.
    batches = [(torch.stack([transforms.to_uint8_hwc(img)] * 2), torch.tensor([i, i])) for i, img in enumerate(images)]
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


# ----------------------------------------------------------------------------- layout errors

@pytest.mark.quick
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


@pytest.mark.quick
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


# ------------------------------------------------------------------------------ built-in data

@pytest.mark.quick
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


@pytest.mark.quick
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


# ------------------------------------------------------------------------ a flaky file system

def flaky_open(monkeypatch, target, failures):
    """Make the first `failures` opens of `target` raise EIO, as a flaky NFS mount does."""
    left = [failures]

    def opener(path, *args, **kwargs):
        if str(path) == str(target) and left[0] > 0:
            left[0] -= 1
            raise OSError(5, "Input/output error", str(path))
        return open(path, *args, **kwargs)
    monkeypatch.setattr(utils, "open", opener, raising=False)
    monkeypatch.setattr(utils, "READ_BACKOFF_SECONDS", 0.001)


@pytest.mark.quick
def test_flaky_reads_are_retried_and_counted(tmp_path, monkeypatch):
    path = tmp_path / "x.JPEG"
    Image.fromarray(photo(20, 20)).save(path)
    retries = multiprocessing.Value("q", 0)
    flaky_open(monkeypatch, path, failures=utils.READ_ATTEMPTS - 1)
    assert utils.read_file(str(path), retries) == path.read_bytes()
    assert retries.value == utils.READ_ATTEMPTS - 1
    flaky_open(monkeypatch, path, failures=utils.READ_ATTEMPTS)
    with pytest.raises(DataError, match=rf"cannot read image {path}: Input/output error \(4 attempts"):
        utils.read_file(str(path), retries)
    assert retries.value == 2 * (utils.READ_ATTEMPTS - 1)


@pytest.mark.quick
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


@pytest.mark.quick
def test_data_py_names_the_new_data_commands(capsys):
    with pytest.raises(SystemExit) as exit_code:  # as `python data.py check /imagenet` runs it
        runpy.run_path(os.path.join(ROOT, "data.py"), run_name="__main__")
    assert exit_code.value.code == 2 and capsys.readouterr() == (
        "", "error: the data commands are python prepare.py check|sort-val|pack ...\n")
