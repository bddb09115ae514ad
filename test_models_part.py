"""Tests for models.py (CPU, seconds). Run: python -m pytest -q test_models_part.py

TEST_COMPILE=1 also traces a model with torch.compile(fullgraph=True) (about 6 s more).

References come from outside models.py: F.interpolate for bilinear sampling, hand arithmetic
for channel counts, torchvision's layer definitions written out by hand for weight shapes and
torchvision's documented parameter counts.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (MODELS, ConvBN, HypercolumnNet, alexnet, build_model, fold_batchnorm, resnet50,
                    resnet152, sample_bilinear, sample_points, vgg16)

ARCHS = ['alexnet', 'vgg16', 'resnet50', 'resnet152']


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: OpenMP synchronisation costs more than it saves, and on a busy 2-core
    # machine it made single tests 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(arch, **kwargs):
    """A model small enough for CPU tests: 1/16 width, 16-wide fc6/fc7 and head."""
    fc = dict(fc_dim=16) if arch in ('alexnet', 'vgg16') else {}
    return build_model(arch, out_dim=5, head_dim=16, width=1 / 16, **fc, **kwargs)


def close(actual, expected, rel=1e-5):
    """Max abs difference within rel times the reference's scale (at least 1)."""
    scale = max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f'max error {err:.3g} > {rel:.0e} x scale {scale:.3g}'


def upsample_reference(feature, stride, points):
    """What dense bilinear upsampling of `feature` by `stride` holds at integer pixels: (B, P, C)."""
    B, C, h, w = feature.shape
    up = F.interpolate(feature, size=(h * stride, w * stride), mode='bilinear', align_corners=False)
    batch = torch.arange(B)[:, None]
    return up[batch, :, points[..., 0], points[..., 1]]  # (B, P, C)


def random_pixels(B, H, W, P, generator):
    """(B, P + 4, 2) int64 pixels including the four image corners."""
    y = torch.randint(0, H, (B, P), generator=generator)
    x = torch.randint(0, W, (B, P), generator=generator)
    corners = torch.tensor([[0, 0], [0, W - 1], [H - 1, 0], [H - 1, W - 1]]).expand(B, 4, 2)
    return torch.cat([torch.stack([y, x], -1), corners], dim=1)


# ---------------------------------------------------------------- sample_bilinear

@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('stride', [1, 2, 4, 8, 16, 32])
def test_sample_bilinear_matches_interpolate(stride, memory_format):
    g = torch.Generator().manual_seed(stride)
    feature = torch.randn(2, 3, 5, 7, generator=g).contiguous(memory_format=memory_format)
    points = random_pixels(2, 5 * stride, 7 * stride, 40, g)
    expected = upsample_reference(feature, stride, points)
    torch.testing.assert_close(sample_bilinear(feature, points, stride), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample_bilinear(feature, points.float(), stride), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 4, 32])
def test_sample_bilinear_between_pixels(stride):
    # Upsampling by 2*stride puts its pixel k at our (fractional) pixel k/2 - 0.25.
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 4, 6, generator=g)
    fine = random_pixels(2, 4 * 2 * stride, 6 * 2 * stride, 40, g)
    expected = upsample_reference(feature, 2 * stride, fine)
    torch.testing.assert_close(sample_bilinear(feature, fine / 2 - 0.25, stride), expected, rtol=0, atol=1e-6)


def test_sample_bilinear_gradient_matches_interpolate():
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    points = random_pixels(2, 40, 48, 30, g)
    weights = torch.randn(2, 34, 3, dtype=torch.float64, generator=g)
    ours = feature.detach().clone().requires_grad_()
    (sample_bilinear(ours, points, 8) * weights).sum().backward()
    reference = feature.detach().clone().requires_grad_()
    (upsample_reference(reference, 8, points) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad)
    assert ours.grad.abs().sum() > 0


def test_sample_bilinear_keeps_low_precision_dtype():
    feature = torch.randn(1, 4, 6, 6).to(torch.bfloat16)
    points = torch.tensor([[[0, 0], [10, 17], [23, 23]]])
    out = sample_bilinear(feature, points, 4)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 3, 4)
    torch.testing.assert_close(out.float(), upsample_reference(feature.float(), 4, points), rtol=1e-2, atol=1e-2)


