"""Hypercolumn networks for colorization and its transfer (Larsson et al., CVPR 2017).

A trunk (AlexNet, VGG-16, ResNet-50/152) maps a lightness image to a list of feature maps
("taps"); a hypercolumn is every tap read at the same pixel by bilinear interpolation and
concatenated; a small head (Linear -> ReLU -> Dropout -> Linear) turns each hypercolumn into
logits. Training reads hypercolumns at a few random pixels per image (`forward`); inference
evaluates the head on the whole stride-4 grid (`dense`). Before transfer, BatchNorm is folded
into the convolutions (`fold_batchnorm`).

This file imports only torch and the standard library: copy it into another project as is.
Attribute names are the checkpoint format (paper / Caffe layer names):
`trunk.conv1_1.conv.weight`, `trunk.conv1_1.bn.running_mean`, `trunk.res4b35.branch2c.conv.weight`,
`head.fc1.weight`, `head.out.weight`.

Usage (colorize.py pre-trains with it, finetune_voc.py transfers it)::

    import torch
    from models import build_model, fold_batchnorm, sample_points

    model = build_model('vgg16', out_dim=64)           # 32 hue + 32 chroma logits
    x = torch.randn(8, 1, 224, 224)                     # L*/50 - 1, (B, 1, H, W)
    points = sample_points(8, 224, 224, count=128, border=32)   # (B, P, 2) int64 (y, x)
    logits = model(x, points)                           # (8, 128, 64)
    with torch.no_grad():
        grid = model.eval().dense(x)                    # (8, 64, 56, 56), stride 4
    deploy = fold_batchnorm(model)                      # BN folded into the convs

Small models for tests: `build_model('resnet152', 64, width=1/16, head_dim=32)`; full-size shapes
without allocating: build inside `with torch.device('meta'):`.
"""
import copy
import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


def _scaled(channels, width):
    """Channel count `channels` times the width multiplier, at least 1."""
    return max(1, round(channels * width))


