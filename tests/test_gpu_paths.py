"""What only a GPU run would show, reached on the CPU: the capability query, per-device CUDA random
state and fused optimizers are mocked or run on the CPU; DDP and the stop check run on gloo. The
cases marked CUDA run on a card (benchmarks/gpu.sh) and are skipped elsewhere."""
import copy
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import efficientnet
import launch
import train
import flags
import optim
import utils
from conftest import ROOT, make_imagenet, randomize_
from test_model import exact_cuda  # noqa: F401 (a fixture: full float32 on CUDA)
from test_train import TINY, read_metrics, run_train

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp("data"), train=8, val=3)


# ------------------------------------------------------------------------------ --amp auto

@pytest.mark.parametrize("capability, expected", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                                  ((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_amp_auto_takes_bf16_only_where_the_gpu_has_it(monkeypatch, capability, expected):
    # V100 (7.0) and T4 (7.5) emulate bf16, and torch.cuda.is_bf16_supported() says yes there.
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.version, "hip", None)
    device = torch.device("cuda", 3)
    assert flags.resolve_amp("auto", device) == expected
    assert asked == [device]  # this rank's GPU, not the current default one
    assert flags.resolve_amp("bf16", device) == torch.bfloat16  # asked for: allowed (train.py notes the cost)
    assert flags.resolve_amp("fp16", device) == torch.float16
    assert flags.resolve_amp("auto", torch.device("cpu")) is None


# ------------------------------------------------------------------------------ CUDA random state

class FakeGenerators:
    """torch.cuda's per-device RNG functions over a dict: device index -> state tensor."""

    def __init__(self, monkeypatch, count):
        self.states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(count)}
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[device.index].clone())
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        for name in ("get_rng_state_all", "set_rng_state_all"):  # every device's state: not a rank's to keep
            monkeypatch.setattr(torch.cuda, name, lambda *a, name=name: pytest.fail(f"torch.cuda.{name} called"))

    def set(self, state, device="cuda"):
        assert device.index in self.states, f"cuda:{device.index} does not exist"
        self.states[device.index] = state.clone()


def test_checkpoint_keeps_only_the_ranks_own_gpu_random_state(monkeypatch):
    # Global rank 5 saved on one node of 8 GPUs (cuda:5) and resumes on the second of two nodes of
    # 4 (cuda:1): its own stream must follow it.
    node_of_8 = FakeGenerators(monkeypatch, 8)
    saved = utils.rng_state(torch.device("cuda", 5))
    assert saved["cuda"].tolist() == [5] * 4
    node_of_4 = FakeGenerators(monkeypatch, 4)
    assert utils.set_rng_state(saved, torch.device("cuda", 1)) is None
    assert node_of_4.states[1].tolist() == [5] * 4
    assert [node_of_4.states[i].tolist()[0] for i in (0, 2, 3)] == [0, 2, 3]  # the other ranks' GPUs untouched
    assert node_of_8.states[5].tolist() == [5] * 4


# ------------------------------------------------------------------------------ GradScaler on resume

def fp16_on_the_cpu(monkeypatch):
    """train.py refuses fp16 on the CPU (NaN gradients in PyTorch's CPU kernels); here only the
    GradScaler's bookkeeping is under test, so fp16 is let through."""
    fake = lambda choice, device: torch.float16 if choice == "fp16" else None  # noqa: E731
    monkeypatch.setattr(train, "resolve_amp", fake)
    monkeypatch.setattr(flags, "resolve_amp", fake)


