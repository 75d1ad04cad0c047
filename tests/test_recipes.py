"""Issue 20's flags: TF's RMSprop, the step schedule, the augmentations against torchvision's own
ops, repeated augmentation, progressive resizing, exact resume with all of them on, every --recipe."""
import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import v2

import data
import gpu_decode
import recipes
import flags
import optim
import train
import transforms
from conftest import make_imagenet, photo
from test_resume import assert_same_run
from test_train import SPY, read_metrics, run_train
from utils import UsageError

BILINEAR = T.InterpolationMode.BILINEAR


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("data"), train=8, val=2)


# ------------------------------------------------------------------------ optimizer and schedule

def test_rmsproptf_equals_timms_rmsproptf_over_20_steps():
    from timm.optim import RMSpropTF
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 5))
    twin = copy.deepcopy(model)
    ours = optim.build_optimizer(model, "rmsproptf", 0.05, weight_decay=1e-2, no_bn_weight_decay=True)
    assert isinstance(ours, optim.RMSpropTF) and [g["weight_decay"] for g in ours.param_groups] == [1e-2, 0.0]
    theirs = RMSpropTF([{"params": [p for p in twin.parameters() if p.ndim > 1], "weight_decay": 1e-2},
                        {"params": [p for p in twin.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                       lr=0.05, alpha=0.9, eps=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(20):
        lr = optim.lr_at(step, 0.05, 3, 20, warmup_lr=0.005, decay_steps=4, decay_rate=0.5)  # lr changes: the
        images, labels = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)  # buffer holds it
        for net, optimizer in ((model, ours), (twin, theirs)):
            for group in optimizer.param_groups:
                group["lr"] = lr
            nn.functional.cross_entropy(net(images), labels).backward()
            optimizer.step()
            optimizer.zero_grad()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert (a - b).abs().max().item() <= 1e-6, step
    moved = max((p - s).abs().max().item() for p, s in zip(model.parameters(), start))
    assert moved > 0.05  # the comparison saw real steps
    plain = copy.deepcopy(model)  # and TF's form is not torch's RMSprop under another name
    a, b = optim.build_optimizer(model, "rmsproptf", 0.05, 1e-2, True), torch.optim.RMSprop(plain.parameters(), 0.05, 0.9, 1e-3, 0, 0.9)
    for net, optimizer in ((model, a), (plain, b)):
        nn.functional.cross_entropy(net(images), labels).backward()
        optimizer.step()
    assert max((p - q).abs().max().item() for p, q in zip(model.parameters(), plain.parameters())) > 1e-3


def test_adamw_is_torchs_with_the_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    adamw = optim.build_optimizer(model, "adamw", 1e-3, weight_decay=0.05, no_bn_weight_decay=True)
    assert type(adamw) is torch.optim.AdamW
    assert [(len(g["params"]), g["weight_decay"], g["lr"]) for g in adamw.param_groups] == [(1, 0.05, 1e-3), (3, 0.0, 1e-3)]


def test_step_schedule_at_known_steps():
    # timm-ra's shape on 10 steps per epoch: 3 warmup epochs from 1e-3, x0.97 every 2.4 epochs (24 steps)
    lr = lambda step: optim.lr_at(step, 0.1, 30, 4500, warmup_lr=1e-3, decay_steps=24, decay_rate=0.97)
    assert lr(0) == pytest.approx(1e-3 + 0.099 / 30)  # the warmup starts from --warmup-lr
    assert lr(29) == pytest.approx(0.1)  # and reaches --lr at its last step
    assert lr(30) == pytest.approx(0.1 * 0.97)  # the staircase counts from step 0: 30 // 24 = 1 decay already
    assert lr(47) == pytest.approx(0.1 * 0.97)
    assert lr(48) == pytest.approx(0.1 * 0.97 ** 2)
    assert lr(4499) == pytest.approx(0.1 * 0.97 ** 187)
    assert optim.lr_at(4499, 0.1, 30, 4500, min_lr=1e-3, decay_steps=24, decay_rate=0.97) == 1e-3  # the floor
    assert optim.lr_at(5, 0.1, 10, 110) == pytest.approx(0.06)  # without warmup_lr, as before: 0.1 * 6 / 10
    # the run's arguments: --decay-epochs in whole steps, --lr and --warmup-lr per 4096 images
    r = SimpleNamespace(args=SimpleNamespace(sched="step", decay_epochs=2.4, decay_rate=0.97, min_lr=0.0, warmup_lr=0.0128),
                        steps_per_epoch=10, base_lr=0.0256, warmup_steps=50, total_steps=3500, global_batch=409.6 * 2)
    assert train.lr_schedule(r) == {"base_lr": 0.0256, "warmup_steps": 50, "total_steps": 3500, "min_lr": 0.0,
                                    "warmup_lr": pytest.approx(0.00256), "decay_steps": 24, "decay_rate": 0.97}
    r.args.sched = "cosine"
    assert train.lr_schedule(r)["decay_steps"] == 0


# --------------------------------------------------------------------------------- augmentation

def crop_flip_and_seed(img, rng, size):
    """What TrainTransform does before the augmentation op, and the seed it then gives the op."""
    pixels = transforms.to_uint8_hwc(img)
    box = transforms.random_resized_crop_box(pixels.shape[1], pixels.shape[0], rng)
    x = transforms.resized_crop(pixels, box, size)
    if rng.random() < 0.5:
        x = x.flip(-1)
    return x, rng.getrandbits(63)


@pytest.mark.parametrize("augment,op", [
    ("autoaugment", lambda: T.AutoAugment(T.AutoAugmentPolicy.IMAGENET, BILINEAR)),
    ("randaugment", lambda: T.RandAugment(2, 27, 31, BILINEAR)),  # timm's m9 = bin 27 of 31
    ("trivialaugment", lambda: T.TrivialAugmentWide(31, BILINEAR)),
    ("augmix", lambda: T.AugMix()),
])
def test_each_augmentation_equals_torchvisions_op(augment, op):
    img = Image.fromarray(photo(64, 48, seed=3))
    transform, changed = transforms.TrainTransform(40, augment=augment), 0
    for index in range(6):
        ours = transform(img, transforms.sample_rng(1, 2, index))
        x, seed = crop_flip_and_seed(img, transforms.sample_rng(1, 2, index), 40)
        torch.manual_seed(seed)
        assert torch.equal(ours, op()(x).permute(1, 2, 0))
        changed += not torch.equal(ours, x.permute(1, 2, 0))
    assert changed >= 4  # the op did change the images


def test_randaugment_magnitude_std_draws_each_op_a_magnitude():
    img = Image.fromarray(photo(64, 48, seed=4))
    transform = transforms.TrainTransform(40, augment="randaugment", magnitude=9, magnitude_std=0.5)
    bins = set()
    for index in range(6):
        ours = transform(img, transforms.sample_rng(0, 0, index))
        rng = transforms.sample_rng(0, 0, index)
        x, seed = crop_flip_and_seed(img, rng, 40)
        drawn = [transforms.randaugment_bin(rng.gauss(9, 0.5)) for _ in range(2)]  # after the op's seed
        torch.manual_seed(seed)
        for b in drawn:  # torchvision's RandAugment, one op at a time, each at its own magnitude
            x = T.RandAugment(1, b, 31, BILINEAR)(x)
        assert torch.equal(ours, x.permute(1, 2, 0))
        bins.update(drawn)
    assert len(bins) >= 3 and all(24 <= b <= 30 for b in bins)  # N(9, 0.5) on timm's scale: 7.5-10 -> bins 22-30


def test_randaugment_magnitude_maps_timms_scale_to_torchvisions_bins():
    assert [transforms.randaugment_bin(m) for m in (0, 1, 9, 10, 12, -3, 9.2, 9.5)] == [0, 3, 27, 30, 30, 0, 28, 28]
    for i in range(1001):  # half a bin at most: 1/60 of each op's largest change
        m = i / 100
        assert abs(transforms.randaugment_bin(m) / 30 - m / 10) <= 1 / 60 + 1e-12


def test_random_erasing_equals_torchvisions_random_erasing():
    images = torch.randn(8, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    ours, _ = transforms.augment_batch(images.clone(), torch.zeros(8, dtype=torch.long), 3, seed=5, erase=0.6)
    torch.manual_seed(5)
    erase = T.RandomErasing(p=0.6, scale=(0.02, 1 / 3), ratio=(0.3, 10 / 3), value="random")  # timm's box range
    assert torch.equal(ours, torch.stack([erase(x.clone()) for x in images]))
    erased = (ours != images).any(dim=(1, 2, 3))
    assert 0 < erased.sum() < 8
    noise = ours[ours != images]
    assert abs(noise.mean()) < 0.2 and 0.8 < noise.std() < 1.2  # per-pixel N(0, 1): timm's "pixel" mode


def test_cutmix_and_mixup_equal_torchvisions_and_switch_per_batch():
    pair, labels = torch.randn(2, 3, 32, 40, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 2])
    for seed in range(5):  # for a pair, the reversed batch (timm's partner) is torchvision's rolled one
        for alphas, reference in (({"cutmix_alpha": 1.0}, v2.CutMix(alpha=1.0, num_classes=3)),
                                  ({"mixup_alpha": 0.2}, v2.MixUp(alpha=0.2, num_classes=3))):
            images, targets = transforms.augment_batch(pair.clone(), labels, 3, seed, **alphas)
            torch.manual_seed(seed)
            expected_images, expected_targets = reference(pair.clone(), labels)
            assert torch.equal(images, expected_images) and torch.allclose(targets, expected_targets, atol=1e-7)
    batch = torch.randn(4, 3, 32, 40, generator=torch.Generator().manual_seed(3))
    kinds = []
    for seed in range(100):
        images, targets = transforms.augment_batch(batch.clone(), torch.arange(4), 4, seed, mixup_alpha=0.2, cutmix_alpha=1.0)
        pasted = ((images == batch) | (images == batch.flip(0))).all().item()  # cutmix copies, mixup blends
        kinds.append(pasted)
        assert torch.allclose(targets.sum(1), torch.ones(4))
    assert 30 <= sum(kinds) <= 70  # one or the other per batch, at even odds
    seeds = {transforms.batch_seed(0, step, rank, micro) for step in range(3) for rank in range(2) for micro in range(2)}
    assert len(seeds) == 12


def test_autoaugment_flag_is_an_alias_and_old_checkpoints_keep_theirs(tiny_data, tmp_path):
    args = flags.parse_args(["--data", tiny_data, "--autoaugment", "--output-dir", str(tmp_path / "a")])
    flags.resolve_args(args, given={"data", "autoaugment", "output_dir"})
    assert (args.augment, args.autoaugment) == ("autoaugment", True)
    with pytest.raises(UsageError, match="--autoaugment is --augment autoaugment and cannot go with --augment augmix"):
        flags.resolve_args(flags.parse_args(["--data", tiny_data, "--autoaugment", "--augment", "augmix"]),
                           given={"data", "autoaugment", "augment"})
    old = flags.parse_args(["--image-size", "224"])  # a checkpoint from before --augment: its autoaugment stays on
    recipes.resolve(old, set(), {"args": {"autoaugment": True, "image_size": 224}})
    assert old.augment == "autoaugment"
    # The whole resolution of a resume, from a checkpoint written before --recipe and --augment existed.
    stored = vars(flags.resolve_args(flags.parse_args(["--data", tiny_data, "--output-dir", str(tmp_path / "b")]),
                                     given={"data", "output_dir"}))
    stored = {k: v for k, v in stored.items() if k not in ("recipe", "augment", "random_erase", "cutmix")}
    stored["autoaugment"] = True
    resumed = flags.resolve_args(flags.parse_args(["--resume", str(tmp_path / "b" / "last.pt")]), given={"resume"},
                                 checkpoint={"args": stored, "ema": None, "ranks": [{}]})
    assert (resumed.recipe, resumed.augment, resumed.random_erase, resumed.cutmix) == ("seed", "autoaugment", 0.0, 0.0)
    assert resumed.data == tiny_data and resumed.image_size == stored["image_size"]


# -------------------------------------------------------------------- repeated aug and resizing

@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_repeated_aug_gives_each_image_n_times_on_different_ranks_keeping_the_epoch(world):
    size, repeats = 23, 3
    ranks = [data.TrainSampler(size, r, world, seed=4, repeats=repeats) for r in range(world)]
    for s in ranks:
        s.set_epoch(2)
    items = [list(s) for s in ranks]
    assert [len(i) for i in items] == [len(s) for s in ranks] == [-(-size // world)] * world  # the epoch's length
    placed = {}
    for rank, rank_items in enumerate(items):
        for position, (index, epoch, repeat) in enumerate(rank_items):
            assert epoch == 2
            if position * world + rank < size:  # not the padding
                placed.setdefault(index, []).append((repeat, rank))
    assert len(placed) == -(-size // repeats)  # size / N distinct images per epoch, each N times
    assert all(sorted(c for c, _ in v) == list(range(len(v))) for v in placed.values())
    assert sum(len(v) == repeats for v in placed.values()) == size // repeats
    if world >= repeats:  # the copies of an image went to different processes
        assert all(len({r for _, r in v}) == len(v) for v in placed.values())
    order = ranks[0].order()  # one global order: the copies side by side
    assert order[:3] == [(order[0][0], c) for c in range(3)]


@pytest.mark.parametrize("before,after", [(3, 2), (2, 4), (1, 3)])
def test_repeated_aug_continues_an_epoch_on_another_world_size(before, after):
    size, taken = 40, 12  # 3 steps of 4 images
    order = data.TrainSampler(size, seed=1, repeats=2).order()
    rest = []
    for r in range(after):
        s = data.TrainSampler(size, r, after, seed=1, repeats=2)
        s.set_epoch(0, skip=taken)
        rest += [(i, c) for k, (i, _, c) in enumerate(s) if k * after + r < size - taken]  # not the padding
    assert sorted(rest) == sorted(order[taken:])  # exactly the images and copies not yet seen
    first = [data.TrainSampler(size, r, before, seed=1, repeats=2) for r in range(before)]
    seen = [(i, c) for s in first for i, _, c in list(s)[: taken // before]]
    assert sorted(seen + rest) == sorted(order)


def test_progressive_size_is_a_pure_function_of_the_epoch():
    sizes = [transforms.progressive_size(e, 128, 224, 300) for e in range(400)]
    assert sizes[0] == 128 and sizes[100] == 160 and sizes[299] == 224 and set(sizes[300:]) == {224}
    assert all(s % 32 == 0 for s in sizes) and sizes == sorted(sizes)
    assert sorted(set(sizes)) == [128, 160, 192, 224]
    assert {transforms.progressive_size(e, 128, 380, 300) for e in range(280, 400)} == {352, 380}  # never above the end
    transform = transforms.TrainTransform(64, resize_from=32, resize_epochs=1.5)
    encoded = gpu_decode.EncodedTrainTransform(64, resize_from=32, resize_epochs=1.5)
    img = Image.fromarray(photo(80, 60))
    assert [transform(img, transforms.sample_rng(0, e, 0), e).shape[0] for e in range(3)] == [32, 64, 64]
    assert [encoded.size_at(e) for e in range(3)] == [32, 64, 64]


# ------------------------------------------------------------------------------ exact resume

# Every new augmentation at once, with the new optimizer and schedule; train from 32 to 64 px.
EVERYTHING = ["--image-size", "32", "--val-resize", "36", "--train-size", "64", "--progressive-resize", "32",
              "--batch-size", "4", "--epochs", "2", "--steps-per-epoch", "4", "--warmup-epochs", "1",
              "--ema-decay", "0.9", "--augment", "randaugment", "--magnitude-std", "0.5", "--random-erase", "0.5",
              "--mixup", "0.2", "--cutmix", "1.0", "--repeated-aug", "2", "--opt", "rmsproptf", "--sched", "step",
              "--decay-epochs", "0.5", "--log-every", "1"]


def test_sigterm_mid_epoch_with_every_new_augmentation_then_resume_equals_uninterrupted(tiny_data, tmp_path):
    reference = tmp_path / "reference"
    result = run_train(["--data", tiny_data, "--output-dir", reference, *EVERYTHING, "--workers", "0"])
    assert result.returncode == 0, result.stderr
    assert "--train-size 64" in result.stdout and "--progressive-resize 32 --progressive-epochs 1.5" in result.stdout
    out = tmp_path / "run"
    first = run_train(["--data", tiny_data, "--output-dir", out, *EVERYTHING, "--workers", "2"], script=SPY,
                      env={"SPY_DIR": str(tmp_path), "SPY_WATCH": str(tmp_path / "none"), "SPY_SIGTERM_AT": "2"})
    assert first.returncode == 75, first.stderr
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["epoch"] == 0 and 2 <= state["epoch_step"] < 4  # mid-epoch, at 32 px; epoch 2 trains at 64
    sampled = json.load(open(tmp_path / "rank0.json"))["sampled"]
    assert len(set(sampled[:8])) < len(sampled[:8])  # repeated augmentation: images came twice
    resumed = run_train(["--data", tiny_data, "--output-dir", out, *EVERYTHING, "--workers", "1", "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(out, reference)  # bit for bit, whatever the loader workers
    assert len(read_metrics(out)) == 2


# ---------------------------------------------------------------------------------- --recipe

EXPECTED = {
    "seed": ["--opt rmsprop --lr 0.08 --sched cosine", "--drop-path 0.2 --bn-eps 1e-05 --bn-momentum 0.1",
             "--augment none"],
    "nvidia": ["--opt rmsprop --lr 0.08", "--no-bn-weight-decay", "--drop-path 0 --bn-eps 0.001 --bn-momentum 0.01",
               "--augment autoaugment", "--mixup 0.2"],
    "google": ["--opt rmsproptf --lr 0.256 --sched step --decay-epochs 2.4 --decay-rate 0.97 --warmup-epochs 5",
               "--weight-decay 1e-05 --no-bn-weight-decay", "--bn-eps 0.001 --bn-momentum 0.01 --ema-decay 0.9999",
               "--augment autoaugment"],
    "timm-ra": ["--opt rmsproptf --lr 0.256 --sched step --decay-epochs 2.4 --decay-rate 0.97 --warmup-epochs 3 "
                "--warmup-lr 5.33333e-06", "--ema-decay 0.9999",
                "--augment randaugment --randaugment-magnitude 9 --magnitude-std 0.5 --random-erase 0.2"],
    "torchvision": ["--opt sgd --lr 2 --sched cosine --warmup-epochs 5 --warmup-lr 0.02", "--weight-decay 2e-05",
                    "--ema-decay 0.999966", "--augment trivialaugment --random-erase 0.1 --mixup 0.2 --cutmix 1 "
                    "--repeated-aug 4 --train-size 24 --val-resize 36 --val-interpolation bilinear"],
}


@pytest.mark.parametrize("name", list(recipes.RECIPES))
def test_every_recipe_starts_runs_two_steps_and_prints_its_values(name, tiny_data, tmp_path, capsys):
    out = tmp_path / name
    code = train.main(["--recipe", name, "--data", tiny_data, "--output-dir", str(out), "--image-size", "32",
                       "--val-resize", "36", "--batch-size", "4", "--steps-per-epoch", "2", "--epochs", "1",
                       "--workers", "0", "--log-every", "1"])
    stdout = capsys.readouterr().out
    assert code == 0
    line = next(line for line in stdout.splitlines() if line.startswith(f"recipe {name} ("))
    assert recipes.RECIPES[name]["source"] in line and "--epochs 1 " in line  # the flag given wins
    for part in EXPECTED[name]:
        assert part in line, (part, line)
    assert "epoch 1/1 step 2/2" in stdout and len(read_metrics(out)) == 1
    stored = json.load(open(out / "args.json"))
    assert stored["recipe"] == name and stored["opt"] == EXPECTED[name][0].split()[1]


def test_recipe_and_augmentation_refusals_are_one_line(tiny_data, tmp_path, capsys):
    base = ["--data", tiny_data, "--output-dir", str(tmp_path / "x")]
    for given, message in (
            (["--augment", "randaugment", "--decode", "gpu"], "--augment randaugment runs in the loader workers on "
                                                              "decoded pixels, which --decode gpu does not make; use "
                                                              "--decode cpu with --augment randaugment"),
            (["--recipe", "timm-ra", "--decode", "gpu"], "use --decode cpu with --augment randaugment"),
            (["--randaugment-magnitude", "11"], "--randaugment-magnitude must be in [0, 10] (timm's scale), got 11.0"),
            (["--progressive-resize", "16"], "--progressive-resize 16 must lie between 32 and the train size 224"),
            (["--decay-rate", "1.5"], "--decay-rate must be in (0, 1], got 1.5")):
        assert train.main([*base, *given]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    for augment in ("autoaugment", "trivialaugment", "augmix"):
        with pytest.raises(UsageError, match=f"use --decode cpu with --augment {augment}"):
            flags.resolve_args(flags.parse_args([*base, "--augment", augment, "--decode", "gpu"]))
    with pytest.raises(UsageError, match="the run was started with --recipe seed; a run keeps its recipe"):
        flags.resolve_args(flags.parse_args(["--recipe", "google"]), given={"recipe"},
                           checkpoint={"args": {"recipe": "seed"}})