class ConvBN(nn.Module):
    """Conv2d -> BatchNorm2d (or Identity) -> ReLU (optional).

    (B, in_channels, H, W) -> (B, out_channels, H', W'). `affine=False` is the paper's BN without
    scale/shift after a conv with bias (VGG-16, AlexNet); `affine=True` is standard ResNet BN after
    a bias-free conv. `batchnorm=False` builds a conv with bias and an Identity in place of `bn`,
    so a folded model (see `fold_batchnorm`) has the same keys. Before BN without affine the conv
    bias gets no gradient (BN subtracts it again); it only matters once folding writes the shift into it.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, *,
                 batchnorm=True, affine=False, relu=True):
        super().__init__()
        self.out_channels = out_channels
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                              bias=not (batchnorm and affine))
        self.bn = nn.BatchNorm2d(out_channels, affine=affine) if batchnorm else nn.Identity()
        self.relu = relu

    def forward(self, x):
        x = self.bn(_conv(self.conv, x))
        return F.relu(x, inplace=True) if self.relu else x  # x is a fresh tensor; no backward needs it


def _conv(conv, x):
    """conv(x), computed as unfold + matmul on a CPU when the kernel spans the map's shorter side.

    That is fc6 (7x7 on VGG's 3x3-7x7 pool5): oneDNN's weight gradient for it is 10-50x slower
    than the same product as a matmul. Same parameters, same result; GPUs keep cuDNN.
    """
    k = conv.kernel_size
    if x.device.type != 'cpu' or k[0] < min(x.shape[-2:]) or conv.stride != (1, 1) or conv.groups != 1:
        return conv(x)
    B, _, H, W = x.shape
    cols = F.unfold(x, k, dilation=conv.dilation, padding=conv.padding)  # (B, C*kh*kw, L)
    out = conv.weight.flatten(1) @ cols  # (B, C_out, L)
    if conv.bias is not None:
        out = out + conv.bias[:, None].to(out.dtype)  # bf16 under autocast, as conv(x) returns
    h = H + 2 * conv.padding[0] - conv.dilation[0] * (k[0] - 1)
    # out_channels, not -1: view cannot infer a dimension of an empty batch (B = 0)
    return out.view(B, conv.out_channels, h, W + 2 * conv.padding[1] - conv.dilation[1] * (k[1] - 1))


class Bottleneck(nn.Module):
    """ResNet bottleneck with Caffe branch names, stride on the 3x3 conv (torchvision, "v1.5").

    (B, in_channels, H, W) -> (B, out_channels, ceil(H/stride), ceil(W/stride)). BN here is affine after a
    bias-free conv (standard ResNet): the paper's non-affine BN after a bias-free conv would leave
    the layer with no learnable shift at all.
    """

    def __init__(self, in_channels, mid_channels, out_channels, stride, batchnorm):
        super().__init__()
        self.out_channels = out_channels
        bn = dict(batchnorm=batchnorm, affine=True)
        self.branch2a = ConvBN(in_channels, mid_channels, 1, **bn)
        self.branch2b = ConvBN(mid_channels, mid_channels, 3, stride, 1, **bn)
        self.branch2c = ConvBN(mid_channels, out_channels, 1, relu=False, **bn)
        projection = stride != 1 or in_channels != out_channels
        self.branch1 = ConvBN(in_channels, out_channels, 1, stride, relu=False, **bn) if projection else None

    def forward(self, x):
        shortcut = x if self.branch1 is None else self.branch1(x)
        return F.relu(self.branch2c(self.branch2b(self.branch2a(x))) + shortcut)


class Trunk(nn.Module):
    """A chain of named layers; the outputs of some of them (the taps) form the hypercolumn.

    forward(x): x (B, in_channels, H, W), H and W at least `min_size` (else ValueError; 1 for all
    but VGG-16) -> list over taps of (B, tap_channels[t], h_t, w_t),
    h_t ~ H / tap_strides[t] (VGG-16's pooling rounds down; AlexNet's and ResNet's padded layers
    and the extended-FOV pools round up). Taps are read after ReLU, in `tap_names` order; the last
    one is the deepest feature, for global pooling.
    Built by the factories `alexnet`, `vgg16`, `resnet50`, `resnet152`.
    """

    def __init__(self, in_channels, tap_input):
        super().__init__()
        self.in_channels = in_channels
        self.tap_input = tap_input
        self.steps = []  # (module name, tap name or None) in execution order
        self.tap_names, self.tap_channels, self.tap_strides = [], [], []
        self.out_channels, self.out_stride = in_channels, 1  # of the last step appended
        self.min_size = 1  # pixels per side of the smallest input (VGG-16: 32); forward refuses less
        if tap_input:
            self._record_tap('input')

    @property
    def hypercolumn_channels(self):
        """Channels of a hypercolumn: the sum over the taps (12,417 for the full-size VGG-16)."""
        return sum(self.tap_channels)

    def _record_tap(self, name):
        self.tap_names.append(name)
        self.tap_channels.append(self.out_channels)
        self.tap_strides.append(self.out_stride)

    def append(self, name, module, *, stride=1, tap=None):
        """Run `module` next (registered as `name` unless already there: fc_dropout runs twice).

        `stride`: how much the module downsamples; `tap`: the name under which its output joins
        the hypercolumn, or None. A module with an `out_channels` attribute (ConvBN, Bottleneck)
        sets the channel count of what follows.
        """
        if name not in self._modules:
            self.add_module(name, module)
        self.steps.append((name, tap))
        self.out_channels = getattr(module, 'out_channels', self.out_channels)
        self.out_stride *= stride
        if tap is not None:
            self._record_tap(tap)

    def init_weights(self):
        """Kaiming-normal (fan-out, ReLU) conv weights and zero biases; BatchNorm keeps its own init."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        # Python-level shape tests only (no host sync, no graph break under torch.compile): without
        # them an unbatched image fails deep inside (unpacking a 3-d map, or BatchNorm's "expected
        # 4D input") and a too-small one in a pooling ("Output size is too small").
        if x.dim() != 4:
            raise ValueError(f'expected images (B, {self.in_channels}, H, W), got shape {tuple(x.shape)}'
                             + (': for one image, add the batch dimension (x[None])' if x.dim() == 3 else ''))
        if min(x.shape[-2:]) < self.min_size:
            raise ValueError(f'a {x.shape[-2]}x{x.shape[-1]} input is too small for this trunk: it needs at least '
                             f'{self.min_size} pixels on each side (fewer leave its deepest maps empty); '
                             f'resize or pad the image')
        taps = [x] if self.tap_input else []
        for name, tap in self.steps:
            x = self._modules[name](x)
            if tap is not None:
                taps.append(x)
        return taps


def _append_extended_fov(trunk, width, batchnorm, affine):
    """The paper's "extended field of view": (2x2 max-pool -> 3x3 conv 1024) twice, both tapped.

    The pools round up (ceil_mode) so that small inputs keep at least a 1x1 map.
    """
    channels = _scaled(1024, width)
    for i in (1, 2):
        trunk.append(f'fov{i}_pool', nn.MaxPool2d(2, 2, ceil_mode=True), stride=2)
        trunk.append(f'fov{i}', ConvBN(trunk.out_channels, channels, 3, padding=1,
                                       batchnorm=batchnorm, affine=affine), tap=f'fov{i}')


def vgg16(in_channels=1, width=1.0, fc_dim=4096, batchnorm=True, extended_fov=False):
    """VGG-16 trunk: torchvision's conv stack, fc6 = 7x7 conv (pad 3) on pool5, fc7 = 1x1 conv.

    Taps (stride): input (1), conv1_1, conv1_2 (1), conv2_x (2), conv3_x (4), conv4_x (8),
    conv5_x (16), fc6, fc7 (32) [, fov1 (64), fov2 (128)]; 12,417 channels at full size.
    `fc_dim` is the absolute channel count of fc6/fc7 (not scaled by `width`).
    `trunk.fc_dropout` (p=0) follows the ReLU of fc6 and fc7 and is part of their taps (the
    authors' pre-training used p=0.5 there, colorize.py --fc-dropout; finetune_voc.py sets 0.5 for classification).
    Inputs need at least 32 pixels on a side (five 2x2 poolings): `min_size`, checked by forward.
    """
    trunk = Trunk(in_channels, tap_input=True)
    trunk.min_size = 32
    bn = dict(batchnorm=batchnorm, affine=False)
    for stage, (channels, convs) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], 1):
        if stage > 1:
            trunk.append(f'pool{stage - 1}', nn.MaxPool2d(2, 2), stride=2)
        for i in range(1, convs + 1):
            name = f'conv{stage}_{i}'
            trunk.append(name, ConvBN(trunk.out_channels, _scaled(channels, width), 3, padding=1, **bn), tap=name)
    trunk.append('pool5', nn.MaxPool2d(2, 2), stride=2)
    return _finish_fc(trunk, ConvBN(trunk.out_channels, fc_dim, 7, padding=3, **bn), bn, width, extended_fov)