# ---------------------------------------------------------------- sample_points

def test_sample_points_range_and_determinism():
    points = sample_points(3, 40, 50, 2000, border=8, generator=torch.Generator().manual_seed(5))
    assert points.shape == (3, 2000, 2) and points.dtype == torch.int64
    y, x = points[..., 0], points[..., 1]
    assert y.min() == 8 and y.max() == 40 - 8 - 1  # 2000 draws over 24 values hit both ends
    assert x.min() == 8 and x.max() == 50 - 8 - 1
    again = sample_points(3, 40, 50, 2000, border=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(points, again)
    other = sample_points(3, 40, 50, 2000, border=8, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(points, other)


def test_sample_points_border_leaving_one_pixel():
    points = sample_points(2, 9, 21, 5, border=4)
    assert (points[..., 0] == 4).all()


@pytest.mark.parametrize('height, width, border', [(64, 64, 32), (100, 20, 10), (10, 10, -1)])
def test_sample_points_impossible_border(height, width, border):
    with pytest.raises(ValueError, match='border'):
        sample_points(1, height, width, 8, border)


# ---------------------------------------------------------------- full-size shapes (meta device)

# Hand arithmetic from DESIGN.md's tap lists and the torchvision channel counts.
FULL_HYPERCOLUMN = {
    'vgg16': 1 + 2 * 64 + 2 * 128 + 3 * 256 + 3 * 512 + 3 * 512 + 2 * 4096,  # 12417
    'alexnet': 1 + 64 + 192 + 384 + 256 + 256 + 2 * 4096,  # 9345
    'resnet50': 64 + 3 * 256 + 2 * 512 + 3 * 1024 + 2048,  # 6976
    'resnet152': 64 + 3 * 256 + 3 * 512 + 7 * 1024 + 2048,  # 11584
}


@pytest.mark.parametrize('arch', ARCHS)
def test_full_size_shapes(arch):
    # One meta-device forward per arch (each costs ~1 s for ResNet-152): the extended-FOV trunk's
    # maps are the plain trunk's taps followed by fov1 and fov2.
    assert FULL_HYPERCOLUMN['vgg16'] == 12417
    with torch.device('meta'):
        model = build_model(arch, out_dim=64)
        extended = MODELS[arch](extended_fov=True)
        maps = extended(torch.empty(2, 1, 224, 224))
    trunk = model.trunk
    assert trunk.hypercolumn_channels == FULL_HYPERCOLUMN[arch]
    assert model.head.fc1.weight.shape == (1024, FULL_HYPERCOLUMN[arch])
    assert extended.tap_names == trunk.tap_names + ['fov1', 'fov2']
    assert extended.tap_strides == trunk.tap_strides + [64, 128]
    assert extended.tap_channels == trunk.tap_channels + [1024, 1024]
    assert extended.hypercolumn_channels == FULL_HYPERCOLUMN[arch] + 2 * 1024
    assert len(maps) == len(extended.tap_names)
    for name, m, channels, stride in zip(trunk.tap_names, maps, trunk.tap_channels, trunk.tap_strides):
        assert m.shape == (2, channels, 224 // stride, 224 // stride), name
    assert maps[-3].shape[-1] == 7  # fc7 / res5c, the deepest plain feature
    # 7x7 -> 2x2 pool (rounding up) -> 4x4 -> 2x2
    assert maps[-2].shape == (2, 1024, 4, 4) and maps[-1].shape == (2, 1024, 2, 2)


def test_full_size_outputs():
    # Meta-device forwards cost ~1 s for a ResNet; the tiny models check the other archs' outputs.
    with torch.device('meta'):
        model = build_model('vgg16', out_dim=64)
        x = torch.empty(2, 1, 224, 224)
        logits = model(x, torch.zeros(2, 128, 2, dtype=torch.int64))
        grid = model.dense(x)
    assert logits.shape == (2, 128, 64) and grid.shape == (2, 64, 56, 56)


def test_full_size_tap_lists():
    with torch.device('meta'):
        v, a, r50, r152 = vgg16(), alexnet(), resnet50(), resnet152()
    assert v.tap_strides == [1, 1, 1, 2, 2, 4, 4, 4, 8, 8, 8, 16, 16, 16, 32, 32]
    assert a.tap_names == ['input', 'conv1', 'conv2', 'conv3', 'conv4', 'conv5', 'fc6', 'fc7']
    assert a.tap_strides == [1, 4, 8, 16, 16, 16, 32, 32]
    assert r152.tap_names == ['conv1', 'res2a', 'res2b', 'res2c', 'res3b1', 'res3b4', 'res3b7', 'res4b5',
                              'res4b10', 'res4b15', 'res4b20', 'res4b25', 'res4b30', 'res4b35', 'res5c']
    assert r152.tap_strides == [2, 4, 4, 4, 8, 8, 8] + [16] * 7 + [32]
    assert r50.tap_names == ['conv1', 'res2a', 'res2b', 'res2c', 'res3b', 'res3d', 'res4b', 'res4d', 'res4f',
                             'res5c']


def test_checkpoint_key_names():
    with torch.device('meta'):
        keys = {arch: set(build_model(arch, 64).state_dict()) for arch in ARCHS}
        plain = set(build_model('resnet50', 64, batchnorm=False).state_dict())
    assert {'trunk.conv1_1.conv.weight', 'trunk.conv1_1.conv.bias', 'trunk.conv1_1.bn.running_mean',
            'trunk.fc6.conv.weight', 'trunk.fc7.bn.running_var', 'head.fc1.weight', 'head.out.weight',
            'head.out.bias'} <= keys['vgg16']
    assert 'trunk.conv1_1.bn.weight' not in keys['vgg16']  # BN without scale/shift
    assert {'trunk.conv1.conv.weight', 'trunk.conv5.bn.running_mean', 'trunk.fc7.conv.weight'} <= keys['alexnet']
    assert {'trunk.res3b7.branch2b.conv.weight', 'trunk.res4b35.branch2c.bn.weight',
            'trunk.res5a.branch1.conv.weight', 'trunk.res5c.branch2a.bn.running_var'} <= keys['resnet152']
    assert 'trunk.res2a.branch2a.conv.bias' not in keys['resnet152']
    assert {'trunk.res3d.branch2a.conv.weight', 'trunk.res4f.branch2c.conv.weight'} <= keys['resnet50']
    assert 'trunk.res2b.branch1.conv.weight' not in keys['resnet50']  # identity shortcut
    assert 'trunk.res2a.branch2a.conv.bias' in plain and not any('.bn.' in k for k in plain)


# ---------------------------------------------------------------- torchvision weight shapes

def torchvision_vgg16_shapes():
    """torchvision.models.vgg16: features convs (cfg 'D') and classifier Linear weights as convs."""
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    shapes, c = [], 3
    for out in cfg:
        shapes.append((out, c, 3, 3))
        c = out
    # classifier[0] Linear(512*7*7, 4096) viewed (4096, 512, 7, 7); classifier[3] Linear(4096, 4096)
    return shapes + [(4096, 512, 7, 7), (4096, 4096, 1, 1)]


def torchvision_alexnet_shapes():
    """torchvision.models.alexnet: features Conv2d(3,64,11), (64,192,5), (192,384,3), (384,256,3),
    (256,256,3); classifier Linear(256*6*6, 4096), Linear(4096, 4096)."""
    return [(64, 3, 11, 11), (192, 64, 5, 5), (384, 192, 3, 3), (256, 384, 3, 3), (256, 256, 3, 3),
            (4096, 256, 6, 6), (4096, 4096, 1, 1)]


def torchvision_resnet_convs(blocks):
    """torchvision.models.resnet Bottleneck layout: (torchvision name, weight shape, stride)."""
    convs = [('conv1', (64, 3, 7, 7), 2)]
    inplanes = 64
    for layer, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), 1):
        for i in range(count):
            stride = 2 if i == 0 and layer > 1 else 1
            p = f'layer{layer}.{i}'
            convs += [(f'{p}.conv1', (planes, inplanes, 1, 1), 1),
                      (f'{p}.conv2', (planes, planes, 3, 3), stride),
                      (f'{p}.conv3', (planes * 4, planes, 1, 1), 1)]
            if i == 0:
                convs.append((f'{p}.downsample.0', (planes * 4, inplanes, 1, 1), stride))
            inplanes = planes * 4
    return convs


def conv_shapes(trunk):
    return [tuple(m.weight.shape) for m in trunk.modules() if isinstance(m, nn.Conv2d)]


# torchvision's documented parameter counts minus the 1000-way classifier.
TORCHVISION_PARAMS = {
    'alexnet': 61_100_840 - (4096 * 1000 + 1000),
    'vgg16': 138_357_544 - (4096 * 1000 + 1000),
    'resnet50': 25_557_032 - (2048 * 1000 + 1000),
    'resnet152': 60_192_808 - (2048 * 1000 + 1000),
}


@pytest.mark.parametrize('arch, expected', [('vgg16', torchvision_vgg16_shapes),
                                            ('alexnet', torchvision_alexnet_shapes)])
def test_vgg_alexnet_match_torchvision(arch, expected):
    with torch.device('meta'):
        trunk = MODELS[arch](in_channels=3, batchnorm=False)
    assert conv_shapes(trunk) == expected()
    assert sum(p.numel() for p in trunk.parameters()) == TORCHVISION_PARAMS[arch]


@pytest.mark.parametrize('arch, blocks', [('resnet50', (3, 4, 6, 3)), ('resnet152', (3, 8, 36, 3))])
def test_resnet_matches_torchvision(arch, blocks):
    with torch.device('meta'):
        trunk = MODELS[arch](in_channels=3)
    ours = [(tuple(m.weight.shape), m.stride[0]) for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    # Our block order is branch2a, 2b, 2c, branch1; torchvision's conv1, conv2, conv3, downsample.
    assert ours == [(shape, stride) for _, shape, stride in torchvision_resnet_convs(blocks)]
    assert sum(p.numel() for p in trunk.parameters()) == TORCHVISION_PARAMS[arch]


# ---------------------------------------------------------------- dense vs sparse

def grid_points(B, gh, gw):
    """(B, gh*gw, 2) float pixel positions (4i + 1.5, 4j + 1.5) of the stride-4 grid, row-major."""
    i, j = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    return torch.stack([4 * i + 1.5, 4 * j + 1.5], dim=-1).reshape(1, -1, 2).expand(B, -1, -1)


@pytest.mark.parametrize('size', [(64, 64), (70, 93)])
@pytest.mark.parametrize('arch', ARCHS)
def test_dense_equals_sparse(arch, size):
    # extended_fov adds two taps after the plain trunk's, so it also covers the plain model.
    torch.manual_seed(0)
    model = tiny(arch, extended_fov=True).eval()
    x = torch.randn(2, 1, *size)
    with torch.no_grad():
        grid = model.dense(x)
        gh, gw = -(-size[0] // 4), -(-size[1] // 4)
        assert grid.shape == (2, 5, gh, gw)
        sparse = model(x, grid_points(2, gh, gw))  # (B, gh*gw, 5)
    close(grid, sparse.reshape(2, gh, gw, 5).permute(0, 3, 1, 2))


def test_dense_under_autocast_and_channels_last():
    torch.manual_seed(0)
    model = tiny('vgg16').eval()
    x = torch.randn(1, 1, 48, 40)
    with torch.no_grad():
        reference = model.dense(x)
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
        close(model.dense(x), reference)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            low = model.dense(x)
    assert low.shape == reference.shape and low.dtype == torch.bfloat16
    err = (low.float() - reference).abs().max()
    assert err <= 0.03 * reference.abs().max(), err  # bf16: ~1% here


def test_sparse_gradients_reach_trunk_and_head():
    torch.manual_seed(0)
    model = tiny('resnet50')
    x = torch.randn(2, 1, 64, 64)
    model(x, sample_points(2, 64, 64, 8, border=16)).square().sum().backward()
    for name in ['trunk.conv1.conv.weight', 'trunk.res2a.branch2a.conv.weight', 'head.fc1.weight']:
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_fc_dropout_is_applied_to_fc_taps():
    torch.manual_seed(0)
    trunk = vgg16(width=1 / 16, fc_dim=16).train()
    assert trunk.fc_dropout.p == 0
    trunk.fc_dropout.p = 1.0
    maps = trunk(torch.randn(1, 1, 64, 64))
    assert maps[-1].abs().sum() == 0 and maps[-2].abs().sum() == 0 and maps[-3].abs().sum() > 0


# ---------------------------------------------------------------- fold_batchnorm

def randomise_batchnorm(model, x, points):
    """Running stats from a train-mode pass on (x, points), random scale/shift and conv biases."""
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 1.0  # running stats = the last batch's
            if m.affine:
                m.weight.data = torch.rand(m.num_features, generator=g) + 0.5
                m.bias.data = 0.2 * torch.randn(m.num_features, generator=g)
        if isinstance(m, nn.Conv2d) and m.bias is not None:
            m.bias.data = 0.1 * torch.randn(m.bias.shape, generator=g)
    with torch.no_grad():
        model.train()(x, points)
    return model.eval()


@pytest.mark.parametrize('arch', ARCHS)
def test_fold_batchnorm(arch):
    # extended_fov adds layers after the plain trunk's, so it also covers the plain model.
    torch.manual_seed(0)
    model = randomise_batchnorm(tiny(arch, extended_fov=True), torch.randn(8, 1, 64, 64),
                                sample_points(8, 64, 64, 32, border=0))
    x, points = torch.randn(2, 1, 64, 64), sample_points(2, 64, 64, 32, border=0)
    folded = fold_batchnorm(model).eval()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # original untouched
    with torch.no_grad():
        expected = model(x, points)
        close(folded(x, points), expected, rel=1e-4)
        close(folded.dense(x), model.dense(x), rel=1e-4)
        plain = tiny(arch, extended_fov=True, batchnorm=False).eval()
        plain.load_state_dict(folded.state_dict())  # same keys as a model built without BN
        close(plain(x, points), expected, rel=1e-4)
        # In float64 the fold is exact up to rounding; the fp32 gap above is the deep net's own
        # fp32 sensitivity (a tiny-width ResNet-152 amplifies rounding ~1000x).
        model = model.double()
        close(fold_batchnorm(model)(x.double(), points), model(x.double(), points), rel=1e-10)


def test_fold_batchnorm_formula():
    # A single non-affine ConvBN against W' = W / sigma, b' = (b - mu) / sigma written out.
    torch.manual_seed(0)
    block = ConvBN(2, 3, 1)
    block.conv.bias.data = torch.tensor([0.5, -1.0, 2.0])
    block.bn.running_mean = torch.tensor([1.0, 2.0, -3.0])
    block.bn.running_var = torch.tensor([4.0, 0.25, 1.0]) - block.bn.eps
    sigma = torch.tensor([2.0, 0.5, 1.0])
    folded = fold_batchnorm(block)
    torch.testing.assert_close(folded.conv.weight, block.conv.weight / sigma.view(3, 1, 1, 1))
    torch.testing.assert_close(folded.conv.bias, torch.tensor([(0.5 - 1) / 2, (-1 - 2) / 0.5, (2 + 3) / 1]))
    assert isinstance(folded.bn, nn.Identity)


# ---------------------------------------------------------------- registry, compile

def test_build_model_registry():
    assert set(MODELS) == set(ARCHS)
    model = build_model('alexnet', 7, head_dim=8, dropout=0.1, width=0.1, fc_dim=8, in_channels=3)
    assert isinstance(model, HypercolumnNet) and model.head.out.weight.shape == (7, 8)
    assert model.trunk.conv1.conv.weight.shape == (6, 3, 11, 11) and model.head.dropout.p == 0.1
    with pytest.raises(ValueError, match='resnet152'):
        build_model('resnet18', 7)


@pytest.mark.skipif(not os.environ.get('TEST_COMPILE'), reason='~6 s of dynamo tracing; set TEST_COMPILE=1')
def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = tiny('alexnet').eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 1, 64, 64).to(memory_format=torch.channels_last)
    points = sample_points(2, 64, 64, 8, border=8)
    compiled = torch.compile(model, backend='eager', fullgraph=True)
    close(compiled(x, points), model(x, points))
