"""EfficientNet-B0..B7 (Tan & Le, 2019, arXiv:1905.11946) in one file.

Depends on torch and the Python standard library only: copy this file into another project and
`create_model("b0")` works. Everything is derived from the two tables below.

    model = create_model("b3", num_classes=1000)            # random init (TF/timm scheme)
    model.load_state_dict(convert_state_dict(torch.load("tv_or_timm_weights.pth"), model))

    model = create_model("b0", num_classes=4)               # fine-tune on 4 classes
    print(load_pretrained(model, torch.load("efficientnet_b0_rwightman-7f5810bc.pth")))

    maps = create_model("b0").feature_maps(images)          # backbone: strides 2, 4, 8, 16, 32

Public weights: torchvision's B5-B7 were trained with BatchNorm eps 1e-3 / momentum 0.01, so build
those with `create_model("b5", bn_eps=1e-3, bn_momentum=0.01)` before loading them; B0-B4 and timm's
`efficientnet_bX` use PyTorch's default 1e-5 / 0.1, which is also this file's default. timm's
`tf_efficientnet_bX` (Google's TF checkpoints: plain, AutoAugment, AdvProp, Noisy Student) need TF's
"SAME" padding and BatchNorm: build them by that name, `create_model("tf_efficientnet_b0")`.
"""
import math
import re
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

# The B0 network, one row per stage. Only the first block of a stage has the stage's stride and
# input width; the others have stride 1 and in == out.
B0_STAGES = [
    # expand, kernel, stride, in, out, repeats
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]
B0_STEM = 32
B0_HEAD = 1280


class Stage(NamedTuple):
    """A row of B0_STAGES, or of a member's stages (widths and repeats scaled)."""
    expand: int  # expansion ratio of the block's 1x1 conv
    kernel: int  # depthwise kernel size
    stride: int  # of the stage's first block
    in_channels: int
    out_channels: int
    repeats: int  # blocks in the stage


class Scaling(NamedTuple):
    width: float  # channel multiplier
    depth: float  # repeats multiplier
    resolution: int  # train and eval image size
    dropout: float  # before the classifier


# Compound scaling of the family (the paper's Table 1 members; timm / torchvision use the same values).
SCALING = {
    "b0": Scaling(1.0, 1.0, 224, 0.2),
    "b1": Scaling(1.0, 1.1, 240, 0.2),
    "b2": Scaling(1.1, 1.2, 260, 0.3),
    "b3": Scaling(1.2, 1.4, 300, 0.3),
    "b4": Scaling(1.4, 1.8, 380, 0.4),
    "b5": Scaling(1.6, 2.2, 456, 0.4),
    "b6": Scaling(1.8, 2.6, 528, 0.5),
    "b7": Scaling(2.0, 3.1, 600, 0.5),
}


def round_filters(channels, width):
    """Scale a channel count by `width` and round to a multiple of 8, never dropping more than 10%."""
    scaled = channels * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    if rounded < 0.9 * scaled:
        rounded += 8
    return rounded


def round_repeats(repeats, depth):
    return int(math.ceil(depth * repeats))


def canonical_arch(arch):
    """'b0', 'B0', 'efficientnet_b0' or 'efficientnet-b0' -> 'b0'; timm's 'tf_efficientnet_b0' (or
    'tf_b0': the same network with TF's padding and BatchNorm) -> 'tf_b0'; anything else raises
    ValueError."""
    name = str(arch).lower().replace("-", "_")
    tf = name.startswith("tf_")
    name = name.removeprefix("tf_").removeprefix("efficientnet_")
    if name not in SCALING:
        raise ValueError(f"unknown EfficientNet arch {arch!r}; valid: {', '.join(SCALING)} (also efficientnet_bX, "
                         f"and timm's tf_efficientnet_bX for Google's TF weights)")
    return "tf_" + name if tf else name


def member(arch):
    """The SCALING row name of `arch`: 'tf_efficientnet_b3' or 'efficientnet_b3' -> 'b3'."""
    return canonical_arch(arch).removeprefix("tf_")