def alexnet(in_channels=1, width=1.0, fc_dim=4096, batchnorm=True, extended_fov=False):
    """AlexNet trunk: torchvision's channels and kernels, paddings for exact strides.

    conv1 11x11/4 pad 5, 3x3/2 max-pools pad 1, so a 224 input gives 56 (conv1), 28 (conv2),
    14 (conv3-5), 7 (pool5, fc6, fc7). fc6 is a 6x6 conv (its weight reshapes to torchvision's
    Linear(256*6*6, 4096)) on pool5 zero-padded 2 before / 3 after (TensorFlow's 'SAME' rule), which
    keeps 7x7.
    Taps (stride): input (1), conv1 (4), conv2 (8), conv3, conv4, conv5 (16), fc6, fc7 (32)
    [, fov1 (64), fov2 (128)]; 9,345 channels at full size. `fc_dim`, `fc_dropout` as in `vgg16`.
    """
    trunk = Trunk(in_channels, tap_input=True)
    bn = dict(batchnorm=batchnorm, affine=False)
    trunk.append('conv1', ConvBN(in_channels, _scaled(64, width), 11, 4, 5, **bn), stride=4, tap='conv1')
    trunk.append('pool1', nn.MaxPool2d(3, 2, 1), stride=2)
    trunk.append('conv2', ConvBN(trunk.out_channels, _scaled(192, width), 5, padding=2, **bn), tap='conv2')
    trunk.append('pool2', nn.MaxPool2d(3, 2, 1), stride=2)
    for name, channels in [('conv3', 384), ('conv4', 256), ('conv5', 256)]:
        trunk.append(name, ConvBN(trunk.out_channels, _scaled(channels, width), 3, padding=1, **bn), tap=name)
    trunk.append('pool5', nn.MaxPool2d(3, 2, 1), stride=2)
    trunk.append('pad6', nn.ZeroPad2d((2, 3, 2, 3)))  # (left, right, top, bottom): TensorFlow's 'SAME'
    return _finish_fc(trunk, ConvBN(trunk.out_channels, fc_dim, 6, **bn), bn, width, extended_fov)


def _finish_fc(trunk, fc6, bn, width, extended_fov):
    """fc6, fc7 (1x1), each followed by the shared `fc_dropout` and tapped; the extended FOV; init."""
    fc_dropout = nn.Dropout(0.0)
    trunk.append('fc6', fc6)
    trunk.append('fc_dropout', fc_dropout, tap='fc6')
    trunk.append('fc7', ConvBN(fc6.out_channels, fc6.out_channels, 1, **bn))
    trunk.append('fc_dropout', fc_dropout, tap='fc7')
    if extended_fov:
        _append_extended_fov(trunk, width, bn['batchnorm'], affine=False)
    trunk.init_weights()
    return trunk


