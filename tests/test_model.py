import copy
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torchvision

import efficientnet
from efficientnet import SCALING, convert_state_dict, create_model
from conftest import ROOT, randomize_

# ../shared/reference/MODEL.md: exact parameter counts for 1000 classes (identical in torchvision and timm).
PARAMS = {"b0": 5_288_548, "b1": 7_794_184, "b2": 9_109_994, "b3": 12_233_232,
          "b4": 19_341_616, "b5": 30_389_784, "b6": 43_040_704, "b7": 66_347_960}
BLOCKS = {"b0": 16, "b1": 23, "b2": 23, "b3": 26, "b4": 32, "b5": 39, "b6": 45, "b7": 55}


def count(model):
    return sum(p.numel() for p in model.parameters())


def torchvision_model(arch):
    return getattr(torchvision.models, f"efficientnet_{arch}")()


def shapes_only():
    """Modules built on the meta device: every parameter's shape, no memory and no initialisation
    (B7 and its torchvision twin in a third of the time)."""
    return torch.device("meta")


# The optimised paths also run on CUDA kernels (and under bf16 autocast and inductor) when a GPU
# is present; CI has none, so there these cases are skipped and the CPU cases stand.
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture
def exact_cuda():
    """Full float32 on the GPU (no TF32) for equality tests."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def bn_args(arch):
    # torchvision builds B5-B7 with TF's BatchNorm settings.
    return dict(bn_eps=1e-3, bn_momentum=0.01) if arch in ("b5", "b6", "b7") else {}


@pytest.mark.quick
@pytest.mark.parametrize("arch", list(PARAMS))
def test_parameter_counts_match_paper_and_torchvision(arch):
    with shapes_only():
        model, reference = create_model(arch), torchvision_model(arch)
    assert count(model) == PARAMS[arch]
    assert count(reference) == PARAMS[arch]
    assert len(model.blocks) == BLOCKS[arch]


@pytest.mark.quick
def test_scaling_table_is_the_single_source():
    assert SCALING["b0"].resolution == 224 and SCALING["b7"].resolution == 600
    assert [SCALING[a].dropout for a in PARAMS] == [0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5]
    with shapes_only():
        assert create_model("b4").dropout.p == 0.4
        assert create_model("b4", dropout=0.1).dropout.p == 0.1


@pytest.mark.quick
@pytest.mark.parametrize("value,expected", [(32, 32), (16, 16), (1280, 1280)])
def test_round_filters_identity_at_width_one(value, expected):
    assert efficientnet.round_filters(value, 1.0) == expected


@pytest.mark.quick
def test_round_filters_rules():
    # B2 (width 1.1): 32 -> 35.2 -> 32 (within 10%); B4 (1.4): 1280 -> 1792; B7 (2.0): 16 -> 32.
    assert efficientnet.round_filters(32, 1.1) == 32
    assert efficientnet.round_filters(1280, 1.4) == 1792
    assert efficientnet.round_filters(16, 2.0) == 32
    assert efficientnet.round_filters(12, 1.0) == 16  # rounds to nearest multiple of 8: 12 -> 16
    # 19 rounds down to 16, more than 10% below 19, so it is bumped up by 8.
    assert efficientnet.round_filters(19, 1.0) == 24
    assert efficientnet.round_repeats(3, 1.1) == 4 and efficientnet.round_repeats(1, 3.1) == 4


@pytest.mark.quick
def test_unknown_arch_names_valid_ones():
    with pytest.raises(ValueError) as info:
        create_model("b9")
    for arch in PARAMS:
        assert arch in str(info.value)
    with shapes_only():
        assert count(create_model("efficientnet_b1")) == PARAMS["b1"]
        assert count(create_model("EfficientNet-B0")) == PARAMS["b0"]


@pytest.mark.quick
@pytest.mark.parametrize("arch,size", [("b0", 64), ("b2", 64), ("b5", 48)])
def test_torchvision_weights_give_torchvision_outputs(arch, size):
    reference = randomize_(torchvision_model(arch)).eval()
    model = create_model(arch, **bn_args(arch)).eval()
    model.load_state_dict(convert_state_dict(reference.state_dict(), model), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


def timm_layout(torchvision_state):
    """Rename torchvision keys to timm's `efficientnet_bX` names, written from MODEL.md's layout
    independently of efficientnet.py's converter."""
    inner_plain = {"block.0.0": "conv_dw", "block.0.1": "bn1", "block.1.fc1": "se.conv_reduce",
                   "block.1.fc2": "se.conv_expand", "block.2.0": "conv_pw", "block.2.1": "bn2"}
    inner_expand = {"block.0.0": "conv_pw", "block.0.1": "bn1", "block.1.0": "conv_dw", "block.1.1": "bn2",
                    "block.2.fc1": "se.conv_reduce", "block.2.fc2": "se.conv_expand",
                    "block.3.0": "conv_pwl", "block.3.1": "bn3"}
    outer = {"features.0.0": "conv_stem", "features.0.1": "bn1", "features.8.0": "conv_head",
             "features.8.1": "bn2", "classifier.1": "classifier"}
    out = {}
    for key, value in torchvision_state.items():
        parts = key.split(".")
        if parts[0] == "features" and parts[1] not in ("0", "8"):
            stage, block = int(parts[1]), parts[2]
            inner = inner_plain if stage == 1 else inner_expand
            name = next(n for n in inner if ".".join(parts[3:]).startswith(n + "."))
            rest = ".".join(parts[3:])[len(name) + 1:]
            out[f"blocks.{stage - 1}.{block}.{inner[name]}.{rest}"] = value
        else:
            name = next(n for n in outer if key.startswith(n + "."))
            out[f"{outer[name]}.{key[len(name) + 1:]}"] = value
    return out