def arch_config(arch):
    """EfficientNet constructor arguments of `arch`: its SCALING row and, for timm's tf_ names, TF's
    "SAME" padding and BatchNorm settings (eps 1e-3, momentum 0.01: TF's decay 0.99)."""
    scaling = SCALING[member(arch)]
    tf = canonical_arch(arch).startswith("tf_")
    return dict(width=scaling.width, depth=scaling.depth, dropout=scaling.dropout, same_padding=tf,
                bn_eps=1e-3 if tf else 1e-5, bn_momentum=0.01 if tf else 0.1)


class SamePadConv2d(nn.Conv2d):
    """nn.Conv2d padded like TensorFlow's "SAME": the output is ceil(input / stride) long and the
    total padding that needs is computed from each input's size, its odd pixel going to the
    bottom/right (PyTorch pads k // 2 on both sides, which on even inputs samples a grid shifted by
    one pixel). Parameters and state dict are nn.Conv2d's."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, groups=1, bias=False):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, groups=groups, bias=bias)

    @staticmethod
    def _total_padding(length, kernel, stride):
        # (ceil(length / stride) - 1) * stride + kernel - length, at least 0; never negative when
        # kernel >= stride (every conv here), which keeps it free of max() for symbolic shapes.
        total = kernel - stride + (-length) % stride
        return total if kernel >= stride else max(total, 0)

    def forward(self, x):
        pad_h = self._total_padding(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = self._total_padding(x.shape[-1], self.kernel_size[1], self.stride[1])
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        return super().forward(x)

    def extra_repr(self):
        return super().extra_repr() + ", padding=SAME"


def conv(in_channels, out_channels, kernel, stride=1, groups=1, same_padding=False):
    """A kxk convolution without bias, padded symmetrically (k // 2) or as TF's "SAME". The two agree
    for stride 1 and odd kernels, so only the others get the per-input padding."""
    if same_padding and (stride > 1 or kernel % 2 == 0):
        return SamePadConv2d(in_channels, out_channels, kernel, stride, groups=groups)
    return nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups, bias=False)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of whole samples, scaling the kept ones by 1/keep."""

    def __init__(self, rate):
        super().__init__()
        self.rate = rate

    def forward(self, x):
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self):
        return f"rate={self.rate:.4f}"


class BatchNormSiLU(nn.Module):
    """SiLU(bn(x)), `bn` being a BatchNorm the block owns and passes in: `self.dw_act(x, self.dw_bn)`.

    Why the norm is passed in, not owned or subclassed: checkpoints need it as the block's own
    child (keys `dw_bn.weight`...), and torch's `nn.SyncBatchNorm.convert_sync_batchnorm` swaps
    every BatchNorm module it finds for a plain SyncBatchNorm. A BatchNorm2d subclass applying SiLU
    would come out of the swap without its SiLU; a module holding the norm's parameters itself
    would hide them from the swap (no synchronisation); one holding the BatchNorm as a child would
    rename the keys (`dw_bn.bn.weight`). Holding no state, this module applies SiLU after whatever
    norm the block has, SyncBatchNorm included.

    In training, with `lean` (the model's `lean_activations`), a plain BatchNorm2d takes the
    memory-saving path at the end of this file; anything else runs the two operations as they are."""

    def __init__(self, lean=None):
        super().__init__()
        self.lean = lean

    def forward(self, x, bn):
        if not (bn.training and torch.is_grad_enabled()):
            # Inference: SiLU in place. Eval mode takes this path whatever the grad mode, so export
            # and tracing (grad on) record the graph inference runs.
            return F.silu(bn(x), inplace=True)
        if _lean(self.lean, x) and type(bn) is nn.BatchNorm2d and bn.track_running_stats and bn.momentum is not None:
            return _lean_batchnorm_silu(x, bn)
        return F.silu(bn(x))