def _resnet(blocks, numbered_stages, taps, in_channels, width, batchnorm, extended_fov):
    """ResNet trunk with Caffe names: conv1, res2a.., res3a, res3b1.. (numbered stages) or res3b..

    Each block's residual branch starts at zero (the scale of its last BN, or without BN the weights
    of its last conv; Goyal et al. 2017): the sums would otherwise grow block by block, to |x| ~ 1e6
    at ResNet-152's res4b35 with BN at its initial statistics or without BN.
    """
    trunk = Trunk(in_channels, tap_input=False)
    trunk.append('conv1', ConvBN(in_channels, _scaled(64, width), 7, 2, 3, batchnorm=batchnorm, affine=True),
                 stride=2, tap='conv1')
    trunk.append('pool1', nn.MaxPool2d(3, 2, 1), stride=2)
    for stage, count in zip((2, 3, 4, 5), blocks):
        mid, out = _scaled(64 << (stage - 2), width), _scaled(256 << (stage - 2), width)
        for i in range(count):
            if i == 0:
                name = f'res{stage}a'
            elif stage in numbered_stages:
                name = f'res{stage}b{i}'
            else:
                name = f'res{stage}' + 'abcdefghijklmnopqrstuvwxyz'[i]
            stride = 2 if i == 0 and stage > 2 else 1
            trunk.append(name, Bottleneck(trunk.out_channels, mid, out, stride, batchnorm),
                         stride=stride, tap=name if name in taps else None)
    missing = set(taps) - set(trunk.tap_names)
    if missing:  # not an assert: under python -O the hypercolumn would silently lose these taps
        raise ValueError(f'tap names {sorted(missing)} are not layers of this ResNet (its layers: conv1, '
                         f'{", ".join(name for name, _ in trunk.steps if name.startswith("res"))})')
    if extended_fov:
        _append_extended_fov(trunk, width, batchnorm, affine=True)
    trunk.init_weights()
    for module in trunk.modules():  # each residual branch starts at zero: every block is its shortcut
        if isinstance(module, Bottleneck):
            last = module.branch2c
            nn.init.zeros_(last.bn.weight if batchnorm else last.conv.weight)
    return trunk


def resnet152(in_channels=1, width=1.0, batchnorm=True, extended_fov=False):
    """ResNet-152 trunk (blocks 3, 8, 36, 3), torchvision layout, Caffe names.

    Taps (stride): conv1 (2), res2a, res2b, res2c (4), res3b1, res3b4, res3b7 (8),
    res4b5, res4b10, ..., res4b35 (16), res5c (32) [, fov1 (64), fov2 (128)]; 11,584 channels.
    """
    taps = ['conv1', 'res2a', 'res2b', 'res2c', 'res3b1', 'res3b4', 'res3b7',
            *[f'res4b{i}' for i in range(5, 36, 5)], 'res5c']
    return _resnet((3, 8, 36, 3), (3, 4), taps, in_channels, width, batchnorm, extended_fov)


def resnet50(in_channels=1, width=1.0, batchnorm=True, extended_fov=False):
    """ResNet-50 trunk (blocks 3, 4, 6, 3), torchvision layout, Caffe names (res3a..d, res4a..f).

    Taps (stride): conv1 (2), res2a..c (4), res3b, res3d (8), res4b, res4d, res4f (16),
    res5c (32) [, fov1 (64), fov2 (128)]; 6,976 channels.
    """
    taps = ['conv1', 'res2a', 'res2b', 'res2c', 'res3b', 'res3d', 'res4b', 'res4d', 'res4f', 'res5c']
    return _resnet((3, 4, 6, 3), (), taps, in_channels, width, batchnorm, extended_fov)


MODELS = {'alexnet': alexnet, 'vgg16': vgg16, 'resnet50': resnet50, 'resnet152': resnet152}


def _source_index(pixel, stride, size):
    """Bilinear neighbours in a map of `size` cells at `stride` for float pixel positions.

    pixel: float tensor, input-image pixel coordinates (integer = pixel centre). The map position
    is (pixel + 0.5) / stride - 0.5, clamped to [0, size - 1], as in F.interpolate(...,
    align_corners=False). Returns (i0, i1) int64 and the weight of i1 (same shape as `pixel`).
    """
    position = ((pixel + 0.5) / stride - 0.5).clamp(0, size - 1)
    i0 = position.floor()
    weight = position - i0
    i0 = i0.long()
    return i0, (i0 + 1).clamp(max=size - 1), weight