@pytest.mark.quick
@pytest.mark.parametrize("arch,size", [("b0", 64), ("b2", 64), ("b5", 48)])
def test_timm_layout_gives_torchvision_outputs(arch, size):
    reference = randomize_(torchvision_model(arch), seed=3).eval()
    state = timm_layout(reference.state_dict())
    assert "blocks.0.0.conv_dw.weight" in state and "blocks.1.0.conv_pwl.weight" in state
    # DDP and torch.compile prefixes are stripped too.
    state = {f"module._orig_mod.{k}": v for k, v in state.items()}
    model = create_model(arch, **bn_args(arch)).eval()
    model.load_state_dict(convert_state_dict(state, model), strict=True)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max().item() < 1e-5


@pytest.mark.quick
def test_own_state_dict_round_trips_with_prefixes():
    model = randomize_(create_model("b0"))
    state = {"module." + k: v for k, v in model.state_dict().items()}
    fresh = create_model("b0")
    fresh.load_state_dict(convert_state_dict({"model": state}, fresh), strict=True)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.quick
def test_convert_errors_name_keys_and_layout():
    model = create_model("b0")
    with pytest.raises(ValueError, match=r"torchvision.*features\.9\.weight"):
        convert_state_dict({**torchvision_model("b0").state_dict(), "features.9.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"torchvision layout.*wrong shape: blocks\.5\.project_conv\.weight \(40, 144, 1, 1\) vs \(48"):
        convert_state_dict(torchvision_model("b1").state_dict(), create_model("b2"))
    with pytest.raises(ValueError, match=r"missing.*blocks\.16"):
        convert_state_dict(torchvision_model("b0").state_dict(), create_model("b1"))
    with pytest.raises(ValueError, match="not an EfficientNet"):
        convert_state_dict({"fc.weight": torch.zeros(1)}, model)


@pytest.mark.quick
def test_drop_path_rates_are_linear_in_global_block_index():
    with shapes_only():
        model, reference = create_model("b3", drop_path_rate=0.2), torchvision_model("b3")
    tv_rates = [b.stochastic_depth.p for stage in reference.features[1:8] for b in stage]
    n = len(model.blocks)
    assert len(tv_rates) == n == 26
    for i, block in enumerate(model.blocks):
        expected = 0.2 * i / n
        assert tv_rates[i] == pytest.approx(expected)
        if block.has_residual:
            assert block.drop_path.rate == pytest.approx(expected)
        else:
            assert isinstance(block.drop_path, nn.Identity)
    assert model.blocks[0].has_residual is False  # 32 -> 24 for b3: no shortcut in the first block


@pytest.mark.quick
def test_drop_path_is_per_sample_and_identity_in_eval():
    torch.manual_seed(0)
    drop = efficientnet.DropPath(0.5)
    x = torch.ones(256, 3, 2, 2)
    y = drop(x)
    per_sample = y.flatten(1)
    assert torch.all(per_sample == per_sample[:, :1])  # whole samples, never single elements
    values = set(per_sample[:, 0].tolist())
    assert values == {0.0, 2.0}  # dropped, or kept and scaled by 1 / keep
    assert 64 < (per_sample[:, 0] == 0).sum() < 192
    drop.eval()
    assert torch.equal(drop(x), x)
    model = create_model("b0").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


@pytest.mark.quick
def test_init_follows_tf_scheme():
    torch.manual_seed(0)
    model = create_model("b0")
    w = model.head_conv.weight  # 1x1, 320 -> 1280: fan_out = 1280
    assert w.std().item() == pytest.approx(math.sqrt(2 / 1280), rel=0.02)
    dw = model.blocks[3].dw_conv.weight  # 5x5 depthwise, groups == channels: fan_out = 25
    assert dw.std().item() == pytest.approx(math.sqrt(2 / 25), rel=0.05)
    bound = 1 / math.sqrt(1000)
    assert model.classifier.weight.abs().max().item() <= bound
    assert model.classifier.weight.abs().max().item() > 0.99 * bound
    assert torch.all(model.classifier.bias == 0) and torch.all(model.blocks[3].se.reduce.bias == 0)
    assert torch.all(model.stem_bn.weight == 1) and torch.all(model.stem_bn.bias == 0)
    # Fewer classes keep ImageNet's classifier scale (TF's 1/sqrt(classes) would be 10x for 10);
    # more classes follow TF's rule.
    for classes, bound in ((10, 1 / math.sqrt(1000)), (4000, 1 / math.sqrt(4000))):
        weight = create_model("b0", num_classes=classes).classifier.weight
        assert bound * 0.99 < weight.abs().max().item() <= bound


@pytest.mark.quick
def test_bn_settings_are_constructor_arguments():
    model = create_model("b0", bn_eps=1e-3, bn_momentum=0.01)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 49  # stem + 15 * 3 + 2 (first block has no expand) + head
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in norms)
    assert all(m.eps == 1e-5 and m.momentum == 0.1
               for m in create_model("b0").modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.quick
def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = create_model("b0", num_classes=10)
    x = torch.randn(4, 3, 64, 64)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.quick
def test_channels_last_matches_contiguous():
    model = randomize_(create_model("b0", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
        feats = model.forward_features(x.to(memory_format=torch.channels_last))
    assert feats.is_contiguous(memory_format=torch.channels_last)
    assert feats.shape == (2, 1280, 2, 2)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.quick
def test_bf16_autocast_forward_and_backward():
    model = create_model("b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        loss = out.float().logsumexp(1).mean()
    assert out.dtype == torch.bfloat16
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in model.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_jit_trace_and_compile_graph():
    model = randomize_(create_model("b0", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)  # the graph is the same at any size; tracing and compiling take the time
    with torch.no_grad():
        ref = model(x)
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), ref)
    # fullgraph=True: the whole model (train mode too, with drop path) is captured by dynamo in one
    # graph. aot_eager checks capture and autograd tracing without a C++ compiler in CI.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref)
    model.train()
    compiled(x).sum().backward()
    assert model.stem_conv.weight.grad is not None


@pytest.mark.quick
def test_grad_checkpointing_same_outputs_grads_and_bn_stats():
    torch.manual_seed(0)
    plain = create_model("b0", num_classes=10)
    ckpt = create_model("b0", num_classes=10)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(4, 3, 64, 64)
    results = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same drop-path / dropout masks
        out = model(x)
        out.square().mean().backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], rtol=1e-4, atol=1e-6, msg=name)
    for name, value in results[0][2].items():  # running stats moved once, not twice
        assert torch.equal(value, results[1][2][name]), name


def test_file_works_alone_in_a_fresh_process(tmp_path):
    shutil.copy(os.path.join(ROOT, "efficientnet.py"), tmp_path)
    code = ("import efficientnet, torch, os\n"
            "assert os.path.dirname(efficientnet.__file__) == os.getcwd()\n"
            "m = efficientnet.create_model('b0', num_classes=3).eval()\n"
            "print(tuple(m(torch.randn(1, 3, 64, 64)).shape))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 3)"


@pytest.mark.quick
def test_sync_batchnorm_conversion_keeps_the_network():
    model = randomize_(create_model("b0", num_classes=10)).eval()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("b0", num_classes=10)).eval()
    synced.load_state_dict(model.state_dict())  # same keys
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules()) == 49
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(synced(x), model(x))  # activations kept around the new norms


# ------------------------------------------------------------------ optimised paths vs plain ones

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_equals_torchvision(channels_last, lean, device):
    """Train mode, drop path and dropout on, in float64 (so that kernel choices cannot blur the
    comparison): torchvision's plain modules draw the same masks from the same seed (the classifier's
    dropout is in place in both: on CUDA the out-of-place kernel draws other masks), so outputs,
    every gradient and the BatchNorm statistics must agree."""
    reference = randomize_(torchvision.models.efficientnet_b0(num_classes=10), seed=5).train()
    model = create_model("b0", num_classes=10, lean_activations=lean).train()
    model.load_state_dict(convert_state_dict(reference.state_dict(), model))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model, reference = (net.to(device, torch.float64, memory_format=fmt) for net in (model, reference))
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    x = x.to(device, memory_format=fmt)
    y = torch.tensor([1, 3, 5, 7], device=device)
    outputs = []
    for net in (reference, model):
        torch.manual_seed(7)
        out = net(x)
        nn.functional.cross_entropy(out, y, label_smoothing=0.1).backward()
        outputs.append(out)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-9, atol=1e-10)
    ours = dict(model.named_parameters())
    for name, value in convert_state_dict({k: p.grad for k, p in reference.named_parameters()}).items():
        # Relative to each gradient's scale: some (a BatchNorm shift the next one cancels) are ~1e-8.
        error = (ours[name].grad - value).abs().max().item()
        assert error <= 1e-7 * value.abs().max().item() + 1e-12, (name, error)
    ours = model.state_dict()
    for name, value in convert_state_dict(reference.state_dict()).items():
        torch.testing.assert_close(ours[name], value, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.quick
def test_fused_batchnorm_silu_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.rand(4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *t: efficientnet._BatchNormSiLU.apply(*t, None, None, 0.1, 1e-5), (x, weight, bias))


def fused_bn_silu(bn, t):
    return efficientnet.BatchNormSiLU()(t, bn)  # the model's default: lean for CPU tensors


def bn_silu_step(bn, f, x, weight):
    t = x.clone().requires_grad_()
    out = f(bn, t)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == x.dtype
    (out * weight).sum().backward()
    return out, t.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
def test_fused_batchnorm_silu_matches_the_two_modules(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, 6, 6, generator=g).to(device, memory_format=torch.channels_last)
    weight = torch.randn(x.shape, generator=g).to(device)
    bns = nn.BatchNorm2d(4).to(device), nn.BatchNorm2d(4).to(device)
    plain = bn_silu_step(bns[0], lambda bn, t: nn.functional.silu(bn(t)), x, weight)
    fused = bn_silu_step(bns[1], fused_bn_silu, x, weight)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(bns[1], name), getattr(bns[0], name), rtol=1e-6, atol=1e-7)
    assert bns[0].num_batches_tracked.item() == bns[1].num_batches_tracked.item() == 1


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
def test_fused_batchnorm_silu_in_bf16_as_accurate_as_the_two_modules(device):
    """bf16 input with float32 BatchNorm parameters (autocast's case): measured against float64,
    the fused pair's rounding errors stay within a few times the two modules' own."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 8, 10, 10, generator=g).bfloat16().to(device, memory_format=torch.channels_last)
    weight = torch.randn(x.shape, generator=g).bfloat16().to(device)
    exact = bn_silu_step(nn.BatchNorm2d(8).to(device, torch.float64), lambda bn, t: nn.functional.silu(bn(t)),
                         x.double(), weight.double())
    plain = bn_silu_step(nn.BatchNorm2d(8).to(device), lambda bn, t: nn.functional.silu(bn(t)), x, weight)
    fused = bn_silu_step(nn.BatchNorm2d(8).to(device), fused_bn_silu, x, weight)
    for e, p, f in zip(exact, plain, fused):
        plain_error = (p.double() - e).abs().max().item()
        fused_error = (f.double() - e).abs().max().item()
        assert fused_error <= 3 * plain_error + 1e-3 * e.abs().max().item(), (fused_error, plain_error)


@pytest.mark.quick
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_gated_projection_equals_conv_of_gated_input(channels_last, device, exact_cuda):
    torch.manual_seed(0)
    projection = efficientnet.GatedProjection(6, 4).to(device)
    nn.init.normal_(projection.weight)
    conv = nn.Conv2d(6, 4, 1, bias=False).to(device)
    conv.weight.data.copy_(projection.weight)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 6, 5, 7).to(device, memory_format=fmt)
    gate = torch.rand(3, 6, device=device)
    results = []
    for f, weight in ((lambda a, g: conv(a * g[:, :, None, None]), conv.weight),
                      (projection, projection.weight)):
        a, g = x.clone().requires_grad_(), gate.clone().requires_grad_()
        out = f(a, g)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device)).sum().backward()
        results.append((out, a.grad, g.grad, weight.grad))
    assert results[1][0].is_contiguous(memory_format=fmt)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def flat_grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_step_as_accurate_as_torchvision(device, exact_cuda):
    """Under bf16 autocast the two models round differently; measured against torchvision in
    float32, our logits and gradients are within a few times torchvision's own bf16 errors."""
    torch.manual_seed(0)
    no_masks = dict(num_classes=10, dropout=0.0)  # float32 and bf16 runs would draw different masks
    reference = randomize_(torchvision.models.efficientnet_b0(stochastic_depth_prob=0.0, **no_masks), seed=5)
    model = create_model("b0", drop_path_rate=0.0, lean_activations=True, **no_masks)
    model.load_state_dict(convert_state_dict(reference.state_dict(), model))
    x = torch.randn(8, 3, 96, 96, generator=torch.Generator().manual_seed(1)).to(device)
    y = torch.arange(8, device=device)

    def step(net, dtype):
        net = copy.deepcopy(net).to(device, memory_format=torch.channels_last).train()
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = net(x.to(memory_format=torch.channels_last))
        nn.functional.cross_entropy(out.float(), y, label_smoothing=0.1).backward()
        grads = convert_state_dict({k: p.grad for k, p in net.named_parameters()})
        return out.float(), torch.cat([grads[k].flatten() for k in sorted(grads)])

    exact = step(reference, None)
    theirs, ours = step(reference, torch.bfloat16), step(model, torch.bfloat16)
    for e, t, o in zip(exact, theirs, ours):
        assert torch.isfinite(o).all()
        their_error, our_error = ((t - e).norm() / e.norm()).item(), ((o - e).norm() / e.norm()).item()
        assert our_error <= 2 * their_error + 0.01, (our_error, their_error)


@CUDA
def test_cuda_inductor_training_step_matches_eager(exact_cuda):
    """torch.compile with the default (inductor) backend through the custom autograd Function and
    the batched projection: the same outputs, gradients and BatchNorm statistics as eager."""
    eager = randomize_(create_model("b0", num_classes=10)).cuda().to(memory_format=torch.channels_last)
    model = create_model("b0", num_classes=10).cuda().to(memory_format=torch.channels_last)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model)
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    results = []
    for net, forward in ((eager, eager), (model, compiled)):
        net.train()
        for m in net.modules():  # no random masks: inductor draws them from a generator of its own
            if isinstance(m, efficientnet.DropPath):
                m.rate = 0.0
            elif isinstance(m, nn.Dropout):
                m.p = 0.0
        out = forward(x)
        out.square().mean().backward()
        results.append((out, flat_grads(net), net.blocks[3].dw_bn.running_var.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def saved_activation_bytes(model, x):
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in params and ptr != x.untyped_storage().data_ptr())


@pytest.mark.quick
def test_activation_memory_below_torchvision_and_cut_by_checkpointing():
    # What autograd keeps between forward and backward, at 128 px (0.64 at 224, 0.665 at 64).
    x = torch.randn(2, 3, 128, 128).to(memory_format=torch.channels_last)
    reference = torchvision.models.efficientnet_b0().train().to(memory_format=torch.channels_last)
    model = create_model("b0").train().to(memory_format=torch.channels_last)
    ours, theirs = saved_activation_bytes(model, x), saved_activation_bytes(reference, x)
    assert ours < 0.68 * theirs
    model.set_grad_checkpointing(True)
    assert saved_activation_bytes(model, x) < 0.12 * ours  # only the block inputs (0.10)