def test_fp16_resume_of_a_run_without_gradscaler_starts_a_fresh_one(tiny_data, tmp_path, monkeypatch, capsys):
    args = ["--data", tiny_data, *TINY, "--output-dir", str(tmp_path), "--workers", "0", "--epochs", "2",
            "--steps-per-epoch", "2", "--eval-every", "0", "--max-nonfinite", "100"]
    assert train.main([*args, "--run-epochs", "1"]) == 0  # amp off: the checkpoint's scaler state is {}
    assert torch.load(tmp_path / "last.pt", weights_only=True)["scaler"] == {}
    capsys.readouterr()
    fp16_on_the_cpu(monkeypatch)
    assert train.main([*args, "--resume", "auto", "--amp", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "note: the checkpoint was not trained with --amp fp16; the GradScaler starts afresh" in out
    assert "amp torch.float16" in out
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["scaler"]) >= {"scale", "growth_factor"}
    assert "skipped_steps" in read_metrics(tmp_path)[-1]


def test_fp16_step_computes_the_gradient_norm_once(tiny_data, tmp_path, monkeypatch, capsys):
    # One norm serves the overflow check and the clipping (it was computed twice).
    calls = []
    real = torch.nn.utils.get_total_norm
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda *a, **k: pytest.fail("second norm"))
    fp16_on_the_cpu(monkeypatch)
    args = ["--data", tiny_data, *TINY, "--output-dir", str(tmp_path), "--workers", "0", "--epochs", "1",
            "--steps-per-epoch", "3", "--eval-every", "0", "--amp", "fp16", "--grad-clip", "1.0",
            "--max-nonfinite", "100"]
    assert train.main(args) == 0
    assert len(calls) == 3


def test_clipping_with_the_shared_norm_equals_clip_grad_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    model(torch.randn(4, 5)).square().sum().backward()
    reference = [p.grad.clone().requires_grad_() for p in model.parameters()]  # gradients of themselves
    for p in reference:
        p.grad = p.detach().clone()
    assert torch.nn.utils.clip_grad_norm_(reference, 0.5) > 0.5  # it clips
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.nn.utils.clip_grads_with_norm_(model.parameters(), 0.5, norm)
    for a, b in zip(model.parameters(), reference):
        assert torch.equal(a.grad, b.grad)


def scaled_step(optimizer, model, scaler, overflow):
    scaler.scale(model(torch.randn(4, 5, generator=torch.Generator().manual_seed(1))).square().sum()).backward()
    if overflow:
        next(model.parameters()).grad[0, 0] = float("inf")
    scaler.unscale_(optimizer)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("opt, syncs", [("sgd", False), ("rmsprop", True)])