def _lerp(a, b, weight):
    # Written out rather than torch.lerp so that bf16 values with fp32 weights promote to fp32.
    return a * (1 - weight) + b * weight


# Maps of at most this many cells are read by one matmul with the points' bilinear weights over all
# cells, (B, P, h*w) @ (B, h*w, C), instead of a gather of the four neighbours, whose backward
# scatter-adds into a zero-filled map; the matmul's backward is a matmul. Coarse maps hold most of
# the channels (VGG-16 at crop 224: 91% of its hypercolumn in maps of 28 x 28 or fewer) and cost it
# 4 * h * w FLOPs per point and channel. A small gain: VGG-16's compiled bf16 training step (batch 128, one
# H200) took 57.5 ms against 58.1 ms with gathers only (colorize.py --bench-profile, row "gathers").
# The default of `sample_bilinear` and of each HypercolumnNet's `matmul_cells` (0: gathers only).
MATMUL_CELLS = 1024


def _bilinear_weights(pixel, stride, size):
    """(B, P) pixel coordinates along one side -> (B, P, size): each point's weight on each cell."""
    i0, i1, weight = _source_index(pixel, stride, size)
    cells = torch.arange(size, device=pixel.device)
    weight = weight[..., None]
    return (cells == i0[..., None]) * (1 - weight) + (cells == i1[..., None]) * weight  # i0 == i1: adds


def sample_bilinear(feature, points, stride, matmul_cells=MATMUL_CELLS):
    """Read a feature map at input-image pixels by bilinear interpolation.

    feature: (B, C, h, w), contiguous or channels_last, the map of a layer with `stride` (pixels
    per cell). points: (B, P, 2) pixel coordinates (y, x) of the input image, int or float
    (integer = pixel centre), any value: a position beyond the map's first or last cell centre reads
    that edge cell (the clamp F.interpolate applies at its border), so a point outside the image
    reads the map's edge and raises nothing. Maps of at most `matmul_cells` cells are read by a
    matmul, larger ones by a gather (the same values). Returns (B, P, C) in feature's dtype, equal to
    F.interpolate(feature, size=(h*stride, w*stride), mode='bilinear', align_corners=False)
    [b, :, y', x'] at integer pixels, y' = y clamped to [0, h*stride - 1], x' likewise.
    Differentiable with respect to `feature`, and to float `points` (piecewise linear in them: zero
    gradient where clamped).

    (The authors' sparse extractors read a map at y / stride, cell i at pixel stride * i, while
    their dense deploy net's bilinear deconvolutions used this half-pixel rule.)
    That convention puts cell i at pixel stride * i + (stride - 1) / 2, which is exactly the centre
    of its receptive field in VGG-16 (2x2 pools, centred convs). AlexNet's and ResNet's strided
    layers centre cell i at stride * i instead, so most of their taps are read (stride - 1) / 2 pixels
    off (half a cell): fixed, the same in training and in the dense path, learnt around.
    """
    B, C, h, w = feature.shape
    if points.dim() != 3 or points.shape[0] != B or points.shape[2] != 2:
        raise ValueError(f'points must be (B={B}, P, 2) pixel coordinates (y, x), got {tuple(points.shape)}')
    dtype = torch.promote_types(feature.dtype, torch.float32)
    points = points.to(dtype)
    flat = feature.permute(0, 2, 3, 1).reshape(B, h * w, C)  # a view for channels_last
    if h * w <= matmul_cells:
        weights = (_bilinear_weights(points[..., 0], stride, h)[..., :, None]
                   * _bilinear_weights(points[..., 1], stride, w)[..., None, :])  # (B, P, h, w)
        return torch.bmm(weights.flatten(2).to(feature.dtype), flat).to(feature.dtype)  # autocast: bf16
    y0, y1, wy = _source_index(points[..., 0], stride, h)  # (B, P) each
    x0, x1, wx = _source_index(points[..., 1], stride, w)
    # The four neighbours in one gather: its backward fills one zero map per tap and scatters into
    # it once, where four gathers filled and summed four maps.
    cells = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=2)  # (B, P, 4)
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], dim=2)  # (B, P, 4)
    batch = torch.arange(B, device=feature.device)[:, None, None]  # (B, 1, 1)
    # bf16 values with fp32 weights promote to fp32 for the sum.
    return (flat[batch, cells] * weights[..., None]).sum(2).to(feature.dtype)  # (B, P, 4, C) -> (B, P, C)


