import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests are small: keep intra-op threads at the machine's size, but never oversubscribe when
# several test processes (torchrun) run at once.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def randomize_(model, seed=0):
    """Give every parameter and BatchNorm buffer non-trivial values so that equality tests see
    every weight (BN running stats at their init would hide a swapped mean/var)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("weight") and t.dim() == 1:  # BN scale
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(torch.randn(t.shape, generator=g) / fan_in ** 0.5)
    return model


def calibrate_bn_(model, size=64, seed=0):
    """Set every BatchNorm's running statistics to those of its input on a random batch, then eval.
    After randomize_ alone the signal fades with depth (the last maps hardly depend on the input,
    so output comparisons cannot see a wrong padding or normalisation); normalised, it stays."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, size, size, generator=torch.Generator().manual_seed(seed)))
    for m, momentum in zip(bns, saved):
        m.momentum = momentum
    return model.eval()


@pytest.fixture
def python_env():
    """Environment for child Python processes: the repo importable, one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


def photo(width, height, seed=0):
    """A smooth, textured RGB array (JPEG-compresses like a photo)."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx * 200 / width + 30 * np.sin(yy / 7), yy * 200 / height + 30 * np.cos(xx / 11),
                    (xx + yy) * 0.3 % 255], -1)
    return np.clip(img + g.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def make_folder(root, classes=("a", "b", "c"), per_class=4, size=(64, 48), fmt="JPEG"):
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            Image.fromarray(photo(*size, seed=100 * c + i)).save(
                os.path.join(root, name, f"{name}_{i}.{fmt.lower()}"), fmt)
    return root


def make_imagenet(root, classes=("a", "b", "c"), train=4, val=3):
    make_folder(os.path.join(root, "train"), classes, train)
    make_folder(os.path.join(root, "val"), classes, val)
    return str(root)


sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def torch_flags_kept():
    """train.main sets process-wide kernel choices (cuDNN, TF32, deterministic mode) for its run;
    each in-process test gets them back as they were."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    kept = cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = kept
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
