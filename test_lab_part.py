import math

import pytest
import torch

import lab


# --- lab.py: colour conversion ------------------------------------------------------------------

# Published CIE L*a*b* (D65, 2 degree observer) of the sRGB primaries, secondaries, white and a
# gray (Lindbloom's / EasyRGB's calculators give the same values to 4 decimals).
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


def test_round_trip_all_8bit_colours_float64():
    v = torch.arange(256, dtype=torch.float64) / 255
    g, b = torch.meshgrid(v, v, indexing='ij')
    worst = 0.0
    for r in range(0, 256, 1):  # 256 slices of 65,536 colours: all 16.7M
        rgb = torch.stack([torch.full_like(g, r / 255), g, b], 0)
        back = lab.lab_to_rgb(lab.rgb_to_lab(rgb), clip=False)
        worst = max(worst, (back - rgb).abs().max().item())
    assert worst < 1e-4


def test_lab_to_rgb_clips_unless_asked():
    out_of_gamut = _pixels([(50.0, 120.0, 0.0)])
    assert lab.lab_to_rgb(out_of_gamut).min() >= 0 and lab.lab_to_rgb(out_of_gamut).max() <= 1
    raw = lab.lab_to_rgb(out_of_gamut, clip=False)
    assert raw.min() < 0 or raw.max() > 1


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


def test_lch_round_trip_and_ranges():
    lab_ = _pixels([(50, 10, 0), (50, 0, 10), (50, -10, 0), (50, 0, -10), (50, 3, 4)])
    lch = lab.lab_to_lch(lab_)
    torch.testing.assert_close(lch[1, :, 0], torch.tensor([10, 10, 10, 10, 5.0], dtype=torch.float64))
    want_h = torch.tensor([0, math.pi / 2, math.pi, 3 * math.pi / 2, math.atan2(4, 3)], dtype=torch.float64)
    torch.testing.assert_close(lch[2, :, 0], want_h)
    torch.testing.assert_close(lab.lch_to_lab(lch), lab_)


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
    c = torch.tensor([0.0, 3.99, 4.01, 127.9, 128.0, 300.0])
    assert lab.chroma_bin(c).tolist() == [0, 0, 1, 31, 31, 31]


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


def test_target_window_must_be_odd():
    with pytest.raises(ValueError, match='odd'):
        lab.make_targets('huechroma', _uniform_lab(1, 8, 8, 50, 0, 0), torch.zeros(1, 1, 2, dtype=torch.long), 4)


def test_ab_gamut_cells_are_reached_by_srgb():
    centres, lookup, offset = lab.ab_gamut()
    # primaries' ab fall in a gamut cell; a far-out colour does not
    for rgb, (L, a, b) in SRGB_LAB_TABLE:
        assert lookup[round(a / 10) + offset, round(b / 10) + offset] >= 0
    assert lookup[offset + 12, offset + 12] == -1  # (a, b) = (120, 120) is beyond sRGB
    assert lookup[offset, offset] >= 0 and 200 < len(centres) < 400
    assert lab.output_dim('ab') == len(centres)


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


def test_invalid_images_do_not_count():
    t = dict(ab=torch.zeros(2, 4, 2), lightness=torch.full((2, 4), 0.5))
    logits = torch.zeros(2, 4, 2)
    logits[1] = 10.0  # a wildly wrong prediction on an image marked invalid
    total, _ = lab.color_loss('l2', logits, t, valid=torch.tensor([1, 0]))
    assert total.item() == 0.0
    total, _ = lab.color_loss('l2', logits, t, valid=torch.tensor([0, 1]))
    assert total.item() == pytest.approx(200.0)  # (10^2 + 10^2) per point, mean over 4 points


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
        # within one bin: chroma bin width 4, plus the hue half-bin arc at that chroma
        got_c, got_h = torch.hypot(ab[:, 0], ab[:, 1]), torch.atan2(ab[:, 1], ab[:, 0]) % (2 * math.pi)
        assert ((got_c - c).abs() <= 128 / 32).all()
        dh = torch.remainder(got_h - h + math.pi, 2 * math.pi) - math.pi
        assert (dh.abs() <= 2 * math.pi / 32).all()
    elif kind == 'ab':
        assert (err <= 10.0).all()
    else:
        assert err.max() < 1e-4


def test_decode_dense_layout_and_hue_fading():
    logits = torch.zeros(1, 64, 2, 3)  # (B, D, h, w): uniform hue histogram -> R = 0 -> gray
    ab = lab.decode('huechroma', logits, dim=1)
    assert ab.shape == (1, 2, 2, 3)
    assert ab.abs().max() < 1e-4


def test_histogram_median_by_hand():
    p = torch.tensor([[0.1, 0.2, 0.4, 0.3], [0.0, 0.0, 1.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    # row 0: cdf 0.1, 0.3, 0.7 -> crosses in bin 2 at (0.5 - 0.3) / 0.4 = 0.5 -> 2.5
    # row 1: all mass in bin 2 -> 2.5; row 2: cdf hits 0.5 exactly at the end of bin 0 -> 1.0
    torch.testing.assert_close(lab.histogram_median(p), torch.tensor([2.5, 2.5, 1.0]))