class SqueezeExcite(nn.Module):
    """Per-sample channel weights from the globally pooled input: (N, C, H, W) -> (N, C) in (0, 1).
    The two 1x1 convolutions keep torchvision's shapes and names but run as matrix products."""

    def __init__(self, channels, reduced):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        # A sum, then a scalar: sum's gradient is a broadcast view, mean's a full-size copy.
        s = x.sum((2, 3)) * (1.0 / (x.shape[2] * x.shape[3]))
        s = F.linear(s, self.reduce.weight.flatten(1), self.reduce.bias)
        s = F.silu(s)
        s = F.linear(s, self.expand.weight.flatten(1), self.expand.bias)
        return s.sigmoid()


class GatedProjection(nn.Module):
    """The block's 1x1 projection conv applied to x * gate, gate (N, C) being squeeze-excite's
    channel weights. `weight` has nn.Conv2d's shape (out, in, 1, 1): state dicts are a 1x1 conv's.
    In training, with `lean`, the gate is folded into the weights instead (end of this file)."""

    def __init__(self, in_channels, out_channels, lean=None):
        super().__init__()
        self.lean = lean
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 1, 1))

    def forward(self, x, gate):
        # The fold stores per-sample weights (N, out, in) instead of x * gate (N, in, H, W): less
        # only while H * W > out, so the last stages and small images keep the plain conv.
        if (self.training and torch.is_grad_enabled() and _lean(self.lean, x)
                and x.shape[2] * x.shape[3] > self.weight.shape[0]):
            return _gate_folded_projection(x, gate, self.weight)
        return F.conv2d(x * gate[:, :, None, None], self.weight)

    def extra_repr(self):
        return f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel_size=(1, 1), bias=False"


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1, depthwise kxk, squeeze-excite, project 1x1."""

    def __init__(self, in_channels, out_channels, expand, kernel, stride, drop_path_rate, norm, lean=None,
                 same_padding=False):
        super().__init__()
        mid = in_channels * expand
        self.has_residual = stride == 1 and in_channels == out_channels
        if expand != 1:
            self.expand_conv = nn.Conv2d(in_channels, mid, 1, bias=False)
            self.expand_bn = norm(mid)
            self.expand_act = BatchNormSiLU(lean)
        else:  # B0's first stage: no expansion
            self.expand_conv = None
        self.dw_conv = conv(mid, mid, kernel, stride, groups=mid, same_padding=same_padding)
        self.dw_bn = norm(mid)
        self.dw_act = BatchNormSiLU(lean)
        # Paper quirk: the squeeze width comes from the block's INPUT channels, not the expanded ones.
        self.se = SqueezeExcite(mid, max(1, in_channels // 4))
        self.project_conv = GatedProjection(mid, out_channels, lean)
        self.project_bn = norm(out_channels)
        self.drop_path = DropPath(drop_path_rate) if self.has_residual else nn.Identity()

    def forward(self, x):
        shortcut = x
        if self.expand_conv is not None:
            x = self.expand_conv(x)
            x = self.expand_act(x, self.expand_bn)
        x = self.dw_conv(x)
        x = self.dw_act(x, self.dw_bn)
        gate = self.se(x)
        x = self.project_conv(x, gate)  # 1x1 conv of x * gate (the squeeze-excite scaling)
        x = self.project_bn(x)  # linear bottleneck: no activation
        if self.has_residual:
            x = self.drop_path(x) + shortcut
        return x


class _RunningStatsFrozen:
    """Context manager (reusable): inside, the BatchNorm running statistics of `module` stay as
    they are (momentum 0, the batch count restored on exit). Without a module it changes nothing."""

    def __init__(self, module=None):
        modules = module.modules() if module is not None else ()
        self.norms = [m for m in modules if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.momentum, m.num_batches_tracked.clone()) for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc_info):
        for m, (momentum, tracked) in zip(self.norms, self.saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)


def _forward_recompute(block, x):
    """Run `block` under activation checkpointing. The recomputation in backward must not move the
    BatchNorm running statistics a second time, so it runs with them frozen. Compiled graphs apply
    a buffer update once whatever they recompute, and take no such context (torch.compile accepts
    only its own there): they get the plain checkpoint."""
    if torch.compiler.is_compiling():
        return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    contexts = (_RunningStatsFrozen(), _RunningStatsFrozen(block))  # (forward: as it is, recomputation: frozen)
    return torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False, context_fn=lambda: contexts)


class EfficientNet(nn.Module):
    """`lean_activations` stores fewer activations for backward: BatchNorm+SiLU pairs keep only
    their input and recompute the normalisation in backward, and the squeeze-excite gate is folded
    into the projection's weights (the section at the end of this file). Same results and state
    dicts either way. It pays on CPUs and not on GPUs (benchmarks/README.md has the figures), so
    the default, None, is lean for CPU tensors and torchvision's operations elsewhere (decided per
    forward from the input's device); True / False force either. Under torch.compile the plain
    operations are traced either way, and evaluation and export (eval mode) always run them.

    `same_padding` pads the strided convolutions as TensorFlow's "SAME" does (see SamePadConv2d), as
    Google's checkpoints (timm's `tf_efficientnet_bX`) need; the default pads symmetrically (k // 2)
    as torchvision and timm's `efficientnet_bX` do."""

    def __init__(self, width=1.0, depth=1.0, dropout=0.2, num_classes=1000, drop_path_rate=0.2,
                 bn_eps=1e-5, bn_momentum=0.1, lean_activations=None, stages=B0_STAGES, same_padding=False):
        super().__init__()
        self.same_padding = same_padding

        def norm(channels):
            return nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum)

        stem = round_filters(B0_STEM, width)
        self.stem_conv = conv(3, stem, 3, 2, same_padding=same_padding)
        self.stem_bn = norm(stem)
        self.stem_act = BatchNormSiLU(lean_activations)

        stages = [Stage(e, k, s, round_filters(i, width), round_filters(o, width), round_repeats(r, depth))
                  for e, k, s, i, o, r in stages]
        num_blocks = sum(stage.repeats for stage in stages)
        blocks = []
        for stage in stages:
            for j in range(stage.repeats):
                # Paper quirk: the drop-path rate grows linearly with the GLOBAL block index.
                rate = drop_path_rate * len(blocks) / num_blocks
                in_channels, stride = (stage.in_channels, stage.stride) if j == 0 else (stage.out_channels, 1)
                blocks.append(MBConv(in_channels, stage.out_channels, stage.expand, stage.kernel, stride, rate, norm,
                                     lean_activations, same_padding))
        self.blocks = nn.Sequential(*blocks)
        # Backbone outputs: the last block before each stride-2 block, and the last one (timm's
        # features_only). The stem halves the resolution, so these are at strides 2, 4, 8, 16, 32.
        strides = [stage.stride if j == 0 else 1 for stage in stages for j in range(stage.repeats)]
        self.feature_blocks = [i for i in range(num_blocks) if i + 1 == num_blocks or strides[i + 1] > 1]
        self.feature_channels = [blocks[i].project_bn.num_features for i in self.feature_blocks]

        head = round_filters(B0_HEAD, width)
        self.head_conv = nn.Conv2d(stages[-1].out_channels, head, 1, bias=False)
        self.head_bn = norm(head)
        self.head_act = BatchNormSiLU(lean_activations)
        # In place, as torchvision's: one seed then draws the same mask in both on CUDA too (there
        # the out-of-place nn.Dropout takes another kernel); the pooled features are read by nothing else.
        self.dropout = nn.Dropout(dropout, inplace=True)
        self.classifier = nn.Linear(head, num_classes)
        self.num_features = head
        self.grad_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self):
        """TF / timm initialisation."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, GatedProjection):  # a 1x1 conv: fan_out = out channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / m.weight.shape[0]))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                # TF's rule, U(+-1/sqrt(classes)), sized for ImageNet's 1000: with fewer classes it
                # would start the logits that many times more confident (10 classes: 10x, a first
                # loss of 5.5 against ln 10 = 2.3), and short runs spend their first epochs
                # unlearning it. So fewer classes keep ImageNet's scale.
                bound = 1.0 / math.sqrt(max(m.out_features, 1000))
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block's activations in backward instead of storing them (less memory)."""
        self.grad_checkpointing = enable

    def _stem_and_blocks(self, x, keep):
        """(N, 3, H, W) through the stem and the blocks -> the outputs of the blocks numbered in `keep`."""
        x = self.stem_conv(x)
        x = self.stem_act(x, self.stem_bn)
        outputs = []
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = _forward_recompute(block, x)
            else:
                x = block(x)
            if index in keep:
                outputs.append(x)
        return outputs

    def forward_features(self, x):
        """(N, 3, H, W) -> (N, num_features, H/32, W/32), before pooling."""
        (x,) = self._stem_and_blocks(x, keep=[len(self.blocks) - 1])
        x = self.head_conv(x)
        x = self.head_act(x, self.head_bn)
        return x

    def feature_maps(self, x):
        """(N, 3, H, W) -> the maps at strides 2, 4, 8, 16 and 32, with `feature_channels` channels:
        a backbone for detection or segmentation (the head conv and classifier are not run)."""
        return self._stem_and_blocks(x, keep=self.feature_blocks)

    def forward(self, x):
        x = self.forward_features(x)
        x = x.mean((2, 3))
        x = self.dropout(x)
        return self.classifier(x)


