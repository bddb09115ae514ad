"""The tests: CPU only, about a minute and a half on 2 cores. Run: python -m pytest -q test_all.py

Reference values come from outside the code under test: published L*a*b* values of the sRGB
primaries, a second formulation of the CIE formulas, finite differences (gradcheck),
F.interpolate for bilinear sampling, torchvision's layer definitions and parameter counts written
out by hand, hand-computed AP, IoU, FLOP and histogram examples, independent decodes with Pillow.
TEST_COMPILE=1 also traces a model with torch.compile(fullgraph=True).
"""
import argparse
import contextlib
import copy
import errno
import functools
import gc
import hashlib
import importlib.util
import inspect
import io
import json
import math
import os
import pickle
import re
import shlex
import signal
import socket
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

import colorize
import data
import finetune_voc as ft
import lab
import models
from models import (MODELS, ConvBN, HypercolumnNet, alexnet, build_model, fold_batchnorm, resnet50,
                    resnet152, sample_bilinear, sample_points, vgg16)


# ================================================================================================
# lab.py: colour conversion, targets, losses, decoding
# ================================================================================================

SRGB_LAB_TABLE = [
    ((255, 0, 0), (53.2408, 80.0925, 67.2032)),
    ((0, 255, 0), (87.7347, -86.1827, 83.1793)),
    ((0, 0, 255), (32.2970, 79.1875, -107.8602)),
    ((0, 255, 255), (91.1132, -48.0875, -14.1312)),
    ((255, 0, 255), (60.3242, 98.2343, -60.8249)),
    ((255, 255, 0), (97.1393, -21.5537, 94.4780)),
    ((255, 255, 255), (100.0, 0.0, 0.0)),
    ((128, 128, 128), (53.5850, 0.0, 0.0)),
    ((0, 0, 0), (0.0, 0.0, 0.0)),
]


def _pixels(rows, dtype=torch.float64):
    """(N, 3) values -> (3, N, 1) image."""
    return torch.tensor(rows, dtype=dtype).T.reshape(3, -1, 1)


def test_rgb_to_lab_matches_published_values():
    rgb = _pixels([c for c, _ in SRGB_LAB_TABLE]) / 255
    want = _pixels([v for _, v in SRGB_LAB_TABLE])
    torch.testing.assert_close(lab.rgb_to_lab(rgb), want, atol=2e-3, rtol=0)
    # uint8 input is read as value / 255
    got8 = lab.rgb_to_lab(_pixels([c for c, _ in SRGB_LAB_TABLE], torch.uint8))
    torch.testing.assert_close(got8, want.float(), atol=2e-3, rtol=0)


def _lab_second_formula(rgb):
    """CIE's own formulation (kappa = 24389/27, epsilon = 216/24389, Lindbloom) in float64,
    written independently of lab.py: a second formula to compare against."""
    def lin(c):
        return torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    r, g, b = lin(rgb).unbind(0)
    X = (0.4124564 * r + 0.3575761 * g + 0.1804375 * b) / 0.95047
    Y = 0.2126729 * r + 0.7151522 * g + 0.0721750 * b
    Z = (0.0193339 * r + 0.1191920 * g + 0.9503041 * b) / 1.08883
    eps, kappa = 216 / 24389, 24389 / 27

    def f(t):
        return torch.where(t > eps, t.clamp(min=0) ** (1 / 3), (kappa * t + 16) / 116)
    fx, fy, fz = f(X), f(Y), f(Z)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], 0)


def test_rgb_to_lab_matches_second_formula_on_random_colours():
    rgb = torch.rand(3, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rgb[:, 0, :8] = torch.linspace(0, 0.01, 8, dtype=torch.float64)  # the linear segments
    torch.testing.assert_close(lab.rgb_to_lab(rgb), _lab_second_formula(rgb), atol=1e-9, rtol=0)


def test_round_trip_8bit_colours_float64():
    # Every colour whose levels are all dark (0..39: both linear segments, sRGB's below level 11 and
    # L*a*b*'s below L* 8, and the switches between the branches) or on every third level up to 255:
    # 1.4M of the 16.7M 8-bit colours, the full cube's corners and edges included.
    levels = torch.cat([torch.arange(40), torch.arange(42, 256, 3)]).double() / 255
    g, b = torch.meshgrid(levels, levels, indexing='ij')
    worst = 0.0
    for r in levels:
        rgb = torch.stack([torch.full_like(g, r), g, b], 0)
        back = lab.lab_to_rgb(lab.rgb_to_lab(rgb), clip=False)
        worst = max(worst, (back - rgb).abs().max().item())
    assert len(levels) == 112 and levels[-1] == 1 and worst < 1e-4


def test_lab_to_rgb_clips_unless_asked():
    out_of_gamut = _pixels([(50.0, 120.0, 0.0)])
    assert lab.lab_to_rgb(out_of_gamut).min() >= 0 and lab.lab_to_rgb(out_of_gamut).max() <= 1
    raw = lab.lab_to_rgb(out_of_gamut, clip=False)
    assert raw.min() < 0 or raw.max() > 1


def test_colour_conversions_refuse_what_they_would_misread():
    # Pixels as (N, 3) or a bare (3,), with channels last: a ValueError naming the layout (it was an
    # IndexError of a tuple, or of unbind's dim).
    funcs = [lab.rgb_to_lab, lab.lab_to_rgb, lab.lab_to_lch, lab.lch_to_lab, lab.lightness_input, lab.lab_input]
    for f in funcs:
        for shape in ((10, 3), (3,)):
            with pytest.raises(ValueError, match=r'dim -3.*reshape\(3, N, 1\)'):
                f(torch.rand(shape))
        if f is not lab.lightness_input:  # which reads channel 0 of any (..., C, H, W)
            with pytest.raises(ValueError, match=r'dim -3.*movedim\(-1, -3\)'):  # an (H, W, 3) image
                f(torch.rand(4, 5, 3))
    # Integer sRGB other than uint8: 8-bit levels in int64 gave L* = 9341 for white, in silence.
    with pytest.raises(ValueError, match='uint8.*int64'):
        lab.rgb_to_lab(torch.full((3, 1, 1), 255, dtype=torch.int64))
    assert lab.rgb_to_lab(torch.full((3, 1, 1), 255, dtype=torch.uint8)).flatten().tolist() == [100, 0, 0]
    # uint8 cannot hold L*a*b* (a and b are signed): it is an encoding such as OpenCV's.
    for f in funcs[1:]:
        with pytest.raises(ValueError, match='OpenCV'):
            f(torch.full((3, 1, 1), 128, dtype=torch.uint8))
    # Half precision is read, and computed in float32: the published value of sRGB red (exact in fp16).
    red = lab.rgb_to_lab(_pixels([(1.0, 0.0, 0.0)], torch.float16))
    assert red.dtype == torch.float32
    torch.testing.assert_close(red, _pixels([SRGB_LAB_TABLE[0][1]], torch.float32), atol=2e-3, rtol=0)


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    rgb = (torch.rand(2, 3, 4, 4, dtype=torch.float64, generator=gen) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(lab.rgb_to_lab, (rgb,))
    lab_ = torch.stack([torch.rand(2, 4, 4, dtype=torch.float64, generator=gen) * 80 + 10,
                        torch.rand(2, 4, 4, dtype=torch.float64, generator=gen) * 40 - 20,
                        torch.rand(2, 4, 4, dtype=torch.float64, generator=gen) * 40 - 20], 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: lab.lab_to_rgb(x, clip=False), (lab_,))
    # Gradients stay finite at black, exactly where the power branches have infinite slope.
    black = torch.zeros(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    lab.rgb_to_lab(black).sum().backward()
    assert torch.isfinite(black.grad).all()


def test_float32_under_autocast():
    rgb = torch.rand(2, 3, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = lab.rgb_to_lab(rgb.bfloat16())
        back = lab.lab_to_rgb(out)
    assert out.dtype == torch.float32 and back.dtype == torch.float32
    torch.testing.assert_close(out, lab.rgb_to_lab(rgb.bfloat16().float()))
    assert lab.rgb_to_lab(rgb.double()).dtype == torch.float64


def test_targets_are_float32_whatever_the_default_dtype():
    torch.set_default_dtype(torch.float64)
    try:
        lab_img = lab.rgb_to_lab(torch.rand(1, 3, 12, 12))
        points = torch.randint(3, 9, (1, 4, 2))
        for kind in ('huechroma', 'ab', 'l2'):
            targets = lab.make_targets(kind, lab_img, points)
            assert all(t.dtype == torch.float32 for t in targets.values()), kind
    finally:
        torch.set_default_dtype(torch.float32)


def test_lch_round_trip_and_ranges():
    lab_ = _pixels([(50, 10, 0), (50, 0, 10), (50, -10, 0), (50, 0, -10), (50, 3, 4)])
    lch = lab.lab_to_lch(lab_)
    torch.testing.assert_close(lch[1, :, 0], torch.tensor([10, 10, 10, 10, 5.0], dtype=torch.float64))
    want_h = torch.tensor([0, math.pi / 2, math.pi, 3 * math.pi / 2, math.atan2(4, 3)], dtype=torch.float64)
    torch.testing.assert_close(lch[2, :, 0], want_h)
    torch.testing.assert_close(lab.lch_to_lab(lch), lab_)


def test_lch_of_grey_and_of_a_hue_just_below_zero():
    # A grey pixel has no hue: C = 0, h = 0 and zero gradient (autograd through |ab| and atan2 gives
    # NaN there). b slightly below 0 is a hue just below 2 pi, which float32 rounds to 2 pi: it wraps to 0.
    x = torch.tensor([[50.0, 0.0, 0.0], [50.0, -0.0, -0.0], [50.0, 1.0, -1e-7], [50.0, 3.0, 4.0]],
                     requires_grad=True)
    lch = lab.lab_to_lch(x.T.reshape(3, 4, 1))[..., 0]
    assert lch[1, :2].tolist() == [0.0, 0.0] and lch[2, :3].tolist() == [0.0, 0.0, 0.0]
    assert (lch[2] < 2 * math.pi).all()
    lch[1].sum().backward()
    # Every 8-bit grey level, through rgb_to_lab (which leaves up to 3e-5 of rounding in a and b),
    # has hue 0: a grey neighbour counts in hue bin 0, the same on every device.
    greys = (torch.arange(256.0) / 255).expand(3, 256).reshape(3, 256, 1)
    for dtype in (torch.float32, torch.float64):
        assert lab.hue_bin(lab.lab_to_lch(lab.rgb_to_lab(greys.to(dtype)))[2]).eq(0).all()
    # A colour of chroma 0.28 (the least chroma of a non-grey 8-bit sRGB colour) keeps its hue: pi / 4.
    assert lab.lab_to_lch(_pixels([(50.0, 0.2, 0.2)]))[2].item() == pytest.approx(math.pi / 4)
    # d|ab|/d(a, b) = (a, b) / |ab|: (3/5, 4/5) at (3, 4), by hand; 0 at grey
    torch.testing.assert_close(x.grad[:, 1:], torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, -1e-7], [0.6, 0.8]]))
    # A tiny chroma, |ab| near 1e-20 in float32 (1e-160 in float64), where atan2's backward overflows:
    # d(C + h)/d(a, b) is (a, b) / |ab| = (1, 1) / sqrt 2 (h is constant 0 for a grey), not NaN.
    for dtype, v in ((torch.float32, 1e-20), (torch.float64, 1e-160)):
        x = torch.tensor([50.0, v, v], dtype=dtype).view(3, 1, 1).requires_grad_()
        lab.lab_to_lch(x)[1:].sum().backward()
        torch.testing.assert_close(x.grad.flatten(), torch.tensor([0, 0.5 ** 0.5, 0.5 ** 0.5], dtype=dtype))


def test_decode_of_float64_logits_is_float64_exact():
    # One-hot histograms: hue = the centre of bin 3, chroma = the median of bin 10 = 10.5 bins of
    # 4 units = 42, no fading (resultant 1). By hand in float64.
    z = torch.full((1, 1, 64), -1000.0, dtype=torch.float64)
    z[..., 3] = z[..., 32 + 10] = 0.0
    h = 3.5 * 2 * math.pi / 32
    want = torch.tensor([[[42 * math.cos(h), 42 * math.sin(h)]]], dtype=torch.float64)
    torch.testing.assert_close(lab.decode('huechroma', z), want, rtol=1e-12, atol=1e-12)


def test_lightness_and_lab_input_are_float32_for_bfloat16():
    lab_ = _uniform_lab(1, 2, 2, 75, 25, -50).bfloat16()
    assert lab.lightness_input(lab_).dtype == torch.float32 and lab.lab_input(lab_).dtype == torch.float32
    assert lab.lab_input(lab_)[0, :, 0, 0].tolist() == [0.5, 0.5, -1.0]


def test_lab_docstring_example_runs_as_written():
    lines = lab.__doc__.split('\n')
    start = lines.index('    import torch')
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith('    '))
    scope = {}
    exec(textwrap.dedent('\n'.join(lines[start:end])), scope)
    assert scope['ab'].shape == (2, 16, 2) and scope['colour'].shape == (2, 3, 64, 64)
    assert scope['logits'].grad is not None and torch.isfinite(scope['logits'].grad).all()


def test_lightness_input_range():
    lab_ = _pixels([(0, 0, 0), (50, 0, 0), (100, 0, 0)]).unsqueeze(0)
    torch.testing.assert_close(lab.lightness_input(lab_).flatten(), torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))


# --- lab.py: bins and targets -------------------------------------------------------------------

def _uniform_lab(B, H, W, L, a, b):
    return torch.stack([torch.full((B, H, W), float(v)) for v in (L, a, b)], 1)


def test_hue_bins_wrap_and_chroma_clips():
    two_pi = 2 * math.pi
    h = torch.tensor([0.0, two_pi / 32 - 1e-4, two_pi / 32 + 1e-4, two_pi - 1e-4, two_pi])
    assert lab.hue_bin(h).tolist() == [0, 0, 1, 31, 0]
    c = torch.tensor([0.0, 3.99, 4.01, 127.9, 128.0, 300.0, float('inf')])
    assert lab.chroma_bin(c).tolist() == [0, 0, 1, 31, 31, 31, 31]


def test_uniform_patch_gives_one_hot_targets():
    # hue 8.5 * 2pi/32 (the middle of bin 8), chroma 22 -> bin 5 (covers [20, 24)).
    h = 8.5 * 2 * math.pi / 32
    img = _uniform_lab(2, 32, 32, 60, 22 * math.cos(h), 22 * math.sin(h))
    img[:, 1, 0, 0] = -50  # a differing pixel far outside every window
    points = torch.tensor([[[16, 16], [10, 20]], [[8, 8], [20, 12]]])
    t = lab.make_targets('huechroma', img, points, window=7)
    assert t['hue'].shape == (2, 2, 32) and t['chroma'].shape == (2, 2, 32)
    want_hue, want_chroma = torch.zeros(2, 2, 32), torch.zeros(2, 2, 32)
    want_hue[..., 8] = 1
    want_chroma[..., 5] = 1
    torch.testing.assert_close(t['hue'], want_hue)
    torch.testing.assert_close(t['chroma'], want_chroma)
    torch.testing.assert_close(t['hue_weight'], torch.full((2, 2), 22 / 128))
    torch.testing.assert_close(t['lightness'], torch.full((2, 2), 0.6))


def test_hue_weight_is_chroma_over_128_at_most_1():
    # sRGB blue has C* = hypot(79.19, -107.86) = 133.8 (the published table): above C_max, weight 1.
    L, a, b = SRGB_LAB_TABLE[2][1]
    t = lab.make_targets('huechroma', _uniform_lab(1, 8, 8, L, a, b), torch.tensor([[[4, 4]]]), window=1)
    assert t['hue_weight'].item() == 1.0 and t['chroma'][0, 0, 31].item() == 1.0  # chroma's last bin


def test_window_histogram_counts_by_hand():
    # Left of column 10 red-ish (a=40, b=0: hue bin 0), from column 10 on blue-ish (a=0, b=-40:
    # hue 3pi/2 -> bin 24). A 7x7 window centred at column 10 spans columns 7..13: 3 red, 4 blue.
    img = _uniform_lab(1, 20, 20, 50, 40.0, 0.0)
    img[:, 1, :, 10:] = 0.0
    img[:, 2, :, 10:] = -40.0
    t = lab.make_targets('huechroma', img, torch.tensor([[[10, 10]]]), window=7)
    assert t['hue'][0, 0, 0].item() == pytest.approx(21 / 49)
    assert t['hue'][0, 0, 24].item() == pytest.approx(28 / 49)
    assert t['chroma'][0, 0, 10].item() == pytest.approx(1.0)  # chroma 40 -> bin 10 everywhere
    for kind in ('huechroma', 'ab'):
        t = lab.make_targets(kind, torch.randn(2, 3, 16, 16) * 40, torch.randint(0, 16, (2, 5, 2)), window=5)
        for key in ('hue', 'chroma') if kind == 'huechroma' else ('ab',):
            torch.testing.assert_close(t[key].sum(-1), torch.ones(2, 5))
    # window 1 is one-hot
    one = lab.make_targets('huechroma', img, torch.tensor([[[10, 9]]]), window=1)
    assert one['hue'][0, 0, 0].item() == 1.0
    # Non-square images, a point in the bottom-right corner: the window is cut at the image's edge,
    # as the authors' Caffe SparseHistogramExtractor cuts its box and renormalises. A 3x3 window at
    # (H-1, W-1) holds rows H-2, H-1 and columns W-2, W-1: 4 pixels, the blue bottom row's 2 of them.
    for H, W in ((10, 20), (20, 10)):
        img = _uniform_lab(1, H, W, 50, 40.0, 0.0)
        img[:, 1, H - 1] = 0.0
        img[:, 2, H - 1] = -40.0
        t = lab.make_targets('huechroma', img, torch.tensor([[[H - 1, W - 1]]]), window=3)
        assert t['hue'][0, 0, 24].item() == pytest.approx(2 / 4) and t['hue'][0, 0, 0].item() == pytest.approx(2 / 4)


def test_window_is_cut_at_the_image_edge_like_the_caffe_extractor():
    # The authors' Caffe recipe (sparse_histogram_extractor_layer.cpp) sums a 7x7 box of an
    # integral image whose corners beyond the image read 0 or are moved onto its last row and
    # column, then divides by the sum: the histogram of the window's pixels inside the image.
    # Top-left corner (0, 0), 7x7: rows 0..3 x columns 0..3 are inside, 16 pixels; row 0 is blue
    # (hue bin 24) of chroma 22 (bin 5), the rest red (bin 0) of chroma 40 (bin 10): 4 / 16 and
    # 12 / 16 in both histograms. Repeating edge pixels instead would give 28 / 49 blue.
    img = _uniform_lab(1, 12, 9, 50, 40.0, 0.0)
    img[:, 1, 0] = 0.0
    img[:, 2, 0] = -22.0
    t = lab.make_targets('huechroma', img, torch.tensor([[[0, 0]]]), window=7)
    assert t['hue'][0, 0, 24].item() == pytest.approx(4 / 16)
    assert t['hue'][0, 0, 0].item() == pytest.approx(12 / 16)
    assert t['chroma'][0, 0, 5].item() == pytest.approx(4 / 16)
    assert t['chroma'][0, 0, 10].item() == pytest.approx(12 / 16)
    # The joint ab target too: the mean of the one-pixel targets of the 16 pixels inside.
    gen = torch.Generator().manual_seed(5)
    rand = lab.rgb_to_lab(torch.rand(1, 3, 12, 9, generator=gen))
    got = lab.make_targets('ab', rand, torch.tensor([[[0, 0]]]), window=7)['ab'][0, 0]
    ys, xs = torch.meshgrid(torch.arange(4), torch.arange(4), indexing='ij')
    inside = torch.stack([ys.flatten(), xs.flatten()], -1).unsqueeze(0)  # (1, 16, 2)
    want = lab.make_targets('ab', rand, inside, window=1)['ab'][0].mean(0)
    torch.testing.assert_close(got, want)


def test_target_window_must_be_odd():
    with pytest.raises(ValueError, match='odd'):
        lab.make_targets('huechroma', _uniform_lab(1, 8, 8, 50, 0, 0), torch.zeros(1, 1, 2, dtype=torch.long), 4)


def test_targets_of_an_empty_batch_and_of_misshapen_inputs():
    # An empty batch (0, 3, H, W) gives empty targets (it died in a reshape(0, -1, 1)); Q = the
    # gamut's cell count.
    Q = len(lab.ab_gamut()[0])
    want = {'huechroma': dict(hue=(0, 5, 32), chroma=(0, 5, 32), hue_weight=(0, 5), lightness=(0, 5)),
            'l2': dict(ab=(0, 5, 2), lightness=(0, 5)), 'ab': dict(ab=(0, 5, Q), lightness=(0, 5))}
    for kind in lab.LOSSES:
        t = lab.make_targets(kind, torch.zeros(0, 3, 8, 8), torch.zeros(0, 5, 2, dtype=torch.long))
        assert {k: tuple(v.shape) for k, v in t.items()} == want[kind], kind
    # One image without its batch dim, points without theirs or of another batch, 4 channels:
    # a ValueError that says which (they were unpacking and reshape errors, or for l2 with 4 channels
    # a 3-channel 'ab' target in silence).
    img, pts = _uniform_lab(2, 8, 8, 50, 10, 10), torch.full((2, 5, 2), 4)
    for bad_img, bad_pts, match in ((img[0], pts[0], r'lab as \(B, 3, H, W\).*lab\[None\]'),
                                    (img, pts[0], r'points as \(B, P, 2\)'), (img, pts[:1], 'B = 2'),
                                    (torch.cat([img, img[:, :1]], 1), pts, r'shape \(2, 4, 8, 8\)')):
        for kind in lab.LOSSES:
            with pytest.raises(ValueError, match=match):
                lab.make_targets(kind, bad_img, bad_pts)


def test_ab_gamut_cells_are_reached_by_srgb():
    centres, lookup, offset = lab.ab_gamut()
    # primaries' ab fall in a gamut cell; a far-out colour does not
    for rgb, (L, a, b) in SRGB_LAB_TABLE:
        assert lookup[round(a / 10) + offset, round(b / 10) + offset] >= 0
    assert lookup[offset + 12, offset + 12] == -1  # (a, b) = (120, 120) is beyond sRGB
    assert lookup[offset, offset] >= 0 and 200 < len(centres) < 400
    assert lab.output_dim('ab') == len(centres)
    # The cells, by the second formula: those of the cube's six faces at every 8-bit level are exactly
    # the gamut's, 261 of them (the README's count; enumerated every 5th level the faces gave fewer, and
    # the bounds above passed); every 5th level of the whole cube falls inside them.
    def cells_of(rgb):  # (3, N) sRGB -> sorted distinct cell keys
        ab = (_lab_second_formula(rgb.reshape(3, -1, 1))[1:, :, 0] / 10).round().long()
        return torch.unique((ab[0] + offset) * (2 * offset + 1) + ab[1] + offset)
    v = torch.arange(256, dtype=torch.float64) / 255
    u, w = (t.flatten() for t in torch.meshgrid(v, v, indexing='ij'))
    faces = torch.cat([torch.stack([u, w][:axis] + [torch.full_like(u, side)] + [u, w][axis:])
                       for axis in range(3) for side in (0.0, 1.0)], 1)
    ours = torch.sort((centres[:, 0] / 10).round().long() * (2 * offset + 1) + (centres[:, 1] / 10).round().long()
                      + offset * (2 * offset + 2)).values
    assert torch.equal(cells_of(faces), ours) and len(ours) == 261
    v = torch.arange(0, 256, 5, dtype=torch.float64) / 255
    assert torch.isin(cells_of(torch.stack([t.flatten() for t in torch.meshgrid(v, v, v, indexing='ij')])), ours).all()
    centres.zero_()  # the caller's copy: the module's tables are untouched
    assert lab.ab_gamut()[0].abs().max() > 50
    lab._AB_GAMUT.clear()  # built anew below, as in a fresh process
    with torch.device('meta'):  # how models.py builds full-size shapes: the tables stay on the CPU
        assert lab.output_dim('ab') == len(centres) and lab.ab_gamut()[0].device.type == 'cpu'


# --- lab.py: losses ----------------------------------------------------------------------------

def test_kl_loss_zero_at_target_and_hand_value():
    gen = torch.Generator().manual_seed(0)
    B, P = 2, 3
    hue = torch.softmax(torch.randn(B, P, 32, generator=gen), -1)
    chroma = torch.softmax(torch.randn(B, P, 32, generator=gen), -1)
    t = dict(hue=hue, chroma=chroma, hue_weight=torch.rand(B, P, generator=gen), lightness=torch.rand(B, P))
    logits = torch.cat([hue.log(), chroma.log()], -1)
    total, parts = lab.color_loss('huechroma', logits, t)
    assert abs(total.item()) < 1e-5 and set(parts) == {'hue', 'chroma'}
    # Hand example: uniform prediction over 32 bins; chroma target half/half on two bins: KL =
    # log(32/2); hue target one-hot: KL = log 32; hue weight 0.5 -> 5 * 0.5 * log 32.
    hue1 = torch.zeros(1, 1, 32)
    hue1[..., 3] = 1
    chroma1 = torch.zeros(1, 1, 32)
    chroma1[..., [1, 2]] = 0.5
    t1 = dict(hue=hue1, chroma=chroma1, hue_weight=torch.tensor([[0.5]]), lightness=torch.tensor([[0.5]]))
    total, parts = lab.color_loss('huechroma', torch.zeros(1, 1, 64), t1)
    assert parts['chroma'].item() == pytest.approx(math.log(16), rel=1e-6)
    assert parts['hue'].item() == pytest.approx(2.5 * math.log(32), rel=1e-6)
    # w(L) at L = 0.5 is min(1.5, 1, 1.5) = 1; at L = 0.1 it is 0.3
    t1['lightness'] = torch.tensor([[0.1]])
    _, parts = lab.color_loss('huechroma', torch.zeros(1, 1, 64), t1, use_lightness_weight=True)
    assert parts['chroma'].item() == pytest.approx(0.3 * math.log(16), rel=1e-5)
    assert parts['hue'].item() == pytest.approx(2.5 * math.log(32), rel=1e-6)  # w(L) is the chroma term's only


def test_loss_and_decode_refuse_logits_of_another_size():
    # l2 logits (B, P, 1) broadcast against the (B, P, 2) target and ab logits (B, P, 1) gave a
    # negative "KL", in silence; huechroma decoding of 67 channels read 35 chroma bins.
    g = torch.Generator().manual_seed(0)
    img = torch.stack([torch.rand(2, 8, 8, generator=g) * 100, torch.randn(2, 8, 8, generator=g) * 30,
                       torch.randn(2, 8, 8, generator=g) * 30], 1)
    for kind, D in (('huechroma', 64), ('l2', 2), ('ab', len(lab.ab_gamut()[0]))):
        t = lab.make_targets(kind, img, torch.full((2, 5, 2), 4))
        assert lab.color_loss(kind, torch.zeros(2, 5, D), t)[0].item() >= 0
        for bad in ((2, 5, 1), (2, 5, D + 1), (2, 1, D), (5, D)):
            with pytest.raises(ValueError, match=f'expects logits \\(B, P, {D}\\)'):
                lab.color_loss(kind, torch.zeros(bad), t)
        assert lab.decode(kind, torch.zeros(2, D, 3, 4), dim=1).shape == (2, 2, 3, 4)
        for bad, dim in (((2, 5, D + 3), -1), ((2, D, 3, 4), -1), ((2, 1, 3, 4), 1)):
            with pytest.raises(ValueError, match=f'expects {D} channels in dim {dim}'):
                lab.decode(kind, torch.zeros(bad), dim=dim)


def test_an_unknown_loss_kind_is_refused_by_name():
    # lab.py's loss functions, called from other code with a kind of loss they do not know (a typo, or
    # the name of another formulation): a ValueError naming the kind and the three known ones, not None.
    # (color_loss and decode check the logits' size against output_dim first, which raises it.)
    img = torch.stack([torch.full((1, 8, 8), 50.0), torch.zeros(1, 8, 8), torch.zeros(1, 8, 8)], 1)
    targets = lab.make_targets('l2', img, torch.full((1, 2, 2), 4))
    calls = [lambda k: lab.output_dim(k), lambda k: lab.make_targets(k, img, torch.full((1, 2, 2), 4)),
             lambda k: lab.color_loss(k, torch.zeros(1, 2, 2), targets), lambda k: lab.decode(k, torch.zeros(1, 2, 2))]
    for call in calls:
        for kind in ('hue_chroma', 'L2', ''):
            with pytest.raises(ValueError, match=re.escape(f"unknown loss {kind!r}; expected one of "
                                                           "('huechroma', 'l2', 'ab')")):
                call(kind)


def test_colour_conversions_run_on_a_device_without_autocast():
    # The meta device (shapes only, used to plan memory) has no autocast: lab.py turns autocast off only
    # where a device has it (torch.autocast('meta', enabled=False) raises a RuntimeError).
    assert not torch.amp.is_autocast_available('meta')
    rgb = torch.empty(2, 3, 5, 4, device='meta')
    for f in (lab.rgb_to_lab, lab.lab_to_rgb, lab.lab_to_lch, lab.lch_to_lab):
        out = f(rgb)
        assert out.device.type == 'meta' and out.shape == (2, 3, 5, 4) and out.dtype == torch.float32, f
    assert lab.decode('ab', torch.empty(2, 6, lab.output_dim('ab'), device='meta')).shape == (2, 6, 2)


def test_kl_loss_with_a_masked_class():
    # A logit of -inf (a class masked out) where the target is 0 adds nothing: 0 log 0 = 0 (it was
    # 0 x -inf = NaN, the whole loss NaN). Hand value: hue one-hot on bin 3, uniform over the other 31
    # bins -> KL = log 31, weighted 5 x 0.5; chroma half/half on bins 1, 2 of 32 -> log 16.
    hue, chroma = torch.zeros(1, 1, 32), torch.zeros(1, 1, 32)
    hue[..., 3] = 1
    chroma[..., [1, 2]] = 0.5
    t = dict(hue=hue, chroma=chroma, hue_weight=torch.tensor([[0.5]]), lightness=torch.tensor([[0.5]]))
    logits = torch.zeros(1, 1, 64)
    logits[..., 5] = -math.inf
    logits.requires_grad_()
    total, parts = lab.color_loss('huechroma', logits, t)
    assert parts['hue'].item() == pytest.approx(2.5 * math.log(31), rel=1e-6)
    assert parts['chroma'].item() == pytest.approx(math.log(16), rel=1e-6)
    total.backward()
    # d/dz of 2.5 KL = 2.5 (softmax - target): 2.5 / 31 on the 30 other live hue bins, 0 on the masked one
    assert logits.grad[0, 0, 5].item() == 0 and logits.grad[0, 0, 6].item() == pytest.approx(2.5 / 31, rel=1e-5)


def test_lightness_weight_by_hand():
    # w(L) = min(3L, 1, 3(1 - L)): a ramp up to L = 1/3, flat to 2/3, a ramp down to 1.
    L = torch.tensor([0.0, 1 / 6, 1 / 3, 0.5, 2 / 3, 0.9, 1.0], dtype=torch.float64)
    torch.testing.assert_close(lab.lightness_weight(L), torch.tensor([0.0, 0.5, 1.0, 1.0, 1.0, 0.3, 0.0],
                                                                     dtype=torch.float64))


def test_invalid_images_do_not_count():
    t = dict(ab=torch.zeros(2, 4, 2), lightness=torch.full((2, 4), 0.5))
    logits = torch.zeros(2, 4, 2)
    logits[1] = 10.0  # a wildly wrong prediction on an image marked invalid
    total, _ = lab.color_loss('l2', logits, t, valid=torch.tensor([1, 0]))
    assert total.item() == 0.0
    total, _ = lab.color_loss('l2', logits, t, valid=torch.tensor([0, 1]))
    assert total.item() == pytest.approx(200.0)  # (10^2 + 10^2) per point, mean over 4 points
    # Every loss, every term: whatever the network says on the invalid image, the loss is the same.
    g = torch.Generator().manual_seed(3)
    lab_img = torch.stack([torch.rand(2, 12, 12, generator=g) * 100, torch.randn(2, 12, 12, generator=g) * 30,
                           torch.randn(2, 12, 12, generator=g) * 30], 1)
    points = torch.randint(0, 12, (2, 5, 2), generator=g)
    for kind in lab.LOSSES:
        targets = lab.make_targets(kind, lab_img, points)
        logits = torch.randn(2, 5, lab.output_dim(kind), generator=g)
        wild = logits.clone()
        wild[1] = torch.randn(5, lab.output_dim(kind), generator=g) * 10
        for weighted in (False, True):
            total, _ = lab.color_loss(kind, logits, targets, valid=torch.tensor([1, 0]),
                                          use_lightness_weight=weighted)
            other, _ = lab.color_loss(kind, wild, targets, valid=torch.tensor([1, 0]),
                                                use_lightness_weight=weighted)
            assert total.item() > 0 and other.item() == pytest.approx(total.item(), rel=1e-6), kind


def test_replicas_loss_norm_averages_to_the_mean_over_all_pixels():
    """Data-parallel replicas, each with its own valid images, divide by (all valid pixels) / (replicas):
    the mean of their losses, as DDP averages gradients, is the mean over every valid pixel."""
    g = torch.Generator().manual_seed(5)
    logits, ab = torch.randn(8, 3, 2, generator=g), torch.randn(8, 3, 2, generator=g)
    t = dict(ab=ab, lightness=torch.full((8, 3), 0.5))
    valid = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0])  # replica 1 holds one valid image of its four
    by_hand = ((logits - ab) ** 2).sum(-1)[:5].mean()  # 15 valid pixels
    norm = valid.sum() * 3 / 2
    replicas = [lab.color_loss('l2', logits[i:i + 4], dict(ab=ab[i:i + 4], lightness=t['lightness'][i:i + 4]),
                               valid=valid[i:i + 4], norm=norm)[0] for i in (0, 4)]
    assert ((replicas[0] + replicas[1]) / 2).item() == pytest.approx(by_hand.item(), rel=1e-6)
    # Each replica over its own count instead weighs the lone valid image's pixels 4x.
    own = [lab.color_loss('l2', logits[i:i + 4], dict(ab=ab[i:i + 4], lightness=t['lightness'][i:i + 4]),
                          valid=valid[i:i + 4])[0] for i in (0, 4)]
    assert ((own[0] + own[1]) / 2).item() != pytest.approx(by_hand.item(), rel=1e-3)


@pytest.mark.parametrize('kind', lab.LOSSES)
def test_loss_gradient_matches_finite_differences(kind):
    gen = torch.Generator().manual_seed(2)
    lab_img = torch.stack([torch.rand(2, 12, 12, generator=gen) * 80 + 10,
                           torch.randn(2, 12, 12, generator=gen) * 30,
                           torch.randn(2, 12, 12, generator=gen) * 30], 1)
    points = torch.randint(0, 12, (2, 3, 2), generator=gen)
    t = {k: v.double() for k, v in lab.make_targets(kind, lab_img, points, window=3).items()}
    logits = torch.randn(2, 3, lab.output_dim(kind), dtype=torch.float64, generator=gen, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: lab.color_loss(kind, z, t, use_lightness_weight=True)[0], (logits,))


@pytest.mark.parametrize('kind', lab.LOSSES)
def test_decoding_the_encoding_returns_the_colour(kind):
    # sRGB colours (every photo colour is one), saturated and muted, all round the hue circle.
    rgb = torch.rand(3, 1, 200, generator=torch.Generator().manual_seed(3))
    img = lab.rgb_to_lab(rgb)
    img = img[:, :, torch.hypot(img[1, 0], img[2, 0]) > 10].unsqueeze(0)  # hue needs some chroma
    n = img.shape[-1]
    a, b = img[0, 1, 0], img[0, 2, 0]
    c, h = torch.hypot(a, b), torch.atan2(b, a) % (2 * math.pi)
    points = torch.stack([torch.zeros(n, dtype=torch.long), torch.arange(n)], -1).unsqueeze(0)
    t = lab.make_targets(kind, img, points, window=1)
    if kind == 'huechroma':
        logits = torch.cat([t['hue'], t['chroma']], -1).clamp(min=1e-9).log()
    elif kind == 'ab':
        logits = t['ab'].clamp(min=1e-9).log()
    else:
        logits = t['ab']
    ab = lab.decode(kind, logits)[0]  # (n, 2)
    err = torch.hypot(ab[:, 0] - a, ab[:, 1] - b)
    if kind == 'huechroma':
        # One-hot targets decode to their bins' centres: within half a bin of the colour (chroma bins
        # are 4 wide; hue bins 2 pi / 32), up to the float32 rounding of the 1e-9 floor's fading.
        got_c, got_h = torch.hypot(ab[:, 0], ab[:, 1]), torch.atan2(ab[:, 1], ab[:, 0]) % (2 * math.pi)
        assert ((got_c - c).abs() <= 128 / 32 / 2 + 1e-3).all()
        dh = torch.remainder(got_h - h + math.pi, 2 * math.pi) - math.pi
        assert (dh.abs() <= math.pi / 32 + 1e-3).all()
    elif kind == 'ab':
        assert (err <= 10.0).all()
    else:
        assert err.max() < 1e-4


def test_decode_dense_layout_and_hue_fading():
    logits = torch.zeros(1, 64, 2, 3)  # (B, D, h, w): uniform hue histogram -> R = 0 -> gray
    ab = lab.decode('huechroma', logits, dim=1)
    assert ab.shape == (1, 2, 2, 3)
    assert ab.abs().max() < 1e-4


def test_decode_huechroma_by_hand():
    # Hue: half on bin 0, half on bin 8 (centres 0.5 and 8.5 bins, 90 degrees apart): the circular
    # mean is 4.5 bins, its resultant length cos(45 deg). Chroma: half on bin 2, half on bin 20: the
    # median is the end of bin 2, 3 bins = 12 units, faded by min(cos(45 deg) / 0.96, 1).
    logits = torch.full((1, 1, 64), -1e4)
    logits[..., [0, 8]] = math.log(0.5)
    logits[..., [32 + 2, 32 + 20]] = math.log(0.5)
    h, c = 4.5 * 2 * math.pi / 32, 12 * min(math.cos(math.pi / 4) / 0.96, 1)
    torch.testing.assert_close(lab.decode('huechroma', logits)[0, 0], torch.tensor([c * math.cos(h), c * math.sin(h)]))


def test_decode_ab_annealed_mean_by_hand():
    # p = (0.75, 0.25) on the cells at (0, 0) and (10, 0); the annealed mean (Zhang et al., T = 0.38)
    # reweights them as p^(1/T), normalised: 0.9474 / 0.0526, so a = 10 x 0.0526.
    centres = lab.ab_gamut()[0]
    cell = {tuple(v.tolist()): i for i, v in enumerate(centres)}
    logits = torch.full((1, 1, len(centres)), -1e4)
    logits[..., cell[(0.0, 0.0)]], logits[..., cell[(10.0, 0.0)]] = math.log(0.75), math.log(0.25)
    w = 0.25 ** (1 / 0.38) / (0.75 ** (1 / 0.38) + 0.25 ** (1 / 0.38))
    torch.testing.assert_close(lab.decode('ab', logits)[0, 0], torch.tensor([10 * w, 0.0]))


def test_ab_soft_target_by_hand():
    # Grey (a = b = 0), window 1: Gaussian weights (sigma 5) on the 3x3 cells around it, at distance
    # 0 (the cell itself), 10 (four) and 10 sqrt 2 (four): exp(-d^2 / 50) = 1, e^-2, e^-4, normalised.
    centres, lookup, offset = lab.ab_gamut()
    assert all(lookup[offset + i, offset + j] >= 0 for i in (-1, 0, 1) for j in (-1, 0, 1))  # all in gamut
    t = lab.make_targets('ab', _uniform_lab(1, 4, 4, 50, 0, 0), torch.tensor([[[2, 2]]]), window=1)['ab'][0, 0]
    total = 1 + 4 * math.exp(-2) + 4 * math.exp(-4)
    cell = {tuple(v.tolist()): i for i, v in enumerate(centres)}
    assert t[cell[(0.0, 0.0)]].item() == pytest.approx(1 / total)
    assert t[cell[(10.0, 0.0)]].item() == pytest.approx(math.exp(-2) / total)
    assert t[cell[(-10.0, 10.0)]].item() == pytest.approx(math.exp(-4) / total)
    assert t.sum().item() == pytest.approx(1.0)
    # Off the grid, (a, b) = (6, 0): its nearest cell is (10, 0), and the weights go to the 3x3 cells
    # around that one, a in {0, 10, 20} (truncating 0.6 to cell 0 would take a = -10 instead of 20).
    t = lab.make_targets('ab', _uniform_lab(1, 4, 4, 50, 6, 0), torch.tensor([[[2, 2]]]), window=1)['ab'][0, 0]
    w = {(a, b): math.exp(-((a - 6) ** 2 + b ** 2) / 50) for a in (0, 10, 20) for b in (-10, 0, 10)}
    assert all(lookup[offset + a // 10, offset + b // 10] >= 0 for a, b in w)  # all in gamut
    for (a, b), v in w.items():
        assert t[cell[(float(a), float(b))]].item() == pytest.approx(v / sum(w.values())), (a, b)
    # At the gamut's edge, sRGB blue (the published table): of the 3x3 cells around its own, (80, -110),
    # only (70 or 80, -110 or -100) are in the gamut; the weights are theirs alone, renormalised (giving
    # the others' to a class, as their lookup of -1 read as class 0 would, passed every test).
    L, a, b = SRGB_LAB_TABLE[2][1]
    t = lab.make_targets('ab', _uniform_lab(1, 4, 4, L, a, b), torch.tensor([[[2, 2]]]), window=1)['ab'][0, 0]
    w = {(ca, cb): math.exp(-((ca - a) ** 2 + (cb - b) ** 2) / 50) for ca in (70, 80) for cb in (-110, -100)}
    assert [lookup[offset + ca // 10, offset + cb // 10] >= 0 for ca in (70, 80, 90) for cb in (-120, -110, -100)] == [
        False, True, True, False, True, True, False, False, False]
    for (ca, cb), v in w.items():
        assert t[cell[(float(ca), float(cb))]].item() == pytest.approx(v / sum(w.values()), rel=1e-5), (ca, cb)
    assert t.sum().item() == pytest.approx(1.0)
    # A colour beyond sRGB, (120, 120), has no gamut cell around it: all of it goes to the gamut cell nearest
    # its own, by hand (80, 70) at distance sqrt(40^2 + 50^2) (the next, (70, 70), at sqrt(50^2 + 50^2)).
    t = lab.make_targets('ab', _uniform_lab(1, 4, 4, 50, 120, 120), torch.tensor([[[2, 2]]]), window=1)['ab'][0, 0]
    assert ((centres - torch.tensor([120.0, 120.0])) ** 2).sum(1).sort().values[:2].tolist() == [4100, 5000]
    assert t[cell[(80.0, 70.0)]].item() == 1.0 and t.sum().item() == 1.0


def test_decode_ab_trains_after_a_first_call_in_inference_mode():
    # The gamut tables are cached at the first call; made under torch.inference_mode they were
    # inference tensors, and decode('ab') of logits that need a gradient then raised ("Inference
    # tensors cannot be saved for backward") for the rest of the process.
    lab._AB_GAMUT.clear()  # a fresh process's first call
    with torch.inference_mode():
        Q = lab.output_dim('ab')
        lab.decode('ab', torch.zeros(1, 1, Q))
    # float32 logits use the cached centres as they are (float64 ones multiply by a fresh copy).
    logits = torch.randn(1, 2, Q, generator=torch.Generator().manual_seed(0), requires_grad=True)
    lab.decode('ab', logits).sum().backward()
    # The reference: float64, checked against finite differences.
    ref = logits.detach().double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: lab.decode('ab', z), (ref,))
    lab.decode('ab', ref).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad.float())


@pytest.mark.parametrize('kind', lab.LOSSES)
def test_decode_is_float32_under_autocast(kind):
    # colorize.py decodes inside the bf16 autocast region; the ab annealed mean is a matmul that
    # autocast would otherwise run in bf16 (0.4 Lab units off).
    logits = torch.randn(2, 5, lab.output_dim(kind), generator=torch.Generator().manual_seed(0)) * 3
    reference = lab.decode(kind, logits)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        got = lab.decode(kind, logits)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference)


def test_colour_maths_turns_autocast_off_on_every_device_type_that_has_it():
    # Only cuda and cpu were: under autocast on mps or xpu, decode('ab')'s matmul would run in half
    # precision. A tensor on a device this machine may lack: only its device.type is read.
    for kind in ('xpu', 'mps', 'cuda', 'cpu'):
        if torch.amp.is_autocast_available(kind):
            guard = lab._no_autocast(argparse.Namespace(device=torch.device(kind)))
            assert isinstance(guard, torch.autocast) and guard.device == kind and not guard._enabled, kind
    assert isinstance(lab._no_autocast(torch.empty(0, device='meta')), lab._Null)


def test_histogram_median_by_hand():
    p = torch.tensor([[0.1, 0.2, 0.4, 0.3], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # row 0: cdf 0.1, 0.3, 0.7 -> crosses in bin 2 at (0.5 - 0.3) / 0.4 = 0.5 -> 2.5
    # row 1: all mass in bin 2 -> 2.5; row 2: cdf hits 0.5 exactly at the end of bin 0 -> 1.0
    torch.testing.assert_close(lab.histogram_median(p), torch.tensor([2.5, 2.5, 1.0]))
    # A crossing bin of little mass: cdf 0.4999, 0.5001 -> half-way through bin 1 (0.0001 / 0.0002), 1.5;
    # the 1e-12 guard against an empty bin must not reach such a bin (a guard of 1e-3 gave 1.1).
    thin = torch.tensor([[0.4999, 0.0002, 0.4999]], dtype=torch.float64)
    torch.testing.assert_close(lab.histogram_median(thin), torch.tensor([1.5], dtype=torch.float64))


# ================================================================================================
# models.py: trunks, sparse and dense hypercolumns, BatchNorm folding
# ================================================================================================

ARCHS = ['alexnet', 'vgg16', 'resnet50', 'resnet152']


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny tensors: OpenMP synchronisation costs more than it saves, and on a busy 2-core
    # machine it made single tests 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SERVES_THE_PROCESS = ('multiprocessing.resource_tracker', 'multiprocessing.forkserver',
                      'torch/_inductor/compile_worker')


def _live_children():
    """This process's children that have not exited (Linux; elsewhere none are seen): {pid: command}."""
    pids = []
    for f in Path('/proc/self/task').glob('*/children'):
        try:
            pids += f.read_text().split()
        except OSError:
            continue  # a thread that ended between the listing and the read
    live = {}
    for pid in pids:
        try:
            state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
            command = Path(f'/proc/{pid}/cmdline').read_bytes().replace(b'\0', b' ').decode(errors='replace')
        except (OSError, IndexError):
            continue  # gone meanwhile
        # A zombie has exited (its Popen reaps it); multiprocessing's resource tracker and forkserver,
        # and Inductor's pool of compile workers (the first in-process torch.compile starts it), are
        # started once and serve the process until it ends.
        if state != 'Z' and not any(s in command for s in SERVES_THE_PROCESS):
            live[int(pid)] = command[:200]
    return live


@pytest.fixture(autouse=True)
def leaves_nothing_running():
    """Each test ends its own processes and puts back the handlers and folder it changes: a DataLoader
    worker left to the garbage collector cost whichever later test collected it 5 s, and the next
    test would run with a changed SIGTERM handler or working folder."""
    children, cwd = _live_children(), os.getcwd()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    deadline = time.monotonic() + 3.0  # a child killed just now may not have exited yet (a busy 2-core CI machine)
    while (left := {p: c for p, c in _live_children().items() if p not in children}) and time.monotonic() < deadline:
        time.sleep(0.02)
    if left:  # not the next tests' problem: a DataLoader iterator in a reference cycle ends its workers when
        gc.collect()  # collected (killing one instead would make torch's SIGCHLD handler raise here)
    assert not left, f'the test left processes running: {left}'
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers, 'the test left a signal handler changed'
    assert os.getcwd() == cwd, 'the test left the working folder changed'


@pytest.mark.skipif(not Path('/proc/self/task').exists(), reason='reads /proc (Linux)')
def test_live_children_sees_a_child_but_not_the_pools_that_serve_the_process():
    """The fixture above counts a test's own children, not Inductor's compile workers: on a GPU the
    first in-process compiled test started that pool and was failed for it (the CUDA tests, an H100)."""
    sleep = [sys.executable, '-c', 'import time; time.sleep(30)']
    own = subprocess.Popen(sleep)
    pool = subprocess.Popen(sleep + ['/site-packages/torch/_inductor/compile_worker/__main__.py'])
    try:
        # Popen returns at the child's exec, but /proc's command line can be empty for a moment after
        # that (seen on Python 3.13, about 3 in 100): wait until both read as their own.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
                Path(f'/proc/{p.pid}/cmdline').read_bytes() for p in (own, pool)):
            time.sleep(0.01)
        live = _live_children()
        assert own.pid in live and pool.pid not in live
    finally:
        for p in (own, pool):
            p.kill()
            p.wait()


def tiny(arch, **kwargs):
    """A model small enough for CPU tests: 1/16 width, 16-wide fc6/fc7 and head. A ResNet's residual
    branches, which start at zero, get BN scale 1 (or Kaiming conv weights), so that the tests of
    dense, tiled and folded outputs see their convolutions."""
    fc = dict(fc_dim=16) if arch in ('alexnet', 'vgg16') else {}
    model = build_model(arch, out_dim=5, head_dim=16, width=1 / 16, **fc, **kwargs)
    for m in model.modules():
        if isinstance(m, models.Bottleneck):
            last = m.branch2c
            if isinstance(last.bn, nn.BatchNorm2d):
                nn.init.ones_(last.bn.weight)
            else:
                nn.init.kaiming_normal_(last.conv.weight, mode='fan_out', nonlinearity='relu')
    return model


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

@pytest.fixture(params=['matmul', 'gathers'])
def cells(request):
    """Each sample_bilinear test runs on both of its paths: the matmul (small maps) and the gathers:
    the matmul_cells to pass."""
    return 10 ** 9 if request.param == 'matmul' else 0


@pytest.mark.parametrize('memory_format', [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize('stride', [1, 2, 4, 8, 16, 32])
def test_sample_bilinear_matches_interpolate(stride, memory_format, cells):
    g = torch.Generator().manual_seed(stride)
    feature = torch.randn(2, 3, 5, 7, generator=g).contiguous(memory_format=memory_format)
    points = random_pixels(2, 5 * stride, 7 * stride, 40, g)
    expected = upsample_reference(feature, stride, points)
    torch.testing.assert_close(sample_bilinear(feature, points, stride, cells), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(sample_bilinear(feature, points.float(), stride, cells), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('stride', [1, 4, 32])
def test_sample_bilinear_between_pixels(stride, cells):
    # Upsampling by 2*stride puts its pixel k at our (fractional) pixel k/2 - 0.25.
    g = torch.Generator().manual_seed(0)
    feature = torch.randn(2, 3, 4, 6, generator=g)
    fine = random_pixels(2, 4 * 2 * stride, 6 * 2 * stride, 40, g)
    expected = upsample_reference(feature, 2 * stride, fine)
    torch.testing.assert_close(sample_bilinear(feature, fine / 2 - 0.25, stride, cells), expected, rtol=0, atol=1e-6)


def test_sample_bilinear_gradient_matches_interpolate(cells):
    g = torch.Generator().manual_seed(1)
    feature = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g).to(memory_format=torch.channels_last)
    points = random_pixels(2, 40, 48, 30, g)
    weights = torch.randn(2, 34, 3, dtype=torch.float64, generator=g)
    ours = feature.detach().clone().requires_grad_()
    (sample_bilinear(ours, points, 8, cells) * weights).sum().backward()
    reference = feature.detach().clone().requires_grad_()
    (upsample_reference(reference, 8, points) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, reference.grad)
    assert ours.grad.abs().sum() > 0


@pytest.mark.parametrize('stride', [1, 4])
def test_sample_bilinear_outside_the_image_reads_the_edge(stride, cells):
    # Points up to 3 maps' extents beyond every side: the upsampled map at the nearest pixel inside it.
    g = torch.Generator().manual_seed(2)
    feature = torch.randn(2, 3, 5, 7, generator=g)
    H, W = 5 * stride, 7 * stride
    points = torch.stack([torch.randint(-3 * H, 4 * H, (2, 60), generator=g),
                          torch.randint(-3 * W, 4 * W, (2, 60), generator=g)], dim=-1)
    inside = torch.stack([points[..., 0].clamp(0, H - 1), points[..., 1].clamp(0, W - 1)], dim=-1)
    assert (inside != points).any(-1).float().mean() > 0.5
    expected = upsample_reference(feature, stride, inside)
    torch.testing.assert_close(sample_bilinear(feature, points, stride, cells), expected, rtol=0, atol=1e-6)


def test_sample_bilinear_gradcheck(cells):
    """Finite differences in float64 on a tiny map, with respect to the map and to float points.
    Points at integer + 0.3 px are never at a cell centre of the stride-4 map ((y + 0.8) / 4 - 0.5
    is never an integer), where the reading has a kink; some lie outside (a zero gradient)."""
    g = torch.Generator().manual_seed(4)
    feature = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    points = torch.stack([torch.randint(-4, 20, (2, 6), generator=g), torch.randint(-4, 24, (2, 6), generator=g)],
                         dim=-1).double().add(0.3).requires_grad_()
    assert torch.autograd.gradcheck(lambda f, p: sample_bilinear(f, p, 4, cells), (feature, points))


def test_sample_bilinear_keeps_low_precision_dtype(cells):
    feature = torch.randn(1, 4, 6, 6).to(torch.bfloat16)
    points = torch.tensor([[[0, 0], [10, 17], [23, 23]]])
    out = sample_bilinear(feature, points, 4, cells)
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

# Hand arithmetic from the paper's tap lists and the torchvision channel counts.
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


def test_resnet_tap_names_must_be_layers():
    # ResNet-50's stage 3 is res3a..res3d (letters); a tap named as in ResNet-152 (res3b1) is refused.
    with pytest.raises(ValueError, match=r"\['res3b1'\] are not layers.*res3a, res3b, res3c, res3d, res4a"):
        models._resnet((3, 4, 6, 3), (), ['conv1', 'res3b1'], 1, 1 / 16, False, False)


@pytest.mark.parametrize('batchnorm', [True, False])
def test_resnet_blocks_start_as_their_shortcut(batchnorm):
    """Each residual branch starts at zero (Goyal et al. 2017; torchvision's zero_init_residual): an
    identity block passes a non-negative input through unchanged, in train and in eval mode, and the
    whole BN-free trunk (finetune_voc.py --init random) stays at the scale of its input. Before, a
    quarter-width ResNet-152's residual sums grew block by block: its eval-mode hypercolumn (BN at
    mean 0 / var 1) reached |x| ~ 1e6 and its l2 pre-training loss 6,000 at step 3; the BN-free
    transfer model gave logits of 3e6 and NaN at the second step."""
    torch.manual_seed(0)
    trunk = models.resnet152(width=1 / 16, batchnorm=batchnorm)
    x = torch.rand(2, trunk.res4b20.out_channels, 5, 5)
    for mode in (True, False):
        trunk.train(mode)
        with torch.no_grad():
            assert torch.equal(trunk.res4b20(x), x)  # relu(0 + x) = x for x >= 0
            deepest = trunk(torch.randn(2, 1, 64, 64))[-1]
        assert torch.isfinite(deepest).all() and deepest.abs().mean() < 10


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


def test_alexnet_fc6_pads_as_tensorflow_same():
    """AlexNet's 6x6 fc6 keeps the 7x7 pool5 map; its odd padding cell goes after (below, right),
    TensorFlow's 'SAME' rule (before = (k - 1) // 2 = 2), so output (i, j) reads inputs i - 2 .. i + 3.
    By hand: a kernel that is one 1 at (ky, kx) copies input (i + ky - 2, j + kx - 2), zero outside."""
    trunk = models.alexnet(width=1 / 16, fc_dim=2, batchnorm=False)
    x = torch.rand(1, trunk.fc6.conv.in_channels, 7, 7) + 1  # positive: the ReLU passes it
    ky, kx = 0, 5
    with torch.no_grad():
        trunk.fc6.conv.weight.zero_()
        trunk.fc6.conv.bias.zero_()
        trunk.fc6.conv.weight[0, 3, ky, kx] = 1.0
        y = trunk.fc6(trunk.pad6(x))[0, 0]
    expected = torch.zeros(7, 7)
    for i in range(7):
        for j in range(7):
            if 0 <= i + ky - 2 < 7 and 0 <= j + kx - 2 < 7:
                expected[i, j] = x[0, 3, i + ky - 2, j + kx - 2]
    assert y.shape == (7, 7) and torch.equal(y, expected)


@pytest.mark.parametrize('arch, blocks', [('resnet50', (3, 4, 6, 3)), ('resnet152', (3, 8, 36, 3))])
def test_resnet_matches_torchvision(arch, blocks):
    with torch.device('meta'):
        trunk = MODELS[arch](in_channels=3)
    ours = [(tuple(m.weight.shape), m.stride[0]) for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    # Our block order is branch2a, 2b, 2c, branch1; torchvision's conv1, conv2, conv3, downsample.
    assert ours == [(shape, stride) for _, shape, stride in torchvision_resnet_convs(blocks)]
    assert sum(p.numel() for p in trunk.parameters()) == TORCHVISION_PARAMS[arch]


# ---------------------------------------------------------------- dense vs sparse

def grid_points(B, gh, gw, s=4):
    """(B, gh*gw, 2) float pixel positions (s*i + (s-1)/2, s*j + (s-1)/2) of the stride-s grid, row-major."""
    i, j = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    return torch.stack([s * i + (s - 1) / 2, s * j + (s - 1) / 2], dim=-1).reshape(1, -1, 2).expand(B, -1, -1)


def dense_reference(model, x, s):
    """The head on every tap resized by F.interpolate by tap stride / s (bilinear, align_corners=False:
    its cell i reads the tap at pixel s*i + (s-1)/2), over the cells that every resized tap has."""
    taps = [F.interpolate(m, scale_factor=t / s, mode='bilinear', align_corners=False, recompute_scale_factor=False)
            for m, t in zip(model.trunk(x), model.trunk.tap_strides)]
    gh, gw = min(t.shape[-2] for t in taps), min(t.shape[-1] for t in taps)
    columns = torch.cat([t[..., :gh, :gw] for t in taps], 1).permute(0, 2, 3, 1)  # (B, gh, gw, C)
    return model.head(columns).permute(0, 3, 1, 2)


@pytest.mark.parametrize('size', [(64, 64), (70, 93)])
@pytest.mark.parametrize('arch', ARCHS)
def test_dense_equals_sparse(arch, size):
    # extended_fov adds two taps after the plain trunk's, so it also covers the plain model. The
    # stride-3 grid is one whose cells no map's cells tile.
    torch.manual_seed(0)
    model = tiny(arch, extended_fov=True).eval()
    x = torch.randn(2, 1, *size)
    for s in (4, 3):
        with torch.no_grad():
            grid = model.dense(x, stride=s)
            gh, gw = -(-size[0] // s), -(-size[1] // s)
            assert grid.shape == (2, 5, gh, gw)
            sparse = model(x, grid_points(2, gh, gw, s))  # (B, gh*gw, 5)
            reference = dense_reference(model, x, s)
        close(grid, sparse.reshape(2, gh, gw, 5).permute(0, 3, 1, 2))
        close(grid[..., :reference.shape[-2], :reference.shape[-1]], reference)
        assert reference.numel() >= 0.5 * grid.numel()  # not all: VGG-16 at 70 x 93 has 2 x 2 fc7 maps (64 px)


@pytest.mark.parametrize('arch', ARCHS)
def test_empty_batch(arch):
    # A batch of no images (B = 0) gives empty outputs of the documented shapes, in train and eval
    # mode. On a CPU a conv whose kernel spans its map (the fov convs on a 1x1 map, VGG-16's fc6 on
    # 2x2) is a matmul reshaped with view(B, -1, ...), which cannot infer -1 when B = 0.
    model = tiny(arch, extended_fov=True)
    x, points = torch.randn(0, 1, 64, 64), torch.zeros(0, 3, 2, dtype=torch.int64)
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            assert model(x, points).shape == (0, 3, 5)
            assert model.dense(x).shape == (0, 5, 16, 16)


def test_inputs_of_the_wrong_shape_are_refused_with_what_to_do():
    # VGG-16's five unpadded 2x2 poolings need 2 ** 5 = 32 pixels per side: 32 gives a 1x1 fc7,
    # 31 would leave pool5 empty (torch's "Output size is too small" from deep inside).
    model = tiny('vgg16').eval()
    with torch.no_grad():
        assert model.trunk(torch.randn(1, 1, 32, 40))[-1].shape[-2:] == (1, 1)
        for size in [(31, 64), (64, 31), (8, 8)]:
            with pytest.raises(ValueError, match=f'a {size[0]}x{size[1]} input is too small.*at least 32 pixels'):
                model(torch.randn(1, 1, *size), torch.zeros(1, 2, 2))
            with pytest.raises(ValueError, match='too small'):
                model.dense(torch.randn(1, 1, *size))
        # AlexNet and the ResNets pad their strided layers: any size down to 1x1 has maps.
        assert tiny('alexnet').eval().dense(torch.randn(1, 1, 1, 1)).shape == (1, 5, 1, 1)
        # One image without its batch dimension: BatchNorm's "expected 4D input", or, BN folded away,
        # an unpacking error in sample_bilinear.
        folded = fold_batchnorm(model)
        for net in (model, folded):
            with pytest.raises(ValueError, match=r'\(B, 1, H, W\), got shape \(1, 64, 64\).*x\[None\]'):
                net(torch.randn(1, 64, 64), torch.zeros(1, 2, 2))
            with pytest.raises(ValueError, match=r'x\[None\]'):
                net.dense(torch.randn(1, 64, 64))


def test_receptive_fields_by_hand():
    # size += (kernel - 1) * distance between cells so far; the distance grows by each stride.
    vgg = 1 + 2 * 2 + 1 + 2 * (2 * 2) + 2 + 3 * (2 * 4) + 4 + 3 * (2 * 8) + 8 + 3 * (2 * 16) + 16 + 6 * 32
    alex = 11 + 2 * 4 + 4 * 8 + 2 * 8 + 3 * (2 * 16) + 2 * 16 + 5 * 32
    # ResNet-50: conv1 7x7/2, pool 3x3/2, then each bottleneck's 3x3 (the stride on the first of a stage).
    res50 = 7 + 2 * 2 + 3 * (2 * 4) + (2 * 4 + 3 * 2 * 8) + (2 * 8 + 5 * 2 * 16) + (2 * 16 + 2 * 2 * 32)
    res152 = 7 + 2 * 2 + 3 * (2 * 4) + (2 * 4 + 7 * 2 * 8) + (2 * 8 + 35 * 2 * 16) + (2 * 16 + 2 * 2 * 32)
    for arch, size in (('vgg16', vgg), ('alexnet', alex), ('resnet50', res50), ('resnet152', res152)):
        assert models.receptive_field(tiny(arch).trunk) == (size, 32), arch
    # The extended FOV: a 2x2 pool and a 3x3 conv, twice.
    assert models.receptive_field(tiny('vgg16', extended_fov=True).trunk) == (vgg + 32 + 2 * 64 + 64 + 2 * 128, 128)
    assert (vgg, alex, res50, res152) == (404, 355, 427, 1451)
    # A dilated 3x3 conv (dilation 2) after the stride-32 map widens the field by 2 * 2 * 32.
    dilated = tiny('vgg16').trunk
    dilated.append('dilated', nn.Conv2d(1, 1, 3, dilation=2, padding=2))
    assert models.receptive_field(dilated) == (vgg + 128, 32)
    # The tiling margins of `dense`: half the receptive field plus two cells of the stride-32 map,
    # rounded up to a multiple of lcm(32, 4): VGG-16 202 + 64 = 266 -> 288, AlexNet 177 + 64 = 241
    # -> 256, ResNet-50 213 + 64 = 277 -> 288, ResNet-152 725 + 64 = 789 -> 800 (the README's).
    assert [models.tile_margin(tiny(arch).trunk) for arch in ('vgg16', 'alexnet', 'resnet50', 'resnet152')] == [
        (288, 32), (256, 32), (288, 32), (800, 32)]
    trunk = tiny('vgg16').trunk
    trunk.append('odd', nn.Upsample(scale_factor=2))
    with pytest.raises(ValueError, match='unknown layer odd'):
        models.receptive_field(trunk)


def test_segmentation_model_with_a_layer_the_tiling_does_not_know_fails_at_build(monkeypatch):
    # Segmentation's test tiles dense prediction by the receptive field: a trunk with a layer that
    # receptive_field does not know is refused when the model is built, not after training.
    def odd(**kwargs):
        trunk = vgg16(**kwargs)
        trunk.append('odd', nn.AvgPool2d(2), stride=2)
        return trunk
    monkeypatch.setitem(MODELS, 'odd', odd)
    with pytest.raises(ValueError, match='unknown layer odd'):
        ft.build_transfer_model('seg', 'odd', **TINY)
    ft.build_transfer_model('cls', 'odd', **TINY)  # classification has no dense test


@pytest.mark.parametrize('arch, fov, size, tile', [('vgg16', False, (902, 201), 128), ('alexnet', False, (200, 700), 128),
                                                   ('resnet50', False, (760, 100), 128), ('vgg16', True, (1700, 64), 128),
                                                   ('resnet152', False, (1800, 40), 128)])
def test_dense_in_tiles_equals_one_piece(arch, fov, size, tile):
    """Tiles cut with the margin of tile_margin inside the image (above and below a kept tile):
    the same output as in one piece, to float64 rounding. tile_margin keeps a cell to spare (two for
    VGG-16: measured, these cases still match with that much less); one cell less than that shows here.
    VGG-16's sides are not multiples of the output stride 4: the last row and column of cells are
    partly outside the image, and a tile must still write them."""
    torch.manual_seed(0)
    model = tiny(arch, extended_fov=fov).double().eval()
    margin, _ = models.tile_margin(model.trunk)
    side = max(size)
    assert side > tile + 2 * margin  # else one piece
    assert any(y > margin for y in range(0, side, tile)) and any(y + tile + margin < side for y in range(0, side, tile))
    x = torch.randn(1, 1, *size, dtype=torch.float64)
    with torch.no_grad():
        whole, tiled = model.dense(x, tile=None), model.dense(x, tile=tile)
    assert tiled.shape == whole.shape
    close(tiled, whole, rel=1e-9)


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
            # Every tap but the input is bf16, as nn.Conv2d returns it: fc6 too, which the CPU
            # computes as a matmul (its 7x7 kernel covers pool5's 1x1 map here).
            taps = model.trunk(x)
    assert [t.dtype for t in taps[1:]] == [torch.bfloat16] * (len(taps) - 1)
    assert low.shape == reference.shape and low.dtype == torch.bfloat16
    err = (low.float() - reference).abs().max()
    assert err <= 0.03 * reference.abs().max(), err  # bf16: ~1% here
    # A model cast to bf16 and run without autocast: the fp32 resampled maps meet bf16 weights.
    with torch.no_grad():
        cast = model.bfloat16().dense(x.bfloat16())
    assert cast.dtype == torch.bfloat16 and (cast.float() - reference).abs().max() <= 0.05 * reference.abs().max()


@pytest.mark.parametrize('arch', ['vgg16', 'alexnet'])
def test_hypercolumn_is_bf16_under_autocast_with_the_same_logits(arch):
    # The input tap is float32 (x itself), the others bf16: concatenated as they come, torch.cat
    # promotes the whole hypercolumn to float32, and fc1 casts it back to bf16 (two passes over
    # 16384 x 12,417 values per GPU step). Cast first, the logits and gradients are the same bits.
    torch.manual_seed(0)
    model = tiny(arch)
    x, points = torch.randn(2, 1, 64, 64), sample_points(2, 64, 64, 8, border=4)

    def run(columns_as_they_come):
        model.zero_grad()
        torch.manual_seed(1)  # the head's dropout
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if columns_as_they_come:
                maps = model.trunk(x)
                h = torch.cat([sample_bilinear(m, points, s, model.matmul_cells)
                               for m, s in zip(maps, model.trunk.tap_strides)], dim=-1)
                out = model.head(h)
            else:
                h, out = model.hypercolumns(x, points), model(x, points)
        out.float().square().sum().backward()
        return h.dtype, out, [p.grad.clone() for p in model.parameters()]

    (promoted, want, want_grads), (dtype, got, grads) = run(True), run(False)
    assert promoted == torch.float32 and dtype == torch.bfloat16
    assert torch.equal(got, want) and all(torch.equal(a, b) for a, b in zip(grads, want_grads))


def test_dense_in_float64():
    torch.manual_seed(0)
    model = tiny('alexnet').eval()
    x = torch.randn(1, 1, 40, 36)
    with torch.no_grad():
        got = model.double().dense(x.double())
        assert got.dtype == torch.float64
        close(got.float(), model.float().dense(x), rel=1e-4)


@pytest.mark.parametrize('arch', ARCHS)
def test_sparse_gradients_reach_every_parameter_and_tap(arch):
    # Eval mode: BatchNorm's running statistics pass the gradient on to the conv biases before a
    # non-affine BN (in train mode BN subtracts them again). The reference reads every tap through
    # F.interpolate instead of sample_bilinear: the same gradients, for every parameter, and for
    # every tap's map on its own (each map made a leaf, so that only the reading reaches it).
    torch.manual_seed(0)
    model = tiny(arch, extended_fov=True).eval()
    x, points = torch.randn(2, 1, 64, 64), sample_points(2, 64, 64, 8, border=0)

    def reference(maps):
        columns = [upsample_reference(m, s, points) for m, s in zip(maps, model.trunk.tap_strides)]
        return model.head(torch.cat(columns, -1)).square().sum()

    params = list(model.parameters())
    grads = torch.autograd.grad(model(x, points).square().sum(), params)
    expected = torch.autograd.grad(reference(model.trunk(x)), params)
    leaves = []
    hook = model.trunk.register_forward_hook(lambda module, args, maps: leaves.extend(
        m.detach().requires_grad_() for m in maps) or leaves)
    grads += torch.autograd.grad(model(x, points).square().sum(), leaves)
    hook.remove()
    expected += torch.autograd.grad(reference(leaves), leaves)
    names = [n for n, _ in model.named_parameters()] + model.trunk.tap_names
    for name, got, want in zip(names, grads, expected):
        assert want.abs().sum() > 0, name
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
    if arch.startswith('resnet'):
        # A fresh ResNet's residual branches start at zero (their last BN scale): at the first step
        # every layer of a branch before that scale gets exactly no gradient, as the README says.
        fresh = build_model(arch, 5, head_dim=16, width=1 / 16)
        fresh(torch.randn(2, 1, 64, 64), sample_points(2, 64, 64, 8, border=0)).square().sum().backward()
        block = fresh.trunk.res3a
        for layer in (block.branch2a.conv, block.branch2a.bn, block.branch2b.conv, block.branch2c.conv):
            assert all(torch.count_nonzero(p.grad) == 0 for p in layer.parameters())
        assert block.branch2c.bn.weight.grad.abs().sum() > 0 and block.branch1.conv.weight.grad.abs().sum() > 0


def test_initialisation_is_the_readme_s():
    """README (Where pre-training differs): Kaiming normal for the trunk's convs (fan-out, ReLU gain: std
    sqrt(2 / (out x kh x kw))) and fc1 (fan-in: std sqrt(2 / in)), N(0, 0.01) for the output layer, zero
    biases; the sample std of each layer of at least 500 weights within 12% (a 4% standard error at 500).
    Fan-in convs, or fc1 without the ReLU gain (std off by sqrt 2 either way), passed every test."""
    torch.manual_seed(0)
    for arch in ('vgg16', 'alexnet'):
        model = build_model(arch, 5, head_dim=256, width=1 / 8, fc_dim=32)
        judged = 0
        for name, m in model.trunk.named_modules():
            if isinstance(m, nn.Conv2d):
                out, _, kh, kw = m.weight.shape
                assert not m.bias.any(), name
                if m.weight.numel() >= 500:
                    judged += 1
                    assert m.weight.std().item() == pytest.approx(math.sqrt(2 / (out * kh * kw)), rel=0.12), name
        assert judged >= 5, arch
        fc1, head_out = model.head.fc1, model.head.out
        assert fc1.weight.std().item() == pytest.approx(math.sqrt(2 / fc1.in_features), rel=0.05)
        assert head_out.weight.std().item() == pytest.approx(0.01, rel=0.12)
        assert not fc1.bias.any() and not head_out.bias.any()


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
    # A multi-GPU project's nn.SyncBatchNorm.convert_sync_batchnorm(model) folds the same way.
    synced = fold_batchnorm(nn.SyncBatchNorm.convert_sync_batchnorm(block))
    torch.testing.assert_close(synced.conv.bias, folded.conv.bias)
    assert isinstance(synced.bn, nn.Identity)


def test_fold_batchnorm_refuses_what_it_cannot_fold():
    # A BatchNorm without running statistics has no sigma to fold; one outside a ConvBN has no conv to
    # fold into. Each is refused by name and the model is left as it was (a silent skip would export a
    # network that computes something else).
    torch.manual_seed(0)
    block = ConvBN(2, 3, 1)
    block.bn = nn.BatchNorm2d(3, affine=False, track_running_stats=False)
    weight = block.conv.weight.clone()
    with pytest.raises(ValueError, match=re.escape('cannot fold a BatchNorm without running statistics '
                                                   '(track_running_stats=False)')):
        fold_batchnorm(block)
    assert torch.equal(block.conv.weight, weight) and isinstance(block.bn, nn.BatchNorm2d)
    loose = nn.Sequential(ConvBN(2, 3, 1), nn.BatchNorm2d(3))
    with pytest.raises(ValueError, match=re.escape("BatchNorm layers ['1'] do not follow a conv inside a ConvBN")):
        fold_batchnorm(loose)
    assert isinstance(loose[0].bn, nn.BatchNorm2d)


def test_sample_bilinear_refuses_points_of_another_shape():
    # points (B, P, 2) as (y, x): (P, 2) for one image, (B, P, 3), or another batch size were read in silence
    # or failed deep inside a gather.
    feature = torch.zeros(2, 3, 4, 4)
    assert sample_bilinear(feature, torch.zeros(2, 5, 2), 1).shape == (2, 5, 3)
    for bad in ((5, 2), (2, 5, 3), (1, 5, 2), (2, 5, 2, 1)):
        with pytest.raises(ValueError, match=re.escape(f'points must be (B=2, P, 2) pixel coordinates (y, x), got {bad}')):
            sample_bilinear(feature, torch.zeros(bad), 1)


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


# ================================================================================================
# data.py: sources, decoding, sampling, packs, the demo world, VOC readers
# ================================================================================================

def _write_rgb(path, rgb=None, size=(8, 6), fmt=None, **kw):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if rgb is None:
        rgb = np.random.default_rng(len(str(path))).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path, fmt, **kw)
    return str(path)


def _age_dirs(root, seconds=100):
    """Set every folder's mtime into the past, as for a dataset extracted long ago."""
    t = time.time() - seconds
    for d, _, _ in os.walk(root):
        os.utime(d, (t, t))


def _hsv_hue_deg(rgb):
    """Hue in degrees of uint8 RGB pixels (N, 3) by the textbook HSV formula."""
    x = rgb.astype(np.float64) / 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    mx, mn = x.max(1), x.min(1)
    c = np.maximum(mx - mn, 1e-12)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return h * 60.0, mx - mn


def _circular_mean_deg(deg, weight):
    a = np.deg2rad(deg)
    return np.rad2deg(np.arctan2((weight * np.sin(a)).sum(), (weight * np.cos(a)).sum())) % 360


# ----------------------------------------------------------------------------------------------
# finding images


def test_find_images_imagenet_layout(tmp_path, monkeypatch):
    root = tmp_path / 'train'
    expected = [_write_rgb(root / 'n01440764' / 'n01440764_1.JPEG', fmt='JPEG'),
                _write_rgb(root / 'n01440764' / 'n01440764_2.JPEG', fmt='JPEG'),
                _write_rgb(root / 'n01443537' / 'n01443537_7.JPEG', fmt='JPEG')]
    (root / 'n01443537' / 'notes.txt').write_text('not an image')
    _write_rgb(root / 'n01443537' / '.hidden.jpg', fmt='JPEG')
    _write_rgb(root / '.cache' / 'x.jpg', fmt='JPEG')
    lines = []
    assert data.find_images(str(root), log=lines.append) == sorted(expected)
    assert len(lines) == 1 and '3 images' in lines[0]
    # A long scan says how far it got: here (every 0 s) before each folder after the first.
    monkeypatch.setattr(data, 'SCAN_PROGRESS_S', 0)
    lines = []
    assert data.find_images(str(root), log=lines.append) == sorted(expected)
    assert [line.rpartition(' (')[0] for line in lines[:-1]] == [
        f'scanning {root}: {n} images in {k} folders so far' for n, k in ((0, 1), (2, 2))]


def test_scan_progress_lines_come_every_scan_progress_s_seconds(tmp_path, monkeypatch):
    # A clock that reads 0, 10, 20, ... s; a line every 30 s. Checked before each folder after the root:
    # readings 10, 20, 30 -> a line (the timer restarts at the next reading, 40), 50, 60, 70 -> a line
    # (restart at 80), 90, 100: two lines over the root's 8 subfolders, at 40 s (3 folders listed: the
    # root, d0, d1) and 80 s (6: up to d4).
    for k in range(8):
        (tmp_path / f'd{k}').mkdir()
    ticks = iter(range(0, 1000, 10))
    monkeypatch.setattr(data, 'time', argparse.Namespace(perf_counter=lambda: float(next(ticks))))
    monkeypatch.setattr(data, 'SCAN_PROGRESS_S', 30)
    lines = []
    data._scan(str(tmp_path), lines.append)
    assert lines == [f'scanning {tmp_path}: 0 images in {n} folders so far ({t} s)' for n, t in ((3, 40), (6, 80))]


def test_find_images_places_nested_mixed_case_and_list(tmp_path):
    root = tmp_path / 'places205'
    expected = [_write_rgb(root / 'a' / 'abbey' / '00001.jpg', fmt='JPEG'),
                _write_rgb(root / 'b' / 'bar' / 'inner' / 'x.PNG', fmt='PNG'),
                _write_rgb(root / 'c' / 'y.JpEg', fmt='JPEG'),
                _write_rgb(root / 'c' / 'z.TiFf', fmt='TIFF'),
                _write_rgb(root / 'c' / 'w.WebP', fmt='WEBP'),
                _write_rgb(root / 'd' / 'v.bmp', fmt='BMP')]
    found = data.find_images([root], log=lambda s: None)
    assert found == sorted(expected)
    # A .txt list: relative paths against the list's folder, blank lines and comments skipped.
    lst = tmp_path / 'lists' / 'mine.txt'
    lst.parent.mkdir()
    other = _write_rgb(tmp_path / 'elsewhere' / 'q.jpg', fmt='JPEG')
    lst.write_text(f'# my images\n../places205/a/abbey/00001.jpg\n\n{other}\n')
    assert data.find_images(lst, log=lambda s: None) == sorted([expected[0], other])
    # Both roots together: de-duplicated, sorted.
    both = data.find_images([lst, root], log=lambda s: None)
    assert both == sorted(set(expected) | {other})


def test_find_images_sorts_listings_that_come_sorted_in_about_a_pass(tmp_path, monkeypatch):
    # A root's listing comes sorted (a pack's pseudo-paths, a cache's scan); sorting a set of them put them in
    # hash order first: 7 of the 10 s that 3.7M paths took to list from their cache, on every rank, at every
    # start. Counted in comparisons: two sorted runs take about 1.4 n (7.2k here), shuffled ones n log2 n (44k).
    compared = [0]

    class Path_(str):
        def __lt__(self, other):
            compared[0] += 1
            return str.__lt__(self, other)

    n = 4096
    listed = [Path_(f'/data/n{k // 100:08d}/{k:06d}.JPEG') for k in range(n)]
    lst = tmp_path / 'all.txt'
    lst.write_text('x\n')
    monkeypatch.setattr(data, '_read_list', lambda txt: listed[:n // 2] + listed[n // 4:])  # a quarter twice
    found = data.find_images([lst], log=lambda s: None)
    assert found == sorted(set(map(str, listed))) and compared[0] < 3 * n, compared[0]
    for one in (['/d/a.jpg'], ['/d/a.jpg', '/d/a.jpg']):  # the first path is kept, also where it is the last
        monkeypatch.setattr(data, '_read_list', lambda txt: list(one))
        assert data.find_images([lst, lst], log=lambda s: None) == ['/d/a.jpg'], one


def test_find_images_follows_symlinked_folders_once(tmp_path):
    root = tmp_path / 'root'
    img = _write_rgb(root / 'a' / 'img.jpg', fmt='JPEG')
    os.symlink(root, root / 'a' / 'loop')          # a cycle
    os.symlink(root / 'a', root / 'b_link')         # the same folder twice
    ext = _write_rgb(tmp_path / 'outside' / 'o.jpg', fmt='JPEG')
    os.symlink(tmp_path / 'outside', root / 'c_link')  # a folder only reachable by a link
    os.symlink('self', root / 'a' / 'self')         # a link to itself: ELOOP when followed
    os.symlink('b.jpg', root / 'a' / 'b.jpg')       # a loop of one image link
    found = data.find_images(root, log=lambda s: None)
    assert found == sorted([img, str(root / 'c_link' / 'o.jpg')])
    assert os.path.realpath(found[1]) == os.path.realpath(ext)


def test_an_image_list_with_a_byte_order_mark_reads_its_first_path(tmp_path):
    # A .txt list saved by a Windows editor starts with a byte-order mark: its first path became '\ufeff/...',
    # taken as relative, and the list was refused ('its first entry ... does not exist').
    root = os.fsencode(tmp_path)
    names = [b'a.jpg', b'caf\xe9.jpg']  # the second not UTF-8: its bytes must come through as they are
    for name in names:
        _write_rgb(os.fsdecode(os.path.join(root, name)), fmt='JPEG')
    listing = b'\xef\xbb\xbf' + b''.join(os.path.join(root, n) + b'\r\n' for n in names)
    (tmp_path / 'list.txt').write_bytes(listing)
    found = data.find_images(tmp_path / 'list.txt', log=_quiet)
    assert [os.fsencode(p) for p in found] == [os.path.join(root, n) for n in names]


def test_an_image_list_saved_as_utf16_is_refused_in_one_line(tmp_path):
    # Windows PowerShell's `dir -Name > list.txt` writes UTF-16: its first path read as '\udcff\udcfe.\x00.\x00/...',
    # refused as a path that does not exist, with the NUL bytes printed through the message.
    _write_rgb(tmp_path / 'a.jpg', fmt='JPEG')
    (tmp_path / 'list.txt').write_bytes('a.jpg\r\n'.encode('utf-16'))
    with pytest.raises(ValueError, match=r'list\.txt is not UTF-8 text .*UTF-16') as caught:
        data.find_images(tmp_path / 'list.txt', log=_quiet)
    assert '\x00' not in str(caught.value)
    (tmp_path / 'list.txt').write_bytes('a.jpg\r\n'.encode('utf-8'))  # the same list as UTF-8 reads
    assert data.find_images(tmp_path / 'list.txt', log=_quiet) == [str(tmp_path / 'a.jpg')]


def test_an_image_list_of_folders_is_refused_in_one_line(tmp_path):
    # A list naming folders (class folders chosen by hand) was accepted: every line then a bad image in training.
    _write_rgb(tmp_path / 'n01' / 'a.jpg', fmt='JPEG')
    (tmp_path / 'list.txt').write_text('n01\n')
    with pytest.raises(ValueError, match=r"first entry 'n01' is the folder .*names image files"):
        data.find_images(tmp_path / 'list.txt', log=_quiet)
    (tmp_path / 'list.txt').write_text('n01/a.jpg\n')
    assert data.find_images(tmp_path / 'list.txt', log=_quiet) == [str(tmp_path / 'n01' / 'a.jpg')]


def test_write_list_takes_path_objects_and_writes_absolute_paths(tmp_path, monkeypatch):
    # write_list([Path(...)]) raised TypeError ("argument of type 'PosixPath' is not iterable").
    img = Path(_write_rgb(tmp_path / 'imgs' / 'a b.jpg', fmt='JPEG'))
    monkeypatch.chdir(tmp_path / 'imgs')
    data.write_list(tmp_path / 'lists' / 'l.txt', [img, Path('a b.jpg')])  # relative: to the working folder
    assert (tmp_path / 'lists' / 'l.txt').read_text() == f'{img}\n{img}\n'
    assert data.find_images(tmp_path / 'lists' / 'l.txt', log=_quiet) == [str(img)]
    # No paths: an empty file was written, which find_images then refused ('holds no paths').
    with pytest.raises(ValueError, match='no paths to write'):
        data.write_list(tmp_path / 'lists' / 'none.txt', [])
    assert not (tmp_path / 'lists' / 'none.txt').exists()


def test_find_images_errors(tmp_path):
    with pytest.raises(ValueError, match='does not exist'):
        data.find_images(tmp_path / 'nope', log=lambda s: None)
    empty = tmp_path / 'empty'
    (empty / 'sub').mkdir(parents=True)
    (empty / 'sub' / 'readme.md').write_text('x')
    with pytest.raises(ValueError, match=r'no images under .*found 1 other files'):
        data.find_images(empty, log=lambda s: None)
    bad_list = tmp_path / 'list.txt'
    bad_list.write_text('missing/a.jpg\n')
    with pytest.raises(ValueError, match='does not exist'):
        data.find_images(bad_list, log=lambda s: None)
    # A list of blank and comment lines only (an editor's template), a file that is no list, no roots at all.
    bad_list.write_text('# one image path per line\n\n   \n')
    with pytest.raises(ValueError, match=re.escape(f'image list {bad_list} holds no paths: expected one image path per '
                                                   "line (relative to the list's folder), found only blank or # lines")):
        data.find_images(bad_list, log=lambda s: None)
    photo = tmp_path / 'photo.jpg'
    photo.write_bytes(b'')
    with pytest.raises(ValueError, match=re.escape(f'image root {photo} is a file but not a .txt list: expected a folder')):
        data.find_images(photo, log=lambda s: None)
    with pytest.raises(ValueError, match='find_images: expected at least one image folder or .txt list, got none'):
        data.find_images([], log=lambda s: None)


def test_a_listing_cache_edited_by_hand_is_rescanned_with_a_line(tmp_path):
    # A listing cache whose JSON is whole but not as written (a field missing or of another type) made a KeyError,
    # TypeError or AttributeError traceback; the cache is only a shortcut, so the folder is scanned again.
    root, cache = tmp_path / 'imgs', tmp_path / 'cache'
    for name in ('a.jpg', 'b.png'):
        _write_rgb(root / name, fmt='JPEG' if name.endswith('jpg') else 'PNG')
    expected = [str(root / 'a.jpg'), str(root / 'b.png')]
    os.utime(root, ns=(0, 0))  # not changed just now: the listing is cached
    assert data.find_images(root, cache_dir=cache, log=_quiet) == expected
    (path,) = cache.glob('images-*.json')
    written = json.loads(path.read_text())
    for edited in [[1], {k: v for k, v in written.items() if k != 'dirs'}, {**written, 'files': 3},
                   {**written, 'dirs': [[1, 2]]}]:
        path.write_text(json.dumps(edited))
        lines = []
        assert data.find_images(root, cache_dir=cache, log=lines.append) == expected
        assert any(line.startswith(f'ignoring unreadable image cache {path}') for line in lines), (edited, lines)
    # A folder name that no path can have (a NUL byte): taken as a changed folder, so scanned again, no traceback.
    path.write_text(json.dumps({**written, 'dirs': [['a\u0000b', 1]]}))
    assert data.find_images(root, cache_dir=cache, log=_quiet) == expected


def test_a_listing_cache_that_cannot_be_written_warns_and_returns_the_listing(tmp_path):
    # A cache folder that cannot be written (read-only, full, or here under a file) raised OSError after the
    # whole scan, which on a network file system can take an hour; the cache is a shortcut, the listing good.
    root = tmp_path / 'imgs'
    expected = [_write_rgb(root / 'a.jpg', fmt='JPEG')]
    os.utime(root, ns=(0, 0))  # not changed just now: the listing would be cached
    (tmp_path / 'file').write_text('')
    lines = []
    assert data.find_images(root, cache_dir=tmp_path / 'file' / 'cache', log=lines.append) == expected
    assert lines[0].startswith(f'warning: not caching the listing of {root}: {tmp_path / "file" / "cache"}')
    assert 'Not a directory' in lines[0] and '1 images scanned' in lines[1]


def test_find_images_cache_reused_then_invalidated(tmp_path, monkeypatch):
    root = tmp_path / 'imgs'
    files = [_write_rgb(root / 'a' / 'deep' / f'{i}.jpg', fmt='JPEG') for i in range(3)]
    files.append(_write_rgb(root / 'b' / 'x.png', fmt='PNG'))
    _age_dirs(root)
    cache = tmp_path / 'cache'
    first = data.find_images(root, cache_dir=cache, log=lambda s: None)
    assert first == sorted(files)
    assert len(os.listdir(cache)) == 1  # one cache file, no temp left over

    calls = []
    real_scandir = os.scandir

    def counting_scandir(*args, **kw):
        calls.append(args)
        return real_scandir(*args, **kw)

    monkeypatch.setattr(os, 'scandir', counting_scandir)
    lines = []
    assert data.find_images(root, cache_dir=cache, log=lines.append) == first
    assert calls == [] and 'cached' in lines[0]  # validated by stat alone, nothing listed

    new = _write_rgb(root / 'a' / 'deep' / 'new.jpg', fmt='JPEG')  # changes deep/'s mtime only
    third = data.find_images(root, cache_dir=cache, log=lambda s: None)
    assert len(calls) > 0 and third == sorted(files + [new])


def test_subset_deterministic_nested_sorted():
    paths = [f'/d/{i:04d}.jpg' for i in range(500)]
    a = data.subset(paths, 100, seed=3)
    assert a == data.subset(list(reversed(paths)), 100, seed=3)  # input order does not matter
    assert a == sorted(a) and len(set(a)) == 100
    big = data.subset(paths, 300, seed=3)
    assert set(a) <= set(big)
    assert data.subset(paths, 100, seed=4) != a
    with pytest.raises(ValueError, match='only 500'):
        data.subset(paths, 501)


# ----------------------------------------------------------------------------------------------
# decoding


def test_decode_modes(tmp_path):
    def roundtrip(im, name, **kw):
        path = str(tmp_path / name)
        im.save(path, **kw)
        return data.load_rgb(path)

    assert (roundtrip(Image.new('L', (5, 4), 77), 'l.png') == 77).all()
    la = Image.new('LA', (3, 1))
    la.putdata([(100, 0), (100, 255), (100, 128)])
    expect = [255, 100, round(100 * 128 / 255 + 255 * (1 - 128 / 255))]  # over white
    assert roundtrip(la, 'la.png')[0, :, 0].tolist() == expect
    pal = [10, 20, 30, 200, 100, 50] + [0] * 750
    p = Image.new('P', (2, 1))
    p.putpalette(pal)
    p.putpixel((1, 0), 1)
    assert roundtrip(p, 'p.png')[0].tolist() == [[10, 20, 30], [200, 100, 50]]
    assert roundtrip(p, 'p_trns.png', transparency=1)[0].tolist() == [[10, 20, 30], [255, 255, 255]]
    pa = Image.new('PA', (2, 1))
    pa.putpalette(pal)
    pa.putdata([(1, 255), (1, 0)])
    assert data.pil_to_rgb(pa)[0].tolist() == [[200, 100, 50], [255, 255, 255]]
    rgba = Image.new('RGBA', (3, 1))
    rgba.putdata([(200, 0, 0, 0), (200, 0, 0, 255), (0, 0, 200, 51)])
    # alpha 51 = 20%: 0.2 * c + 0.8 * 255
    assert roundtrip(rgba, 'rgba.png')[0].tolist() == [[255, 255, 255], [200, 0, 0], [204, 204, 244]]
    cyan = roundtrip(Image.new('CMYK', (8, 8), (255, 0, 0, 0)), 'cmyk.jpg')
    assert np.abs(cyan[4, 4].astype(int) - [0, 255, 255]).max() <= 3
    one = Image.new('1', (2, 1))
    one.putpixel((1, 0), 1)
    assert roundtrip(one, 'one.png')[0, :, 0].tolist() == [0, 255]
    # 16-bit: the 16-bit range maps onto 0..255 (v / 257), no clipping at 255.
    # (51400 = 257 * 200: v / 256 would give 201.)
    v16 = np.array([[0, 257 * 100, 257 * 200, 65535]], np.uint16)
    assert roundtrip(Image.fromarray(v16), 'i16.png')[0, :, 0].tolist() == [0, 100, 200, 255]
    i16b = Image.frombytes('I;16B', (4, 1), v16.astype('>u2').tobytes())
    assert data.pil_to_rgb(i16b)[0, :, 0].tolist() == [0, 100, 200, 255]
    assert roundtrip(i16b, 'i16b.tif')[0, :, 0].tolist() == [0, 100, 200, 255]
    # 32-bit integers (mode I, as 16-bit PNGs open in some Pillow versions) in 0..255 as they are, in
    # 0..65535 as 16-bit levels (v / 257: 51400 -> 200, where v / 256 would give 201); neither range was
    # read here (this Pillow opens the 16-bit PNG above as I;16), and a change to either passed every test.
    assert roundtrip(Image.fromarray(np.array([[0, 100, 255]], np.int32)), 'i8.tif')[0, :, 0].tolist() == [0, 100, 255]
    assert roundtrip(Image.fromarray(v16.astype(np.int32)), 'i32-16.tif')[0, :, 0].tolist() == [0, 100, 200, 255]
    # 32-bit integers beyond 16 bits and floats: stretched by their range.
    i32 = Image.fromarray(np.array([[0, 250000, 1000000]], np.int32))
    assert roundtrip(i32, 'i32.tif')[0, :, 0].tolist() == [0, 64, 255]  # 255 * 0.25 = 63.75
    f = Image.fromarray(np.array([[0, 0.25, 1]], np.float32))
    assert roundtrip(f, 'f.tif')[0, :, 0].tolist() == [0, 64, 255]
    out = roundtrip(Image.new('RGB', (4, 3), (1, 2, 3)), 'rgb.png')
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [1, 2, 3]


def test_large_images_decode_without_pillows_bomb_warning(tmp_path, monkeypatch, capfd):
    # Between Pillow's MAX_IMAGE_PIXELS (89 MP) and twice that, Pillow opens an image with a two-line
    # DecompressionBombWarning (once per size and process), which came in the middle of the progress lines;
    # a researcher's own large photos are decoded without it. Over twice the limit Pillow refuses them: a
    # BadImage, counted like any unreadable file. (The limit lowered to 1,000 pixels for small files.)
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)
    rgb = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb[:, :40]).save(tmp_path / 'large.png')  # 1,600 pixels: over the limit, under twice it
    Image.fromarray(rgb).save(tmp_path / 'huge.png')  # 2,400: over twice
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')  # (what Python's default does for a first occurrence)
        assert (data.load_rgb(tmp_path / 'large.png') == rgb[:, :40]).all()
        batch = data.ColorImages([str(tmp_path / 'large.png')], 32, 40, train=False, min_colorful=False)[0]
        assert batch[1] == data.STATUS_OK
        with pytest.raises(data.BadImage, match='huge.png: cannot decode .DecompressionBombError'):
            data.load_rgb(tmp_path / 'huge.png')
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ''


def _cielab_tiff(path, samples):
    """An uncompressed 8-bit CIELab TIFF (PhotometricInterpretation 8), one row, written by hand (TIFF 6.0,
    section 23): samples (N, 3) uint8 of L* * 255 / 100 and a*, b* as signed bytes."""
    ifd, n = 8, len(samples)
    bits_at = ifd + 2 + 10 * 12 + 4
    pixels_at = bits_at + 6
    tags = [(256, 3, n), (257, 3, 1), (258, 3, bits_at), (259, 3, 1), (262, 3, 8), (273, 4, pixels_at),
            (277, 3, 3), (278, 3, 1), (279, 4, 3 * n), (284, 3, 1)]  # (tag, SHORT 3 / LONG 4, value)
    head = b'II*\x00' + struct.pack('<IH', ifd, len(tags))
    head += b''.join(struct.pack('<HHI', tag, kind, 1 if tag != 258 else 3) + struct.pack('<I', value)
                     for tag, kind, value in tags)  # little-endian: a SHORT sits in the slot's first 2 bytes
    Path(path).write_bytes(head + struct.pack('<I', 0) + struct.pack('<3H', 8, 8, 8) + samples.tobytes())


def test_cielab_tiff_decodes_as_d50_lab(tmp_path):
    # Pillow opens an 8-bit CIELab TIFF as mode LAB and converts it with LittleCMS, taking L*a*b* relative to
    # D50, as Photoshop and libtiff do (TIFF 6.0 names no white point for it). Reference by hand: sRGB ->
    # XYZ (D65) -> Bradford to D50 -> L*a*b*, on a 6^3 grid of colours; back through load_rgb, the colour
    # differs by at most 2.5 dE76 (quantising to the file's 8 bits alone moves it up to 0.8).
    g = np.linspace(0, 1, 6)
    rgb = np.stack(np.meshgrid(g, g, g, indexing='ij'), -1).reshape(-1, 3)
    srgb = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    d65, d50 = np.array([0.95047, 1.0, 1.08883]), np.array([0.96422, 1.0, 0.82521])
    to_d50 = np.linalg.inv(bradford) @ np.diag(bradford @ d50 / (bradford @ d65)) @ bradford

    def lab_d50(c):  # (N, 3) sRGB in [0, 1] -> (N, 3) L*a*b* relative to D50
        lin = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
        t = lin @ (to_d50 @ srgb).T / d50
        f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
        return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], -1)
    want = lab_d50(rgb)
    samples = np.empty((len(rgb), 3), np.uint8)
    samples[:, 0] = np.round(want[:, 0] * 2.55)
    samples[:, 1:] = np.round(want[:, 1:]).astype(np.int8).view(np.uint8)  # sRGB's a*, b* lie within +-127
    _cielab_tiff(tmp_path / 'lab.tif', samples)
    with Image.open(tmp_path / 'lab.tif') as im:
        assert im.mode == 'LAB'
    stored = np.concatenate([samples[:, :1] / 2.55, samples[:, 1:].view(np.int8)], 1)  # the file's L*a*b*
    got = data.load_rgb(tmp_path / 'lab.tif')
    assert got.shape == (1, len(rgb), 3)
    assert np.linalg.norm(lab_d50(got[0] / 255.0) - stored, axis=1).max() < 3


def test_cielab_tiff_with_an_icc_profile_is_colorized_without_a_warning(tmp_path, capfd):
    # Its values are L*a*b*, which Pillow converts itself (test_cielab_tiff_decodes_as_d50_lab checks that
    # against a hand formula): the profile changes nothing. A warning said its pixels were taken as sRGB.
    from PIL import ImageCms
    _cielab_tiff(tmp_path / 'lab.tif', np.array([[128, 20, 236], [200, 0, 0], [255, 0, 0]], np.uint8))
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile('LAB')).tobytes()
    with Image.open(tmp_path / 'lab.tif') as im:
        im.save(tmp_path / 'lab-icc.tif', icc_profile=icc)
    with Image.open(tmp_path / 'lab-icc.tif') as im:
        assert im.mode == 'LAB' and im.info['icc_profile'] == icc
    want = data.load_rgb(tmp_path / 'lab.tif', to_srgb=True)
    assert np.array_equal(data.load_rgb(tmp_path / 'lab-icc.tif', to_srgb=True), want)
    assert capfd.readouterr().err == ''


def test_exif_orientation_applied(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = (255, 0, 0)  # left half red
    rgb[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise: the stored left edge goes to the top
    path = str(tmp_path / 'o.jpg')
    Image.fromarray(rgb).save(path, 'JPEG', exif=exif.tobytes(), quality=95)
    out = data.load_rgb(path)
    assert out.shape == (40, 20, 3)
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 50   # top: red
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 50  # bottom: blue
    # VOC's masks index the stored pixels: its images are read as stored.
    stored = ft._load(path)
    assert stored.shape == (20, 40, 3) and stored[10, 5, 0] > 200 and stored[10, 35, 2] > 200
    # All eight orientations, lossless, against the EXIF 2.3 definitions written in numpy.
    a = rng(3).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = {1: a, 2: a[:, ::-1], 3: a[::-1, ::-1], 4: a[::-1], 5: a.transpose(1, 0, 2), 6: np.rot90(a, -1),
            7: a[::-1, ::-1].transpose(1, 0, 2), 8: np.rot90(a, 1)}
    for orientation, expected in want.items():
        exif[0x0112] = orientation
        Image.fromarray(a).save(tmp_path / 'o.png', exif=exif.tobytes())
        assert np.array_equal(data.load_rgb(str(tmp_path / 'o.png')), expected), orientation
    # A camera's malformed tag beside the orientation (287, a RATIONAL, holding text) made Pillow's
    # exif_transpose fail, and a readable photo count as bad. The IFD written by hand:
    ifd = (struct.pack('<2sHIH', b'II', 42, 8, 2) + struct.pack('<HHIHH', 0x0112, 3, 1, 6, 0)
           + struct.pack('<HHI4s', 287, 2, 4, b'Cam\0') + struct.pack('<I', 0))
    Image.fromarray(a).save(tmp_path / 'odd.png', exif=b'Exif\0\0' + ifd)
    assert np.array_equal(data.load_rgb(str(tmp_path / 'odd.png')), want[6])


@pytest.mark.parametrize('fmt', ['JPEG', 'MPO'])  # MPO: what many cameras write, a JPEG with more frames
def test_draft_keeps_short_side(tmp_path, fmt):
    y, x = np.mgrid[0:1200, 0:1600]
    rgb = np.stack([x * 255 // 1600, y * 255 // 1200, np.full_like(x, 128)], -1).astype(np.uint8)
    path = str(tmp_path / 'big.jpg')
    extra = dict(save_all=True, append_images=[Image.fromarray(rgb[:120, :160])]) if fmt == 'MPO' else {}
    Image.fromarray(rgb).save(path, fmt, **extra)
    with Image.open(path) as im:
        assert im.format == fmt
    full = data.load_rgb(path)
    assert full.shape == (1200, 1600, 3)
    small = data.load_rgb(path, min_short_side=200)
    assert 200 <= min(small.shape[:2]) < 1200 and small.shape[1] * 3 == small.shape[0] * 4
    assert data.load_rgb(path, min_short_side=2000).shape == full.shape


def _bad_files(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, 'JPEG')
    paths = {'zero': tmp_path / 'zero.jpg', 'truncated': tmp_path / 'trunc.jpg',
             'text': tmp_path / 'text.jpg', 'random': tmp_path / 'random.jpg'}
    paths['zero'].write_bytes(b'')
    paths['truncated'].write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    paths['text'].write_text('hello, I am not a picture\n')
    paths['random'].write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    return {k: str(v) for k, v in paths.items()}


def test_bad_files_raise_bad_image(tmp_path, monkeypatch):
    monkeypatch.setattr('PIL.ImageFile.LOAD_TRUNCATED_IMAGES', True)  # someone turned it on
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(data.BadImage) as err:
            data.load_rgb(path)
        assert isinstance(err.value, ValueError)
        assert path in str(err.value) and err.value.path == path and err.value.reason, kind
    with pytest.raises(data.BadImage, match='no such file'):
        data.load_rgb(tmp_path / 'missing.jpg')
    # Pickled (a process pool's worker sends its exception back so): unpickling called BadImage(message) and
    # failed, and concurrent.futures then reported the whole pool broken, not the file.
    back = pickle.loads(pickle.dumps(data.BadImage('/d/a.jpg', 'empty file (0 bytes)')))
    assert type(back) is data.BadImage and (back.path, back.reason) == ('/d/a.jpg', 'empty file (0 bytes)')
    assert str(back) == '/d/a.jpg: empty file (0 bytes)'


class _BadImageDataset(torch.utils.data.Dataset):
    """A user's own Dataset whose image cannot be read."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise data.BadImage('/d/a: b.jpg', 'truncated')


def test_bad_image_from_a_dataloader_worker_stays_bad_image():
    # torch re-raises a worker's exception as its type called with one text (the worker's traceback); a
    # BadImage took two arguments, so it came back as a RuntimeError that `except data.BadImage` missed.
    try:
        next(iter(torch.utils.data.DataLoader(_BadImageDataset(), num_workers=1)))
    except Exception as e:
        e.__traceback__ = e.__context__ = None  # (they hold the iterator, whose worker runs on until collected)
        err = e
    assert type(err) is data.BadImage and 'in DataLoader worker process 0' in str(err)
    assert str(err).rstrip().endswith('BadImage: /d/a: b.jpg: truncated')
    assert (err.path, err.reason) == (None, None)  # only the text says which file, and why
    back = pickle.loads(pickle.dumps(err))  # (and it pickles as such)
    assert type(back) is data.BadImage and str(back) == str(err) and (back.path, back.reason) == (None, None)
    # The two-argument form is as it was.
    e = data.BadImage('/d/a: b.jpg', 'truncated')
    assert (str(e), e.path, e.reason, e.args) == ('/d/a: b.jpg: truncated', '/d/a: b.jpg', 'truncated',
                                                  ('/d/a: b.jpg: truncated',))


def test_is_grayscale():
    rng = np.random.default_rng(0)
    gray = np.repeat(rng.integers(0, 256, (64, 64, 1), dtype=np.uint8), 3, axis=2)
    assert data.is_grayscale(gray)
    # A gray photo through JPEG keeps a few levels of chroma noise: still gray.
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, 'JPEG', quality=75)
    assert data.is_grayscale(np.asarray(Image.open(buf).convert('RGB')))
    color = gray.copy()
    color[:20, :, 0] = 255  # 30% of pixels strongly red
    assert not data.is_grayscale(color)
    speck = gray.copy()
    speck[0, :20] = (255, 0, 0)  # 0.5% of pixels: negligible
    assert data.is_grayscale(speck)
    # The threshold: a spread of 6 levels everywhere is gray; 7 levels on 2% of the pixels is not.
    tinted = gray.astype(np.int16)
    tinted[..., 2] = np.clip(tinted[..., 1] + 6, 0, 255)
    tinted[..., 1] = tinted[..., 2] - 6
    assert data.is_grayscale(tinted.astype(np.uint8))
    tinted[:2, :41, 2] = tinted[:2, :41, 1] + 7  # 82 of 4096 pixels
    assert not data.is_grayscale(tinted.astype(np.uint8))
    # 100 pixels: the 99th percentile interpolates between the 99th and 100th smallest spreads,
    # 0.01 of the way (position 0.99 x 99 = 98.01). By hand: 5 + 0.01 x (100 - 5) = 5.95 <= 6, gray;
    # 5 + 0.01 x (200 - 5) = 6.95, not; 6 + 0.01 x (7 - 6) = 6.01, not; 3 + 0.01 x 252 = 5.52, gray;
    # 4 + 0.01 x 251 = 6.51, not. A pixel (0, 255, 0) has the whole spread 255, without wrapping.
    for second_largest, largest, gray_expected in [(5, 100, True), (5, 200, False), (6, 7, False), (6, 6, True),
                                                   (3, 255, True), (4, 255, False)]:
        img = np.full((10, 10, 3), 128, np.uint8)
        img[0, 0] = (128, 128 + second_largest, 128) if second_largest <= 127 else (0, second_largest, 0)
        img[0, 1] = (0, largest, 0) if largest > 127 else (128, 128 + largest, 128)
        assert data.is_grayscale(img) == gray_expected, (second_largest, largest)


def test_is_grayscale_agrees_with_the_quantile_at_every_count_near_the_boundary():
    """is_grayscale counts the spreads above tol instead of sorting them: against np.quantile of the
    spreads (np.ptp over the channels, a second formula) for every count of coloured pixels around 1%,
    with spreads just above and far above tol, in images of several sizes (also strided: >= 512 px)."""
    rng = np.random.default_rng(0)
    for h, w in ((10, 10), (17, 23), (40, 50), (512, 600)):
        n = len(range(0, h, max(1, min(h, w) // 256))) * len(range(0, w, max(1, min(h, w) // 256)))
        for over in sorted({*range(max(0, n // 100 - 3), n // 100 + 4), 0, n // 2}):
            for high, noise in [(high, noise) for high in (7, 8, 60, 255) for noise in (3, 7)]:
                img = np.repeat(rng.integers(0, 200, (h, w, 1), dtype=np.uint8), 3, axis=2)
                img[..., 1] += rng.integers(0, noise, (h, w), dtype=np.uint8)  # spreads <= 6: gray
                step = max(1, min(h, w) // 256)
                sampled = img[::step, ::step]  # (a view) the pixels that is_grayscale reads
                ys, xs = np.unravel_index(rng.choice(n, over, replace=False), sampled.shape[:2])
                sampled[ys, xs, 2] = sampled[ys, xs, 1].astype(int) + rng.integers(7, high + 1, over)
                sampled[ys, xs, 0] = sampled[ys, xs, 1]
                expected = np.quantile(np.ptp(sampled.astype(np.int16), axis=2), 0.99) <= 6
                assert data.is_grayscale(img) == expected, (h, w, over, high, noise)


# ----------------------------------------------------------------------------------------------
# augmentation, dataset, sampler


def test_random_and_center_crop():
    rgb = np.arange(60 * 80 * 3, dtype=np.int64).reshape(60, 80, 3).astype(np.uint8)
    # Short side kept (60): the centre crop is the middle slice.
    assert np.array_equal(data.center_crop(rgb, 40, 60), rgb[10:50, 20:60])
    out = data.random_crop(rgb, 32, (40, 50), True, np.random.default_rng(5))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.array_equal(out, data.random_crop(rgb, 32, (40, 50), True, np.random.default_rng(5)))
    # Smaller than the crop: zero padding, centred.
    small = np.full((10, 20, 3), 200, np.uint8)
    padded = data.random_crop(small, 30, (10, 10), False, np.random.default_rng(0))
    assert padded.shape == (30, 30, 3)
    assert (padded[10:20, 5:25] == 200).all() and padded[:10].max() == 0 and padded[:, :5].max() == 0
    # Flip: over seeds, both orientations of an asymmetric image come out.
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
    firsts = {int(data.random_crop(ramp, 32, (32, 32), True, np.random.default_rng(s))[0, 0, 0])
              for s in range(20)}
    assert firsts == {0, 248}
    noflip = {int(data.random_crop(ramp, 32, (32, 32), False, np.random.default_rng(s))[0, 0, 0])
              for s in range(20)}
    assert noflip == {0}


@pytest.mark.parametrize('size, crop, sides', [((60, 80), 32, (40, 50)),  # resized, no padding
                                               ((60, 80), 32, (60, 60)),  # short side kept: sliced
                                               ((9, 21), 30, (9, 12))])   # resized and padded (odd amounts)
def test_random_crop_flip_is_numpys_mirror_of_the_unflipped_crop(size, crop, sides):
    # The same draws with flip=False give the same window unflipped; numpy mirrors it exactly.
    rgb = _smooth_rgb(*size, seed=2)
    for seed in range(12):
        flipped = data.random_crop(rgb, crop, sides, True, np.random.default_rng(seed))
        plain = data.random_crop(rgb, crop, sides, False, np.random.default_rng(seed))
        draws = np.random.default_rng(seed)
        draws.integers(sides[0], sides[1] + 1)  # the short side, then (top, left, flip)
        mirror = draws.random(3)[2] < 0.5
        assert flipped.flags.c_contiguous and flipped.shape == (crop, crop, 3)
        assert np.array_equal(flipped, plain[:, ::-1] if mirror else plain)


@pytest.mark.parametrize('size, short', [((300, 500), 256), ((4, 400), 100), ((50, 60), 224)])
def test_crops_resample_only_the_window_like_a_whole_resize(size, short):
    """Against Pillow resizing the whole image, then cropping (and zero padding): within 2 levels.
    The thin image is what the window saves: resized whole, it would be 25 times its crop."""
    rgb = _smooth_rgb(*size, seed=1)
    h, w = size
    nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
    whole = _pad_centred(np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)), 224)
    H, W = whole.shape[:2]
    want = whole[(H - 224) // 2:(H - 224) // 2 + 224, (W - 224) // 2:(W - 224) // 2 + 224]
    got = data.center_crop(rgb, 224, short)
    assert got.shape == (224, 224, 3) and np.abs(got.astype(int) - want).max() <= 2
    u = np.random.default_rng(3).random(3)
    y0, x0 = int(u[0] * (H - 223)), int(u[1] * (W - 223))
    got = data.random_crop(rgb, 224, (short, short), True, np.random.default_rng(3))
    want = whole[y0:y0 + 224, x0:x0 + 224][:, ::-1] if u[2] < 0.5 else whole[y0:y0 + 224, x0:x0 + 224]
    assert np.abs(got.astype(int) - want).max() <= 2


def test_resized_window_is_pillows_whole_resize_then_crop(monkeypatch):
    """The loader resamples with torch from the window's nearer edge of each axis (the source mirrored when
    that is the far edge) through the window; against Pillow resizing the whole image, then slicing: within
    2 levels, on noise (a window off by a fraction of a pixel is tens of levels off), at each corner and
    inside, up- and downscaled, near 1:1, an axis whose torch input and output would be equally long
    (torch leaves such an axis as it is, whatever the scale), a side padded, a numpy array or a Pillow
    image. Pillow resizes (its box: the window alone) only a window far into a long banner, a Pillow
    image shrunk over about 4 times, and a window whose torch output would be 1 wide."""
    resize, boxes = Image.Image.resize, []
    monkeypatch.setattr(Image.Image, 'resize', lambda im, *a, **k: boxes.append(k.get('box')) or resize(im, *a, **k))
    rng = np.random.default_rng(0)
    cases = [((27, 36), 30, 24), ((36, 27), 30, 24),  # upscaled 0.9: at top 1 (left 1) the equal lengths
             ((40, 60), 33, 24), ((60, 40), 25, 24),  # downscaled, and just above the crop
             ((29, 31), 30, 24), ((31, 29), 30, 24),  # near 1:1
             ((12, 30), 20, 24)]                      # upscaled, the short side padded
    for (h, w), short, crop in cases:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        whole = _pad_centred(np.asarray(resize(Image.fromarray(rgb), (nw, nh), Image.BILINEAR)), crop)
        H, W = whole.shape[:2]
        for top, left in ((0, 0), (1, 1), (H - crop, W - crop), (0, W - crop), (H - crop - 1, 0),
                          ((H - crop) // 2, (W - crop) // 2 + 1)):
            top, left = min(max(top, 0), H - crop), min(max(left, 0), W - crop)
            want = whole[top:top + crop, left:left + crop].astype(int)
            for source in (rgb, Image.fromarray(rgb)):
                got = data._resized_crop(source, crop, short, lambda room: top, lambda room: left)
                assert got.shape == (crop, crop, 3) and got.dtype == np.uint8
                diff = np.abs(got.astype(int) - want)
                assert diff.max() <= 2 and diff.mean() < 0.5, ((h, w), short, (top, left), diff.max(), diff.mean())
    assert boxes == []  # torch resampled every window above
    banner = rng.integers(0, 256, (4, 120, 3), dtype=np.uint8)  # at short side 8: 8 x 240
    whole = np.asarray(resize(Image.fromarray(banner), (240, 8), Image.BILINEAR)).astype(int)
    for left, by_pillow in ((0, False), (232, False), (100, True)):  # 100: 108 columns from the nearer edge
        got = data._resized_crop(banner, 8, 8, lambda room: 0, lambda room: left)
        assert np.abs(got.astype(int) - whole[:, left:left + 8]).max() <= 2
        assert (boxes.pop() is not None) if by_pillow else boxes == []
    thin = rng.integers(0, 256, (9, 4, 3), dtype=np.uint8)  # at short side 1: 2 x 1; torch's plain kernel (no AVX2)
    whole = np.asarray(resize(Image.fromarray(thin), (1, 2), Image.BILINEAR)).astype(int)  # shrinks to 1 wide wrongly
    for source in (thin, Image.fromarray(thin)):
        got = data._resized_crop(source, 2, 1, lambda room: 0, lambda room: 0)
        assert np.abs(got[:, :1].astype(int) - whole).max() <= 2 and not got[:, 1:].any()
        assert boxes.pop() is not None
    # A torch without the private op: Pillow's box resize, every window (within 2 levels of the whole resize too).
    monkeypatch.setattr(data, '_TORCH_AA', None)
    got = data._resized_crop(banner, 8, 8, lambda room: 0, lambda room: 0)
    whole = np.asarray(resize(Image.fromarray(banner), (240, 8), Image.BILINEAR)).astype(int)
    assert np.abs(got.astype(int) - whole[:, :8]).max() <= 2 and boxes.pop() is not None
    monkeypatch.setattr(data, '_TORCH_AA', torch.ops.aten._upsample_bilinear2d_aa)
    photo = rng.integers(0, 256, (100, 120, 3), dtype=np.uint8)  # shrunk 5 times: copying it out of Pillow costs more
    whole = np.asarray(resize(Image.fromarray(photo), (24, 20), Image.BILINEAR)).astype(int)
    for source, by_pillow in ((photo, False), (Image.fromarray(photo), True)):
        got = data._resized_crop(source, 16, 20, lambda room: 2, lambda room: 3)
        assert np.abs(got.astype(int) - whole[2:18, 3:19]).max() <= 2
        assert (boxes.pop() is not None) if by_pillow else boxes == []


def _pad_centred(rgb, crop):
    h, w = rgb.shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    return np.pad(rgb, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def test_color_images_statuses_and_workers(tmp_path, capsys):
    rng = np.random.default_rng(0)
    colour = _write_rgb(tmp_path / 'c.jpg', rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), fmt='JPEG')
    gray_px = np.repeat(rng.integers(0, 256, (50, 70, 1), dtype=np.uint8), 3, axis=2)
    gray = _write_rgb(tmp_path / 'g.jpg', gray_px, fmt='JPEG')
    bad = _bad_files(tmp_path)
    paths = [colour, gray] + list(bad.values())
    ds = data.ColorImages(paths, crop=32, short_side_range=(36, 48))
    assert len(ds) == len(paths) and ds.path(1) == gray
    img, status = ds[(0, 123)]
    assert img.shape == (3, 32, 32) and img.dtype == torch.uint8 and status == data.STATUS_OK
    assert torch.equal(img, ds[(0, 123)][0])       # the seed decides the augmentation
    assert ds[(1, 5)][1] == data.STATUS_GRAY
    capsys.readouterr()
    for i, path in enumerate(bad.values()):
        img, status = ds[(2 + i, 0)]
        assert status == data.STATUS_BAD and img.sum() == 0
        assert path in capsys.readouterr().err
    with pytest.raises(TypeError, match='InfiniteSampler'):
        ds[0]
    val = data.ColorImages(paths, crop=32, short_side_range=40, train=False)
    assert torch.equal(val[0][0], val[(0, 99)][0])  # validation view ignores the seed
    for lo_hi in ((48, 36), (0, 40), 0):  # a range given HI first, a short side of 0
        with pytest.raises(ValueError, match=re.escape('short_side_range must be (lo, hi) with 0 < lo <= hi, got ')):
            data.ColorImages(paths, 32, lo_hi)
    # Same batches whatever the number of workers.
    two = data.ColorImages(paths[:2], 32, (36, 48))
    sampler = data.InfiniteSampler(len(two), batch_size=2, seed=1)
    batches = []
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(two, batch_size=2, sampler=sampler, num_workers=workers)
        it = iter(loader)
        batches.append([next(it) for _ in range(3)])
        del it
    for (x0, s0), (x1, s1) in zip(*batches):
        assert x0.dtype == torch.uint8 and x0.shape == (2, 3, 32, 32)
        assert torch.equal(x0, x1) and torch.equal(s0, s1)


def _crop_by_hand(rgb, crop, short, place, flip):
    """ColorImages' view of uint8 (H, W, 3) rgb, (3, crop, crop), from its definition: Pillow's bilinear
    resize of the whole image, the window sliced out of it, centred zero padding, offsets place(room)
    for (top, left), a numpy mirror; no resize when the short side is already `short`."""
    h, w = rgb.shape[:2]
    nh, nw = (h, w) if min(h, w) == short else (
        (short, max(1, round(w * short / h))) if h <= w else (max(1, round(h * short / w)), short))
    y0, x0 = place[0](max(nh, crop) - crop), place[1](max(nw, crop) - crop)
    ch, cw = min(nh, crop), min(nw, crop)
    whole = rgb if (nh, nw) == (h, w) else np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR))
    window = whole[y0:y0 + ch, x0:x0 + cw]
    ph, pw = crop - ch, crop - cw
    out = np.pad(window, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    return torch.from_numpy(np.ascontiguousarray((out[:, ::-1] if flip else out).transpose(2, 0, 1)))


def test_color_images_pixels_are_the_crop_of_load_rgb_by_hand(tmp_path):
    """ColorImages resizes the decoded Pillow image as it is (no copy to numpy and back) and flips in
    its transpose copy: for every mode the decoding converts, from files and from a pack, its pixels are
    those of random_crop and center_crop of load_rgb's array, and within 2 levels of that array cropped by
    hand (resized whole by Pillow, sliced; exact where the short side is kept; padded)."""
    rng = np.random.default_rng(0)
    src = tmp_path / 'src'
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated
    alpha = np.dstack([_smooth_rgb(44, 40, 5), rng.integers(0, 256, (44, 40, 1), dtype=np.uint8)])
    pal = Image.fromarray(_smooth_rgb(40, 48, 6)).quantize(16)
    pal.info['transparency'] = 3
    paths = [_write_rgb(src / 'rgb.jpg', _smooth_rgb(40, 56, 1), fmt='JPEG'),
             _write_rgb(src / 'rot.jpg', _smooth_rgb(56, 40, 2), fmt='JPEG', exif=exif.tobytes())]
    Image.fromarray(_smooth_rgb(40, 50, 3)[..., 0]).save(src / 'gray.jpg')  # mode L
    Image.fromarray(_smooth_rgb(42, 40, 4)).convert('CMYK').save(src / 'cmyk.jpg')
    Image.fromarray(alpha).save(src / 'rgba.png')
    pal.save(src / 'pal.png', transparency=3)
    Image.frombytes('I;16', (45, 40), (_smooth_rgb(40, 45, 7)[..., 0].astype('<u2') * 257).tobytes()).save(
        src / 'i16.png')
    keyed = _smooth_rgb(40, 44, 8) // 64 * 64  # mode RGB with a transparency key: the key's pixels are white
    Image.fromarray(keyed).save(src / 'keyed.png', transparency=tuple(int(v) for v in keyed[0, 0]))
    paths += [str(src / n) for n in ('gray.jpg', 'cmyk.jpg', 'rgba.png', 'pal.png', 'i16.png', 'keyed.png')]
    modes = []
    for p in paths:
        with Image.open(p) as im:
            modes.append(im.mode)
    assert modes == ['RGB', 'RGB', 'L', 'CMYK', 'RGBA', 'P', 'I;16', 'RGB']
    assert (data.load_rgb(paths[-1]) == 255).all(axis=2).mean() >= (keyed == keyed[0, 0]).all(axis=2).mean() > 0.05
    data.pack_images([src], tmp_path / 'pack', short_side=40, workers=1, log=_quiet)
    packed = data.find_images(tmp_path / 'pack', log=_quiet)
    for listed in (paths, packed):
        for crop, sides in ((32, (36, 48)), (32, (40, 41)), (32, (20, 24))):  # resized; short side kept; padded
            train = data.ColorImages(listed, crop, sides, min_colorful=False)
            val = data.ColorImages(listed, crop, sides, train=False, min_colorful=False)
            for i, path in enumerate(listed):
                rgb = data.load_rgb(path)
                for seed in range(6):
                    draws = np.random.default_rng(seed)
                    short = int(draws.integers(sides[0], sides[1] + 1))
                    u = draws.random(3)
                    place = (lambda room: int(u[0] * (room + 1)), lambda room: int(u[1] * (room + 1)))
                    want = _crop_by_hand(rgb, crop, short, place, u[2] < 0.5)
                    got = train[(i, seed)][0]
                    same = data.random_crop(rgb, crop, sides, True, np.random.default_rng(seed)).transpose(2, 0, 1)
                    assert torch.equal(got, torch.from_numpy(same.copy())), (path, crop, sides, seed)
                    assert (got.int() - want.int()).abs().max() <= (2 if short != min(rgb.shape[:2]) else 0)
                want = _crop_by_hand(rgb, crop, sides[0], (lambda room: room // 2,) * 2, False)
                got = val[i][0]
                same = data.center_crop(rgb, crop, sides[0]).transpose(2, 0, 1)
                assert torch.equal(got, torch.from_numpy(same.copy()))
                assert (got.int() - want.int()).abs().max() <= (2 if sides[0] != min(rgb.shape[:2]) else 0)


def test_infinite_sampler_ranks_resume_epochs():
    n, b, world = 103, 5, 3
    per_epoch = (n // world) // b  # 6 steps; 90 of 103 samples per epoch

    def take(sampler, steps):
        it = iter(sampler)
        return [next(it) for _ in range(steps * b)]

    ranks = [take(data.InfiniteSampler(n, b, rank=r, world_size=world, seed=7), 2 * per_epoch)
             for r in range(world)]
    for e in range(2):
        epoch = [set(i for i, _ in r[e * per_epoch * b:(e + 1) * per_epoch * b]) for r in ranks]
        assert all(len(s) == per_epoch * b for s in epoch)  # no repeats within a rank
        assert not (epoch[0] & epoch[1]) and not (epoch[0] & epoch[2]) and not (epoch[1] & epoch[2])
        assert len(set.union(*epoch)) == world * per_epoch * b
    first = [i for i, _ in ranks[0][:per_epoch * b]]
    second = [i for i, _ in ranks[0][per_epoch * b:]]
    assert first != second  # epochs are different permutations
    # Deterministic, and resuming at step s continues exactly.
    assert take(data.InfiniteSampler(n, b, rank=1, world_size=world, seed=7), 9) == ranks[1][:9 * b]
    resumed = take(data.InfiniteSampler(n, b, rank=2, world_size=world, seed=7, start_step=4), 5)
    assert resumed == ranks[2][4 * b:9 * b]
    # A run's sampler stops at its last step: steps 4..8 of rank 2, then nothing (no reads past the end).
    assert list(data.InfiniteSampler(n, b, rank=2, world_size=world, seed=7, start_step=4, stop_step=9)) == resumed
    # Seeds: distinct within an epoch, and a sample gets a new one in each epoch.
    seeds = [s for r in ranks for _, s in r]
    assert len(set(seeds)) == len(seeds)
    assert data.InfiniteSampler(n, b, seed=8).batch(0) != data.InfiniteSampler(n, b, seed=7).batch(0)
    with pytest.raises(ValueError, match='fewer than one batch'):
        data.InfiniteSampler(10, 4, world_size=3)
    for rank in (-1, 3):  # a rank of another world (RANK and WORLD_SIZE mixed up)
        with pytest.raises(ValueError, match=re.escape(f'rank must be in [0, 3), got {rank}')):
            data.InfiniteSampler(30, 4, rank=rank, world_size=3)


def test_status_counter_and_bad_share():
    c = data.StatusCounter()
    c.update(torch.tensor([0, 0, 1, 2]))
    c.update(torch.tensor([0, 2]))
    assert (c.seen, c.bad, c.gray) == (6, 1, 2)
    line = str(c)
    assert '\n' not in line and 'bad 1' in line and 'gray 2' in line
    d = data.StatusCounter()
    d.load_state_dict(c.state_dict())
    assert d.counts == c.counts
    assert not data.bad_share_exceeded(5, 99, 0.01, min_seen=100)  # too few seen to judge
    assert data.bad_share_exceeded(2, 100, 0.01, min_seen=100)  # 2% > 1%, judged at 100
    assert data.bad_share_exceeded(30, 1000, 0.01, min_seen=100)
    assert not data.bad_share_exceeded(10, 1000, 0.01, min_seen=100)  # exactly 1% is not more


# ----------------------------------------------------------------------------------------------
# VOC


def test_lab_and_models_stand_alone():
    """lab.py and models.py are copied into other projects: each imports only torch and a few
    standard modules, nothing of this repository."""
    import ast
    for name in ('lab.py', 'models.py'):
        tree = ast.parse((HERE / name).read_text())
        roots = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert roots <= {'torch', 'math', 'copy', 'collections', 'functools'}, (name, roots)
    # README: data.py imports no other file of the repository either (colorize.py imports it).
    tree = ast.parse((HERE / 'data.py').read_text())
    roots = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not roots & {p.stem for p in HERE.glob('*.py')}, roots


def test_lab_and_models_run_copied_alone(tmp_path):
    """STYLE.md practice 1 by trial: lab.py and models.py, each copied alone into an empty folder, run the
    README's first "Using lab.py and models.py" block (VGG-16 at width 1/16 so that it takes seconds) and
    lab.py's docstring example in a fresh interpreter that cannot see this repository, and load no other
    file of it."""
    text = (HERE / 'README.md').read_text()
    block = re.search(r'## Using lab\.py and models\.py in your own code\n.*?```python\n(import torch, lab\n.*?)```',
                      text, re.S)
    assert block, 'README: the first block of "Using lab.py and models.py" is gone'
    full = "build_model('vgg16', lab.output_dim('huechroma'))"
    assert full in block.group(1), 'README: the block no longer builds the VGG-16 this test shrinks'
    (tmp_path / 'example.py').write_text(block.group(1).replace(full, full[:-1] + ', width=1 / 16, fc_dim=32)'))
    for name, folder in (('lab.py', 'a'), ('models.py', 'b')):
        (tmp_path / folder).mkdir()
        shutil.copy(HERE / name, tmp_path / folder / name)
    script = textwrap.dedent(f"""
        import json, sys, textwrap
        sys.path[:0] = [{str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}]
        scope = {{}}
        exec(open({str(tmp_path / 'example.py')!r}).read(), scope)
        import lab, models
        lines = lab.__doc__.split('\\n')
        start = lines.index('    import torch')
        end = next(i for i in range(start, len(lines)) if not lines[i].startswith('    '))
        exec(textwrap.dedent('\\n'.join(lines[start:end])), {{}})
        print(json.dumps(dict(files=[lab.__file__, models.__file__], modules=sorted(sys.modules),
                              logits=list(scope['logits'].shape), ab=list(scope['ab'].shape),
                              loss=scope['loss'].item(), folded=type(scope['deploy']).__name__)))
        """)
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSTARTUP')}
    run = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out['files'] == [str(tmp_path / 'a' / 'lab.py'), str(tmp_path / 'b' / 'models.py')]
    assert set(out['modules']) & {p.stem for p in HERE.glob('*.py')} == {'lab', 'models'}
    assert out['logits'] == [4, 128, 64] and out['ab'] == [4, 2, 56, 56] and math.isfinite(out['loss'])
    assert out['folded'] == 'HypercolumnNet'


def test_voc_palette_standard_values():
    # Values of the VOC devkit colour map (VOClabelcolormap.m), as published.
    table = {0: (0, 0, 0), 1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 4: (0, 0, 128),
             5: (128, 0, 128), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}
    assert data.VOC_PALETTE.shape == (256, 3) and data.VOC_PALETTE.dtype == np.uint8
    for i, rgb in table.items():
        assert tuple(data.VOC_PALETTE[i]) == rgb


def test_voc_readers_on_handwritten_devkit(tmp_path):
    voc07 = tmp_path / 'VOCdevkit' / 'VOC2007'
    main = voc07 / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    ids = ['000005', '000007', '000009']
    for k, cls in enumerate(data.VOC_CLASSES):
        lab = {'cat': [1, -1, 0], 'dog': [-1, 1, -1]}.get(cls, [-1, -1, -1])
        (main / f'{cls}_trainval.txt').write_text(''.join(f'{i} {v:2d}\n' for i, v in zip(ids, lab)))
    paths, labels = data.voc_classification(tmp_path, 'trainval')  # the folder above VOCdevkit works
    assert [os.path.basename(p) for p in paths] == ['000005.jpg', '000007.jpg', '000009.jpg']
    assert labels.dtype == np.int8 and labels.shape == (3, 20)
    cat, dog = data.VOC_CLASSES.index('cat'), data.VOC_CLASSES.index('dog')
    assert labels[:, cat].tolist() == [1, -1, 0] and labels[:, dog].tolist() == [-1, 1, -1]
    assert (np.delete(labels, [cat, dog], axis=1) == -1).all()
    with pytest.raises(FileNotFoundError, match=r'aeroplane_test\.txt'):
        data.voc_classification(voc07, 'test')

    voc12 = tmp_path / 'VOCdevkit' / 'VOC2012'
    for sub in ('JPEGImages', 'SegmentationClass', 'SegmentationClassAug', 'ImageSets/Segmentation'):
        (voc12 / sub).mkdir(parents=True)
    for name in ('2007_000032', '2008_000001', '2011_000002'):
        _write_rgb(voc12 / 'JPEGImages' / f'{name}.jpg', fmt='JPEG')
        lab = np.zeros((6, 8), np.uint8)
        lab[2:4, 2:5] = 15
        lab[1, 1:6] = 255
        png = Image.fromarray(lab)  # 'L'; the palette makes it 'P'
        png.putpalette(data.VOC_PALETTE.tobytes())
        png.save(voc12 / 'SegmentationClass' / f'{name}.png')
        Image.fromarray(lab).save(voc12 / 'SegmentationClassAug' / f'{name}.png')
    (voc12 / 'ImageSets/Segmentation/train.txt').write_text('2007_000032\n2008_000001\n')
    (voc12 / 'ImageSets/Segmentation/val.txt').write_text('2011_000002\n')
    pairs = data.voc_segmentation(voc12, 'train')
    assert [os.path.basename(p) for p, _ in pairs] == ['2007_000032.jpg', '2008_000001.jpg']
    assert all(os.sep + 'SegmentationClass' + os.sep in lab for _, lab in pairs)
    label = data.load_label(pairs[0][1])
    assert label.dtype == np.uint8 and label[2, 3] == 15 and label[1, 2] == 255 and label[0, 0] == 0
    with pytest.raises(FileNotFoundError, match='train_aug'):
        data.voc_segmentation(voc12, 'train_aug')
    assert not data.has_train_aug(tmp_path)
    # The common DeepLab form of the list, at the VOC2012 root, with gray label PNGs.
    (voc12 / 'train_aug.txt').write_text(
        '/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n'
        '/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n')
    assert data.has_train_aug(tmp_path) and data.has_train_aug(voc12)
    # finetune_voc.py --task seg trains on train_aug by default when it is there (the authors' protocol).
    args = ft.fill_defaults(ft.parse_args(['--task', 'seg', '--voc-root', str(tmp_path), '--batch-size', '2']),
                            torch.device('cpu'))
    assert args.train_split is None
    ft.voc_sets(args)
    assert args.train_split == 'train_aug'
    (voc12 / 'ImageSets/Segmentation/trainval.txt').write_text('2007_000032\n2008_000001\n2011_000002\n')
    args.train_split = 'trainval'  # then testing on val tests on training images
    with pytest.raises(colorize.UserError, match='share 1 images'):
        ft.voc_sets(args)
    aug = data.voc_segmentation(voc12, 'train_aug')
    assert [os.path.basename(os.path.dirname(lab)) for _, lab in aug] == ['SegmentationClassAug'] * 2
    assert np.array_equal(data.load_label(aug[0][1]), label)
    # The list's other form, bare ids: the labels are still SBD's, in SegmentationClassAug/ (SegmentationClass/
    # holds masks of these ids too, so only the folder tells them apart).
    (voc12 / 'train_aug.txt').write_text('2007_000032\n2008_000001\n')
    assert data.voc_segmentation(voc12, 'train_aug') == [
        (str(voc12 / 'JPEGImages' / f'{i}.jpg'), str(voc12 / 'SegmentationClassAug' / f'{i}.png'))
        for i in ('2007_000032', '2008_000001')]
    (voc12 / 'train_aug.txt').write_text('2007_000032\n2011_000002\n')  # leaks a val image
    with pytest.raises(ValueError, match=r'train_aug\.txt contains 1 images of the val set \(e\.g\. 2011_000002\)'):
        data.voc_segmentation(voc12, 'train_aug')
    # A val.txt saved with a byte-order mark and CRLF (a Windows editor): its first id read as '\ufeff2011_000002'
    # and the leak of that image passed unseen.
    (voc12 / 'ImageSets/Segmentation/val.txt').write_bytes(b'\xef\xbb\xbf2011_000002\r\n')
    with pytest.raises(ValueError, match='contains 1 images of the val set'):
        data.voc_segmentation(voc12, 'train_aug')
    # VOC2007 ships segmentation lists and masks too: one year's folder never stands in for the other's.
    (voc07 / 'ImageSets' / 'Segmentation').mkdir()
    (voc07 / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('000005\n')
    with pytest.raises(FileNotFoundError, match='is VOC2007, where VOC2012 is needed'):
        data.voc_segmentation(str(voc07) + os.sep, 'train')
    with pytest.raises(FileNotFoundError, match='is VOC2012, where VOC2007 is needed'):
        data.voc_classification(voc12, 'trainval')
    Image.new('RGB', (4, 4)).save(voc12 / 'rgb.png')
    with pytest.raises(ValueError, match='mode RGB'):
        data.load_label(voc12 / 'rgb.png')


# ----------------------------------------------------------------------------------------------
# the demo world

SMALL_VOC = dict(n_trainval_2007=40, n_test_2007=10, n_train_2012=60, n_val_2012=10)


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    lines = []
    paths = data.ensure_demo(root / 'world', n_train=24, n_val=6, log=lines.append, **SMALL_VOC)
    return paths, lines


def test_demo_layout_and_determinism(demo, tmp_path):
    paths, lines = demo
    assert len(lines) == 1 and paths['root'] in lines[0]
    train = data.find_images(paths['train'], log=lambda s: None)
    assert len(train) == 24 and len(data.find_images(paths['val'], log=lambda s: None)) == 6
    for p in train:
        wnid = os.path.basename(os.path.dirname(p))
        assert wnid[0] == 'n' and len(wnid) == 9 and os.path.basename(p).startswith(wnid + '_')
        assert p.endswith('.JPEG')
    sizes = set()
    for p in train:
        with Image.open(p) as im:
            sizes.add(im.size)
    assert len(sizes) > 1 and all(160 <= s <= 256 for wh in sizes for s in wh)
    # Same seed, same bytes; another seed, other images.
    again = data.make_demo_world(tmp_path / 'again', n_train=24, n_val=0)
    rel = os.path.relpath(train[3], paths['train'])
    with open(train[3], 'rb') as f, open(os.path.join(again['train'], rel), 'rb') as g:
        assert f.read() == g.read()
    other = data.make_demo_world(tmp_path / 'other', n_train=24, n_val=0, seed=5)
    name = os.path.basename(train[3]).split('_')[1]  # '<i>.JPEG'
    counterpart = [p for p in data.find_images(other['train'], log=lambda s: None)
                   if p.endswith('_' + name)]
    with open(train[3], 'rb') as f, open(counterpart[0], 'rb') as g:
        assert f.read() != g.read()


def test_demo_voc_parses_and_has_difficult(demo):
    paths, _ = demo
    files, labels = data.voc_classification(paths['voc2007'], 'trainval')
    assert len(files) == 40 and all(os.path.exists(f) for f in files)
    assert set(np.unique(labels)) == {-1, 0, 1}
    assert ((labels >= 0).sum(1) >= 1).all()  # every image shows at least one object
    tr, _ = data.voc_classification(paths['voc2007'], 'train')
    va, _ = data.voc_classification(paths['voc2007'], 'val')
    te, _ = data.voc_classification(paths['voc2007'], 'test')
    assert sorted(tr + va) == sorted(files) and not set(tr) & set(va) and len(te) == 10
    with open(os.path.join(paths['voc2007'], 'ImageSets', 'Main', 'cat_trainval.txt')) as f:
        for line in f:  # '%s %2d' exactly: id, a space, a two-wide label
            assert len(line) == 10 and line[6] == ' ' and line[7:].strip() in ('1', '-1', '0')
    pairs = data.voc_segmentation(paths['voc2012'], 'train')
    assert len(pairs) == 60 and len(data.voc_segmentation(paths['voc2012'], 'val')) == 10
    for img, mask in pairs[:10]:
        with Image.open(mask) as im:
            assert im.mode == 'P'
            assert bytes(im.getpalette()[:63]) == data.VOC_PALETTE[:21].tobytes()
        y = data.load_label(mask)
        assert y.shape == data.load_rgb(img).shape[:2]
        assert set(np.unique(y)) <= set(range(21)) | {255} and (y == 255).any()
        # Every boundary between two classes is covered by the 255 band.
        a, b = y[:, :-1], y[:, 1:]
        assert not ((a != b) & (a != 255) & (b != 255)).any()
        a, b = y[:-1], y[1:]
        assert not ((a != b) & (a != 255) & (b != 255)).any()


def test_demo_colour_follows_class(demo):
    """Pixels of a class have that class's hue (measured by HSV on the JPEGs), while the gray
    levels of differently coloured classes overlap (hue is not readable from lightness)."""
    paths, _ = demo
    pixels = {k: [] for k in range(1, 21)}
    for img, mask in data.voc_segmentation(paths['voc2012'], 'train'):
        rgb, y = data.load_rgb(img), data.load_label(mask)
        for k in np.unique(y):
            if 1 <= k <= 20:
                pixels[k].append(rgb[y == k])
    # The paint of each class, as HSV hue (degrees): blue bicycles, yellow birds, green bottles,
    # teal sofas, violet chairs, crimson cars.
    expected = {'bicycle': 220, 'bird': 50, 'bottle': 130, 'sofa': 185, 'chair': 285, 'car': 345}
    measured = {}
    for name, centre in expected.items():
        px = pixels[data.VOC_CLASSES.index(name) + 1]
        if sum(len(p) for p in px) < 200:
            continue
        hue, chroma = _hsv_hue_deg(np.concatenate(px))
        measured[name] = _circular_mean_deg(hue, chroma)
        off = (measured[name] - centre + 180) % 360 - 180
        assert abs(off) <= 25, (name, measured[name])
    assert len(measured) >= 4, f'too few classes in the sample: {sorted(measured)}'
    gray = {}
    for name in ('bicycle', 'bird', 'bottle', 'sofa'):
        px = np.concatenate(pixels[data.VOC_CLASSES.index(name) + 1])
        gray[name] = np.asarray(Image.fromarray(px[None]).convert('L'))[0]
    bins = np.linspace(0, 256, 17)
    hist = {k: np.histogram(v, bins)[0] / len(v) for k, v in gray.items()}
    for a in hist:
        for b in hist:
            assert np.minimum(hist[a], hist[b]).sum() > 0.3, (a, b)  # heavy overlap


def test_ensure_demo_idempotent_and_atomic(demo, tmp_path, monkeypatch):
    paths, _ = demo
    lines = []
    again = data.ensure_demo(paths['root'], n_train=24, n_val=6, log=lines.append, **SMALL_VOC)
    assert again == paths and lines == []  # complete: nothing generated
    with pytest.raises(ValueError, match='delete the folder'):
        data.ensure_demo(paths['root'], n_train=25, n_val=6, log=lines.append, **SMALL_VOC)

    def boom(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, 'make_demo_voc', boom)
    root = tmp_path / 'broken'
    with pytest.raises(KeyboardInterrupt):
        data.ensure_demo(root, n_train=4, n_val=1, log=lines.append, **SMALL_VOC)
    assert not root.exists() and os.listdir(tmp_path) == []  # no half world, no temp folder


def test_demo_finished_first_by_a_concurrent_call_is_taken(tmp_path, monkeypatch):
    # Two processes generating one demo world: the one whose rename comes second finds the other's complete
    # world at root (the rename fails: root is not empty) and returns it, its own temp removed. The temp is
    # named for this host and process (what _remove_stale_temps reads back). Its line says so, not that it
    # generated the world.
    counts = dict(n_train=2, n_val=1, n_trainval_2007=1, n_test_2007=1, n_train_2012=1, n_val_2012=1)
    other = data.ensure_demo(tmp_path / 'other' / 'demo', workers=1, log=_quiet, **counts)['root']
    root, temps = tmp_path / 'world' / 'demo', []
    real = data.make_demo_voc

    def voc_then_the_other_finishes(tmp, *args, **kwargs):
        temps.append(tmp)
        result = real(tmp, *args, **kwargs)
        shutil.copytree(other, root)  # its rename won
        return result
    monkeypatch.setattr(data, 'make_demo_voc', voc_then_the_other_finishes)
    lines = []
    assert data.ensure_demo(root, workers=1, log=lines.append, **counts)['root'] == str(root)
    assert len(lines) == 1 and lines[0].startswith(f'took the demo world in {root} that another process finished')
    assert temps == [str(tmp_path / 'world' / f'.demo.tmp-{socket.gethostname()}-{os.getpid()}')]
    assert os.listdir(tmp_path / 'world') == ['demo'] and (root / 'DEMO_COMPLETE.json').is_file()


def test_demo_rendered_by_two_processes_is_the_same_byte_for_byte(tmp_path, monkeypatch):
    # One scene per job (not 64), so that the two worker processes take turns within each stream.
    monkeypatch.setattr(data, '_run_jobs', functools.partial(data._run_jobs, chunk=1))
    counts = dict(n_train=3, n_val=1, n_trainval_2007=2, n_test_2007=1, n_train_2012=2, n_val_2012=1)
    one = data.ensure_demo(tmp_path / 'one' / 'demo', workers=1, log=_quiet, **counts)['root']
    # Temp folders that a killed generation left: a dead process's is removed, a live one's kept, and names
    # whose "pid" is no pid (too large for one, a digit that int() refuses) are left alone.
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    parent = tmp_path / 'two'
    prefix = f'.demo.tmp-{socket.gethostname()}-'
    for pid in (dead.pid, os.getppid(), 10 ** 20, '\u00b2'):
        (parent / f'{prefix}{pid}').mkdir(parents=True)
        (parent / f'{prefix}{pid}' / 'train').mkdir()
    two = data.ensure_demo(parent / 'demo', workers=2, log=_quiet, **counts)['root']
    assert sorted(os.listdir(parent)) == sorted(['demo', f'{prefix}{os.getppid()}', f'{prefix}{10 ** 20}',
                                                 f'{prefix}\u00b2'])

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in Path(root).rglob('*') if p.is_file()}
    made = files(one)
    assert len([name for name in made if name.endswith(('.JPEG', '.jpg'))]) == sum(counts.values())
    assert files(two) == made


# ----------------------------------------------------------------------------------------------
# packs


def _quiet(_):
    pass


def test_pack_progress_lines_count_images_as_packed(tmp_path):
    # A line per task with log_every=0: images done of the total, the share, the bad and gray so far,
    # counted by hand over a colour, a gray, a broken and a colour file, packed in that (name) order.
    src = tmp_path / 'src'
    _write_rgb(src / 'a.png')
    _write_rgb(src / 'b.png', np.full((6, 8, 3), 90, np.uint8))
    (src / 'c.jpg').write_bytes(b'not a JPEG')
    _write_rgb(src / 'd.png')
    lines = []
    info = data.pack_images(str(src), tmp_path / 'pack', short_side=4, workers=1, chunk=2, task_size=1,
                            log=lines.append, log_every=0)  # (one root as a str, not a list)
    assert info['total'] == 4 and info['params']['roots'] == [str(src)]
    progress = [re.sub(r', [\d,]+ img/s, ETA [^,]+,', ',', line) for line in lines if line.startswith('pack: ')]
    assert progress == ['pack: 1/4 images (25.0%), 0 bad, 0 gray', 'pack: 2/4 images (50.0%), 0 bad, 1 gray',
                        'pack: 3/4 images (75.0%), 1 bad, 1 gray', 'pack: 4/4 images (100.0%), 1 bad, 1 gray']
    # The closing line: the counts, and where the reasons are when there are bad files (only then).
    pack = tmp_path / 'pack'
    assert re.fullmatch(rf'packed 4 images into {re.escape(str(pack))} in \d+ s: 2 ok, 1 gray, 1 bad \(reasons in '
                        rf'{re.escape(str(pack / "bad.jsonl"))}\); 0\.00 GB in 1 shard\(s\)\. Train with --data '
                        rf'{re.escape(shlex.quote(str(pack)))}', lines[-1]), lines[-1]
    (src / 'c.jpg').unlink()
    (src / 'd.png').unlink()
    lines.clear()
    data.pack_images(src, tmp_path / 'no-bad', short_side=4, workers=1, log=lines.append)
    assert ': 1 ok, 1 gray, 0 bad; 0.00 GB in 1 shard(s).' in lines[-1] and 'reasons' not in lines[-1]
    # The durations these lines and the summaries print, by hand (rounded to the second).
    assert [data._duration(s) for s in (0, 59.4, 59.6, 61, 3599, 3600, 3725, 90061)] == [
        '0 s', '59 s', '1 min 00 s', '1 min 01 s', '59 min 59 s', '1 h 00 min', '1 h 02 min', '25 h 01 min']
    for short_side, quality in ((0, 85), (4, 0), (4, 101)):
        with pytest.raises(ValueError, match=re.escape(f'pack: expected short_side >= 1 and quality in 1..100, got '
                                                       f'{short_side} and {quality}')):
            data.pack_images(src, tmp_path / 'p2', short_side=short_side, quality=quality, workers=1, log=_quiet)
    assert not (tmp_path / 'p2').exists()


def _reference_packed_jpeg(path, short_side, quality):
    """The bytes a pack should hold for `path`, by the Pillow calls pack_images documents: draft
    a JPEG to a 1/2^k scale with short side >= short_side, EXIF transpose, RGB,
    LANCZOS (reducing_gap 3) to the short side unless already <= it, JPEG at `quality`."""
    with Image.open(path) as im:
        w, h = im.size
        if im.format == 'JPEG' and short_side < min(w, h):
            s = short_side / min(w, h)
            im.draft('RGB', (math.ceil(w * s), math.ceil(h * s)))
        rgb = np.asarray(ImageOps.exif_transpose(im).convert('RGB'))
    im = Image.fromarray(rgb)
    w, h = im.size
    if min(w, h) > short_side:
        size = (round(w * short_side / h), short_side) if h <= w else (short_side, round(h * short_side / w))
        im = im.resize(size, Image.LANCZOS, reducing_gap=3.0)
    buf = io.BytesIO()
    im.save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


def _smooth_rgb(h, w, seed):
    """A photo-like image: smooth colour ramps plus mild noise."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) * 255 // (h + w)], -1)
    return np.clip(base + rng.integers(-20, 21, (h, w, 3)), 0, 255).astype(np.uint8)


def _pack_sources(root):
    """Sources of every kind; returns {name: path} (bad files included)."""
    root.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated: 200 x 100 stored, 100 x 200 shown
    gray = np.repeat(_smooth_rgb(100, 90, 3)[..., :1], 3, axis=2)
    src = {'big_jpeg': _write_rgb(root / 'a' / 'big.jpg', _smooth_rgb(200, 300, 0), fmt='JPEG', quality=95),
           'png': _write_rgb(root / 'a' / 'tall.png', _smooth_rgb(130, 90, 1), fmt='PNG'),
           'small': _write_rgb(root / 'b' / 'small.jpg', _smooth_rgb(50, 40, 2), fmt='JPEG'),
           'rotated': _write_rgb(root / 'b' / 'rot.jpg', _smooth_rgb(100, 200, 4), fmt='JPEG',
                                 exif=exif.tobytes()),
           'gray': _write_rgb(root / 'c' / 'gray.png', np.ascontiguousarray(gray[..., 0]), fmt='PNG')}
    for kind, path in _bad_files(root).items():
        src[f'bad_{kind}'] = path
    return src


def _pack_files(pack):
    """{file name: bytes} of every file of a pack."""
    return {n: (pack / n).read_bytes() for n in sorted(os.listdir(pack))}


def test_pack_round_trip_matches_reference(tmp_path):
    src = _pack_sources(tmp_path / 'src')
    pack = tmp_path / 'pack'
    lines = []
    info = data.pack_images([tmp_path / 'src'], pack, short_side=64, quality=85, workers=2,
                            shard_bytes=6000, log=lines.append)
    assert info['total'] == len(src) and info['counts'] == {'ok': 4, 'bad': 4, 'gray': 1}
    assert 'packed 9 images' in lines[-1] and '4 bad' in lines[-1]
    assert len(info['shards']) >= 2  # several shards, to read across them
    paths = data.find_images(pack, log=_quiet)
    sources = sorted(src.values())  # find_images order
    # Pseudo-paths: entry i, then the source's folder and file name (class folders stay readable).
    assert paths == [os.path.join(str(pack), 'index.npy', f'{i:09d}', os.path.basename(os.path.dirname(s)),
                                  os.path.basename(s)) for i, s in enumerate(sources)]
    with pytest.raises(ValueError, match='does not match the pack'):
        data.load_rgb(paths[0].replace(os.path.basename(sources[0]), 'other.jpg'))
    tail = paths[0][len(os.path.join(str(pack), 'index.npy', f'{0:09d}')):]  # /<folder>/<name>
    with pytest.raises(ValueError, match='holds only 9 images'):  # entries 0..8: 9 is past the end
        data.packed_entry(os.path.join(str(pack), 'index.npy', f'{len(sources):09d}') + tail)
    assert data.packed_entry(os.path.join(str(pack), 'index.npy', '00000000x') + tail) is None  # no entry number
    # The on-disk format, read with numpy alone.
    index = np.load(pack / 'index.npy', mmap_mode='r')
    offsets = np.load(pack / 'names-offsets.npy')
    names = (pack / 'names.bin').read_bytes()
    assert [names[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])] == sources
    assert index.shape == (len(sources), 5) and index.dtype == np.int64 and info['version'] == 2
    shards = [(pack / f'shard-{k:05d}.bin').read_bytes() for k in range(len(info['shards']))]
    assert [len(b) for b in shards] == info['shards']
    assert info['crc32'] == {n: zlib.crc32((pack / n).read_bytes()) for n in ('index.npy', 'names.bin', 'names-offsets.npy')}
    by_name = {v: k for k, v in src.items()}
    for i, (source, path) in enumerate(zip(sources, paths)):
        shard, offset, length, status, crc = (int(v) for v in index[i])
        kind = by_name[source]
        if kind.startswith('bad_'):
            assert status == data.STATUS_BAD and length == 0 and crc == 0
            continue
        expected = _reference_packed_jpeg(source, 64, 85)
        assert shards[shard][offset:offset + length] == expected, kind
        assert crc == zlib.crc32(expected), kind
        rgb = data.load_rgb(path)
        assert np.array_equal(rgb, np.asarray(Image.open(io.BytesIO(expected)).convert('RGB'))), kind
        assert status == (data.STATUS_GRAY if kind == 'gray' else data.STATUS_OK), kind
    shapes = {by_name[s]: data.load_rgb(p).shape for s, p in zip(sources, paths) if 'bad' not in by_name[s]}
    assert shapes == {'big_jpeg': (64, 96, 3), 'png': (92, 64, 3), 'small': (50, 40, 3),
                      'rotated': (128, 64, 3), 'gray': (71, 64, 3)}
    # Decoding with a smaller short side drafts the stored JPEG, as for files.
    assert data.load_rgb(paths[sources.index(src['big_jpeg'])], min_short_side=30).shape == (32, 48, 3)



def test_loader_profile_script_times_every_part_of_a_pack_with_bad_images(tmp_path, capsys, monkeypatch):
    """.ci/loader_profile.py (README, Benchmark) repeats ColorImages' calls part by part: it must keep
    up with data.py's functions, and leave out images that were bad when packed (no bytes to decode)."""
    _pack_sources(tmp_path / 'src')
    data.pack_images([tmp_path / 'src'], tmp_path / 'pack', short_side=64, quality=85, workers=1, log=_quiet)
    spec = importlib.util.spec_from_file_location('loader_profile', Path(__file__).parent / '.ci' / 'loader_profile.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    # The image sizes that reach the resized crop, in the timed parts and in ColorImages: the same (a pack at
    # 64 with short sides 16-20 is decoded at half size by JPEG's draft, 64 -> 32 >= 20, in both).
    seen, window = [], data._random_window
    monkeypatch.setattr(data, '_random_window', lambda im, *a: seen.append(im.size) or window(im, *a))
    script.main([str(tmp_path / 'pack'), '--crop', '16', '--short-side', '16', '20', '--batch-size', '4',
                 '--n', '8', '--repeats', '2'])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith('host: ') and all(part in out for part in script.PARTS)
    assert out.splitlines()[1].startswith('8 images, crop 16, short side 16-20')
    assert len(seen) == 8 + 2 * 16 and min(min(size) for size in seen) < 64
    assert sorted(seen[8:16]) == sorted(seen[16:24]) == sorted(seen[24:32]), seen  # warm-up, then parts, whole
    # .ci/gpu's summary takes the last line: the untimed figure (the best pass), as its table shows it.
    untimed = re.search(r'ColorImages\[\.\.\.\] \+ collate, untimed inside +([0-9.]+) \(passes: ([0-9.]+), ([0-9.]+)\)', out)
    assert untimed and float(untimed[1]) == min(float(untimed[2]), float(untimed[3])), out
    last = out.strip().splitlines()[-1]
    assert last == f'ms of wall time per image, ColorImages[...] + collate untimed inside, the mean of 1 process(es): {untimed[1]}'
    assert re.search(r"grep -E '\^\(host:\|ms of \.\* the mean of\)' \"\$OUT/loader-profile-\$n\.log\"",
                     (HERE / '.ci' / 'gpu').read_text()), '.ci/gpu no longer takes that line'

def test_loader_profile_host_line_counts_hyperthreads_as_cores_they_share():
    """The host line counts physical cores by (physical id, core id): two sockets of two cores with two
    threads each are 8 logical CPUs on 4 cores (a hand-written /proc/cpuinfo)."""
    spec = importlib.util.spec_from_file_location('loader_profile', Path(__file__).parent / '.ci' / 'loader_profile.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    blocks = [f'processor\t: {k}\nmodel name\t: Xeon Test\nphysical id\t: {k // 4}\ncore id\t: {k % 2}\n'
              f'cpu MHz\t\t: {2000 + 100 * k}.000\n' for k in range(8)]
    line = script.host_cpus('\n'.join(blocks), 6, 'max 100000\n')
    assert line == ('host: Xeon Test; 8 logical CPUs on 4 cores (2 per core); this process may use 6; '
                    'clock now 2000-2700 MHz; cgroup cpu.max max 100000')
    # A VM's cpuinfo without core ids (some hypervisors): the cores are not guessed.
    assert 'an unknown number of cores' in script.host_cpus('processor\t: 0\nmodel name\t: V\n', 1)


def test_pack_bad_and_gray_through_color_images(tmp_path, capsys):
    src = _pack_sources(tmp_path / 'src')
    pack = tmp_path / 'pack'
    data.pack_images([tmp_path / 'src'], pack, short_side=64, workers=1, log=_quiet)
    paths = data.find_images(pack, log=_quiet)
    reasons = [json.loads(line) for line in (pack / 'bad.jsonl').read_text().splitlines()]
    sources = sorted(src.values())
    bad = {src[k] for k in src if k.startswith('bad_')}
    assert {sources[r['index']] for r in reasons} == bad and all(r['reason'] for r in reasons)
    with pytest.raises(data.BadImage) as err:
        data.load_rgb(paths[sources.index(src['bad_zero'])])
    assert err.value.path == src['bad_zero'] and 'empty file' in err.value.reason
    ds = data.ColorImages(paths, crop=32, short_side_range=(36, 48))
    capsys.readouterr()
    for i, source in enumerate(sources):
        img, status = ds[(i, 7)]
        if source in bad:
            assert status == data.STATUS_BAD and img.sum() == 0
            warning = capsys.readouterr().err
            reason = next(r['reason'] for r in reasons if r['index'] == i)
            assert source in warning and reason in warning
        else:
            assert status == (data.STATUS_GRAY if source == src['gray'] else data.STATUS_OK)
    # The stored flag is what ColorImages reports (it does not recompute): flip one and see.
    k = sources.index(src['png'])
    np.load(pack / 'index.npy', mmap_mode='r+')[k, 3] = data.STATUS_GRAY
    fresh = data.ColorImages([paths[k]], 32, (36, 48))
    data._OPEN_PACKS.clear()  # reopen the pack, as a new process would
    assert fresh[(0, 0)][1] == data.STATUS_GRAY


def test_pack_resume_after_interruption_is_identical(tmp_path, monkeypatch):
    root = tmp_path / 'src'
    for i in range(11):
        _write_rgb(root / f'{i:02d}.jpg', _smooth_rgb(60 + 7 * i, 90, i), fmt='JPEG')
    (root / '05b.jpg').write_text('not a picture')
    whole, part = tmp_path / 'whole', tmp_path / 'part'
    kw = dict(short_side=48, workers=1, chunk=4, task_size=2, shard_bytes=1, log=_quiet)
    data.pack_images([root], whole, **kw)  # shard_bytes=1: one shard per image

    calls = []
    real_task = data._pack_task

    def interrupted(task):
        calls.append(len(task[0]))
        if len(calls) == 4:  # chunk 1's second task: chunk 1's first task is written, not committed
            raise KeyboardInterrupt
        return real_task(task)

    monkeypatch.setattr(data, '_pack_task', interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.pack_images([root], part, **kw)
    monkeypatch.undo()
    progress = json.loads((part / 'progress.json').read_text())
    assert progress['done'] == 4 and not (part / 'complete.json').exists()
    on_disk = [n for n in os.listdir(part) if n.startswith('shard-')]
    assert len(on_disk) > len(progress['shards'])  # images written after the last commit
    # A killed process can leave a partly written image too.
    with open(part / f'shard-{len(progress["shards"]) + 1:05d}.bin', 'ab') as f:
        f.write(b'\xff\xd8 half an image')
    with open(part / 'bad.jsonl', 'a') as f:
        f.write('{"index": 99, "rea')
    # Training from it, or reading one of its images, says how to finish it.
    for fn in (lambda: data.find_images(part, log=_quiet),
               lambda: data.load_rgb(os.path.join(str(part), 'index.npy', '000000000', 'src', '00.jpg'))):
        with pytest.raises(ValueError, match='is incomplete') as err:
            fn()
        assert f'python data.py pack --data {root} --out {part} --short-side 48' in str(err.value)
    # A pack begun by a data.py of format version 1 (no CRC column) is finished as such: the same files but
    # for that column and complete.json's version, no CRC32s there.
    v1 = tmp_path / 'part-v1'
    shutil.copytree(part, v1)
    np.save(v1 / 'index.npy', np.load(part / 'index.npy')[:, :4])
    (v1 / 'progress.json').write_text(json.dumps({**progress, 'version': 1}))
    data.pack_images([root], v1, **kw)
    assert np.array_equal(np.load(v1 / 'index.npy'), np.load(whole / 'index.npy')[:, :4])
    complete = json.loads((whole / 'complete.json').read_text())
    assert json.loads((v1 / 'complete.json').read_text()) == {**{k: v for k, v in complete.items() if k != 'crc32'},
                                                             'version': 1}
    assert all(_pack_files(v1)[n] == c for n, c in _pack_files(whole).items() if n.startswith('shard-'))
    lines = []
    data.pack_images([root], part, **dict(kw, workers=2, chunk=3, log=lines.append))
    assert 'resuming' in lines[0] and '4/12' in lines[0]
    assert _pack_files(part).keys() == _pack_files(whole).keys()
    for name, content in _pack_files(whole).items():
        if name != 'progress.json':  # also equal, but for its chunk-size-dependent history
            assert _pack_files(part)[name] == content, name
    # Again on the complete pack: a no-op that says so; other arguments: a clear error.
    mtimes = {n: os.stat(part / n).st_mtime_ns for n in os.listdir(part)}
    lines.clear()
    data.pack_images([root], part, **dict(kw, log=lines.append))
    assert lines == [f'pack {part} is already complete (12 images, made with the same arguments): '
                     'nothing to do (a pack holds the images listed when it started; to take in images '
                     'added since, pack into a new folder)']
    assert {n: os.stat(part / n).st_mtime_ns for n in os.listdir(part)} == mtimes
    with pytest.raises(ValueError, match=r'other arguments: --short-side 48 \(asked: 40\)'):
        data.pack_images([root], part, **dict(kw, short_side=40))
    with pytest.raises(ValueError, match='other arguments: --data'):
        data.pack_images([root, tmp_path / 'whole'], part, **kw)
    # The resumed pack's CRC32s are right, on both sides of the interruption: it verifies, and a flipped byte in
    # an image packed before it (entry 2) or after (entry 9, 08.jpg) is named.
    assert data.verify_pack(part, workers=1, log=_quiet) == []
    _flip_byte(part, 2)
    _flip_byte(part, 9)
    lines = []
    shards = np.load(part / 'index.npy')[:, 0]
    assert [f[:2] for f in data.verify_pack(part, workers=1, log=lines.append)] == [
        (f'shard-{shards[2]:05d}.bin', 2), (f'shard-{shards[9]:05d}.bin', 9)]
    assert lines[:2] == [f'failed: entry {i} ({root / name}) in shard-{shards[i]:05d}.bin: its bytes differ from '
                         'those packed (CRC32 mismatch)' for i, name in ((2, '02.jpg'), (9, '08.jpg'))]


def test_training_warns_when_a_pack_is_smaller_than_the_short_side_range(folders, tmp_path, capsys):
    train, val = folders
    pack = tmp_path / 'pack'
    data.main(['pack', '--data', str(train), '--out', str(pack), '--short-side', '40', '--workers', '1'])
    assert data.pack_short_side(pack) == 40 and data.pack_short_side(train) is None
    capsys.readouterr()
    # --crop 32: the default short-side range is [32, 55], so 41..55 would upscale the packed images
    assert colorize.main(tiny_args(pack, val, tmp_path / 'run', '--steps', '1')) == 0
    assert 'holds images resized to short side 40, below --short-side 32 55' in capsys.readouterr().out
    assert colorize.main(tiny_args(pack, val, tmp_path / 'run2', '--steps', '1', '--short-side', '32', '40')) == 0
    assert 'warning' not in capsys.readouterr().out


def test_pack_says_when_a_read_keeps_it_waiting(tmp_path, monkeypatch, capsys):
    root = tmp_path / 'src'
    for i in range(3):
        _write_rgb(root / f'{i}.jpg', _smooth_rgb(60, 90, i), fmt='JPEG')
    real_task = data._pack_task

    def slow(task):  # a file on a mount that takes its time to answer
        time.sleep(0.2)
        return real_task(task)

    monkeypatch.setattr(data, '_pack_task', slow)
    monkeypatch.setattr(data, 'STALL_WARNING_S', 0.05)  # lines at 0.05 and 0.1 s (0.2: late) of each 0.2 s read
    info = data.pack_images([root], tmp_path / 'pack', short_side=48, workers=1, task_size=2, log=_quiet)
    assert info['counts']['ok'] == 3
    said = capsys.readouterr().err.splitlines()
    assert len(said) >= 2 and all(line.startswith('no image decoded for ') and 'same command again' in line
                                  for line in said)


def test_pack_end_to_end_with_subset_and_loader(tmp_path):
    root, raw = tmp_path / 'src', tmp_path / 'raw'
    for i in range(12):
        _write_rgb(root / f'{i:02d}.jpg', _smooth_rgb(70 + 9 * i, 120, i), fmt='JPEG')
    raw_paths = [_write_rgb(raw / f'r{i}.png', _smooth_rgb(50, 60, 20 + i), fmt='PNG') for i in range(3)]
    pack = tmp_path / 'pack'
    data.main(['pack', '--data', str(root), '--out', str(pack), '--short-side', '64', '--workers', '2'])
    paths = data.find_images([pack, raw], log=_quiet)  # a pack and a folder together
    assert len(paths) == 15 and set(raw_paths) < set(paths)
    held = set(data.subset(paths, 4, seed=12345))  # colorize.py's holdout
    train = data.subset([p for p in paths if p not in held], 8, seed=0)
    assert len(train) == 8 and not held & set(train)
    # The same images as plain files holding the packed bytes decode to the same batches.
    reader = data.PackReader(pack)
    extracted = []
    for p in train:
        entry = data.packed_entry(p)
        if entry is None:
            extracted.append(p)
            continue
        out = tmp_path / 'extracted' / f'{entry[1]}.jpg'
        out.parent.mkdir(exist_ok=True)
        out.write_bytes(bytes(reader.jpeg(entry[1])))
        extracted.append(str(out))
    ds = data.ColorImages(train, crop=16, short_side_range=(20, 30))  # drafts the packed JPEGs
    ref = data.ColorImages(extracted, crop=16, short_side_range=(20, 30))
    sampler = data.InfiniteSampler(len(ds), batch_size=4, seed=3)
    batches = {}
    for name, dataset, workers in (('pack', ds, 0), ('pack, 2 workers', ds, 2), ('files', ref, 0)):
        it = iter(torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers))
        batches[name] = [next(it) for _ in range(3)]
        del it
    for name in ('pack, 2 workers', 'files'):
        for (x0, s0), (x1, s1) in zip(batches['pack'], batches[name]):
            assert torch.equal(x0, x1) and torch.equal(s0, s1), name
    # Neither the dataset nor a reader carries a memory map when pickled.
    assert len(pickle.dumps(ds)) < 4096
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.root == str(pack) and bytes(copy.jpeg(0)) == bytes(reader.jpeg(0))


def test_scan_writes_a_list_that_reads_back(tmp_path, capsys, monkeypatch):
    # `data.py scan --write LIST.txt`: the listing of a pack and a folder as a list that --data takes,
    # whole (the same images) or cut down by hand (exactly the kept lines).
    root, raw = tmp_path / 'src', tmp_path / 'raw folder'
    for i in range(5):
        _write_rgb(root / f'{i:02d}.jpg', _smooth_rgb(40, 50, i), fmt='JPEG')
    raw_paths = [_write_rgb(raw / f'caf\u00e9 {i}.png', _smooth_rgb(30, 40, 9 + i), fmt='PNG') for i in range(2)]
    pack = tmp_path / 'pack'
    data.main(['pack', '--data', str(root), '--out', str(pack), '--short-side', '32', '--workers', '1'])
    listed = tmp_path / 'lists' / 'all.txt'
    assert data.main(['scan', str(pack), '--data', str(raw), '--write', str(listed)]) == 0
    assert '7 images in total' in capsys.readouterr().out
    everything = data.find_images([pack, raw], log=_quiet)
    assert data.find_images([listed], log=_quiet) == everything
    lines = listed.read_text(encoding='utf-8').splitlines()
    assert len(lines) == 7 and all(os.path.isabs(line) for line in lines) and raw_paths[0] in lines
    part = tmp_path / 'part.txt'
    part.write_text('\n'.join(lines[:2] + lines[-1:]) + '\n', encoding='utf-8')
    assert data.find_images([part], log=_quiet) == sorted(lines[:2] + lines[-1:])
    assert any(data.packed_entry(p) for p in lines[:2])  # pack entries survive the trip
    with pytest.raises(SystemExit):
        data.main(['scan', str(raw), '--write', str(tmp_path / 'all.list')])
    assert 'must end in .txt' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        data.main(['scan'])
    assert 'give the folders or .txt lists to scan' in capsys.readouterr().err
    # demo --n-train -5 made a world of 0 training images that its marker called -5.
    with pytest.raises(SystemExit):
        data.main(['demo', '--root', str(tmp_path / 'demo'), '--n-train', '-5'])
    assert '--n-train -5: an image count is 0 or more' in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the bound: -1 is refused too
        data.main(['demo', '--root', str(tmp_path / 'demo'), '--n-val', '-1'])
    assert '--n-val -1: an image count is 0 or more' in capsys.readouterr().err
    assert not (tmp_path / 'demo').exists()
    # pack --workers 0 fell to the default, a process per core (a test here typed it for 'in this process').
    with pytest.raises(SystemExit):
        data.main(['pack', '--data', str(raw), '--out', str(tmp_path / 'p0'), '--short-side', '8', '--workers', '0'])
    assert '--workers 0: give 1 (decode in this process) or more' in capsys.readouterr().err
    assert not (tmp_path / 'p0').exists()
    with pytest.raises(ValueError, match='lines are stripped'):  # its line would name another file
        data.write_list(tmp_path / 'odd.txt', [str(raw / 'trailing space.png ')])
    # A relative path is written as the file it names from here, not from the list's folder.
    monkeypatch.chdir(raw)
    data.write_list(tmp_path / 'lists' / 'relative.txt', [os.path.basename(raw_paths[0])])
    assert data.find_images([tmp_path / 'lists' / 'relative.txt'], log=_quiet) == [raw_paths[0]]


def test_pack_paths_cannot_be_real_files_and_out_checks(tmp_path):
    # A real folder called index.npy is not a pack: its files are read as files.
    real = _write_rgb(tmp_path / 'photos' / 'index.npy' / '000000001' / 'a' / 'b.png', _smooth_rgb(20, 30, 0))
    assert data.packed_entry(real) is None
    assert data.load_rgb(real).shape == (20, 30, 3)
    # Nor is it a pack beside the folder it was made from: a run listing it with other files goes on.
    colorize.packed_twice(argparse.Namespace(resume=None), [real, str(tmp_path / 'photos' / 'c.png')], True)
    src = tmp_path / 'src'
    _write_rgb(src / 'x.jpg', fmt='JPEG')
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'notes.txt').write_text('mine')
    with pytest.raises(ValueError, match='not part of a pack'):
        data.pack_images([src], other, short_side=8, log=_quiet)
    assert os.listdir(other) == ['notes.txt']
    with pytest.raises(SystemExit):  # the CLI: a usage error, not a traceback
        data.main(['pack', '--data', str(src), '--out', str(src), '--short-side', '8'])
    # A second pack into a folder that one is writing would interleave their shards: refused.
    lock = data._lock_pack(str(tmp_path / 'busy'))
    try:
        with pytest.raises(ValueError, match=f'being written by pid {os.getpid()}'):
            data.pack_images([src], tmp_path / 'busy', short_side=8, workers=1, log=_quiet)
    finally:
        lock.close()
    assert data.pack_images([src], tmp_path / 'busy', short_side=8, workers=1, log=_quiet)['total'] == 1
    # A .txt list of packed images (a saved subset) reads like any list.
    listed = tmp_path / 'subset.txt'
    listed.write_text(data.find_images(tmp_path / 'busy', log=_quiet)[0] + '\n')
    assert data.load_rgb(data.find_images(listed, log=_quiet)[0]).shape[:2] == (6, 8)  # never upscaled


def test_pseudo_path_parts_splits_as_os_path_split_does_without_calling_it(monkeypatch):
    # packed_twice checks every listed path at each start: four os.path.split per pseudo-path took 12 s for a
    # 3.7M-image pack (on every rank); the shape is now read with one str.rsplit. Reference: the four splits.
    split = os.path.split

    def by_splits(path):
        rest, name = split(path)
        rest, folder = split(rest)
        head, digits = split(rest)
        root, index_name = split(head)
        ok = 'index.npy' in path and index_name == 'index.npy' and digits.isascii() and digits.isdigit()
        return (root, digits, folder, name) if ok else None

    normal = ['/p/pk/index.npy/000000012/n01440764/n01440764_1.JPEG', '//p/index.npy/7/_/x.jpg',
              'rel/index.npy/000000001/a/b.png', '/p/a b/index.npy/000000003/c d/é.jpg']
    odd = ['/index.npy/000000001/a/b.png', 'index.npy/1/a/b', '/p//index.npy/1/a/b', '/p/index.npy//1/a/b',
           '/p/index.npy/1/a/b/', '/p/index.npy/x1/a/b', '/p/index.npy/1/a', '/p/index.npyz/1/a/b', '/p/a/b.jpg',
           '/p/index.npy/١/a/b', '/p/q/index.npy/1/a/b/c']
    calls = []
    monkeypatch.setattr(os.path, 'split', lambda p: calls.append(p) or split(p))
    for path in normal + odd:
        assert data.pseudo_path_parts(path) == by_splits(path), path
    calls.clear()
    for path in normal:
        data.pseudo_path_parts(path)
    assert not calls


def test_pack_paths_are_joined_as_os_path_join_does_without_calling_it_per_image(tmp_path, monkeypatch):
    # A run lists a pack's pseudo-paths at each start on every rank: os.path.join and os.path.split per image
    # took 11 s for 3.7M images. A pack laid out by hand (its index and names; every image bad, so no shard
    # bytes), sources of every shape; reference: os.path.join of the folder and file names by os.path.split.
    sources = ['/top.jpg', '/a//b.png', 'rel/x.jpg', 'bare.jpg', '/p/a b/\udcff\udcfe.jpg', '/p/q/r/s.jpg']
    sources += [f'/data/n{k:08d}/n{k:08d}_{k}.JPEG' for k in range(50)]
    root = tmp_path / 'pack'
    root.mkdir()
    offsets, buffer = data._encode_strings(sources)
    (root / 'names.bin').write_bytes(buffer.tobytes())
    np.save(root / 'names-offsets.npy', offsets)
    index = np.zeros((len(sources), 5), np.int64)
    index[:, 3] = data.STATUS_BAD
    np.save(root / 'index.npy', index)
    (root / 'shard-00000.bin').write_bytes(b'')
    data.write_json(root / 'complete.json', dict(version=2, params=dict(roots=['/data'], short_side=8, quality=90),
                                                 total=len(sources), shards=[0], counts=dict(ok=0, bad=56, gray=0)))
    join, split = os.path.join, os.path.split
    expected = [join(str(root), 'index.npy', f'{i:09d}', os.path.basename(split(s)[0]) or '_', split(s)[1])
                for i, s in enumerate(sources)]
    calls = []
    monkeypatch.setattr(os.path, 'join', lambda *a: calls.append(a) or join(*a))
    monkeypatch.setattr(os.path, 'split', lambda p: calls.append(p) or split(p))
    found = data.pack_paths(root)
    assert found == expected
    assert len(calls) < 40, len(calls)  # opening the pack's files, and the odd sources: 56 images made 112 and more
    monkeypatch.undo()
    assert [data.packed_entry(p)[1] for p in found] == list(range(len(sources)))


def test_pack_pools_fork_except_on_macos(monkeypatch):
    # Python's own default start method: spawn on macOS since 3.8 (fork may crash in the system
    # libraries' threads there), fork on Linux before 3.14 (the pool avoids 3.14's forkserver: a
    # spawned worker imports torch). A forked pool starts its workers at once (SIGINT held back: see
    # test_ctrl_c_while_the_pack_starts_its_workers_is_not_lost); a spawned one on its first task.
    fork = 'fork' if 'fork' in torch.multiprocessing.get_all_start_methods() else 'spawn'  # (Windows: no fork)
    for platform, method in (('linux', fork), ('darwin', 'spawn')):
        monkeypatch.setattr(sys, 'platform', platform)
        pool = data._process_pool(1)
        try:
            assert pool._mp_context.get_start_method() == method, platform
        finally:
            pool.shutdown()


def test_pack_workers_exit_when_their_parent_is_killed(tmp_path):
    script = ("import sys, time; sys.path.insert(0, sys.argv[1]); import data, os\n"
              "data.PARENT_CHECK_S = 0.1\n"  # the workers look 10 times a second, not once (a test's time)
              "pool = data._process_pool(2)\n"
              "print(*sorted({pool.submit(os.getpid).result() for _ in range(8)}), flush=True)\n"
              "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, '-c', script, str(HERE)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert workers
    proc.kill()
    proc.wait()

    def alive(pid):
        if not os.path.isdir('/proc'):  # macOS: init (launchd) reaps an orphan as it exits
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return True
        try:
            with open(f'/proc/{pid}/stat') as f:
                return f.read().rsplit(')', 1)[1].split()[0] != 'Z'  # a zombie has exited
        except FileNotFoundError:
            return False
    deadline = time.time() + 10
    while any(map(alive, workers)) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(map(alive, workers))


def test_find_images_skips_folders_it_cannot_list(tmp_path, monkeypatch):
    for name in ('a', 'lost+found', 'z'):
        _write_rgb(tmp_path / 'disk' / name / 'x.png')
    scandir = os.scandir

    def denied(path):
        if os.path.basename(path) == 'lost+found':
            raise PermissionError(13, 'Permission denied', path)
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', denied)
    lines = []
    found = data.find_images(tmp_path / 'disk', cache_dir=tmp_path / 'cache', log=lines.append)
    assert [os.path.basename(os.path.dirname(p)) for p in found] == ['a', 'z']
    assert 'skipped 1 folder(s)' in lines[0] and 'lost+found' in lines[0] and 'not caching' in lines[1]
    monkeypatch.setattr(os, 'scandir', scandir)  # permissions fixed: the folder's images come back
    assert len(data.find_images(tmp_path / 'disk', cache_dir=tmp_path / 'cache', log=_quiet)) == 3
    monkeypatch.setattr(os, 'scandir', lambda path: denied(os.path.join(path, 'lost+found')))
    with pytest.raises(ValueError, match='cannot be listed'):
        data.find_images(tmp_path / 'disk', log=_quiet)

    def removed(path):  # a folder deleted while the scan runs: skipped like one it may not list
        if os.path.basename(path) == 'z':
            raise FileNotFoundError(2, 'No such file or directory', path)
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', removed)
    lines = []
    assert len(data.find_images(tmp_path / 'disk', log=lines.append)) == 2 and 'skipped 1 folder(s)' in lines[0]


# ================================================================================================
# colorize.py: training, resume, DDP, benchmark, colorizing, errors
# ================================================================================================

HERE = Path(__file__).resolve().parent


def _write_images(folder, n, seed, size=48):
    """n colour images of random coloured blocks (smooth enough to colourize) as JPEG and PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        blocks = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(blocks).resize((size, size + 8 * (i % 3)), Image.BILINEAR)
        img.save(folder / (f'img{i:03d}.jpg' if i % 2 else f'img{i:03d}.PNG'))
    return folder


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('images')
    return _write_images(root / 'train' / 'n0001', 24, 0), _write_images(root / 'val', 6, 1)


def tiny_args(train, val, out, *extra):
    return ['-a', 'vgg16', '--data', str(train), '--val-data', str(val), '--out', str(out),
            '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '4', '--points', '16',
            '--border', '4', '--workers', '0', '--device', 'cpu', '--log-every', '2', '--eval-every', '100',
            *extra]


def bench_args(train, out, *extra):
    """tiny_args without the flags that --benchmark does not read (and refuses): --val-data, --log-every,
    --eval-every."""
    argv = tiny_args(train, None, out, *extra)
    for flag in ('--val-data', '--log-every', '--eval-every'):
        i = argv.index(flag)
        del argv[i:i + 2]
    return argv


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_weights(a, b):
    assert a['step'] == b['step']
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


# --- colorize.py: training ---------------------------------------------------------------------

def test_training_stops_when_the_loss_diverges(folders, voc, tmp_path, capsys, monkeypatch):
    """A NaN loss ends the run (status 2) at the next progress line or checkpoint, whichever comes
    first, and no checkpoint holds a step after it; before, the run printed nan to the end, saved
    NaN weights and (fine-tuning) scored argmax over NaN logits."""
    train, val = folders
    calls = []

    def nan_from_third(step):
        def wrapped(*a, **k):
            calls.append(1)
            total, parts = step(*a, **k)
            return (total * float('nan'), parts) if len(calls) >= 3 else (total, parts)
        return wrapped

    real_train_step = colorize.train_step
    monkeypatch.setattr(colorize, 'train_step', nan_from_third(real_train_step))
    out = tmp_path / 'run'  # progress lines at 2, 4; checkpoints at 3, 6: the one at 3 meets it
    assert colorize.main(tiny_args(train, val, out, '--steps', '6', '--save-every', '3')) == 2
    err = capsys.readouterr().err
    assert 'training loss is nan at step 3' in err and 'diverged' in err
    assert not (out / 'checkpoint.pt').exists()
    calls.clear()
    # An evaluation at that step (before the checkpoint) neither scores nor draws the NaN weights.
    out = tmp_path / 'run-eval'
    assert colorize.main(tiny_args(train, val, out, '--steps', '6', '--save-every', '3', '--eval-every', '3')) == 2
    said = capsys.readouterr()
    assert 'training loss is nan at step 3' in said.err and 'eval step 3' not in said.out
    assert [e['step'] for e in map(json.loads, (out / 'log.jsonl').read_text().splitlines()) if e.get('eval')] == [0]
    assert (out / 'samples' / 'step_0000000.png').exists() and not (out / 'samples' / 'step_0000003.png').exists()
    assert not (out / 'checkpoint.pt').exists()
    calls.clear()

    def nan_weights_after_third(step):  # step 3's loss is finite; the weights it leaves are not
        def wrapped(model, *a, **k):
            calls.append(1)
            result = step(model, *a, **k)
            if len(calls) == 3:
                with torch.no_grad():
                    for p in model.parameters():
                        p.fill_(float('nan'))
            return result
        return wrapped

    # The evaluation at step 3, where no checkpoint is due, scores those NaN weights (the loss of step 4 stops
    # the run): log.jsonl holds null there, strict JSON (NaN, which json.dumps writes, is no JSON: jq and
    # JavaScript refuse the file).
    monkeypatch.setattr(colorize, 'train_step', nan_weights_after_third(real_train_step))
    out = tmp_path / 'run-nan-eval'
    assert colorize.main(tiny_args(train, val, out, '--steps', '6', '--eval-every', '3', '--save-every', '6')) == 2
    assert 'training loss is nan at step 4' in capsys.readouterr().err

    def refuse(constant):
        raise ValueError(f'{constant} is not JSON')
    log = [json.loads(line, parse_constant=refuse) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert [(e['step'], e['loss']) for e in log if e.get('eval')][1] == (3, None)
    # So does any JSON file the scripts write (any metric that is not finite, say).
    data.write_json(tmp_path / 'x.json', dict(lr=float('nan'), parts=[float('inf'), 0.5], m={'a': (-float('inf'),)}))
    assert json.loads((tmp_path / 'x.json').read_text(), parse_constant=refuse) == dict(lr=None, parts=[None, 0.5],
                                                                                      m={'a': [None]})
    calls.clear()

    def finite(state):
        return all(torch.isfinite(v).all() for v in state['model'].values() if v.is_floating_point())

    # A checkpoint at the step that made the weights NaN (its loss still finite) is not written: the one of
    # step 2 stays. Before, checkpoint.pt and the kept copy held NaN weights, and the run either ended as done
    # (step 3 the last) or stopped at the next step's loss, saying that no checkpoint was written after it.
    out = tmp_path / 'run-nan-save'  # checkpoints at 2 and 3 (the last, and one to keep)
    assert colorize.main(tiny_args(train, val, out, '--steps', '3', '--save-every', '2', '--keep-every', '3')) == 2
    err = capsys.readouterr().err
    assert 'the weights are no longer finite after step 3' in err and 'diverged' in err and '--lr' in err
    assert f'{out / "checkpoint.pt"} still holds step 2' in err and err.count('\n') == 1
    assert [p.name for p in out.glob('*.pt')] == ['checkpoint.pt']
    assert _state(out / 'checkpoint.pt')['step'] == 2 and finite(_state(out / 'checkpoint.pt'))
    calls.clear()

    def nan_loss(loss_fn):
        def wrapped(*a, **k):
            calls.append(1)
            loss = loss_fn(*a, **k)
            return loss * float('nan') if len(calls) >= 3 else loss
        return wrapped

    monkeypatch.setattr(ft, 'train_loss', nan_loss(ft.train_loss))
    out = tmp_path / 'ft'  # progress lines at every step, checkpoints at 2 and 4: the line at 3 meets it
    assert ft.main(['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(out), '--steps', '4',
                    '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2', '--workers', '0',
                    '--log-every', '1', '--save-every', '2', '--test-crops', '1']) == 2
    err = capsys.readouterr().err
    assert 'training loss is nan at step 3' in err
    assert _state(out / 'checkpoint.pt')['step'] == 2
    assert not (out / 'results.json').exists()
    calls.clear()
    # No progress line before the checkpoint at 4: the NaN of step 3 is met in the checkpoint's window, and
    # the checkpoint of step 2 stays as it was; the run goes on from it with --resume (here without the NaN).
    out = tmp_path / 'ft-window'
    argv = ['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(out), '--steps', '6', '--width',
            '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2', '--workers', '0', '--log-every', '6',
            '--save-every', '2', '--test-crops', '1']
    assert ft.main(argv) == 2
    err = capsys.readouterr().err
    assert 'training loss is nan at step 4 (over the steps since the last check)' in err
    assert 'no checkpoint was written after it' in err and err.count('\n') == 1
    assert _state(out / 'checkpoint.pt')['step'] == 2 and finite(_state(out / 'checkpoint.pt'))
    assert len(calls) == 4 and not (out / 'results.json').exists()
    monkeypatch.undo()
    assert ft.main([*argv, '--resume']) == 0
    assert 'resumed from' in capsys.readouterr().out
    assert _state(out / 'checkpoint.pt')['step'] == 6 and (out / 'results.json').exists()
    calls.clear()

    def nan_after_third_update(update):  # as nan_weights_after_third: the loss of step 3 is finite
        def wrapped(optimizer, *a, **k):
            calls.append(1)
            result = update(optimizer, *a, **k)
            if len(calls) == 3:
                with torch.no_grad():
                    for group in optimizer.param_groups:
                        for p in group['params']:
                            p.fill_(float('nan'))
            return result
        return wrapped

    monkeypatch.setattr(torch.optim.SGD, 'step', nan_after_third_update(torch.optim.SGD.step))
    out = tmp_path / 'ft-nan-save'  # checkpoints at 2 and 3 (--exit-after, as a SIGTERM's); progress lines at 4
    assert ft.main(['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(out), '--steps', '4',
                    '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2', '--workers', '0',
                    '--log-every', '4', '--save-every', '2', '--exit-after', '3', '--test-crops', '1']) == 2
    err = capsys.readouterr().err
    assert 'the weights are no longer finite after step 3' in err and f'{out / "checkpoint.pt"} still holds step 2' in err
    assert _state(out / 'checkpoint.pt')['step'] == 2 and finite(_state(out / 'checkpoint.pt'))
    monkeypatch.undo()

    # What it checks: parameters, buffers (BatchNorm's running statistics) and the optimizer's state.
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(4, 2)).sum().backward()
    optimizer.step()
    assert colorize.nonfinite_weights(model, optimizer, 5, 0.1, None, None) is None
    for tensor, name in [(model[1].running_var, '1.running_var'), (model[0].bias, '0.bias'),
                         (optimizer.state[model[0].weight]['momentum_buffer'], '0.weight (momentum_buffer)')]:
        with torch.no_grad():
            kept = tensor.clone()
            tensor.view(-1)[0] = float('inf')
            problem = colorize.nonfinite_weights(model, optimizer, 5, 0.1, None, None)
            assert problem.startswith(f'the weights are no longer finite after step 5 ({name} holds')
            assert 'no checkpoint was written' in problem
            tensor.copy_(kept)



def test_training_writes_run_folder_and_learns(folders, tmp_path, capsys):
    train, val = folders
    out = tmp_path / 'run'
    # lr 0.02: 0.05 is unstable at this size, so whether the loss fell depended on float rounding
    assert colorize.main(tiny_args(train, val, out, '--steps', '12', '--lr', '0.02', '--eval-every', '12')) == 0
    printed = capsys.readouterr().out
    assert 'step 12/12' in printed and 'eval step 12' in printed
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    evals = [e for e in log if e.get('eval')]
    assert [e['step'] for e in evals] == [0, 12]
    assert evals[-1]['loss'] < evals[0]['loss'] - 0.3  # the head at least learns the colour statistics
    assert {'loss', 'chroma', 'hue', 'lr', 'img_per_s'} <= set(log[1])
    run = json.loads((out / 'run.json').read_text())
    assert run['torch'] == torch.__version__ and run['args']['arch'] == 'vgg16'
    with Image.open(out / 'samples' / 'step_0000012.png') as grid:
        assert grid.size == (3 * 32, 6 * 32)  # gray | prediction | truth, one row per held-out image
    ckpt = _state(out / 'checkpoint.pt')
    assert ckpt['step'] == 12 and ckpt['config']['arch'] == 'vgg16'
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    assert not list(out.glob('*.tmp*'))


def test_lightness_weight_applies_to_the_validation_loss_too(folders, tmp_path, monkeypatch):
    train, val = folders
    seen, color_loss = [], lab.color_loss
    monkeypatch.setattr(lab, 'color_loss', lambda *a, **k: seen.append(k.get('use_lightness_weight')) or color_loss(*a, **k))
    assert colorize.main(tiny_args(train, val, tmp_path / 'run', '--steps', '2', '--eval-every', '2',
                                   '--lightness-weight')) == 0
    assert len(seen) >= 4 and all(seen)  # 2 training steps, evaluations at steps 0 and 2: same weighting


def test_each_step_trains_at_its_own_learning_rate(folders, tmp_path, monkeypatch):
    """The optimizer holds lr_at(step) during step `step`: --lr 0.02, --warmup 2, a milestone at half of 3 steps
    give 0.01, 0.02, then 0.002, by hand. Setting the next step's rate (one step early: 0.02, 0.002, 0.002)
    passed every test: test_lr_schedule_by_hand reads lr_at, the log line its own lr_at(step - 1)."""
    train, val = folders
    rates, step = [], colorize.train_step
    monkeypatch.setattr(colorize, 'train_step',
                        lambda model, opt, *a: rates.append([g['lr'] for g in opt.param_groups]) or step(model, opt, *a))
    assert colorize.main(tiny_args(train, val, tmp_path / 'run', '--steps', '3', '--lr', '0.02', '--warmup', '2',
                                   '--lr-milestones', '0.5')) == 0
    assert rates == [[pytest.approx(0.01)] * 2, [pytest.approx(0.02)] * 2, [pytest.approx(0.002)] * 2]


def test_a_file_name_that_is_not_utf8_trains_like_any_other(folders, tmp_path, monkeypatch):
    """Old cameras and archives write Latin-1 names; Python keeps their bytes as surrogate escapes."""
    train, val = folders
    odd = tmp_path / 'odd'
    shutil.copytree(train, odd)
    name = os.fsdecode(b'caf\xe9.jpg')
    try:
        shutil.copy(odd / 'img001.jpg', odd / name)
    except (OSError, UnicodeError):
        pytest.skip('this file system takes UTF-8 names only')
    assert colorize.main(tiny_args(odd, val, tmp_path / 'run', '--steps', '2')) == 0
    assert _state(tmp_path / 'run' / 'checkpoint.pt')['data']['images']['count'] == 25
    assert colorize.main(tiny_args(odd, val, tmp_path / 'run', '--steps', '3', '--resume')) == 0  # cache read back
    # The same name in a .txt list (written as its bytes, as `ls > list.txt` does).
    (tmp_path / 'list.txt').write_bytes(b'odd/img002.PNG\nodd/caf\xe9.jpg\n')
    assert data.find_images(tmp_path / 'list.txt', log=_quiet) == sorted([str(odd / 'img002.PNG'), str(odd / name)])
    # Printed, such a path needs a stdout that takes surrogates: Python's default under a UTF-8
    # locale (outside UTF-8 mode) is strict, which PYTHONIOENCODING=utf-8 reproduces on any machine.
    latin = tmp_path / os.fsdecode(b'caf\xe9')
    shutil.copytree(train, latin)
    raw = io.BytesIO()
    monkeypatch.setattr(sys, 'stdout', io.TextIOWrapper(raw, encoding='utf-8', errors='strict'))
    data.main(['scan', str(latin)])
    sys.stdout.flush()
    assert b'caf\\udce9' in raw.getvalue()


def test_resume_from_another_folder_finds_the_same_data(folders, tmp_path, monkeypatch, capsys):
    """Path flags are saved absolute: a relative --data typed in one folder is found again by a
    --resume from another, and typing the absolute spelling is not "another --data"."""
    train, val = folders
    monkeypatch.chdir(tmp_path)
    rel = [os.path.relpath(train), os.path.relpath(val)]
    argv = tiny_args(*rel, tmp_path / 'run', '--steps', '2')
    assert colorize.main(argv) == 0
    assert _state(tmp_path / 'run' / 'checkpoint.pt')['args']['data'] == [str(train)]
    (tmp_path / 'elsewhere').mkdir()
    monkeypatch.chdir(tmp_path / 'elsewhere')
    capsys.readouterr()
    assert colorize.main(['--out', str(tmp_path / 'run'), '--resume', '--steps', '3', '--data', str(train),
                          '--device', 'cpu', '--workers', '0']) == 0
    out = capsys.readouterr()
    assert 'training images changed' not in out.err + out.out and 'step 3/3' in out.out


def test_resume_keeps_the_held_out_images_when_images_were_added(folders, tmp_path, capsys):
    """The --holdout choice is a function of the whole listing: one image added to --data (a dataset
    still being copied) had swapped most of the validation set, and put the old one into training."""
    train, _ = folders
    own = tmp_path / 'data'
    shutil.copytree(train, own)
    argv = tiny_args(own, own, tmp_path / 'run', '--holdout', '4')
    argv[argv.index('--val-data'):argv.index('--val-data') + 2] = []  # hold out from --data
    assert colorize.main(argv + ['--steps', '1']) == 0
    held = _state(tmp_path / 'run' / 'checkpoint.pt')['data']['held_out']
    assert len(held) == 4 and all(p.startswith(str(own)) for p in held)
    for i in range(40):  # enough new images that a fresh choice would (almost surely) differ
        shutil.copy(own / 'img001.jpg', own / f'new{i:02d}.jpg')
    args = argparse.Namespace(data=[str(own)], val_data=None, holdout=4, out=tmp_path / 'run', short_side=[32, 55],
                              objective='colorize', classes=None)
    assert colorize.image_sources(args, True)[1] != held
    os.remove(held[0])  # and one of them is gone
    capsys.readouterr()
    assert colorize.main(['--out', str(tmp_path / 'run'), '--resume', '--steps', '2']) == 0
    out = capsys.readouterr().out
    assert 'training images changed' in out and '1 of the run\'s 4 held-out images are no longer' in out
    assert '3 held-out' in out
    assert _state(tmp_path / 'run' / 'checkpoint.pt')['data']['held_out'] == held[1:]
    for path in held[1:]:  # all of them gone: a new choice (run flags cannot change on resume)
        os.remove(path)
    assert colorize.main(['--out', str(tmp_path / 'run'), '--resume', '--steps', '3']) == 0
    assert 'it validates on a new choice' in capsys.readouterr().out
    assert len(set(_state(tmp_path / 'run' / 'checkpoint.pt')['data']['held_out']) - set(held)) == 4
    # A checkpoint written before 996eedb records neither list: a changed --data cannot be noticed,
    # so the resume says that it cannot tell (it had gone on in silence, the held-out images swapped).
    ckpt = _state(tmp_path / 'run' / 'checkpoint.pt')
    ckpt['data'] = dict(seed=ckpt['data']['seed'], step=ckpt['data']['step'])
    torch.save(ckpt, tmp_path / 'run' / 'checkpoint.pt')
    assert colorize.main(['--out', str(tmp_path / 'run'), '--resume', '--steps', '4']) == 0
    out = capsys.readouterr().out
    assert out.count('does not record its training images') == 1 and 'held-out' in out


def test_resume_after_exit_is_exact(folders, tmp_path):
    train, val = folders
    common = ['--steps', '6', '--save-every', '3', '--lr', '0.02']
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', *common)) == 0
    assert colorize.main(tiny_args(train, val, tmp_path / 'b', *common, '--exit-after', '3')) == 0
    assert _state(tmp_path / 'b' / 'checkpoint.pt')['step'] == 3
    assert colorize.main(tiny_args(train, val, tmp_path / 'b', *common, '--resume')) == 0
    a, b = _state(tmp_path / 'a' / 'checkpoint.pt'), _state(tmp_path / 'b' / 'checkpoint.pt')
    _assert_same_weights(a, b)
    for x, y in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(x['momentum_buffer'], y['momentum_buffer'])


def test_resume_into_another_folder_forks_the_run(folders, tmp_path, capsys):
    """--resume CKPT --out NEW goes on in NEW with the run's log and run.json; CKPT's folder stays."""
    train, val = folders
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', '--steps', '2', '--log-every', '1')) == 0
    before = (tmp_path / 'a' / 'checkpoint.pt').read_bytes(), (tmp_path / 'a' / 'log.jsonl').read_text()
    ckpt = str(tmp_path / 'a' / 'checkpoint.pt')
    assert colorize.main(['--resume', ckpt, '--out', str(tmp_path / 'b'), '--steps', '3', '--workers', '0']) == 0
    assert _state(tmp_path / 'b' / 'checkpoint.pt')['step'] == 3
    assert [json.loads(line)['step'] for line in (tmp_path / 'b' / 'log.jsonl').read_text().splitlines()
            if '"eval"' not in line] == [1, 2, 3]
    assert [r['step'] for r in json.loads((tmp_path / 'b' / 'run.json').read_text())['resumed']] == [2]
    assert ((tmp_path / 'a' / 'checkpoint.pt').read_bytes(), (tmp_path / 'a' / 'log.jsonl').read_text()) == before
    # Nothing left to train: the final state is where it was, and the last line says so.
    capsys.readouterr()
    assert colorize.main(['--resume', ckpt, '--out', str(tmp_path / 'c'), '--workers', '0']) == 0
    assert f'checkpoint {ckpt}' in capsys.readouterr().out and not (tmp_path / 'c' / 'checkpoint.pt').exists()


def test_resume_note_names_the_commit_that_trained_the_steps_before(tmp_path, capsys, monkeypatch):
    # run.json of a run started by commit a (steps 0..4) and resumed at 4 by commit b; resumed now, by b,
    # from its kept checkpoint of step 2 in place: steps 1..2 ran commit a.
    a, b = 'a' * 40, 'b' * 40
    (tmp_path / 'run.json').write_text(json.dumps(dict(started='t0', git_commit=a, resumed=[dict(step=4, git_commit=b)])))
    monkeypatch.setattr(colorize, 'git_commit', lambda: b)
    args = argparse.Namespace(out=tmp_path)
    colorize.write_run_info(args, torch.device('cpu'), 1, 1, 1, resumed_at=2)
    assert f'the steps before 2 ran commit {a[:12]}, this is {b[:12]}' in capsys.readouterr().out
    colorize.write_run_info(args, torch.device('cpu'), 1, 1, 1, resumed_at=5)  # after b's resumption: no note
    assert 'note:' not in capsys.readouterr().out
    info = json.loads((tmp_path / 'run.json').read_text())
    assert info['git_commit'] == a and [p['step'] for p in info['resumed']] == [4, 2, 5]
    # The same commit with uncommitted edits: the note names both, which it printed as one ('ran bbbb, this is bbbb')
    colorize.note_other_commit(b, b + '-dirty', 7)
    assert f'the steps before 7 ran commit {b[:12]}, this is {b[:12]}-dirty:' in capsys.readouterr().out


def test_resume_with_a_run_json_edited_by_hand_warns_and_writes_it_anew(tmp_path, capsys):
    # A run.json that held a JSON list (or a "resumed" that is no list) made the resume an AttributeError or
    # TypeError traceback; one cut short was replaced without a word.
    args = argparse.Namespace(out=tmp_path)
    for text, why in [('[1, 2]', 'not the object this script writes'), ('{"resumed": 3}', 'not the object'),
                      ('{"started": "t0", "git', 'not JSON')]:
        (tmp_path / 'run.json').write_text(text)
        colorize.write_run_info(args, torch.device('cpu'), 1, 1, 1, resumed_at=2)
        err = capsys.readouterr().err
        assert f'warning: {tmp_path / "run.json"} is {why}' in err and 'written anew' in err, (text, err)
        assert [p['step'] for p in json.loads((tmp_path / 'run.json').read_text())['resumed']] == [2]
    # A part of "resumed" that is no object, or whose step is no count, is dropped (tracebacks at p.get and at
    # the comparison of steps), the rest kept.
    (tmp_path / 'run.json').write_text('{"started": "t0", "step": "0", "resumed": [3, {"step": 1}, {"step": "4"}]}')
    colorize.write_run_info(args, torch.device('cpu'), 1, 1, 1, resumed_at=2)
    info = json.loads((tmp_path / 'run.json').read_text())
    assert info['started'] == 't0' and [p['step'] for p in info['resumed']] == [1, 2]


def test_resume_takes_the_run_from_the_checkpoint(folders, tmp_path, capsys, monkeypatch):
    """`--out DIR --resume` alone continues the run as it was started (its data, network and
    schedule), not the demo world with default settings; contradicting flags are refused."""
    train, val = folders
    common = ['--steps', '6', '--save-every', '3', '--lr', '0.02', '--seed', '3']
    # A run killed before its first checkpoint left a log: a fresh run starts a fresh one.
    (tmp_path / 'a').mkdir()
    (tmp_path / 'a' / 'log.jsonl').write_text(json.dumps(dict(step=99, loss=1.0)) + '\n')
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', *common)) == 0
    assert 99 not in [json.loads(line)['step'] for line in (tmp_path / 'a' / 'log.jsonl').read_text().splitlines()]
    assert colorize.main(tiny_args(train, val, tmp_path / 'b', *common, '--exit-after', '3')) == 0
    capsys.readouterr()
    # The killed run had logged beyond its checkpoint, the last line cut off mid-write.
    with open(tmp_path / 'b' / 'log.jsonl', 'a') as f:
        f.write(json.dumps(dict(step=4, loss=9.0)) + '\n{"step": 5, "lo')
    # Started by an older commit and torch (a git pull before the resume): run.json keeps them.
    first = json.loads((tmp_path / 'b' / 'run.json').read_text())
    (tmp_path / 'b' / 'run.json').write_text(json.dumps({**first, 'git_commit': 'c0ffee', 'torch': '2.4.1'}))
    assert colorize.main(['--out', str(tmp_path / 'b'), '--resume', '--device', 'cpu', '--workers', '0']) == 0
    printed = capsys.readouterr().out
    assert 'demo world' not in printed and 'resumed from' in printed and 'step 6/6' in printed
    assert printed.count('steps before 3 ran commit c0ffee, this is ') == (colorize.git_commit() is not None)
    _assert_same_weights(_state(tmp_path / 'a' / 'checkpoint.pt'), _state(tmp_path / 'b' / 'checkpoint.pt'))
    assert _state(tmp_path / 'b' / 'checkpoint.pt')['args']['data'] == [str(train)]
    log = [json.loads(line) for line in (tmp_path / 'b' / 'log.jsonl').read_text().splitlines()]
    assert [e['step'] for e in log if not e.get('eval')] == [2, 4, 6] and 9.0 not in [e['loss'] for e in log]
    # The line at step 4 averages steps 3 and 4, across the checkpoint at 3, as in the run never stopped.
    uncut = [json.loads(line) for line in (tmp_path / 'a' / 'log.jsonl').read_text().splitlines()]
    assert [e['loss'] for e in log if not e.get('eval')] == [e['loss'] for e in uncut if not e.get('eval')]
    run = json.loads((tmp_path / 'b' / 'run.json').read_text())
    assert [r['step'] for r in run['resumed']] == [3] and run['started'] <= run['resumed'][0]['time']
    assert (run['git_commit'], run['torch']) == ('c0ffee', '2.4.1')
    assert (run['resumed'][0]['git_commit'], run['resumed'][0]['torch']) == (colorize.git_commit(), torch.__version__)

    resume = ['--out', str(tmp_path / 'b'), '--resume', '--device', 'cpu', '--workers', '0']
    assert colorize.main([*resume, '--seed', '4']) == 2  # another data order: refused
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'was trained with --seed 3' in err
    assert colorize.main([*resume, '--crop', '48']) == 2
    assert 'was trained with --crop 32' in capsys.readouterr().err
    assert colorize.main([*resume, '--seed', '0']) == 2  # typed, though it is the flag's default
    assert 'was trained with --seed 3' in capsys.readouterr().err
    assert colorize.main([*resume, '--steps', '5']) == 2  # ends before the checkpoint's step 6
    assert 'is at step 6: --steps 5 would end before' in capsys.readouterr().err
    assert colorize.main([*resume, '--steps', '8']) == 0  # a longer schedule is allowed, and said
    printed = capsys.readouterr().out
    assert 'resuming with --steps 8' in printed and 'step 8/8' in printed
    # --resume CKPT continues in CKPT's folder (not the default --out), and refuses an --out that
    # holds another run.
    monkeypatch.setattr(colorize, 'default_out', lambda args: tmp_path / 'default')
    ckpt_b, before = tmp_path / 'b' / 'checkpoint.pt', (tmp_path / 'a' / 'checkpoint.pt').read_bytes()
    assert colorize.main(['--resume', str(ckpt_b), '--out', str(tmp_path / 'a'), '--device', 'cpu']) == 2
    assert 'holds another run' in capsys.readouterr().err and (tmp_path / 'a' / 'checkpoint.pt').read_bytes() == before
    assert colorize.main(['--resume', str(ckpt_b), '--steps', '9', '--device', 'cpu', '--workers', '0']) == 0
    assert _state(ckpt_b)['step'] == 9 and not (tmp_path / 'default').exists()
    ckpt = _state(tmp_path / 'b' / 'checkpoint.pt')
    ckpt['world'] = 2
    torch.save(ckpt, tmp_path / 'b' / 'checkpoint.pt')
    assert colorize.main([*resume, '--steps', '10']) == 2
    assert 'trained by 2 processes' in capsys.readouterr().err


def test_resume_after_sigkill_is_exact(folders, tmp_path):
    """Kill a run at an arbitrary moment (checkpoints every step), resume: same weights."""
    train, val = folders
    common = ['--steps', '8', '--save-every', '1', '--lr', '0.02']
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', *common)) == 0
    out = tmp_path / 'b'
    # Same thread count as this process: float reductions may round differently with another.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen([sys.executable, str(HERE / 'colorize.py'), *tiny_args(train, val, out, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    while not (out / 'checkpoint.pt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed, not finished before the signal came
    assert (out / 'checkpoint.pt').exists()
    killed_at = _state(out / 'checkpoint.pt')['step']
    # Killed mid-run, from a checkpoint of --save-every 1 (not the final one of step 8: resuming
    # that would test nothing, and a run that wrote no periodic checkpoint at all would pass).
    assert 1 <= killed_at < 8, killed_at
    assert colorize.main(tiny_args(train, val, out, *common, '--resume')) == 0
    _assert_same_weights(_state(tmp_path / 'a' / 'checkpoint.pt'), _state(out / 'checkpoint.pt'))


@contextlib.contextmanager
def _counted(sig):
    """A handler of `sig` for the block that counts the signals it gets (a run that set none would
    otherwise be killed, with pytest); asserts that the run put it back."""
    caught = []

    def count(*_):
        caught.append(sig)
    before = signal.signal(sig, count)
    try:
        yield caught
        assert signal.getsignal(sig) is count
    finally:
        signal.signal(sig, before)


def _signal_at_call(fn, call, sig):
    """`fn`, sending this process `sig` during its `call`-th call (counted from 1); its attribute
    `calls` lists one 1 per call so far."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            os.kill(os.getpid(), sig)
        return fn(*args, **kwargs)
    wrapped.calls = calls
    return wrapped


def test_sigterm_saves_the_step_and_stops_and_the_resume_is_exact(folders, tmp_path, monkeypatch, capsys):
    train, val = folders
    common = ['--steps', '8', '--lr', '0.02']  # checkpoints at the end only (--save-every = --eval-every 100)
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', *common)) == 0
    out = tmp_path / 'b'
    monkeypatch.setattr(colorize, 'train_step', _signal_at_call(colorize.train_step, 3, signal.SIGTERM))
    capsys.readouterr()
    with _counted(signal.SIGTERM) as caught:
        assert colorize.main(tiny_args(train, val, out, *common)) == 128 + signal.SIGTERM
    assert caught == []  # the run's own handler got it
    assert capsys.readouterr().err == (f'stopped at step 3 by SIGTERM: {out / "checkpoint.pt"} holds it; '
                                       f'continue with --resume --out {out}\n')
    assert _state(out / 'checkpoint.pt')['step'] == 3  # saved there, not at a --save-every step
    monkeypatch.undo()
    assert colorize.main(tiny_args(train, val, out, *common, '--resume')) == 0
    _assert_same_weights(_state(tmp_path / 'a' / 'checkpoint.pt'), _state(out / 'checkpoint.pt'))
    assert (tmp_path / 'a' / 'log.jsonl').read_text().count('"img_per_s"') == 4  # steps 2, 4, 6, 8
    losses = [[json.loads(line).get('loss') for line in (tmp_path / r / 'log.jsonl').read_text().splitlines()]
              for r in 'ab']
    assert losses[0] == losses[1]  # the line at step 4 spans the stop at 3, as in the run never stopped


def test_a_signal_at_the_last_step_ends_the_run_as_usual(folders, tmp_path, monkeypatch, capsys):
    # The last step's checkpoint is the run's end: a stop there is no stop (exit 0, 'done:'), as
    # under DDP (test_a_rank_waiting_for_rank_0_after_the_loop_is_not_killed_by_a_signal).
    train, val = folders
    monkeypatch.setattr(colorize, 'train_step', _signal_at_call(colorize.train_step, 3, signal.SIGTERM))
    with _counted(signal.SIGTERM) as caught:
        assert colorize.main(tiny_args(train, val, tmp_path / 'run', '--steps', '3')) == 0
    captured = capsys.readouterr()
    assert caught == [] and 'done: step 3' in captured.out and 'stopped' not in captured.err
    assert _state(tmp_path / 'run' / 'checkpoint.pt')['step'] == 3


def test_a_repeated_signal_keeps_the_first_one(monkeypatch):
    # torchrun passes on the scheduler's SIGTERM right after SLURM's --signal SIGUSR1 (say): the run
    # stops by the first; one process reads its flag at every step.
    with _counted(signal.SIGTERM), _counted(signal.SIGUSR1):
        with colorize.StopSignals(torch.device('cpu')) as stop:
            assert not stop.agreed(1)
            os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.agreed(2) and stop.signum == signal.SIGUSR1


def test_the_ranks_stop_by_the_highest_signal_number_not_their_sum(monkeypatch):
    # Every rank got SIGTERM (a scheduler signals them all): they stop by SIGTERM, an all-reduce MAX
    # of their signal numbers (a SUM would be 30, SIGPWR). In-process: the other rank's flag by hand.
    import torch.distributed as dist
    other = torch.tensor([int(signal.SIGTERM)], dtype=torch.int32)
    reduce = {dist.ReduceOp.MAX: torch.maximum, dist.ReduceOp.SUM: torch.add}
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'all_reduce', lambda flag, op: flag.copy_(reduce[op](flag, other)))
    every = colorize.STOP_CHECK_EVERY
    stop = colorize.StopSignals(torch.device('cpu'))
    stop.signum = signal.SIGTERM
    assert not stop.agreed(every) and stop.agreed(2 * every) and stop.signum == signal.SIGTERM
    stop = colorize.StopSignals(torch.device('cpu'))  # this rank SIGUSR1, the other SIGTERM: the higher
    stop.signum = signal.SIGUSR1
    assert not stop.agreed(every) and stop.agreed(2 * every) and stop.signum == signal.SIGTERM


def test_loader_workers_outlive_a_stop_signal_and_never_keep_the_process_from_exiting(folders):
    # One process (each costs seconds), a training loader (colorize.make_loader, two workers) made
    # three times in turn:
    # - twice with SIGTERM to the whole process group at batch 3, the workers started by fork and
    #   by a forkserver. A scheduler (SLURM at a time limit, scancel) signals every process of the
    #   job: the workers must not die of it (the run would end in a traceback, unsaved), as a rank
    #   under DDP reads up to 2 x STOP_CHECK_EVERY batches after the signal before it stops. Python
    #   3.14 starts processes from a forkserver by default on Linux: a process of the job, which
    #   the signal kills, and the DataLoader workers, its children, stop when their parent is gone.
    # - then a bug at the first batch. The workers ignore SIGTERM; multiprocessing's exit handler
    #   terminates daemonic children with SIGTERM and then waits for them, and the traceback keeps
    #   the loader alive until then: the process hung for ever (on a cluster, holding its GPUs).
    script = textwrap.dedent(f"""
        import argparse, os, signal, torch, colorize
        args = argparse.Namespace(crop=32, short_side=[32, 40], objective='colorize', batch_size=2, seed=0,
                                  workers=2, handover='slots')
        paths = sorted(str(p) for p in colorize.Path({str(folders[0])!r}).iterdir())
        for method in ('fork', 'forkserver'):
            torch.multiprocessing.set_start_method(method, force=True)
            loader = colorize.make_loader(paths, args, 0, 1, 0, torch.device('cpu'), stop_step=60)
            with colorize.StopSignals(torch.device('cpu')) as stop:
                for step, batch in enumerate(loader, 1):
                    if step == 3:
                        os.killpg(0, signal.SIGTERM)
            print(method, step, stop.signum, flush=True)
        loader = colorize.make_loader(paths, args, 0, 1, 0, torch.device('cpu'), stop_step=60)
        for batch in loader:
            raise RuntimeError('a bug at batch 1')
        """)
    proc = subprocess.run([sys.executable, '-c', script], cwd=HERE, capture_output=True, text=True, timeout=60,
                          start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS='1'))
    term = int(signal.SIGTERM)
    assert proc.stdout == f'fork 60 {term}\nforkserver 60 {term}\n', proc.stderr[-2000:]
    assert proc.returncode == 1 and proc.stderr.rstrip().endswith('RuntimeError: a bug at batch 1'), proc.stderr


def test_bad_and_gray_images_are_counted_and_skipped(tmp_path, capsys):
    train = _write_images(tmp_path / 'train', 16, 2)
    val = _write_images(tmp_path / 'val', 4, 3)
    (train / 'empty.jpg').write_bytes(b'')
    (train / 'text.JPG').write_text('not an image')
    Image.fromarray(np.full((40, 40), 128, np.uint8)).save(train / 'gray.png')
    out = tmp_path / 'run'
    # 19 images, batch 4: 20 steps read each image about 4 times.
    assert colorize.main(tiny_args(train, val, out, '--steps', '20', '--max-bad-share', '0.5')) == 0
    captured = capsys.readouterr()
    assert 'empty.jpg' in captured.err and 'text.JPG' in captured.err
    done = [line for line in captured.out.splitlines() if line.startswith('done:')][0]
    counts = _state(out / 'checkpoint.pt')['counts']['counts']  # ok, bad, gray
    assert sum(counts) == 80 and counts[1] > 0 and counts[2] > 0
    assert f'bad {counts[1]}' in done and f'gray {counts[2]}' in done
    # Too many bad files: the run stops with one line naming the limit.
    assert colorize.main(tiny_args(train, val, tmp_path / 'run2', '--steps', '40', '--max-bad-share', '0.01')) == 2
    assert '--max-bad-share' in capsys.readouterr().err
    # ... checked early too, not only at the (here never reached) progress lines: at step 10, once
    # at least 100 images were read (batch 12: 120).
    assert colorize.main(tiny_args(train, val, tmp_path / 'run3', '--steps', '120', '--log-every', '1000',
                                   '--eval-every', '1000', '--max-bad-share', '0.01', '--batch-size', '12')) == 2
    assert 'of 120 images trained on so far' in capsys.readouterr().err
    # Grayscale photos only (a folder of gray copies, say): zero weight at every step, so the run
    # stops at step 10 (batch 12: 120 images read), whatever --max-bad-share allows.
    gray = tmp_path / 'gray'
    gray.mkdir()
    for i in range(12):
        Image.fromarray(np.full((40, 40, 3), 10 * i, np.uint8)).save(gray / f'g{i}.png')
    assert colorize.main(tiny_args(gray, val, tmp_path / 'run4', '--steps', '120', '--log-every', '1000',
                                   '--eval-every', '1000', '--batch-size', '12')) == 2
    err = capsys.readouterr().err
    assert 'none of the 120 images trained on so far had colour (120 grayscale, 0 unreadable)' in err


def test_the_stop_for_gray_photos_is_colorization_s_only():
    """--objective classify trains on grayscale photos (its loss weighs only unreadable ones by zero):
    120 gray images of 120 stopped it as if nothing could be learned; all unreadable still stops both."""
    def check(objective, ok, bad, gray):
        counter = data.StatusCounter()
        counter.update(torch.tensor([data.STATUS_OK] * ok + [data.STATUS_BAD] * bad + [data.STATUS_GRAY] * gray))
        args = argparse.Namespace(objective=objective, max_bad_share=1.0)
        colorize.check_bad_share(counter, args, 1, torch.device('cpu'))
    check('classify', 0, 0, 120)
    check('colorize', 1, 0, 119)  # one colour photo: something is learned
    with pytest.raises(colorize.UserError, match='none of the 120 images .* had colour'):
        check('colorize', 0, 0, 120)
    for objective in ('colorize', 'classify'):
        with pytest.raises(colorize.UserError, match='none of the 120 images trained on so far could be read'):
            check(objective, 0, 120, 0)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _torchrun(processes, args, log_dir):
    """colorize.py under torchrun on a free port; the finished process. log_dir: torchrun's own
    (without one it makes a /tmp/torchelastic_* folder per run and leaves it there)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={processes}', f'--master_port={_free_port()}',
           f'--log-dir={log_dir}', str(HERE / 'colorize.py'), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=dict(os.environ, OMP_NUM_THREADS='1'))


def test_torchrun_two_cpu_processes(folders, tmp_path):
    train, val = folders
    out = tmp_path / 'ddp'
    # Progress lines at 2 and 4, a checkpoint kept at 3: it holds the open window of step 3 (one step).
    result = _torchrun(2, tiny_args(train, val, out, '--steps', '4', '--batch-size', '2', '--keep-every', '3'),
                       tmp_path / 'logs')
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'world 2 (gloo DDP)' in result.stdout and 'step 4/4' in result.stdout
    assert json.loads((out / 'run.json').read_text())['world_size'] == 2
    ckpt = _state(out / 'checkpoint.pt')
    assert ckpt['step'] == 4 and ckpt['world'] == 2
    assert ckpt['progress'] == dict(sums_by_rank=None, steps=0)  # the line of step 4 closed its window
    # The window of step 3 as both ranks had it, gathered: one (loss, chroma, hue) each, loss = chroma + hue
    # (the huechroma loss), the two ranks' different (their own images and pixels).
    window = _state(out / 'checkpoint-step0000003.pt')['progress']
    assert window['steps'] == 1 and len(window['sums_by_rank']) == 2
    for total, chroma, hue in window['sums_by_rank']:
        assert total == pytest.approx(chroma + hue, rel=1e-5) and chroma > 0 and hue > 0
    assert window['sums_by_rank'][0] != window['sums_by_rank'][1]
    # Each rank read its own 4 x 2 images; the checkpoint and the last line count all 16.
    assert [sum(c) for c in ckpt['counts_by_rank']] == [8, 8] and sum(ckpt['counts']['counts']) == 16
    assert 'images 16:' in result.stdout
    # Rank 0 lists the folders (train, val) and writes the listing cache; rank 1 reads it, silently.
    assert sum(' scanned in ' in line or ' cached in ' in line for line in result.stdout.splitlines()) == 2


def _ranks(processes, args, by_rank=None):
    """colorize.py as `processes` ranks started by hand with torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...), sparing torchrun's own process: [(exit status, stderr)] by rank. by_rank: a
    dict per rank with more `args` and its `local_rank` (default: its rank, one node)."""
    env = dict(os.environ, OMP_NUM_THREADS='1', WORLD_SIZE=str(processes), LOCAL_WORLD_SIZE=str(processes),
               MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    by_rank = by_rank or [{}] * processes
    procs = [subprocess.Popen([sys.executable, str(HERE / 'colorize.py'), *args, *by_rank[r].get('args', ())],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(env, RANK=str(r), LOCAL_RANK=str(by_rank[r].get('local_rank', r))))
             for r in range(processes)]
    results = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=240)
            results.append((p.returncode, err))
        return results
    finally:  # a rank still waiting (the failure this catches) is not left behind
        for p in procs:
            p.kill()


def test_ranks_stop_together_when_the_demo_cannot_be_made(tmp_path):
    # Rank 0 makes the demo world; when it cannot (a foreign folder in the way), rank 1 must stop
    # too, not wait at a barrier until the process group times out.
    foreign = tmp_path / 'demo'
    foreign.mkdir()
    (foreign / 'mine.txt').write_text('not a demo world')
    (code0, err0), (code1, err1) = _ranks(2, ['--demo-root', str(foreign), '--out', str(tmp_path / 'out'),
                                               '--device', 'cpu', '--steps', '1'])
    assert code0 == code1 == 2  # each rank prints its error and exits, none hangs or aborts
    assert 'holds no complete demo world' in err0 and 'rank 0 could not prepare' in err1
    assert (foreign / 'mine.txt').read_text() == 'not a demo world'


def _fake_complete_demo(root):
    """A demo world of 12 images that ensure_demo (as colorize.py calls it) takes for its full one."""
    data.make_demo_world(root, n_train=6, n_val=6)
    defaults = {k: v.default for k, v in inspect.signature(data.ensure_demo).parameters.items()
                if k in ('n_train', 'n_val', 'n_trainval_2007', 'n_test_2007', 'n_train_2012', 'n_val_2012', 'seed')}
    (root / data._DEMO_MARKER).write_text(json.dumps({'version': data._DEMO_VERSION, **defaults}))
    return root


def test_the_first_rank_of_each_node_prepares_the_demo_world_it_sees(tmp_path):
    # Two nodes (rank 1 is LOCAL_RANK 0 on its own) without a shared --demo-root (/tmp is per node):
    # rank 1 does not see rank 0's demo world, so it must make its own, not crash listing a missing
    # folder. Simulated by a folder of rank 1's own that holds something else, which ensure_demo
    # refuses: both ranks stop with the line that names rank 1 (before: rank 1's traceback, rank 0's gloo error).
    mine = _fake_complete_demo(tmp_path / 'node0')
    theirs = tmp_path / 'node1'
    theirs.mkdir()
    (theirs / 'mine.txt').write_text('not a demo world')
    args = ['--out', str(tmp_path / 'out'), '--device', 'cpu', '--steps', '1', '--width', '0.0625', '--fc-dim', '16',
            '--crop', '32', '--batch-size', '2', '--workers', '0']
    (code0, err0), (code1, err1) = _ranks(2, args, by_rank=[dict(args=['--demo-root', str(mine)]),
                                                          dict(args=['--demo-root', str(theirs)], local_rank=0)])
    assert code0 == code1 == 2, err0[-2000:] + err1[-2000:]
    assert 'rank 1 could not prepare the demo world' in err0 and 'holds no complete demo world' in err1
    assert 'Traceback' not in err0 + err1


def test_the_progress_line_s_eta_counts_every_rank_s_images(monkeypatch, capsys, tmp_path):
    # Under DDP img/s counts the images of all ranks (batch x world), so the time left is the steps left x
    # batch x world / img/s. By hand: batch 4 x world 2, one step in 2 s: 8 / 2 = 4 img/s; 9 steps left:
    # 9 x 8 / 4 = 18 s (per rank's batch, 9 s: half the time left).
    clock = iter([0.0, 2.0, 2.0])
    monkeypatch.setattr(time, 'perf_counter', lambda: next(clock))
    monkeypatch.setattr(colorize, 'lr_at', lambda step, args: 0.1)
    progress = colorize.Progress(4 * 2)
    progress.add(torch.tensor([1.5, 1.5]))
    args = argparse.Namespace(steps=10, batch_size=4)
    with open(tmp_path / 'log.jsonl', 'w') as log:
        colorize.log_progress(log, progress, data.StatusCounter(), ('l2',), 1, args, torch.device('cpu'))
    line = capsys.readouterr().out
    assert '4.0 img/s | ETA 0:00:18' in line, line
    assert json.loads((tmp_path / 'log.jsonl').read_text())['img_per_s'] == 4.0


def test_every_rank_of_a_node_joins_the_demo_world_exchanges(monkeypatch, tmp_path):
    # prepare_demo_world under DDP: rank 0 makes the demo world, the first rank of each other node too, and
    # every rank, LOCAL_RANK 1 included, takes part in both exchanges in the same order (rank0_problem's
    # broadcast, then all_gather_object): a rank that skipped the all_gather left rank 0 waiting there.
    # The collectives by hand, this process playing each rank of a world of 2 (the real two-process runs
    # above cover a failing rank 0 and a second node).
    import torch.distributed as dist
    calls = []

    def broadcast(objects, src):
        calls.append(('broadcast', src, list(objects)))
        objects[0] = None  # rank 0's answer: it made the demo world

    def all_gather(every, mine):
        calls.append(('all_gather', mine))
        every[:] = [None, None]

    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(dist, 'broadcast_object_list', broadcast)
    monkeypatch.setattr(dist, 'all_gather_object', all_gather)
    monkeypatch.setattr(data, 'ensure_demo', lambda root: calls.append(('ensure_demo', root)))
    root = tmp_path / 'demo'
    made = [('ensure_demo', root)]
    for master, local_rank, expected in (
            (True, '0', made + [('broadcast', 0, [None]), ('all_gather', None)]),  # rank 0
            (False, '1', [('broadcast', 0, [None]), ('all_gather', None)]),  # rank 1 of the same node
            (False, '0', [('broadcast', 0, [None])] + made + [('all_gather', None)])):  # rank 1 of another node
        calls.clear()
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        colorize.prepare_demo_world(argparse.Namespace(demo_root=root), master)
        assert calls == expected, (master, local_rank)


def test_rank_0_and_the_first_rank_of_each_other_node_prepare_the_demo_world(tmp_path, monkeypatch):
    # Not every rank: eight ranks of a node rendering the same demo world at once (each in up to 8
    # processes) would only race to one rename. In-process, as each kind of rank, its peers' answers by hand.
    import torch.distributed as dist
    root = _fake_complete_demo(tmp_path / 'demo')
    made = []
    monkeypatch.setattr(data, 'ensure_demo', lambda root: made.append(root))
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 4)
    monkeypatch.setattr(dist, 'broadcast_object_list', lambda objects, src: None)  # rank 0 made it
    monkeypatch.setattr(dist, 'all_gather_object', lambda every, mine: every.__setitem__(slice(None), [None] * 4))
    args = colorize.parse_args(['--demo-root', str(root), '--out', str(tmp_path / 'out')])
    for master, local_rank, makes in [(True, '0', 1), (False, '1', 0), (False, '0', 1)]:  # rank 0, 1; node 2's first
        monkeypatch.setenv('LOCAL_RANK', local_rank)
        made.clear()
        train, val = colorize.image_sources(args, master)
        assert made == [root] * makes and len(train) + len(val) == 12, (master, local_rank)


def test_ranks_that_would_start_from_different_steps_stop_together(folders, tmp_path):
    # A node that does not see the run folder (--out on its own disk), or a job script that adds
    # --resume on each node by what that node sees: rank 0 resumes, rank 1 starts afresh. Before,
    # they trained in step with each other from different steps (lr, momentum, data), silently.
    train, val = folders
    run = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, run, '--steps', '2')) == 0  # one process: checked before its world
    (code0, err0), (code1, err1) = _ranks(2, tiny_args(train, val, run, '--steps', '4'), by_rank=[
        dict(args=['--resume']), dict(args=['--out', str(tmp_path / 'node1-run')])])
    assert code0 == code1 == 2, err0[-2000:] + err1[-2000:]
    line = 'error: rank 0 resumes at step 2 but rank 1 starts afresh: the ranks must see the same run folder '
    assert err0.startswith(line + str(run)) and err1.startswith(line)
    assert _state(run / 'checkpoint.pt')['step'] == 2


def test_the_workers_default_splits_only_the_cores_that_ranks_of_a_node_share(monkeypatch):
    # torchrun's ranks of a node share its cores; tasks that srun binds to cores of their own do not,
    # and dividing those again by the ranks per node (LOCAL_WORLD_SIZE, as before) left 12-core tasks
    # of an 8-GPU node 1 worker each. The ranks' answers by hand (this process is rank 0 of 4).
    import torch.distributed as dist
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: set(range(12)), raising=False)  # (not on macOS)
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 4)
    here = socket.gethostname()

    def workers(others):
        monkeypatch.setattr(dist, 'all_gather_object', lambda every, mine: every.__setitem__(slice(None),
                                                                                              [mine, *others]))
        args = colorize.parse_args(['--device', 'cuda'])
        return colorize.fill_defaults(args, torch.device('cuda'), 4).workers
    assert workers([(here, list(range(12)))] * 3) == 12 // 4 - 1  # torchrun: one node's cores, four ranks
    assert workers([(here, list(range(12 * k, 12 * k + 12))) for k in (1, 2, 3)]) == 11  # srun, bound tasks
    assert workers([('node2', list(range(12)))] * 3) == 11  # the same cores' numbers on other nodes


def test_same_start_says_which_rank_could_not_read_the_checkpoint(monkeypatch):
    # Both resuming, rank 1 without the checkpoint (in-process: the ranks' answers by hand): its
    # reason, on every rank, and that rank 0 read it.
    import torch.distributed as dist
    monkeypatch.setattr(dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dist, 'get_world_size', lambda: 2)
    rank1 = ('checkpoint n1/checkpoint.pt does not exist', None)
    monkeypatch.setattr(dist, 'all_gather_object', lambda every, mine: every.__setitem__(slice(None), [mine, rank1]))
    with pytest.raises(colorize.UserError) as e:
        colorize.same_start(None, dict(step=2), 'run')
    assert str(e.value) == ('rank 1: checkpoint n1/checkpoint.pt does not exist (rank 0 read it: every node must '
                            'see the run folder, on a file system they share)')
    rank1 = (None, 2)
    colorize.same_start(None, dict(step=2), 'run')  # the same step: no problem
    rank1 = (None, 3)
    with pytest.raises(colorize.UserError, match='^rank 0 resumes at step 2 but rank 1 resumes at step 3: '):
        colorize.same_start(None, dict(step=2), 'run')


def test_lines_reach_a_log_file_as_they_are_printed(tmp_path, monkeypatch):
    # A cluster job's stdout is a file, block-buffered: a long listing's progress lines showed up
    # only with the first progress line of training, minutes later (unless PYTHONUNBUFFERED was set).
    with open(tmp_path / 'job.out', 'w') as job_stdout:  # as Python opens a stdout redirected to a file
        with monkeypatch.context() as m:
            m.setattr(sys, 'stdout', job_stdout)
            data.printable_output()
            print('2 images scanned in images (0.0 s)')
            assert (tmp_path / 'job.out').read_text() == '2 images scanned in images (0.0 s)\n'


def test_locking_a_run_folder_removes_the_temp_files_of_killed_writes_from_any_host(tmp_path, monkeypatch):
    # A job killed while saving (SIGKILL after the scheduler's grace time), requeued on another node:
    # the temp file its host left (a checkpoint's size) was removed only by a write on that host.
    left = [tmp_path / f'{name}.tmp-othernode-{os.getpid()}' for name in ('checkpoint.pt', 'log.jsonl', 'run.json')]
    left += [tmp_path / 'checkpoint-step0000010.pt.tmp-othernode-7', tmp_path / 'feature_shift.json.tmp-othernode-7',
             tmp_path / 'results.json.tmp-7']  # a kept checkpoint's, fine-tuning's, one named before hosts were
    # The user's files, whatever their names: only those of the run's own writes go.
    kept = [tmp_path / 'notes.txt.tmp-othernode-1', tmp_path / 'checkpoint.pt', tmp_path / 'checkpoint_old.pt.tmp-1',
            tmp_path / 'checkpoint.pt.tmp-mine', tmp_path / 'run.json.tmpl']
    for path in left + kept:
        path.write_bytes(b'x')
    (tmp_path / 'checkpoint.pt.tmp-othernode-9').symlink_to(tmp_path / 'notes.txt.tmp-othernode-1')  # no write's
    kept.append(tmp_path / 'checkpoint.pt.tmp-othernode-9')
    colorize.lock_run(tmp_path).close()
    assert [p.exists() for p in left + kept] == [False] * len(left) + [True] * len(kept)
    # Without flock (ENOLCK) another process may be writing them: they stay.
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(fcntl, 'flock', unsupported)
    left[0].write_bytes(b'x')
    colorize.lock_run(tmp_path).close()
    assert left[0].exists()


def test_exclusive_lock_refuses_a_second_holder_and_goes_on_where_flock_is_unsupported(tmp_path, monkeypatch):
    path, me = tmp_path / 'lock', f'pid {os.getpid()} on {socket.gethostname()}'
    first, holder = data.exclusive_lock(path)
    assert holder is None and path.read_text() == me + '\n'
    try:  # flock locks belong to an open file: a second open in this process is refused too
        assert data.exclusive_lock(path) == (None, me)
    finally:
        first.close()
    again, holder = data.exclusive_lock(path)  # let go when the first was closed
    again.close()
    assert holder is None and path.read_text() == me + '\n'  # the holder's line replaced, not appended to
    # A verify's or a training run's probe of a pack's lock (a shared flock, held for microseconds) at the
    # moment a `pack` starts: the pack waits 50 ms and tries once more, not refused naming the last holder.
    # (A run folder's lock, which nothing probes, is refused at once: a run refused at start-up removes its
    # new folder, which a second try would find deleted.)
    import fcntl
    for retry, taken in ((None, False), (0.05, True)):
        probe = open(path)
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        threading.Timer(0.01, probe.close).start()
        after, holder = data.exclusive_lock(path, retry=retry)
        assert (holder is None) == taken
        if after is not None:
            after.close()
        time.sleep(0.02)  # the probe let go
    # A file system without flock (some network mounts: ENOLCK): the run and the pack go on unlocked.
    def unsupported(*args):
        raise OSError(errno.ENOLCK, 'No locks available')
    monkeypatch.setattr(fcntl, 'flock', unsupported)
    colorize.lock_run(tmp_path).close()
    data._lock_pack(str(tmp_path / 'pack')).close()
    assert (tmp_path / '.lock').read_text() == me + '\n'


def test_ranks_stop_together_when_the_run_folder_is_in_use(folders, tmp_path):
    # Only rank 0 takes the run folder's lock; when another process holds it, rank 1 must stop with
    # rank 0's line, not go on to the listing's broadcast (gloo: a traceback once rank 0 is gone).
    import fcntl
    train, val = folders
    run = tmp_path / 'run'
    run.mkdir()
    with open(run / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (code0, err0), (code1, err1) = _ranks(2, tiny_args(train, val, run, '--steps', '2'))
    assert code0 == code1 == 2, err1[-2000:]
    assert 'is in use by' in err0 and 'rank 0: ' in err1 and 'is in use by' in err1 and 'Traceback' not in err1


def test_ranks_stop_together_at_an_exchange_when_one_of_them_is_sent_sigterm(folders, tmp_path):
    # Only rank 1 is told (a signal may reach the ranks at different times, or one only): both save
    # at the same step, an exchange (StopSignals), and exit; rank 0 says where to continue.
    train, val = folders
    out = tmp_path / 'run'
    env = dict(os.environ, OMP_NUM_THREADS='1', WORLD_SIZE='2', LOCAL_WORLD_SIZE='2', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(_free_port()))
    args = tiny_args(train, val, out, '--steps', '500', '--log-every', '1', '--batch-size', '2')
    procs = [subprocess.Popen([sys.executable, str(HERE / 'colorize.py'), *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(2)]
    try:
        for line in procs[0].stdout:
            if line.startswith('step 3/'):
                break
        procs[1].send_signal(signal.SIGTERM)
        (out0, err0), (_, err1) = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [128 + signal.SIGTERM] * 2, err0[-2000:] + err1[-2000:]
    stopped = int(re.search(r'stopped at step (\d+) by SIGTERM', err0).group(1))
    assert stopped % colorize.STOP_CHECK_EVERY == 0 and 3 < stopped < 500 and 'stopped' not in err1
    ckpt = _state(out / 'checkpoint.pt')
    assert ckpt['step'] == stopped and [sum(c) for c in ckpt['counts_by_rank']] == [2 * stopped] * 2


@pytest.mark.parametrize('backend', [pytest.param('gloo', id='gloo-cpu'), pytest.param('nccl', id='nccl-cuda', marks=(
    pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')))])
def test_stop_requests_are_exchanged_an_interval_before_they_are_read(backend):
    # Under DDP a rank's request goes out at an exchange and is read back at the next one, so
    # that on a GPU reading it never waits for the queued steps (NCCL: pinned copy and event).
    import torch.distributed as dist
    device = torch.device('cuda' if backend == 'nccl' else 'cpu')
    if device.type == 'cuda':
        torch.cuda.set_device(0)
    dist.init_process_group(backend, init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    try:
        every = colorize.STOP_CHECK_EVERY
        stop = colorize.StopSignals(device)
        assert not any(stop.agreed(step) for step in range(1, 3 * every + 1))
        stop.signum = signal.SIGUSR1  # as the handler sets it, just after step 3 * every
        assert not any(stop.agreed(step) for step in range(3 * every + 1, 4 * every + 1))  # sent at 4 * every
        assert not any(stop.agreed(step) for step in range(4 * every + 1, 5 * every))
        assert stop.agreed(5 * every) and stop.signum == signal.SIGUSR1  # read back: every rank stops here
    finally:
        dist.destroy_process_group()


def test_a_rank_waiting_for_rank_0_after_the_loop_is_not_killed_by_a_signal(folders, tmp_path, monkeypatch):
    # After the last step (or the agreed stop) the other ranks wait in a collective while rank 0 saves.
    # A signal that reaches a rank there (a repeated one, one at the last step) must not kill it: rank
    # 0's collective would then fail (gloo: a traceback) or hang (NCCL). One gloo rank stands for them.
    import torch.distributed as dist
    train, val = folders
    barrier = dist.barrier
    monkeypatch.setattr(dist, 'barrier', _signal_at_call(barrier, 1, signal.SIGTERM))
    monkeypatch.setattr(colorize, 'train_step', _signal_at_call(colorize.train_step, 3, signal.SIGUSR1))
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{_free_port()}', rank=0, world_size=1)
    try:
        with _counted(signal.SIGTERM) as caught:
            with pytest.raises(colorize.Stopped) as stopped:  # not main(): under DDP it ends the process
                colorize.train(colorize.parse_args(tiny_args(train, val, tmp_path / 'a', '--steps', '500')))
        assert caught == [] and stopped.value.signum == signal.SIGUSR1
        assert dist.barrier.calls == [1]  # the ranks met after rank 0's save, before they stopped
        assert stopped.value.step == 2 * colorize.STOP_CHECK_EVERY == _state(tmp_path / 'a' / 'checkpoint.pt')['step']
        monkeypatch.setattr(colorize, 'gather_counts', _signal_at_call(colorize.gather_counts, 1, signal.SIGTERM))
        with _counted(signal.SIGTERM) as caught:  # the last step's: the run ends as usual
            colorize.train(colorize.parse_args(tiny_args(train, val, tmp_path / 'b', '--steps', '3')))
        assert caught == [] and _state(tmp_path / 'b' / 'checkpoint.pt')['step'] == 3
    finally:
        dist.destroy_process_group()


def test_ranks_refuse_to_shard_lists_that_differ():
    # As if a folder gained an image between rank 0's listing and rank 1's: every rank stops with one
    # line (unchecked, each would shard its own list: images skipped or seen twice). The ranks gather
    # these (listing, problem) pairs with all_gather_object; test_torchrun_two_cpu_processes runs it.
    paths = [f'/d/{i}.jpg' for i in range(25)]
    same = [colorize.data_identity(paths[:24]), None]
    grown = [colorize.data_identity(paths), None]
    assert colorize.listing_problem([(same, None), (same, None)]) is None
    assert colorize.listing_problem([(same, None), (grown, None)]).startswith(
        'rank 0 and rank 1 listed different images (--data: 24 and 25)')
    renamed = [colorize.data_identity(paths[1:]), None]  # as many images, other names
    assert 'rank 0 and rank 1 listed different' in colorize.listing_problem([(same, None), (renamed, None)])
    val = [colorize.data_identity(paths[:24]), colorize.data_identity(paths[24:])]
    assert 'rank 0 and rank 2' in colorize.listing_problem([(val, None), (val, None), (same, None)])
    assert colorize.listing_problem([(same, None), (None, 'no images under /d')]) == 'rank 1: no images under /d'



def test_data_identity_hashes_the_joined_list_in_bounded_memory():
    # The digest is that of the paths joined by newlines (what checkpoints since 996eedb record), across
    # chunk boundaries; the joined list of 3.7M paths took 0.4 GB at each start on every rank.
    paths = [f'/data/imagenet/train/n{i:08d}/n{i:08d}_{i}.JPEG' for i in range(5)] + ['/d/caf\u00e9.jpg']
    for chunk in (1, 2, 5, 6, 7):
        for n in (0, 1, 2, 5, 6):
            joined = '\n'.join(paths[:n]).encode()
            assert colorize.data_identity(paths[:n], chunk=chunk) == dict(count=n, sha1=hashlib.sha1(joined).hexdigest())
    many = [f'/data/places205/images256/a/abbey/{i:012d}.jpg' for i in range(400_000)]
    tracemalloc.start()
    try:
        colorize.data_identity(many)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20e6, f'{peak / 1e6:.1f} MB'  # 89 MB before: the bytes of every path, then them joined


# --- colorize.py: errors -----------------------------------------------------------------------

@pytest.mark.parametrize('main, argv, expected', [
    (colorize.main, ['--loss', 'rgb'], "invalid choice: 'rgb'"),
    (colorize.main, ['--steps', 'many'], "invalid int value: 'many'"),
    (ft.main, ['--task', 'detection'], "invalid choice: 'detection'"),
    (data.main, ['pack', '--data', 'x'], 'the following arguments are required: --out'),
    (colorize.main, ['--max-bad-share', 'nan'], "argument --max-bad-share: 'nan' is not a finite number"),
    (colorize.main, ['--resume', '--lr', 'inf'], "argument --lr: 'inf' is not a finite number"),
    (colorize.main, ['--momentum', 'x'], "argument --momentum: invalid float value: 'x'"),
    (ft.main, ['--clip-grad', 'nan'], "argument --clip-grad: 'nan' is not a finite number"),
    (ft.main, ['--resume', '--scale', '0.5', '1e999'], "argument --scale: '1e999' is not a finite number"),
])
def test_usage_errors_are_one_line(main, argv, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and expected in err and '--help' in err


def test_float_flags_refuse_nan_and_inf(capsys):
    # argparse's float takes nan and inf, and a run took them: --max-bad-share nan never stopped it,
    # --clip-grad nan never clipped, --lr nan stopped at the first progress line. Every float flag of
    # both scripts (from their --help), each spelling of a number that is not finite.
    floats = {colorize.parse_args: ['--lr', '--lr-milestones', '--momentum', '--weight-decay', '--fc-dropout',
                                    '--width', '--max-bad-share'],
              ft.parse_args: ['--lr', '--lr-milestones', '--lr-gamma', '--momentum', '--weight-decay',
                              '--bias-lr-mult', '--clip-grad', '--dropout', '--scale', '--width', '--label-fraction']}
    for parse, flags in floats.items():
        for flag in flags:
            assert getattr(parse([flag, '0.25', '0.5'] if flag == '--scale' else [flag, '0.25']),
                           flag[2:].replace('-', '_')) in (0.25, [0.25, 0.5], [0.25])
            several = flag in ('--scale', '--lr-milestones')
            for text in ('nan', 'NaN', 'inf', 'Infinity', '1e999') + (() if several else ('-inf',)):
                with pytest.raises(SystemExit):  # (argparse reads -inf alone as a flag: --lr=-inf)
                    parse([flag, '0.25', text] if several else [f'{flag}={text}'])
                assert f"argument {flag}: '{text}' is not a finite number" in capsys.readouterr().err, (flag, text)


def test_seed_flags_take_what_torch_and_numpy_take(capsys):
    # A --seed outside torch.manual_seed's range (or a --label-seed below numpy's 0) ended the run in a
    # traceback, after the listing and the run folder; argparse's int took it. The reference is torch's and
    # numpy's own acceptance of each value, asked here directly.
    def takes(seed_fn, value):
        try:
            seed_fn(value)
            return True
        except (ValueError, RuntimeError, OverflowError):
            return False
    edges = [-2 ** 63 - 1, -2 ** 63, -1, 0, 2 ** 31, 2 ** 63, 2 ** 64 - 1, 2 ** 64]
    flags = [(colorize.parse_args, '--seed', torch.Generator().manual_seed), (ft.parse_args, '--seed',
             torch.Generator().manual_seed), (ft.parse_args, '--label-seed', np.random.default_rng)]
    for parse, flag, seed_fn in flags:
        for value in edges:
            if takes(seed_fn, value):
                assert getattr(parse([f'{flag}={value}']), flag[2:].replace('-', '_')) == value, (flag, value)
            else:
                with pytest.raises(SystemExit):
                    parse([f'{flag}={value}'])
                err = capsys.readouterr().err
                assert f'argument {flag}: {value} is not a seed' in err and err.count('\n') == 1, (flag, value)
    assert takes(np.random.default_rng, 2 ** 64) and ft.parse_args(['--label-seed', str(2 ** 70)]).label_seed == 2 ** 70
    # The text a seed is read from, as argparse's type=int read it (the reference: such a parser).
    plain = argparse.ArgumentParser(prog='x')
    plain.add_argument('--seed', type=int)
    for parse, flag, _ in flags:
        for text in (' 5', '+3', '1_000', '007', '0x10', '1e3', '5.0', ''):
            try:
                expected = plain.parse_args([f'--seed={text}']).seed
            except SystemExit:
                expected = capsys.readouterr().err.splitlines()[-1].split('argument --seed: ', 1)[1]
            try:
                got = getattr(parse([f'{flag}={text}']), flag[2:].replace('-', '_'))
            except SystemExit:
                got = capsys.readouterr().err.splitlines()[-1].split(f'argument {flag}: ', 1)[1].split(' (`')[0]
            assert got == expected, (flag, text, got, expected)


def test_fc_dropout_flag_drops_fc6_fc7_in_training_and_is_kept_in_the_checkpoint(folders, tmp_path):
    # The original Caffe recipe dropped out fc6 and fc7 (p = 0.5) in pre-training, and the hypercolumn
    # read the dropped-out maps. Same seed, data, pixels: only the dropout differs, so every weight
    # under fc6's output gets another gradient, and the checkpoint rebuilds the model with it.
    train, val = folders
    for p in ('0', '0.5'):
        assert colorize.main(tiny_args(train, val, tmp_path / p, '--steps', '1', '--fc-dropout', p)) == 0
    plain, dropped = _state(tmp_path / '0' / 'checkpoint.pt'), _state(tmp_path / '0.5' / 'checkpoint.pt')
    for name in ('trunk.conv1_1.conv.weight', 'trunk.fc6.conv.weight', 'trunk.fc7.conv.weight', 'head.fc1.weight'):
        assert not torch.equal(plain['model'][name], dropped['model'][name]), name
    assert dropped['config']['fc_dropout'] == 0.5 and dropped['args']['fc_dropout'] == 0.5
    assert colorize.make_model(dropped['config']).trunk.fc_dropout.p == 0.5
    assert colorize.make_model(plain['config']).trunk.fc_dropout.p == 0


def test_fc_dropout_cannot_change_when_resuming_a_run_from_before_the_flag(folders, tmp_path, capsys):
    # A checkpoint made before --fc-dropout existed lacks it in its args; that run trained without dropout
    # (p = 0). Like any run flag, a resume must not turn it on: the network would change mid-run.
    train, val = folders
    out = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--save-every', '1', '--exit-after', '1')) == 0
    ckpt = _state(out / 'checkpoint.pt')
    del ckpt['args']['fc_dropout'], ckpt['config']['fc_dropout']  # as written before the flag
    # The first commit had no --objective (nor --classes): its runs colorized.
    del ckpt['args']['objective'], ckpt['args']['classes'], ckpt['config']['objective']
    torch.save(ckpt, out / 'checkpoint.pt')
    capsys.readouterr()
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--resume', '--fc-dropout', '0.5')) == 2
    assert 'was trained with --fc-dropout 0.0' in capsys.readouterr().err
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--resume', '--objective', 'classify')) == 2
    assert 'was trained with --objective colorize' in capsys.readouterr().err
    # A run started before nan and inf were refused (finite_float) may hold one in its args: --max-bad-share
    # nan never stopped it. Its resume is refused until a finite one is given.
    ckpt['args']['max_bad_share'] = float('nan')
    torch.save(ckpt, out / 'checkpoint.pt')
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--resume')) == 2
    assert "--max-bad-share is nan in the checkpoint's args" in capsys.readouterr().err
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--resume', '--max-bad-share', '0.01')) == 0
    assert _state(out / 'checkpoint.pt')['args']['fc_dropout'] == 0.0
    assert _state(out / 'checkpoint.pt')['args']['max_bad_share'] == 0.01
    # finetune_voc.py the same (--clip-grad nan never clipped).
    args = ft.parse_args(['--init', 'random'])
    args.clip_grad = float('nan')
    with pytest.raises(colorize.UserError, match="--clip-grad is nan in the checkpoint's args"):
        ft.fill_defaults(args, torch.device('cpu'))
    args.clip_grad, args.scale = 10.0, [0.5, float('inf')]  # a flag of several values (--lr-milestones too)
    with pytest.raises(colorize.UserError, match="--scale is inf in the checkpoint's args"):
        ft.fill_defaults(args, torch.device('cpu'))


def test_errors_are_one_actionable_line(folders, tmp_path, capsys):
    train, val = folders
    cases = [
        (tiny_args(tmp_path / 'nowhere', val, tmp_path / 'o1', '--steps', '1'), 'nowhere'),
        (tiny_args(train, val, tmp_path / 'o2', '--steps', '1', '--border', '20'), '--border'),
        (tiny_args(train, val, tmp_path / 'o3', '--steps', '1', '--subset', '1000'), '--subset'),
        (tiny_args(train, val, tmp_path / 'o4', '--steps', '1', '--batch-size', '0'), '--batch-size must be at least 1'),
        (tiny_args(train, val, tmp_path / 'o5', '--steps', '1', '--short-side', '20', '40'), 'at least --crop 32'),
        (tiny_args(train, val, tmp_path / 'o6', '--steps', '1', '--batch-size', '30'), 'fewer than one batch'),
        (tiny_args(train, val, tmp_path / 'o7', '--steps', '1', '--target-window', '4'), '--target-window must be odd'),
        (tiny_args(train, val, tmp_path / 'o8', '--steps', '1', '--border', '-1'), '--border must be at least 0'),
        (tiny_args(train, val, tmp_path / 'o8', '--steps', '1', '--short-side', '60', '40'),
         '--short-side 60 40: LO must not exceed HI'),
        (tiny_args(train, val, tmp_path / 'o9', '--steps', '1', '--fc-dropout', '1'), '--fc-dropout is a probability'),
        (tiny_args(train, val, tmp_path / 'o10', '--steps', '1', '-a', 'resnet50', '--fc-dropout', '0.5'),
         'which resnet50 does not have'),
        (['--colorize', str(val)], '--checkpoint'),
        (['--colorize', str(val), '--checkpoint', str(tmp_path / 'missing.pt')], 'does not exist'),
        # VGG-16's five 2x2 poolings need 2 ** 5 = 32 pixels a side: a smaller --crop stopped at the first forward
        # pass with models.py's ValueError. Refused before --data (missing here) is listed, in training and
        # in --benchmark.
        (tiny_args(tmp_path / 'nowhere', val, tmp_path / 'o11', '--crop', '31', '--short-side', '31', '40'),
         '--crop 31 is too small for -a vgg16: its trunk needs inputs of at least 32 pixels on each side'),
        (bench_args(tmp_path / 'nowhere', tmp_path / 'o12', '--crop', '16', '--short-side', '16', '20', '--border',
                    '2', '--benchmark', 'train'), '--crop 16 is too small for -a vgg16'),
    ]
    for argv, needle in cases:
        assert colorize.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and needle in err and 'Traceback' not in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / 'o7').exists()  # refused before the run folder is made
    assert not (tmp_path / 'o11').exists() and not (tmp_path / 'o12').exists()
    # The trunk min_crop builds to read the least size leaves the random numbers as they were.
    torch.manual_seed(0)
    state = torch.get_rng_state()
    assert colorize.min_crop('vgg16') == 2 ** 5 and torch.equal(torch.get_rng_state(), state)
    # At 32 VGG-16 trains; AlexNet and the ResNets pad their strided layers and take any crop.
    assert colorize.fill_defaults(colorize.parse_args(tiny_args(train, val, tmp_path / 'o13')), torch.device('cpu'), 1)
    for arch in ('alexnet', 'resnet50'):
        colorize.fill_defaults(colorize.parse_args(['-a', arch, '--crop', '2', '--short-side', '2', '2', '--border',
                                                    '0', '--points', '1']), torch.device('cpu'), 1)
    assert not (tmp_path / 'o1').exists()  # refused in it, having written nothing there: removed, its .lock too
    corrupt = tmp_path / 'corrupt.pt'
    whole = io.BytesIO()
    torch.save({'model': {'w': torch.zeros(300)}}, whole)
    corrupt.write_bytes(whole.getvalue()[:1000])  # a copy cut short (random bytes: sometimes a pickle warning)
    assert colorize.main(['--colorize', str(val), '--checkpoint', str(corrupt)]) == 2
    assert 'could not be read' in capsys.readouterr().err
    # A file that would run code when unpickled (its __reduce__ calls open(marker, 'w')): refused,
    # and nothing ran (torch.load with weights_only=True).
    marker = tmp_path / 'ran'

    class Payload:
        def __reduce__(self):
            return open, (str(marker), 'w')
    torch.save({'model': {}, 'config': {}, 'payload': Payload()}, tmp_path / 'payload.pt')
    assert colorize.main(['--colorize', str(val), '--checkpoint', str(tmp_path / 'payload.pt')]) == 2
    assert 'could not be read' in capsys.readouterr().err and not marker.exists()


class _Refuses(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        raise colorize.UserError(f'image {i} is unreadable: fix or remove it')


def test_errors_the_user_can_fix_are_one_line_wherever_they_arise(folders, tmp_path, monkeypatch, capsys):
    train, val = folders
    # A UserError raised in a DataLoader worker comes back wrapped, with the worker's traceback.
    batches = iter(torch.utils.data.DataLoader(_Refuses(), num_workers=1))
    with pytest.raises(colorize.UserError) as caught:
        next(batches)
    # Read to the end, which stops the worker now: left to the garbage collector (the traceback holds
    # the iterator in a cycle), its shutdown waited 5 s for the worker, in whichever later test collected it.
    assert next(batches, None) is None
    assert 'Traceback' in str(caught.value)
    assert colorize.error_text(caught.value) == 'image 0 is unreadable: fix or remove it'
    # An output folder on a read-only file system.
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, 'Read-only file system', str(self))
    with monkeypatch.context() as m:
        m.setattr(Path, 'mkdir', read_only)
        assert colorize.main(tiny_args(train, val, tmp_path / 'ro', '--steps', '1')) == 2
    assert capsys.readouterr().err == f'error: {tmp_path / "ro"}: Read-only file system\n'
    # A finetune_voc.py checkpoint given to colorize.py --resume: refused before any folder is made.
    torch.save(dict(model={}, config=dict(objective='voc-cls'), args={}, optimizer={}), tmp_path / 'ft.pt')
    assert colorize.main(['--resume', str(tmp_path / 'ft.pt'), '--out', str(tmp_path / 'new')]) == 2
    assert 'finetune_voc.py checkpoint' in capsys.readouterr().err and not (tmp_path / 'new').exists()
    # Ctrl-C: one line and status 130, the conventional status of SIGINT.
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(colorize, 'train', interrupted)
    (tmp_path / 'c').mkdir()
    (tmp_path / 'c' / 'checkpoint.pt').touch()  # the run has saved a checkpoint
    assert colorize.main(tiny_args(train, val, tmp_path / 'c', '--steps', '1')) == 130
    # It names the run folder: --resume alone would continue the default runs/vgg16-huechroma instead.
    assert capsys.readouterr().err == (f'interrupted: the last checkpoint written is intact; continue with '
                                       f'--resume --out {tmp_path / "c"}\n')
    # Before the run's first checkpoint: --resume would find none there, so not that advice.
    assert colorize.main(tiny_args(train, val, tmp_path / 'e', '--steps', '1')) == 130
    assert capsys.readouterr().err == ("interrupted before the run's first checkpoint: nothing to resume; run the "
                                       "same command again\n")
    # Interrupted before the folder is settled (no --out typed; under torchrun, fill_defaults waits for the
    # other ranks): a fresh run has written nothing, a --resume one has its checkpoint, no folder to name yet.
    assert colorize.main(['--steps', '1']) == 130
    assert capsys.readouterr().err == ("interrupted before the run's first checkpoint: nothing to resume; run the "
                                       "same command again\n")
    assert colorize.main(['--steps', '1', '--resume']) == 130
    assert capsys.readouterr().err == 'interrupted: the last checkpoint written is intact; continue with --resume\n'


# --- colorize.py: colorizing photos ------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(folders, tmp_path_factory):
    train, val = folders
    out = tmp_path_factory.mktemp('trained')
    assert colorize.main(tiny_args(train, val, out, '--steps', '4')) == 0
    return out / 'checkpoint.pt'


def test_colorize_returns_a_gray_photo_unchanged_when_the_colour_predicted_is_none():
    # A network that predicts a* = b* = 0 (l2 head zeroed): every one of the 256 grey levels comes back
    # exactly, rounded to the nearest level (truncating would turn 99.9996 into 99).
    net = colorize.make_model(dict(arch='vgg16', objective='colorize', loss='l2', width=0.0625, fc_dim=16))
    torch.nn.init.zeros_(net.head.out.weight)
    torch.nn.init.zeros_(net.head.out.bias)
    gray = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    out = colorize.colorize_array(net.eval(), gray, 'l2', torch.device('cpu'))
    assert out.dtype == np.uint8 and np.array_equal(out, gray)


def test_colorize_keeps_full_resolution_lightness_and_orientation(trained, tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    rng = np.random.default_rng(5)
    rgb = np.repeat(np.repeat(rng.integers(0, 256, (7, 9, 3), dtype=np.uint8), 11, 0), 11, 1)  # 77x99
    Image.fromarray(rgb).save(photos / 'plain.png')
    Image.fromarray(rgb[..., 0]).save(photos / 'gray.png')  # a grayscale photo
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(photos / 'rotated.jpg', exif=exif, quality=95)
    out = tmp_path / 'colorized'
    assert colorize.main(['--colorize', str(photos), '--checkpoint', str(trained), '--output', str(out),
                          '--net-short-side', '40']) == 0
    plain = np.asarray(Image.open(out / 'plain.png'))
    assert plain.shape == (77, 99, 3)
    assert np.asarray(Image.open(out / 'rotated.png')).shape == (99, 77, 3)
    assert np.asarray(Image.open(out / 'gray.png')).shape == (77, 99, 3)

    def lightness(a):
        return lab.rgb_to_lab(torch.from_numpy(a.copy()).permute(2, 0, 1).double() / 255)[0]
    # The output keeps the input's own lightness, pixel for pixel (up to 8-bit rounding and the
    # clipping of out-of-gamut colours).
    assert (lightness(plain) - lightness(rgb)).abs().median() < 1.0


def _linear_icc(gray=False):
    """A hand-made ICC v2 display profile: sRGB's primaries (their D50-adapted XYZ, as in the sRGB
    profile) with a gamma 1.0 curve, so a pixel value v means linear light v / 255; gray=True: a gray
    profile (D50 white, the same curve)."""
    def s15(v):
        return struct.pack('>i', round(v * 65536))

    def xyz(x, y, z):
        return b'XYZ ' + bytes(4) + s15(x) + s15(y) + s15(z)
    curv = b'curv' + bytes(4) + struct.pack('>IH', 1, 0x0100) + bytes(2)  # one u8Fixed8 gamma: 1.0
    desc = b'desc' + bytes(4) + struct.pack('>I', 12) + b'linear sRGB\0' + bytes(4 + 4 + 2 + 1 + 67)
    colour = ([(b'kTRC', curv)] if gray else
              [(b'rXYZ', xyz(0.4360747, 0.2225045, 0.0139322)), (b'gXYZ', xyz(0.3850649, 0.7168786, 0.0971045)),
               (b'bXYZ', xyz(0.1430804, 0.0606169, 0.7141733)), (b'rTRC', curv), (b'gTRC', curv), (b'bTRC', curv)])
    tags = [(b'desc', desc), (b'wtpt', xyz(0.9642, 1.0, 0.8249)), *colour, (b'cprt', b'text' + bytes(4) + b'none\0')]
    start, table, body = 128 + 4 + 12 * len(tags), b'', b''
    for sig, data_ in tags:
        data_ += bytes(-len(data_) % 4)
        table += sig + struct.pack('>II', start + len(body), len(data_))
        body += data_
    header = (struct.pack('>I', start + len(body)) + bytes(4) + struct.pack('>I', 0x02100000) + b'mntr'
              + (b'GRAY' if gray else b'RGB ') + b'XYZ ' + bytes(12) + b'acsp' + bytes(28) + s15(0.9642) + s15(1.0)
              + s15(0.8249) + bytes(48))
    return header + struct.pack('>I', len(tags)) + table + body


def test_colorize_converts_an_embedded_icc_profile_to_srgb(trained, tmp_path, capsys):
    # A photo whose profile says its values are linear light: taken as sRGB, level 64 (Y = 0.25, L* = 57)
    # would be read as L* = 27, and the output would be far darker than the photo looks.
    pytest.importorskip('PIL.ImageCms')
    v = np.arange(256, dtype=np.float64)
    rgb = np.stack([v, np.roll(v, 85), np.roll(v, 170)], -1).reshape(16, 16, 3).astype(np.uint8)
    photo = tmp_path / 'linear.png'
    Image.fromarray(rgb).save(photo, icc_profile=_linear_icc())
    c = rgb / 255.0  # linear light; IEC 61966-2-1's encoding, written out here
    srgb = np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055) * 255
    assert np.abs(data.load_rgb(str(photo), to_srgb=True) - srgb).max() <= 1.0
    assert np.array_equal(data.load_rgb(str(photo)), rgb)  # training's pixels: as stored
    out = tmp_path / 'out'
    assert colorize.main(['--colorize', str(photo), '--checkpoint', str(trained), '--output', str(out),
                          '--device', 'cpu']) == 0
    y = c @ [0.2126729, 0.7151522, 0.0721750]  # CIE Y of linear sRGB
    want = np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29) * 116 - 16
    got = lab.rgb_to_lab(torch.from_numpy(np.asarray(Image.open(out / 'linear.png')).copy()).permute(2, 0, 1))[0]
    assert np.median(np.abs(got.numpy() - want)) < 1.0
    # A profile of another colour space than the pixels (a CMYK photo with an RGB profile): as stored, said.
    Image.fromarray(rgb).convert('CMYK').save(tmp_path / 'cmyk.jpg', icc_profile=_linear_icc())
    assert np.array_equal(data.load_rgb(str(tmp_path / 'cmyk.jpg'), to_srgb=True),
                          data.load_rgb(str(tmp_path / 'cmyk.jpg')))
    assert 'cmyk.jpg: its ICC profile was not applied, pixels taken as sRGB' in capsys.readouterr().err


def test_an_icc_profile_keeps_a_transparency_key_and_converts_palette_and_gray_with_alpha(tmp_path, capsys):
    # With a profile, an RGB PNG's transparency key was lost (the transform's output has no key: an opaque
    # RGB output), and a palette image or gray with alpha kept its stored values with a warning.
    pytest.importorskip('PIL.ImageCms')
    v = np.arange(0, 256, 17, dtype=np.uint8)  # 16 levels
    rgb = np.stack([v, v[::-1], np.roll(v, 5)], -1).reshape(4, 4, 3)

    def srgb(levels):  # linear levels -> sRGB levels, IEC 61966-2-1's encoding written out here
        c = levels / 255.0
        return np.where(c <= 0.0031308, 12.92 * c, 1.055 * c ** (1 / 2.4) - 0.055) * 255
    key = tmp_path / 'key.png'
    Image.fromarray(rgb).save(key, icc_profile=_linear_icc(), transparency=tuple(int(c) for c in rgb[1, 2]))
    palette = tmp_path / 'palette.png'
    Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE, colors=16).save(palette, icc_profile=_linear_icc())
    gray = tmp_path / 'gray.png'
    alpha = np.arange(16, dtype=np.uint8).reshape(4, 4) * 16
    Image.fromarray(np.dstack([rgb[..., 0], alpha])).save(gray, icc_profile=_linear_icc(gray=True))
    got = data.load_rgb(str(key), to_srgb=True, alpha=True)
    assert got.shape == (4, 4, 4) and got[..., 3].tolist() == [[0 if (i, j) == (1, 2) else 255 for j in range(4)]
                                                               for i in range(4)]
    assert np.abs(got[..., :3] - srgb(rgb)).max() <= 1.0
    stored = data.load_rgb(str(palette))  # the palette's colours, as stored
    assert np.abs(data.load_rgb(str(palette), to_srgb=True) - srgb(stored)).max() <= 1.0
    got = data.load_rgb(str(gray), to_srgb=True, alpha=True)
    assert got.shape == (4, 4, 4) and np.array_equal(got[..., 3], alpha)
    assert np.abs(got[..., :3] - srgb(rgb[..., :1])).max() <= 1.0
    assert 'warning' not in capsys.readouterr().err

def _lightness(rgb8):
    """CIE L* of sRGB uint8 (..., 3), by the IEC 61966-2-1 and CIE formulas in numpy (not lab.py)."""
    c = rgb8 / 255.0
    y = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4) @ [0.2126729, 0.7151522, 0.0721750]
    return np.where(y > (6 / 29) ** 3, np.cbrt(y), y / (3 * (6 / 29) ** 2) + 4 / 29) * 116 - 16


def test_colorize_keeps_a_photo_s_transparency(trained, tmp_path):
    # A cut-out (RGBA: opaque, half and fully transparent columns) and a gray one with alpha (LA): the
    # outputs keep the alpha, and their colour has the lightness of the stored, not whitened, colour.
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    alpha = np.repeat(np.array([255, 128, 0], np.uint8), 6)[None].repeat(12, 0)
    Image.fromarray(np.dstack([rgb, alpha])).save(tmp_path / 'cut.png')
    Image.fromarray(np.dstack([rgb[..., 1], alpha])).save(tmp_path / 'gray.png')
    out = tmp_path / 'out'
    assert colorize.main(['--colorize', str(tmp_path / 'cut.png'), str(tmp_path / 'gray.png'), '--checkpoint',
                          str(trained), '--output', str(out), '--device', 'cpu']) == 0
    for name, colour in (('cut.png', rgb), ('gray.png', np.repeat(rgb[..., 1:2], 3, 2))):
        got = Image.open(out / name)
        assert got.mode == 'RGBA' and np.array_equal(np.asarray(got)[..., 3], alpha), name
        dl = np.abs(_lightness(np.asarray(got)[..., :3]) - _lightness(colour))
        assert np.median(dl) < 1.0, (name, np.median(dl))
    # Training still sees them composited over white, in 3 channels.
    assert data.load_rgb(str(tmp_path / 'cut.png'))[0, -1].tolist() == [255, 255, 255]


def test_colorize_output_names_never_collide_or_replace_inputs(tmp_path):
    photos = tmp_path / 'photos'
    for rel in ('a/x.jpg', 'b/x.jpg', 'a/x.png', 'y.JPEG', 'b/X.jpg'):
        _write_rgb(photos / rel, fmt='JPEG' if rel.lower().endswith(('jpg', 'jpeg')) else 'PNG')
    single = tmp_path / 'single' / 'x.jpg'
    _write_rgb(single, fmt='JPEG')
    jobs = colorize.output_names([str(photos), str(single)], tmp_path / 'out')
    got = {Path(path).relative_to(tmp_path).as_posix(): target.relative_to(tmp_path / 'out').as_posix()
           for path, target in jobs}
    # b/X.png and b/x.png would be one file on macOS and Windows: the second name sorted gets _2.
    assert got == {'photos/a/x.jpg': 'a/x.png', 'photos/a/x.png': 'a/x_2.png', 'photos/b/X.jpg': 'b/X.png',
                   'photos/b/x.jpg': 'b/x_2.png', 'photos/y.JPEG': 'y.png', 'single/x.jpg': 'x.png'}
    with pytest.raises(colorize.UserError, match='over the input'):
        colorize.output_names([str(photos)], photos)  # photos/a/x.png would be replaced
    # An --output inside the folder: a second run does not take the first one's results as photos.
    _write_rgb(photos / 'colorized' / 'y.png')
    targets = [t.relative_to(photos / 'colorized').as_posix()
               for _, t in colorize.output_names([str(photos)], photos / 'colorized')]
    assert targets == ['a/x.png', 'a/x_2.png', 'b/X.png', 'b/x_2.png', 'y.png']
    # A folder without images: one line naming it, not a traceback from the listing.
    (tmp_path / 'empty').mkdir()
    with pytest.raises(colorize.UserError, match='--colorize .*empty.*no images'):
        colorize.output_names([str(single), str(tmp_path / 'empty')], tmp_path / 'out')
    # A pack holds training copies (shrunk): refused, where its outputs went to index.npy/<i>/... at 64 px.
    data.pack_images([photos / 'a'], tmp_path / 'pack', short_side=64, workers=1, log=_quiet)
    with pytest.raises(colorize.UserError, match='a pack .*colorize the folders it was packed from'):
        colorize.output_names([str(tmp_path / 'pack')], tmp_path / 'out')


def test_colorize_says_which_input_names_were_the_same_file(tmp_path, capsys):
    # A link in a folder to another of its photos: the photo was colorized once, under the name that sorts
    # first (the link's), and the other name had no output, without a word.
    photos = tmp_path / 'photos'
    _write_rgb(photos / 'photo.jpg', fmt='JPEG')
    os.symlink('photo.jpg', photos / 'link.jpg')
    jobs = colorize.output_names([str(photos), str(photos / 'photo.jpg')], tmp_path / 'out')
    assert [(Path(p).name, t.name) for p, t in jobs] == [('link.jpg', 'link.png')]
    out = capsys.readouterr().out
    assert (f'2 input name(s) are the same file as another one (a link, or a file given with its folder), '
            f'colorized once: e.g. {photos / "photo.jpg"} is {photos / "link.jpg"}, colorized as '
            f'{tmp_path / "out" / "link.png"}') in out, out
    # The same name typed twice is no other name: no line.
    assert len(colorize.output_names([str(photos / 'photo.jpg')] * 2, tmp_path / 'out')) == 1
    assert capsys.readouterr().out == ''


def test_colorize_counts_names_and_reports_unreadable_inputs(trained, tmp_path, capsys, monkeypatch):
    # A folder as collections come: two photos, x.jpg beside x.png, a zero-byte file, a cut-off JPEG.
    photos = tmp_path / 'photos'
    for name in ('a.png', 'x.jpg', 'x.png'):
        _write_rgb(photos / name, size=(12, 10), fmt='JPEG' if name.endswith('jpg') else 'PNG')
    (photos / 'empty.jpg').write_bytes(b'')
    whole = (photos / 'x.jpg').read_bytes()
    (photos / 'cut.jpg').write_bytes(whole[:len(whole) // 2])
    out = tmp_path / 'out'
    argv = ['--colorize', str(photos), '--checkpoint', str(trained), '--output', str(out), '--device', 'cpu']
    # log_every=0: a progress line after every image but the last, with its count and an ETA.
    monkeypatch.setattr(colorize, 'COLORIZE_SHOWN', 1)  # the summary names 1 unreadable input, counts the rest
    assert colorize.colorize_files(colorize.parse_args(argv), log_every=0) == 1  # some inputs not done
    printed = capsys.readouterr()
    progress = [line for line in printed.out.splitlines() if line.startswith('colorize: ')]
    assert [line.split(' images')[0] for line in progress] == [f'colorize: {k}/5' for k in range(1, 5)]
    assert all(re.search(r'img/s, ETA \d+:\d\d:\d\d, [0-2] unreadable$', line) for line in progress), progress
    assert (f'{photos / "x.png"} -> {out / "x_2.png"}') in printed.out  # which input x_2.png came from
    assert (f'colorized 3 of 5 image(s) into {out} in ') in printed.out
    assert printed.out.rstrip().endswith(f'2 unreadable, skipped (see the warnings above): {photos / "cut.jpg"} '
                                         'and 1 more'), printed.out
    assert printed.err.count('warning: skipping') == 2
    assert sorted(p.name for p in out.iterdir()) == ['a.png', 'x.png', 'x_2.png']
    # Every input readable: status 0, and the summary names none.
    assert colorize.main(['--colorize', str(photos / 'a.png'), *argv[2:]]) == 0
    assert 'unreadable' not in capsys.readouterr().out


def test_colorize_skip_existing_goes_on_where_a_stopped_job_stopped(trained, tmp_path, capsys):
    photos, out = tmp_path / 'photos', tmp_path / 'out'
    for name in ('a.png', 'b.png', 'c.png'):
        _write_rgb(photos / name, size=(12, 10))
    argv = ['--colorize', str(photos), '--checkpoint', str(trained), '--output', str(out), '--device', 'cpu']
    assert colorize.main(argv) == 0
    # A stopped job: b's output never written; a's photo edited since; c's output done (marked to see it kept).
    (out / 'b.png').unlink()
    later = os.path.getmtime(out / 'c.png') + 10
    (out / 'a.png').write_bytes(b'old')
    os.utime(photos / 'a.png', (later, later))
    (out / 'c.png').write_bytes(b'kept')
    os.utime(out / 'c.png', (later, later))  # newer than its photo and the checkpoint
    capsys.readouterr()
    assert colorize.main([*argv, '--skip-existing']) == 0
    printed = capsys.readouterr().out
    assert '--skip-existing: left 1 of 3 output(s)' in printed and 'colorized 2 of 2 image(s)' in printed, printed
    assert (out / 'c.png').read_bytes() == b'kept' and Image.open(out / 'b.png').size == (12, 10)
    assert (out / 'a.png').read_bytes() != b'old'  # its photo is newer: written anew
    # A checkpoint newer than every output (trained on since): all renewed. Without the flag: all renewed.
    os.utime(trained, (later + 10, later + 10))
    assert colorize.main([*argv, '--skip-existing']) == 0 and (out / 'c.png').read_bytes() != b'kept'
    os.utime(trained, None)
    (out / 'c.png').write_bytes(b'kept')
    assert colorize.main(argv) == 0 and (out / 'c.png').read_bytes() != b'kept'
    # Training does not read it: refused there, as other --colorize flags are.
    assert colorize.main(['--skip-existing', '--steps', '1']) == 2
    assert '--skip-existing does not apply to training' in capsys.readouterr().err


def test_colorize_output_names_of_a_relative_folder(tmp_path, monkeypatch):
    # The README's `--colorize photo.jpg photos/`: a folder given relative to the working directory.
    _write_rgb(tmp_path / 'photos' / 'a' / 'x.jpg', fmt='JPEG')
    monkeypatch.chdir(tmp_path)
    jobs = colorize.output_names(['photos/', './photos/../photos', 'photos/a/x.jpg'], Path('out'))
    assert [target.as_posix() for _, target in jobs] == ['out/a/x.png']  # named three times, colorized once


def test_colorize_sees_photos_at_the_training_scale_by_default(trained, tmp_path, monkeypatch):
    # tiny_args train with --crop 32, so --short-side defaults to [32, round(32 * 600 / 352) = 55];
    # the network should see a photo at the middle of that range, 43.5 -> 44 px short side.
    seen = []
    original = colorize.predict_ab
    monkeypatch.setattr(colorize, 'predict_ab', lambda m, L, kind: seen.append(L.shape[-2:]) or original(m, L, kind))
    img = tmp_path / 'wide.png'
    Image.fromarray(np.full((120, 300, 3), 128, np.uint8)).save(img)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(trained), '--output', str(tmp_path / 'o')]) == 0
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(trained), '--output', str(tmp_path / 'o'),
                          '--net-short-side', '0']) == 0
    # 120x300 -> 44x110, padded to multiples of 32; then the photo's own size, padded.
    assert [tuple(s) for s in seen] == [(64, 128), (128, 320)]
    assert np.asarray(Image.open(tmp_path / 'o' / 'wide.png')).shape == (120, 300, 3)
    # A banner wider than 16:1 is not blown up to the short side: its long side stops at 16 x 44 = 704.
    Image.fromarray(np.full((4, 1000, 3), 128, np.uint8)).save(img)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(trained), '--output', str(tmp_path / 'o')]) == 0
    assert tuple(seen[-1]) == (32, 704) and np.asarray(Image.open(tmp_path / 'o' / 'wide.png')).shape == (4, 1000, 3)


def test_fresh_run_refuses_to_replace_an_earlier_checkpoint(folders, trained, capsys):
    train, val = folders
    before = trained.read_bytes()
    assert colorize.main(tiny_args(train, val, trained.parent, '--steps', '2')) == 2
    assert 'continue it with --resume' in capsys.readouterr().err
    assert trained.read_bytes() == before


def test_a_run_folder_in_use_by_another_process_is_refused(folders, trained, tmp_path, voc, capsys):
    # A --resume started while the run still trains there (a job requeued before the old one ended) would
    # overwrite its checkpoints and log: one of the two runs would be lost. The lock is an flock on
    # RUN/.lock, held here through a file of our own, as another process would hold it.
    import fcntl
    train, val = folders
    run = tmp_path / 'run'
    shutil.copytree(trained.parent, run)
    before = (run / 'checkpoint.pt').read_bytes()
    with open(run / '.lock', 'a+') as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert colorize.main(['--out', str(run), '--resume', '--steps', '6']) == 2
        err = capsys.readouterr().err  # how to continue names the folder: --resume alone is the default run's
        assert 'is in use by' in err and f'continue with --resume --out {run}' in err
        assert (run / 'checkpoint.pt').read_bytes() == before
        busy = tmp_path / 'ft'
        busy.mkdir()
        with open(busy / '.lock', 'a+') as held_ft:
            fcntl.flock(held_ft, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert ft.main(['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(busy), '--steps', '1',
                            '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2']) == 2
            err = capsys.readouterr().err
            # How to continue names the folder: finetune_voc.py refuses --resume alone.
            assert 'is in use by' in err and f'continue with --resume --out {busy}' in err
            assert not (busy / 'checkpoint.pt').exists()
            # Once that run has saved a checkpoint there, the lock is still what is named: not 'continue it with
            # --resume', which would join the run training there.
            (busy / 'checkpoint.pt').write_bytes(b'the other run saves here')
            assert ft.main(['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(busy), '--steps', '1',
                            '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2']) == 2
            err = capsys.readouterr().err
            assert 'is in use by' in err and 'exists (an earlier run)' not in err
    # Once the other process is gone, the run continues, and lets go of its folder when it ends.
    assert colorize.main(['--out', str(run), '--resume', '--steps', '6']) == 0
    assert _state(run / 'checkpoint.pt')['step'] == 6
    with open(run / '.lock', 'a+') as after:
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)  # would raise BlockingIOError if still held


def test_a_run_refused_by_another_runs_lock_leaves_that_runs_folder(folders, tmp_path, voc, monkeypatch, capsys):
    # Two runs started at once into a new --out: both see no folder, the other one makes it and locks it
    # first (here inside lock_run, as another process would, through a file of its own). The refused
    # one must not remove that run's folder and .lock: a third would then train there alongside it.
    import fcntl
    train, val = folders
    held = []

    def other_locks_first(lock_run):
        def wrapped(out):
            held.append(open(os.path.join(out, colorize.RUN_LOCK), 'a+'))
            fcntl.flock(held[-1], fcntl.LOCK_EX | fcntl.LOCK_NB)
            return lock_run(out)
        return wrapped

    monkeypatch.setattr(colorize, 'lock_run', other_locks_first(colorize.lock_run))
    monkeypatch.setattr(ft, 'lock_run', other_locks_first(ft.lock_run))
    try:
        run = tmp_path / 'new'
        assert colorize.main(tiny_args(train, val, run, '--steps', '1')) == 2
        assert 'is in use by' in capsys.readouterr().err and (run / colorize.RUN_LOCK).is_file()
        busy = tmp_path / 'ft'
        assert ft.main(['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(busy), '--steps', '1',
                        '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2']) == 2
        assert 'is in use by' in capsys.readouterr().err and (busy / colorize.RUN_LOCK).is_file()
    finally:
        for f in held:
            f.close()


@pytest.mark.parametrize('where', ['inside', 'the data folder', 'linked inside'])
def test_a_run_folder_in_the_data_folder_does_not_train_on_its_samples(tmp_path, folders, capsys, where):
    # `--data ~/photos --out ~/photos/run` (or `--out ~/photos`, or ~/photos/run a link to a scratch disk,
    # which the listing goes through): the run's sample grids (samples/step_*.png) land inside --data.
    # They are no training images: a resume listed them as a 13th (another list, another order).
    _, val = folders
    photos = _write_images(tmp_path / 'photos', 12, 5)
    run = photos if where == 'the data folder' else photos / 'run'
    if where == 'linked inside':
        (tmp_path / 'scratch' / 'run').mkdir(parents=True)
        os.symlink(tmp_path / 'scratch' / 'run', run)
    assert colorize.main(tiny_args(photos, val, run, '--steps', '4', '--save-every', '2', '--exit-after', '2')) == 0
    assert list((run / 'samples').glob('*.png'))  # the first evaluation's grid, under --data
    first = _state(run / 'checkpoint.pt')['data']['images']
    capsys.readouterr()
    assert colorize.main(['--out', str(run), '--resume']) == 0
    out = capsys.readouterr().out
    assert 'training images changed' not in out and 'left out 1 image(s) under --out' in out
    assert _state(run / 'checkpoint.pt')['data']['images'] == first and first['count'] == 12


def test_resuming_after_the_data_moved_says_how_to_continue(tmp_path, folders, voc, capsys):
    # The data set moved (a new disk, a per-job scratch folder): --data cannot change on a resume, and the
    # old path no longer exists. The message said "does not exist" for the old path and "drop the flag" for
    # the new one, each pointing at the other; it should say how the run can go on.
    val = shutil.copytree(folders[1], tmp_path / 'val')
    photos = _write_images(tmp_path / 'old', 12, 5)
    run = tmp_path / 'run'
    assert colorize.main(tiny_args(photos, val, run, '--steps', '4', '--save-every', '2', '--exit-after', '2')) == 0
    photos.rename(tmp_path / 'new')
    capsys.readouterr()
    for extra in ([], ['--data', str(tmp_path / 'new')]):
        assert colorize.main(['--out', str(run), '--resume', *extra]) == 2
        err = capsys.readouterr().err
        assert f'--data {photos}, which no longer exists' in err and f'ln -s NEW_PLACE {photos}' in err
    (tmp_path / 'old').symlink_to(tmp_path / 'new')  # as the message says
    assert colorize.main(['--out', str(run), '--resume']) == 0
    val.rename(tmp_path / 'val-new')  # --val-data is read again too
    assert colorize.main(['--out', str(run), '--resume']) == 2
    assert f'--val-data {val}, which no longer exists' in capsys.readouterr().err
    # finetune_voc.py reads its --init again on a resume.
    init = tmp_path / 'pre' / 'checkpoint.pt'
    init.parent.mkdir()
    colorize_checkpoint(init, 'vgg16')
    base = ['--task', 'cls', '--voc-root', voc, '--steps', '3', '--batch-size', '2', '--crop', '32', '--workers', '0',
            '--test-crops', '1', '--out', str(tmp_path / 'ft')]
    assert ft.main([*base, '--init', str(init), '--exit-after', '1', '--save-every', '1']) == 0
    init.parent.rename(tmp_path / 'pre2')
    capsys.readouterr()
    assert ft.main(['--resume', '--out', str(tmp_path / 'ft')]) == 2
    assert f'--init {init}, which no longer exists' in capsys.readouterr().err


def test_a_run_folder_given_for_its_checkpoint_is_named_as_such(trained, tmp_path, voc, capsys):
    # `--checkpoint runs/x`, `--resume runs/x`, `--init runs/x`: the folder exists, so "does not exist" (or
    # "no such file", with the advice to train one) misled; say it is a folder and what to pass.
    run = trained.parent
    img = _write_images(tmp_path / 'p', 1, 3)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(run), '--output', str(tmp_path / 'o')]) == 2
    assert f'is a folder, not a checkpoint file: pass {trained}' in capsys.readouterr().err
    assert colorize.main(['--resume', str(run)]) == 2
    assert f'is a folder, not a checkpoint file: pass {trained}' in capsys.readouterr().err
    assert ft.main(['--task', 'cls', '--init', str(run), '--voc-root', voc, '--out', str(tmp_path / 'f')]) == 2
    assert f'is a folder, not a checkpoint file: pass {trained}' in capsys.readouterr().err
    assert not (tmp_path / 'f' / 'checkpoint.pt').exists()
    (tmp_path / 'ftrun').mkdir()
    (tmp_path / 'ftrun' / 'checkpoint.pt').write_bytes(b'')
    assert ft.main(['--resume', str(tmp_path / 'ftrun')]) == 2
    assert f'is a run folder, not a checkpoint file: continue it with --resume --out {tmp_path / "ftrun"}' in \
        capsys.readouterr().err


def test_a_pack_beside_the_folder_it_was_made_from_is_refused(tmp_path, folders, capsys):
    # `--data PACK FOLDER` (or `--val-data FOLDER`) where the pack holds FOLDER's images: each image is listed
    # twice, and a held-out one is trained on through its other copy (half the held-out set, measured).
    _, val = folders
    photos = _write_images(tmp_path / 'photos', 10, 5)
    other = _write_images(tmp_path / 'other', 10, 6)
    pack = tmp_path / 'pack'
    data.pack_images([str(photos), str(other)], str(pack), 48, workers=1, log=lambda *a, **k: None)
    assert colorize.main(tiny_args(pack, val, tmp_path / 'a', '--steps', '1')) == 0  # the pack alone
    assert colorize.main([*tiny_args(pack, val, tmp_path / 'b', '--steps', '1'), '--data', str(pack), str(photos)]) == 2
    assert '10 images are both in the pack' in capsys.readouterr().err
    assert colorize.main(tiny_args(pack, photos, tmp_path / 'c', '--steps', '1')) == 2  # validated on trained ones
    assert '10 images are both in the pack' in capsys.readouterr().err
    assert not (tmp_path / 'b' / 'checkpoint.pt').exists() and not (tmp_path / 'c' / 'checkpoint.pt').exists()


def test_a_list_of_packed_images_beside_the_folder_they_were_packed_from_is_refused(tmp_path, folders, capsys):
    # `data.py scan PACK --write all.txt` makes a list of the pack's images (README: to cut down to a
    # subset); given beside the folder the pack was made from, each image is listed twice, as with the pack.
    _, val = folders
    photos = _write_images(tmp_path / 'photos', 10, 5)
    pack = tmp_path / 'pack'
    data.pack_images([str(photos)], str(pack), 48, workers=1, log=lambda *a, **k: None)
    assert data.main(['scan', str(pack), '--write', str(tmp_path / 'all.txt')]) == 0
    capsys.readouterr()
    assert colorize.main([*tiny_args(pack, val, tmp_path / 'b', '--steps', '1'),
                          '--data', str(tmp_path / 'all.txt'), str(photos)]) == 2
    assert '10 images are both in the pack' in capsys.readouterr().err
    assert not (tmp_path / 'b' / 'checkpoint.pt').exists()


def test_readme_loads_a_checkpoint_with_lab_and_models_alone(trained, tmp_path):
    # The README's recipe (Using lab.py and models.py) for a colorize.py checkpoint, run as written on
    # the trained VGG-16 and on a ResNet-50 checkpoint whose config holds an fc_dim, as colorize.py's does.
    text = (HERE / 'README.md').read_text()
    block = re.search(r"```python\n(ckpt = torch\.load\('runs/vgg16-huechroma/checkpoint\.pt'.*?)```", text, re.S)
    assert block, 'README: the checkpoint-loading block of "Using lab.py and models.py" is gone'
    resnet = build_model('resnet50', lab.output_dim('l2'), width=0.0625)
    torch.save(dict(config=dict(arch='resnet50', objective='colorize', loss='l2', width=0.0625, fc_dim=16,
                                fc_dropout=0.0), model=resnet.state_dict()), tmp_path / 'resnet.pt')
    for path in (trained, tmp_path / 'resnet.pt'):
        scope = dict(torch=torch, lab=lab, build_model=build_model, fold_batchnorm=fold_batchnorm)
        exec(block.group(1).replace('runs/vgg16-huechroma/checkpoint.pt', str(path)), scope)
        saved = torch.load(path, map_location='cpu', weights_only=True)['model']
        loaded = scope['model'].state_dict()
        assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
        assert not scope['net'].training


def test_readme_internal_links_lead_to_headings():
    # Every `](#anchor)` of README.md names a heading, by GitHub's rule: lowercase, punctuation but '-'
    # and '_' dropped, spaces to '-', a repeated anchor numbered -1, -2, ... Lines in code blocks are
    # no headings (a `# comment` there).
    def slug(title):
        return re.sub(r'[^\w\- ]', '', title.strip().lower()).replace(' ', '-')
    assert slug("Transfer to PASCAL VOC: `finetune_voc.py`") == 'transfer-to-pascal-voc-finetune_vocpy'
    text = (HERE / 'README.md').read_text()
    anchors, seen, fenced = set(), Counter(), False
    for line in text.splitlines():
        if line.lstrip().startswith('```'):
            fenced = not fenced
        elif not fenced and re.match(r'#{1,6} ', line):
            a = slug(line.lstrip('#'))
            anchors.add(a if not seen[a] else f'{a}-{seen[a]}')
            seen[a] += 1
    links = re.findall(r'\]\(#([^)]*)\)', text)
    assert len(links) > 10 and {'platforms', 'quick-start'} <= anchors
    assert sorted(set(links) - anchors) == []

def test_colorize_rejects_mismatched_checkpoint(trained, tmp_path, capsys):
    ckpt = _state(trained)
    ckpt['config']['arch'] = 'alexnet'
    bad = tmp_path / 'mismatch.pt'
    torch.save(ckpt, bad)
    img = _write_images(tmp_path / 'x', 1, 9)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
    assert 'does not match the model' in capsys.readouterr().err
    # Names that do not fit (here one weight renamed, as an edit of the model's code would), not shapes.
    ckpt = _state(trained)
    ckpt['model']['head.out.extra'] = ckpt['model'].pop('head.out.bias')
    torch.save(ckpt, bad)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {bad} does not match the model: missing ['head.out.bias']..., "
                                       "unexpected ['head.out.extra']... (1 missing, 1 unexpected)\n")
    for missing, unexpected in ((['head.out.bias'], []), ([], ['head.out.extra'])):  # each alone is refused too
        ckpt = _state(trained)
        for key in missing:
            del ckpt['model'][key]
        for key in unexpected:
            ckpt['model'][key] = torch.zeros(1)
        torch.save(ckpt, bad)
        assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
        assert capsys.readouterr().err == (f'error: checkpoint {bad} does not match the model: missing {missing}..., '
                                           f'unexpected {unexpected}... ({len(missing)} missing, {len(unexpected)} '
                                           'unexpected)\n')
    # Not a dict of "model" and "config"; a checkpoint of --objective classify (no colour head).
    torch.save([torch.zeros(1)], bad)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
    assert capsys.readouterr().err == (f'error: {bad} is not a colorize.py checkpoint (expected a dict with "model" '
                                       'and "config")\n')
    ckpt = _state(trained)
    ckpt['config']['objective'] = 'classify'
    torch.save(ckpt, bad)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
    assert capsys.readouterr().err == f'error: {bad} was trained for classify, not colorization\n'
    # The good checkpoint with an input that is not there, or a negative --net-short-side: nothing is written.
    out = tmp_path / 'out'
    for argv, message in (([str(img), str(tmp_path / 'gone.jpg')], f'--colorize {tmp_path / "gone.jpg"}: no such file or folder'),
                          ([str(img), '--net-short-side', '-1'], "--net-short-side must be 0 (the photo's own size) or "
                                                                 'positive, got -1')):
        assert colorize.main(['--colorize', *argv, '--checkpoint', str(trained), '--output', str(out)]) == 2
        assert capsys.readouterr().err == f'error: {message}\n'
    assert not out.exists()


def test_peak_memory_is_since_the_last_progress_line(monkeypatch):
    peaks = [5 * 2 ** 30]  # the allocator's high-water mark, faked: an evaluation's 5 GB
    monkeypatch.setattr(torch.cuda, 'max_memory_allocated', lambda device=None: peaks[-1])
    monkeypatch.setattr(torch.cuda, 'reset_peak_memory_stats', lambda device=None: peaks.append(2 ** 30))
    assert colorize.peak_memory_gb(torch.device('cuda')) == 5.0
    assert colorize.peak_memory_gb(torch.device('cuda')) == 1.0  # after the reset: training's own
    assert colorize.peak_memory_gb(torch.device('cpu')) is None  # not measured: no 'mem' in the line
    entry = dict(step=1, loss=1.0, lr=0.1, img_per_s=10.0, peak_mem_gb=None)
    assert colorize.progress_line(entry, 2, 10).endswith('| ETA 0:00:01')
    assert colorize.progress_line(dict(entry, peak_mem_gb=2.0), 2, 10).endswith('| ETA 0:00:01 | mem 2.0 GB')


def test_one_device_modes_refuse_torchrun(monkeypatch, capsys, tmp_path):
    # Under torchrun each process would benchmark or colorize on its own, all printing and writing.
    monkeypatch.setenv('WORLD_SIZE', '2')
    for argv in (['--benchmark', '--out', str(tmp_path)], ['--colorize', str(tmp_path), '--checkpoint', 'x.pt']):
        assert colorize.main(argv) == 2
        assert 'not torchrun' in capsys.readouterr().err
    assert ft.main(['--task', 'cls', '--out', str(tmp_path)]) == 2
    assert 'not torchrun' in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_flags_that_the_mode_does_not_read_are_refused(capsys, tmp_path):
    """A flag typed for a mode that never reads it (--colorize reads the checkpoint's network; training has no
    --checkpoint; --benchmark builds a fresh colorizer) was silently ignored; now one line, before any work."""
    out, img = tmp_path / 'out', tmp_path / 'x.jpg'
    cases = [  # (argv, the flag named, the hint)
        (['--colorize', str(img), '--checkpoint', 'c.pt', '--loss', 'l2'], '--loss does not apply to --colorize', ''),
        (['--colorize', str(img), '--checkpoint', 'c.pt', '--out', str(out)], '--out does not apply', '--output names'),
        (['--colorize', str(img), '--checkpoint', 'c.pt', '--resume'], '--resume does not apply to --colorize', ''),
        (['--colorize', str(img), '--benchmark'], 'two modes', ''),
        (['--out', str(out), '--checkpoint', 'c.pt'], '--checkpoint does not apply to training', '--resume CKPT'),
        (['--out', str(out), '--output', str(out)], '--output does not apply to training', '--out names'),
        (['--out', str(out), '--net-short-side', '100'], '--net-short-side does not apply to training', ''),
        (['--out', str(out), '--bench-steps', '5'], '--bench-steps does not apply to training', ''),
        (['--benchmark', '--out', str(out), '--objective', 'classify'], '--objective does not apply to --bench', ''),
        (['--benchmark', 'train', '--out', str(out), '--steps', '5'], '--steps does not apply', '--bench-steps'),
        (['--benchmark', '--out', str(out), '--val-data', str(tmp_path)], '--val-data does not apply', ''),
        (['--benchmark', '--out', str(out), '--resume'], '--resume does not apply to --benchmark', ''),
    ]
    for argv, named, hint in cases:
        assert colorize.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert named in err and hint in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert not any(tmp_path.iterdir())
    # --benchmark's kinds share its flags (a script may pass the same to each): one warning line names those
    # that the kind does not read.
    args = colorize.parse_args(['--benchmark', 'colorize', '--batch-size', '4', '--bench-steps', '2', '--crop', '32'])
    assert colorize.unread_flags_problem(args) is None
    assert capsys.readouterr().err == ('warning: --benchmark colorize does not read --batch-size (other kinds of '
                                       '--benchmark do)\n')
    args = colorize.parse_args(['--benchmark', 'loader', '--bench-profile', '--bench-photo', '6', '8'])
    assert colorize.unread_flags_problem(args) is None
    assert '--bench-photo, --bench-profile' in capsys.readouterr().err


def test_finetune_flags_that_export_or_summarize_do_not_read_are_refused(tmp_path, capsys):
    """--export and --summarize read a few flags; the others (--task, --out, ...) were ignored in silence."""
    for argv, named in ((['--summarize', str(tmp_path), '--task', 'seg'], '--task does not apply to --summarize'),
                        (['--export', str(tmp_path / 'e.pth'), '--init', 'random', '--out', str(tmp_path / 'o')],
                         '--out does not apply to --export, which would ignore it (--export names the file'),
                        (['--export', str(tmp_path / 'e.pth'), '--init', 'random', '--steps', '5'], '--steps does'),
                        (['--export', str(tmp_path / 'e.pth'), '--summarize', str(tmp_path)], 'two modes')):
        assert ft.main(argv) == 2
        assert named in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    assert ft.unread_flags_problem(ft.parse_args(['--export', 'e.pth', '--init', 'c.pt', '-a', 'vgg16', '--width',
                                                  '0.5', '--fc-dim', '16', '--seed', '1'])) is None


def test_finetune_flags_that_the_run_does_not_read_are_refused(tmp_path, capsys):
    """Flags of the other task, --label-seed without --label-fraction, --shift-* without --feature-shift and
    --dropout for cls on a ResNet (no fc6/fc7) were ignored in silence (and split --summarize's groups)."""
    cpu = torch.device('cpu')
    for argv, named in ((['--task', 'cls', '--points', '64'], '--points applies to --task seg'),
                        (['--task', 'cls', '--head-dim', '64'], '--head-dim applies to --task seg'),
                        (['--task', 'seg', '--test-crops', '3'], '--test-crops applies to --task cls'),
                        (['--label-seed', '2'], '--label-seed chooses the --label-fraction subset'),
                        (['--shift-images', '8'], '--shift-images is a setting of --feature-shift'),
                        (['--shift-pool', '2'], '--shift-pool is a setting of --feature-shift'),
                        (['--task', 'cls', '-a', 'resnet50', '--dropout', '0.3'], 'which resnet50 does not have')):
        with pytest.raises(ft.UserError, match=re.escape(named)):
            ft.fill_defaults(ft.parse_args(argv), cpu)
    for argv in (['--task', 'seg', '--points', '64', '--head-dim', '64', '-a', 'resnet50', '--dropout', '0.3'],
                 ['--task', 'cls', '--test-crops', '3', '-a', 'vgg16', '--dropout', '0.3'],
                 ['--label-fraction', '0.5', '--label-seed', '2'], ['--feature-shift', '--shift-images', '8']):
        ft.fill_defaults(ft.parse_args(argv), cpu)
    # Refused before the run folder is made.
    assert ft.main(['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--device', 'cpu',
                    '--out', str(tmp_path / 'run'), '--label-seed', '1']) == 2
    assert '--label-seed' in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_finetune_refuses_a_mistyped_flag_before_it_builds_the_init_trunk(tmp_path, capsys, monkeypatch):
    # _run built the --init trunk (seconds for a full VGG-16) before fill_defaults' one-line checks, because
    # --init can set the arch; the checks that do not need the arch now come first.
    base = ['--device', 'cpu', '--out', str(tmp_path / 'run')]

    def built(*a, **k):
        raise AssertionError('the --init trunk was built before the flags were checked')
    with monkeypatch.context() as m:
        m.setattr(ft, 'random_trunk', built)
        m.setattr(ft, 'read_weights', built)
        for argv, named in ((['--init', 'random', '--task', 'cls', '--points', '8'], '--points applies to --task seg'),
                            (['--init', 'random', '--task', 'seg', '--crop', '4', '--points', '17'],
                             '--points 17: a 4 crop has only 16 pixels'),
                            (['--init', str(tmp_path / 'x.pt'), '--scale', '2', '1'], '--scale 2.0 1.0'),
                            (['--init', 'random', '--voc-root', 'VOC', '--demo-root', 'demo'], '--demo-root is where')):
            assert ft.main(argv + base) == 2
            assert named in capsys.readouterr().err
    # The checks that need the arch still run, once --init has resolved it (no -a typed), in the same words.
    colorize_checkpoint(tmp_path / 'r50-color.pt', 'resnet50')
    assert ft.main(['--init', str(tmp_path / 'r50-color.pt'), '--task', 'cls', '--dropout', '0.3'] + base) == 2
    assert 'error: --dropout applies to fc6 and fc7 in --task cls, which resnet50 does not have' in \
        capsys.readouterr().err
    least = colorize.min_crop('vgg16')
    assert ft.main(['--init', 'random', '--width', '0.0625', '--fc-dim', '16', '--crop', str(least - 1)] + base) == 2
    assert f'--crop {least - 1} is too small for -a vgg16' in capsys.readouterr().err
    assert ft.main(['--init', str(tmp_path / 'r50-color.pt'), '--fc-dim', '32', '--points', '8'] + base) == 2
    assert capsys.readouterr().err.startswith('error: --points')  # refused alone, without the --fc-dim warning
    # With -a typed too (its checks then come first): a refusal of --init's reading still prints alone.
    assert ft.main(['--init', str(tmp_path / 'r50-color.pt'), '-a', 'resnet50', '--fc-dim', '32', '--width',
                    str(TINY['width'] * 2)] + base) == 2
    assert capsys.readouterr().err.startswith('error: --width')
    assert not (tmp_path / 'run').exists()


def test_data_flags_that_the_run_does_not_read_are_refused():
    """--val-data without --data was ignored in silence (the demo world's own val set validated the run), and
    --demo-root beside --data (--voc-root) too."""
    cpu = torch.device('cpu')
    with pytest.raises(colorize.UserError, match='--val-data without --data'):
        colorize.fill_defaults(colorize.parse_args(['--val-data', 'val']), cpu, 1)
    with pytest.raises(colorize.UserError, match='--demo-root is where the demo world goes'):
        colorize.fill_defaults(colorize.parse_args(['--data', 'train', '--demo-root', 'demo']), cpu, 1)
    with pytest.raises(colorize.UserError, match='--demo-root is where the demo world goes'):
        ft.fill_defaults(ft.parse_args(['--voc-root', 'VOCdevkit', '--demo-root', 'demo']), cpu)
    colorize.fill_defaults(colorize.parse_args(['--data', 'train', '--val-data', 'val']), cpu, 1)
    colorize.fill_defaults(colorize.parse_args(['--demo-root', 'demo']), cpu, 1)
    ft.fill_defaults(ft.parse_args(['--demo-root', 'demo']), cpu)


def test_flags_of_the_other_objective_are_refused_or_named(tmp_path, capsys):
    """--classes without --objective classify was ignored in silence: refused. The colour targets' flags with
    it change nothing (a script may pass them to both objectives): a warning names them."""
    # (a --data that does not exist: --classes is refused before it is read)
    assert colorize.main(['--device', 'cpu', '--out', str(tmp_path / 'run'), '--data', str(tmp_path / 'none'),
                          '--classes', '5']) == 2
    assert '--classes applies to --objective classify' in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
    args = colorize.parse_args(['--objective', 'classify', '--classes', '5', '--crop', '32', '--loss', 'l2',
                                '--points', '16', '--border', '4', '--target-window', '1', '--lightness-weight'])
    assert colorize.fill_defaults(args, torch.device('cpu'), 1).classes == 5
    assert capsys.readouterr().err == ('warning: --objective classify does not read --border, --lightness-weight, '
                                       '--loss, --points, --target-window (the colour targets\' flags): they '
                                       'change nothing here\n')
    colorize.fill_defaults(colorize.parse_args(['--points', '16', '--crop', '32']), torch.device('cpu'), 1)
    assert capsys.readouterr().err == ''
    # A run refused for another reason prints its error alone, not a warning first.
    with pytest.raises(colorize.UserError, match='--border must be at least 0'):
        colorize.fill_defaults(colorize.parse_args(['--objective', 'classify', '--loss', 'l2', '--border', '-1',
                                                    '-a', 'resnet50', '--fc-dim', '16']), torch.device('cpu'), 1)
    assert capsys.readouterr().err == ''
    # --loss l2 regresses the pixel's own (a, b): a --target-window was ignored in silence.
    with pytest.raises(colorize.UserError, match='--loss l2 regresses each pixel.s own'):
        colorize.fill_defaults(colorize.parse_args(['--loss', 'l2', '--target-window', '3']), torch.device('cpu'), 1)
    for loss in ('ab', 'huechroma'):
        colorize.fill_defaults(colorize.parse_args(['--loss', loss, '--target-window', '3']), torch.device('cpu'), 1)


def test_device_flag_names_a_gpu_with_an_index(monkeypatch, capsys):
    """`--device cuda` means the current GPU: torch.cuda.set_device refuses a bare 'cuda' (the first
    GPU run failed on it). torch.cuda's answers are faked, so this runs on a CPU."""
    from argparse import Namespace
    chosen = []
    for name in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', chosen.append)
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (9, 0))
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:  # (torch 2.4's backend flags cannot be monkeypatched)
        assert colorize.setup_device(Namespace(device='cuda'))[0] == torch.device('cuda', 1)
        assert colorize.setup_device(Namespace(device='cuda:0'))[0] == torch.device('cuda', 0)
        assert colorize.setup_device(Namespace(device=None))[0] == torch.device('cuda', 0)  # LOCAL_RANK 0
        assert 'bfloat16' not in capsys.readouterr().err
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda device=None: (7, 0))  # a V100
        colorize.setup_device(Namespace(device='cuda:0'))
        assert 'compute capability 7.0, without native bfloat16' in capsys.readouterr().err
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags
    assert chosen == [torch.device('cuda', 1), torch.device('cuda', 0), torch.device('cuda', 0), torch.device('cuda', 0)]
    with pytest.raises(colorize.UserError, match='has 2 CUDA device'):
        colorize.setup_device(Namespace(device='cuda:2'))
    with pytest.raises(colorize.UserError, match='not a device'):
        colorize.setup_device(Namespace(device='gpu'))
    for name in ('mps', 'xpu:0', 'meta'):  # valid torch devices this code never ran on: refused, not a traceback later
        with pytest.raises(colorize.UserError, match=f'--device {name}: this code runs on cuda .* or cpu .* only'):
            colorize.setup_device(Namespace(device=name))
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(colorize.UserError, match='is_available'):
        colorize.setup_device(Namespace(device='cuda'))
    assert colorize.setup_device(Namespace(device='cpu'))[0] == torch.device('cpu')


def test_torchrun_with_one_process_starts_a_process_group_for_pretraining_only(monkeypatch):
    # Pre-training under torchrun runs DDP even in one process (so one GPU can test the NCCL path);
    # fine-tuning trains on one device and starts none.
    from argparse import Namespace
    import torch.distributed as dist
    for name, value in dict(RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
                            MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(name, value)
    watched = []  # started by torchrun (TORCHELASTIC_RUN_ID), a rank stops when torchrun is killed
    monkeypatch.setattr(data, 'exit_with_parent', lambda pid, message: watched.append(pid))
    try:
        assert colorize.setup_device(Namespace(device='cpu'), distributed=False)[:3] == (torch.device('cpu'), 0, 1)
        assert not dist.is_initialized() and watched == []  # the variables alone: not torchrun's process
        monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'none')
        colorize.setup_device(Namespace(device='cpu'))
        assert dist.is_initialized() and dist.get_backend() == 'gloo' and dist.get_world_size() == 1
        assert watched == [os.getppid()]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_lr_schedule_by_hand():
    args = colorize.parse_args(['--steps', '100', '--lr', '1.0', '--warmup', '4'])
    got = [colorize.lr_at(s, args) for s in (0, 3, 4, 49, 50, 74, 75, 87, 88, 99)]
    assert got == pytest.approx([0.25, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    # Milestones are fractions of --steps: step counts (500 of 1000) never dropped the lr, and 0 dropped it
    # from the first step, in silence; both scripts refuse them.
    cpu = torch.device('cpu')
    for milestones in (['500', '750'], ['0', '0.5'], ['0.5', '1']):
        with pytest.raises(colorize.UserError, match='each is a fraction of --steps, between 0 and 1'):
            colorize.fill_defaults(colorize.parse_args(['--lr-milestones', *milestones]), cpu, 1)
        with pytest.raises(colorize.UserError, match='each is a fraction of --steps, between 0 and 1'):
            ft.fill_defaults(ft.parse_args(['--lr-milestones', *milestones]), cpu)
    assert colorize.fill_defaults(colorize.parse_args(['--lr-milestones', '0.01', '0.99']), cpu, 1).lr_milestones == [
        0.01, 0.99]


def test_resume_with_other_steps_says_when_the_learning_rate_moves():
    """The milestones are fractions of --steps: a finished 1000-step run resumed to 2000 trains its step 1001 at
    1e-3 x 0.1 (one milestone passed, 0.5 x 2000) where it had 1e-3 x 0.1^3, in silence before."""
    cpu, lines = torch.device('cpu'), []
    first = colorize.fill_defaults(colorize.parse_args(['--steps', '1000', '--lr', '1e-3']), cpu, 1)
    ckpt = dict(args=colorize.plain_args(first), step=1000)
    colorize.resume_settings(colorize.parse_args(['--steps', '2000']), ckpt, Path('run/checkpoint.pt'), 1,
                             log=lines.append)
    assert lines[-1] == ('the learning rate of step 1001 is 0.0001 where the run had 1e-06 (--lr-milestones are '
                         'fractions of --steps 2000)')
    lines.clear()  # --lr alone: its own line says it all; --steps that moves no milestone past step 400: none
    colorize.resume_settings(colorize.parse_args(['--lr', '0.01']), ckpt, Path('run/checkpoint.pt'), 1,
                             log=lines.append)
    colorize.resume_settings(colorize.parse_args(['--steps', '1000']), dict(ckpt, step=400),
                             Path('run/checkpoint.pt'), 1, log=lines.append)
    assert not any('learning rate of step' in line for line in lines)


def test_finetune_resume_with_other_steps_says_when_the_learning_rate_moves(tmp_path, capsys):
    """finetune_voc.py likewise: cls halves the rate at each eighth of --steps, so a finished 800-step run
    resumed to 1600 trains step 801 at 1e-3 x 0.5^4 where it had 1e-3 x 0.5^7."""
    first = ft.fill_defaults(ft.parse_args(['--init', 'random', '--steps', '800']), torch.device('cpu'))
    path = tmp_path / 'checkpoint.pt'
    torch.save(dict(model={}, optimizer={}, config=dict(objective='voc-cls'), args=colorize.plain_args(first),
                    step=800), path)
    args = ft.parse_args(['--resume', str(path), '--steps', '1600'])
    args.git_commit = None  # as _run sets it
    ft.read_resume(args)
    assert (f'the learning rate of step 801 is {1e-3 * 0.5 ** 4:g} where the run had {1e-3 * 0.5 ** 7:g} '
            f'(--lr-milestones are fractions of --steps 1600)') in capsys.readouterr().out


def test_resume_with_other_steps_derives_the_intervals_that_were_not_typed(tmp_path, capsys):
    """A 100-step run resumed to 2000 kept the intervals derived from 100 (an evaluation every 20 steps, a
    progress line every 2): those the first start did not type are derived anew (2000 / 50, 2000 / 5), with
    a line; typed ones (then or now) stay, and the same --steps, or a checkpoint without the record, keeps
    the saved ones. finetune_voc.py likewise (2000 / 50, 2000 / 10)."""
    cpu, path, lines = torch.device('cpu'), Path('run/checkpoint.pt'), []
    first = colorize.fill_defaults(colorize.parse_args(['--steps', '100', '--save-every', '10']), cpu, 1)
    assert (first.log_every, first.eval_every, first.save_every) == (2, 20, 10)
    ckpt = dict(args=colorize.plain_args(first), step=100)

    def resumed(argv, ckpt=ckpt):
        args = colorize.parse_args(argv)
        colorize.resume_settings(args, ckpt, path, 1, log=lines.append)
        return colorize.fill_defaults(args, cpu, 1)
    args = resumed(['--steps', '2000'])
    assert (args.log_every, args.eval_every, args.save_every) == (40, 400, 10)
    assert ('--steps 2000: --log-every 40, --eval-every 400 (derived from --steps, where the run had 2, 20; type '
            'them to keep those)') in lines
    args = resumed(['--steps', '2000', '--eval-every', '50'])  # typed now: it wins, and stays typed
    assert (args.log_every, args.eval_every, args.save_every) == (40, 50, 10)
    again = resumed(['--steps', '3000'], dict(args=colorize.plain_args(args), step=2000))
    assert (again.log_every, again.eval_every, again.save_every) == (60, 50, 10)
    lines.clear()
    args = resumed(['--steps', '100'])  # the same --steps: the run's own (exact resume), no line
    assert (args.log_every, args.eval_every, args.save_every) == (2, 20, 10)
    legacy = {k: v for k, v in colorize.plain_args(first).items() if k != 'derived_from_steps'}
    args = resumed(['--steps', '2000'], dict(args=legacy, step=100))
    assert (args.log_every, args.eval_every, args.save_every) == (2, 20, 10)
    assert not any('derived from --steps' in line for line in lines)
    first = ft.fill_defaults(ft.parse_args(['--init', 'random', '--steps', '100', '--log-every', '5']), cpu)
    assert (first.log_every, first.save_every) == (5, 10)
    torch.save(dict(model={}, optimizer={}, config=dict(objective='voc-cls'), args=colorize.plain_args(first),
                    step=100), tmp_path / 'checkpoint.pt')
    args = ft.parse_args(['--resume', str(tmp_path / 'checkpoint.pt'), '--steps', '2000'])
    args.git_commit = None  # as _run sets it
    ft.read_resume(args)
    ft.fill_defaults(args, cpu)
    assert (args.log_every, args.save_every) == (5, 200)
    assert ('--steps 2000: --save-every 200 (derived from --steps, where the run had 10; type them to keep '
            'those)') in capsys.readouterr().out
    with pytest.raises(ft.UserError, match='--log-every must be positive, got 0'):  # it was taken as not given
        ft.fill_defaults(ft.parse_args(['--log-every', '0']), cpu)


def test_sample_grid_names_sort_in_step_order_within_a_run(capsys):
    """Sample grids were samples/step_%06d.png: a run of more than 999,999 steps (the paper's 16M images at batch
    8: 2M steps) named step_1000000.png, which sorts before step_200000.png. The width is now the kept
    checkpoints' 7 digits, or those of the first start's --steps when more, kept by every resume (mixed
    widths would sort wrongly too); a run from before (no record) keeps its 6, with a warning when --steps
    outgrows them."""
    cpu, path, lines = torch.device('cpu'), Path('run/checkpoint.pt'), []
    first = colorize.fill_defaults(colorize.parse_args(['--steps', '100']), cpu, 1)
    huge = colorize.fill_defaults(colorize.parse_args(['--steps', '20000000']), cpu, 1)
    assert (first.sample_digits, huge.sample_digits) == (7, 8)
    names = [f'step_{step:0{first.sample_digits}d}.png' for step in (0, 400_000, 800_000, 1_200_000, 2_000_000)]
    assert sorted(names) == names
    args = colorize.parse_args(['--steps', '9000000'])
    colorize.resume_settings(args, dict(args=colorize.plain_args(first), step=100), path, 1, log=lines.append)
    assert colorize.fill_defaults(args, cpu, 1).sample_digits == 7 and not any('warning' in x for x in lines)
    legacy = {k: v for k, v in colorize.plain_args(first).items() if k != 'sample_digits'}
    args = colorize.parse_args(['--steps', '2000000'])
    colorize.resume_settings(args, dict(args=legacy, step=100), path, 1, log=lines.append)
    assert colorize.fill_defaults(args, cpu, 1).sample_digits == 6
    assert ('warning: --steps 2000000 has more digits than the names of this run\'s sample grids '
            '(samples/step_000000.png): from step 1000000 on, they sort out of step order by name (step_1000000.png '
            'before step_200000.png)') in lines
    with pytest.raises(colorize.UserError, match="sample_digits is '7', not a number of digits"):
        colorize.resume_settings(colorize.parse_args([]), dict(args=dict(legacy, sample_digits='7'), step=100),
                                 path, 1, log=None)


def test_paper_defaults():
    args = colorize.parse_args([])
    assert (args.target_window, args.loss, args.momentum, args.weight_decay) == (7, 'huechroma', 0.9, 5e-4)
    assert args.lr_milestones == [0.5, 0.75, 0.875]  # 1.0M, 1.5M, 1.75M of 2M iterations
    # The head: Linear(hypercolumn, 1024) -> ReLU -> Dropout(0.5) -> Linear (DESIGN 4). make_model
    # passes neither size nor rate: they are build_model's defaults.
    head = colorize.make_model(dict(arch='alexnet', loss='huechroma', width=1 / 16, fc_dim=16)).head
    assert head.fc1.out_features == 1024 and head.dropout.p == 0.5


def test_step_seeds_differ_across_steps_ranks_and_seeds():
    # A seed that ignored the step would draw the same pixels and dropout at every step.
    seeds = {colorize.step_seed(seed, step, rank) for seed in range(3) for step in range(2000) for rank in range(8)}
    assert len(seeds) == 3 * 2000 * 8


def test_grayscale_images_weigh_nothing_in_a_training_step():
    """A training step's loss does not depend on what the GRAY- and BAD-status images hold, and
    does on what an OK one holds (eval mode: BatchNorm's batch statistics and dropout set aside)."""
    args = colorize.parse_args(['--points', '8', '--border', '4'])
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    other = images.clone()
    other[2:] = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=g)
    torch.manual_seed(0)
    model = build_model('vgg16', lab.output_dim('huechroma'), head_dim=16, width=1 / 16, fc_dim=16).eval()

    def loss(batch, status):
        torch.manual_seed(1)  # the same pixels
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return colorize.train_step(model, opt, batch, torch.tensor(status), args, torch.device('cpu'))[0].item()
    ok, gray, bad = data.STATUS_OK, data.STATUS_GRAY, data.STATUS_BAD
    assert loss(images, [ok, ok, gray, bad]) == loss(other, [ok, ok, gray, bad])
    assert loss(images, [ok, ok, ok, bad]) != pytest.approx(loss(other, [ok, ok, ok, bad]), rel=1e-3)


def test_classify_step_weighs_gray_photos_and_not_unreadable_ones():
    """--objective classify trains on grayscale photos (README: its loss weighs only unreadable ones by zero):
    the step's loss is the mean cross-entropy over the OK and GRAY images, by hand from the model's logits;
    what a BAD one holds changes nothing. (Weighing only OK images, as colorization does, passed every test.)"""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.tensor([0, 2, 1, 1])
    torch.manual_seed(0)
    model = colorize.Classifier(alexnet(width=1 / 16, fc_dim=16), classes=3).eval()
    with torch.no_grad():
        logits = model(lab.lightness_input(lab.rgb_to_lab(images)))
    ce = [-torch.log_softmax(logits[i], 0)[labels[i]].item() for i in range(4)]

    def loss(batch, status):
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        return colorize.classify_step(model, opt, batch, torch.tensor(status), labels, None, torch.device('cpu'))[0].item()
    ok, gray, bad = data.STATUS_OK, data.STATUS_GRAY, data.STATUS_BAD
    assert loss(images, [ok, gray, gray, bad]) == pytest.approx((ce[0] + ce[1] + ce[2]) / 3, rel=1e-5)
    assert loss(images, [bad, ok, bad, bad]) == pytest.approx(ce[1], rel=1e-5)
    other = images.clone()
    other[3] = 255 - other[3]
    assert loss(images, [ok, gray, gray, bad]) == loss(other, [ok, gray, gray, bad])
    # Each step's gradient is its own batch's, not summed over the steps before (four ran above):
    # autograd of the mean cross-entropy of the 3 counted images, on a copy. (Without the zero_grad, every
    # test passed.)
    ref = copy.deepcopy(model)
    ref.zero_grad()
    F.cross_entropy(ref(lab.lightness_input(lab.rgb_to_lab(other)))[:3], labels[:3]).backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_both_classifiers_average_pool_the_deepest_tap():
    """colorize.Classifier (--objective classify) and finetune_voc.VOCClassifier: the deepest tap, averaged over
    its cells (F.adaptive_avg_pool2d to 1 x 1), then the linear layer. Max-pooling instead passed every test."""
    torch.manual_seed(0)
    trunk = alexnet(width=1 / 16, fc_dim=16).eval()
    x = torch.randn(2, 1, 64, 64)
    for model, linear in ((colorize.Classifier(trunk, classes=3), 'fc'), (ft.VOCClassifier(trunk), 'classifier')):
        with torch.no_grad():
            deepest = trunk(x)[-1]
            assert deepest.shape[-2:] == (2, 2)
            torch.testing.assert_close(model(x), getattr(model, linear)(F.adaptive_avg_pool2d(deepest, 1).flatten(1)))


def test_loss_norm_under_ddp(monkeypatch):
    # Two replicas with 5 and 1 valid pixels: each divides its sum by 6 / 2 = 3, so the average of
    # their gradients is that of the mean over the 6 pixels.
    monkeypatch.setattr(colorize.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(colorize.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(colorize.dist, 'all_reduce', lambda t: t.add_(1))  # the other replica's count
    count = torch.tensor(5)
    assert colorize.loss_norm(count).item() == 3.0 and count.item() == 5  # the caller's count untouched
    assert colorize.loss_norm(torch.tensor(0)).item() == 0.5  # (0 + 1) / 2 on a replica of gray images


def test_parameter_groups_by_name():
    # Weight decay on conv and linear weights; none on biases (and BatchNorm's affine parameters).
    model = build_model('resnet50', 5, head_dim=8, width=1 / 16)
    decay, plain = colorize.parameter_groups(model, 5e-4)
    named = dict(model.named_parameters())
    by_id = {id(p): n for n, p in named.items()}
    want_decay = {n for n in named if n.endswith('.weight') and '.bn.' not in n}
    assert {by_id[id(p)] for p in decay['params']} == want_decay and decay['weight_decay'] == 5e-4
    assert {by_id[id(p)] for p in plain['params']} == set(named) - want_decay and plain['weight_decay'] == 0.0
    assert any(n.endswith('.bias') for n in set(named) - want_decay)


def test_psnr_by_hand():
    a = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8
    assert colorize.psnr(a + 0.1, a).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01: 10 log10(1 / 0.01)
    # Averaged over images, not the PSNR of the pooled MSE: MSE 0.01 (20 dB) and 0.0001 (40 dB) give
    # 30 dB (the pooled 0.00505 would give 22.97).
    off = torch.tensor([0.1, 0.01]).view(2, 1, 1, 1)
    assert colorize.psnr(a + off, a).item() == pytest.approx(30.0, abs=1e-3)


@pytest.mark.parametrize('loss', ['huechroma', 'l2', 'ab'])
def test_training_under_bf16_autocast(folders, tmp_path, monkeypatch, loss):
    """The CUDA recipe's bf16 autocast, run on the CPU: dtypes must meet (targets and losses in float32,
    the network in bf16), the loss stays finite and the checkpoint keeps float32 weights."""
    entered = []

    def bf16(device):
        entered.append(device.type)
        return torch.autocast('cpu', dtype=torch.bfloat16)
    monkeypatch.setattr(colorize, 'autocast', bf16)
    train, val = folders
    out = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--eval-every', '4', '--loss', loss)) == 0
    assert entered  # the training step and the evaluation went through autocast
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert all(math.isfinite(e['loss']) for e in log) and [e['step'] for e in log if e.get('eval')] == [0, 4]
    state = _state(out / 'checkpoint.pt')['model']
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_benchmark_colorize_times_bench_steps_calls_after_bench_warmup_calls(tmp_path, monkeypatch, capsys):
    """--benchmark colorize timed 3 calls (10 on a GPU) after 1 warm-up call whatever --bench-steps and
    --bench-warmup said, with a warning that it did not read them: it reads them, and those counts stay its
    defaults. Each network short side gets the warm-up calls, the timed calls, then one call counting FLOPs."""
    monkeypatch.setattr(colorize, '_matmul_tflops', lambda device, n: 1.0)  # the roof, read by nothing here
    colorize_array, sides = colorize.colorize_array, []

    def counted(model, photo, loss, device, short_side):
        sides.append(short_side)
        return colorize_array(model, photo, loss, device, short_side)
    monkeypatch.setattr(colorize, 'colorize_array', counted)
    tiny = ['--benchmark', 'colorize', '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--short-side', '32',
            '40', '--bench-photo', '36', '48', '--out', str(tmp_path), '--device', 'cpu']
    assert colorize.main(tiny + ['--bench-warmup', '0', '--bench-steps', '2']) == 0
    assert sides == [36] * (0 + 2 + 1) + [0] * (0 + 2 + 1)  # at --net-short-side (the middle, 36), at its own
    rows = json.loads((tmp_path / 'benchmark.json').read_text())['colorize']
    assert [(r['calls'], r['warmup_calls']) for r in rows] == [(2, 0), (2, 0)]
    assert 'does not read' not in capsys.readouterr().err
    args = colorize.parse_args(tiny)  # untyped: today's counts, which the calls above show bench_counts to rule
    assert [colorize.bench_counts(args, torch.device(d), colorizing=True) for d in ('cpu', 'cuda')] == [(1, 3), (1, 10)]
    assert colorize.bench_counts(args, torch.device('cuda')) == (10, 20)  # training steps'
    for flag, value in (('--bench-steps', '0'), ('--bench-warmup', '-1')):
        assert colorize.main(tiny + [flag, value]) == 2
        assert f'{flag} must be at least' in capsys.readouterr().err


def test_benchmark_mode_tiny(folders, tmp_path, monkeypatch, capsys):
    train, val = folders
    out = tmp_path / 'bench'
    # The matmul reference (which nothing below reads) at 256 rather than 2048: 1.1 s on one core.
    matmul_tflops = colorize._matmul_tflops
    monkeypatch.setattr(colorize, '_matmul_tflops', lambda device, n: matmul_tflops(device, 256))
    assert colorize.main(bench_args(train, out, '--benchmark', '--bench-warmup', '1', '--bench-steps', '2',
                                    '--bench-photo', '60', '100', '--bench-profile')) == 0
    info = json.loads((out / 'benchmark.json').read_text())
    rows = info['rows']
    assert [(r['model'], r['data'].split()[0]) for r in rows] == [
        ('colorizer', 'synthetic'), ('classifier', 'synthetic'), ('gathers', 'synthetic'), ('colorizer', 'loader'),
        ('loader', 'alone')]
    assert all(r['img_per_s'] > 0 and r['ms_per_step'] > 0 for r in rows)
    assert all(r['tflops'] == pytest.approx(r['gflops_per_img'] * r['img_per_s'] / 1000) for r in rows)
    assert 0 <= rows[3]['host_wait_ms'] <= rows[3]['ms_per_step']  # the end-to-end row splits the host's time
    if os.path.exists('/proc/self/task'):  # and says where the CPU went (Linux): no workers here, all in-process
        cpus = [rows[3]['cpu'], rows[4]['cpu']]
        assert all(c['workers_ms_per_image'] == c['workers_busy'] == 0 for c in cpus)
        # The machine's figures come from /proc/stat's 10 ms ticks: the loader-alone row's window
        # (2 batches of a few ms) may hold none, so only the end-to-end row must show work.
        assert cpus[0]['main_thread_ms_per_step'] > 0 and cpus[0]['machine_busy_cores'] > 0
        assert all(0 <= c['machine_busy_cores'] <= c['machine_cores'] for c in cpus)
    # The gathers-only colorizer is the same network: the same FLOPs (the network's, not the taps'
    # matmul reads).
    assert rows[2]['gflops_per_img'] == rows[0]['gflops_per_img']
    # --bench-profile: each step's time by kernel family (on a CPU: ops); the families split the
    # total, the convolutions are found among them, and the longest ones are listed in a file.
    for name in ('colorizer', 'classifier'):
        profile = next(r for r in rows if r['model'] == name)['profile']
        assert sum(profile['families_ms'].values()) == pytest.approx(profile['total_ms'])
        assert profile['families_ms']['conv/matmul'] > 0
        assert 'convolution' in (out / f'profile-{name}.txt').read_text()
    # FLOPs per image of the classifier against a hand count: VGG-16 at width 1/16 on a 32 crop,
    # (c_in, c_out, kernel, map side) per conv, 2 FLOPs per multiply-add; a training step is the
    # forward, the weight gradient and the input gradient (3x), except conv1_1's input gradient.
    convs = [(1, 4, 3, 32), (4, 4, 3, 32), (4, 8, 3, 16), (8, 8, 3, 16), (8, 16, 3, 8), (16, 16, 3, 8),
             (16, 16, 3, 8), (16, 32, 3, 4), (32, 32, 3, 4), (32, 32, 3, 4), (32, 32, 3, 2), (32, 32, 3, 2),
             (32, 32, 3, 2), (32, 16, 7, 1), (16, 16, 1, 1)]
    forward = sum(2 * ci * co * k * k * s * s for ci, co, k, s in convs) + 2 * 16 * 1000
    by_hand = 3 * forward - 2 * 1 * 4 * 9 * 32 * 32
    assert rows[1]['gflops_per_img'] * 1e9 == pytest.approx(by_hand, rel=1e-6)
    assert rows[0]['gflops_per_img'] > rows[1]['gflops_per_img']  # the colorizer adds its head
    # Colorizing: at the middle of the training short sides (32..55 -> 44) and at the photo's own
    # 60 px short side, which costs more (padded to 64x128 rather than 64x96).
    small, own = info['colorize']
    assert (small['net_short_side'], own['net_short_side'], own['photo']) == (44, 0, '100x60')
    assert 0 < small['gflops'] < own['gflops'] and small['seconds'] > 0
    printed = capsys.readouterr().out
    assert 'colorizer / classifier FLOP rate' in printed and 'colorize a 100x60 photo' in printed
    # Tiny settings time a few ms: the cpu lines say what span they cover, and that ticks make it rough.
    spans = [r['cpu']['seconds'] for r in rows[3:5] if r.get('cpu')]
    assert all(f'over {s:.2f} s (under 1 s:' in printed for s in spans) and all(s < 1 for s in spans)
    assert "ms/step waiting for the loader's next batch" in printed
    # --benchmark loader: only the two loader rows, the FLOPs counted alike (the network's).
    # Its rows time 4 batches per loader process, 8 with 2, where --bench-steps says 2 (in-process: 2).
    assert colorize.main(bench_args(train, tmp_path / 'loader', '--benchmark', 'loader', '--bench-warmup', '1',
                                    '--bench-steps', '2', '--workers', '2')) == 0
    alone = json.loads((tmp_path / 'loader' / 'benchmark.json').read_text())
    assert [(r['model'], r['data'].split()[0]) for r in alone['rows']] == [('colorizer', 'loader'), ('loader', 'alone')]
    assert [r['steps'] for r in alone['rows']] == [8, 8] and [r['steps'] for r in rows[3:]] == [2, 2]
    assert alone['rows'][0]['gflops_per_img'] == pytest.approx(rows[0]['gflops_per_img']) and 'colorize' not in alone
    assert alone['switch_interval'] == sys.getswitchinterval() and alone['sharing_strategy'] in ('file_descriptor',
                                                                                               'file_system')
    # Those FLOPs are the network's: torch's own count of a forward+backward with every tap read by
    # gathers (matmul_cells 0), not with the matmul reads that the model's default (1024) would add,
    # and the model's setting is back afterwards.
    from torch.utils.flop_counter import FlopCounterMode
    net = colorize.make_model(dict(arch='vgg16', objective='colorize', loss='huechroma', width=0.0625, fc_dim=16))
    x, pts = torch.randn(2, 1, 32, 32), torch.tensor([[[5.0, 7.0], [20.0, 9.0]]] * 2)

    def forward_backward(cells):
        net.matmul_cells, counter = cells, FlopCounterMode(display=False)
        with counter:
            net(x, pts).sum().backward()
        return counter.get_total_flops()
    gathers, matmuls = forward_backward(0), forward_backward(1024)
    assert gathers < matmuls and net.matmul_cells == models.MATMUL_CELLS == 1024
    assert colorize._flops_per_image(lambda: net(x, pts).sum().backward(), (), 2, net) * 2 == gathers
    assert net.matmul_cells == 1024


def test_checkpoint_tensors_are_saved_from_the_cpu(tmp_path):
    # on_cpu keeps the nesting, the types and the values; the CUDA tests check the devices.
    tree = {'model': {'w': torch.arange(3.0)}, 'opt': [{'m': torch.ones(2)}, (torch.zeros(1), 7)], 'step': 5}
    moved = colorize.on_cpu(tree)
    assert type(moved['opt'][1]) is tuple and moved['opt'][1][1] == 7 and moved['step'] == 5
    assert torch.equal(moved['model']['w'], tree['model']['w']) and torch.equal(moved['opt'][0]['m'], torch.ones(2))
    colorize.atomic_save(tree, tmp_path / 'c.pt')
    assert torch.equal(torch.load(tmp_path / 'c.pt', weights_only=True)['opt'][1][0], torch.zeros(1))


def test_kernel_times_leave_out_cpu_ops_and_annotation_ranges():
    # A GPU profile's events: two kernels, the CPU op that launched one, and the range that an
    # optimizer's record_function draws over its kernels on the GPU timeline (counted once only).
    from types import SimpleNamespace as Event
    cpu, gpu = 'cpu', 'cuda'
    events = [Event(key='sm90_xmma_fprop', device_type=gpu, self_device_time_total=3000.0, count=10),
              Event(key='aten::convolution', device_type=cpu, self_device_time_total=0.0, count=10),
              Event(key='Optimizer.step#SGD.step', device_type=gpu, self_device_time_total=900.0, count=5,
                    is_user_annotation=True),
              Event(key='multi_tensor_apply_kernel', device_type=gpu, self_device_time_total=800.0, count=90)]
    assert colorize.kernel_times(events, 5, True, gpu) == [(0.6, 2.0, 'sm90_xmma_fprop'),
                                                          (0.16, 18.0, 'multi_tensor_apply_kernel')]
    # Where torch marks the annotation ranges (is_user_annotation, torch >= 2.5), a kernel that shares a
    # CPU event's name is a kernel still: the CPU-twin rule below is for torch 2.4's events only.
    twin = Event(key='multi_tensor_apply_kernel', device_type=cpu, self_device_time_total=0.0, count=90,
                 is_user_annotation=False)
    assert colorize.kernel_times(events + [twin], 5, True, gpu) == [(0.6, 2.0, 'sm90_xmma_fprop'),
                                                                   (0.16, 18.0, 'multi_tensor_apply_kernel')]
    # Torch 2.4's events have no is_user_annotation: the range on the GPU timeline is known by its
    # CPU twin (the record_function range itself), which has the same name.
    old = [Event(**{k: v for k, v in vars(e).items() if k != 'is_user_annotation'}) for e in events]
    old.append(Event(key='Optimizer.step#SGD.step', device_type=cpu, self_device_time_total=0.0, count=5))
    assert colorize.kernel_times(old, 5, True, gpu) == [(0.6, 2.0, 'sm90_xmma_fprop'),
                                                       (0.16, 18.0, 'multi_tensor_apply_kernel')]


def test_kernel_times_keep_triton_kernels_beside_their_launch_ranges():
    # Under torch.compile, Inductor wraps each Triton launch in a CPU range named as the kernel
    # (torch._inductor.runtime.triton_heuristics: _RecordFunctionFast(inductor_meta['kernel_name'])), and
    # the GPU kernel has that name too: the kernel is no annotation range, and counts (both torch eras).
    from types import SimpleNamespace as Event
    cpu, gpu = 'cpu', 'cuda'
    name = 'triton_poi_fused_add_relu_0'
    new = [Event(key=name, device_type=cpu, self_device_time_total=0.0, count=10, is_user_annotation=False),
           Event(key=name, device_type=gpu, self_device_time_total=2000.0, count=10, is_user_annotation=False),
           Event(key='sm90_xmma_fprop', device_type=gpu, self_device_time_total=3000.0, count=10,
                 is_user_annotation=False)]
    assert colorize.kernel_times(new, 5, True, gpu) == [(0.6, 2.0, 'sm90_xmma_fprop'), (0.4, 2.0, name)]
    old = [Event(**{k: v for k, v in vars(e).items() if k != 'is_user_annotation'}) for e in new]
    assert colorize.kernel_times(old, 5, True, gpu) == [(0.6, 2.0, 'sm90_xmma_fprop'), (0.4, 2.0, name)]


def test_kernel_families_of_real_kernel_names():
    # Names as torch.profiler reports them on an H100/H200 (cuDNN, cuBLAS, Inductor, the runtime).
    assert colorize.kernel_family('triton_per_fused__native_batch_norm_legit_functional_convolution_backward_3') \
        == 'triton (fused)'  # a fused kernel named after the ops it fuses is still Inductor's
    assert colorize.kernel_family('sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc') == 'conv/matmul'
    assert colorize.kernel_family('nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_TNN') == 'conv/matmul'
    assert colorize.kernel_family('aten::mkldnn_convolution') == 'conv/matmul'
    assert colorize.kernel_family('Memset (Device)') == 'copy/fill'
    assert colorize.kernel_family('Memcpy HtoD (Pinned -> Device)') == 'copy/fill'
    assert colorize.kernel_family('void at::native::vectorized_elementwise_kernel<4, at::native::AUnaryFunctor<float>') \
        == 'other'


def test_benchmark_timing_drops_queued_batches_after_warmup():
    # Batches a loader queued while the warm-up compiled are dropped, not timed: the timed steps
    # see batches 3 and 4 after warm-up on batch 0 and skipping 1 and 2.
    seen = []
    colorize._timed(lambda i: seen.append(i), [(i,) for i in range(5)], 1, 2, torch.device('cpu'), skip=2)
    assert seen == [0, 3, 4]


def test_benchmark_timing_splits_the_hosts_time_into_waiting_for_batches_and_the_rest(monkeypatch):
    # On a virtual clock: each batch takes 30 ms to arrive and each step 10 ms, so a timed step
    # takes 40 ms, of which the host waited 30 for its batch.
    clock = [0.0]
    monkeypatch.setattr(colorize, 'time', argparse.Namespace(perf_counter=lambda: clock[0]))

    def batches():
        while True:
            clock[0] += 0.030
            yield ()

    def step():
        clock[0] += 0.010

    seconds, _, _, waited = colorize._timed(step, batches(), 2, 5, torch.device('cpu'), skip=1)
    assert seconds == pytest.approx(0.040) and waited == pytest.approx(0.030)


def test_benchmark_timing_counts_recompilations():
    # A new input shape after warm-up makes dynamo compile a second graph, which _timed reports.
    net = torch.compile(nn.Linear(4, 4), backend='eager')
    step = lambda x: net(x)  # noqa: E731
    same = colorize._timed(step, [(torch.ones(2, 4),)] * 4, 2, 2, torch.device('cpu'))
    other = colorize._timed(step, [(torch.ones(2, 4),)] * 2 + [(torch.ones(3, 4),)] * 2, 2, 2, torch.device('cpu'))
    assert same[2] == 0 and other[2] == 1



def _loader_args(workers, handover):
    return argparse.Namespace(crop=16, short_side=[20, 30], objective='colorize', batch_size=4, seed=3,
                              workers=workers, handover=handover)


def test_loader_hand_overs_give_the_same_batches(folders):
    # Batches through shared-memory slots (the default with workers), through DataLoader's own
    # hand-over and in the main process are the same tensors, labels included; the slots are
    # released when the batches' iterator goes.
    paths = data.find_images([folders[0]], log=lambda *a: None)
    labels = [i % 5 for i in range(len(paths))]
    got = {}
    for workers, handover in ((0, 'slots'), (2, 'slots'), (2, 'torch')):
        it = iter(colorize.make_loader(paths, _loader_args(workers, handover), 0, 1, 0, torch.device('cpu'),
                                       labels=labels))
        got[workers, handover] = [next(it) for _ in range(7)]  # past the 2 x 5 slots' first round
        del it
    assert not data.SlotBatches._live
    ref = got[0, 'slots']
    assert [tuple(t.shape) for t in ref[0]] == [(4, 3, 16, 16), (4,), (4,)]
    for key in ((2, 'slots'), (2, 'torch')):
        for batch, expected in zip(got[key], ref):
            assert len(batch) == 3 and all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(batch, expected))



@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
def test_cuda_loader_slots_hand_over_pinned_batches(folders):
    # On CUDA the DataLoader's pinning thread takes batches out of the slots into pinned memory.
    paths = data.find_images([folders[0]], log=lambda *a: None)
    batches = {}
    for workers in (0, 2):
        it = iter(colorize.make_loader(paths, _loader_args(workers, 'slots'), 0, 1, 0, torch.device('cuda')))
        batches[workers] = [next(it) for _ in range(6)]
        del it
    assert all(t.is_pinned() for batch in batches[2] for t in batch)
    assert all(torch.equal(a, b) for x, y in zip(batches[0], batches[2]) for a, b in zip(x, y))

def test_watch_stalls_speaks_while_the_loop_waits_for_a_batch_and_only_then(capsys):
    def batches():
        yield 'a'
        time.sleep(0.5)  # a worker stuck in a read, then answering
        yield 'b'
        time.sleep(0.25)  # and again, shorter
        yield 'c'

    got, said = [], []
    for batch in data.watch_stalls(batches(), after=0.1, who='rank 1: '):
        got.append(batch)
        said.append(capsys.readouterr().err.splitlines())  # what the wait for this batch brought
        if batch == 'a':
            time.sleep(0.3)  # the step's own work: not a wait, even though it outlasts `after`
            assert capsys.readouterr().err == ''
    assert got == ['a', 'b', 'c'] and said[0] == []
    # The 0.5 s wait crosses 0.1, 0.2 and 0.4 s; the 0.25 s one, starting over, 0.1 and 0.2 s (a loaded
    # machine may be late for the last of each).
    assert 2 <= len(said[1]) <= 3 and 1 <= len(said[2]) <= 2
    assert all(line.startswith('rank 1: no batch from the loader for ') for line in said[1] + said[2])
    time.sleep(0.1)  # the thread checks every after / 4 = 25 ms
    assert not any(t.name == 'watch_stalls' for t in threading.enumerate())  # stopped with the loop


def test_slot_batches_refuse_a_batch_overwritten_before_it_was_read(monkeypatch):
    # One worker, two slots: its third batch goes into the first's slot, so the first can no
    # longer be read; what was taken out is a copy that later batches leave alone.
    monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: argparse.Namespace(id=0))
    slots = data.SlotBatches(workers=1, depth=2, batch_size=2, image_shape=(1, 2, 2))

    def batch(v):
        return slots.collate([(torch.full((1, 2, 2), v + i, dtype=torch.uint8), v + i, 7) for i in range(2)])

    first, second, third = batch(10), batch(20), batch(30)
    images, status, label = second.collated(pin=False)
    assert images.shape == (2, 1, 2, 2) and images[:, 0, 1, 1].tolist() == [20, 21]
    assert status.tolist() == [20, 21] and label.tolist() == [7, 7] and status.dtype == label.dtype == torch.int64
    with pytest.raises(RuntimeError, match='overwritten'):
        first.collated(pin=False)
    assert third.collated(pin=False)[0][:, 0, 0, 0].tolist() == [30, 31]
    batch(40)  # into the second's slot
    assert images[:, 0, 1, 1].tolist() == [20, 21]
    # The worker starts its next batch in a slot while the main process copies that slot out (its
    # batch number checked before the copy, and still right then): the torn copy is refused too.
    fifth, shared = batch(60), slots.images

    class WrittenDuringTheCopy:
        def __getitem__(self, key):
            slots.seq[key] = -1  # as collate marks a slot it is writing into
            return shared[key]
    monkeypatch.setattr(slots, 'images', WrittenDuringTheCopy())
    with pytest.raises(RuntimeError, match='overwritten'):
        fifth.collated(pin=False)
    slots.close()
    with pytest.raises(RuntimeError, match='without its SlotBatches'):
        third.collated(pin=False)
    with pytest.raises(RuntimeError, match='num_workers > 0'):
        monkeypatch.setattr(torch.utils.data, 'get_worker_info', lambda: None)
        batch(50)


def test_cpu_seconds_reads_proc_stat_fields_14_and_15(tmp_path):
    # A process name may hold spaces and parentheses; utime and stime are in clock ticks.
    stat = tmp_path / 'stat'
    stat.write_text('42 (a (b) c) R 1 2 3 4 5 6 7 8 9 10 250 150 0 0 20 0\n')
    assert colorize._cpu_seconds(stat) == pytest.approx(400 / os.sysconf('SC_CLK_TCK'))
    assert colorize._cpu_seconds(tmp_path / 'gone') is None


def test_benchmark_rows_say_where_cpu_use_cannot_be_read(monkeypatch, capsys):
    # macOS and Windows have no /proc: no figures, and a line that says why rather than none.
    real_listdir, real_open = os.listdir, open

    def no_proc(real):
        def call(path, *args, **kwargs):
            if os.fspath(path).startswith('/proc'):
                raise FileNotFoundError(2, 'No such file or directory', os.fspath(path))
            return real(path, *args, **kwargs)
        return call
    monkeypatch.setattr(os, 'listdir', no_proc(real_listdir))
    monkeypatch.setattr('builtins.open', no_proc(real_open))
    with colorize.CpuUse() as cpu:
        pass
    assert cpu.result is None and cpu.per_step(steps=2, images=8, workers=1) is None
    colorize.print_row(dict(model='loader', data='alone (1 workers)', img_per_s=10.0, ms_per_step=1.0, cpu=None))
    assert capsys.readouterr().out.splitlines()[1:] == ['  cpu: not measured (it is read from /proc, which only Linux has)']


@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='reads /proc (Linux)')
def test_cpu_use_splits_main_thread_other_threads_and_child_processes():
    # Over one span: the main thread burns 0.2 s of CPU, another thread 0.1 s, a child process 0.3 s
    # (each measured by its own CPU clock, not by /proc).
    child = subprocess.Popen([sys.executable, '-c', textwrap.dedent("""
        import sys, time
        print('ready', flush=True); sys.stdin.readline()
        end = time.process_time() + 0.3
        while time.process_time() < end: pass
        print('done', flush=True); sys.stdin.readline()""")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def burn(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    try:
        assert child.stdout.readline() == 'ready\n'
        with colorize.CpuUse() as cpu:
            child.stdin.write('go\n')
            child.stdin.flush()
            other = threading.Thread(target=burn, args=(0.1,))
            other.start()
            burn(0.2)
            other.join()
            assert child.stdout.readline() == 'done\n'  # burnt, not yet exited: its times still readable
    finally:
        child.communicate('\n', timeout=30)
    r, tick = cpu.result, 1 / os.sysconf('SC_CLK_TCK')
    assert r['main'] == pytest.approx(0.2, abs=3 * tick)
    assert r['other_threads'] == pytest.approx(0.1, abs=3 * tick)
    assert r['children'] == pytest.approx(0.3, abs=4 * tick)
    assert r['machine_busy'] >= r['main'] + r['other_threads'] + r['children'] - 6 * tick
    per = cpu.per_step(steps=10, images=100, workers=1)
    assert per['main_thread_ms_per_step'] == pytest.approx(1000 * r['main'] / 10)
    assert per['workers_ms_per_image'] == pytest.approx(1000 * r['children'] / 100)
    assert per['workers_busy'] == pytest.approx(r['children'] / r['seconds'])

@pytest.mark.skipif(not os.path.exists('/proc/self/task'), reason='reads /proc (Linux)')
def test_cpu_use_machine_share_stays_within_its_cores(monkeypatch):
    # /proc/stat's idle and iowait may step back (the kernel's documentation says so for iowait): here
    # 0.03 s of ticks pass on 4 CPUs while idle steps back 0.01 s, so busy - idle reads 0.04 s.
    readings = iter([(10.00, 50.00, 4), (10.04, 50.03, 4),   # busy above the total: all 4 busy
                     (10.00, 50.00, 4), (10.01, 50.04, 4),   # a quarter of the ticks busy: 1 of 4
                     (10.00, 50.00, 4), (10.00, 50.00, 4)])  # no tick in the span
    monkeypatch.setattr(colorize, '_machine_busy', lambda: next(readings))
    shares = []
    for _ in range(3):
        with colorize.CpuUse() as cpu:
            pass
        per = cpu.per_step(steps=1, images=1, workers=0)
        shares.append((per['machine_busy_cores'], per['machine_cores']))
    assert shares == [(4.0, 4), (pytest.approx(1.0), 4), (0.0, 4)]


def test_objective_classify_runs_with_folder_labels(tmp_path, capsys):
    """The supervised baseline: same loop and checkpoints, label = folder name."""
    root = tmp_path / 'imagenet'
    rng = np.random.default_rng(7)
    for k, level in enumerate((40, 128, 215)):
        for split, n in (('train', 8), ('val', 3)):
            folder = root / split / f'n{k:08d}'
            folder.mkdir(parents=True)
            for i in range(n):
                img = np.clip(level + rng.normal(0, 10, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f'{i}.png')
    argv = tiny_args(root / 'train', root / 'val', tmp_path / 'cls', '--objective', 'classify', '--steps', '6',
                     '--classes', '3')
    assert colorize.main(argv) == 0
    evals = [json.loads(line) for line in (tmp_path / 'cls' / 'log.jsonl').read_text().splitlines()
             if '"eval"' in line]
    assert [e['step'] for e in evals] == [0, 6] and all(0 <= e['top1'] <= 1 for e in evals)
    ckpt = _state(tmp_path / 'cls' / 'checkpoint.pt')
    assert ckpt['config']['objective'] == 'classify' and ckpt['config']['classes'] == [f'n{k:08d}' for k in range(3)]
    assert {k.split('.')[0] for k in ckpt['model']} == {'trunk', 'fc'}
    # Labels: the index of the image's folder among the sorted class folders.
    args = colorize.parse_args(['--data', str(root / 'train'), '--val-data', str(root / 'val'), '--out', str(tmp_path)])
    labels = colorize.class_labels(args, *colorize.image_sources(args, True))
    assert [int(Path(p).parent.name[1:]) for p in labels['train_paths']] == labels['train']
    assert [int(Path(p).parent.name[1:]) for p in labels['val_paths']] == labels['val']
    # --classes K: a fixed subset of the folders, nested in the larger subsets.
    two = colorize.class_labels(colorize.parse_args(['--classes', '2']), labels['train_paths'], labels['val_paths'])
    assert len(two['names']) == 2 and set(two['names']) < set(labels['names'])
    assert all(Path(p).parent.name in two['names'] for p in two['train_paths'] + two['val_paths'])
    # --subset N counts images of the K classes (not N drawn from all, then cut to K classes' share).
    five = colorize.class_labels(colorize.parse_args(['--classes', '2', '--subset', '5']), labels['train_paths'],
                                 labels['val_paths'])
    assert len(five['train_paths']) == len(five['train']) == 5 and five['names'] == two['names']
    assert all(Path(p).parent.name in two['names'] for p in five['train_paths'])
    assert two['merged'] == {}
    # Places365's nested categories: the folder name 'outdoor' in two places is one class, said.
    nested = [f'/p/a/{scene}/outdoor/{i}.jpg' for scene in ('apartment', 'church') for i in range(3)]
    merged = colorize.class_labels(colorize.parse_args([]), nested + ['/p/a/abbey/0.jpg'], nested[:1])
    assert merged['names'] == ['abbey', 'outdoor'] and merged['merged'] == {
        'outdoor': ['/p/a/apartment/outdoor', '/p/a/church/outdoor']}
    # What a run says of it: a class split over two --data roots, its images one class.
    shutil.copytree(root / 'train' / 'n00000001', tmp_path / 'more' / 'n00000001')
    args = colorize.parse_args(['--data', str(root / 'train'), str(tmp_path / 'more'), '--val-data', str(root / 'val'),
                                '--objective', 'classify', '--out', str(tmp_path / 'two-roots')])
    capsys.readouterr()
    train_paths, _, split, _, _ = colorize.training_data(args, None, None, True)
    assert ('warning: 1 class folder name(s) occur in more than one place, and each is one class (the label is the '
            f'folder name): e.g. n00000001 in {root / "train" / "n00000001"} and {tmp_path / "more" / "n00000001"}. '
            'Right for a class split') in capsys.readouterr().out
    assert [k for p, k in zip(train_paths, split['train']) if Path(p).parent.name == 'n00000001'] == [1] * 16
    assert colorize.default_out(colorize.parse_args(['-a', 'alexnet', '--objective', 'classify'])).name == \
        'alexnet-classify'  # not the colorization run's folder, whose checkpoint would refuse it
    with pytest.raises(colorize.UserError, match='--classes 1: give 2 to 3'):
        colorize.class_labels(colorize.parse_args(['--classes', '1']), labels['train_paths'], labels['val_paths'])
    # Images all in one folder (no classes), and held-out images of no training class (nothing to score).
    with pytest.raises(colorize.UserError, match=re.escape('--objective classify needs images in one folder per class '
                                                           '(ImageNet train layout); found 1 folder(s) under --data')):
        colorize.class_labels(colorize.parse_args([]), ['/d/all/0.jpg', '/d/all/1.jpg'], ['/v/all/0.jpg'])
    with pytest.raises(colorize.UserError, match=re.escape('--objective classify: no held-out image belongs to the '
                                                           'training classes; give --val-data with the same class')):
        colorize.class_labels(colorize.parse_args([]), ['/d/cat/0.jpg', '/d/dog/0.jpg'], ['/v/cow/0.jpg'])
    # Resuming after the class folders changed would remap the labels: refused.
    (root / 'train' / 'n00000002').rename(root / 'train' / 'n00000009')
    capsys.readouterr()
    assert colorize.main([*argv[:argv.index('--steps')], '--steps', '8', '--resume']) == 2
    assert 'differing: n00000002, n00000009); resuming would remap the labels' in capsys.readouterr().err
    assert not any('"step": 8' in line for line in (tmp_path / 'cls' / 'log.jsonl').read_text().splitlines())


def test_validation_from_a_larger_folder_is_a_fixed_random_choice(monkeypatch):
    """ImageNet's val in class folders, sorted: the first 20 of 90 would be one class of three."""
    paths = [f'/val/n{k:08d}/{i:02d}.JPEG' for k in range(3) for i in range(30)]
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 0] = 200
    monkeypatch.setattr(data, 'load_rgb', lambda path, min_short_side=None: red)
    images, used = colorize.load_val_images(paths, 8, limit=20)
    assert len(used) == 20 == len(images) and used == sorted(used)
    assert {paths[i].split('/')[2] for i in used} == {'n00000000', 'n00000001', 'n00000002'}
    assert colorize.load_val_images(paths, 8, limit=20)[1] == used  # the same images at every evaluation
    assert colorize.load_val_images(paths[:20], 8, limit=20)[1] == list(range(20))  # a holdout of --holdout
    assert colorize.load_val_images(paths, 8, limit=20, first=True)[1] == list(range(20))  # runs from before
    # Unreadable images and grayscale ones (no colour to predict) are skipped, the gray ones kept for classify
    # (keep_gray); each image is its centre crop at short side `crop`, here an 8 x 12 image's columns 2..9.
    # Neither the skipping of gray images nor the crop's scale was seen by any test.
    colour = {i: rng(i).integers(0, 256, (8, 12, 3), dtype=np.uint8) for i in range(6)}
    colour[3] = np.repeat(colour[3][..., :1], 3, axis=2)

    def load(path, min_short_side=None):
        if path.endswith('01.JPEG'):
            raise data.BadImage(path, 'truncated')
        return colour[int(path[-7:-5])]
    monkeypatch.setattr(data, 'load_rgb', load)
    paths = [f'/val/{i:02d}.JPEG' for i in range(6)]
    images, used = colorize.load_val_images(paths, 8, limit=20)
    assert used == [0, 2, 4, 5] and torch.equal(images, torch.from_numpy(np.stack(
        [colour[i][:, 2:10] for i in used])).permute(0, 3, 1, 2))
    assert colorize.load_val_images(paths, 8, limit=20, keep_gray=True)[1] == [0, 2, 3, 4, 5]
    # Held-out images all gray or unreadable: nothing to validate on, said (torch.stack of none would be a traceback).
    for keep_gray, picked, word in ((False, ['01', '03'], 'colour '), (True, ['01'], '')):
        with pytest.raises(colorize.UserError, match=f'^no usable {word}images among the {len(picked)} held-out images$'):
            colorize.load_val_images([f'/val/{i}.JPEG' for i in picked], 8, keep_gray=keep_gray)


def test_a_run_from_before_the_random_validation_choice_keeps_its_validation_images(folders, tmp_path, monkeypatch):
    train, val = folders  # 6 validation images, 4 of them used (--holdout 4)
    argv = tiny_args(train, val, tmp_path / 'run', '--steps', '4', '--holdout', '4', '--save-every', '2')
    seen = []
    load = colorize.load_val_images
    monkeypatch.setattr(colorize, 'load_val_images', lambda *a, **k: seen.append(load(*a, **k)[1]) or load(*a, **k))
    assert colorize.main([*argv, '--exit-after', '2']) == 0
    ckpt = _state(tmp_path / 'run' / 'checkpoint.pt')
    assert ckpt['data']['val_order'] == colorize.VAL_ORDER
    del ckpt['data']['val_order']  # as written before it
    torch.save(ckpt, tmp_path / 'run' / 'checkpoint.pt')
    assert colorize.main([*argv, '--resume']) == 0
    assert seen[1] == [0, 1, 2, 3] and seen[0] != seen[1]  # the first four, as then; a random four now


def _ten_class_folders(root):
    """An ImageNet-layout folder: 10 classes n00000000 .. n00000009 of 6 tiny images each."""
    for k in range(10):
        folder = root / f'n{k:08d}'
        folder.mkdir(parents=True)
        for i in range(6):
            Image.fromarray(np.full((8, 8, 3), 20 * k + i, np.uint8)).save(folder / f'{i}.png')
    return root


def test_classify_holds_out_from_the_chosen_classes(tmp_path):
    """--classes K with --holdout H: the H held-out images come from the K classes. Drawn from all the
    class folders, most would leave with their class (2 of 8 here, 26 of 256 at 100 of ImageNet's 1000)."""
    root = _ten_class_folders(tmp_path / 'imagenet')
    args = colorize.parse_args(['--data', str(root), '--out', str(tmp_path / 'run'), '--objective', 'classify',
                                '--classes', '2', '--holdout', '4'])
    labels = colorize.class_labels(args, *colorize.image_sources(args, True))
    assert len(labels['names']) == 2 and len(labels['val_paths']) == 4
    assert len(labels['train_paths']) == 2 * 6 - 4
    assert {Path(p).parent.name for p in labels['val_paths'] + labels['train_paths']} <= set(labels['names'])
    # The same classes as chosen from all folders (checkpoints name them; a resume compares them).
    assert labels['names'] == sorted(data.subset([f'n{k:08d}' for k in range(10)], 2, seed=1))


def test_classify_resume_of_a_hold_out_from_all_classes_keeps_it_without_a_warning(tmp_path, capsys):
    """A checkpoint written before 18f1039 held out --holdout images from all class folders, and those of
    the classes not chosen were dropped with their class. Resumed, the same images validate, and none is
    said to be 'no longer in --data' (they are: in the classes not chosen)."""
    root = _ten_class_folders(tmp_path / 'imagenet')
    args = colorize.parse_args(['--data', str(root), '--out', str(tmp_path / 'run'), '--objective', 'classify',
                                '--classes', '2', '--holdout', '12'])
    listing = data.find_images([str(root)])
    held = data.subset(listing, 12, seed=colorize.HOLDOUT_SEED)  # as the code before drew it
    names = colorize.chosen_classes(args, listing)
    capsys.readouterr()
    train, val = colorize.image_sources(args, True, held=held)
    assert 'no longer in --data' not in capsys.readouterr().out
    assert val == sorted(p for p in held if colorize.class_folder(p) in names) and val
    assert not set(val) & set(train)


def _class_labels_before(args, train, val):
    """class_labels as it was before 3.7M paths took 28 s (class_folder three times a path, packed_entry on
    each pseudo-path): the reference."""
    def folder(p):
        return os.path.basename(os.path.dirname(p))
    names = sorted({folder(p) for p in train})
    if args.classes is not None:
        names = sorted(data.subset(names, args.classes, seed=1))
    places = {}
    for p in train:
        if data.packed_entry(p) is None:
            places.setdefault(folder(p), set()).add(os.path.dirname(p))
    merged = {n: sorted(d) for n, d in places.items() if len(d) > 1 and n in names}
    index = {n: i for i, n in enumerate(names)}
    train = colorize.take_subset(args, [p for p in train if folder(p) in index])
    val = [p for p in val if folder(p) in index]
    return dict(names=names, train_paths=train, val_paths=val, merged=merged,
                train=[index[folder(p)] for p in train], val=[index[folder(p)] for p in val])


def test_class_labels_are_those_of_the_path_by_path_version(tmp_path):
    # os.path's parts, also where separators meet or a path has fewer than two.
    odd = ['/d/n01/a.jpg', 'd/n01/a.jpg', 'n01/a.jpg', 'a.jpg', '/a.jpg', '', '/', '//a.jpg', 'd//n01/a.jpg',
           'd/n01//a.jpg', '/d/n01/', 'd/n01//', '///d///n01///a.jpg', '/d/n\u00e9/a b.jpg', '.', '../n01/a.jpg']
    assert [colorize.parent_folder(p) for p in odd] == [os.path.dirname(p) for p in odd]
    assert [colorize.class_folder(p) for p in odd] == [os.path.basename(os.path.dirname(p)) for p in odd]
    # A pack of class folders (its pseudo-paths name them), the folders themselves, one class name in two
    # places (merged), and a folder called index.npy that is no pack (its paths are files).
    src = tmp_path / 'src'
    for k in range(4):
        for i in range(3):
            _write_rgb(src / f'n{k:08d}' / f'{k}_{i}.jpg', _smooth_rgb(12, 10, 3 * k + i), fmt='JPEG')
    data.pack_images([src], tmp_path / 'pack', short_side=8, workers=1, log=_quiet)
    packed = data.find_images(tmp_path / 'pack', log=_quiet)
    files = [f'/data/{where}/n{k:08d}/{where}{i}.JPEG' for where in ('a', 'b') for k in (1, 3, 5, 6)
             for i in range(4)]
    fake = [f'{tmp_path}/fake/index.npy/{i:09d}/n{i % 7:08d}/{i}.jpg' for i in range(5)]
    train = sorted(packed + files + fake)[::-1]  # not sorted: the first place of each class is in `merged`'s order
    val = [f'/v/n{k:08d}/{k}.jpg' for k in range(9)] + packed[::5]
    for flags in ([], ['--classes', '3'], ['--classes', '5', '--subset', '7'], ['--subset', '30']):
        args = colorize.parse_args(flags)
        got, want = colorize.class_labels(args, train, val), _class_labels_before(args, train, val)
        assert got == want
        assert list(got['merged'].items()) == list(want['merged'].items())  # the order too (the warning's first)
    every = colorize.class_labels(colorize.parse_args([]), train, val)
    assert every['merged'] == {f'n{k:08d}': [f'/data/a/n{k:08d}', f'/data/b/n{k:08d}'] + [
        f'{tmp_path}/fake/index.npy/{k:09d}/n{k:08d}' for _ in range(k in (1, 3))] for k in (1, 3, 5, 6)}
    assert len(every['train']) == len(train) and every['names'] == [f'n{k:08d}' for k in range(7)]


def test_train_lets_go_of_its_path_list_once_the_loader_has_the_images(folders, tmp_path, monkeypatch):
    # The loader holds the paths itself (ColorImages: encoded); _train's list of them (and for classify
    # class_labels' dict, which holds it too) took 0.4 GB at 3.7M paths for the whole run.
    lists, counts = [], []
    make_loader = colorize.make_loader
    monkeypatch.setattr(colorize, 'make_loader',
                        lambda paths, *a, **kw: lists.append(paths) or make_loader(paths, *a, **kw))
    for name in ('train_step', 'classify_step'):
        def counted(*a, step=getattr(colorize, name)):
            counts.append(sys.getrefcount(lists[-1]))  # held by `lists`, and by getrefcount's argument
            return step(*a)
        monkeypatch.setattr(colorize, name, counted)
    train, val = folders
    assert colorize.main(tiny_args(train, val, tmp_path / 'color', '--steps', '2')) == 0
    root = _ten_class_folders(tmp_path / 'imagenet' / 'train')
    argv = tiny_args(root, _ten_class_folders(tmp_path / 'imagenet' / 'val'), tmp_path / 'cls', '--steps', '2',
                     '--objective', 'classify')
    assert colorize.main(argv) == 0
    # Held by nothing else: the count of a list held only by a list, read the same way (2 on CPython 3.11;
    # the interpreter's own references vary by version). Before, _train's name (and labels) added 1 (2).
    alone = [[]]
    assert [len(paths) for paths in lists] == [24, 60] and counts == [sys.getrefcount(alone[-1])] * 4
    # What the run reports and records of the list is as before: its length, its identity.
    info = json.loads((tmp_path / 'cls' / 'run.json').read_text())
    assert _state(tmp_path / 'cls' / 'checkpoint.pt')['data']['images'] == colorize.data_identity(lists[1])
    assert info['train_images'] == 60


def test_evaluate_classifier_top1_by_hand():
    class Fixed(torch.nn.Module):  # predicts class 0 for dark images, 1 for bright ones
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([-m, m], 1) * 10
    images = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 20, 240, 250)])
    labels = torch.tensor([0, 1, 1, 1])  # the second is mislabelled: 3 of 4 right
    model = Fixed()
    metrics = colorize.evaluate_classifier(model, images, labels, None, torch.device('cpu'))
    assert metrics['top1'] == 0.75
    # Training goes on in train mode after an evaluation: left in eval mode, --objective classify trained
    # on after its step-0 evaluation with BatchNorm's running statistics (no sample grid follows to reset
    # it, as for colorization), and every test passed.
    assert model.training


# ================================================================================================
# finetune_voc.py: AP, mIU, transfer loading, export, the RQ flags, end to end
# ================================================================================================

TINY = dict(width=1 / 16, fc_dim=16)


@pytest.fixture(scope='module')
def voc(tmp_path_factory):
    """A tiny demo VOC devkit: VOC2007 16 trainval + 8 test, VOC2012 12 train + 6 val, 48-64 px images."""
    root = tmp_path_factory.mktemp('voc')
    data.make_demo_voc(root, n_trainval_2007=16, n_test_2007=8, n_train_2012=12, n_val_2012=6, size_range=(48, 64))
    return str(root / 'VOCdevkit')


def colorize_checkpoint(path, arch, seed=0):
    """A checkpoint in colorize.py's format of a tiny model with non-trivial BatchNorm statistics."""
    config = dict(arch=arch, loss='huechroma', width=TINY['width'], fc_dim=TINY['fc_dim'])
    torch.manual_seed(seed)
    model = colorize.make_model(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.2, generator=g)
    torch.save(dict(model=model.state_dict(), optimizer={}, step=7, config=config, args={'arch': arch},
                    rng=dict(cpu=torch.get_rng_state(), cuda=[]), counts={}), path)
    return model.eval()


def image_batch(n, size, seed=0):
    """Smooth random colour images, uint8 (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return (F.interpolate(small, size=(size, size), mode='bilinear', align_corners=False) * 255).round().byte()


# ---------------------------------------------------------------- average precision

def test_ap_hand_example():
    # Ranked: TP FP TP FP TP; P = 3. Precision 1, 1/2, 2/3, 2/4, 3/5 at recall 1/3, 1/3, 2/3, 2/3, 1.
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    labels = [1, -1, 1, -1, 1]
    # Non-interpolated: 1/3 * (1 + 2/3 + 3/5) = 34/45 (scikit-learn gives 0.7556 for this ranking).
    assert ft.average_precision(scores, labels) == pytest.approx(34 / 45)
    # 11-point: t = 0 .. 0.3 -> max precision 1 (4 points); t = 0.4 .. 0.6 -> 2/3 (3 points);
    # t = 0.7 .. 1.0 -> 3/5 (4 points).
    assert ft.average_precision(scores, labels, eleven_point=True) == pytest.approx((4 + 3 * 2 / 3 + 4 * 3 / 5) / 11)


def test_ap_eleven_point_at_recalls_of_exactly_three_fifths_and_three_tenths():
    """The devkit's `for t=0:0.1:1` in MATLAB: t = 0.6 is the double nearest 0.6, so a recall of
    exactly 3/5 reaches it; t = 0.3 is 3 * 0.1, one ulp above 3/10, so a recall of exactly 3/10 does
    not (MATLAB's colon builds its first half up from 0 and its second half down from 1)."""
    # 5 positives ranked P P P N N P P N N N: precision 1 up to recall 3/5, then 4/6 at 4/5 and 5/7 at 1.
    # t = 0 .. 0.6 (7 points) -> 1; t = 0.7 .. 1 (4 points) -> 5/7.
    labels = [1, 1, 1, -1, -1, 1, 1, -1, -1, -1]
    assert ft.average_precision(np.arange(10, 0, -1), labels, eleven_point=True) == pytest.approx((7 + 4 * 5 / 7) / 11)
    # 10 positives ranked P P P N P P P P P P P: precision 1 up to recall 3/10; past the N, 4/5 ... 10/11.
    # t = 0 .. 0.2 (3 points) -> 1; t = 0.3 .. 1 (8 points) -> 10/11.
    labels = [1, 1, 1, -1] + [1] * 7
    assert ft.average_precision(np.arange(11, 0, -1), labels, eleven_point=True) == pytest.approx((3 + 8 * 10 / 11) / 11)


def test_ap_ties_form_one_step():
    # Scores 0.9 (pos), 0.5 (pos), 0.5 (neg), 0.1 (neg): the tied pair is one threshold step.
    # Steps: (recall 1/2, precision 1), (1, 2/3), (1, 1/2). AP = 1/2 + 1/2 * 2/3 = 5/6; the
    # positive-first order alone would give 1.0, the negative-first 5/6.
    for scores, labels in [([0.9, 0.5, 0.5, 0.1], [1, 1, -1, -1]), ([0.9, 0.5, 0.5, 0.1], [1, -1, 1, -1])]:
        assert ft.average_precision(scores, labels) == pytest.approx(5 / 6)
        # 11-point: t <= 0.5 (6 points) -> 1; t >= 0.6 (5 points) -> 2/3.
        assert ft.average_precision(scores, labels, eleven_point=True) == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_ap_difficult_ignored_and_no_positives():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.0])
    labels = np.array([1, -1, 1, -1, 1, 0])
    for s in (-5.0, 0.65, 0.95, 7.0):  # moving the difficult sample anywhere changes nothing
        scores[5] = s
        assert ft.average_precision(scores, labels) == pytest.approx(34 / 45)
        assert ft.average_precision(scores, labels, eleven_point=True) == pytest.approx(8.4 / 11)
    assert math.isnan(ft.average_precision([0.3, 0.2, 0.1], [-1, 0, -1]))
    # Per column; the class without positives is nan and is left out of the mean.
    both = ft.average_precision(np.stack([scores[:5], scores[:5]], 1), np.stack([labels[:5], -np.ones(5, int)], 1))
    assert both[0] == pytest.approx(34 / 45) and math.isnan(both[1])
    assert ft.mean_ap(both) == pytest.approx(34 / 45)
    # ... and the printed mAP says so (custom splits can have such a class; VOC's own cannot).
    assert ft.left_out_classes(['cat', 'sofa'], both, 'no positive test image') == \
        '\n(the mean is over 1 class: sofa has no positive test image, so no score)'
    assert ft.left_out_classes(['a', 'b', 'c'], [0.5, math.nan, math.nan], 'x') == \
        '\n(the mean is over 1 class: b, c have x, so no score)'
    assert ft.left_out_classes(['cat', 'sofa'], [0.1, 0.0], 'x') == ''


def test_ap_matches_brute_force_thresholds():
    # Second formula: for each distinct threshold from high to low, precision and recall of
    # "score >= threshold"; AP = sum of (recall gain) * precision.
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = rng.integers(5, 40)
        scores = rng.integers(0, 6, n) / 5.0  # many ties
        labels = rng.choice([1, -1, 0], n, p=[0.4, 0.5, 0.1])
        if not (labels == 1).any():
            labels[0] = 1
        keep = labels != 0
        s, pos = scores[keep], labels[keep] == 1
        ap, last_recall = 0.0, 0.0
        for t in sorted(set(s.tolist()), reverse=True):
            hit = s >= t
            recall, precision = (pos & hit).sum() / pos.sum(), (pos & hit).sum() / hit.sum()
            ap += (recall - last_recall) * precision
            last_recall = recall
        assert ft.average_precision(scores, labels) == pytest.approx(ap)


def test_scores_refuse_inputs_they_would_misread():
    # Functions another script may import and call: inputs of mismatched shapes would broadcast or pair
    # up wrongly in silence, a label 2 is not VOC's, and one nan score would make the ranking, and so
    # the AP, arbitrary: each is a ValueError that names what it found.
    with pytest.raises(ValueError, match=re.escape('scores (3,) and labels (4,) must have the same shape')):
        ft.average_precision([0.3, 0.2, 0.1], [1, -1, 1, -1])
    with pytest.raises(ValueError, match=re.escape('scores (2, 3) and labels (3, 2) must have the same shape')):
        ft.average_precision(np.zeros((2, 3)), np.ones((3, 2), int))
    with pytest.raises(ValueError, match=re.escape('labels must be 1, -1 or 0 (difficult), found [-1, 1, 2]')):
        ft.average_precision([0.3, 0.2, 0.1], [1, 2, -1])
    with pytest.raises(ValueError, match=re.escape('labels must be 1, -1 or 0 (difficult), found [-1, 1, 2]')):
        ft.average_precision(np.zeros((3, 2)), np.array([[1, 1], [-1, 2], [1, -1]]))  # checked per column too
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match='scores contain nan or inf'):
            ft.average_precision([0.3, bad, 0.1], [1, -1, 1])
    with pytest.raises(ValueError, match=re.escape('pred (2, 3) and label (3, 2) must have the same shape')):
        ft.confusion_matrix(np.zeros((2, 3), int), np.zeros((3, 2), int), num_classes=3)
    with pytest.raises(ValueError, match=re.escape('pred (6,) and label (2, 3) must have the same shape')):
        ft.confusion_matrix(torch.zeros(6, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), num_classes=3)
    for x, y in (((5, 3), (4, 3)), ((5, 3, 1), (5, 3)), ((5,), (5, 2))):
        with pytest.raises(ValueError, match=re.escape(f'linear_cka needs (N, D) matrices with the same N, got {x} and {y}')):
            ft.linear_cka(torch.zeros(x), np.zeros(y))


def test_multilabel_loss_ignores_difficult():
    # Zero logits: every counted label costs log 2; 3 labels count over 2 images.
    labels = torch.tensor([[1, -1, 0], [0, 0, 1]], dtype=torch.int8)
    assert ft.multilabel_loss(torch.zeros(2, 3), labels).item() == pytest.approx(3 * math.log(2) / 2)
    # A confident right answer costs about nothing; difficult logits do not matter.
    logits = torch.tensor([[20.0, -20.0, 5.0], [-7.0, 3.0, 20.0]])
    assert ft.multilabel_loss(logits, labels).item() < 1e-8


# ---------------------------------------------------------------- segmentation scores

def test_confusion_and_miou_by_hand():
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 1]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 1]], np.uint8)
    # Counted by hand over the 7 labelled pixels (rows true, columns predicted). Row sums (2, 3, 2)
    # and column sums (2, 4, 1) differ, so mixing up false positives and false negatives shows.
    expected = np.array([[1, 1, 0],
                         [0, 3, 0],
                         [1, 0, 1]])
    conf = ft.confusion_matrix(pred, label, num_classes=3)
    np.testing.assert_array_equal(conf, expected)
    scores = ft.segmentation_scores(conf)
    # IoU = TP / (TP + FP + FN): class 0: 1 / (1 + 1 + 1) = 1/3; class 1: 3 / (3 + 1 + 0) = 3/4;
    # class 2: 1 / (1 + 0 + 1) = 1/2.
    assert scores['iou'] == pytest.approx([1 / 3, 3 / 4, 1 / 2])
    assert scores['miou'] == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert scores['pixel_acc'] == pytest.approx(5 / 7)
    torch_conf = ft.confusion_matrix(torch.from_numpy(pred), torch.from_numpy(label), num_classes=3)
    np.testing.assert_array_equal(torch_conf.numpy(), expected)
    # The defaults are VOC's: 21 classes (background and the 20 object classes), 255 void.
    voc = ft.confusion_matrix(pred, label)
    assert voc.shape == (21, 21) and voc.sum() == 7
    np.testing.assert_array_equal(voc[:3, :3], expected)
    # A class never present nor predicted has no IoU and is left out of the mean.
    scores4 = ft.segmentation_scores(np.pad(expected, ((0, 1), (0, 1))))
    assert math.isnan(scores4['iou'][3]) and scores4['miou'] == pytest.approx(scores['miou'])
    with pytest.raises(ValueError, match='must be in'):
        ft.confusion_matrix(np.array([0]), np.array([7]), num_classes=3)


# ---------------------------------------------------------------- loading colorization checkpoints

def test_init_files_that_hold_no_usable_trunk_are_one_line(tmp_path):
    # Each a UserError naming the file and what to pass instead (they were a traceback's KeyError or
    # RuntimeError, or a fine-tuned checkpoint read as if it were pre-trained).
    def init(obj, *flags):
        torch.save(obj, tmp_path / 'x.pt')
        return ft.initial_trunk(ft.parse_args(['--init', str(tmp_path / 'x.pt'), *flags]))
    x = tmp_path / 'x.pt'
    with pytest.raises(colorize.UserError, match=re.escape(f'--init {x} is neither a colorize.py checkpoint (a dict with '
                                                           '"model" and "config") nor a state_dict of tensors')):
        init([torch.zeros(1)])
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet')
    ckpt = torch.load(tmp_path / 'c.pt', weights_only=True)
    assert init(ckpt)[1]['kind'] == 'colorization'  # as written: the edits below alone make it unusable
    with pytest.raises(colorize.UserError, match=re.escape(f'--init {x} is a voc-cls checkpoint (fine-tuned by this '
                                                           'script), not a pre-training one; pass the checkpoint.pt')):
        init(dict(ckpt, config=dict(ckpt['config'], objective='voc-cls')))
    with pytest.raises(colorize.UserError, match=re.escape(f"--init {x}: its config describes no model (") + r".*\): "
                                                 r"KeyError: 'googlenet'$"):
        init(dict(ckpt, config=dict(ckpt['config'], arch='googlenet')))
    # A trunk state of another width than the transfer model's: the first mismatched layer is named.
    state, _ = init(ckpt)
    with pytest.raises(colorize.UserError, match=re.escape('ckpt does not fit a alexnet trunk of width 0.125: size '
                                                           'mismatch for trunk.conv1.conv.weight')):
        ft.make_finetune_model('cls', 'alexnet', state, 'ckpt', width=0.125, fc_dim=16)


@pytest.mark.parametrize('arch', ['alexnet', 'vgg16', 'resnet50'])
def test_colorize_checkpoint_folds_batchnorm(tmp_path, arch):
    reference = colorize_checkpoint(tmp_path / 'c.pt', arch)
    state, config = ft.colorization_trunk(torch.load(tmp_path / 'c.pt', weights_only=True), 'ckpt')
    assert config['arch'] == arch and not any(k.startswith('head.') or 'bn.' in k for k in state)
    x = lab.lightness_input(lab.rgb_to_lab(image_batch(2, 64)))
    for task in ('cls', 'seg'):
        model = ft.make_finetune_model(task, arch, state, 'ckpt', 'gray', **TINY).eval()
        with torch.no_grad():
            ours, theirs = model.trunk(x), reference.trunk(x)
        assert len(ours) == len(theirs)
        for a, b in zip(ours, theirs):
            close(a, b, 1e-4)


def test_supervised_classify_checkpoint_loads_like_a_colorization_one(tmp_path):
    # colorize.py --objective classify: same trunk, a 'fc' layer instead of the colorization head.
    config = dict(arch='vgg16', objective='classify', loss='huechroma', classes=['a', 'b', 'c'], **TINY)
    torch.manual_seed(0)
    model = colorize.make_model(config)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    ckpt = dict(model=model.state_dict(), config=config)
    state, _ = ft.colorization_trunk(ckpt, 'ckpt')
    transfer = ft.make_finetune_model('cls', 'vgg16', state, 'ckpt', 'gray', **TINY).eval()
    x = lab.lightness_input(lab.rgb_to_lab(image_batch(2, 64)))
    with torch.no_grad():
        close(transfer.trunk(x)[-1], model.eval().trunk(x)[-1], 1e-4)
    torch.save(ckpt, tmp_path / 'sup.pt')  # named as what it is: the supervised baseline, not colorization
    args = argparse.Namespace(init=str(tmp_path / 'sup.pt'), arch=None, width=None, fc_dim=None, seed=0)
    assert ft.initial_trunk(args)[1]['kind'] == 'classification'
    ckpt['model']['head.out.weight'] = torch.zeros(1)  # a colorization head on a classify checkpoint
    with pytest.raises(colorize.UserError, match='head.out.weight'):
        ft.colorization_trunk(ckpt, 'ckpt')


def test_wrong_checkpoint_fails_with_clear_message(tmp_path):
    colorize_checkpoint(tmp_path / 'c.pt', 'vgg16')
    ckpt = torch.load(tmp_path / 'c.pt', weights_only=True)
    del ckpt['model']['trunk.fc7.conv.weight']
    with pytest.raises(colorize.UserError, match='trunk.fc7.conv.weight'):
        ft.colorization_trunk(ckpt, 'ckpt')
    # The transfer load's exact-keys check: a left-over key, a missing trunk key.
    state, _ = ft.colorization_trunk(torch.load(tmp_path / 'c.pt', weights_only=True), 'ckpt')
    extra = dict(state, **{'conv9.conv.weight': torch.zeros(1)})
    with pytest.raises(colorize.UserError, match=r"conv9\.conv\.weight"):
        ft.make_finetune_model('cls', 'vgg16', extra, 'ckpt', **TINY)
    lacking = {k: v for k, v in state.items() if k != 'conv3_2.conv.bias'}
    with pytest.raises(colorize.UserError, match=r'conv3_2\.conv\.bias'):
        ft.make_finetune_model('seg', 'vgg16', lacking, 'ckpt', **TINY)
    # A checkpoint written when the hypercolumn had one more tap (4 channels at width 1/16): the trunk
    # fits, head.fc1 does not; the line names the cause. This code's tiny VGG-16 taps give 1 (input) +
    # 2 x 4 + 2 x 8 + 3 x 16 + 3 x 32 + 3 x 32 + 2 x 16 (fc6, fc7) = 297 channels.
    ckpt = torch.load(tmp_path / 'c.pt', weights_only=True)
    fc1 = ckpt['model']['head.fc1.weight']
    ckpt['model']['head.fc1.weight'] = torch.cat([fc1, fc1[:, :4]], 1)
    for load in (lambda: ft.colorization_trunk(ckpt, 'ckpt'),
                 lambda: colorize.load_model_state(colorize.make_model(ckpt['config']), ckpt['model'], 'c.pt')):
        with pytest.raises(colorize.UserError) as e:
            load()
        assert 'size mismatch for head.fc1.weight' in str(e.value)
        assert 'hypercolumn of 301 channels' in str(e.value) and 'give 297' in str(e.value)
        assert 'taps' in str(e.value) and 'conv1_1, conv1_2' in str(e.value)
    # The same for a fine-tuning run's own checkpoint, resumed (it was a RuntimeError's traceback).
    model = ft.build_transfer_model('seg', 'vgg16', **TINY)
    state = model.state_dict()
    state['head.fc1.weight'] = torch.cat([state['head.fc1.weight'], state['head.fc1.weight'][:, :4]], 1)
    args = argparse.Namespace(weight_decay=0.0, lr=0.1, momentum=0.9, bias_lr_mult=1.0, resume_path='r/checkpoint.pt')
    with pytest.raises(colorize.UserError, match=r'r/checkpoint.pt does not match.*hypercolumn of 301 channels.*give 297'):
        ft.train(model, None, args, torch.device('cpu'), {}, dict(model=state))
    # A checkpoint of a run that diverged, saved before the scripts checked the weights (a NaN here): one line
    # on loading it, to colorize, resume or fine-tune from, or a torchvision state_dict with an inf.
    ckpt = torch.load(tmp_path / 'c.pt', weights_only=True)
    ckpt['model']['trunk.conv3_1.conv.weight'][0, 0, 0, 0] = float('nan')
    torch.save(ckpt, tmp_path / 'nan.pt')
    with pytest.raises(colorize.UserError, match=r'nan\.pt holds weights that are not finite \(trunk\.conv3_1\.conv'
                                                 r'\.weight has NaN or inf\): the weights of a run that diverged'):
        colorize.load_checkpoint(tmp_path / 'nan.pt')
    tv = {'features.0.weight': torch.zeros(2), 'features.2.bias': torch.tensor([0.0, float('inf')])}
    torch.save(tv, tmp_path / 'tv.pt')
    for init, name in (('nan.pt', 'trunk.conv3_1.conv.weight'), ('tv.pt', 'features.2.bias')):
        with pytest.raises(colorize.UserError, match=f'--init .*{init} holds weights that are not finite \\({name}'):
            ft.initial_trunk(argparse.Namespace(init=str(tmp_path / init), arch=None, width=None, fc_dim=None))
    # An AlexNet checkpoint for a VGG-16 flag: one line, says what to do.
    colorize_checkpoint(tmp_path / 'a.pt', 'alexnet')
    args = ft.parse_args(['--init', str(tmp_path / 'a.pt'), '-a', 'vgg16'])
    with pytest.raises(colorize.UserError, match='omit the flag or pass alexnet'):
        ft.initial_trunk(args)


def test_new_layer_keys_are_exactly_the_new_layers():
    torch.manual_seed(0)
    model = ft.build_transfer_model('seg', 'vgg16', extended_fov=True, head_dim=8, **TINY)
    assert ft.new_layer_keys(model) == {'head.fc1.weight', 'head.fc1.bias', 'head.out.weight', 'head.out.bias',
                                        'trunk.fov1.conv.weight', 'trunk.fov1.conv.bias',
                                        'trunk.fov2.conv.weight', 'trunk.fov2.conv.bias'}
    model = ft.build_transfer_model('cls', 'resnet50', width=1 / 16)
    assert ft.new_layer_keys(model) == {'classifier.weight', 'classifier.bias'}


# ---------------------------------------------------------------- lab input

@pytest.mark.parametrize('arch', ['vgg16', 'resnet50'])
def test_lab_input_starts_as_the_lightness_network(tmp_path, arch):
    colorize_checkpoint(tmp_path / 'c.pt', arch)
    state, _ = ft.colorization_trunk(torch.load(tmp_path / 'c.pt', weights_only=True), 'ckpt')
    lab_img = lab.rgb_to_lab(image_batch(2, 64, seed=3))
    points = torch.tensor([[[5, 7], [30, 2], [63, 63]], [[0, 0], [17, 40], [50, 9]]])
    for task in ('cls', 'seg'):
        gray = ft.make_finetune_model(task, arch, state, 'ckpt', 'gray', head_dim=8, seed=5, **TINY).eval()
        color = ft.make_finetune_model(task, arch, state, 'ckpt', 'lab', head_dim=8, seed=5, **TINY).eval()
        conv = color.trunk.get_submodule(ft.first_conv_name(color.trunk))
        assert conv.in_channels == 3 and not conv.weight[:, 1:].any()
        xg, xc = lab.lightness_input(lab_img), lab.lab_input(lab_img)
        assert xc[:, 1:].abs().max() > 0.2  # the colour channels do carry colour
        with torch.no_grad():
            if task == 'cls':
                close(color(xc), gray(xg), 1e-5)
            else:
                close(color(xc, points), gray(xg, points), 1e-5)
                close(color.dense(xc), gray.dense(xg), 1e-5)


# ---------------------------------------------------------------- torchvision export / import

def _vgg16_tv():
    convs = [(0, 64, 3), (2, 64, 64), (5, 128, 64), (7, 128, 128), (10, 256, 128), (12, 256, 256), (14, 256, 256),
             (17, 512, 256), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
    shapes = {}
    for i, out, inp in convs:
        shapes[f'features.{i}.weight'], shapes[f'features.{i}.bias'] = (out, inp, 3, 3), (out,)
    for name, out, inp in [('classifier.0', 4096, 25088), ('classifier.3', 4096, 4096), ('classifier.6', 1000, 4096)]:
        shapes[f'{name}.weight'], shapes[f'{name}.bias'] = (out, inp), (out,)
    return shapes


def _alexnet_tv():
    shapes = {}
    for i, out, inp, k in [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]:
        shapes[f'features.{i}.weight'], shapes[f'features.{i}.bias'] = (out, inp, k, k), (out,)
    for name, out, inp in [('classifier.1', 4096, 9216), ('classifier.4', 4096, 4096), ('classifier.6', 1000, 4096)]:
        shapes[f'{name}.weight'], shapes[f'{name}.bias'] = (out, inp), (out,)
    return shapes


def _resnet_tv(layers):
    def bn(prefix, c):
        return {f'{prefix}.weight': (c,), f'{prefix}.bias': (c,), f'{prefix}.running_mean': (c,),
                f'{prefix}.running_var': (c,), f'{prefix}.num_batches_tracked': ()}
    shapes = {'conv1.weight': (64, 3, 7, 7), **bn('bn1', 64)}
    inplanes = 64
    for layer, (planes, blocks) in enumerate(zip([64, 128, 256, 512], layers), 1):
        for i in range(blocks):
            p = f'layer{layer}.{i}'
            shapes.update({f'{p}.conv1.weight': (planes, inplanes, 1, 1), **bn(f'{p}.bn1', planes),
                           f'{p}.conv2.weight': (planes, planes, 3, 3), **bn(f'{p}.bn2', planes),
                           f'{p}.conv3.weight': (planes * 4, planes, 1, 1), **bn(f'{p}.bn3', planes * 4)})
            if i == 0:
                shapes.update({f'{p}.downsample.0.weight': (planes * 4, inplanes, 1, 1), **bn(f'{p}.downsample.1', planes * 4)})
            inplanes = planes * 4
    shapes.update({'fc.weight': (1000, 2048), 'fc.bias': (1000,)})
    return shapes


TORCHVISION = {'alexnet': _alexnet_tv, 'vgg16': _vgg16_tv,
               'resnet50': lambda: _resnet_tv([3, 4, 6, 3]), 'resnet152': lambda: _resnet_tv([3, 8, 36, 3])}
FINAL = {'alexnet': 'classifier.6', 'vgg16': 'classifier.6', 'resnet50': 'fc', 'resnet152': 'fc'}


@pytest.mark.parametrize('arch', sorted(TORCHVISION))
def test_export_names_and_shapes_match_torchvision(arch):
    with torch.device('meta'):
        trunk = MODELS[arch](in_channels=1, batchnorm=False)
        sd = ft.export_torchvision(trunk.state_dict(), arch)
    expected = TORCHVISION[arch]()
    # load_state_dict(sd, strict=False) on torchvision's model: exactly the final layer missing, nothing unexpected.
    assert set(expected) - set(sd) == {f'{FINAL[arch]}.weight', f'{FINAL[arch]}.bias'}
    assert set(sd) - set(expected) == set()
    wrong = {k: (tuple(v.shape), expected[k]) for k, v in sd.items() if tuple(v.shape) != expected[k]}
    assert not wrong


def _torchvision_names(arch, ours):
    """Our layer name -> torchvision's (conv, bn or None), written out from torchvision's definitions:
    VGG-16's `features` from its configuration 'D' (a conv and a ReLU per number, a pool per 'M'),
    AlexNet's listed, ResNet's Caffe block names resNx -> layer(N-1).(index of x: a, b, c, ... or b1, b2, ...)."""
    if arch == 'vgg16':
        index, names = 0, {}
        for stage, convs in enumerate([2, 2, 3, 3, 3], 1):
            for i in range(1, convs + 1):
                names[f'conv{stage}_{i}'] = (f'features.{index}', None)
                index += 2  # Conv2d, ReLU
            index += 1  # MaxPool2d
        return {**names, 'fc6': ('classifier.0', None), 'fc7': ('classifier.3', None)}
    if arch == 'alexnet':
        return {'conv1': ('features.0', None), 'conv2': ('features.3', None), 'conv3': ('features.6', None),
                'conv4': ('features.8', None), 'conv5': ('features.10', None),
                'fc6': ('classifier.1', None), 'fc7': ('classifier.4', None)}
    names = {'conv1': ('conv1', 'bn1')}
    branches = {'branch2a': ('conv1', 'bn1'), 'branch2b': ('conv2', 'bn2'), 'branch2c': ('conv3', 'bn3'),
                'branch1': ('downsample.0', 'downsample.1')}
    for name in ours:
        if name.startswith('res'):
            block, branch = name.split('.')
            letters = block[4:]  # 'a', 'c', 'b12', ...
            index = int(letters[1:]) if len(letters) > 1 else 'abcdefghijklmnopqrstuvwxyz'.index(letters)
            layer = f'layer{int(block[3]) - 1}.{index}'
            names[name] = tuple(f'{layer}.{part}' for part in branches[branch])
    return names


@pytest.mark.parametrize('arch', sorted(TORCHVISION))
def test_export_puts_each_layer_under_its_torchvision_name(arch):
    # Each of our convs holds its own constant; torchvision's layer of the same place must hold it.
    kwargs = TINY if arch in ('alexnet', 'vgg16') else dict(width=1 / 16)
    trunk = MODELS[arch](in_channels=1, batchnorm=False, **kwargs)
    convs = [name[:-len('.conv')] for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d)]
    state = trunk.state_dict()
    for k, name in enumerate(convs):
        state[f'{name}.conv.weight'].fill_(k + 1)
        state[f'{name}.conv.bias'].fill_(k + 1.5)
    sd = ft.export_torchvision(state, arch)
    names = _torchvision_names(arch, convs)
    assert sorted(names) == sorted(convs)
    for k, name in enumerate(convs[1:], 1):  # conv1 holds the RGB -> L* conversion
        conv, bn = names[name]
        assert (sd[f'{conv}.weight'] == k + 1).all(), name
        assert (sd[f'{bn or conv}.bias'] == k + 1.5).all(), name


@pytest.mark.parametrize('arch', sorted(TORCHVISION))
def test_torchvision_round_trip(arch):
    torch.manual_seed(0)
    kwargs = TINY if arch in ('alexnet', 'vgg16') else dict(width=1 / 16)
    state = MODELS[arch](in_channels=1, batchnorm=False, **kwargs).state_dict()
    for v in state.values():
        v.normal_(0, 0.1)  # non-zero biases too
    back, detected = ft.trunk_from_torchvision(ft.export_torchvision(state, arch))
    assert detected == arch and list(back) == list(state)
    for k in state:
        close(back[k], state[k], 1e-5)


def test_torchvision_maps_follow_the_registry(monkeypatch):
    # A ResNet added to models.MODELS (here ResNet-101, blocks 3, 4, 23, 3) gets the torchvision key map,
    # the export's final layer and the import's detection without an edit in finetune_voc.py.
    taps = ['conv1', 'res2c', 'res3b3', 'res4b22', 'res5c']
    monkeypatch.setitem(MODELS, 'resnet101', lambda in_channels=1, width=1.0, batchnorm=True, extended_fov=False:
                        models._resnet((3, 4, 23, 3), (3, 4), taps, in_channels, width, batchnorm, extended_fov))
    with torch.device('meta'):
        sd = ft.export_torchvision(MODELS['resnet101'](in_channels=1, batchnorm=False).state_dict(), 'resnet101')
    expected = _resnet_tv([3, 4, 23, 3])
    assert set(expected) - set(sd) == {'fc.weight', 'fc.bias'} and set(sd) <= set(expected)
    assert all(tuple(v.shape) == expected[k] for k, v in sd.items())
    torch.manual_seed(0)
    state = MODELS['resnet101'](in_channels=1, batchnorm=False, width=1 / 32).state_dict()
    back, detected = ft.trunk_from_torchvision(ft.export_torchvision(state, 'resnet101'))
    assert detected == 'resnet101' and list(back) == list(state)
    # A depth that models.py lacks (here layer2 one block short) is refused with the depths it has.
    short = {k: v for k, v in ft.export_torchvision(state, 'resnet101').items() if not k.startswith('layer2.3.')}
    with pytest.raises(colorize.UserError, match=r'\[3, 3, 23, 3\] blocks.*resnet101 \[3, 4, 23, 3\]'):
        ft.trunk_from_torchvision(short)


def test_fc_dim_follows_the_factory(monkeypatch, capsys, tmp_path):
    # A trunk with fc6/fc7 added to models.MODELS (a VGG-16 under another name here, as a VGG-19 would be)
    # gets its fc_dim and --fc-dropout from its factory's signature, in both scripts; fc_dim was
    # dropped for any arch but vgg16 and alexnet, so its fc6/fc7 silently had 4096 channels.
    monkeypatch.setitem(MODELS, 'vgg16x', lambda in_channels=1, width=1.0, fc_dim=4096, batchnorm=True,
                        extended_fov=False: vgg16(in_channels, width, fc_dim, batchnorm, extended_fov))
    model = colorize.make_model(dict(arch='vgg16x', loss='huechroma', **TINY))
    assert model.trunk.fc6.conv.weight.shape == (16, 32, 7, 7)  # fc_dim 16 on conv5_3's 512 / 16 channels
    assert ft.random_trunk('vgg16x', TINY['width'], 16, 0)['fc7.conv.weight'].shape == (16, 16, 1, 1)
    assert colorize.fill_defaults(colorize.parse_args(['-a', 'vgg16x', '--fc-dropout', '0.5']),
                                  torch.device('cpu'), 1).fc_dropout == 0.5
    with pytest.raises(colorize.UserError, match=r'resnet50 does not have \(alexnet, vgg16, vgg16x do\)'):
        colorize.fill_defaults(colorize.parse_args(['-a', 'resnet50', '--fc-dropout', '0.5']), torch.device('cpu'), 1)
    # --fc-dim on a trunk without fc6/fc7 changed nothing, in silence: a warning says so (in both scripts).
    capsys.readouterr()

    def transfer(*argv):  # finetune_voc.py's run up to its checks: initial_trunk resolves -a, then fill_defaults
        args = ft.parse_args(['--init', 'random', '--fc-dim', '16', '--width', '0.0625', *argv])
        ft.initial_trunk(args)
        return ft.fill_defaults(args, torch.device('cpu'))
    colorize.fill_defaults(colorize.parse_args(['-a', 'resnet50', '--fc-dim', '16']), torch.device('cpu'), 1)
    transfer('-a', 'resnet50')
    ft.export(ft.parse_args(['--export', str(tmp_path / 'r50.pth'), '--init', 'random', '-a', 'resnet50', '--fc-dim',
                             '16', '--width', '0.0625']))
    warning = 'warning: --fc-dim sets the channels of fc6 and fc7, which resnet50 does not have: it changes nothing'
    assert capsys.readouterr().err.count(warning) == 3
    # So with a ResNet file as --init: a torchvision one (the export above) and a colorize.py checkpoint (fc_dim
    # 16 in its config) were refused with "--fc-dim N contradicts ..., which has 4096" (or 16), where a
    # ResNet has no fc6/fc7 for the flag to contradict. A trunk with fc6/fc7 is still checked.
    colorize_checkpoint(tmp_path / 'r50-color.pt', 'resnet50')
    colorize_checkpoint(tmp_path / 'alex-color.pt', 'alexnet')
    for init in ('r50.pth', 'r50-color.pt'):
        args = ft.parse_args(['--init', str(tmp_path / init), '--fc-dim', '32'])
        ft.initial_trunk(args)
        assert (args.arch, args.fc_dim) == ('resnet50', 4096 if init == 'r50.pth' else 16)
        ft.fill_defaults(args, torch.device('cpu'))
    assert capsys.readouterr().err.count(warning) == 2
    with pytest.raises(colorize.UserError, match='--fc-dim 32 contradicts .*alex-color.pt, which has 16'):
        ft.initial_trunk(ft.parse_args(['--init', str(tmp_path / 'alex-color.pt'), '--fc-dim', '32']))
    colorize.fill_defaults(colorize.parse_args(['-a', 'vgg16x', '--fc-dim', '16']), torch.device('cpu'), 1)
    transfer('-a', 'vgg16x')
    assert capsys.readouterr().err == ''
    # A run refused for another reason prints its error alone (in finetune_voc.py too), not the warning first.
    with pytest.raises(colorize.UserError, match='--points applies to --task seg'):
        transfer('-a', 'resnet50', '--points', '8')
    assert capsys.readouterr().err == ''
    # Under torchrun the warnings are rank 0's alone (one line, not one per process).
    argv = ['-a', 'resnet50', '--fc-dim', '16', '--objective', 'classify', '--points', '16', '--crop', '32']
    monkeypatch.setattr(colorize, 'cores_of_this_process', lambda: 1)  # (a collective under DDP)
    monkeypatch.setattr(colorize.dist, 'is_initialized', lambda: True)
    for rank, lines in ((1, 0), (0, 2)):
        monkeypatch.setattr(colorize.dist, 'get_rank', lambda: rank)
        colorize.fill_defaults(colorize.parse_args(argv), torch.device('cpu'), 2)
        assert capsys.readouterr().err.count('warning: ') == lines, rank


def test_torchvision_resnet_batchnorm_import():
    # A torchvision-style bias-free conv + BatchNorm with real statistics, computed with F.batch_norm.
    torch.manual_seed(1)
    state = MODELS['resnet50'](in_channels=1, batchnorm=False, width=1 / 16).state_dict()
    sd = ft.export_torchvision(state, 'resnet50')
    g = torch.Generator().manual_seed(2)
    c = sd['layer2.0.bn2.weight'].shape[0]
    sd['layer2.0.bn2.weight'] = torch.rand(c, generator=g) + 0.5
    sd['layer2.0.bn2.bias'] = torch.randn(c, generator=g)
    sd['layer2.0.bn2.running_mean'] = torch.randn(c, generator=g)
    sd['layer2.0.bn2.running_var'] = torch.rand(c, generator=g) + 0.5
    back, _ = ft.trunk_from_torchvision(sd, 'resnet50')
    x = torch.randn(2, sd['layer2.0.conv2.weight'].shape[1], 9, 9, generator=g)
    ref = F.batch_norm(F.conv2d(x, sd['layer2.0.conv2.weight'], stride=2, padding=1), sd['layer2.0.bn2.running_mean'],
                       sd['layer2.0.bn2.running_var'], sd['layer2.0.bn2.weight'], sd['layer2.0.bn2.bias'], eps=1e-5)
    ours = F.conv2d(x, back['res3a.branch2b.conv.weight'], back['res3a.branch2b.conv.bias'], stride=2, padding=1)
    close(ours, ref, 1e-5)
    with pytest.raises(colorize.UserError, match='layer2.0.bn2.running_var'):
        ft.trunk_from_torchvision({k: v for k, v in sd.items() if k != 'layer2.0.bn2.running_var'})
    with pytest.raises(colorize.UserError, match='holds torchvision resnet50'):
        ft.trunk_from_torchvision(sd, 'vgg16')


def test_torchvision_import_reads_a_ddp_save_and_both_directions_refuse_what_they_cannot_map(monkeypatch):
    # A state_dict saved from DataParallel / DDP (every key prefixed 'module.') is read as the plain one.
    torch.manual_seed(0)
    state = MODELS['alexnet'](in_channels=1, batchnorm=False, **TINY).state_dict()
    sd = ft.export_torchvision(state, 'alexnet')
    plain, arch = ft.trunk_from_torchvision(sd)
    wrapped, wrapped_arch = ft.trunk_from_torchvision({f'module.{k}': v for k, v in sd.items()})
    assert arch == wrapped_arch == 'alexnet' and list(wrapped) == list(plain)
    assert all(torch.equal(wrapped[k], plain[k]) for k in plain)
    # A prefix on some keys only is no such save: the keys are not torchvision's.
    with pytest.raises(colorize.UserError, match='is neither a colorize.py checkpoint nor a torchvision'):
        ft.trunk_from_torchvision({('module.' if k.startswith('features') else '') + k: v for k, v in sd.items()})
    with pytest.raises(colorize.UserError, match=re.escape("x.pth is neither a colorize.py checkpoint nor a torchvision "
                                                           "alexnet/resnet152/resnet50/vgg16 state_dict (first keys: "
                                                           "['conv.weight', 'conv.bias'])")):
        ft.trunk_from_torchvision({'conv.weight': torch.zeros(1), 'conv.bias': torch.zeros(1)}, source='x.pth')
    # conv1 must see RGB (torchvision's input) on import and lightness on export.
    gray = dict(sd, **{'features.0.weight': sd['features.0.weight'][:, :1]})
    with pytest.raises(colorize.UserError, match=re.escape('x.pth: conv1 has 1 input channels, expected RGB (3)')):
        ft.trunk_from_torchvision(gray, source='x.pth')
    rgb = dict(state, **{'conv1.conv.weight': state['conv1.conv.weight'].expand(-1, 3, -1, -1)})
    with pytest.raises(colorize.UserError, match='export expects a lightness .1-channel. conv1, found 3 input channels'):
        ft.export_torchvision(rgb, 'alexnet')
    # Layers torchvision's network lacks (the extended field of view's) are named, not dropped.
    wide = MODELS['alexnet'](in_channels=1, batchnorm=False, extended_fov=True, **TINY).state_dict()
    with pytest.raises(colorize.UserError, match=re.escape("does not match torchvision alexnet: missing [], unexpected ['fov1.conv.bias', "
                                                      "'fov1.conv.weight', 'fov2.conv.bias', 'fov2.conv.weight'] "
                                                      "(an --extended-fov or BatchNorm trunk?)")):
        ft.export_torchvision(wide, 'alexnet')
    # A trunk added to models.MODELS that is neither AlexNet, VGG-16 nor a ResNet (here a VGG-16 under
    # another name) has no key map to guess: the error says where to write one.
    monkeypatch.setitem(MODELS, 'vgg19', vgg16)
    with pytest.raises(ValueError, match=re.escape("no torchvision key map for 'vgg19': there is one for alexnet, "
                                                   "vgg16 and the ResNets (models._resnet); write its entries")):
        ft.torchvision_key_map('vgg19')


@pytest.mark.parametrize('arch', ['vgg16', 'resnet50'])
def test_torchvision_weights_through_init_and_export(arch):
    # README (Inits, input and export), as measured with the real torchvision (.ci/torchvision_check.py):
    # torchvision weights taken through --init and --export come back with conv1 changed (its response
    # to gray images kept), VGG-16's other layers bit-identical, and a ResNet's convs and BatchNorms
    # rewritten (BN folded, exported as weight 1, mean 0, variance 1 - eps) but computing the same.
    g = torch.Generator().manual_seed(0)
    kwargs = TINY if arch == 'vgg16' else dict(width=1 / 16)
    sd0 = ft.export_torchvision(MODELS[arch](in_channels=1, batchnorm=False, **kwargs).state_dict(), arch)
    for k, v in sd0.items():  # torchvision-named tensors of tiny shapes, with real-looking BN statistics
        if k.endswith('running_var') or (k.endswith('.weight') and v.dim() == 1):
            v.uniform_(0.5, 1.5, generator=g)
        elif v.is_floating_point():
            v.normal_(0, 0.5, generator=g)
    sd1 = ft.export_torchvision(ft.trunk_from_torchvision(sd0, arch)[0], arch)
    assert list(sd1) == list(sd0)
    changed = {k for k in sd0 if not torch.equal(sd0[k], sd1[k])}

    def layer(sd, conv, bn, x):  # torchvision's conv (+ BatchNorm in eval mode)
        if bn is None:
            return F.conv2d(x, sd[f'{conv}.weight'], sd[f'{conv}.bias'])
        return F.batch_norm(F.conv2d(x, sd[f'{conv}.weight']), sd[f'{bn}.running_mean'], sd[f'{bn}.running_var'],
                            sd[f'{bn}.weight'], sd[f'{bn}.bias'], eps=1e-5)
    if arch == 'vgg16':
        first = ('features.0', None)
        assert changed == {'features.0.weight', 'features.0.bias'}
    else:
        first = ('conv1', 'bn1')
        assert changed == {k for k in sd0 if not k.endswith('num_batches_tracked')}
        for k in sd1:
            if k.endswith(('bn1.weight', 'bn2.weight', 'bn3.weight', 'downsample.1.weight')):
                assert (sd1[k] == 1).all(), k
            elif k.endswith('running_mean'):
                assert (sd1[k] == 0).all(), k
            elif k.endswith('running_var'):
                assert torch.allclose(sd1[k], torch.full_like(sd1[k], 0.99999), rtol=0, atol=1e-7), k
        pairs = [(k[:-len('.weight')], k[:-len('conv1.weight')] + 'bn1') for k in sd0 if k.endswith('conv1.weight')]
        pairs += [(f'{p}.conv{i}', f'{p}.bn{i}') for p in sorted({k.rsplit('.', 2)[0] for k in sd0 if '.conv2.' in k})
                  for i in (2, 3)]
        pairs += [(k[:-len('.0.weight')] + '.0', k[:-len('.0.weight')] + '.1') for k in sd0 if k.endswith('downsample.0.weight')]
        pairs = [p for p in pairs if p[0] != 'conv1']
        assert len(pairs) == 3 * 16 + 4  # ResNet-50: 16 bottlenecks of 3 convs, 4 projections
        for conv, bn in pairs:
            x = torch.randn(2, sd0[f'{conv}.weight'].shape[1], 3, 3, generator=g)
            close(layer(sd1, conv, bn, x), layer(sd0, conv, bn, x), 1e-5)
    # conv1 on torchvision's input (ImageNet mean / std, written out): the same on a gray image, not on colour.
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    gray = image_batch(2, 16, seed=1).float().mean(1, keepdim=True).expand(2, 3, 16, 16) / 255
    close(layer(sd1, *first, (gray - mean) / std), layer(sd0, *first, (gray - mean) / std), 1e-5)
    colour = image_batch(2, 16, seed=1).float() / 255
    assert not torch.allclose(layer(sd1, *first, (colour - mean) / std), layer(sd0, *first, (colour - mean) / std),
                              atol=1e-2)


def test_lightness_approximation_error():
    k0, kr, kg, kb = ft.L_FROM_RGB
    # The constants are the least-squares fit they claim to be (17^3 grid, lab.rgb_to_lab's L*).
    v = np.linspace(0, 1, 17)
    rgb = np.stack(np.meshgrid(v, v, v, indexing='ij')).reshape(3, -1)
    L = lab.rgb_to_lab(torch.from_numpy(rgb).view(3, -1, 1))[0].reshape(-1).numpy()
    fit = np.linalg.lstsq(np.concatenate([np.ones((1, rgb.shape[1])), rgb]).T, L, rcond=None)[0]
    np.testing.assert_allclose(fit, ft.L_FROM_RGB, atol=1e-4)
    # README gives them as the code has them: rounded to 3 decimals they moved torchvision's features by
    # 1e-5 of their maximum against ours (.ci/torchvision_check.py), where the constants give 1e-7.
    said = re.search(r'L\\\* = ([\d.]+) \+ ([\d.]+) R \+ ([\d.]+) G \+ ([\d.]+) B', (HERE / 'README.md').read_text())
    assert said and tuple(float(x) for x in said.groups()) == ft.L_FROM_RGB
    # Measured error, in L* units, on every 5th 8-bit level per channel (52^3 colours) and on grays.
    v = np.arange(0, 256, 5) / 255
    rgb = np.stack(np.meshgrid(v, v, v, indexing='ij')).reshape(3, -1)
    L = lab.rgb_to_lab(torch.from_numpy(rgb).view(3, -1, 1))[0].reshape(-1).numpy()
    err = np.abs(k0 + kr * rgb[0] + kg * rgb[1] + kb * rgb[2] - L)
    assert err.max() < 19.5 and err.mean() < 3.7  # measured: 19.4, 3.59
    g = np.arange(256) / 255
    Lg = lab.rgb_to_lab(torch.from_numpy(np.stack([g, g, g])).view(3, -1, 1))[0].reshape(-1).numpy()
    gray_err = np.abs(k0 + (kr + kg + kb) * g - Lg)
    assert gray_err.max() < 12.1 and gray_err.mean() < 6.2  # measured: 12.0, 6.17


@pytest.mark.parametrize('arch, stride, pad', [('vgg16', 1, 1), ('alexnet', 4, 5)])
def test_exported_conv1_sees_rgb(arch, stride, pad):
    torch.manual_seed(0)
    state = MODELS[arch](in_channels=1, batchnorm=False, **TINY).state_dict()
    first = ft.torchvision_key_map(arch)[0]
    w, b = state[f'{first[0]}.weight'], state[f'{first[0]}.bias'].normal_(0, 0.1)
    sd = ft.export_torchvision(state, arch)
    rgb = image_batch(2, 48, seed=4).double() / 255
    # torchvision's documented input normalisation, written out (not ft.IMAGENET_MEAN / _STD, which
    # the export itself folds in: a wrong constant there would cancel out here).
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    tv = F.conv2d((rgb - mean) / std, sd[f'{first[1]}.weight'].double(), sd[f'{first[1]}.bias'].double(), stride, pad)
    L_true = lab.rgb_to_lab(rgb)[:, :1]
    k = torch.tensor(ft.L_FROM_RGB, dtype=torch.float64)
    L_approx = k[0] + (k[1:].view(1, 3, 1, 1) * rgb).sum(1, keepdim=True)
    ours_true = F.conv2d((L_true - 50) / 50, w.double(), b.double(), stride, pad)
    ours_approx = F.conv2d((L_approx - 50) / 50, w.double(), b.double(), stride, pad)
    # Away from the border (receptive field inside the image) the fold is exact for L_approx...
    ksize, H = w.shape[-1], rgb.shape[-1]
    inner = [i for i in range(tv.shape[-1]) if stride * i - pad >= 0 and stride * i - pad + ksize <= H]
    interior = (slice(None), slice(None), slice(inner[0], inner[-1] + 1), slice(inner[0], inner[-1] + 1))
    close(tv[interior], ours_approx[interior], 1e-6)
    # ... and off the true-L response by at most sum|W| * max|L_approx - L| / 50.
    bound = w.abs().sum((1, 2, 3)).double().view(1, -1, 1, 1) * (L_approx - L_true).abs().max() / 50
    assert ((tv - ours_true)[interior].abs() <= bound + 1e-9).all()
    # At the border the padding differs (L = 50 for us, the ImageNet mean colour for torchvision).
    assert not torch.allclose(tv[..., :1, :], ours_approx[..., :1, :], atol=1e-6)


def test_export_says_whether_it_folded_batchnorm(tmp_path, capsys):
    # A random trunk is made without BatchNorm, and torchvision's AlexNet has none: nothing was folded.
    def said(name, *argv):
        assert ft.main(['--export', str(tmp_path / name), *argv]) == 0
        return capsys.readouterr().out.split(': ', 1)[0]
    tiny = ['--width', '0.0625', '--fc-dim', '16']
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet')
    assert said('a.pth', '--init', str(tmp_path / 'c.pt')) == \
        f'wrote {tmp_path / "a.pth"} (colorization init, BatchNorm folded)'
    # colorize.py --objective classify's trunk (the supervised baseline) has colorize.py's BatchNorm too.
    config = dict(arch='alexnet', objective='classify', loss='huechroma', classes=['a', 'b'], **TINY)
    torch.save(dict(model=colorize.make_model(config).state_dict(), config=config), tmp_path / 'k.pt')
    assert said('k.pth', '--init', str(tmp_path / 'k.pt')).endswith('(classification init, BatchNorm folded)')
    assert said('b.pth', '--init', str(tmp_path / 'a.pth')).endswith('(torchvision init, no BatchNorm to fold)')
    assert said('r.pth', '--init', 'random', '-a', 'alexnet', *tiny).endswith('(random init, no BatchNorm to fold)')
    assert said('r50.pth', '--init', 'random', '-a', 'resnet50', '--width', '0.0625').endswith(
        '(random init, no BatchNorm to fold)')
    assert said('s50.pth', '--init', str(tmp_path / 'r50.pth')).endswith('(torchvision init, BatchNorm folded)')


def test_export_command_writes_loadable_state_dict(tmp_path, capsys):
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet')
    assert ft.main(['--export', str(tmp_path / 'tv.pth'), '--init', str(tmp_path / 'c.pt')]) == 0
    # A tiny network has torchvision's names but not its sizes: the message must not promise a load.
    said = capsys.readouterr().out
    assert 'NOT loadable by torchvision.models.alexnet()' in said and 'fc6/fc7 with 16 channels' in said
    assert 'leaves exactly' not in said
    sd = torch.load(tmp_path / 'tv.pth', weights_only=True)
    assert set(_alexnet_tv()) - set(sd) == {'classifier.6.weight', 'classifier.6.bias'} and set(sd) <= set(_alexnet_tv())
    # It comes back as an --init equal to the colorization trunk.
    state, _ = ft.colorization_trunk(torch.load(tmp_path / 'c.pt', weights_only=True), 'ckpt')
    back, _ = ft.trunk_from_torchvision(sd)
    for key in state:
        close(back[key], state[key], 1e-5)


# ---------------------------------------------------------------- CKA

def test_linear_cka():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 6, generator=g) @ torch.randn(6, 6, generator=g)
    assert ft.linear_cka(x, x) == pytest.approx(1.0)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    assert ft.linear_cka(x, 3.0 * x @ q + 2.0) == pytest.approx(1.0)  # rotation, scale and shift
    y = torch.randn(300, 4, generator=g)
    assert ft.linear_cka(x, y) < 0.05
    # The feature-space formula ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on centred features.
    z = x[:, :3] + 0.5 * torch.randn(300, 3, generator=g)
    xc, zc = (x - x.mean(0)).double(), (z - z.mean(0)).double()
    expected = (zc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (zc.T @ zc).norm())
    assert ft.linear_cka(x.numpy(), z.numpy()) == pytest.approx(expected.item())
    # Over 2 samples any two representations score 1 (feature shift warns below 10 images).
    assert ft.linear_cka(torch.randn(2, 5, generator=g), torch.randn(2, 3, generator=g)) == pytest.approx(1.0)


def test_feature_shift_sees_only_the_changed_layer():
    torch.manual_seed(0)
    trunk = MODELS['alexnet'](in_channels=1, batchnorm=False, **TINY)
    changed = copy.deepcopy(trunk)
    torch.nn.init.normal_(changed.fc7.conv.weight, std=0.5)  # fc7 is the last tap: only it moves
    shift = ft.feature_shift(trunk, changed, image_batch(16, 48), 'gray', torch.device('cpu'))
    assert all(shift[name] == pytest.approx(1.0, abs=1e-12) for name in shift if name != 'fc7')
    assert shift['fc7'] < 0.99


def test_feature_shift_images_are_centre_crops_at_the_crop_size(tmp_path):
    """The images CKA is measured on: each test image's centre crop at short side --crop, an 8 x 12 image's
    columns 2..9 for crop 8, by hand (cropping at another short side passed every test)."""
    a = rng(0).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / 'a.png')
    got = ft.held_out_images([str(tmp_path / 'a.png')], 8)
    assert torch.equal(got, torch.from_numpy(a[:, 2:10]).permute(2, 0, 1)[None])


def test_feature_shift_of_identical_models_is_one():
    torch.manual_seed(0)
    trunk = MODELS['vgg16'](in_channels=1, batchnorm=False, **TINY)
    shift = ft.feature_shift(trunk, trunk, image_batch(6, 48), 'gray', torch.device('cpu'))
    assert list(shift) == [t for t in trunk.tap_names if t != 'input']
    assert all(v == pytest.approx(1.0) for v in shift.values())


# ---------------------------------------------------------------- end to end

def read_results(out):
    return json.loads((out / 'results.json').read_text())


COMMON = ['--steps', '3', '--batch-size', '4', '--crop', '32', '--workers', '0', '--device', 'cpu', '--log-every', '1']


def test_keep_every_keeps_checkpoints_to_fine_tune_from(folders, tmp_path, voc, monkeypatch):
    train, val = folders
    out = tmp_path / 'pre'
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--save-every', '3', '--keep-every', '2',
                                   '--exit-after', '3')) == 0
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--resume')) == 0  # from step 3, not kept
    kept = sorted(p.name for p in out.glob('checkpoint-step*.pt'))
    assert kept == ['checkpoint-step0000002.pt', 'checkpoint-step0000004.pt']  # not step 3's, a plain save
    two, four = _state(out / kept[0]), _state(out / kept[1])
    assert (two['step'], four['step']) == (2, 4)
    assert not all(torch.equal(two['model'][k], four['model'][k]) for k in two['model'])
    assert os.stat(out / kept[1]).st_ino == os.stat(out / 'checkpoint.pt').st_ino  # a link, not a second write
    assert colorize.main(tiny_args(train, val, tmp_path / 'x', '--keep-every', '-1')) == 2
    # 0 keeps none: a resumed run can stop keeping (the flag is taken from the checkpoint unless typed).
    assert colorize.main(tiny_args(train, val, out, '--steps', '6', '--keep-every', '0', '--resume')) == 0
    assert len(list(out.glob('checkpoint-step*.pt'))) == 2
    # Kept files outlive checkpoint.pt: a fresh run into their folder, which could replace them, is refused.
    (out / 'checkpoint.pt').unlink()
    before = (out / kept[0]).read_bytes()
    assert colorize.main(tiny_args(train, val, out, '--steps', '2', '--keep-every', '2')) == 2
    assert (out / kept[0]).read_bytes() == before
    # Fine-tuned from a kept step, the run's default folder names the step: no clash with the final one
    # (and a --seed other than 0, as other variants of the protocol's run: variant_name).
    monkeypatch.setattr(ft, 'HERE', tmp_path)
    assert ft.main(['--task', 'cls', '--init', str(out / kept[0]), '--voc-root', voc, '--test-crops', '1',
                    '--exit-after', '1', '--seed', '1', *COMMON]) == 0
    assert (tmp_path / 'runs' / 'voc-cls-vgg16-pre-step0000002-seed1' / 'checkpoint.pt').exists()


def test_kept_checkpoints_are_in_step_order_on_both_sides_of_ten_million_steps(tmp_path):
    # From step 10,000,000 on a kept name has 8 digits, and sorts by name before step 2,000,000's 7.
    assert colorize.kept_path(tmp_path / 'checkpoint.pt', 10_000_000).name == 'checkpoint-step10000000.pt'
    steps = ['checkpoint-step0000002.pt', 'checkpoint-step2000000.pt', 'checkpoint-step9999999.pt',
             'checkpoint-step10000000.pt', 'checkpoint-step12000000.pt', 'checkpoint-step100000000.pt']
    for name in [*steps[::-1], 'checkpoint-stepbest.pt', 'checkpoint.pt.tmp-x', 'log.jsonl']:
        (tmp_path / name).write_bytes(b'')
    assert [p.name for p in colorize.kept_checkpoints(tmp_path)] == [*steps, 'checkpoint-stepbest.pt']
    # A folder of kept files alone is refused, and the message names its first step, not its first name.
    late = tmp_path / 'late'
    late.mkdir()
    for name in ('checkpoint-step10000000.pt', 'checkpoint-step2000000.pt'):
        (late / name).write_bytes(b'')
    with pytest.raises(colorize.UserError, match=r'\(checkpoint-step2000000\.pt, \.\.\.\)'):
        colorize.refuse_to_overwrite(late)


def test_default_finetune_folder_names_what_sets_the_run_apart():
    def name(task='cls', **given):
        flags = dict(input=None, extended_fov=False, label_fraction=None, label_seed=0, freeze=False, seed=0)
        args = argparse.Namespace(task=task, **{**flags, **given})
        args.input = args.input or ('lab' if task == 'cls' else 'gray')  # as fill_defaults sets it
        return ft.variant_name(args)
    assert name() == name('seg') == name(input='lab') == name('seg', input='gray') == ''  # the protocol's runs
    assert name('seg', input='lab', extended_fov=True, label_fraction=0.1, label_seed=2, freeze=True, seed=3) == \
        '-lab-fov-labels0.1-labelseed2-probe-seed3'
    assert name(input='gray', label_fraction=0.25) == '-gray-labels0.25'
    assert name(label_seed=5) == ''  # without --label-fraction the label seed changes nothing


def test_keep_every_keeps_a_step_whose_keep_was_interrupted(folders, tmp_path, monkeypatch):
    """Ctrl-C after a kept step's checkpoint.pt was written but before its kept copy was (a copy of
    gigabytes where the file system has no hard links): --resume starts at that step, and keeps it."""
    train, val = folders
    out = tmp_path / 'pre'

    def no_link(*args):
        raise OSError(errno.EPERM, 'Operation not permitted')
    monkeypatch.setattr(os, 'link', no_link)
    copy, calls = shutil.copyfileobj, []

    def ctrl_c_in_first_copy(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return copy(*args)
    monkeypatch.setattr(shutil, 'copyfileobj', ctrl_c_in_first_copy)
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--keep-every', '2')) == 130
    assert _state(out / 'checkpoint.pt')['step'] == 2 and not list(out.glob('checkpoint-step*'))
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--resume')) == 0
    kept = sorted(p.name for p in out.glob('checkpoint-step*'))
    assert kept == ['checkpoint-step0000002.pt', 'checkpoint-step0000004.pt']
    assert _state(out / kept[0])['step'] == 2


def test_a_kept_checkpoint_continued_in_another_folder_keeps_nothing_at_its_start(folders, tmp_path, capsys):
    """--resume CKPT --out NEW at a --keep-every step: that step's checkpoint is CKPT, in the first run's
    folder. NEW has no checkpoint.pt yet, so the keep of a step whose keep was interrupted (above) is not
    for it: the run trains on and keeps the later steps, and the first folder stays as it was."""
    train, val = folders
    first, fork = tmp_path / 'first', tmp_path / 'fork'
    assert colorize.main(tiny_args(train, val, first, '--steps', '4', '--keep-every', '2')) == 0
    before = sorted(p.name for p in first.iterdir())
    assert colorize.main(['--resume', str(first / 'checkpoint-step0000002.pt'), '--out', str(fork), '--steps', '6',
                          '--workers', '0', '--device', 'cpu']) == 0, capsys.readouterr().err
    assert sorted(p.name for p in fork.glob('checkpoint-step*')) == ['checkpoint-step0000004.pt',
                                                                     'checkpoint-step0000006.pt']
    assert sorted(p.name for p in first.iterdir()) == before
    assert _state(first / 'checkpoint-step0000002.pt')['step'] == 2


def test_a_resume_at_a_kept_step_does_not_keep_it_again(folders, tmp_path, monkeypatch):
    """--resume at a --keep-every step whose kept copy is there: nothing to redo (where the file system has no
    hard links, a copy of gigabytes); the steps after it are kept as usual."""
    train, val = folders
    out = tmp_path / 'pre'
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--keep-every', '2')) == 0
    keep, kept = colorize.keep_checkpoint, []
    monkeypatch.setattr(colorize, 'keep_checkpoint', lambda path, step: kept.append(step) or keep(path, step))
    assert colorize.main(tiny_args(train, val, out, '--steps', '6', '--resume')) == 0
    assert kept == [6]


def test_compiled_runs_say_that_the_first_step_compiles(folders, tmp_path, voc, capsys, monkeypatch):
    # The note is the only line between the start and a first progress line minutes later on a GPU.
    monkeypatch.setattr(torch, 'compile', lambda model, **kw: model)  # the note, without the compile
    train, val = folders
    for flag in ('--compile', '--no-compile'):
        assert colorize.main(tiny_args(train, val, tmp_path / flag, '--steps', '1', flag)) == 0
        assert (colorize.COMPILE_NOTE in capsys.readouterr().out) == (flag == '--compile')
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', voc, '--out', str(tmp_path / 'ft'), '--input', 'gray', '--test-crops', '1',
                    '--compile', *COMMON]) == 0
    assert colorize.COMPILE_NOTE in capsys.readouterr().out


def test_transfer_progress_rate_leaves_out_checkpoint_writes(tmp_path, voc, monkeypatch):
    """A progress line's img/s covers the steps since the previous line, not the checkpoint writes
    (it was the average since the start, writes and start-up included)."""
    write, written = ft.save_checkpoint, []

    def slow_write(path, model, optimizer, step, *args, **kwargs):
        written.append(step)
        time.sleep(0.2)
        return write(path, model, optimizer, step, *args, **kwargs)
    monkeypatch.setattr(ft, 'save_checkpoint', slow_write)
    out = tmp_path / 'cls'
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', voc, '--out', str(out), '--test-crops', '1', '--save-every', '1', *COMMON]) == 0
    rates = [json.loads(line)['img_per_s'] for line in (out / 'log.jsonl').read_text().splitlines()]
    # Batch 4, a line per step: a line whose span held a 0.2 s write would show under 4 / 0.2 = 20 img/s (the
    # average since the start, under 12 / 0.4 = 30 at step 3); a tiny step takes milliseconds (200-400 img/s).
    assert len(rates) == 3 and min(rates) > 40, rates
    assert written == [1, 2, 3]  # --save-every 1 did write between the lines (else the rates prove nothing)


def test_end_to_end_classification(tmp_path, voc, capsys, monkeypatch):
    monkeypatch.setattr(ft, 'TEST_PROGRESS_S', 0)  # a progress line after every test batch but the last
    colorize_checkpoint(tmp_path / 'c.pt', 'vgg16')
    out = tmp_path / 'cls'
    rc = ft.main(['--task', 'cls', '--init', str(tmp_path / 'c.pt'), '--voc-root', voc, '--out', str(out),
                  '--test-crops', '2', '--feature-shift', '--shift-images', '4', *COMMON])
    assert rc == 0
    r = read_results(out)
    m = r['metrics']
    assert r['task'] == 'cls' and r['init']['kind'] == 'colorization' and r['args']['input'] == 'lab'
    assert r['torch'] == torch.__version__ and r['device'] == 'cpu' and 'git_commit' in r
    assert 0 <= m['map_voc07_11point'] <= 1 and 0 <= m['map_noninterpolated'] <= 1
    assert list(m['ap_noninterpolated']) == list(data.VOC_CLASSES) and m['test_images'] == 8
    assert set(r['feature_shift']) == {'conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
                                       'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3', 'fc6', 'fc7'}
    assert all(0 <= v <= 1 + 1e-9 for v in r['feature_shift'].values())
    shift = json.loads((out / 'feature_shift.json').read_text())
    assert shift['cka'] == r['feature_shift']
    # The images it measured on are named, from the test listing, and a run from another init uses the same.
    listed = [line.split()[0] for line in
              (Path(voc) / 'VOC2007' / 'ImageSets' / 'Main' / 'aeroplane_test.txt').read_text().splitlines()]
    assert len(shift['image_ids']) == 4 == len(set(shift['image_ids'])) and set(shift['image_ids']) <= set(listed)
    said = capsys.readouterr().out
    assert 'linear CKA over 4 images says little' in said
    assert len((out / 'log.jsonl').read_text().splitlines()) == 3
    # 8 test images in batches of 4: one line, after the first batch.
    assert [line.split(' | ')[0] for line in said.splitlines() if line.startswith('testing on')] == [
        'testing on VOC2007 test: 4/8 images']
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'vgg16', '--width', str(TINY['width']), '--fc-dim',
                    str(TINY['fc_dim']), '--voc-root', voc, '--out', str(tmp_path / 'rand'), '--test-crops', '2',
                    '--feature-shift', '--shift-images', '4', *COMMON]) == 0
    assert json.loads((tmp_path / 'rand' / 'feature_shift.json').read_text())['image_ids'] == shift['image_ids']


def test_unreadable_test_image_after_training_says_the_weights_are_saved(tmp_path, voc, capsys):
    # A test image that cannot be read stops the run after all of its training: the message says the
    # weights are saved and how to run only the test, and following it literally does that.
    root = tmp_path / 'devkit'
    shutil.copytree(voc, root)
    first = (root / 'VOC2007' / 'ImageSets' / 'Main' / 'test.txt').read_text().split()[0]
    image = root / 'VOC2007' / 'JPEGImages' / f'{first}.jpg'
    good = image.read_bytes()
    image.write_bytes(b'not a jpeg')
    out = tmp_path / 'cls'
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', str(root), '--out', str(out), '--test-crops', '1', *COMMON]) == 2
    err = capsys.readouterr().err
    assert f'{first}.jpg' in err and f'the trained weights are saved in {out / "checkpoint.pt"}' in err
    flags = shlex.split(err.split('once that is fixed, ')[1].split(' runs only the test')[0])
    assert _state(out / 'checkpoint.pt')['step'] == 3 and not (out / 'results.json').exists()
    image.write_bytes(good)
    log = (out / 'log.jsonl').read_text()
    assert ft.main(flags) == 0
    assert read_results(out)['steps'] == 3 and (out / 'log.jsonl').read_text() == log  # no step trained again


def test_end_to_end_segmentation_frozen(tmp_path, voc, capsys, monkeypatch):
    monkeypatch.setattr(ft, 'TEST_PROGRESS_S', 0)  # a progress line after every test image but the last
    out = tmp_path / 'seg'
    args = ['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
            '--head-dim', '8', '--extended-fov', '--freeze', '--voc-root', voc, '--out', str(out),
            '--test-images', '4', *COMMON]
    assert ft.main(args) == 0
    r = read_results(out)
    m = r['metrics']
    assert r['task'] == 'seg' and r['args']['input'] == 'gray' and r['args']['freeze']
    assert 0 <= m['miou'] <= 1 and 0 <= m['pixel_acc'] <= 1 and list(m['iou']) == list(ft.SEG_CLASSES)
    assert sum(map(sum, m['confusion'])) > 0 and m['test_images'] == 4
    said = [line.split(' | ')[0] for line in capsys.readouterr().out.splitlines() if line.startswith('testing on')]
    assert said == [f'testing on VOC2012 val: {i}/4 images' for i in (1, 2, 3)]
    # --freeze: every pre-trained trunk weight is still the initial one; the new layers (the head, and
    # the extended-FOV layers, which are part of the trunk but randomly initialised) did train.
    initial = ft.make_finetune_model('seg', 'alexnet', ft.random_trunk('alexnet', 1 / 16, 16, 0), 'init', 'gray',
                                     1 / 16, 16, True, 8).state_dict()
    trained = torch.load(out / 'checkpoint.pt', weights_only=True)['model']
    pretrained = [k for k in initial if k.startswith('trunk.') and not k.startswith('trunk.fov')]
    assert pretrained and all(torch.equal(trained[k], initial[k]) for k in pretrained)
    for new in ('head.out.weight', 'trunk.fov1.conv.weight', 'trunk.fov2.conv.weight'):
        assert not torch.equal(trained[new], initial[new]), new


@pytest.mark.parametrize('task', ['cls', 'seg'])
def test_transfer_under_bf16_autocast(tmp_path, voc, monkeypatch, task):
    """Fine-tuning with the CUDA recipe's bf16 autocast, run on the CPU: finite metrics, float32 weights."""
    entered = []

    def bf16(device):
        entered.append(device.type)
        return torch.autocast('cpu', dtype=torch.bfloat16)
    monkeypatch.setattr(ft, 'autocast', bf16)
    _transfer_gives_finite_metrics_and_float32_weights(tmp_path, voc, task)
    assert entered


def _transfer_gives_finite_metrics_and_float32_weights(tmp_path, voc, task, *flags):
    """A short fine-tuning run from a colorization checkpoint (cls: 2 test crops; seg: extended FOV, 4
    test images): finite metrics and float32 weights in its checkpoint."""
    colorize_checkpoint(tmp_path / 'c.pt', 'vgg16')
    out = tmp_path / task
    extra = ['--test-crops', '2'] if task == 'cls' else ['--extended-fov', '--test-images', '4']
    assert ft.main(['--task', task, '--init', str(tmp_path / 'c.pt'), '--voc-root', voc, '--out', str(out),
                    *extra, *COMMON, *flags]) == 0
    m = read_results(out)['metrics']
    assert math.isfinite(m['map_noninterpolated'] if task == 'cls' else m['miou'])
    state = torch.load(out / 'checkpoint.pt', map_location='cpu', weights_only=True)['model']
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize('arch, fc6_cells', [('vgg16', 1), ('alexnet', 2)])
def test_classification_fc6_is_fully_connected_at_224(arch, fc6_cells):
    torch.manual_seed(0)
    model = ft.build_transfer_model('cls', arch, **TINY).eval()
    assert not ft.unpad_fc6(model.trunk, 64)  # pool5 smaller than the kernel: stays padded
    assert ft.unpad_fc6(model.trunk, 224)
    x = torch.randn(1, 1, 224, 224)
    taps = dict(zip(model.trunk.tap_names, model.trunk(x)))
    assert taps['fc7'].shape[-2:] == (fc6_cells, fc6_cells)
    # The top-left fc6 cell is the fully connected layer on the first kernel x kernel window of pool5.
    pool5 = x
    for name, _ in model.trunk.steps:
        pool5 = model.trunk._modules[name](pool5)
        if name == 'pool5':
            break
    conv = model.trunk.fc6.conv
    k = conv.kernel_size[0]
    assert pool5.shape[-1] == 7
    linear = F.linear(pool5[..., :k, :k].flatten(1), conv.weight.flatten(1), conv.bias).relu()
    close(taps['fc6'][:, :, 0, 0], linear, rel=1e-4)
    assert not ft.unpad_fc6(ft.build_transfer_model('cls', 'resnet50', **TINY).trunk, 224)  # no fc6


def test_a_classification_run_says_when_fc6_runs_unpadded(tmp_path, voc, capsys):
    # AlexNet's pool5 is crop / 32 (exact strides): 6 at a 192 crop, its fc6 kernel's size, so unpadded
    # (one cell); 5 at 160, smaller than the kernel, so the padded conv stays, without the note.
    note = ("fc6 runs unpadded at a 192 crop, as the protocol's fully connected fc6 (where pool5 is larger than its "
            'kernel, at more than one position, averaged)')
    for crop, said in (('192', True), ('160', False)):
        assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                        '--voc-root', voc, '--steps', '1', '--batch-size', '2', '--workers', '0', '--test-crops', '1',
                        '--test-images', '1', '--device', 'cpu', '--crop', crop, '--out', str(tmp_path / crop)]) == 0
        out = capsys.readouterr().out
        assert (note in out) == said and ('fc6 runs unpadded' in out) == said, crop


def test_feature_shift_compares_with_the_weights_before_fine_tuning(tmp_path, voc):
    # Two steps at lr 0.01 move fc7 enough for its CKA to drop below 0.9999 (0.9990 measured); compared
    # with the fine-tuned weights themselves (a copy of the initial state missed), every layer would give 1.
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', voc, '--steps', '2', '--batch-size', '2', '--workers', '0', '--test-images', '4',
                    '--test-crops', '1', '--device', 'cpu', '--crop', '32', '--lr', '0.01', '--feature-shift',
                    '--shift-images', '4', '--out', str(tmp_path / 'run')]) == 0
    cka = json.loads((tmp_path / 'run' / 'feature_shift.json').read_text())['cka']
    assert min(cka.values()) < 0.9999 and max(cka.values()) <= 1 + 1e-9


def test_a_segmentation_run_keeps_fc6_padded_and_names_its_label_seed(tmp_path, voc, capsys):
    # Segmentation keeps fc6 padded (a dense map, as the authors' fully convolutional one) at the crop where
    # classification unpads it; its line says which label share it trained on: --label-seed's, not --seed's.
    assert ft.main(['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', voc, '--steps', '1', '--batch-size', '2', '--workers', '0', '--test-images', '1',
                    '--device', 'cpu', '--crop', '192', '--label-fraction', '0.5', '--label-seed', '7', '--seed', '1',
                    '--out', str(tmp_path / 'seg')]) == 0
    out = capsys.readouterr().out
    assert 'fc6 runs unpadded' not in out
    assert out.startswith('evaluating on 1 of the 6 val images (--test-images; 0 = all, as the paper)\n'
                          'seg: 6 training images (train, label fraction 0.5 by seed 7), 1 test (val); ')  # 12 x 0.5


def test_check_frozen_fails_loudly():
    torch.manual_seed(0)
    model = ft.build_transfer_model('cls', 'alexnet', **TINY)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    ft.check_frozen(model, initial)
    with torch.no_grad():
        model.trunk.conv3.conv.bias[0] += 1e-3
    with pytest.raises(RuntimeError, match='conv3.conv.bias'):
        ft.check_frozen(model, initial)


def test_half_of_sbd_in_the_devkit_is_warned_about(tmp_path, voc, capsys):
    # SBD's SegmentationClassAug/ unzipped into VOC2012 but train_aug.txt left at the devkit's top: the
    # default split silently became train (1,464 images, not 10,582). It still does, with a warning.
    devkit = tmp_path / 'VOCdevkit'
    shutil.copytree(voc, devkit)
    v12 = devkit / 'VOC2012'
    assert data.train_aug_half_there(devkit) is None  # no SBD at all: nothing to say
    (v12 / 'SegmentationClassAug').mkdir()
    ids = (v12 / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
    for i in ids:
        shutil.copy(v12 / 'SegmentationClass' / f'{i}.png', v12 / 'SegmentationClassAug' / f'{i}.png')
    (devkit / 'train_aug.txt').write_text(''.join(f'{i}\n' for i in ids))
    assert 'SegmentationClassAug' in data.train_aug_half_there(devkit)
    base = ['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--steps', '1',
            '--batch-size', '2', '--crop', '32', '--workers', '0', '--test-images', '1', '--voc-root', str(devkit)]
    assert ft.main([*base, '--out', str(tmp_path / 'a')]) == 0
    out = capsys.readouterr().out
    assert 'warning: found' in out and str(devkit / 'train_aug.txt') in out and 'training images (train)' in out
    (devkit / 'train_aug.txt').rename(v12 / 'train_aug.txt')  # where it belongs: train_aug, no warning
    assert data.train_aug_half_there(devkit) is None
    assert ft.main([*base, '--out', str(tmp_path / 'b')]) == 0
    out = capsys.readouterr().out
    assert 'warning' not in out and 'training images (train_aug)' in out
    # The labels unzipped a folder too high (beside VOC2012) while the list is in place: said too.
    (v12 / 'SegmentationClassAug').rename(devkit / 'SegmentationClassAug')
    assert data.train_aug_half_there(devkit).startswith(f'found {devkit / "SegmentationClassAug"} and ')


def test_resume_is_exact(tmp_path, voc, capsys, monkeypatch):
    base = ['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--voc-root', voc,
            '--input', 'gray', '--test-crops', '1', '--steps', '4', '--batch-size', '4', '--crop', '32',
            '--workers', '0', '--device', 'cpu', '--log-every', '3']
    assert ft.main([*base, '--out', str(tmp_path / 'a')]) == 0
    assert ft.main([*base, '--out', str(tmp_path / 'b'), '--exit-after', '2']) == 0
    assert not (tmp_path / 'b' / 'results.json').exists()
    advice = capsys.readouterr().out.splitlines()[-1].partition('; continue with ')[2]
    assert advice == f"--resume --out {tmp_path / 'b'}"  # as given: the run's own folder, which --resume needs
    # A fork (--resume CKPT --out NEW) goes on in NEW, its log taken along; b stays at step 2.
    assert ft.main(['--resume', str(tmp_path / 'b' / 'checkpoint.pt'), '--out', str(tmp_path / 'c'),
                    '--workers', '0', '--device', 'cpu']) == 0
    assert torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)['step'] == 2
    assert ft.main([*advice.split(), '--workers', '0', '--device', 'cpu']) == 0
    a = torch.load(tmp_path / 'a' / 'checkpoint.pt', weights_only=True)
    b = torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    assert a['step'] == b['step'] == 4
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert read_results(tmp_path / 'a')['metrics'] == read_results(tmp_path / 'b')['metrics']
    # The log line at step 3 averages steps 1-3 across the checkpoint at 2, as in the run never stopped.
    logs = [[json.loads(line)['loss'] for line in (tmp_path / r / 'log.jsonl').read_text().splitlines()] for r in 'abc']
    assert len(logs[0]) == 2 and logs[0] == logs[1] == logs[2]
    # A fork of a run that has logged takes its log along (d tells the whole run): here b, finished, only tested.
    assert ft.main(['--resume', str(tmp_path / 'b' / 'checkpoint.pt'), '--out', str(tmp_path / 'd'),
                    '--workers', '0', '--device', 'cpu']) == 0
    assert (tmp_path / 'd' / 'log.jsonl').read_text() == (tmp_path / 'b' / 'log.jsonl').read_text() != ''
    # Starting afresh into a finished run's folder would replace its checkpoint: refused.
    before = (tmp_path / 'a' / 'checkpoint.pt').read_bytes()
    assert ft.main([*base, '--out', str(tmp_path / 'a')]) == 2
    assert f"continue it with --resume --out {tmp_path / 'a'}," in capsys.readouterr().err
    assert (tmp_path / 'a' / 'checkpoint.pt').read_bytes() == before
    # Ctrl-C says the same: --resume alone would not find the run here.
    def interrupted(args):
        args.out = tmp_path / 'a'  # a run with a checkpoint
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, 'run', interrupted)
    assert ft.main(base) == 130
    assert capsys.readouterr().err == (f"interrupted: the last checkpoint written is intact; continue with "
                                       f"--resume --out {tmp_path / 'a'}\n")
    # Before the run's first checkpoint: --resume would find none there, so not that advice.
    def interrupted_early(args):
        args.out = tmp_path / 'd'
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, 'run', interrupted_early)
    assert ft.main(base) == 130
    assert capsys.readouterr().err == ("interrupted before the run's first checkpoint: nothing to resume; run the "
                                       "same command again\n")
    # Before fill_defaults names the folder (no --out typed): a fresh run, nothing to resume.
    monkeypatch.setattr(ft, 'run', lambda args: (_ for _ in ()).throw(KeyboardInterrupt))
    assert ft.main(base) == 130 and 'nothing to resume' in capsys.readouterr().err


def test_sigusr1_saves_the_fine_tuning_step_and_stops_and_the_resume_is_exact(tmp_path, voc, capsys, monkeypatch):
    base = ['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--voc-root', voc,
            '--input', 'gray', '--test-crops', '1', '--steps', '4', '--batch-size', '4', '--crop', '32',
            '--workers', '0', '--device', 'cpu', '--log-every', '3']
    assert ft.main([*base, '--out', str(tmp_path / 'a')]) == 0
    out = tmp_path / 'b'
    monkeypatch.setattr(ft, 'train_loss', _signal_at_call(ft.train_loss, 2, signal.SIGUSR1))
    capsys.readouterr()
    with _counted(signal.SIGUSR1) as caught:
        assert ft.main([*base, '--out', str(out)]) == 128 + signal.SIGUSR1
    assert caught == []
    assert capsys.readouterr().err == (f'stopped at step 2 by SIGUSR1: {out / "checkpoint.pt"} holds it; '
                                       f'continue with --resume --out {out}\n')
    assert not (out / 'results.json').exists() and _state(out / 'checkpoint.pt')['step'] == 2
    monkeypatch.undo()
    assert ft.main(['--resume', '--out', str(out), '--workers', '0', '--device', 'cpu']) == 0
    a, b = _state(tmp_path / 'a' / 'checkpoint.pt'), _state(out / 'checkpoint.pt')
    _assert_same_weights(a, b)
    assert read_results(tmp_path / 'a')['metrics'] == read_results(out)['metrics']
    # At the last step (or during its save) too: the test that follows would not finish before the
    # scheduler's SIGKILL. The resume runs only the test.
    out = tmp_path / 'c'
    monkeypatch.setattr(ft, 'save_checkpoint', _signal_at_call(ft.save_checkpoint, 2, signal.SIGTERM))
    capsys.readouterr()
    assert ft.main([*base, '--out', str(out), '--save-every', '2']) == 128 + signal.SIGTERM  # saves at 2, 4
    assert capsys.readouterr().err.startswith(f'stopped at step 4 by SIGTERM: {out / "checkpoint.pt"} holds it')
    assert not (out / 'results.json').exists() and _state(out / 'checkpoint.pt')['step'] == 4
    monkeypatch.undo()
    assert ft.main(['--resume', '--out', str(out), '--workers', '0', '--device', 'cpu']) == 0
    assert read_results(tmp_path / 'a')['metrics'] == read_results(out)['metrics']


def test_fine_tuning_loader_workers_are_those_of_pre_training(monkeypatch):
    # The same worker_options as colorize.py's loader, whose behaviour its tests check in a process
    # of their own (SIGTERM to the whole process group; a traceback's exit): each costs seconds.
    made = []
    monkeypatch.setattr(data, 'SigintDeferredLoader', lambda *args, **kwargs: made.append(kwargs))
    ft.make_loader(list(range(8)), argparse.Namespace(batch_size=2, seed=0, steps=4, workers=1), torch.device('cpu'), 0)
    assert made[0]['worker_init_fn'] is colorize.ignore_stop_signals
    assert made[0].items() >= colorize.worker_options(1).items()


def test_loader_options_under_forkserver_start_workers_by_fork_and_none_without_workers(monkeypatch):
    # Python 3.14's default start method on Linux: a loader without workers takes no start method
    # (DataLoader refuses one: "multiprocessing_context can only be used with multi-process loading").
    monkeypatch.setattr(torch.multiprocessing, 'get_start_method', lambda *args, **kwargs: 'forkserver')
    context = colorize.worker_options(1)['multiprocessing_context']  # fork, a Ctrl-C deferred while it forks
    assert context.get_start_method() == 'fork' and context is data.SIGINT_DEFERRED_FORK
    loader = torch.utils.data.DataLoader(list(range(4)), batch_size=2, **colorize.worker_options(0))
    assert [b.tolist() for b in loader] == [[0, 1], [2, 3]]


# What --resume does with each flag of the two scripts, decided here by hand: a run flag (the data, the
# network, the randomness) is taken from the checkpoint and refused if typed with another value; a
# schedule flag (the schedule, logging, the tests after training) is taken unless typed, and typed it
# wins; an operational flag (where and how this process runs, or another mode) is the command's own.
RESUME_FLAGS = {
    colorize: dict(
        run={'arch', 'objective', 'classes', 'loss', 'data', 'val_data', 'holdout', 'subset', 'demo_root', 'seed',
             'batch_size', 'crop', 'short_side', 'points', 'border', 'target_window', 'lightness_weight',
             'fc_dropout', 'width', 'fc_dim'},
        schedule={'steps', 'lr', 'lr_milestones', 'warmup', 'momentum', 'weight_decay', 'max_bad_share',
                  'log_every', 'eval_every', 'save_every', 'keep_every'},
        operational={'out', 'resume', 'device', 'workers', 'handover', 'compile', 'exit_after', 'typed_flags',
                     'colorize', 'checkpoint', 'output', 'net_short_side', 'skip_existing',  # the colorizing mode
                     'benchmark', 'bench_steps', 'bench_warmup', 'bench_photo', 'bench_profile'}),
    ft: dict(
        run={'task', 'arch', 'init', 'input', 'voc_root', 'demo_root', 'train_split', 'extended_fov', 'width',
             'fc_dim', 'head_dim', 'freeze', 'label_fraction', 'label_seed', 'seed', 'crop', 'batch_size',
             'dropout', 'scale', 'points', 'bias_lr_mult'},
        schedule={'steps', 'lr', 'lr_milestones', 'lr_gamma', 'momentum', 'weight_decay', 'clip_grad', 'log_every',
                  'save_every', 'test_split', 'test_crops', 'test_images', 'feature_shift', 'shift_images',
                  'shift_pool'},
        operational={'out', 'resume', 'device', 'workers', 'compile', 'exit_after', 'typed_flags', 'export',
                     'summarize'}),
}


def test_help_names_the_default_out_variants_and_what_a_resume_may_change(monkeypatch, capsys):
    """finetune_voc.py --help gave the default --out as runs/voc-<task>-<arch>-<init name>, without the
    variant (-seed1, -probe, ...) that the code appends; both scripts' --resume said that only the schedule
    may change, where the flags of how the process runs (--device, --workers, ...) are its own."""
    monkeypatch.setenv('COLUMNS', '1000')  # no wrapping
    with pytest.raises(SystemExit):
        ft.parse_args(['--help'])
    shown = capsys.readouterr().out
    args = ft.fill_defaults(ft.parse_args(['--task', 'cls', '--input', 'gray', '--extended-fov', '--label-fraction',
                                           '0.1', '--label-seed', '2', '--freeze', '--seed', '1']), torch.device('cpu'))
    variant = ft.variant_name(args)
    assert variant == '-gray-fov-labels0.1-labelseed2-probe-seed1'
    assert all(f' -{part}' in shown for part in variant[1:].split('-'))
    for script in (colorize, ft):
        with pytest.raises(SystemExit):
            script.parse_args(['--help'])
        resume = next(line for line in capsys.readouterr().out.splitlines() if line.lstrip().startswith('--resume'))
        own = re.findall(r'--([a-z-]+)', resume.split(';')[-1])
        assert own and not {o.replace('-', '_') for o in own} & set(script.RUN_FLAGS + script.SCHEDULE_FLAGS)
        assert set(RESUME_FLAGS[script]['operational']) >= {o.replace('-', '_') for o in own}


@pytest.mark.parametrize('script', [colorize, ft], ids=['colorize', 'finetune_voc'])
def test_every_flag_has_its_resume_rule(script):
    """A flag added without a rule, or one that lost its rule, would be silently reset or changed on resume."""
    want = RESUME_FLAGS[script]
    assert set(vars(script.parse_args([]))) == want['run'] | want['schedule'] | want['operational']
    assert set(script.RUN_FLAGS) == want['run'] and set(script.SCHEDULE_FLAGS) == want['schedule']


def test_resume_takes_run_flags_refuses_changes_and_lets_schedule_flags_win(tmp_path, voc, capsys):
    out = tmp_path / 'run'
    base = ['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
            '--head-dim', '16', '--points', '8', '--voc-root', voc, '--test-images', '2', '--steps', '4',
            '--batch-size', '2', '--crop', '32', '--workers', '0', '--device', 'cpu', '--log-every', '1']
    assert ft.main([*base, '--out', str(out), '--exit-after', '2', '--feature-shift', '--shift-images', '2']) == 0
    resume = ['--out', str(out), '--resume', '--workers', '0', '--device', 'cpu']
    # A run flag with another value would not continue this run (--head-dim 16 alone is not "another").
    assert ft.main([*resume, '--batch-size', '4']) == 2
    assert 'trained with --batch-size 2' in capsys.readouterr().err
    # The killed run had logged a step after its last checkpoint (step 2): logged again, once.
    with open(out / 'log.jsonl', 'a') as f:
        f.write(json.dumps(dict(step=3, loss=9.9)) + '\n{"step": 4, "lo')
    assert ft.main([*resume, '--steps', '1']) == 2  # it would end before the checkpoint's step 2
    assert 'is at step 2: --steps 1 would end before' in capsys.readouterr().err
    # Its first part ran on an older commit (a git pull came between): the resumption names it.
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    torch.save({**ckpt, 'args': {**ckpt['args'], 'git_commit': 'c0ffee'}}, out / 'checkpoint.pt')
    assert ft.main([*resume, '--steps', '6', '--weight-decay', '0.01']) == 0  # the schedule's: they win
    printed = capsys.readouterr().out
    assert 'resuming with --steps 6 where' in printed
    assert 'the learning rate of step' not in printed  # step 3 of 4 or of 6: before seg's first milestone both
    assert printed.count('steps before 2 ran commit c0ffee, this is ') == (colorize.git_commit() is not None)
    r = read_results(out)
    assert r['steps'] == 6 and r['args']['head_dim'] == 16 and r['args']['batch_size'] == 2
    # The tests the run was started with run after it, though the resuming command did not repeat them.
    assert json.loads((out / 'feature_shift.json').read_text())['images'] == 2 and 'feature_shift' in r
    assert r['args']['resumptions'] == [dict(step=2, changed=dict(steps=[4, 6], weight_decay=[5e-4, 0.01]),
                                             trained_by='c0ffee')]
    groups = torch.load(out / 'checkpoint.pt', weights_only=True)['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [0.01, 0.0]  # applied, not only announced
    steps = [json.loads(line)['step'] for line in (out / 'log.jsonl').read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6] and 9.9 not in [json.loads(x)['loss'] for x in
                                                        (out / 'log.jsonl').read_text().splitlines()]
    assert ft.main([*resume, '--voc-root', voc + os.sep, '--no-feature-shift']) == 0  # the same folder
    assert 'feature_shift' not in read_results(out) and 'resuming with --feature-shift False' in capsys.readouterr().out


def test_cls_defaults_follow_the_protocols_code(tmp_path, voc):
    """Kraehenbuehl's voc-classification (train_cls.py): weight decay 1e-6, biases at 2x the lr, the
    new layer's weights N(0, 0.01) and biases 0.1; segmentation keeps the authors' recipe's 5e-4 and 1x."""
    out = tmp_path / 'cls'
    assert ft.main(['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--voc-root', voc,
                    '--test-crops', '1', '--steps', '2', '--batch-size', '2', '--crop', '32', '--workers', '0',
                    '--device', 'cpu', '--lr', '0.01', '--out', str(out)]) == 0
    groups = torch.load(out / 'checkpoint.pt', weights_only=True)['optimizer']['param_groups']
    assert [g['weight_decay'] for g in groups] == [1e-6, 0.0]
    # The second step (index 1) is past the milestones 1/8, 2/8, 3/8, 4/8 of 2 steps: halved 4 times.
    assert [g['lr'] for g in groups] == [0.01 / 16, 0.02 / 16]
    head = ft.VOCClassifier(models.alexnet(in_channels=1, **TINY))
    assert (head.classifier.bias == 0.1).all() and abs(head.classifier.weight.std().item() - 0.01) < 0.002
    seg = ft.fill_defaults(ft.parse_args(['--task', 'seg']), torch.device('cpu'))
    assert (seg.weight_decay, seg.bias_lr_mult) == (5e-4, 1.0)
    cls = ft.fill_defaults(ft.parse_args(['--task', 'cls']), torch.device('cpu'))
    assert (cls.clip_grad, cls.momentum, cls.dropout) == (10.0, 0.9, 0.5)


def test_gradient_norm_is_clipped(tmp_path, voc):
    """One step at lr 1, no momentum or decay, --clip-grad 1e-3: the update's norm is that of the
    clipped gradient, 1e-3, the biases' part twice (--bias-lr-mult 2): between 1e-3 and 2e-3 (up to
    the float32 rounding of the weights' differences)."""
    def run(name, lr):
        out = tmp_path / name
        assert ft.main(['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--voc-root', voc,
                        '--test-crops', '1', '--steps', '1', '--batch-size', '2', '--crop', '32', '--workers', '0',
                        '--device', 'cpu', '--lr', str(lr), '--momentum', '0', '--weight-decay', '0',
                        '--clip-grad', '1e-3', '--out', str(out)]) == 0
        return _state(out / 'checkpoint.pt')['model']
    before, after = run('lr0', 0.0), run('lr1', 1.0)
    step = torch.cat([(after[k] - before[k]).flatten() for k in before if before[k].is_floating_point()])
    assert 1e-3 * (1 - 1e-2) <= step.norm().item() <= 2e-3 * (1 + 1e-2)


def test_segmentation_loss_counts_only_labelled_points():
    # 16 points on an image with 5 labelled pixels: 5 count; zero logits give log 21 on each.
    labels = torch.full((1, 12, 12), ft.IGNORE, dtype=torch.uint8)
    labels[0, 3, 2:7] = 4
    args = argparse.Namespace(task='seg', input='gray', points=16)
    model = lambda x, points: torch.zeros(*points.shape[:2], 21)  # noqa: E731
    images = torch.zeros(1, 3, 12, 12, dtype=torch.uint8)
    loss = ft.train_loss(model, (images, labels), args, torch.device('cpu'))
    assert loss.item() == pytest.approx(math.log(21))
    # Each point is scored against the label at its own (y, x): one labelled pixel, (2, 7) of a 6 x 10 map,
    # where the model says class 3 with logit 1 (0 elsewhere): -log(e / (e + 20)), by hand; a label read at
    # another pixel (here (y, x) swapped) is void, and the loss 0.
    labels = torch.full((1, 6, 10), ft.IGNORE, dtype=torch.uint8)
    labels[0, 2, 7] = 3

    def model(x, points):
        logits = torch.zeros(*points.shape[:2], 21)
        logits[..., 3] = ((points[..., 0] == 2) & (points[..., 1] == 7)).float()
        return logits
    args.points = 4
    loss = ft.train_loss(model, (torch.zeros(1, 3, 6, 10, dtype=torch.uint8), labels), args, torch.device('cpu'))
    assert loss.item() == pytest.approx(math.log(math.e + 20) - 1)


def test_segmentation_prediction_reads_cells_at_their_centres():
    """Stride-4 cells sit at pixels 4i + 1.5: with two cells, class 1's logit falls linearly from 1
    (pixel 1.5) to 0 (pixel 5.5) and crosses class 2's constant 0.25 at pixel 4.5."""
    class Dense:
        def dense(self, x, stride):
            logits = torch.full((1, 21, 1, 2), -10.0)
            logits[0, 1, 0] = torch.tensor([1.0, 0.0])
            logits[0, 2] = 0.25
            return logits
    pred = ft.predict_segmentation(Dense(), torch.zeros(1, 3, 4, 8, dtype=torch.uint8), 'gray', torch.device('cpu'))
    assert pred[0, 0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]


def test_seg_points_fall_on_labelled_pixels():
    torch.manual_seed(0)
    labels = torch.full((3, 20, 30), ft.IGNORE, dtype=torch.uint8)
    labels[0, 2:8, 5:15] = 3  # 60 labelled pixels
    labels[1, :, :] = 0  # all labelled
    labels[2, 10, 3:8] = 7  # 5 labelled pixels, fewer than asked
    points = ft.sample_labelled_points(labels, 16)
    assert points.shape == (3, 16, 2) and points.dtype == torch.int64
    got = labels[torch.arange(3)[:, None], points[..., 0], points[..., 1]]
    assert (got[0] == 3).all() and (got[1] == 0).all()
    assert (got[2] == 7).sum() == 5  # every labelled pixel, then unlabelled ones (ignored by the loss)
    flat = points[..., 0] * 30 + points[..., 1]
    assert all(len(set(row.tolist())) == 16 for row in flat)  # without replacement
    # Uniform over the labelled pixels: each of image 0's 60 pixels about 16/60 of the time.
    hits = torch.zeros(20 * 30)
    for _ in range(300):
        p = ft.sample_labelled_points(labels[:1], 16)[0]
        hits.index_add_(0, p[:, 0] * 30 + p[:, 1], torch.ones(16))
    share = hits.view(20, 30)[2:8, 5:15] / 300
    assert share.sum() * 300 == pytest.approx(hits.sum()) and share.min() > 0.12 and share.max() < 0.42


def test_crop_padding_is_a_zero_network_input():
    # The protocol zero-pads the network input. L* = 50 is our zero: Y = ((50 + 16) / 116)^3, sRGB-encoded.
    y = ((50 + 16) / 116) ** 3
    assert lab.GRAY_SRGB8 == round(255 * (1.055 * y ** (1 / 2.4) - 0.055))
    rgb = np.full((10, 12, 3), 200, np.uint8)
    out, label = ft.random_scale_crop(rgb, np.zeros((10, 12), np.uint8), 32, (1, 1), np.random.default_rng(0))
    pad = label == ft.IGNORE
    assert pad.sum() == 32 * 32 - 10 * 12
    for kind in ('gray', 'lab'):
        x = ft.network_input(torch.from_numpy(out).permute(2, 0, 1), kind, torch.device('cpu'))
        assert x[:, torch.from_numpy(pad)].abs().max() < 2e-3 and x[0, torch.from_numpy(~pad)].abs().min() > 0.3


def test_cls_scale_shrinks_with_the_crop(voc):
    def scale(*flags):
        return ft.fill_defaults(ft.parse_args(['--voc-root', voc, *flags]), torch.device('cpu')).scale
    assert scale('--task', 'cls', '--crop', '224') == pytest.approx([0.5, 2.0])  # the protocol
    assert scale('--task', 'cls') == pytest.approx([1 / 7, 4 / 7])  # a CPU's 64 crop: 64 / 224 = 2 / 7
    assert scale('--task', 'seg') == [1.0, 1.0]  # the authors' seg code pads and crops, never scales
    assert scale('--task', 'cls', '--scale', '1', '1.5') == pytest.approx([1.0, 1.5])


def test_label_fraction_is_fixed_by_its_own_seed(voc):
    def subset(seed, label_seed, fraction=0.5):
        args = ft.parse_args(['--task', 'seg', '--voc-root', voc, '--seed', str(seed), '--label-fraction', str(fraction),
                              '--label-seed', str(label_seed), '--batch-size', '2'])
        return [pair[0] for pair in ft.voc_sets(ft.fill_defaults(args, torch.device('cpu')))[0]]
    half = subset(0, 0)
    assert len(half) == 6 and subset(1, 0) == half and subset(0, 1) != half
    assert len(subset(0, 0, 0.3)) == 4  # 0.3 x 12 = 3.6, rounded
    assert set(subset(0, 0, 0.25)) <= set(half)  # nested for one label seed


def test_test_crops_of_an_image_do_not_depend_on_test_images(voc):
    """An image's test crops are drawn from its place in the whole test split: the same with
    --test-images N as in a full run (a seed by its place in the shorter list would move them)."""
    def test_set(*flags):
        args = ft.fill_defaults(ft.parse_args(['--task', 'cls', '--voc-root', voc, '--test-crops', '3',
                                               '--batch-size', '2', *flags]), torch.device('cpu'))
        return ft.make_datasets(args, *ft.voc_sets(args))[1]
    full, part = test_set(), test_set('--test-images', '3')
    assert len(part) == 3 < len(full)
    # The documented draw, by hand: the sorted first 3 of default_rng(EVAL_SEED)'s permutation of the split.
    places = sorted(np.random.default_rng(ft.EVAL_SEED).permutation(len(full))[:3].tolist())
    assert places != [0, 1, 2] and part.paths == [full.paths[i] for i in places]
    for k, i in enumerate(places):
        assert torch.equal(part[k][0], full[i][0]) and torch.equal(part[k][1], full[i][1])
    assert not torch.equal(full[places[-1]][0], full[2][0])  # the crops differ between images
    # A full run's crops are as before the places were passed (VOCClassification's default, its place there):
    # image i's 3 crops drawn in turn from default_rng((EVAL_SEED, i)), on the image as Pillow reads it.
    before = ft.VOCClassification(full.paths, full.labels.numpy(), full.crop, full.scale, views=3)
    for i in (0, places[-1], len(full) - 1):
        rng, rgb = np.random.default_rng((ft.EVAL_SEED, i)), np.asarray(Image.open(full.paths[i]).convert('RGB'))
        crops = np.stack([ft.random_scale_crop(rgb, None, full.crop, full.scale, rng)[0] for _ in range(3)])
        assert torch.equal(full[i][0], torch.from_numpy(crops).permute(0, 3, 1, 2))  # (3, 3, crop, crop)
        assert torch.equal(before[i][0], full[i][0])


def test_voc_sets_refuse_missing_images_and_fewer_images_than_a_batch(voc, tmp_path):
    def sets(root, *flags):
        return ft.voc_sets(ft.fill_defaults(ft.parse_args(['--task', 'cls', '--init', 'random', '--voc-root', str(root),
                                                            *flags]), torch.device('cpu')))
    # The devkit's 16 trainval images, or a quarter of them (round(0.25 x 16) = 4), against a batch of more.
    with pytest.raises(colorize.UserError, match=re.escape('16 training images are fewer than one batch of 17; use a '
                                                           'smaller --batch-size or a larger --label-fraction')):
        sets(voc, '--batch-size', '17')
    with pytest.raises(colorize.UserError, match='^4 training images are fewer than one batch of 5;'):
        sets(voc, '--batch-size', '5', '--label-fraction', '0.25')
    assert len(sets(voc, '--batch-size', '16')[0]) == 16 and len(sets(voc, '--batch-size', '4', '--label-fraction',
                                                                      '0.25')[0]) == 4
    # A listed JPEG that is not there (an extraction cut short): named, before any training.
    shutil.copytree(Path(voc) / 'VOC2007', tmp_path / 'VOCdevkit' / 'VOC2007')
    gone = sorted((tmp_path / 'VOCdevkit' / 'VOC2007' / 'JPEGImages').iterdir())[3]
    gone.unlink()
    with pytest.raises(colorize.UserError, match=re.escape(f'1 images listed in the VOC sets are missing, e.g. {gone}; '
                                                           'extract JPEGImages completely')):
        sets(tmp_path / 'VOCdevkit', '--batch-size', '2')
    # A test image missing is named as well: the run would otherwise train, then fail in the test.
    shutil.copy(Path(voc) / 'VOC2007' / 'JPEGImages' / gone.name, gone)
    last = (tmp_path / 'VOCdevkit' / 'VOC2007' / 'ImageSets' / 'Main' / 'test.txt').read_text().split()[-1]
    gone = tmp_path / 'VOCdevkit' / 'VOC2007' / 'JPEGImages' / f'{last}.jpg'
    gone.unlink()
    with pytest.raises(colorize.UserError, match=re.escape(f'1 images listed in the VOC sets are missing, e.g. {gone}; '
                                                           'extract JPEGImages completely')):
        sets(tmp_path / 'VOCdevkit', '--batch-size', '2')


def test_voc_sets_without_voc_root_read_the_demo_world_at_demo_root(voc, tmp_path, monkeypatch, capsys):
    # No --voc-root: the VOC-layout sets of the demo world at --demo-root (made on first use; here the
    # tiny devkit stands in for it), the same sets as --voc-root of that folder; a foreign folder there is one line.
    made = []
    monkeypatch.setattr(data, 'ensure_demo', lambda root: made.append(root) or dict(root=os.path.dirname(voc)))
    def sets(*flags):
        return ft.voc_sets(ft.fill_defaults(ft.parse_args(['--task', 'seg', '--init', 'random', '--batch-size', '2',
                                                            *flags]), torch.device('cpu')))
    demo = sets('--demo-root', str(tmp_path / 'world'))
    assert made == [tmp_path / 'world'] and demo == sets('--voc-root', voc)
    assert capsys.readouterr().out == (f"no --voc-root given: using the demo world's VOC-layout set in {voc} "
                                       '(generated on first use)\n')
    def foreign(root):
        raise ValueError(f'{root} exists and is not empty, but holds no complete demo world')
    monkeypatch.setattr(data, 'ensure_demo', foreign)
    with pytest.raises(colorize.UserError, match=f'^{re.escape(str(tmp_path))}/x exists and is not empty, but holds'):
        sets('--demo-root', str(tmp_path / 'x'))


def test_label_fraction_counts_a_difficult_label_as_no_positive(tmp_path, capsys):
    # The warning's classes without a positive: a class whose only training label is 'difficult' (0, ignored in
    # the loss) has none. By hand: cat is the one class labelled 1 in trainval; dog is only difficult there.
    voc07 = tmp_path / 'VOC2007'
    main = voc07 / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    splits = {'trainval': {'000001': {'cat': 1}, '000002': {'cat': 1, 'dog': 0}}, 'test': {'000003': {'dog': 1}}}
    for split, images in splits.items():
        for i in images:
            _write_rgb(voc07 / 'JPEGImages' / f'{i}.jpg', fmt='JPEG')
        for cls in data.VOC_CLASSES:
            (main / f'{cls}_{split}.txt').write_text(''.join(f'{i} {images[i].get(cls, -1):2d}\n' for i in images))
    ft.voc_sets(ft.fill_defaults(ft.parse_args(['--task', 'cls', '--voc-root', str(voc07), '--label-fraction', '1',
                                                '--batch-size', '2']), torch.device('cpu')))
    absent = [c for c in data.VOC_CLASSES if c != 'cat']
    assert f'left 19 class(es) without a positive training image: {", ".join(absent)};' in capsys.readouterr().out


def test_label_fraction_warns_of_classes_it_leaves_without_a_positive(voc, capsys):
    # The share is random, not stratified: a small one can leave a class with no positive image.
    args = ft.fill_defaults(ft.parse_args(['--task', 'cls', '--voc-root', voc, '--label-fraction', '0.25',
                                           '--label-seed', '3', '--batch-size', '2']), torch.device('cpu'))
    ft.voc_sets(args)
    out = capsys.readouterr().out
    # By hand, independently of voc_sets: the devkit's labels and the documented draw (the first
    # round(0.25 x 16) = 4 of default_rng(3)'s permutation of the trainval listing).
    paths, labels = data.voc_classification(voc, 'trainval')
    chosen = np.random.default_rng(3).permutation(len(paths))[:4]
    absent = [c for j, c in enumerate(data.VOC_CLASSES) if not (np.asarray(labels)[chosen, j] == 1).any()]
    assert absent  # 4 images cannot hold positives of all 20 classes here
    assert f'left {len(absent)} class(es) without a positive training image: {", ".join(absent)};' in out


def test_user_errors_are_one_line(tmp_path, voc, capsys):
    assert ft.main(['--voc-root', voc, '--out', str(tmp_path / 'x'), '--device', 'cpu']) == 2
    assert capsys.readouterr().err.strip().startswith('error: --init is required')
    assert ft.main(['--init', str(tmp_path / 'nope.pt'), '--voc-root', voc, '--device', 'cpu']) == 2
    err = capsys.readouterr().err.strip()
    assert 'no such file' in err and len(err.splitlines()) == 1
    # RQ1's ImageNet-supervised init is a file made elsewhere: the message says how, nothing is downloaded.
    assert 'torchvision.models.vgg16(weights="IMAGENET1K_V1").state_dict()' in err
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    assert ft.main(['--init', str(tmp_path / 'junk.pt'), '--voc-root', voc, '--device', 'cpu']) == 2
    assert 'could not be read' in capsys.readouterr().err
    # Segmentation samples its pixels without replacement: no more than a crop holds. (A tiny random trunk
    # here and below: each of these runs builds it before it refuses, a full-width VGG-16 about 0.8 s.)
    small = ['--width', '0.0625', '--fc-dim', '16']
    assert ft.main(['--task', 'seg', '--init', 'random', *small, '--crop', '8', '--points', '65', '--voc-root', voc,
                    '--device', 'cpu', '--out', str(tmp_path / 'p')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: --points 65: a 8 crop has only 64 pixels') and len(err.strip().splitlines()) == 1
    # A crop too small for VGG-16 (32 = 2 ** 5, its five 2x2 poolings) stopped at the first forward pass with
    # models.py's ValueError: refused before the devkit (missing here) is read, and before -a from --init.
    for task in ('cls', 'seg'):
        assert ft.main(['--task', task, '--init', 'random', '-a', 'vgg16', '--crop', '31', '--width', '0.0625',
                        '--fc-dim', '16', '--voc-root', str(tmp_path / 'novoc'), '--device', 'cpu', '--out', str(tmp_path / task)]) == 2
        err = capsys.readouterr().err
        assert err == ('error: --crop 31 is too small for -a vgg16: its trunk needs inputs of at least 32 pixels on '
                       'each side; use --crop 32 or more\n')
    # Refused in the run folder it made, having written nothing there but its .lock: the folder is removed.
    assert ft.main(['--init', 'random', *small, '--voc-root', str(tmp_path / 'novoc'), '--out', str(tmp_path / 'q')]) == 2
    assert 'novoc' in capsys.readouterr().err and not (tmp_path / 'q').exists()
    (tmp_path / 'mine').mkdir()  # a folder the user made stays
    assert ft.main(['--init', 'random', *small, '--voc-root', str(tmp_path / 'novoc'), '--out', str(tmp_path / 'mine')]) == 2
    assert 'novoc' in capsys.readouterr().err and (tmp_path / 'mine').is_dir()


def test_transfer_flags_out_of_range_and_resumes_of_the_wrong_file_are_one_line(tmp_path, capsys):
    # Each refused before the devkit is read (there is none here) or any folder is made.
    for flags, message in ((['--test-images', '-1'], '--test-images must be >= 0 (0 = all), got -1'),
                           (['--scale', '2', '1'], '--scale 2.0 1.0: need 0 < LO <= HI'),
                           (['--scale', '0', '1'], '--scale 0.0 1.0: need 0 < LO <= HI'),
                           (['--label-fraction', '0'], '--label-fraction must be in (0, 1], got 0.0'),
                           (['--label-fraction', '1.5'], '--label-fraction must be in (0, 1], got 1.5'),
                           (['--resume'], '--resume needs --out DIR (the run folder) or the checkpoint path: --resume CKPT'),
                           (['--resume', str(tmp_path / 'gone.pt')], f'--resume: {tmp_path / "gone.pt"} does not exist; '
                            'start the run without --resume (or pass --out of a run)')):
        assert ft.main(['--init', 'random', '--width', '0.0625', '--fc-dim', '16', '--voc-root', str(tmp_path / 'novoc'),
                        '--device', 'cpu', *flags]) == 2, flags
        assert capsys.readouterr().err == f'error: {message}\n', flags
    ft.fill_defaults(ft.parse_args(['--init', 'random', '--scale', '1', '1', '--label-fraction', '1', '--test-images', '0']),
                     torch.device('cpu'))  # the edges of each range are taken
    # A pre-training checkpoint is an --init, not a run to resume.
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet')
    assert ft.main(['--resume', str(tmp_path / 'c.pt'), '--voc-root', str(tmp_path / 'novoc'), '--device', 'cpu']) == 2
    assert capsys.readouterr().err == (f'error: --resume {tmp_path / "c.pt"} is not a finetune_voc.py checkpoint; '
                                       'pass it as --init instead\n')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['c.pt']


def _finished_cls_run(folder, init, args, map_11point, map_area=None):
    """A finished classification run's folder as --summarize reads it: results.json with `init`, `args` and the
    two mAPs (the area one: the 11-point one unless given)."""
    folder.mkdir()
    (folder / 'results.json').write_text(json.dumps(dict(init=init, args=args, metrics=dict(
        map_voc07_11point=map_11point, map_noninterpolated=map_11point if map_area is None else map_area))))
    return folder

def test_summarize_mean_and_std_over_seeds(tmp_path, capsys):
    def result(folder, init, seed, value, lr=0.001, step=None, dropout=0.5):
        return _finished_cls_run(
            folder, dict(kind='colorization' if init != 'random' else 'random', path=None if init == 'random' else init,
                         **({} if step is None else dict(step=step, digest=f'{step:016x}'))),
            dict(task='cls', arch='vgg16', input='lab', steps=10, label_fraction=None, freeze=False,
                 extended_fov=False, seed=seed, lr=lr, scale=[0.5, 2.0], dropout=dropout), value, value / 2)
    runs = [result(tmp_path / f'c{i}', 'c.pt', i, v) for i, v in enumerate((0.50, 0.60, 0.70))]
    runs += [result(tmp_path / f'r{i}', 'random', i, v) for i, v in enumerate((0.20, 0.30))]
    rows = ft.summarize(runs)
    by_init = {r['init']: r for r in rows}
    # by hand: 50, 60, 70 -> mean 60, sample std 10; 20, 30 -> 25, std 7.07
    assert by_init['c.pt']['runs'] == 3 and by_init['c.pt']['map_voc07_11point'] == pytest.approx((60.0, 10.0))
    assert by_init['random']['map_noninterpolated'] == pytest.approx((12.5, math.sqrt(12.5)))
    out = capsys.readouterr().out
    assert 'init=c.pt arch=vgg16 input=lab steps=10 | map_voc07_11point 60.0 +- 10.0 |' in out and '(n=3)' in out
    # A single run has no spread to print.
    ft.summarize([result(tmp_path / 'one', 'one.pt', 0, 0.40)])
    assert 'map_voc07_11point 40.0 | map_noninterpolated 20.0 (n=1)' in capsys.readouterr().out
    # Runs that differ in a flag other than the seed (here --lr) are not averaged together, and the
    # flag is named in their lines.
    rows = ft.summarize([*runs[:2], result(tmp_path / 'c-lr', 'c.pt', 2, 0.10, lr=0.01)])
    assert sorted(r['runs'] for r in rows) == [1, 2]
    out = capsys.readouterr().out
    assert 'lr=0.001 | map_voc07_11point 55.0 +- 7.1' in out and 'lr=0.01 | map_voc07_11point 10.0 |' in out
    # A run given twice, or a second run of the same seed and settings, is no independent sample.
    rows = ft.summarize([*runs[3:], runs[4], result(tmp_path / 'r1-again', 'random', 1, 0.90)])
    assert [r['runs'] for r in rows] == [2] and rows[0]['map_voc07_11point'] == pytest.approx((25.0, math.sqrt(50)))
    out = capsys.readouterr().out
    assert out.count('warning: --summarize leaves out') == 2 and 'r1-again' in out
    # One checkpoint file fine-tuned from at two steps of its pre-training: two inits, told apart.
    rows = ft.summarize([result(tmp_path / 's6', 'p.pt', 0, 0.3, step=6), result(tmp_path / 's8', 'p.pt', 1, 0.5, step=8)])
    assert sorted(r['init'] for r in rows) == ['p.pt (step 6)', 'p.pt (step 8)']
    capsys.readouterr()
    # A run from before paths were saved absolute (and digests recorded) is averaged with a newer one.
    old = result(tmp_path / 'old', 'p.pt', 2, 0.5, step=8)
    newer = json.loads((tmp_path / 's8' / 'results.json').read_text())
    newer['init']['path'] = os.path.abspath('p.pt')
    (tmp_path / 's8' / 'results.json').write_text(json.dumps(newer))
    assert [r['runs'] for r in ft.summarize([old, tmp_path / 's8'])] == [2]
    # A flag at 0 is a value to show (dropout=0.0), not an absent one; a run folder with a checkpoint
    # and no results.json (a run still going, or killed) is left out with a warning.
    (tmp_path / 'killed').mkdir()
    (tmp_path / 'killed' / 'checkpoint.pt').write_bytes(b'')
    rows = ft.summarize([result(tmp_path / 'd0', 'd.pt', 0, 0.3, dropout=0.0), result(tmp_path / 'd5', 'd.pt', 0, 0.3),
                         tmp_path / 'killed'])
    out = capsys.readouterr().out
    assert len(rows) == 2 and 'dropout=0.0 |' in out and 'dropout=0.5 |' in out
    assert 'leaves out 1 unfinished run(s)' in out and 'killed' in out
    with pytest.raises(ft.UserError, match='none of the runs named has finished'):
        ft.summarize([tmp_path / 'killed'])
    with pytest.raises(ft.UserError, match='does not exist'):  # a folder of runs, not a run
        ft.summarize([tmp_path])
    # The command line: the same table; a results.json of something else (or cut short) is one line.
    capsys.readouterr()
    assert ft.main(['--summarize', str(runs[3]), str(runs[4])]) == 0
    assert 'init=random arch=vgg16 input=lab steps=10 | map_voc07_11point 25.0 +- 7.1 |' in capsys.readouterr().out
    for text in ('{"metrics": {}}', '[1, 2]', '{"init": {"kind": "random"}, "args": {"ta'):
        (tmp_path / 'other').mkdir(exist_ok=True)
        (tmp_path / 'other' / 'results.json').write_text(text)
        assert ft.main(['--summarize', str(runs[3]), str(tmp_path / 'other')]) == 2, text
        assert capsys.readouterr().err == (f"error: --summarize: {tmp_path / 'other' / 'results.json'} is not a "
                                           'results.json written by finetune_voc.py\n'), text


def test_summarize_keeps_runs_resumed_with_another_schedule_apart(tmp_path, capsys):
    # A run trained 2 steps at lr 1e-3 and resumed to 4 at 1e-2 ends with the flags of a straight
    # 4-step 1e-2 run (args.resumptions as read_resume writes it); it trained otherwise. A resume that
    # changed only the test (or nothing) leaves a run with its group; one that changed the schedule of a
    # finished run (which trained nothing) keeps the change in its final flags, so it is kept apart too.
    # (test_crops is a flag of the group: 'retested' is one of the runs tested with 10; logging, saving and
    # the feature shift, measured after the metrics, are no flags of it: 'relogged' changed them mid-run.)
    def result(name, seed, value, resumptions=()):
        return _finished_cls_run(tmp_path / name, dict(kind='random', path=None), dict(
            task='cls', arch='alexnet', input='lab', steps=4, lr=0.01, seed=seed, test_crops=10,
            resumptions=list(resumptions)), value)
    lr_changed = dict(step=2, changed={'steps': [2, 4], 'lr': [0.001, 0.01]}, trained_by=None)
    late = result('late', 3, 0.9, [dict(step=4, changed={'lr': [0.1, 0.01]})])  # trained at 0.1
    rows = ft.summarize([result('straight', 0, 0.2), result('crashed', 1, 0.4, [dict(step=2, changed={})]),
                         result('retested', 2, 0.6, [dict(step=4, changed={'test_crops': [2, 10]})]),
                         result('relogged', 4, 0.4, [dict(step=2, changed={'log_every': [1, 2], 'save_every': [1, 3],
                                                                           'feature_shift': [False, True],
                                                                           'shift_images': [8, 16]})]),
                         result('lr-a', 0, 0.5, [lr_changed]), result('lr-b', 1, 0.7, [lr_changed]), late,
                         result('lr-early', 2, 0.1, [dict(lr_changed, step=1)])])  # the same change a step sooner
    assert sorted((r['runs'], r['map_voc07_11point'][0]) for r in rows) == [(1, pytest.approx(10.0)),
                                                                             (1, pytest.approx(90.0)),
                                                                             (2, pytest.approx(60.0)),
                                                                             (4, pytest.approx(40.0))]
    out = capsys.readouterr().out
    assert ('steps=4 (resumed with another schedule at step 2: lr 0.001->0.01, steps 2->4) | '
            'map_voc07_11point 60.0') in out


def test_results_record_the_pretraining_subset_of_the_init(tmp_path, folders, voc):
    # RQ3: a table over the pre-training subset N must be readable from the fine-tuning runs.
    train, val = folders
    for n in (8, 16):
        assert colorize.main(tiny_args(train, val, tmp_path / f'pre{n}', '--steps', '1', '--subset', str(n),
                                       '--seed', '3')) == 0
        assert ft.main(['--task', 'cls', '--init', str(tmp_path / f'pre{n}' / 'checkpoint.pt'), '--voc-root', voc,
                        '--steps', '1', '--batch-size', '2', '--crop', '32', '--test-images', '2', '--test-crops', '1',
                        '--workers', '0', '--device', 'cpu', '--out', str(tmp_path / f'ft{n}')]) == 0
        pre = json.loads((tmp_path / f'ft{n}' / 'results.json').read_text())['init']['pretraining']
        assert pre['subset'] == n and pre['images']['count'] == n  # of the folder's 24 images
        assert pre['seed'] == 3 and pre['data'] == [str(train)] and pre['classes'] is None  # as given
    a, b = (json.loads((tmp_path / f'ft{n}' / 'results.json').read_text())['init']['pretraining'] for n in (8, 16))
    assert a['images']['sha1'] != b['images']['sha1']


def test_summarize_keeps_other_weights_at_one_init_path_apart(tmp_path, capsys):
    # A pre-training folder redone (another --loss or --subset, the same step count): the fine-tuning
    # runs name one file and step, but their digests say they started from other weights.
    def result(name, digest, seed, value, loss):
        return _finished_cls_run(
            tmp_path / name, dict(kind='colorization', path='pre/checkpoint.pt', step=20, digest=digest,
                                  config=dict(arch='vgg16', loss=loss)),
            dict(task='cls', arch='vgg16', input='lab', steps=10, label_fraction=None, freeze=False,
                 extended_fov=False, seed=seed), value)
    runs = [result('hc0', 'a' * 16, 0, 0.30, 'huechroma'), result('hc2', 'a' * 16, 2, 0.50, 'huechroma'),
            result('l2-1', 'b' * 16, 1, 0.90, 'l2')]
    rows = ft.summarize(runs)
    # by hand: huechroma 30, 50 -> mean 40, std 14.14 (n=2); l2 alone 90 (n=1); never 56.7 over all three
    by_runs = sorted((r['runs'], r['map_voc07_11point'][0]) for r in rows)
    assert by_runs == [(1, pytest.approx(90.0)), (2, pytest.approx(40.0))]
    out = capsys.readouterr().out
    assert f'(weights {"a" * 16})' in out and f'(weights {"b" * 16})' in out
    # One set of weights (one digest) at that path stays one group, its line unchanged.
    rows = ft.summarize(runs[:2])
    out = capsys.readouterr().out
    assert [r['runs'] for r in rows] == [1 + 1] and '(weights' not in out
    # Its runs name one pre-training step (20) of that path: nothing to tell apart, so no '(step 20)' either.
    assert out.startswith(f'cls init={os.path.join("pre", "checkpoint.pt")} arch=vgg16 input=lab steps=10 | ')
    # A run from before digests (none recorded) beside one set of weights: one init, three seeds.
    rows = ft.summarize(runs[:2] + [result('old', None, 4, 0.40, 'huechroma')])
    assert [r['runs'] for r in rows] == [3] and rows[0]['map_voc07_11point'][0] == pytest.approx(40.0)


# ================================================================================================
# CUDA: the GPU recipe (bf16 autocast, channels_last, pinned non-blocking copies) against the CPU's
# float32. Skipped without a GPU; on one: python -m pytest -q test_all.py -k cuda
# ================================================================================================

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')


@needs_cuda
def test_cuda_lab_and_targets_match_cpu():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 32, 40, generator=g)
    reference = lab.rgb_to_lab(rgb)
    with torch.autocast('cuda', dtype=torch.bfloat16):
        on_gpu = lab.rgb_to_lab(rgb.cuda())
        back = lab.lab_to_rgb(on_gpu)
    assert on_gpu.dtype == back.dtype == torch.float32
    close(on_gpu.cpu(), reference, 1e-4)
    close(back.cpu(), lab.lab_to_rgb(reference), 1e-4)
    points = sample_points(2, 32, 40, 16, 4, generator=torch.Generator('cuda').manual_seed(1))
    assert points.device.type == 'cuda' and 4 <= points.min() and points[..., 0].max() < 28
    for kind in ('huechroma', 'l2', 'ab'):
        want = lab.make_targets(kind, reference, points.cpu())
        with torch.autocast('cuda', dtype=torch.bfloat16):
            got = lab.make_targets(kind, on_gpu, points)
        for name, value in want.items():
            diff = (got[name].cpu() - value).abs()
            # A window pixel exactly on a bin edge may fall the other way: one pixel of 49 moves.
            assert got[name].dtype == torch.float32 and diff.mean() < 1e-3 and diff.max() <= 2 / 49 + 1e-6, (kind, name)


@needs_cuda
@pytest.mark.parametrize('arch', ['vgg16', 'alexnet', 'resnet152'])
def test_cuda_bf16_channels_last_matches_cpu_float32(arch):
    torch.manual_seed(0)
    model = tiny(arch).eval()
    x = torch.randn(2, 1, 64, 80)
    points = random_pixels(2, 64, 80, 12, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, want_dense = model(x, points), model.dense(x)
        gpu = model.cuda().to(memory_format=torch.channels_last)
        xg = x.cuda().contiguous(memory_format=torch.channels_last)
        with torch.autocast('cuda', dtype=torch.bfloat16):
            got, got_dense = gpu(xg, points.cuda()), gpu.dense(xg)
    for a, b in ((got, want), (got_dense, want_dense)):
        assert a.shape == b.shape
        err = (a.float().cpu() - b).abs().max()
        assert err <= 0.03 * b.abs().max(), (arch, err)  # bf16: ~1%


@needs_cuda
def test_cuda_training_then_colorizing_agrees_with_cpu(folders, tmp_path):
    """A few training steps on the GPU (pinned batches, bf16, the loader's non-blocking copies), a
    float32 checkpoint, then the same photo colorized on the GPU and on the CPU."""
    train, val = folders
    out = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--eval-every', '4', '--device', 'cuda',
                                   '--no-compile')) == 0
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert all(math.isfinite(e['loss']) for e in log) and log[-1]['step'] == 4
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)  # no map_location: CPU tensors in the file
    tensors = [*ckpt['model'].values(), *[v for s in ckpt['optimizer']['state'].values() for v in s.values()]]
    assert {v.device.type for v in tensors} == {'cpu'}
    assert {v.dtype for v in ckpt['model'].values() if v.is_floating_point()} == {torch.float32}
    photo = next(p for p in sorted(val.iterdir()) if p.suffix == '.jpg')
    results = {}
    for device in ('cuda', 'cpu'):
        assert colorize.main(['--colorize', str(photo), '--checkpoint', str(out / 'checkpoint.pt'),
                              '--output', str(tmp_path / device), '--device', device]) == 0
        results[device] = np.asarray(Image.open(tmp_path / device / (photo.stem + '.png')), dtype=float)
    assert np.abs(results['cuda'] - results['cpu']).mean() < 2  # bf16 network, float32 colour maths


@needs_cuda
def test_cuda_torchrun_one_process_runs_nccl_ddp_compiled(folders, tmp_path):
    """torchrun with one process: NCCL, the DDP-wrapped model compiled and its gradient all-reduce
    (a machine with one GPU can run no more: NCCL refuses two ranks on one device); then --resume."""
    train, val = folders
    out = tmp_path / 'ddp'
    for steps, more in (('4', ('--keep-every', '3')), ('6', ('--resume',))):
        result = _torchrun(1, tiny_args(train, val, out, '--steps', steps, '--device', 'cuda', '--compile', *more),
                           tmp_path / 'logs')
        assert result.returncode == 0, result.stderr[-2000:]
        assert 'world 1 (nccl DDP)' in result.stdout and f'step {steps}/{steps}' in result.stdout
        assert colorize.COMPILE_NOTE in result.stdout
    ckpt = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert ckpt['step'] == 6 and not any(k.startswith('module.') or '_orig_mod' in k for k in ckpt['model'])
    # --keep-every 3, taken from the checkpoint on --resume: the saves of steps 3 and 6 kept, under NCCL.
    assert sorted(p.name for p in out.glob('checkpoint-step*.pt')) == ['checkpoint-step0000003.pt',
                                                                        'checkpoint-step0000006.pt']
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    assert all(math.isfinite(e['loss']) for e in log if 'loss' in e)


@needs_cuda
@pytest.mark.parametrize('task', ['cls', 'seg'])
def test_cuda_transfer_compiled_runs_and_keeps_float32_weights(tmp_path, voc, task):
    """Fine-tuning with the GPU defaults (compiled, bf16); .ci/gpu's transfer stage runs it eagerly."""
    _transfer_gives_finite_metrics_and_float32_weights(tmp_path, voc, task, '--device', 'cuda', '--compile')

# ================================================================================================
# Augmentation, sampling, evaluation and bookkeeping details (each pinned after a hand-made bug
# in it went unnoticed): references are hand values, the documented formulas, or identities
# ================================================================================================

def rng(s):
    return np.random.default_rng(s)


# ---------------------------------------------------------------- data.py augmentation

def test_random_crop_short_side_range_includes_hi():
    """U[lo, hi] inclusive: with (8, 9) and an 8x8 image, short side 8 returns the image itself,
    9 resamples it; both must occur, about half the time each."""
    img = rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    same = sum(np.array_equal(data.random_crop(img, 8, (8, 9), False, rng(s)), img) for s in range(200))
    assert 60 < same < 140


def test_random_crop_reaches_every_offset():
    """A crop x crop window at any of the (room + 1)^2 offsets: a 10x12 image whose pixels encode
    their (y, x), short side kept (10), crop 8 -> y offsets 0..2, x offsets 0..4, all 15, ~uniform."""
    img = np.zeros((10, 12, 3), np.uint8)
    img[..., 0] = np.arange(10)[:, None] * 20
    img[..., 1] = np.arange(12)[None, :] * 20
    offsets = Counter()
    for s in range(600):
        out = data.random_crop(img, 8, (10, 10), False, rng(s))
        offsets[(out[0, 0, 0] // 20, out[0, 0, 1] // 20)] += 1
    assert set(offsets) == {(y, x) for y in range(3) for x in range(5)}
    assert min(offsets.values()) > 15  # 40 expected each


def test_random_crop_flips_half_the_time():
    """p = 0.5 (docstring, paper): 2000 seeds, binomial sd 22 -> 1000 +- 100 is 4.5 sd."""
    ramp = np.tile(np.arange(32, dtype=np.uint8)[None, :, None] * 8, (32, 1, 3))
    flips = sum(int(data.random_crop(ramp, 32, (32, 32), True, rng(s))[0, 0, 0]) == 248 for s in range(2000))
    assert 900 < flips < 1100


# ---------------------------------------------------------------- InfiniteSampler

def test_infinite_sampler_reads_the_documented_positions():
    """Docstring: epoch e = torch.randperm(n) seeded seed * 1000003 + e; step k of the epoch reads
    positions [k W B, (k + 1) W B), rank r the r-th block of B. So the ranks' batches, concatenated
    in rank order, are exactly the one-rank batch of W * B."""
    n, b, world, seed = 103, 5, 3, 7
    spe = (n // world) // b
    ranks = [data.InfiniteSampler(n, b, rank=r, world_size=world, seed=seed) for r in range(world)]
    one = data.InfiniteSampler(n, world * b, seed=seed)
    for step in range(2 * spe + 2):
        epoch, k = divmod(step, spe)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
        joined = [pair for r in ranks for pair in r.batch(step)]
        assert [i for i, _ in joined] == perm[k * world * b:(k + 1) * world * b]
        assert joined == one.batch(step)
    # A seed of time.time_ns() (over 2^64 once multiplied) raised 'Overflow when unpacking long long': mod 2^64.
    big = 1_700_000_000_123_456_789
    perm = torch.randperm(n, generator=torch.Generator().manual_seed((big * 1000003 + 1) % 2 ** 64)).tolist()
    assert [i for i, _ in data.InfiniteSampler(n, b, seed=big).batch(n // b)] == perm[:b]  # epoch 1, step 0


# ---------------------------------------------------------------- find_images cache

def test_find_images_does_not_cache_a_folder_changed_just_now(tmp_path):
    root = tmp_path / 'imgs'
    _write_rgb(root / 'a.jpg', np.zeros((4, 4, 3), np.uint8))  # the folder's mtime is now
    lines = []
    data.find_images(root, cache_dir=tmp_path / 'cache', log=lines.append)
    assert not (tmp_path / 'cache').exists() or os.listdir(tmp_path / 'cache') == []
    assert any('changed less than 2 s ago' in s for s in lines)


# ---------------------------------------------------------------- VOC lists

def test_voc_lists_with_odd_lines_are_refused_in_one_line_naming_the_line(tmp_path):
    # An empty test split made a traceback after training ('need at least one array to stack'); a segmentation
    # line of three fields was dropped without a word; an image listed twice counted twice (in a test split,
    # in the figures); a byte-order mark made the first id another ('\ufeff2012_000001'); a list that is not
    # UTF-8 gave the codec's words without the file's name.
    main = tmp_path / 'VOC2007' / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    def cls_lists(text, encoding='utf-8'):
        for c in data.VOC_CLASSES:
            (main / f'{c}_test.txt').write_text(text, encoding=encoding)
    cls_lists('')
    with pytest.raises(ValueError, match=r'aeroplane_test\.txt lists no images'):
        data.voc_classification(tmp_path / 'VOC2007', 'test')
    cls_lists('000001 1\n000002 2\n')  # a label that is not VOC's 1, -1 or 0 (difficult)
    with pytest.raises(ValueError, match=r'aeroplane_test\.txt:2: expected "<image id> <1\|-1\|0>", found .000002 2.$'):
        data.voc_classification(tmp_path / 'VOC2007', 'test')
    cls_lists('000001 1\n000002 -1\n000001 0\n')
    with pytest.raises(ValueError, match=r'aeroplane_test\.txt:3: 000001 is listed again \(first on line 1\)'):
        data.voc_classification(tmp_path / 'VOC2007', 'test')
    cls_lists('000001 1\n000002 -1\n', encoding='utf-8-sig')
    paths, labels = data.voc_classification(tmp_path / 'VOC2007', 'test')
    assert [os.path.basename(p) for p in paths] == ['000001.jpg', '000002.jpg'] and labels[:, 0].tolist() == [1, -1]
    (main / 'cow_test.txt').write_bytes(b'00000\xe9 1\n')
    with pytest.raises(ValueError, match=r'cow_test\.txt is not a text list of image ids \(.utf-8. codec'):
        data.voc_classification(tmp_path / 'VOC2007', 'test')
    v12 = tmp_path / 'VOC2012'
    seg = v12 / 'ImageSets' / 'Segmentation'
    seg.mkdir(parents=True)
    for i in ('a', 'b'):
        _write_rgb(v12 / 'JPEGImages' / f'{i}.jpg', fmt='JPEG')
        _write_rgb(v12 / 'SegmentationClass' / f'{i}.png', np.zeros((6, 8), np.uint8), fmt='PNG')
    (seg / 'train.txt').write_text('a\nb x y\n')
    with pytest.raises(ValueError, match=r'train\.txt:2: expected an image id or "/JPEGImages/<id>\.jpg '
                                         r'/SegmentationClass/<id>\.png", found .b x y.'):
        data.voc_segmentation(v12, 'train')
    (seg / 'train.txt').write_text('a\n/JPEGImages/a.jpg /SegmentationClass/a.png\n')
    with pytest.raises(ValueError, match=r'train\.txt:2: \S+a\.jpg is listed again \(first on line 1\)'):
        data.voc_segmentation(v12, 'train')
    (seg / 'train.txt').write_text('a\nb\n', encoding='utf-8-sig')
    assert [os.path.basename(p) for p, _ in data.voc_segmentation(v12, 'train')] == ['a.jpg', 'b.jpg']
    # A list of no ids, ids whose files are not there, a split with no list.
    (seg / 'val.txt').write_text('\n')
    with pytest.raises(ValueError, match=r'val\.txt lists no images$'):
        data.voc_segmentation(v12, 'val')
    (seg / 'val.txt').write_text('a\nc\nd\n')
    with pytest.raises(FileNotFoundError, match=re.escape(f"4 files listed in {seg / 'val.txt'} are missing, e.g. "
                                                          f"{v12 / 'JPEGImages' / 'c.jpg'}; the images go in JPEGImages/")):
        data.voc_segmentation(v12, 'val')
    with pytest.raises(FileNotFoundError, match=re.escape(f"{seg / 'trainval.txt'} not found: expected the VOC2012 "
                                                          'devkit layout <root>/ImageSets/Segmentation/trainval.txt')):
        data.voc_segmentation(v12, 'trainval')


def test_voc_classification_refuses_class_files_listing_other_images(tmp_path):
    main = tmp_path / 'VOC2007' / 'ImageSets' / 'Main'
    main.mkdir(parents=True)
    for cls in data.VOC_CLASSES:
        ids = ['000005', '000007', '000010' if cls == 'dog' else '000009']  # same count, other image
        (main / f'{cls}_trainval.txt').write_text(''.join(f'{i} -1\n' for i in ids))
    with pytest.raises(ValueError, match='different images'):
        data.voc_classification(tmp_path / 'VOC2007', 'trainval')


def _extract_as_advised(message, members):
    """Follow a VOC error's extraction advice with a tar of `members` ({name in the tar: text}): either
    'extract TAR in DIR' or 'tar -xf TAR -C DIR --strip-components=2'."""
    strip = re.search(r"tar -xf \S+ -C (\S+) --strip-components=2", message)
    where = strip.group(1) if strip else re.search(r"extract \S+ in (\S+) \(", message).group(1)
    for name, text in members.items():
        parts = name.split('/')[2 if strip else 0:]
        target = Path(where, *parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


@pytest.mark.parametrize('form', ['above', 'VOCdevkit', 'VOCdevkit/VOC2007', 'renamed', 'empty', 'empty VOCdevkit'])
def test_voc_missing_split_advice_fills_the_folder_given(tmp_path, form):
    """The advice of a missing split's error, followed literally, makes the same --voc-root work,
    whatever the form of the root (a devkit folder moved out of VOCdevkit/ and renamed included)."""
    devkit = {'above': 'VOCdevkit/VOC2007', 'VOCdevkit': 'VOCdevkit/VOC2007', 'VOCdevkit/VOC2007': 'VOCdevkit/VOC2007',
              'renamed': 'voc07', 'empty': None, 'empty VOCdevkit': None}[form]
    root = tmp_path / {'above': '.', 'renamed': 'voc07', 'empty': 'voc', 'empty VOCdevkit': 'VOCdevkit'}.get(form, form)
    root.mkdir(parents=True, exist_ok=True)
    if devkit:  # the trainval tar is there, the test tar is not
        main = tmp_path / devkit / 'ImageSets' / 'Main'
        main.mkdir(parents=True)
        for cls in data.VOC_CLASSES:
            (main / f'{cls}_trainval.txt').write_text('000005 -1\n')
    with pytest.raises(FileNotFoundError) as e:
        data.voc_classification(root, 'test')
    _extract_as_advised(str(e.value), {f'VOCdevkit/VOC2007/ImageSets/Main/{cls}_test.txt': '000001 1\n'
                                       for cls in data.VOC_CLASSES})
    paths, labels = data.voc_classification(root, 'test')
    assert [os.path.basename(p) for p in paths] == ['000001.jpg'] and labels.shape == (1, 20)
    assert not (tmp_path / 'VOCdevkit' / 'VOCdevkit').exists()  # (extracted in the VOCdevkit given, it works, nested)


# ---------------------------------------------------------------- demo world

def test_demo_val_images_are_not_training_images(tmp_path):
    world = data.make_demo_world(tmp_path, n_train=6, n_val=6)

    def contents(folder):
        return {Path(p).read_bytes() for p in data.find_images(folder, log=lambda s: None)}
    assert not contents(world['train']) & contents(world['val'])


# ---------------------------------------------------------------- finetune augmentation

def _coords(h, w):
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(h)[:, None] * 4
    img[..., 1] = np.arange(w)[None, :] * 4
    return img


def test_scale_crop_flips_image_and_label_together_half_the_time():
    img = _coords(16, 16)
    label = np.tile(np.arange(16, dtype=np.uint8)[None, :], (16, 1))
    flips = 0
    for s in range(1000):
        out, lab_out = ft.random_scale_crop(img, label, 16, (1, 1), rng(s))
        flipped = out[0, 0, 1] == 60
        flips += flipped
        assert (lab_out[0] == (np.arange(15, -1, -1) if flipped else np.arange(16))).all()
    assert 420 < flips < 580  # binomial sd 16


def test_scale_crop_flip_is_numpys_mirror_of_the_unflipped_crop():
    # Same draws with flip=False: the same window unflipped; numpy mirrors image and label exactly.
    img, label = _smooth_rgb(30, 41, seed=4), np.random.default_rng(4).integers(0, 21, (30, 41)).astype(np.uint8)
    for seed in range(16):
        got, got_label = ft.random_scale_crop(img, label, 24, (0.5, 1.5), rng(seed))
        plain, plain_label = ft.random_scale_crop(img, label, 24, (0.5, 1.5), rng(seed), flip=False)
        draws = rng(seed)
        draws.uniform(0.5, 1.5)  # the scale, then (top, left, flip)
        if draws.random(3)[2] < 0.5:
            plain, plain_label = plain[:, ::-1], plain_label[:, ::-1]
        assert np.array_equal(got, plain) and np.array_equal(got_label, plain_label) and got.flags.c_contiguous


def test_scale_crop_is_pillows_whole_resize_then_crop():
    # Only the window is resampled (data.resized_window); against Pillow resizing the whole image by s, then
    # cropping where the draws say: within 2 levels on noise (a window off by a fraction of a pixel is tens
    # of levels off), scaled up and down, larger and smaller than the crop (mid-grey padding around it),
    # one side kept (9 x 101 at s in [0.95, 1.05]: 9 rows, 96-106 columns; and transposed), one side
    # scaled to a single pixel (3 x 41 at s in [0.2, 0.3]).
    cases = [((30, 41), (0.5, 2.0), range(40)), ((9, 101), (0.95, 1.05), range(6)),
             ((101, 9), (0.95, 1.05), range(6)), ((3, 41), (0.2, 0.3), range(4))]
    for (H, W), scale, seeds in cases:
        img = np.random.default_rng(5).integers(0, 256, (H, W, 3), dtype=np.uint8)
        for seed in seeds:
            got, _ = ft.random_scale_crop(img, None, 24, scale, rng(seed), flip=False)
            draws = rng(seed)
            s, (u_y, u_x, _) = draws.uniform(*scale), draws.random(3)
            h, w = round(H * s), round(W * s)
            whole = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR)).astype(int)
            want = np.full((24, 24, 3), lab.GRAY_SRGB8, int)
            y = int(u_y * (h - 24 + 1)) if h >= 24 else 0  # the source offset, or the destination's when smaller
            x = int(u_x * (w - 24 + 1)) if w >= 24 else 0
            dy = 0 if h >= 24 else int(u_y * (24 - h + 1))
            dx = 0 if w >= 24 else int(u_x * (24 - w + 1))
            part = whole[y:y + 24, x:x + 24]
            want[dy:dy + part.shape[0], dx:dx + part.shape[1]] = part
            assert np.abs(got.astype(int) - want).max() <= 2, (seed, s)


def test_padding_centres_with_the_odd_pixel_below_and_right():
    # A 5 x 3 image padded to 8: rows 1..5 (1 above, 2 below) and columns 2..4 (2 left, 3 right).
    out = data._pad_to(np.full((5, 3, 3), 9, np.uint8), 8)
    rows, cols = np.nonzero(out[..., 0])
    assert out.shape == (8, 8, 3) and (rows.min(), rows.max(), cols.min(), cols.max()) == (1, 5, 2, 4)


def test_scale_crop_keeps_label_values_when_scaling():
    # Class indices are resampled by nearest neighbour: scaled by 1.5 or 0.7, a mask of 0, 7 and 255
    # (void) holds only those values (a blend would invent classes between them), and all three.
    label = np.random.default_rng(0).choice(np.array([0, 7, 255], np.uint8), (20, 20))
    for s, scale in enumerate([(1.5, 1.5), (0.7, 0.7)]):
        _, out = ft.random_scale_crop(_coords(20, 20), label, 12, scale, rng(s))
        assert set(np.unique(out)) == {0, 7, 255}


def test_scale_crop_scales_the_image_by_a_factor_drawn_from_the_range():
    # An 8 x 8 image in a 32 crop, scaled by s ~ U[0.5, 2] (the protocol's range), lands as a square
    # of round(8 s) labelled pixels a side in the padding (255): the first draw is s. Over 400 seeds
    # the sides reach both ends, 4 and 16 (each about 1 draw in 24).
    sides = []
    for s in range(400):
        want = round(8 * rng(s).uniform(0.5, 2.0))
        _, lab_out = ft.random_scale_crop(_coords(8, 8), np.zeros((8, 8), np.uint8), 32, (0.5, 2.0), rng(s))
        rows, cols = np.nonzero(lab_out != ft.IGNORE)
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1, len(rows)) == (want, want, want * want), s
        sides.append(want)
    assert min(sides) == 4 and max(sides) == 16


def test_scale_crop_reaches_every_offset():
    """Larger than the crop: source offsets 0..room; smaller: destination offsets 0..crop - size."""
    big, small = _coords(20, 20), _coords(5, 5)
    src, dst = set(), set()
    for s in range(400):
        out, _ = ft.random_scale_crop(big, None, 16, (1, 1), rng(s), flip=False)
        src.add(int(out[0, 0, 0]) // 4)
        out, lab_out = ft.random_scale_crop(small, np.zeros((5, 5), np.uint8), 16, (1, 1), rng(s), flip=False)
        dst.add(int(np.argwhere(lab_out != ft.IGNORE)[0, 0]))
    assert src == set(range(5)) and dst == set(range(12))


# ---------------------------------------------------------------- cls test-time crops

class _Scripted(torch.nn.Module):
    """Returns the next rows of a fixed (N, 20) logit table at each call, whatever the input."""

    def __init__(self, table):
        super().__init__()
        self.table, self.at = table, 0

    def forward(self, x):
        out = self.table[self.at:self.at + len(x)]
        self.at += len(x)
        return out


def test_classification_averages_logits_over_test_crops():
    """Image A (positive for classes 0 and 1), image B (negative), 2 crops each. Class 0: A (10, -2),
    B (1, 1): mean logits A 4 > B 1 (AP 1); mean probabilities A 0.56 < B 0.73 (AP 0.5). Class 1:
    A (-2, 10): mean logits still rank A first; the first crop alone ranks B first (AP 0.5)."""
    table = torch.full((4, 20), -5.0)
    table[:, 0] = torch.tensor([10.0, -2.0, 1.0, 1.0])  # A crop 1, A crop 2, B crop 1, B crop 2
    table[:, 1] = torch.tensor([-2.0, 10.0, 1.0, 1.0])
    # Class 2: A (10, -9) has the higher max but the lower mean (0.5 against B's 1): B first (AP 0.5).
    table[:, 2] = torch.tensor([10.0, -9.0, 1.0, 1.0])
    labels = torch.full((2, 20), -1, dtype=torch.int8)
    labels[0, :3] = 1
    test_set = [(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels[0]), (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels[1])]
    args = argparse.Namespace(batch_size=2, workers=0, input='gray', test_split='test', test_crops=2)
    r = ft.evaluate_classification(_Scripted(table), test_set, args, torch.device('cpu'))
    assert r['ap_noninterpolated']['aeroplane'] == 1.0 and r['ap_noninterpolated']['bicycle'] == 1.0
    assert r['ap_noninterpolated']['bird'] == 0.5


# ---------------------------------------------------------------- defaults

def test_segmentation_protocol_crop_and_batch_on_a_gpu():
    """README / the authors' recipe: 128 points per 448 crop, batch 10 (device type only is read)."""
    args = ft.fill_defaults(ft.parse_args(['--task', 'seg', '--voc-root', 'x']), torch.device('cuda'))
    assert (args.crop, args.batch_size, args.points) == (448, 10, 128)


# ---------------------------------------------------------------- --freeze

def test_freeze_switches_off_dropout_in_the_frozen_trunk():
    torch.manual_seed(0)
    model = ft.build_transfer_model('cls', 'alexnet', **TINY)
    ft.freeze_pretrained(model)
    ft.set_train_mode(model, True)
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        a, b = model.trunk(x)[-1], model.trunk(x)[-1]  # fc7: after fc6/fc7 dropout
    assert torch.equal(a, b) and model.classifier.training


# ---------------------------------------------------------------- transfer key check

def test_a_trunk_that_provides_a_new_layer_is_refused():
    torch.manual_seed(0)
    state = MODELS['vgg16'](in_channels=1, batchnorm=False, extended_fov=True, **TINY).state_dict()
    assert any(k.startswith('fov1.') for k in state)
    with pytest.raises(colorize.UserError, match='unexpectedly provides'):
        ft.make_finetune_model('seg', 'vgg16', state, 'ckpt', extended_fov=True, head_dim=8, **TINY)


# ---------------------------------------------------------------- --resume flags, results.json

RESUME_BASE = ['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', '--input', 'gray',
        '--test-crops', '1', '--steps', '2', '--batch-size', '4', '--crop', '32', '--workers', '0', '--device', 'cpu']


def test_a_mask_that_does_not_match_its_image_stops_the_run_before_training(tmp_path, voc, capsys):
    root = tmp_path / 'VOCdevkit'
    shutil.copytree(voc, root)
    name = (root / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()[-1]
    mask = root / 'VOC2012' / 'SegmentationClass' / f'{name}.png'
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(mask)
    out = tmp_path / 'seg'
    assert ft.main(['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', str(root), '--steps', '2', '--batch-size', '2', '--crop', '32', '--workers', '0',
                    '--device', 'cpu', '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'{name}.png is 9x7 but' in err and 'labels must match their images' in err
    assert not (out / 'checkpoint.pt').exists()
    mask.write_bytes(b'not a png')
    assert ft.main(['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
                    '--voc-root', str(root), '--steps', '2', '--batch-size', '2', '--crop', '32', '--workers', '0',
                    '--device', 'cpu', '--out', str(out)]) == 2
    assert 'cannot read VOC image or mask' in capsys.readouterr().err and not (out / 'checkpoint.pt').exists()
    # A mask replaced after that check (mid-training, say) is found where it is read, as (width x height) each.
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / 'a.jpg')
    Image.fromarray(np.zeros((24, 36), np.uint8)).save(tmp_path / 'a.png')
    for train in (True, False):
        dataset = ft.VOCSegmentation([(tmp_path / 'a.jpg', tmp_path / 'a.png')], 32, (1, 1), train=train)
        with pytest.raises(ft.UserError, match=re.escape(f'{tmp_path / "a.png"} is 36x24 but {tmp_path / "a.jpg"} is '
                                                         f'40x30; labels must match their images')):
            dataset[(0, 0) if train else 0]


def test_resume_after_the_init_file_changed(tmp_path, voc, capsys, monkeypatch):
    """colorize.py rewrites its checkpoint as pre-training goes on: a resumed fine-tuning run names
    the init it started from, and one that needs the initial weights after training refuses."""
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet')
    base = ['--init', str(tmp_path / 'c.pt'), '--voc-root', voc, '--test-crops', '1', '--steps', '3',
            '--batch-size', '2', '--crop', '32', '--workers', '0', '--device', 'cpu']
    resume = ['--resume', '--workers', '0', '--device', 'cpu']
    assert ft.main([*base, '--out', str(tmp_path / 'plain'), '--exit-after', '1']) == 0
    assert ft.main([*base, '--out', str(tmp_path / 'shift'), '--exit-after', '1', '--feature-shift',
                    '--shift-images', '2']) == 0
    started = _state(tmp_path / 'plain' / 'checkpoint.pt')['init']
    capsys.readouterr()
    assert ft.main(['--out', str(tmp_path / 'plain'), *resume, '--exit-after', '2']) == 0  # unchanged: no note
    assert 'no longer holds' not in capsys.readouterr().out
    colorize_checkpoint(tmp_path / 'c.pt', 'alexnet', seed=1)  # the pre-training went on
    assert ft.main(['--out', str(tmp_path / 'shift'), *resume]) == 2
    err = capsys.readouterr().err
    assert 'no longer holds the weights this run started from' in err and '--feature-shift compares' in err
    assert ft.main(['--out', str(tmp_path / 'shift'), *resume, '--no-feature-shift']) == 0
    assert 'feature_shift' not in read_results(tmp_path / 'shift')
    assert ft.main(['--out', str(tmp_path / 'plain'), *resume]) == 0
    assert 'no longer holds the weights this run started from' in capsys.readouterr().out
    assert read_results(tmp_path / 'plain')['init'] == started and len(started['digest']) == 16
    # --init random rebuilds the initial weights on resume: where the code now builds others (a change
    # of the init between the start and the resume), --freeze's check after training would call it a bug.
    rand = ['--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16', *base[2:]]
    assert ft.main([*rand, '--out', str(tmp_path / 'probe'), '--exit-after', '1', '--freeze']) == 0
    assert ft.main(['--out', str(tmp_path / 'probe'), *resume, '--exit-after', '2']) == 0  # the same code: on
    built = ft.random_trunk
    monkeypatch.setattr(ft, 'random_trunk', lambda *a: {k: v + 1 for k, v in built(*a).items()})
    capsys.readouterr()
    assert ft.main(['--out', str(tmp_path / 'probe'), *resume]) == 2
    err = capsys.readouterr().err
    assert 'error: --init random builds other weights than this run started from' in err and '--freeze' in err


@pytest.mark.skipif(shutil.which('git') is None, reason='needs git')
def test_git_commit_says_when_the_code_had_uncommitted_changes(tmp_path, monkeypatch):
    def git(*command):
        subprocess.run(['git', '-c', 'user.name=t', '-c', 'user.email=t@t', *command], cwd=tmp_path, check=True,
                       capture_output=True)
    git('init', '-q')
    (tmp_path / 'a.py').write_text('x = 1\n')
    git('add', 'a.py')
    git('commit', '-qm', 'one')
    head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    monkeypatch.setattr(colorize, 'HERE', tmp_path)
    (tmp_path / 'runs').mkdir()
    (tmp_path / 'runs' / 'new.txt').write_text('untracked files are not the code\n')
    assert colorize.git_commit() == head and len(head) == 40
    (tmp_path / 'a.py').write_text('x = 2\n')
    assert colorize.git_commit() == head + '-dirty'
    monkeypatch.setattr(colorize, 'HERE', tmp_path / 'runs')  # still inside the repository
    assert colorize.git_commit() == head + '-dirty'


def test_git_commit_is_none_without_git_or_when_git_hangs(tmp_path, monkeypatch):
    # A machine without git (a container): the run records no commit (null in run.json), not an error.
    monkeypatch.setenv('PATH', str(tmp_path))  # no git on it
    assert shutil.which('git') is None and colorize.git_commit() is None
    monkeypatch.undo()
    def hangs(*args, **kwargs):  # a git waiting on a lock of a network file system, past the timeout
        raise subprocess.TimeoutExpired(args[0], kwargs.get('timeout'))
    monkeypatch.setattr(subprocess, 'run', hangs)
    assert colorize.git_commit() is None


def test_resumed_init_of_a_checkpoint_from_before_digests(capsys):
    """Older checkpoints recorded the init's path as typed and its step, no digest: the step decides."""
    args = argparse.Namespace(init='/r/c.pt', freeze=False, feature_shift=False)
    now = dict(kind='colorization', path='/r/c.pt', step=8, digest='ab' * 8)
    assert ft.resumed_init(dict(kind='colorization', path='c.pt', step=8), now, args) == now
    assert 'no longer holds' not in capsys.readouterr().out
    assert ft.resumed_init(dict(kind='colorization', path='c.pt', step=6), now, args) == dict(
        kind='colorization', path='/r/c.pt', step=6)
    assert '(pre-training step 6 then, 8 now)' in capsys.readouterr().out
    with pytest.raises(ft.UserError, match='--freeze checks'):
        ft.resumed_init(dict(kind='colorization', path='c.pt', step=6), now, argparse.Namespace(
            init='/r/c.pt', freeze=True, feature_shift=False))


def test_weights_digest_sees_names_shapes_and_values():
    state = {'a': torch.arange(6.0).view(2, 3), 'b': torch.zeros(2, dtype=torch.bfloat16)}
    digest = ft.weights_digest(state)
    assert digest == ft.weights_digest({k: v.clone() for k, v in reversed(state.items())})  # order-free
    other = {'a': state['a'].clone(), 'b': state['b'].clone()}
    other['a'][1, 2] = 5.000001
    assert ft.weights_digest(other) != digest
    assert ft.weights_digest({'a': state['a'].view(3, 2), 'b': state['b']}) != digest
    assert ft.weights_digest({'A': state['a'], 'b': state['b']}) != digest


def test_resume_keeps_a_non_default_seed_and_refuses_another_scale(tmp_path, voc):
    a, b = tmp_path / 'a', tmp_path / 'b'
    assert ft.main([*RESUME_BASE, '--voc-root', voc, '--seed', '3', '--out', str(a)]) == 0
    assert ft.main([*RESUME_BASE, '--voc-root', voc, '--seed', '3', '--out', str(b), '--exit-after', '1']) == 0
    resume = ['--out', str(b), '--resume', '--workers', '0', '--device', 'cpu']
    assert ft.main([*resume, '--scale', '1', '1.5']) == 2  # changes the data: a run flag
    assert ft.main(resume) == 0
    ra, rb = (json.loads((d / 'results.json').read_text()) for d in (a, b))
    assert rb['args']['seed'] == 3 and ra['metrics'] == rb['metrics']
    # results.json: the voc fixture has 16 trainval and 8 test images
    assert (ra['train_images'], ra['test_images']) == (16, 8)


# ---------------------------------------------------------------- --summarize

def test_summarize_keeps_other_test_crops_apart(tmp_path):
    def result(name, seed, crops, value):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'results.json').write_text(json.dumps(dict(
            init=dict(kind='random'), args=dict(task='cls', arch='vgg16', seed=seed, test_crops=crops),
            metrics=dict(map_voc07_11point=value, map_noninterpolated=value))))
        return tmp_path / name
    rows = ft.summarize([result('a', 0, 10, 0.5), result('b', 1, 10, 0.6), result('c', 2, 1, 0.1)])
    assert sorted(r['runs'] for r in rows) == [1, 2]


def test_summarize_groups_resnet_runs_whatever_their_fc_dim(tmp_path, capsys):
    # --init random -a resnet50 with and without --fc-dim (which it warns changes nothing) records fc_dim 16
    # and the CPU default 1024: the same network, so one group of two seeds, not two groups of one. For
    # VGG-16 the width of fc6/fc7 is the network's: two groups.
    def result(name, arch, seed, fc_dim):
        return _finished_cls_run(tmp_path / name, dict(kind='random'),
                                 dict(task='cls', arch=arch, seed=seed, fc_dim=fc_dim), 0.5)
    assert [r['runs'] for r in ft.summarize([result('a', 'resnet50', 0, 16), result('b', 'resnet50', 1, 1024)])] == [2]
    assert 'fc_dim' not in capsys.readouterr().out
    assert [r['runs'] for r in ft.summarize([result('c', 'vgg16', 0, 16), result('d', 'vgg16', 1, 1024)])] == [1, 1]
    assert 'fc_dim=16 |' in capsys.readouterr().out


def test_summarize_names_a_flag_only_where_it_tells_groups_of_one_task_apart(tmp_path, capsys):
    # A cls run at crop 224 and a seg run at crop 448: each task has one group, so neither line names the
    # crop (it differs only between tables of other metrics); two cls runs at other crops name it.
    def result(name, task, crop, metrics):
        (tmp_path / name).mkdir()
        (tmp_path / name / 'results.json').write_text(json.dumps(dict(
            init=dict(kind='random'), args=dict(task=task, arch='vgg16', input='lab', steps=10, seed=0, crop=crop),
            metrics=metrics)))
        return tmp_path / name
    cls = result('cls', 'cls', 224, dict(map_voc07_11point=0.5, map_noninterpolated=0.25))
    seg = result('seg', 'seg', 448, dict(miou=0.4, pixel_acc=0.8))
    ft.summarize([cls, seg])
    assert capsys.readouterr().out.splitlines() == [
        'cls init=random arch=vgg16 input=lab steps=10 | map_voc07_11point 50.0 | map_noninterpolated 25.0 (n=1)',
        'seg init=random arch=vgg16 input=lab steps=10 | miou 40.0 | pixel_acc 80.0 (n=1)']
    ft.summarize([cls, seg, result('cls-small', 'cls', 64, dict(map_voc07_11point=0.3, map_noninterpolated=0.1))])
    assert [line.split(' | ')[0] for line in capsys.readouterr().out.splitlines()] == [
        'cls init=random arch=vgg16 input=lab steps=10 crop=224', 'cls init=random arch=vgg16 input=lab steps=10 crop=64',
        'seg init=random arch=vgg16 input=lab steps=10']


# ---------------------------------------------------------------- lab.lab_input

def test_lab_input_by_hand():
    x = lab.lab_input(torch.tensor([75.0, -25.0, 100.0]).view(3, 1, 1))
    assert x.flatten().tolist() == [0.5, -0.5, 2.0]


# ---------------------------------------------------------------- colorize.py

def test_holdout_is_set_aside_from_training(tmp_path):
    folder = tmp_path / 'imgs'
    for i in range(20):
        _write_rgb(folder / f'{i:02d}.png', np.full((4, 4, 3), i, np.uint8))
    args = argparse.Namespace(data=[str(folder)], val_data=None, holdout=4, out=tmp_path / 'run', short_side=[32, 55],
                              objective='colorize', classes=None)
    train, val = colorize.image_sources(args, True)
    assert len(val) == 4 and len(train) == 16 and not set(train) & set(val)
    args.holdout = 10  # too many to set aside from 20: an error, except for the benchmark, which never validates
    with pytest.raises(colorize.UserError, match='too few to hold out'):
        colorize.image_sources(args, True)
    assert colorize.image_sources(args, True, hold_out=False) == (sorted(train + val), [])


def _tiny_colorizer():
    torch.manual_seed(0)
    return colorize.make_model(dict(arch='vgg16', loss='huechroma', **TINY))


def test_validation_loss_reads_the_same_pixels_every_time():
    model = _tiny_colorizer()
    images = torch.from_numpy(rng(1).integers(0, 256, (4, 3, 32, 32), dtype=np.uint8))
    args = argparse.Namespace(loss='huechroma', points=16, border=4, target_window=7, lightness_weight=False)
    torch.manual_seed(1)
    a = colorize.evaluate(model, images, args, torch.device('cpu'))['loss']
    torch.manual_seed(2)
    assert colorize.evaluate(model, images, args, torch.device('cpu'))['loss'] == a


def test_sample_grid_columns_are_gray_prediction_truth(tmp_path):
    images = torch.from_numpy(rng(2).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    args = argparse.Namespace(loss='huechroma')
    colorize.write_grid(_tiny_colorizer(), images, args, torch.device('cpu'), tmp_path / 'g.png')
    grid = np.asarray(Image.open(tmp_path / 'g.png')).astype(int)  # (2 * 32, 3 * 32, 3)
    left, right = grid[:, :32], grid[:, 64:]
    assert np.abs(left - left[..., :1]).max() <= 1  # gray: R = G = B
    assert np.array_equal(right, torch.cat(list(images), 1).permute(1, 2, 0).numpy())  # the truth, exactly
    # ... and the gray column is the truth's own lightness (L* by the second formula, up to 8-bit rounding),
    # not any gray: a constant or mis-scaled gray column passed the R = G = B check alone.
    def lightness(a):
        return _lab_second_formula(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).double() / 255)[0]
    assert (lightness(left) - lightness(right)).abs().max() < 0.5
    # Each gray level is the truth's L* sRGB-encoded by hand (the CIE inverse: Y = ((L* + 16) / 116)^3 above
    # L* = 8, L* / (24389 / 27) below), rounded to the nearest level: truncated, about half the pixels of
    # the gray and predicted columns were a level darker, and the checks above passed.
    L = lightness(right).numpy()
    y = np.where(L > 8, ((L + 16) / 116) ** 3, L / (24389 / 27))
    srgb = 255 * np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055)
    assert np.abs(left - srgb[..., None]).max() <= 0.5 + 1e-3


class _NoColour(torch.nn.Module):
    trunk = argparse.Namespace(out_stride=32)

    def dense(self, x):
        return torch.zeros(x.shape[0], 2, -(-x.shape[2] // 4), -(-x.shape[3] // 4))


def test_colorizing_keeps_the_full_resolution_lightness():
    """With a* = b* = 0 predicted ('l2' decodes zeros to zeros), a gray photo comes back as itself,
    every 1-pixel detail included, although the network saw it at a quarter of its size."""
    g = np.where((np.arange(64)[:, None] + np.arange(96)[None, :]) % 2, 200, 40).astype(np.uint8)
    photo = np.repeat(g[..., None], 3, axis=2)
    out = colorize.colorize_array(_NoColour(), photo, 'l2', torch.device('cpu'), short_side=16)
    assert np.abs(out.astype(int) - photo).max() <= 1


def test_colorizing_shrinks_the_lightness_as_pillow_does():
    """A photo larger than --net-short-side reaches the network shrunk with an antialiasing filter: on noise,
    L* (the second formula) shrunk by Pillow's bilinear resize (a triangle filter as wide as the scale),
    within 0.01 L*. Sampled plainly (antialias off: 2 of every 4 pixels read) it was up to 23 L* off, and
    every test passed."""
    photo = rng(4).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    seen = []

    class Recording(_NoColour):
        def dense(self, x):
            seen.append(x)
            return super().dense(x)
    colorize.colorize_array(Recording(), photo, 'l2', torch.device('cpu'), short_side=16)
    L = _lab_second_formula(torch.from_numpy(photo).permute(2, 0, 1).double() / 255)[0].numpy()
    want = np.asarray(Image.fromarray(L.astype(np.float32)).resize((24, 16), Image.BILINEAR))
    assert seen[0].shape == (1, 1, 32, 32)  # 16 x 24, padded to multiples of 32
    assert np.abs(seen[0][0, 0, :16, :24].numpy() * 50 + 50 - want).max() < 0.01


def test_colorizing_a_large_photo_works_in_bands_of_rows(monkeypatch):
    """The full-resolution Lab conversions run on bands of rows (a whole 48-megapixel photo's float
    temporaries took 5.6 GB), with the result of converting the whole image at once, as it was done before."""
    torch.manual_seed(0)
    net = colorize.make_model(dict(arch='vgg16', objective='colorize', loss='l2', width=0.0625, fc_dim=16)).eval()
    photo = np.random.default_rng(2).integers(0, 256, (41, 30, 3), dtype=np.uint8)  # the last band: 1 row
    cpu = torch.device('cpu')
    with torch.no_grad():  # the reference: the whole image at once
        L = lab.rgb_to_lab(torch.from_numpy(photo).permute(2, 0, 1)[None])[:, :1]
        ab = colorize.predict_ab(net, F.pad(L, (0, 2, 0, 23), mode='replicate'), 'l2')[..., :41, :30]  # to 64 x 32
        want = (lab.lab_to_rgb(torch.cat([L, ab], 1))[0] * 255 + 0.5).clamp(0, 255).byte().permute(1, 2, 0).numpy()
    seen = []
    for name in ('rgb_to_lab', 'lab_to_rgb'):
        monkeypatch.setattr(lab, name, lambda x, f=getattr(lab, name): seen.append(x.shape[-2:].numel()) or f(x))
    monkeypatch.setattr(colorize, 'BAND_PIXELS', 64)  # 2 rows of 30 pixels a band
    got = colorize.colorize_array(net, photo, 'l2', cpu)
    assert seen and max(seen) == 60, seen  # never the whole 41 x 30 at once
    assert np.abs(got.astype(int) - want).max() <= 1 and (got != want).mean() < 0.01


def test_progress_rate_counts_only_the_steps_timed_since_resuming(monkeypatch):
    clock = iter([0.0, 1.0, 1.0])
    monkeypatch.setattr(colorize.time, 'perf_counter', lambda: next(clock))
    p = colorize.Progress(images_per_step=10)
    p.restore(dict(sums_by_rank=[[5.0]], steps=5), torch.device('cpu'))
    p.add(torch.tensor([1.0]))
    means, rate = p.take()
    assert means == [1.0] and rate == 10.0  # 6 steps' mean; 1 timed step of 10 images in 1 s


def test_each_rank_resumes_its_own_counts_and_window():
    """A two-process checkpoint, written by hand: rank r takes back rank r's image counts and open
    log window, not rank 0's and not the sums; a checkpoint from before per-rank counts gives its
    totals to rank 0 only (the ranks' counts are summed again at every report)."""
    model = _tiny_colorizer()
    optimizer = torch.optim.SGD(colorize.parameter_groups(model, 5e-4), lr=0.1, momentum=0.9)
    args = argparse.Namespace(weight_decay=5e-4, momentum=0.9)
    by_rank = [[10, 1, 3], [12, 0, 2]]  # ok, bad, gray
    ckpt = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=7, rng=colorize.rng_state(),
                counts=dict(counts=[22, 1, 5]), counts_by_rank=by_rank,
                progress=dict(sums_by_rank=[[1.0, 2.0], [3.0, 4.0]], steps=3))
    cpu = torch.device('cpu')
    for rank in (0, 1):
        counter, progress = data.StatusCounter(), colorize.Progress(images_per_step=8)
        assert colorize.restore_training(ckpt, 'ckpt.pt', model, optimizer, counter, args, cpu, rank) == 7
        progress.restore(ckpt['progress'], cpu, rank)
        assert counter.counts == by_rank[rank]
        assert progress.sums.tolist() == [[1.0, 2.0], [3.0, 4.0]][rank] and progress.steps == 3
    old = {k: v for k, v in ckpt.items() if k != 'counts_by_rank'}
    for rank, expected in ((0, [22, 1, 5]), (1, [0, 0, 0])):
        counter = data.StatusCounter()
        colorize.restore_training(old, 'ckpt.pt', model, optimizer, counter, args, cpu, rank)
        assert counter.counts == expected
    # The first commit (db53b26) saved images read in all: 28 read, 1 bad and 5 gray leave 22 ok.
    first = {**old, 'counts': dict(seen=28, bad=1, gray=5)}
    counter = data.StatusCounter()
    colorize.restore_training(first, 'ckpt.pt', model, optimizer, counter, args, cpu, 0)
    assert counter.counts == [22, 1, 5]


# ---------------------------------------------------------------- defaults and figures the README states

def test_pretraining_defaults_follow_the_global_batch_and_the_crop():
    """README, Defaults: lr 1e-3 x global batch / 8, warm-up over 2% of the steps, 16M images / global
    batch with --data, border crop / 7 (32 at 224), short side crop x [1, 600 / 352]; GPU: crop 224,
    batch 128, fc 4096, 2000 steps on the demo."""
    a = colorize.fill_defaults(colorize.parse_args(['--data', '/d', '--batch-size', '32', '--crop', '224']),
                               torch.device('cpu'), 4)  # 4 processes: global batch 128
    assert (a.lr, a.steps, a.warmup, a.border, a.short_side) == (pytest.approx(0.016), 125_000, 2500, 32, [224, 382])
    g = colorize.fill_defaults(colorize.parse_args([]), torch.device('cuda'), 1)  # the demo, on a GPU
    assert (g.crop, g.batch_size, g.fc_dim, g.steps, g.warmup, g.border) == (224, 128, 4096, 2000, 40, 32)
    assert g.lr == pytest.approx(0.016)
    c = colorize.fill_defaults(colorize.parse_args([]), torch.device('cpu'), 1)
    assert (c.crop, c.batch_size, c.fc_dim, c.steps, c.warmup, c.border) == (64, 8, 1024, 100, 2, 9)
    assert c.lr == pytest.approx(1e-3)
    # README, How long: 15,625 steps of 128 on eight GPUs; 2,000,000 of 8 on a CPU with --data.
    assert colorize.fill_defaults(colorize.parse_args(['--data', '/d']), torch.device('cuda'), 8).steps == 15_625
    assert colorize.fill_defaults(colorize.parse_args(['--data', '/d']), torch.device('cpu'), 1).steps == 2_000_000


def _cpu_note(script, argv, saved=None, world=1):
    """The CPU note of `script`'s run with `argv` (after fill_defaults; `saved`: a checkpoint's args, which
    --resume fills the flags not typed from, see merge_resumed_args), and its filled args."""
    args = script.parse_args(argv)
    if saved is not None:
        colorize.merge_resumed_args(args, saved, script.RUN_FLAGS, script.SCHEDULE_FLAGS, 'ckpt', log=None)
    if script is colorize:
        return script.cpu_note(script.fill_defaults(args, torch.device('cpu'), world), world), args
    return script.cpu_note(script.fill_defaults(args, torch.device('cpu'))), args


def test_the_cpu_note_speaks_of_the_demo_only_for_the_demo():
    """A CPU run's first line said 'so the demo finishes in minutes' also with --data (2,000,000 steps) or
    --voc-root (80,000): there it says that the steps are the full schedule's where they are (2,000,000 of 8
    on one process, 1,000,000 on two; 80,000), not for a typed --steps 5 nor for a 1000-step run resumed
    without --steps (which takes the checkpoint's 1000)."""
    for script, data_flags in ((colorize, ['--data', '/d']), (ft, ['--voc-root', '/v'])):
        assert 'the demo finishes in minutes' in _cpu_note(script, [])[0]
        note = _cpu_note(script, data_flags)[0]
        assert 'demo' not in note and 'give --steps' in note, (script.__name__, note)
        note = _cpu_note(script, [*data_flags, '--steps', '5'])[0]
        assert 'demo' not in note and '--steps' not in note, (script.__name__, note)
        saved = colorize.plain_args(_cpu_note(script, [*data_flags, '--steps', '1000'])[1])
        note, resumed = _cpu_note(script, [*data_flags, '--resume'], saved=saved)
        assert resumed.steps == 1000 and 'demo' not in note and '--steps' not in note, (script.__name__, note)
    note, args = _cpu_note(colorize, ['--data', '/d'], world=2)  # torchrun on CPUs
    assert args.steps == 1_000_000 and 'give --steps' in note, note
    # Typed large sizes: neither "small" nor "the demo finishes in minutes" (it said both).
    for script, big in ((colorize, ['--crop', '224', '--batch-size', '128']), (ft, ['--crop', '224', '--batch-size', '16'])):
        for data_flags in ([], ['--voc-root', '/v'] if script is ft else ['--data', '/d']):
            note = _cpu_note(script, [*big, *data_flags, '--steps', '5'])[0]
            assert 'small' not in note and 'demo' not in note, (script.__name__, note)
    # Each condition alone: a typed batch of 128 is not small; 5,000 demo steps do not finish in minutes; the
    # protocol's 10 test crops are not a smaller test.
    note = _cpu_note(colorize, ['--batch-size', '128'])[0]
    assert 'small' not in note and 'demo' not in note, note
    note = _cpu_note(colorize, ['--steps', '5000'])[0]
    assert 'small crop and batch' in note and 'demo' not in note, note
    note = _cpu_note(ft, ['--test-crops', '10'])[0]
    assert 'small crop and batch' in note and 'test crops' not in note, note


def test_resume_takes_a_resnets_typed_fc_dim_as_unread_not_as_a_change():
    """A ResNet has no fc6/fc7, so --fc-dim typed on resuming one changes nothing: it is the warning it gets
    on a fresh run (both scripts), where it was refused as 'trained with --fc-dim 1024' (VGG-16 still is)."""
    for script, base in ((colorize, []), (ft, ['--task', 'cls', '--init', 'random'])):
        for arch, refused in (('resnet50', False), ('vgg16', True)):
            fresh = script.parse_args([*base, '-a', arch])
            fresh.fc_dim = 1024
            saved = colorize.plain_args(fresh)
            args = script.parse_args([*base, '-a', arch, '--fc-dim', '32', '--resume'])
            if refused:
                with pytest.raises(colorize.UserError, match='trained with --fc-dim 1024'):
                    colorize.merge_resumed_args(args, saved, script.RUN_FLAGS, script.SCHEDULE_FLAGS, 'ckpt', log=None)
            else:
                colorize.merge_resumed_args(args, saved, script.RUN_FLAGS, script.SCHEDULE_FLAGS, 'ckpt', log=None)
                assert args.fc_dim == 1024, script.__name__

def test_transfer_lr_schedules_of_the_protocols():
    """README: segmentation x0.1 at 22.5k and 30k of 40k (at 563 and 750 of --steps 1000);
    classification halved every 10k of 80k."""
    seg = ft.fill_defaults(ft.parse_args(['--task', 'seg', '--voc-root', 'x']), torch.device('cuda'))
    assert seg.steps == 40_000
    assert [ft.lr_at(s, seg) for s in (0, 22_499, 22_500, 29_999, 30_000, 39_999)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5])
    seg.steps = 1000
    assert [ft.lr_at(s, seg) for s in (562, 563, 749, 750)] == pytest.approx([1e-3, 1e-4, 1e-4, 1e-5])
    cls = ft.fill_defaults(ft.parse_args(['--task', 'cls', '--voc-root', 'x']), torch.device('cuda'))
    assert (cls.steps, cls.test_crops) == (80_000, 10)
    assert [ft.lr_at(s, cls) for s in (9_999, 10_000, 20_000, 79_999)] == pytest.approx([1e-3, 5e-4, 2.5e-4, 1e-3 / 128])


def test_evaluation_colour_figures_by_hand():
    """PSNR of predicting gray and the ab RMSE (root of the mean over the a* and b* values), on uniform
    sRGB red and blue (the published L*a*b* table), with an l2 head that predicts (a, b) = (10, -10)."""
    net = colorize.make_model(dict(arch='vgg16', objective='colorize', loss='l2', width=0.0625, fc_dim=16))
    torch.nn.init.zeros_(net.head.out.weight)
    with torch.no_grad():
        net.head.out.bias.copy_(torch.tensor([10.0, -10.0]) / 128)  # l2 logits are ab / 128 (lab.L2_SCALE)
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)
    images[0, 0] = images[1, 2] = 255
    args = argparse.Namespace(loss='l2', points=16, border=4, target_window=7, lightness_weight=False)
    m = colorize.evaluate(net, images, args, torch.device('cpu'))
    assert net.training  # back in train mode (the run's sample grid after it reset the mode, hiding a miss)
    (L_r, a_r, b_r), (L_b, a_b, b_b) = SRGB_LAB_TABLE[0][1], SRGB_LAB_TABLE[2][1]

    def gray_psnr(L):  # CIE L* -> Y, sRGB-encoded; against a primary: one channel at 1, two at 0
        g = 1.055 * ((L + 16) / 116) ** (3 / 2.4) - 0.055
        return -10 * math.log10(((1 - g) ** 2 + 2 * g ** 2) / 3)
    assert m['psnr_gray'] == pytest.approx((gray_psnr(L_r) + gray_psnr(L_b)) / 2, abs=1e-3)
    assert m['ab_rmse_gray'] == pytest.approx(math.sqrt((a_r ** 2 + b_r ** 2 + a_b ** 2 + b_b ** 2) / 4), abs=1e-2)
    want = math.sqrt(((a_r - 10) ** 2 + (b_r + 10) ** 2 + (a_b - 10) ** 2 + (b_b + 10) ** 2) / 4)
    assert m['ab_rmse'] == pytest.approx(want, abs=1e-2)
    assert m['psnr'] != pytest.approx(m['psnr_gray'], abs=0.1)
    # The validation loss: l2 on (a, b) / 128, the same at every sampled pixel of an image, averaged
    # over the two images.
    # (128 written out: with lab.L2_SCALE on both sides, a wrong scale cancelled out here and nowhere showed.)
    l2 = (((a_r - 10) ** 2 + (b_r + 10) ** 2) + ((a_b - 10) ** 2 + (b_b + 10) ** 2)) / 2 / 128 ** 2
    assert m['loss'] == pytest.approx(l2, rel=1e-4)


class _DenseCells(torch.nn.Module):
    """A colorizer whose dense output is the given (1, D, h, w) cells, whatever the input."""

    def __init__(self, cells):
        super().__init__()
        self.cells = cells

    def dense(self, x):
        return self.cells


class _ColourOfLightness(torch.nn.Module):
    """A colorizer (deepest stride 32) whose a* at each stride-4 cell is 20 x its mean network input."""

    def __init__(self):
        super().__init__()
        self.trunk = argparse.Namespace(out_stride=32)

    def dense(self, x):
        a = F.avg_pool2d(x, 4, ceil_mode=True) * 20 / lab.L2_SCALE
        return torch.cat([a, torch.zeros_like(a)], 1)


def test_colorizing_pads_the_lightness_with_its_edge_pixels():
    # A uniform photo of 37 x 45 pixels is padded to 64 x 64 (multiples of the stride 32) before the
    # network sees it: with its own edge pixels repeated, every cell sees the same lightness and the
    # photo comes back one colour; zero padding (L* = 0) would darken the cells along the right and
    # bottom edges and so their colour.
    photo = np.full((37, 45, 3), 200, np.uint8)
    out = colorize.colorize_array(_ColourOfLightness(), photo, 'l2', torch.device('cpu'))
    assert out.shape == (37, 45, 3) and (out == out[0, 0]).all() and out[0, 0, 0] > out[0, 0, 1]  # a* > 0: red


def test_predicted_colour_is_upsampled_bilinearly_from_the_cell_centres():
    # Cells sit at pixels 4 i + 1.5 (stride 4): two cells of a* = 0 and 8 give, along a row of 8
    # pixels, 0 up to the first centre, then 2 per pixel (1 at pixel 2, 0.5 past the centre), 8 beyond
    # the second. By hand; nearest-cell upsampling would give 0, 0, 0, 0, 8, 8, 8, 8.
    cells = torch.zeros(1, 2, 1, 2)
    cells[0, 0, 0, 1] = 8 / lab.L2_SCALE  # l2 logits are (a, b) / L2_SCALE
    ab = colorize.predict_ab(_DenseCells(cells), torch.full((1, 1, 3, 8), 50.0), 'l2')
    assert ab.shape == (1, 2, 3, 8) and (ab[0, 1] == 0).all()
    torch.testing.assert_close(ab[0, 0], torch.tensor([[0.0, 0, 1, 3, 5, 7, 8, 8]] * 3))


# ---------------------------------------------------------------- atomic writes

class _FullFile:
    """A file opened for writing on a disk that fills after `room` bytes: a write past it fails with
    ENOSPC and no file name, as the kernel's does. No fileno(), so that Pillow writes through write()."""

    def __init__(self, f, room):
        self._f, self._room = f, room

    def write(self, b):
        if len(b) > self._room:
            raise OSError(errno.ENOSPC, 'No space left on device')
        self._room -= len(b)
        return self._f.write(b)

    def fileno(self):
        raise io.UnsupportedOperation('fileno')

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def test_a_full_disk_names_the_checkpoint_and_leaves_the_old_one(tmp_path):
    # torch.save's zip writer reports the failed write as a RuntimeError of its own, the OSError only
    # as its context: the error that comes out is the OSError, naming the file.
    path = tmp_path / 'checkpoint.pt'
    colorize.atomic_save({'w': torch.zeros(3)}, path)
    with pytest.raises(OSError) as caught:
        data.atomic_write(path, lambda f: torch.save({'w': torch.ones(100_000)}, _FullFile(f, 50_000)))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert colorize.error_text(caught.value) == f'{path}: No space left on device (writing it; what was there ' \
                                                'before is unchanged)'
    assert torch.equal(_state(path)['w'], torch.zeros(3)) and os.listdir(tmp_path) == ['checkpoint.pt']
    assert colorize.error_text(OSError(errno.ENOENT, 'No such file or directory', 'x')) is None  # a bug: traceback


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / 'f.json'
    path.write_bytes(b'old')

    def fail(f):
        f.write(b'half')
        raise OSError('disk full')
    with pytest.raises(OSError):
        data.atomic_write(path, fail)
    assert path.read_bytes() == b'old' and os.listdir(tmp_path) == ['f.json']  # no half-written temp left
    # A process killed mid-write left its temp: the next write removes it, not a live process's.
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    prefix = f'f.json.tmp-{socket.gethostname()}-'
    for pid in (dead.pid, os.getppid()):
        (tmp_path / f'{prefix}{pid}').write_bytes(b'half')
    (tmp_path / f'f.json.tmp-{dead.pid}').write_bytes(b'half')  # named as before the host was in the name
    data.atomic_write(path, lambda f: f.write(b'new'))
    assert path.read_bytes() == b'new' and sorted(os.listdir(tmp_path)) == ['f.json', f'{prefix}{os.getppid()}']


# ---------------------------------------------------------------- faults of the environment

def _disk_fills_for(monkeypatch, match, room=0):
    """Files whose path contains `match`, opened for writing (by anyone: Pillow, torch, the scripts),
    fill the disk after `room` bytes."""
    import builtins
    real_open = builtins.open

    def fake_open(file, mode='r', *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and match in os.fspath(file) and set(mode) & set('wax+'):
            return _FullFile(f, room)
        return f
    monkeypatch.setattr(builtins, 'open', fake_open)


def test_colorized_output_is_replaced_atomically_when_the_disk_fills(trained, folders, tmp_path, monkeypatch,
                                                                       capsys):
    # A rerun renews its results in place. Written in place, a full disk (or a kill) mid-write left a
    # truncated PNG where the earlier result was, and the error named no file.
    _, val = folders
    out = tmp_path / 'colorized'
    argv = ['--colorize', str(val), '--checkpoint', str(trained), '--output', str(out), '--device', 'cpu']
    assert colorize.main(argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    victim = sorted(before)[1]
    _disk_fills_for(monkeypatch, victim, room=100)
    capsys.readouterr()
    assert colorize.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f'error: {out / victim}: No space left on device (writing it; what was there before is unchanged)'
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no half file, no temp left
    # The sample grids of training are written the same way.
    _disk_fills_for(monkeypatch, 'step_0000000.png', room=100)
    train, val = folders
    run = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, run, '--steps', '2')) == 2
    assert 'step_0000000.png: No space left on device' in capsys.readouterr().err
    assert os.listdir(run / 'samples') == []


def test_an_output_path_of_the_wrong_kind_is_one_line_not_a_traceback(folders, tmp_path, capsys):
    # --out under a file, --out that is a file: NotADirectoryError / FileExistsError came out as tracebacks
    # from all three scripts.
    train, val = folders
    afile = tmp_path / 'afile'
    afile.write_text('notes')
    assert colorize.main(tiny_args(train, val, afile / 'run', '--steps', '1')) == 2
    assert capsys.readouterr().err.strip() == (f'error: {afile / "run"}: Not a directory (a part of that path is a '
                                               f'file, not a folder: choose another path)')
    assert colorize.main(tiny_args(train, val, afile, '--steps', '1')) == 2
    assert capsys.readouterr().err.strip() == (f'error: {afile}: File exists (a file is there, where a folder is '
                                               f'needed: move the file or choose another path)')
    assert ft.main(['--task', 'cls', '--init', 'random', '-a', 'vgg16', '--width', '0.0625', '--fc-dim', '16',
                    '--device', 'cpu', '--out', str(afile / 'ft')]) == 2
    assert capsys.readouterr().err.strip().startswith(f'error: {afile / "ft"}: Not a directory (')
    assert data.main(['pack', '--data', str(train), '--out', str(afile / 'pack'), '--short-side', '32',
                      '--workers', '1']) == 2
    err = capsys.readouterr().err.strip()
    assert err.split(' pack: error: ', 1)[1].startswith(f'{afile / "pack"}') and 'Not a directory' in err
    assert 'Traceback' not in err and '--help' not in err and len(err.splitlines()) == 1
    assert afile.read_text() == 'notes'


def test_a_full_disk_while_logging_or_packing_names_the_file(folders, tmp_path, monkeypatch, capsys):
    # The log's and the pack shards' writes raised ENOSPC naming no file: 'error: No space left on device',
    # and data.py added "(`data.py pack --help` lists the flags)".
    train, val = folders
    run = tmp_path / 'run'
    _disk_fills_for(monkeypatch, 'log.jsonl', room=0)
    assert colorize.main(tiny_args(train, val, run, '--steps', '2')) == 2
    assert capsys.readouterr().err.strip() == (f'error: {run / "log.jsonl"}: No space left on device (appending to '
                                               f'it; the checkpoints written are unchanged)')
    pack = tmp_path / 'pack'
    _disk_fills_for(monkeypatch, 'shard-', room=2000)
    assert data.main(['pack', '--data', str(train), '--out', str(pack), '--short-side', '32', '--workers', '1']) == 2
    assert capsys.readouterr().err.strip().split(' pack: error: ', 1)[1] == (
        f'{pack / "shard-00000.bin"}: No space left on device (writing it); once there is room, the same command '
        f'continues the pack')
    monkeypatch.undo()
    assert data.main(['pack', '--data', str(train), '--out', str(pack), '--short-side', '32', '--workers', '1']) == 0
    assert len(data.PackReader(pack)) == 24 and data.PackReader(pack).load_rgb(23).ndim == 3


def test_ctrl_c_stops_pack_and_verify_with_the_shell_s_status(folders, tmp_path, monkeypatch, capsys):
    # Ctrl-C: one line, no traceback, and status 130 (128 + SIGINT, as a shell reports a process that SIGINT
    # ended), so that a script running `data.py pack` stops too; the same command goes on with the pack.
    train, _ = folders
    pack = tmp_path / 'pack'
    argv = ['pack', '--data', str(train), '--out', str(pack), '--short-side', '32', '--workers', '1']

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, '_pack_task', ctrl_c)
    assert data.main(argv) == 130
    assert capsys.readouterr().err == 'interrupted: run the same command again to continue\n'
    assert not (pack / 'complete.json').exists()
    monkeypatch.setattr(data, 'verify_pack', ctrl_c)
    assert data.main(['verify', str(pack)]) == 130
    assert capsys.readouterr().err == 'interrupted\n'
    monkeypatch.undo()
    assert data.main(argv) == 0
    assert len(data.PackReader(pack)) == 24 and data.verify_pack(pack, workers=1, log=_quiet) == []


def test_ctrl_c_while_the_pack_starts_its_workers_is_not_lost(folders, tmp_path):
    # A Ctrl-C that lands while the pool forks its workers arrives inside os.fork's at-fork hooks, where
    # CPython prints "Exception ignored" and drops the KeyboardInterrupt: the pack ran on to the end with
    # status 0. Simulated exactly: a hook (in a child Python: hooks cannot be removed) sends the SIGINT.
    train, _ = folders
    pack = tmp_path / 'pack'
    # With a second thread running, as torch's or a watcher's may: SIGINT held back from this thread alone
    # (pthread_sigmask) went to that one, and its handler still ran in the hooks.
    script = ("import os, signal, sys, threading; sys.path.insert(0, sys.argv[1]); import data\n"
              "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
              "os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))\n"
              "sys.exit(data.main(['pack', '--data', sys.argv[2], '--out', sys.argv[3], '--short-side', '32', "
              "'--workers', '2']))\n")
    run = subprocess.run([sys.executable, '-c', script, str(HERE), str(train), str(pack)], capture_output=True,
                         text=True, timeout=120)
    assert (run.returncode, run.stderr) == (130, 'interrupted: run the same command again to continue\n')
    assert not (pack / 'complete.json').exists()
    assert data.main(['pack', '--data', str(train), '--out', str(pack), '--short-side', '32', '--workers', '2']) == 0
    assert len(data.PackReader(pack)) == 24 and data.verify_pack(pack, workers=1, log=_quiet) == []


@pytest.mark.skipif(torch.multiprocessing.get_start_method() not in ('fork', 'forkserver'),
                    reason="spawned workers start without os.fork, whose at-fork hooks are the window")
def test_ctrl_c_while_a_loader_starts_its_workers_is_not_lost(folders, voc, tmp_path):
    # The same for a DataLoader's workers, forked at its first batch: the Ctrl-C was dropped and training
    # (colorize.py) or the test after it (finetune_voc.py's own loader) ran on to the end with status 0.
    # Simulated as for the pack: a hook sends SIGINT (finetune_voc.py: in the test only), at the second worker's
    # fork: raised as that worker's start() returned, inside torch's loop that starts them, it left a half-built
    # iterator, whose __del__ printed an AttributeError traceback after the "interrupted" line.
    train, val = folders
    hook = ("import os, signal, sys, traceback; sys.path.insert(0, sys.argv[1]); import colorize, finetune_voc\n"
            "forks = []\n"
            "os.register_at_fork(after_in_parent=lambda: (sys.argv[2] in [f.name for f in traceback.extract_stack()]"
            " and forks.append(1) is None and len(forks) == 2 and os.kill(os.getpid(), signal.SIGINT)))\n"
            "sys.exit(%s.main(sys.argv[3:]))\n")
    runs = {script: subprocess.Popen([sys.executable, '-c', hook % script, str(HERE), where, *argv], text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for script, where, argv in (  # both at once (each is mostly a torch import: seconds)
                ('colorize', '_launch', tiny_args(train, val, tmp_path / 'run', '--steps', '2', '--workers', '2')),
                ('finetune_voc', 'evaluate_classification',
                 ['--task', 'cls', '--init', 'random', '--voc-root', voc, '--out', str(tmp_path / 'ft'), '--steps',
                  '2', '--width', '0.0625', '--fc-dim', '16', '--crop', '32', '--batch-size', '2', '--workers', '2',
                  '--test-crops', '1', '--device', 'cpu']))}
    try:
        for script, run in runs.items():
            _, err = run.communicate(timeout=120)
            assert (run.returncode, err) == (130, (
                f'interrupted: the last checkpoint written is intact; continue with --resume --out {tmp_path / "ft"}\n'
                if script == 'finetune_voc' else
                "interrupted before the run's first checkpoint: nothing to resume; run the same command again\n"))
    finally:
        for run in runs.values():
            run.kill()
            run.wait()
    assert not (tmp_path / 'ft' / 'results.json').exists()


class _SigintHandlerDataset(torch.utils.data.Dataset):
    """What a loader worker's SIGINT handler is."""

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_pool_workers_forked_with_ctrl_c_deferred_keep_the_sigint_handler():
    # The workers are forked while a Ctrl-C is only recorded (data.SigintDeferred): each puts the handler of
    # before back as it starts, or a Ctrl-C would be recorded there and ignored for good.
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    pool = data._process_pool(1)
    try:
        assert pool.submit(signal.getsignal, signal.SIGINT).result(timeout=60) is signal.default_int_handler
    finally:
        pool.shutdown()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigint_deferred_leaves_a_handler_set_outside_python_alone(monkeypatch):
    # signal.getsignal says None for a SIGINT handler that Python did not set (an embedding program's): the
    # recording handler put in its place could not be taken out again (signal.signal cannot put that one
    # back), and every later Ctrl-C was recorded and dropped. So SigintDeferred does not touch it.
    real = signal.getsignal
    monkeypatch.setattr(signal, 'getsignal', lambda signum: None if signum == signal.SIGINT else real(signum))
    with data.SigintDeferred():
        assert real(signal.SIGINT) is signal.default_int_handler
    assert real(signal.SIGINT) is signal.default_int_handler


def test_loader_workers_forked_with_ctrl_c_deferred_keep_the_sigint_handler():
    # The same for a DataLoader's (colorize.worker_context: data.SigintDeferredForkProcess).
    # Where workers are spawned (macOS's and Windows' start method), no fork: the default context.
    spawned = torch.multiprocessing.get_start_method() not in ('fork', 'forkserver')
    assert colorize.worker_context(1) is (None if spawned else data.SIGINT_DEFERRED_FORK)
    loader = torch.utils.data.DataLoader(_SigintHandlerDataset(), num_workers=1,
                                         multiprocessing_context=data.SIGINT_DEFERRED_FORK)
    assert list(loader) == [torch.tensor([True])]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # Forked inside another SigintDeferred too (nested: a loader's iterator built in one):
    # the worker's handler is the one outside both, not the outer block's recorder, which would drop its Ctrl-C.
    with data.SigintDeferred():
        assert list(torch.utils.data.DataLoader(_SigintHandlerDataset(), num_workers=1,
                                                multiprocessing_context=data.SIGINT_DEFERRED_FORK)) == [
            torch.tensor([True])]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_drops_a_garbled_log_line(folders, tmp_path):
    # A machine crash can leave garbage (not UTF-8) at the end of log.jsonl; trim_log read it with
    # read_text() and the resume died with a UnicodeDecodeError traceback.
    train, val = folders
    out = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, out, '--steps', '2')) == 0
    log = out / 'log.jsonl'
    good = log.read_bytes()
    log.write_bytes(good + b'{"step": 4, "lo\xff\xfe\x00\x00 garbage\n')
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--resume')) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[:len(good.splitlines())] == [json.loads(line) for line in good.splitlines()]
    assert [e['step'] for e in lines if not e.get('eval')] == [2, 4]


def _trim_log_whole(path, step):
    """trim_log as it was before it streamed (it read the whole log into memory): the reference."""
    if not path.exists():
        return
    kept = []
    for line in path.read_bytes().decode('utf-8', 'replace').splitlines():
        try:
            if json.loads(line)['step'] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    data.atomic_write(path, lambda f: f.write(''.join(line + '\n' for line in kept).encode()))


def test_trim_log_streams_and_writes_what_the_whole_file_version_wrote(tmp_path, monkeypatch):
    lines = [
        b'{"step": 1, "loss": 3.5}', b'{"eval": true, "step": 1, "psnr": 21.0}', b'',
        b'{"step": 2, "loss": 3.4}\r', b'{"step": 2.5}\r\n{"step": 3, "x": "a\xc3\xa9"}',  # \r and \r\n breaks
        b'{"step": 2, "note": "caf\xff\xfe"}', b'{"step": 3, "cut": "\xe2\x82', b'\xac"}',  # bad / split UTF-8
        b'{"step": 1}\xc2\x85{"step": 2}\xe2\x80\xa8{"step": 3}\x0b{"step": 1}\x1c{"step": 9}',  # other breaks
        b'{"step": 99, "step": 1}', b'{"step": 1, "step": 99}', b'{"step": true}', b'{"step": "1"}',
        b'{"step": null}', b'[1, 2]', b'7', b'{"loss": 1}', b'{"step": NaN}', b'{"step": -Infinity}',
        b'{"step": 4, "loss": 3.1}', b'{"step": 5, "loss": 3.0}', b'{"eval": true, "step": 5}',  # later steps
        b'{"step": 3, "lo\xff\xfe\x00\x00 garbage', b'\x00' * 40, b'{"step": 3, "loss": 2.9',  # a crash's end
    ]
    log = tmp_path / 'log.jsonl'
    for step in (0, 3, 4, 99):
        for end in (b'', b'\n'):
            for name, trim in (('whole', _trim_log_whole), ('stream', colorize.trim_log)):
                (tmp_path / name).write_bytes(b'\n'.join(lines) + end)
                trim(tmp_path / name, step)
            assert (tmp_path / 'stream').read_bytes() == (tmp_path / 'whole').read_bytes()
    # By hand, at step 3: what a reader of the log sees.
    log.write_bytes(b'\n'.join(lines))
    colorize.trim_log(log, 3)
    assert log.read_bytes().decode().splitlines() == [
        '{"step": 1, "loss": 3.5}', '{"eval": true, "step": 1, "psnr": 21.0}', '{"step": 2, "loss": 3.4}',
        '{"step": 2.5}', '{"step": 3, "x": "a\u00e9"}', '{"step": 2, "note": "caf\ufffd\ufffd"}',
        '{"step": 1}', '{"step": 2}', '{"step": 3}', '{"step": 1}', '{"step": 99, "step": 1}', '{"step": true}',
        '{"step": -Infinity}']
    colorize.trim_log(tmp_path / 'missing.jsonl', 3)
    assert not (tmp_path / 'missing.jsonl').exists()
    # Written atomically (a temp file renamed over the log), and in memory that does not grow with the log.
    written = []
    monkeypatch.setattr(data, 'atomic_write', lambda path, write: written.append(path) or _atomic(path, write))
    entry = data.json_text(dict(step=1, loss=3.25, lr=1e-3, img_per_s=1234.5, peak_mem_gb=1.5, bad=0, gray=0))
    log.write_bytes((entry + '\n').encode() * 3_000)  # 0.3 MB (30,000 lines took a second more to trace)
    tracemalloc.start()
    try:
        colorize.trim_log(log, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert written == [log] and log.read_bytes() == (entry + '\n').encode() * 3_000
    assert peak < 0.1e6, f'{peak / 1e6:.2f} MB'  # 1.26 MB when it read the whole log (0.3 MB), 0.01 MB now


_atomic = data.atomic_write


def test_a_truncated_mask_is_one_line_naming_it(tmp_path, voc, capsys):
    # A mask cut short past its header passed the size check, then load_label's OSError('image file is
    # truncated') came out of the training loop (or a loader process) as a traceback naming no file; one cut
    # inside its header gave 'cannot read VOC image or mask Truncated File Read', also naming none.
    root = tmp_path / 'VOCdevkit'
    shutil.copytree(voc, root)
    masks = root / 'VOC2012' / 'SegmentationClass'
    names = (root / 'VOC2012' / 'ImageSets' / 'Segmentation' / 'train.txt').read_text().split()
    argv = ['--task', 'seg', '--init', 'random', '-a', 'alexnet', '--width', '0.0625', '--fc-dim', '16',
            '--voc-root', str(root), '--steps', '2', '--batch-size', '2', '--crop', '32', '--workers', '0',
            '--device', 'cpu', '--out', str(tmp_path / 'seg'), '--test-images', '2']
    for name in names:  # every training mask, so that the first batch meets one: cut 10 bytes into its pixels
        os.truncate(masks / f'{name}.png', (masks / f'{name}.png').read_bytes().index(b'IDAT') + 14)
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf'error: cannot read VOC mask {re.escape(str(masks))}/\S+\.png: cannot decode \(OSError: '
                        r'image file is truncated\); re-extract the dataset', err), err
    os.truncate(masks / f'{names[0]}.png', 60)  # inside its header
    assert ft.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: cannot read VOC image or mask {masks / names[0]}.png: cannot decode (')
    assert len(err.splitlines()) == 1
    with pytest.raises(data.BadImage, match='image file is truncated'):
        data.load_label(masks / f'{names[1]}.png')


def test_a_mask_value_that_is_no_class_and_not_void_is_one_line_naming_it(tmp_path):
    # A mask value of 21..254 (another label set's masks, colours mapped wrongly) made an IndexError traceback
    # in the training loss ('Target 21 is out of bounds'; a device-side assert on CUDA) or, in a test mask,
    # in the confusion matrix after training. 0..20 are VOC's classes (background, 20 objects), 255 void.
    palette = [v for i in range(256) for v in (i, i, i)]
    def mask(name, values):
        im = Image.frombytes('P', (len(values) // 2, 2), bytes(values))  # fromarray's mode argument is deprecated
        im.putpalette(palette)
        im.save(tmp_path / name)
        return str(tmp_path / name)
    good = mask('good.png', [0, 20, 255, 7])
    assert ft._load_label(good).tolist() == [[0, 20], [255, 7]]
    with pytest.raises(ft.UserError, match=r'^VOC mask \S+/one\.png holds value 21, where a mask holds class indices '
                                           r'0\.\.20 and 255 \(void\)'):
        ft._load_label(mask('one.png', [0, 21, 255, 3]))
    with pytest.raises(ft.UserError, match=r'holds values 21, 22, 23, 24, 25, \.\.\., where'):
        ft._load_label(mask('many.png', [21, 22, 23, 24, 25, 254]))


def _pack_of_jpegs(tmp_path, n, size=(40, 50), short_side=32, empty=()):
    """n smooth JPEGs 00.jpg.. (and empty files named in `empty`: bad images) in tmp_path/src, packed
    into tmp_path/pack by one worker: (src, pack)."""
    root, pack = tmp_path / 'src', tmp_path / 'pack'
    for i in range(n):
        _write_rgb(root / f'{i:02d}.jpg', _smooth_rgb(*size, i), fmt='JPEG')
    for name in empty:
        (root / name).write_bytes(b'')
    data.pack_images([root], pack, short_side=short_side, workers=1, log=_quiet)
    return root, pack


def _as_format_1(pack, copy):
    """A copy of `pack` as a data.py of pack format version 1 wrote it: no CRC column in index.npy, no CRC32s of
    files in complete.json."""
    shutil.copytree(pack, copy)
    np.save(copy / 'index.npy', np.load(pack / 'index.npy')[:, :4])
    complete = json.loads((pack / 'complete.json').read_text())
    del complete['crc32']
    (copy / 'complete.json').write_text(json.dumps({**complete, 'version': 1}))
    return copy


def test_a_pack_of_format_version_1_reads_and_lists_as_before(tmp_path):
    # Packs written before the CRC column (format version 1) train and list as they did; `pack` run again
    # into one finds it complete.
    root, pack = _pack_of_jpegs(tmp_path, 3, empty=['zz.jpg'])
    old = _as_format_1(pack, tmp_path / 'old')
    paths, old_paths = data.find_images(pack, log=_quiet), data.find_images(old, log=_quiet)
    assert [p[len(str(old)):] for p in old_paths] == [p[len(str(pack)):] for p in paths] and len(paths) == 4
    for p, q in zip(paths[:3], old_paths):
        assert np.array_equal(data.load_rgb(p), data.load_rgb(q))
    with pytest.raises(data.BadImage, match=r'zz\.jpg: empty file'):
        data.load_rgb(old_paths[3])
    lines = []
    assert data.pack_images([root], old, short_side=32, workers=1, log=lines.append)['version'] == 1
    assert 'is already complete' in lines[0]
    (old / 'complete.json').write_text((old / 'complete.json').read_text().replace('"version": 1', '"version": 3'))
    data._OPEN_PACKS.clear()
    # A pack of a later format (a newer data.py on the machine that packed it): update, rather than pack again only.
    with pytest.raises(ValueError, match=r'has format version 3, this data\.py reads versions 1, 2: a newer data\.py '
                                         r'wrote it: update this one \(git pull\), or pack the images again$'):
        data.find_images(old, log=_quiet)
    unfinished = tmp_path / 'unfinished'
    shutil.copytree(old, unfinished)
    os.remove(unfinished / 'complete.json')
    progress = json.loads((unfinished / 'progress.json').read_text())
    (unfinished / 'progress.json').write_text(json.dumps({**progress, 'version': 3}))
    with pytest.raises(ValueError, match=r'version 3, but this data\.py knows versions 1, 2: a newer data\.py wrote it: '
                                         r'update this one \(git pull\), or pack into another folder'):
        data.pack_images([root], unfinished, short_side=32, workers=1, log=_quiet)
    (old / 'complete.json').write_text((old / 'complete.json').read_text().replace('"version": 3', '"version": 0'))
    with pytest.raises(ValueError, match=r'has format version 0, this data\.py reads versions 1, 2: pack the images again$'):
        data.find_images(old, log=_quiet)
    data._OPEN_PACKS.clear()


def _flip_byte(pack, i, at=None, mask=0x01):
    """Flip bits of byte `at` (default: the middle one) of entry i's stored JPEG bytes in its shard."""
    shard, offset, length = (int(v) for v in np.load(pack / 'index.npy')[i, :3])
    with open(pack / f'shard-{shard:05d}.bin', 'r+b') as f:
        f.seek(offset + (length // 2 if at is None else at))
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ mask]))


def test_verify_names_the_damaged_files_and_images_of_a_copied_pack(tmp_path, capsys, monkeypatch):
    # A copy cut short, or a flipped bit, was caught only where it made an image undecodable, counted as bad while
    # training; a changed byte that still decodes trained silently. `data.py verify` checks sizes and CRC32s.
    root, pack = _pack_of_jpegs(tmp_path, 5, empty=['zz.jpg'])  # 00.jpg..04.jpg, zz.jpg: entry 5, bad
    sources = sorted(str(p) for p in root.iterdir())
    index = np.load(pack / 'index.npy')
    shard = (pack / 'shard-00000.bin').stat().st_size

    def verify(name, damage, workers='1'):
        copy = tmp_path / name
        shutil.copytree(pack, copy)
        damage(copy)
        rc = data.main(['verify', str(copy), '--workers', workers])
        return rc, capsys.readouterr()

    rc, out = verify('sound', lambda c: None)
    assert rc == 0 and out.out == (f'pack {tmp_path / "sound"} verified: shard sizes and the CRC32s of its files and '
                                   'all 5 stored images of 6 are as packed (0 s)\n')
    rc, out = verify('flipped', lambda c: _flip_byte(c, 3))
    assert rc == 1 and out.out.splitlines() == [
        f'failed: entry 3 ({sources[3]}) in shard-00000.bin: its bytes differ from those packed (CRC32 mismatch)',
        f'pack {tmp_path / "flipped"} FAILED verification: 1 of 6 images; files to copy again from the original '
        'pack: shard-00000.bin (1 of its images); then verify again (0 s)']
    assert data.verify_pack(tmp_path / 'flipped', workers=2, task_size=2, log=_quiet) == [  # over a pool of processes
        ('shard-00000.bin', 3, 'its bytes differ from those packed (CRC32 mismatch)')]
    cut = int(index[3, 1]) + 10  # entries 3 and 4 lose bytes
    rc, out = verify('cut', lambda c: os.truncate(c / 'shard-00000.bin', cut))
    lines = out.out.splitlines()
    assert rc == 1 and lines[0] == f'failed: {tmp_path / "cut" / "shard-00000.bin"} holds {cut} bytes, {shard} expected'
    assert [re.match(r'failed: entry (\d) \((\S+)\) in shard-00000\.bin: shard-00000\.bin ends before its bytes', line)
            .groups() for line in lines[1:3]] == [('3', sources[3]), ('4', sources[4])]
    assert 'FAILED verification: 2 of 6 images; files to copy again from the original pack: shard-00000.bin (2' in lines[3]
    rc, out = verify('lost', lambda c: os.remove(c / 'shard-00000.bin'))
    assert rc == 1 and out.out.count('cannot read shard-00000.bin (No such file or directory)') == 5
    assert out.out.splitlines()[0] == f'failed: {tmp_path / "lost" / "shard-00000.bin"} is missing'
    # A complete.json of format version 2 without the files' CRC32s (edited by hand): said, the images still checked.
    rc, out = verify('no_crc32', lambda c: (c / 'complete.json').write_text(json.dumps(
        {k: v for k, v in json.loads((c / 'complete.json').read_text()).items() if k != 'crc32'})))
    assert rc == 1 and out.out.splitlines() == [
        f'failed: {tmp_path / "no_crc32" / "complete.json"} lacks the CRC32s of the files (its "crc32")',
        f'pack {tmp_path / "no_crc32"} FAILED verification: 0 of 6 images; files to copy again from the original '
        'pack: complete.json; then verify again (0 s)']
    # The files without a CRC32 of their own: index.npy (a status ok turned gray reads, but is wrong), names.bin.
    for name, damage in {'index.npy': lambda c: np.save(c / 'index.npy', index + np.array([0, 0, 0, 2, 0]) * (index[:, 3:4] == 0)),
                         'names.bin': lambda c: (c / 'names.bin').write_bytes((c / 'names.bin').read_bytes().replace(b'03.jpg', b'03.jpf'))}.items():
        rc, out = verify(name.replace('.', '_'), damage)
        assert rc == 1 and out.out.startswith(f'failed: {tmp_path / name.replace(".", "_") / name} differs from the file '
                                              'packed (CRC32 mismatch)\n'), out.out
    # A changed CRC32 or offset in index.npy: the images are not checked against it (they named the sound shard).
    rc, out = verify('index_crc', lambda c: np.save(c / 'index.npy', index ^ np.array([0, 0, 0, 0, 1]) * (np.arange(6)[:, None] == 3)))
    assert rc == 1 and out.out.splitlines()[1:] == [
        f'pack {tmp_path / "index_crc"} FAILED verification: its 6 images not checked (index.npy says where they are and '
        'their CRC32s); files to copy again from the original pack: index.npy; then verify again (0 s)']
    # Many failed images: the first VERIFY_SHOWN named, the rest counted.
    monkeypatch.setattr(data, 'VERIFY_SHOWN', 1)
    rc, out = verify('lost_many', lambda c: os.remove(c / 'shard-00000.bin'))
    assert out.out.count('failed: entry') == 1 and '5 of 6 images (4 not named above)' in out.out
    # ... and only those named are kept (all of them took ~300 bytes an image: 1 GB for a 3.7M-image pack that fails).
    assert [f[:2] for f in data.verify_pack(tmp_path / 'lost_many', workers=1, log=_quiet)] == [
        ('shard-00000.bin', None), ('shard-00000.bin', 0)]
    # A damage that keeps the pack from opening: the one line of PackReader, exit status 2.
    with pytest.raises(SystemExit) as exit:
        verify('no_index', lambda c: os.remove(c / 'index.npy'))
    assert exit.value.code == 2 and re.search(r'index\.npy is missing; delete the folder and pack again \(a copy: copy it '
                                              r'again from the original pack\)', capsys.readouterr().err)
    # An unfinished pack is no damaged copy: the line that says to finish it, alone. --workers 0: refused, as for pack.
    for name, damage, workers, said in (('unfinished', lambda c: os.remove(c / 'complete.json'), '1', 'is incomplete'),
                                        ('workers_0', lambda c: None, '0', '--workers 0: give 1')):
        with pytest.raises(SystemExit) as exit:
            verify(name, damage, workers)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and said in err and 'a copy' not in err, err
    # One that a `pack` still writes (holds its lock: here this process, on another open file) is to be waited
    # for: its command run again would be refused ("being written by"). Before, verify said to run it again,
    # and while the pack listed its images (the folder holds only its lock), that the folder is no pack.
    writer = f'pid {os.getpid()} on {socket.gethostname()}'
    (tmp_path / 'starting').mkdir()
    for name, said in (('unfinished', f'is incomplete and still being written by {writer} (6 of 6 images packed '
                                      'so far): wait for that `data.py pack` to finish'),
                       ('starting', f'is being started by {writer} (listing its images or laying out its files): '
                                    'wait for that `data.py pack` to finish')):
        lock, _ = data.exclusive_lock(tmp_path / name / 'lock')
        try:
            with pytest.raises(SystemExit) as exit:
                data.main(['verify', str(tmp_path / name)])
        finally:
            lock.close()
        err = capsys.readouterr().err
        assert exit.value.code == 2 and f'pack {tmp_path / name} {said}' in err and 'again' not in err, err
    # Stopped before its first progress.json (the lock, say, or names.bin too): the command to run again.
    for files in (['lock'], ['lock', 'names.bin']):
        for f in files:
            (tmp_path / 'starting' / f).touch()
        with pytest.raises(SystemExit) as exit:
            data.main(['verify', str(tmp_path / 'starting')])
        assert 'stopped before it recorded its progress (progress.json); run that command again' in capsys.readouterr().err
    # ... and run again it packs there: the files of the stopped start go (a shard and bad image reasons of
    # another listing, say), and the pack is the one made in a new folder, file for file.
    (tmp_path / 'starting' / 'shard-00007.bin').write_bytes(b'x')
    (tmp_path / 'starting' / 'bad.jsonl').write_text('{"index": 0, "reason": "of another listing"}\n')
    assert data.pack_images([root], tmp_path / 'starting', short_side=32, workers=1, log=_quiet)['total'] == 6
    assert data.verify_pack(tmp_path / 'starting', workers=1, log=_quiet) == []
    assert sorted(os.listdir(tmp_path / 'starting')) == sorted(os.listdir(pack))
    for name in ('names.bin', 'bad.jsonl', 'shard-00000.bin'):
        assert (tmp_path / 'starting' / name).read_bytes() == (pack / name).read_bytes(), name
    # A pack of format version 1: no checksums; each stored image decodes (one without its JPEG start does not).
    old = _as_format_1(pack, tmp_path / 'old')
    failed = data.verify_pack(old, workers=1, log=_quiet)
    _flip_byte(old, 2, at=0, mask=0xff)  # FF D8 -> 00 D8: not an image
    lines = []
    assert failed == [] and [f[:2] for f in data.verify_pack(old, workers=1, log=lines.append)] == [('shard-00000.bin', 2)]
    assert lines[0].startswith(f'failed: entry 2 ({sources[2]}) in shard-00000.bin: not an image')
    assert lines[1].startswith(f'pack {old} FAILED verification: 1 of 6 images;')
    _flip_byte(old, 2, at=0, mask=0xff)
    lines.clear()
    assert data.verify_pack(old, workers=1, log=lines.append, log_every=0) == []
    assert lines[0] == 'verify: 6/6 images (100.0%), ' + lines[0].split(', ')[1] + ', ETA 0 s, 0 failed'
    assert lines[1] == (f'pack {old} has no checksums (format version 1, packed before CRC32s): its shard sizes match '
                        'and all 5 stored images of 6 decode; a changed byte that still decodes goes unseen (pack '
                        'again for CRC32s) (0 s)')


def test_a_pack_shard_truncated_while_training_reads_it_is_a_bad_image_not_sigbus(tmp_path):
    # The shards were memory-mapped: once one was cut short under a running job (by hand, a sync tool, a
    # network file system), reading an image past its new end killed the process with SIGBUS: no message, no
    # count (and a loader process's death a traceback). Read with pread, it is an unreadable image, counted.
    _, pack = _pack_of_jpegs(tmp_path, 6, size=(60, 80), short_side=48)
    script = textwrap.dedent(f'''
        import os, sys
        sys.path.insert(0, {str(HERE)!r})
        import data
        paths = data.pack_paths({str(pack)!r})
        images = data.ColorImages(paths, 32, (32, 32), train=False)
        assert images[(0, 0)][1] == images[(5, 0)][1] == data.STATUS_OK  # its shard opened (mapped) by the run
        os.truncate({str(pack / 'shard-00000.bin')!r}, 100)
        print('status:', images[(5, 0)][1] == data.STATUS_BAD)  # zeros with status bad, counted as unreadable
        reader, i = data.packed_entry(paths[5])
        try:
            reader.load_rgb(i)
        except data.BadImage as e:
            print('bad:', e)
    ''')
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert re.search(r'bad: \S+05\.jpg: shard-00000\.bin ends before its bytes \(the shard was truncated or '
                     r'replaced since packing: pack again\); in its packed copy, entry 5 of ', done.stdout), done.stdout
    assert 'status: True' in done.stdout


def test_a_damaged_pack_is_refused_in_one_line_and_a_lost_reason_is_not_fatal(tmp_path):
    # A pack cut short or bit-flipped (an interrupted copy, a bad disk) gave tracebacks (a names-offsets.npy
    # missing, an empty index.npy, a shard number out of range in a loader process) or, worse, ran on:
    # a truncated names.bin gave images empty or cut names (and so other class folders), an unknown status
    # trained as ok. Now each is refused when the pack is opened, naming the file; a lost bad.jsonl only
    # loses the reasons of the bad images.
    root, pack = _pack_of_jpegs(tmp_path, 4, empty=['zz.jpg'])  # zz.jpg: entry 4, bad
    n_names = (pack / 'names.bin').stat().st_size
    shard = (pack / 'shard-00000.bin').stat().st_size

    def damaged(name, damage):
        copy = tmp_path / name
        shutil.copytree(pack, copy)
        damage(copy)
        return copy

    def set_entry(row, column, value):
        def damage(copy):
            index = np.load(copy / 'index.npy', mmap_mode='r+')
            index[row, column] = value
            index.flush()
        return damage

    def set_offset(row, value):
        def damage(copy):
            offsets = np.load(copy / 'names-offsets.npy', mmap_mode='r+')
            offsets[row] = value
            offsets.flush()
        return damage

    cases = {
        'names_cut': (lambda c: os.truncate(c / 'names.bin', n_names - 3), f'names.bin holds {n_names - 3} bytes, '
                      f'{n_names} expected'),
        'names_longer': (lambda c: open(c / 'names.bin', 'ab').write(b'xy'), f'names.bin holds {n_names + 2} bytes, '
                         f'{n_names} expected'),
        'offsets_shifted': (set_offset(0, 1), 'names-offsets.npy starts at 1, not 0'),
        'offsets_backwards': (set_offset(2, 0), 'the name offsets in names-offsets.npy go backwards'),
        'offsets_lost': (lambda c: os.remove(c / 'names-offsets.npy'), 'names-offsets.npy is missing'),
        'names_lost': (lambda c: os.remove(c / 'names.bin'), r'names\.bin is missing'),  # was "holds None bytes"
        'shard_lost': (lambda c: os.remove(c / 'shard-00000.bin'), r'shard-00000\.bin is missing'),
        'shard_cut': (lambda c: os.truncate(c / 'shard-00000.bin', 5), f'shard-00000.bin holds 5 bytes, {shard} expected'),
        'index_lost': (lambda c: os.remove(c / 'index.npy'), 'index.npy is missing'),
        'index_empty': (lambda c: os.truncate(c / 'index.npy', 0), 'index.npy cannot be read'),
        'status_unknown': (set_entry(1, 3, 7), r'entry 1 of index.npy \(shard, offset, length, status\) is \(0, \d+, \d+, 7\)'),
        'past_the_shard': (set_entry(2, 1, shard), 'entry 2 of index.npy'),
        'no_such_shard': (set_entry(3, 0, 1), r'entry 3 of index.npy \(shard, offset, length, status\) is \(1,'),
        'far_shard': (set_entry(3, 0, 9), r'entry 3 of index.npy \(shard, offset, length, status\) is \(9,'),
        'bad_with_bytes': (set_entry(0, 3, data.STATUS_BAD), 'entry 0 of index.npy'),
        'complete_a_list': (lambda c: (c / 'complete.json').write_text('[1]'), 'holds a JSON list'),
        'complete_no_params': (lambda c: (c / 'complete.json').write_text(json.dumps(
            {k: v for k, v in json.loads((c / 'complete.json').read_text()).items() if k != 'params'})),
            r'complete\.json lacks its parameters'),
        'complete_cut': (lambda c: os.truncate(c / 'complete.json', 10), r'complete\.json is not valid JSON \('),
        'complete_no_shards': (lambda c: (c / 'complete.json').write_text(json.dumps(
            {k: v for k, v in json.loads((c / 'complete.json').read_text()).items() if k != 'shards'})),
            r'complete\.json lacks its image count or shard lengths'),
        'complete_count_text': (lambda c: (c / 'complete.json').write_text(json.dumps(
            {**json.loads((c / 'complete.json').read_text()), 'total': '5'})), 'lacks its image count'),
        'index_a_row_short': (lambda c: np.save(c / 'index.npy', np.load(pack / 'index.npy')[:4]),  # 5 images
                              r'complete\.json says 5 images, but index\.npy has shape \(4, 5\) \(int64\) and '
                              r'names-offsets\.npy \(6,\) \(int64\)'),
    }
    for name, (damage, message) in cases.items():
        with pytest.raises(ValueError, match=message) as err:
            data.find_images(damaged(name, damage), log=_quiet)
        assert 'delete the' in str(err.value) and 'pack again' in str(err.value), name
    # `pack` run again into a damaged complete pack says so too (a complete.json without its params was a KeyError).
    with pytest.raises(ValueError, match=r'complete\.json lacks its parameters'):
        data.pack_images([root], tmp_path / 'complete_no_params', short_side=32, workers=1, log=_quiet)
    # Damage past the checks' reach still reads: a lost bad.jsonl, a cut one.
    for name, damage in {'bad_lost': lambda c: os.remove(c / 'bad.jsonl'),
                         'bad_cut': lambda c: os.truncate(c / 'bad.jsonl', 9)}.items():
        paths = data.find_images(damaged(name, damage), log=_quiet)
        with pytest.raises(data.BadImage, match=r'zz\.jpg: unreadable when packed \(the reason is missing from '
                                                r'bad\.jsonl\); recorded when packing'):
            data.load_rgb(paths[4])
        assert data.load_rgb(paths[0]).shape == (32, 40, 3)
    data._OPEN_PACKS.clear()


def test_a_pack_damaged_after_the_run_listed_it_gives_bad_images_not_a_traceback(tmp_path, capsys):
    # A loader process opens the pack afresh: once it was cut short (or made again) after the run listed it, the
    # ValueError of opening it came out of the worker as a traceback; now each image is a counted bad image.
    _, pack = _pack_of_jpegs(tmp_path, 2)
    images = data.ColorImages(data.pack_paths(pack), 32, (32, 32), train=False)
    # A shard removed after the process checked the pack, before its first read of it (the pack being made
    # again): opening it was a FileNotFoundError traceback out of the loader process.
    data._OPEN_PACKS.clear()
    data.packed_entry(images.path(0))  # opened and checked; the shards are opened on first read
    os.rename(pack / 'shard-00000.bin', pack / 'away.bin')
    capsys.readouterr()
    assert images[(0, 0)][1] == data.STATUS_BAD
    assert re.search(r'warning: bad image \S+00\.jpg \(cannot read shard-00000\.bin \(No such file or directory\)',
                     capsys.readouterr().err)
    os.rename(pack / 'away.bin', pack / 'shard-00000.bin')
    os.truncate(pack / 'names.bin', 10)
    data._OPEN_PACKS.clear()  # as in a loader process that opens the pack now
    capsys.readouterr()
    assert images[(1, 0)][1] == data.STATUS_BAD
    assert re.search(r'warning: bad image \S+01\.jpg \(pack \S+ is damaged: \S+names\.bin holds 10 bytes',
                     capsys.readouterr().err)
    data._OPEN_PACKS.clear()


def test_a_damaged_unfinished_pack_is_one_line_when_packing_goes_on(tmp_path):
    # An unfinished pack copied in part, or its progress.json edited, gave tracebacks when `pack` went on
    # (KeyError, FileNotFoundError) or numpy's words alone ('EOF: reading array header').
    root, pack = _pack_of_jpegs(tmp_path, 3)
    os.remove(pack / 'complete.json')  # killed between its last commit and complete.json
    progress = json.loads((pack / 'progress.json').read_text())
    cases = {'no_params': (lambda c: (c / 'progress.json').write_text(json.dumps(
                 {k: v for k, v in progress.items() if k != 'params'})), r'progress\.json is damaged \(its params\)'),
             'done_text': (lambda c: (c / 'progress.json').write_text(json.dumps({**progress, 'done': '2'})),
                           r'progress\.json is damaged \(its done\)'),
             'index_lost': (lambda c: os.remove(c / 'index.npy'), r'is damaged \(.*No such file.*index\.npy'),
             'index_cut': (lambda c: os.truncate(c / 'index.npy', 100), 'is damaged'),
             'names_cut': (lambda c: os.truncate(c / 'names.bin', 10), r'names\.bin holds 10 bytes'),
             'names_longer': (lambda c: open(c / 'names.bin', 'ab').write(b'extra'),  # garbage after the last name
                              rf'names\.bin holds {os.path.getsize(pack / "names.bin") + 5} bytes, '
                              rf'{os.path.getsize(pack / "names.bin")} expected'),
             'shard_lost': (lambda c: os.remove(c / 'shard-00000.bin'), r'shard-00000\.bin is missing \(by progress'),
             'counts_short': (lambda c: (c / 'progress.json').write_text(json.dumps({**progress, 'counts': [3]})),
                              r'progress\.json is damaged \(its done, shards, counts\)'),
             'index_other_shape': (lambda c: np.save(c / 'index.npy', np.zeros((2, 4), np.int64)),
                                   r'index\.npy has shape \(2, 4\), names-offsets\.npy \(4,\); progress\.json says 3 images')}
    for name, (damage, message) in cases.items():
        copy = tmp_path / name
        shutil.copytree(pack, copy)
        damage(copy)
        with pytest.raises(ValueError, match=message) as err:
            data.pack_images([root], copy, short_side=32, workers=1, log=_quiet)
        assert f'delete {copy} and pack again' in str(err.value), name
    # Listed for training (not packed), an unfinished pack with a damaged progress.json says so too: where the
    # line says how far packing got, a field missing was a KeyError traceback, and a count edited to text the
    # words "Cannot specify ',' with 's'."
    with pytest.raises(ValueError, match=r'progress\.json is damaged \(its done\): delete \S+ and pack again'):
        data.find_images(tmp_path / 'done_text', log=_quiet)
    data.pack_images([root], pack, short_side=32, workers=1, log=_quiet)  # undamaged: finishes
    assert (pack / 'complete.json').exists()


def test_an_empty_or_hand_edited_checkpoint_is_one_line(tmp_path, capsys):
    # An empty checkpoint (a copy that failed, `touch`) made an IndexError traceback in the error handler itself
    # (torch.load's message is empty), in all three entry points; a "config", "model", "args" or "step" of
    # another type (edited by hand, another program's file) made AttributeError or TypeError tracebacks.
    empty = tmp_path / 'empty.pt'
    empty.write_bytes(b'')
    with pytest.raises(colorize.UserError, match=r'^checkpoint \S+empty\.pt is an empty file \(0 bytes\); is it '):
        colorize.load_checkpoint(empty)
    with pytest.raises(colorize.UserError, match=r'^--init \S+empty\.pt is an empty file \(0 bytes\)'):
        ft.read_weights(empty)
    good = {'model': {'w': torch.zeros(1)}, 'config': {'arch': 'alexnet'}, 'args': {}, 'step': 3}
    for edit, message in [({'config': 'alexnet'}, '"config" is str .alexnet., not a dict'),
                          ({'model': [torch.zeros(1)]}, '"model" is list, not a dict'),
                          ({'args': None}, '"args" is NoneType None, not a dict'),
                          ({'step': '3'}, '"step" is str .3., not an int'),
                          ({'step': True}, '"step" is bool True, not an int'),  # a bool is an int to isinstance
                          ({'model': {'w': 1.0}}, '"model" holds other things than tensors')]:
        torch.save({**good, **edit}, tmp_path / 'edited.pt')
        with pytest.raises(colorize.UserError, match=r'^\S+edited\.pt is not a checkpoint as the scripts write '
                                                     r'them: ' + message):
            colorize.load_checkpoint(tmp_path / 'edited.pt')
    torch.save(good, tmp_path / 'good.pt')
    assert colorize.load_checkpoint(tmp_path / 'good.pt')['step'] == 3
    torch.save({**good, 'config': 'alexnet'}, tmp_path / 'edited.pt')
    args = argparse.Namespace(init=str(tmp_path / 'edited.pt'), arch=None, width=None, fc_dim=None, seed=0)
    with pytest.raises(colorize.UserError, match=r'^--init \S+edited\.pt is not a checkpoint as colorize\.py '
                                                 r'writes them: "config" is str'):
        ft.initial_trunk(args)
    # Resumed without its training state (a copy stripped to its weights, or a field edited to null): a KeyError,
    # TypeError or AttributeError traceback before; now the line that says it cannot be continued.
    run = tmp_path / 'run'
    run.mkdir()
    state = dict(good, optimizer={}, data={}, rng={})
    for field in ('rng', 'optimizer', 'data'):
        for edit in ({field: None}, {k: v for k, v in state.items() if k != field}):
            torch.save({**state, **edit} if field in edit else edit, run / 'checkpoint.pt')
            assert colorize.main(['--out', str(run), '--resume', '--device', 'cpu']) == 2
            assert 'is a colorize.py checkpoint without its training state' in capsys.readouterr().err, field
    torch.save(dict(good, config={'objective': 'voc-cls'}, optimizer=None), run / 'checkpoint.pt')
    with pytest.raises(colorize.UserError, match=r'finetune_voc\.py checkpoint without its training state \(its '
                                                 r'optimizer\): it cannot be continued'):
        ft.read_resume(argparse.Namespace(out=run, resume='auto'))


def test_a_checkpoint_path_that_is_a_fifo_or_device_is_named_as_such(folders, tmp_path, capsys):
    # A FIFO at checkpoint.pt (or /dev/zero as --init) was reported as missing: "does not exist", right after a
    # fresh run had been refused because that checkpoint.pt exists.
    train, val = folders
    out = tmp_path / 'run'
    out.mkdir()
    os.mkfifo(out / 'checkpoint.pt')
    assert colorize.main(tiny_args(train, val, out, '--resume')) == 2
    assert capsys.readouterr().err.strip() == (f'error: checkpoint {out / "checkpoint.pt"} is not a regular file (a '
                                               f'named pipe, a device, ...): pass a checkpoint file')
    assert ft.main(['--resume', str(out / 'checkpoint.pt'), '--device', 'cpu']) == 2
    assert 'is not a regular file' in capsys.readouterr().err
    assert ft.main(['--task', 'cls', '--init', os.devnull, '--device', 'cpu', '--out', str(tmp_path / 'ft')]) == 2
    assert capsys.readouterr().err.strip() == (f'error: --init {os.devnull} is not a regular file (a named pipe, a '
                                               f'device, ...): pass a checkpoint file')


def test_a_run_folder_removed_while_training_is_not_made_anew(folders, voc, tmp_path, monkeypatch, capsys):
    # The next checkpoint (and sample grid) made the folder anew: a folder holding checkpoint.pt and samples/
    # but no log.jsonl (its lines went to the deleted file), run.json or lock, as if it were a whole run.
    train, val = folders
    out = tmp_path / 'run'
    real_step = colorize.train_step

    def step_then_remove(*args, **kwargs):
        result = real_step(*args, **kwargs)
        shutil.rmtree(out, ignore_errors=True)
        return result
    monkeypatch.setattr(colorize, 'train_step', step_then_remove)
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--save-every', '2', '--eval-every', '2')) == 2
    assert capsys.readouterr().err.strip() == (
        f'error: {out / "log.jsonl"} was deleted or replaced while the run was training (its folder removed or '
        f'moved?): stopped rather than write checkpoints into a folder without the run\'s log; if the folder was '
        f'moved back, continue it with --resume --out {out}, else start afresh')
    assert not out.exists()
    # An evaluation between checkpoints (--eval-every 1, --save-every 4) would write its sample grid into
    # the folder made anew before the next checkpoint finds the log gone: it stops at that evaluation.
    # Removed once, after the first step.
    calls = []

    def step_then_remove_once(*args, **kwargs):
        result = real_step(*args, **kwargs)
        if not calls:
            shutil.rmtree(out, ignore_errors=True)
        calls.append(1)
        return result
    monkeypatch.setattr(colorize, 'train_step', step_then_remove_once)
    assert colorize.main(tiny_args(train, val, out, '--steps', '4', '--save-every', '4', '--eval-every', '1')) == 2
    assert 'was deleted or replaced while the run was training' in capsys.readouterr().err
    assert not out.exists() and len(calls) == 1
    # finetune_voc.py likewise.
    ft_out = tmp_path / 'ft'
    real_loss = ft.train_loss

    def loss_then_remove(*args, **kwargs):
        shutil.rmtree(ft_out, ignore_errors=True)
        return real_loss(*args, **kwargs)
    monkeypatch.setattr(ft, 'train_loss', loss_then_remove)
    assert ft.main(['--voc-root', voc, '--out', str(ft_out), *RESUME_BASE]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'error: {ft_out / "log.jsonl"} was deleted or replaced while the run was training')
    assert err.endswith(f'continue it with --resume --out {ft_out}, else start afresh') and not ft_out.exists()


def test_log_gone_says_so_instead_of_raising_when_the_log_cannot_be_stat(tmp_path, monkeypatch):
    # Under DDP rank 0 calls log_gone right before the broadcast that the other ranks already wait in: an
    # exception there on rank 0 alone (a file now where the run folder was: ENOTDIR; an NFS folder removed:
    # ESTALE) would leave them waiting, so every failure to find the log is the one-line problem.
    out = tmp_path / 'run'
    out.mkdir()
    with open(out / 'log.jsonl', 'w') as log:
        assert colorize.log_gone(log, out / 'log.jsonl') is None
        shutil.rmtree(out)
        out.write_text('a file where the run folder was')
        assert 'was deleted or replaced while the run was training' in colorize.log_gone(log, out / 'log.jsonl')

        def stale(*args, **kwargs):
            raise OSError(errno.ESTALE, 'Stale file handle')
        with monkeypatch.context() as m:  # os.fstat for all: pytest >= 9.2 calls it too, in capture
            m.setattr(colorize.os, 'fstat', stale)
            assert 'was deleted or replaced while the run was training' in colorize.log_gone(log, out / 'log.jsonl')


def test_a_fork_whose_log_copy_fails_leaves_no_partial_log(folders, tmp_path, monkeypatch, capsys):
    # --resume CKPT --out NEW copied log.jsonl and run.json with shutil.copyfile: a full disk (or a kill) left a
    # partial NEW/log.jsonl, which the next --resume then kept (it copies only into a NEW without one), and the
    # error named no file.
    train, val = folders
    run, fork = tmp_path / 'run', tmp_path / 'fork'
    assert colorize.main(tiny_args(train, val, run, '--steps', '4')) == 0
    whole = (run / 'log.jsonl').read_bytes()
    argv = tiny_args(train, val, fork, '--steps', '6', '--resume', str(run / 'checkpoint.pt'))
    with monkeypatch.context() as m:
        _disk_fills_for(m, str(fork / 'log.jsonl'), room=10)
        assert colorize.main(argv) == 2
    assert f'error: {fork / "log.jsonl"}: No space left on device' in capsys.readouterr().err
    assert not (fork / 'log.jsonl').exists()
    assert colorize.main(argv) == 0
    assert (fork / 'log.jsonl').read_bytes().startswith(whole.split(b'\n')[0])
    assert [json.loads(line)['step'] for line in (fork / 'log.jsonl').read_text().splitlines()
            if 'eval' not in line] == [2, 4, 6]


def test_an_io_error_while_saving_is_one_line(tmp_path):
    # EIO (a failing disk, a network mount gone) while writing a checkpoint came out as a traceback.
    path = tmp_path / 'checkpoint.pt'
    colorize.atomic_save({'w': torch.zeros(3)}, path)

    def failing(f):
        f.write(b'half')
        raise OSError(errno.EIO, 'Input/output error')
    with pytest.raises(OSError) as caught:
        data.atomic_write(path, failing)
    assert colorize.error_text(caught.value) == (f'{path}: Input/output error (writing it; what was there before '
                                                 f'is unchanged) (the storage failed, a disk error or a network '
                                                 f'mount gone: check it)')
    assert torch.equal(_state(path)['w'], torch.zeros(3)) and os.listdir(tmp_path) == ['checkpoint.pt']