def _resample_to_grid(feature, stride, grid_stride, grid_size):
    """Separable bilinear resampling of a (B, C, h, w) map at `stride` to the grid at `grid_stride`.

    Grid cell (i, j) is the pixel position (grid_stride * i + (grid_stride - 1) / 2, same for j),
    read with the coordinate rule of `sample_bilinear`. Returns (B, C, *grid_size), in at least fp32.
    """
    h, w = feature.shape[-2:]
    if h * stride == grid_size[0] * grid_stride and w * stride == grid_size[1] * grid_stride:
        # The map tiles the grid exactly (input sides divisible by both strides): the same rule
        # as F.interpolate's, which is far faster than the gathers below.
        return F.interpolate(feature.to(torch.promote_types(feature.dtype, torch.float32)), size=grid_size,
                             mode='bilinear', align_corners=False)
    feature = feature.contiguous()
    for dim, n in zip((2, 3), grid_size):
        pixel = torch.arange(n, device=feature.device, dtype=torch.float32) * grid_stride + (grid_stride - 1) / 2
        i0, i1, weight = _source_index(pixel, stride, feature.shape[dim])
        weight = weight.view((1, 1, n, 1) if dim == 2 else (1, 1, 1, n))
        feature = _lerp(feature.index_select(dim, i0), feature.index_select(dim, i1), weight)
    return feature