def create_model(arch, num_classes=1000, **overrides):
    """EfficientNet member `arch` ("b0".."b7" or "efficientnet_b0"...; timm's "tf_efficientnet_b0"...
    adds TF's "SAME" padding and BatchNorm eps 1e-3 / momentum 0.01). `overrides` are EfficientNet
    arguments, e.g. dropout=0.3, drop_path_rate=0.1, bn_eps=1e-3, bn_momentum=0.01,
    lean_activations=False (default None: lean on the CPU only)."""
    kwargs = arch_config(arch)
    kwargs.update(overrides)
    return EfficientNet(num_classes=num_classes, **kwargs)


# ---------------------------------------------------------------------------------------------
# Weight import from torchvision's and timm's `efficientnet_bX` state dicts.

# Sub-module names inside one block, in order, for blocks without and with the expand conv.
_OURS = {False: ["dw_conv", "dw_bn", "se.reduce", "se.expand", "project_conv", "project_bn"],
         True: ["expand_conv", "expand_bn", "dw_conv", "dw_bn", "se.reduce", "se.expand",
                "project_conv", "project_bn"]}
_TORCHVISION = {False: ["block.0.0", "block.0.1", "block.1.fc1", "block.1.fc2", "block.2.0", "block.2.1"],
                True: ["block.0.0", "block.0.1", "block.1.0", "block.1.1", "block.2.fc1", "block.2.fc2",
                       "block.3.0", "block.3.1"]}