def test_fp16_step_syncs_only_without_a_fused_optimizer(monkeypatch, opt, syncs):
    """GradScaler.step reads found_inf with .item() (a device sync) unless the optimizer is fused:
    train.py's SGD is fused on CUDA (here on the CPU, where torch has the same fused kernel);
    RMSprop has no fused form."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 3))
    args = flags.parse_args(["--data", "x", "--opt", opt])
    flags.resolve_args(args)
    optimizer = optim.build_optimizer(model, args.opt, 0.1, args.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaled_step(optimizer, model, scaler, overflow=False)  # state (momentum) exists from here on
    before = copy.deepcopy(model.state_dict())
    items = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: items.append(1) or real_item(t))
    scaled_step(optimizer, model, scaler, overflow=True)
    assert bool(items) == syncs
    monkeypatch.undo()
    for name, value in model.state_dict().items():  # the overflowed step was skipped
        assert torch.equal(value, before[name]), name
    assert scaler.get_scale() == 2.0 ** 7


# ------------------------------------------------------------------------------ DDP

def test_ddp_keeps_gradients_in_its_buckets_and_does_not_broadcast_buffers():
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        env = launch.Dist(world_size=2)  # only its device matters to data_parallel
        model = efficientnet.create_model("b0", num_classes=10)
        ddp = utils.data_parallel(model, env)
        assert not ddp.broadcast_buffers  # BatchNorm statistics: utils.broadcast_buffers before eval
        for _ in range(2):  # gradients become bucket views from the first backward on
            ddp(torch.randn(2, 3, 32, 32)).sum().backward()
        storages = {p.grad.untyped_storage().data_ptr() for p in model.parameters()}
        assert len(storages) <= 3 < len(list(model.parameters())) == 213  # a few 25 MB buckets
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------ stop signal

def test_stop_check_never_waits_in_a_step_and_all_ranks_stop_at_the_same_step(tmp_path):
    result = run_train([], nproc=2, script=os.path.join(ROOT, "tests", "stop_signal_ranks.py"),
                       env={"OUT_DIR": str(tmp_path), "SIGNAL_AT": "100"})
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert ranks[0]["stopped"] == ranks[1]["stopped"] and ranks[0]["name"] == ranks[1]["name"] == "SIGUSR1"
    assert ranks[0]["at_end"] and ranks[1]["at_end"]
    stopped, checks = ranks[0]["stopped"], ranks[0]["all_reduces"] - 1  # less the blocking one at the end
    assert stopped == 101 and checks == 100  # started at every step, read at the next: exactly one step late


# ------------------------------------------------------------------------------ --deterministic

def test_deterministic_flag_sets_torchs_deterministic_mode(tiny_data, tmp_path, capsys, monkeypatch):
    seen, real_build = {}, train.build

    def build(*args):  # the modes while the run is built and trained (main gives them back at its end)
        seen.update(benchmark=torch.backends.cudnn.benchmark, cudnn=torch.backends.cudnn.deterministic,
                    algorithms=torch.are_deterministic_algorithms_enabled(),
                    warn_only=torch.is_deterministic_algorithms_warn_only_enabled(),
                    cublas=os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
        return real_build(*args)
    monkeypatch.setattr(train, "build", build)
    args = ["--data", tiny_data, *TINY, "--output-dir", str(tmp_path), "--workers", "0", "--epochs", "1",
            "--steps-per-epoch", "1", "--eval-every", "0", "--deterministic"]
    assert train.main(args) == 0
    assert ", deterministic" in capsys.readouterr().out
    assert seen == {"benchmark": False, "cudnn": True, "algorithms": True, "warn_only": True, "cublas": ":4096:8"}


@CUDA
def test_cuda_deterministic_resume_equals_uninterrupted(tiny_data, tmp_path, capsys):
    """Bitwise resume on the GPU, with --deterministic (cudnn.benchmark picks kernels by timing)."""
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    args = ["--data", tiny_data, *TINY, "--workers", "0", "--epochs", "2", "--warmup-epochs", "1",
            "--ema-decay", "0.9", "--mixup", "0.2", "--deterministic", "--amp", "bf16"]
    try:
        assert train.main([*args, "--output-dir", str(tmp_path / "whole")]) == 0
        assert train.main([*args, "--output-dir", str(tmp_path / "parts"), "--run-epochs", "1"]) == 0
        assert train.main([*args, "--output-dir", str(tmp_path / "parts"), "--resume", "auto"]) == 0
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
    a = torch.load(tmp_path / "whole" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "parts" / "last.pt", weights_only=True)
    for part in ("model", "ema"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
    assert without_wall_times(a["history"]) == without_wall_times(b["history"])


def without_wall_times(rows):
    """Metric rows less what the clock measured (images_per_sec, epoch_seconds, data_seconds, ...),
    which no two runs share."""
    return [{k: v for k, v in row.items() if not k.endswith(("_seconds", "_per_sec"))} for row in rows]


def test_resume_comparison_leaves_out_exactly_the_wall_times():
    row = {"epoch": 2, "lr": 0.1, "train_loss": 2.5, "skipped_steps": 0, "images_per_sec": 900.0,
           "epoch_seconds": 3.0, "data_seconds": 0.2, "val_top1": 40.0}
    assert without_wall_times([row]) == [{"epoch": 2, "lr": 0.1, "train_loss": 2.5, "skipped_steps": 0,
                                          "val_top1": 40.0}]


# ------------------------------------------------------------------------------ model defaults

def autograd_node_names(output):
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


def test_model_default_is_lean_for_cpu_tensors_only():
    """A pasted efficientnet.py decides per forward from the input's device: lean on the CPU,
    torchvision's operations on GPUs (there lean measured 0.78x torchvision's speed)."""
    model = efficientnet.create_model("b0", num_classes=10).train()
    lean_nodes = {"_BatchNormSiLUBackward", "BmmBackward0"}
    assert lean_nodes <= autograd_node_names(model(torch.randn(2, 3, 64, 64)))
    on_meta = copy.deepcopy(model).to("meta")  # any device that is not the CPU
    assert not lean_nodes & autograd_node_names(on_meta(torch.randn(2, 3, 64, 64, device="meta")))
    forced = efficientnet.create_model("b0", num_classes=10, lean_activations=True).train().to("meta")
    assert lean_nodes <= autograd_node_names(forced(torch.randn(2, 3, 64, 64, device="meta")))
    plain = efficientnet.create_model("b0", num_classes=10, lean_activations=False).train()
    assert not lean_nodes & autograd_node_names(plain(torch.randn(2, 3, 64, 64)))


@CUDA
def test_cuda_model_default_takes_torchvisions_operations():
    model = efficientnet.create_model("b0", num_classes=10).train().cuda()
    names = autograd_node_names(model(torch.randn(2, 3, 64, 64, device="cuda")))
    assert not {"_BatchNormSiLUBackward", "BmmBackward0"} & names


def compiled_checkpointing_matches_eager(backend, device, rtol=1e-4, atol=1e-5):
    """Grad checkpointing under torch.compile: one graph (the eager wrapper's Python state would
    break it at every block), eager's outputs and gradients (within rtol, atol), BatchNorm
    statistics moved once (within a tenth of those)."""
    torch.manual_seed(0)
    stages = efficientnet.B0_STAGES[:2] if backend == "aot_eager" else efficientnet.B0_STAGES
    eager = randomize_(efficientnet.EfficientNet(num_classes=10, stages=stages, dropout=0.0, drop_path_rate=0.0))
    eager = eager.to(device, memory_format=torch.channels_last).train()
    model = copy.deepcopy(eager)
    for net in (eager, model):
        net.set_grad_checkpointing(True)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    x = torch.randn(4, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    results = []
    for net, forward in ((eager, eager), (model, compiled)):
        out = forward(x)
        out.square().mean().backward()
        results.append((out, torch.cat([p.grad.flatten() for p in net.parameters()]),
                        [b.clone() for b in net.buffers()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=rtol, atol=atol)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=rtol, atol=atol)
    for a, b in zip(results[1][2], results[0][2]):
        torch.testing.assert_close(a, b, rtol=rtol / 10, atol=atol / 10)
    assert int(model.stem_bn.num_batches_tracked) == 1


def test_compiled_grad_checkpointing_matches_eager():
    compiled_checkpointing_matches_eager("aot_eager", "cpu")


@CUDA
def test_cuda_inductor_grad_checkpointing_matches_eager(exact_cuda):
    # Full float32 (exact_cuda: no TF32, which train.main turns on and an earlier test in this
    # process may have left on). inductor still reorders and fuses the arithmetic: the tolerances
    # of test_model's test_cuda_inductor_training_step_matches_eager, which compiles the same network.
    compiled_checkpointing_matches_eager("inductor", "cuda", rtol=1e-3, atol=1e-4)


def test_sync_bn_on_cpu_ranks_is_refused_in_one_line(tiny_data, tmp_path):
    result = run_train(["--data", tiny_data, *TINY, "--output-dir", tmp_path, "--workers", "0", "--sync-bn"], nproc=2)
    assert result.returncode != 0
    assert "error: --sync-bn needs GPUs (PyTorch's SyncBatchNorm runs on CUDA only); leave it off on the CPU" in result.stderr
    assert "File \"" + os.path.join(ROOT, "train.py") not in result.stderr  # torchrun's own traceback only