class HypercolumnNet(nn.Module):
    """Trunk + per-pixel head on hypercolumns.

    head: fc1 Linear(hypercolumn_channels, head_dim) -> ReLU -> Dropout(dropout) -> out
    Linear(head_dim, out_dim). Inputs x are (B, trunk.in_channels, H, W) images, points (B, P, 2)
    (y, x) pixel coordinates as for `sample_bilinear`.
    """

    def __init__(self, trunk, out_dim, head_dim=1024, dropout=0.5):
        super().__init__()
        self.trunk = trunk
        self.head = nn.Sequential(OrderedDict(
            fc1=nn.Linear(trunk.hypercolumn_channels, head_dim),
            relu=nn.ReLU(),
            dropout=nn.Dropout(dropout),
            out=nn.Linear(head_dim, out_dim),
        ))
        nn.init.kaiming_normal_(self.head.fc1.weight, nonlinearity='relu')
        nn.init.zeros_(self.head.fc1.bias)
        nn.init.normal_(self.head.out.weight, std=0.01)
        nn.init.zeros_(self.head.out.bias)
        self.matmul_cells = MATMUL_CELLS  # a setting, not saved: the benchmark's "gathers" row sets 0

    def hypercolumns(self, x, points):
        """(B, C_in, H, W), (B, P, 2) -> (B, P, hypercolumn_channels), taps in trunk order, in the
        dtype of the deepest tap (bf16 under bf16 autocast, where fc1 reads bf16 anyway)."""
        maps = self.trunk(x)
        columns = [sample_bilinear(m, points, s, self.matmul_cells) for m, s in zip(maps, self.trunk.tap_strides)]
        # Under autocast the input tap is float32 (x itself) and the others bf16: torch.cat would
        # promote the whole (B, P, 12,417) hypercolumn to float32 and fc1 cast it back, two extra
        # passes over it (Inductor too materializes the float32 concatenation). Casting first gives
        # fc1 the same bf16 values.
        dtype = columns[-1].dtype
        return torch.cat([c.to(dtype) for c in columns], dim=-1)

    def forward(self, x, points):
        """(B, C_in, H, W), (B, P, 2) -> (B, P, out_dim) logits at the points."""
        return self.head(self.hypercolumns(x, points))

    def dense(self, x, stride=4, tile=1024):
        """The head on every cell of the stride-`stride` grid: (B, out_dim, ceil(H/s), ceil(W/s)).

        x: (B, trunk.in_channels, H, W); stride s: pixels between cells, any positive integer (4 is
        what finetune_voc.py and colorize.py use); tile: pixels, a positive integer, or None.

        Cell (i, j) is the pixel position (s*i + (s-1)/2, s*j + (s-1)/2), so in eval mode
        dense(x)[:, :, i, j] == forward(x, [[4i + 1.5, 4j + 1.5]]) for s = 4, and bilinear
        upsampling by s (align_corners=False) gives a full-resolution map. A cell whose position
        lies past the image's last pixel (H or W not a multiple of s) reads the maps at their edge,
        as `sample_bilinear` does.

        So that memory stays bounded, an input with a side longer than tile + 2 * margin pixels is
        processed in tiles of `tile` pixels (rounded up to the trunk's stride), each run with a
        margin wide enough that no output cell kept from it sees the tile's edge (`tile_margin`:
        288 px for VGG-16, 256 for AlexNet, 800 for ResNet-152, whose receptive field is large).
        Each piece is then at most that rounded-up tile + 2 * margin pixels on a side, and the
        result equals the one-piece one up to float rounding in eval mode (in train mode BatchNorm
        normalises each piece by its own statistics and updates its running ones once per piece).
        tile=None: always in one piece.
        """
        H, W = x.shape[-2:]
        if tile is None:
            return self._dense(x, stride)
        margin, align = tile_margin(self.trunk, stride)
        if H <= tile + 2 * margin and W <= tile + 2 * margin:
            return self._dense(x, stride)
        tile = -(-tile // align) * align  # origins on every map's grid and on the output grid
        out = None
        for y0 in range(0, H, tile):
            for x0 in range(0, W, tile):
                top, left = max(0, y0 - margin), max(0, x0 - margin)
                part = self._dense(x[..., top:min(H, y0 + tile + margin), left:min(W, x0 + tile + margin)], stride)
                if out is None:
                    out = part.new_empty(*part.shape[:2], -(-H // stride), -(-W // stride))
                rows = slice(y0 // stride, -(-min(H, y0 + tile) // stride))  # the cells of this tile
                cols = slice(x0 // stride, -(-min(W, x0 + tile) // stride))
                out[..., rows, cols] = part[..., rows.start - top // stride:rows.stop - top // stride,
                                            cols.start - left // stride:cols.stop - left // stride]
        return out

    def _dense(self, x, stride):
        """`dense` in one piece. The full hypercolumn is never formed: fc1 is linear, so
        fc1(hypercolumn) = bias + sum over taps of its column block W_t applied to the tap. Coarse
        taps get W_t at their own resolution and the head_dim-channel result is resampled (once per
        stride); finer taps are resampled first."""
        H, W = x.shape[-2:]
        grid_size = ((H + stride - 1) // stride, (W + stride - 1) // stride)
        fc1, fc_out = self.head.fc1, self.head.out
        # Taps of one stride and map size are concatenated (with their column blocks), so that
        # each stride costs one conv and, for the coarse ones, one resampling of its head_dim-
        # channel result. Finer taps all go to the grid first and share one conv.
        groups = {}  # (tap stride, h, w), or 0 for "on the grid" -> ([features], [column blocks])
        start = 0
        for feature, tap_stride in zip(self.trunk(x), self.trunk.tap_strides):
            C = feature.shape[1]
            key = (tap_stride, *feature.shape[-2:])
            if tap_stride <= stride:
                if tap_stride < stride or tuple(feature.shape[-2:]) != grid_size:
                    feature = _resample_to_grid(feature, tap_stride, stride, grid_size)
                key = 0
            features, blocks = groups.setdefault(key, ([], []))
            features.append(feature)
            blocks.append(fc1.weight[:, start:start + C])
            start += C
        hidden = None
        for key, (features, blocks) in groups.items():
            feature = features[0] if len(features) == 1 else torch.cat(features, 1)
            columns = blocks[0] if len(blocks) == 1 else torch.cat(blocks, 1)
            # The resampled maps are fp32: in the weights' dtype for a bf16 model run without autocast.
            part = F.conv2d(feature.to(columns.dtype), columns[:, :, None, None])  # (B, head_dim, h_t, w_t)
            if key:
                part = _resample_to_grid(part, key[0], stride, grid_size)
            hidden = part.to(torch.promote_types(part.dtype, torch.float32)) if hidden is None else hidden.add_(part)
        hidden = hidden.add_(fc1.bias.view(1, -1, 1, 1))
        hidden = self.head.dropout(self.head.relu(hidden))
        return F.conv2d(hidden.to(fc_out.weight.dtype), fc_out.weight[:, :, None, None], fc_out.bias)


def receptive_field(trunk):
    """(size, stride) in input pixels of the trunk's last map: the side of the input window that one
    of its cells sees, and the distance between its cells. Raises ValueError on a layer type it
    does not know (it would get the size wrong)."""
    size, jump = 1, 1
    for name, _ in trunk.steps:
        module = trunk._modules[name]
        if isinstance(module, Bottleneck):  # the residual branch sees the most
            layers = [module.branch2a.conv, module.branch2b.conv, module.branch2c.conv]
        elif isinstance(module, ConvBN):
            layers = [module.conv]
        elif isinstance(module, (nn.Conv2d, nn.MaxPool2d)):
            layers = [module]
        elif isinstance(module, (nn.Dropout, nn.ReLU, nn.Identity, nn.ZeroPad2d)):
            layers = []
        else:
            raise ValueError(f'receptive_field: unknown layer {name} ({type(module).__name__})')
        for layer in layers:
            k, s, d = (v if isinstance(v, int) else v[0] for v in (layer.kernel_size, layer.stride, layer.dilation))
            size += d * (k - 1) * jump
            jump *= s
    return size, jump


def tile_margin(trunk, stride=4):
    """(margin, align) in pixels for tiling `dense`: an output cell at least `margin` pixels inside
    a tile sees nothing of the tile's edge. That is half the receptive field plus two cells of the
    deepest map: one for the cells that bilinear reading mixes, one for where a cell's receptive
    field is centred (half a cell off in AlexNet and the ResNets). Tile origins at multiples of
    `align` keep every map's cells and the stride-`stride` grid where they are in the whole image."""
    size, jump = receptive_field(trunk)
    align = math.lcm(jump, stride)
    return -(-(size // 2 + 2 * jump) // align) * align, align


def build_model(arch, out_dim, head_dim=1024, dropout=0.5, **trunk_kwargs):
    """HypercolumnNet on MODELS[arch](**trunk_kwargs): in_channels, width (channel multiplier, > 0),
    batchnorm, extended_fov, and for AlexNet and VGG-16 fc_dim. out_dim: logits per pixel; head_dim:
    the head's hidden width; dropout: the head's dropout probability, in [0, 1). An arch not in
    MODELS raises ValueError."""
    if arch not in MODELS:
        raise ValueError(f'unknown arch {arch!r}: choose one of {sorted(MODELS)}')
    return HypercolumnNet(MODELS[arch](**trunk_kwargs), out_dim, head_dim, dropout)


def sample_points(batch, height, width, count, border, generator=None, device=None):
    """`count` random pixels per image, uniform on [border, height-border) x [border, width-border).

    Returns (batch, count, 2) int64 (y, x). The generator's device draws the numbers; the result
    is moved to `device` (default: the generator's device, else the default device).
    """
    if border < 0 or height - 2 * border < 1 or width - 2 * border < 1:
        raise ValueError(f'a border of {border} px leaves no pixel to sample in a {height}x{width} image; '
                         f'use a border in [0, {(min(height, width) - 1) // 2}] or larger images')
    draw_device = generator.device if generator is not None else device
    y = torch.randint(border, height - border, (batch, count), generator=generator, device=draw_device)
    x = torch.randint(border, width - border, (batch, count), generator=generator, device=draw_device)
    points = torch.stack([y, x], dim=-1)  # (B, P, 2)
    return points if device is None else points.to(device)


def _fold_into_conv(conv, bn):
    """Fold eval-mode `bn` into the preceding `conv` in place (conv gains a bias if it had none)."""
    if bn.running_var is None:
        raise ValueError('cannot fold a BatchNorm without running statistics (track_running_stats=False)')
    dtype = torch.promote_types(conv.weight.dtype, torch.float32)  # fold in at least fp32
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)  # 1 / sigma
        shift = -bn.running_mean.to(dtype) * scale
        if conv.bias is not None:
            shift = shift + conv.bias.to(dtype) * scale
        if bn.affine:
            scale, shift = scale * bn.weight.to(dtype), shift * bn.weight.to(dtype) + bn.bias.to(dtype)
        conv.weight.copy_(conv.weight.to(dtype) * scale.view(-1, 1, 1, 1))
        if conv.bias is None:
            conv.bias = nn.Parameter(shift.to(conv.weight.dtype))
        else:
            conv.bias.copy_(shift)


def fold_batchnorm(model):
    """A deep copy of `model` with every ConvBN's BatchNorm folded into its conv and replaced by Identity.

    Non-affine BN: W' = W / sigma, b' = (b - mu) / sigma, sigma = sqrt(running_var + eps); affine BN
    also scales by gamma and shifts by beta (SyncBatchNorm too). The copy computes what `model.eval()`
    computes (always the running statistics; it keeps `model`'s train/eval mode, so call `.eval()` on
    it for inference), and its state dict loads into the same architecture built with batchnorm=False.
    """
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        if isinstance(module, ConvBN) and isinstance(module.bn, nn.modules.batchnorm._BatchNorm):
            _fold_into_conv(module.conv, module.bn)
            module.bn = nn.Identity()
    left = [name for name, m in folded.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if left:
        raise ValueError(f'BatchNorm layers {left} do not follow a conv inside a ConvBN, so they cannot be folded')
    return folded