_TIMM = {False: ["conv_dw", "bn1", "se.conv_reduce", "se.conv_expand", "conv_pw", "bn2"],
         True: ["conv_pw", "bn1", "conv_dw", "bn2", "se.conv_reduce", "se.conv_expand", "conv_pwl", "bn3"]}


class _Layout(NamedTuple):
    marker: str  # a key that identifies the layout
    block_key: str  # regex of a block's keys: (stage, block in the stage, the rest)
    block_names: dict  # {has an expand conv: sub-module names in a block, in _OURS's order}
    outer_names: dict  # sub-module names outside the blocks -> ours


_LAYOUTS = {
    "torchvision": _Layout("features.0.0.weight", r"features\.([1-7])\.(\d+)\.(.+)", _TORCHVISION,
                           {"features.0.0": "stem_conv", "features.0.1": "stem_bn", "features.8.0": "head_conv",
                            "features.8.1": "head_bn", "classifier.1": "classifier"}),
    "timm": _Layout("conv_stem.weight", r"blocks\.(\d+)\.(\d+)\.(.+)", _TIMM,
                    {"conv_stem": "stem_conv", "bn1": "stem_bn", "conv_head": "head_conv", "bn2": "head_bn",
                     "classifier": "classifier"}),
}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP's and torch.compile's, nested in either order


