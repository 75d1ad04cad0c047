"""Public weights in, fine-tuning on other classes, the model as a backbone, and export. The
reference is the real timm (requirements-dev.txt), with random weights (nothing is downloaded)."""
import pytest
import timm  # imported once for the module: it takes seconds
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from efficientnet import SamePadConv2d, canonical_arch, convert_state_dict, create_model, load_pretrained
from conftest import calibrate_bn_, randomize_


def timm_model(name, seed=0, **kwargs):
    """Random weights whose maps, down to the last, depend on the input (calibrate_bn_)."""
    return calibrate_bn_(randomize_(timm.create_model(name, pretrained=False, **kwargs), seed), seed=seed)


# Float32 rounding of two operation orders through a network whose calibrated maps grow to ~1e3;
# a wrong padding gives errors of order 1.
TOLERANCE = 5e-4


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def ours_from(reference, arch, **kwargs):
    model = create_model(arch, **kwargs).eval()
    model.load_state_dict(convert_state_dict(reference.state_dict(), model))
    return model


# ------------------------------------------------------------------------------- TF "SAME" padding

def test_same_padding_puts_the_odd_pixel_bottom_right():
    # WEIGHTS.md's worked values: (length, kernel, stride) -> total padding.
    for length, kernel, stride, total in [(224, 3, 2, 1), (56, 5, 2, 3), (75, 5, 2, 4), (15, 3, 2, 2)]:
        assert SamePadConv2d._total_padding(length, kernel, stride) == total
    conv = SamePadConv2d(1, 1, 3, 2)
    nn.init.ones_(conv.weight)
    for size in range(5, 40):  # output ceil(size / 2), as TF's
        assert conv(torch.ones(1, 1, size, size + 1)).shape[2:] == (-(-size // 2), -(-(size + 1) // 2))
    # 224 needs one pixel of padding: none at the top/left (a full 3x3 window of ones sums to 9),
    # one at the bottom/right (a 2x2 window inside the image). PyTorch's symmetric padding: 4 and 9.
    out = conv(torch.ones(1, 1, 224, 224))[0, 0]
    assert (out[0, 0].item(), out[-1, -1].item(), out[0, -1].item()) == (9.0, 4.0, 6.0)
    symmetric = F.conv2d(torch.ones(1, 1, 224, 224), conv.weight, stride=2, padding=1)[0, 0]
    assert (symmetric[0, 0].item(), symmetric[-1, -1].item()) == (4.0, 9.0)


def test_tf_names_turn_on_same_padding_and_tf_batchnorm():
    for name in ["tf_efficientnet_b3", "TF_EfficientNet-B3", "tf_b3"]:
        assert canonical_arch(name) == "tf_b3"
    assert canonical_arch("efficientnet_b3") == "b3"
    tf, plain = create_model("tf_efficientnet_b0"), create_model("b0")
    assert sum(p.numel() for p in tf.parameters()) == sum(p.numel() for p in plain.parameters()) == 5_288_548
    assert tf.state_dict().keys() == plain.state_dict().keys()
    # Strided convs pad per input; stride-1 (odd) kernels are symmetric, as TF's SAME is there.
    assert type(tf.stem_conv) is SamePadConv2d and tf.stem_conv.padding == (0, 0)
    strided = [b.dw_conv for b in tf.blocks if b.dw_conv.stride == (2, 2)]
    assert len(strided) == 4 and all(type(c) is SamePadConv2d for c in strided)
    assert all(type(b.dw_conv) is nn.Conv2d and b.dw_conv.padding[0] == b.dw_conv.kernel_size[0] // 2
               for b in tf.blocks if b.dw_conv.stride == (1, 1))
    assert not any(isinstance(m, SamePadConv2d) for m in plain.modules())
    bns = [m for m in tf.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in bns)
    assert all((m.eps, m.momentum) == (1e-5, 0.1) for m in plain.modules() if isinstance(m, nn.BatchNorm2d))
    assert create_model("tf_b0", bn_eps=1e-5).stem_bn.eps == 1e-5  # overrides win
    assert create_model("tf_b5").dropout.p == 0.4  # SCALING stays the source of the rest


@pytest.mark.parametrize("name,size", [("tf_efficientnet_b0", (224, 224)), ("tf_efficientnet_b0", (99, 70)),
                                       ("tf_efficientnet_b3", (300, 300)), ("tf_efficientnet_b3", (77, 60))])
def test_tf_weights_give_timm_outputs(name, size):
    reference = timm_model(name, seed=1)
    model = ours_from(reference, name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(x)
        assert relative_error(model(x), expected) < TOLERANCE
        # The padding matters: the same weights padded symmetrically give other outputs.
        symmetric = ours_from(reference, name, same_padding=False)
        assert relative_error(symmetric(x), expected) > 0.1


@pytest.mark.parametrize("name,size", [("efficientnet_b0", (224, 224)), ("efficientnet_b3", (77, 60))])
def test_plain_members_give_timm_outputs(name, size):
    reference = timm_model(name, seed=3)
    model = ours_from(reference, name)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert relative_error(model(x), reference(x)) < TOLERANCE


# ------------------------------------------------------------------------------------ fine-tuning

def torchvision_b0_state(seed=5):
    return randomize_(torchvision.models.efficientnet_b0(), seed).state_dict()


@pytest.mark.parametrize("layout", ["torchvision", "timm", "ours"])
def test_load_pretrained_keeps_a_fresh_classifier_and_loads_the_rest_bit_for_bit(layout):
    source = {"torchvision": lambda: torchvision_b0_state(),
              "timm": lambda: timm_model("efficientnet_b0", seed=5).state_dict(),
              "ours": lambda: randomize_(create_model("b0"), seed=5).state_dict()}[layout]()
    expected = convert_state_dict(source)
    model = create_model("b0", num_classes=4)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert load_pretrained(model, source) == ["classifier re-initialised: 1000 -> 4 classes"]
    for name, value in model.state_dict().items():
        if name.startswith("classifier."):
            assert torch.equal(value, fresh[name]), name
        else:
            assert value.dtype == expected[name].dtype and torch.equal(value, expected[name]), name
    assert len(expected) == len(fresh)  # nothing else was left out
    # Same class count: everything loads and nothing is reported.
    same = create_model("b0")
    assert load_pretrained(same, source) == []
    assert torch.equal(same.classifier.weight, expected["classifier.weight"])


def test_load_pretrained_still_refuses_everything_else_naming_the_keys():
    source = torchvision_b0_state()
    with pytest.raises(ValueError, match=r"wrong shape: blocks\.3\.project_conv\.weight \(40, 144, 1, 1\) vs \(48"):
        load_pretrained(create_model("b0", width=1.1, num_classes=4), source)  # another width
    with pytest.raises(ValueError, match=r"missing: blocks\.2\.dw_bn\.running_var"):
        load_pretrained(create_model("b0", num_classes=4),
                        {k: v for k, v in source.items() if k != "features.2.1.block.1.1.running_var"})
    with pytest.raises(ValueError, match=r"wrong shape: classifier\.weight \(1000, 1000\) vs \(4, 1280\)"):
        load_pretrained(create_model("b0", num_classes=4),
                        {**source, "classifier.1.weight": torch.zeros(1000, 1000)})  # not a class count change
    with pytest.raises(ValueError, match=r"features\.9\.weight"):
        load_pretrained(create_model("b0", num_classes=4), {**source, "features.9.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------- backbone

@pytest.mark.parametrize("name,size", [("tf_efficientnet_b0", (99, 70)), ("efficientnet_b3", (77, 60))])
def test_feature_maps_equal_timm_features_only(name, size):
    full = timm_model(name, seed=6)
    backbone = timm.create_model(name, pretrained=False, features_only=True).eval()
    missing, unexpected = backbone.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected  # (the head and classifier are not in timm's backbone)
    model = ours_from(full, name)
    assert model.feature_channels == backbone.feature_info.channels()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ours, theirs = model.feature_maps(x), backbone(x)
    assert len(ours) == len(theirs) == 5
    for stride, channels, a, b in zip([2, 4, 8, 16, 32], model.feature_channels, ours, theirs):
        assert a.shape == b.shape == (1, channels, -(-size[0] // stride), -(-size[1] // stride))
        assert relative_error(a, b) < TOLERANCE


# --------------------------------------------------------------------------------------- export

@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:`torch.jit.trace")
@pytest.mark.parametrize("arch", ["b0", "tf_efficientnet_b0"])
def test_export_and_trace_equal_eager(arch):
    """Eval mode, gradients enabled (torch.export's and torch.jit.trace's default) and the lean
    activations forced on (the CPU default): the plain operations only."""
    model = randomize_(create_model(arch, num_classes=10, lean_activations=True), seed=8).eval()
    x = torch.randn(2, 3, 67, 70, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(x)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert not any("bmm" in t or "autograd" in t for t in targets), targets  # no lean path
    torch.testing.assert_close(program.module()(x), expected, rtol=0, atol=1e-6)
    traced = torch.jit.trace(model, x)  # checks the trace against a second run too
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-6)


def test_export_with_dynamic_image_size_and_same_padding():
    model = randomize_(create_model("tf_efficientnet_b0", num_classes=10), seed=10).eval()
    height, width = torch.export.Dim("height", min=64, max=1024), torch.export.Dim("width", min=64, max=1024)
    program = torch.export.export(model, (torch.randn(1, 3, 67, 70),), dynamic_shapes=({2: height, 3: width},))
    for size in [(64, 64), (97, 65), (224, 224), (301, 128)]:  # even, odd, mixed: pads (0,1), (1,1), ...
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=1e-6)


def test_onnx_export_equals_eager(tmp_path):
    onnx = pytest.importorskip("onnx")  # optional: not in the requirements
    pytest.importorskip("onnxscript")  # torch.onnx's exporter needs it
    model = randomize_(create_model("tf_efficientnet_b0", num_classes=10), seed=11).eval()
    x = torch.randn(1, 3, 67, 70)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (x,), path, dynamo=True)
    onnx.checker.check_model(onnx.load(path))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(path)
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=0, atol=1e-4)