def _split(key, names):
    """'a.b.weight' with names containing 'a.b' -> ('a.b', 'weight'); None when no name matches."""
    for name in names:
        if key.startswith(name + "."):
            return name, key[len(name) + 1:]
    return None


def convert_state_dict(state_dict, model=None):
    """Return `state_dict` in this file's layout, whatever it came from: this model, torchvision's
    `efficientnet_bX` or timm's `efficientnet_bX` / `tf_efficientnet_bX`, with or without `module.`
    (DDP) and `_orig_mod.` (torch.compile) prefixes. A training checkpoint of this repo (a dict with a
    "model" entry) is unwrapped. With `model`, keys and shapes are checked against it; any problem
    raises ValueError naming the keys and the layout that was expected.
    (timm's tf_ weights also need TF's padding and BatchNorm eps: build the model by the tf_ name.)"""
    converted, layout = _convert(state_dict)
    if model is not None:
        _check_against(converted, model.state_dict(), layout)
    return converted


def load_pretrained(model, state_dict):
    """Load weights of any layout convert_state_dict reads into `model`, whose classifier may have
    another number of classes (fine-tuning). Every other tensor must fit `model` exactly (else
    ValueError naming the keys) and is copied bit for bit; a classifier of another size keeps the
    model's fresh initialisation. Returns what was not loaded, one line per item to print, e.g.
    ["classifier re-initialised: 1000 -> 4 classes"]; [] when everything was loaded.

        model = create_model("b0", num_classes=4)
        for line in load_pretrained(model, torch.load("efficientnet_b0_rwightman-7f5810bc.pth")):
            print(line)
    """
    converted, layout = _convert(state_dict)
    expected = model.state_dict()
    skipped = []
    theirs, ours = converted.get("classifier.weight"), expected["classifier.weight"]
    # Only the class count may differ: another input width means another member.
    if theirs is not None and theirs.shape != ours.shape and theirs.shape[1:] == ours.shape[1:]:
        converted = {k: v for k, v in converted.items() if not k.startswith("classifier.")}
        expected = {k: v for k, v in expected.items() if not k.startswith("classifier.")}
        skipped.append(f"classifier re-initialised: {theirs.shape[0]} -> {ours.shape[0]} classes")
    _check_against(converted, expected, layout)
    model.load_state_dict(converted, strict=not skipped)
    return skipped


def _convert(state_dict):
    """-> (state_dict in this file's layout, name of the layout it was read as)."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    state_dict = dict(state_dict)  # (torch's consume_prefix_in_state_dict_if_present works in place)
    while any(key.startswith(_WRAPPER_PREFIXES) for key in state_dict):
        for prefix in _WRAPPER_PREFIXES:
            consume_prefix_in_state_dict_if_present(state_dict, prefix)
    layout = next((name for name, spec in _LAYOUTS.items() if spec.marker in state_dict), "efficientnet.py")
    if layout == "efficientnet.py":
        if "stem_conv.weight" not in state_dict:
            raise ValueError("state dict is not an EfficientNet of torchvision, timm or efficientnet.py: "
                             "expected a key 'features.0.0.weight', 'conv_stem.weight' or 'stem_conv.weight' "
                             f"(first keys: {', '.join(list(state_dict)[:4])})")
        converted, unknown = state_dict, []
    else:
        spec = _LAYOUTS[layout]
        converted, unknown, blocks = {}, [], {}
        for key, value in state_dict.items():
            match = re.fullmatch(spec.block_key, key)
            if match:  # group by (stage, block) to number the blocks globally afterwards
                blocks.setdefault((int(match[1]), int(match[2])), {})[match[3]] = (key, value)
                continue
            part = _split(key, spec.outer_names)
            if part is None:
                unknown.append(key)
            else:
                converted[f"{spec.outer_names[part[0]]}.{part[1]}"] = value
        for index, (_, params) in enumerate(sorted(blocks.items())):
            # Blocks with an expand conv have one more conv+BN; the last name exists only in them.
            expanded = any(_split(rest, spec.block_names[True][-1:]) for rest in params)
            theirs, ours = spec.block_names[expanded], _OURS[expanded]
            for rest, (key, value) in params.items():
                part = _split(rest, theirs)
                if part is None:
                    unknown.append(key)
                else:
                    converted[f"blocks.{index}.{ours[theirs.index(part[0])]}.{part[1]}"] = value
    if unknown:
        raise ValueError(f"state dict looks like {layout}'s EfficientNet but has keys that layout does not "
                         f"have: {', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}")
    return converted, layout


def _check_against(converted, expected, layout):
    missing = [k for k in expected if k not in converted]
    unexpected = [k for k in converted if k not in expected]
    mismatched = [f"{k} {tuple(converted[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                  if k in converted and converted[k].shape != v.shape]
    problems = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)):
        if keys:
            problems.append(f"{what}: {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
    if problems:
        raise ValueError(f"state dict (read as {layout} layout) does not fit this model "
                         f"({len(expected)} keys expected; is it another member or num_classes?): "
                         + "; ".join(problems))


# =================================================================================================
# Lean activations: the memory-saving training path of BatchNormSiLU and GatedProjection, which
# choose it themselves (above). It gives the same results and state dicts as the plain operations
# with fewer activations kept for backward; torch.compile (whose inductor fuses and recomputes such
# pairs itself), evaluation and export always meet the plain operations.

def _lean(lean, x):
    """`lean_activations` None (the default) means: lean for CPU tensors only, where it pays
    (benchmarks/README.md). Never while compiling."""
    return (x.device.type == "cpu" if lean is None else lean) and not torch.compiler.is_compiling()


class _BatchNormSiLU(torch.autograd.Function):
    """Training-mode BatchNorm followed by SiLU as one autograd node that keeps only its input x.
    The standard pair keeps x (for BatchNorm), BN(x) (for SiLU) and, once more, its output (for the
    next layer); here BN(x) is recomputed in backward (one cheap pass) into a buffer that then takes
    the SiLU gradient in place. One activation-sized tensor less stored, and allocated, per pair."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mean, invstd = torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.eps = eps
        return F.silu(y, inplace=True)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        scale = invstd * weight  # BN(x) = x * scale + shift, per channel, in float32
        shift = bias - mean * scale
        view = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(view), x, scale.view(view), out=torch.empty_like(x))
        torch.ops.aten.silu_backward.grad_input(grad, y, grad_input=y)  # y now holds dL/dBN(x)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            y, x, weight, None, None, mean, invstd, True, ctx.eps, list(ctx.needs_input_grad[:3]))
        return dx, dweight, dbias, None, None, None, None


def _lean_batchnorm_silu(x, bn):
    """SiLU(bn(x)) for a training BatchNorm2d with running statistics and a momentum."""
    bn.num_batches_tracked.add_(1)  # as BatchNorm2d.forward does
    return _BatchNormSiLU.apply(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.momentum, bn.eps)


def _gate_folded_projection(x, gate, weight):
    """conv2d(x * gate, weight) with the gate (N, C) folded into per-sample weights (N, out, C): one
    batched matrix product, and x * gate, a tensor as large as the block's widest, is neither
    computed, stored for backward, nor differentiated through."""
    n, c, h, w = x.shape
    weight = weight.flatten(1)[None] * gate[:, None, :]  # (N, out, in)
    if x.is_contiguous(memory_format=torch.channels_last):  # rows of (H*W, C): no copies
        out = torch.bmm(x.permute(0, 2, 3, 1).reshape(n, h * w, c), weight.transpose(1, 2))
        return out.view(n, h, w, -1).permute(0, 3, 1, 2)
    return torch.bmm(weight, x.reshape(n, c, h * w)).view(n, -1, h, w)
# =================================================================================================
