"""Colour maths for colorization: sRGB <-> CIE L*a*b* <-> LCh, the binned targets, the losses, decoding.

Hand-written in torch (no colour library): sRGB per IEC 61966-2-1 with the D65 white point,
CIE 1976 L*a*b*, and the hue/chroma (LCh_ab) histograms of Larsson et al. (CVPR 2017). Every
function works on any device, is differentiable where it makes sense, and computes in float32
even under autocast (float64 stays float64). This file imports only torch and math: copy it.

Shapes: images are (..., 3, H, W) with channels in dim -3; sampled pixels are (B, P, 2) integer
(y, x) coordinates; network outputs at sampled pixels are (B, P, D).

    import torch
    import torch.nn.functional as F
    import lab
    rgb = torch.rand(2, 3, 64, 64)                       # sRGB in [0, 1], (B, 3, H, W)
    lab_img = lab.rgb_to_lab(rgb)                        # L in [0, 100], a and b within about +-110
    x = lab.lightness_input(lab_img)                     # the network input (B, 1, H, W), about zero mean
    points = torch.randint(8, 56, (2, 16, 2))            # (B, P, 2) sampled pixels (y, x)
    t = lab.make_targets('huechroma', lab_img, points)   # 7x7-window histograms at those pixels
    logits = torch.randn(2, 16, lab.output_dim('huechroma'), requires_grad=True)  # a network's (B, P, D)
    total, parts = lab.color_loss('huechroma', logits, t)
    total.backward()
    ab = lab.decode('huechroma', logits.detach())        # (B, P, 2) predicted (a, b) in Lab units
    # A whole photo: decode a dense (B, D, h, w) prediction, upsample the colour only, keep the input's L.
    dense = torch.randn(2, lab.output_dim('huechroma'), 16, 16)
    ab_map = F.interpolate(lab.decode('huechroma', dense, dim=1), size=(64, 64), mode='bilinear')
    colour = lab.lab_to_rgb(torch.cat([lab_img[:, :1], ab_map], 1))  # (B, 3, H, W) in [0, 1]

Used by colorize.py (pre-training, colorizing) and finetune_voc.py (L*a*b* input).
"""
import math

import torch
import torch.nn.functional as F

# --- Constants: the one home of every number below. ------------------------------------------

WHITE_D65 = (0.95047, 1.0, 1.08883)  # XYZ of the reference white, Y = 1
RGB_TO_XYZ = (  # linear sRGB (D65) -> XYZ, IEC 61966-2-1
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
LAB_DELTA = 6.0 / 29.0  # CIE delta: f is a cube root above LAB_DELTA^3, f^-1 a cube above LAB_DELTA
LAB_EPSILON = LAB_DELTA ** 3  # f(t) switches from cube root to the linear segment here
LAB_KAPPA = 3.0 * LAB_DELTA ** 2  # slope denominator of the linear segment: t / KAPPA + 4/29

L_CENTER, L_SCALE = 50.0, 50.0  # network input: (L - 50) / 50, L in [0, 100] -> [-1, 1]
AB_SCALE = 50.0  # a*, b* fed as input (finetune --input lab) are divided by this
GRAY_SRGB8 = 119  # 8-bit sRGB grey nearest L* = 50 (50.03, a* = b* = 0): pads to a network input of ~0

HUE_BINS = 32  # uniform on the circle, bin k covers [k, k+1) * 2 pi / 32
CHROMA_BINS = 32  # uniform on [0, CHROMA_MAX], chroma above goes to the last bin
CHROMA_MAX = 128.0  # Lab units
GREY_CHROMA = 1e-3  # below this chroma a colour is grey, without hue (the least non-grey 8-bit sRGB chroma is 0.28)
HUE_WEIGHT = 5.0  # lambda_H in front of the chroma-weighted hue KL term
HUE_FADE_R = 0.96  # decoding: chroma *= min(R / 0.96, 1), R = hue histogram resultant length
AB_GRID = 10.0  # joint ab histogram: cell size in Lab units, cell centres at multiples of 10
AB_OFFSET = math.ceil(130 / AB_GRID)  # grid cells each side of ab = 0 (sRGB's |a|, |b| < 130)
AB_SIGMA = 5.0  # joint ab histogram: Gaussian soft assignment to neighbouring cells
AB_TEMPERATURE = 0.38  # joint ab decoding: annealed mean temperature (Zhang et al. 2016)
L2_SCALE = 128.0  # l2 loss regresses (a, b) / L2_SCALE
LOSSES = ('huechroma', 'l2', 'ab')


def _inverse3(m):
    """Inverse of a 3x3 matrix given as nested tuples, in Python floats (exact to double precision)."""
    (a, b, c), (d, e, f), (g, h, i) = m
    det = a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)
    return (
        ((e * i - f * h) / det, (c * h - b * i) / det, (b * f - c * e) / det),
        ((f * g - d * i) / det, (a * i - c * g) / det, (c * d - a * f) / det),
        ((d * h - e * g) / det, (b * g - a * h) / det, (a * e - b * d) / det),
    )


XYZ_TO_RGB = _inverse3(RGB_TO_XYZ)


# --- sRGB <-> Lab ------------------------------------------------------------------------------

def _float(x):
    """float64 stays float64; everything else (uint8, half, bfloat16, float32) becomes float32."""
    return x if x.dtype == torch.float64 else x.float()


def _image(x, name, space, channels=3):
    """Check that x is an image (..., C, H, W) with `channels` channels in dim -3 (None: any) and a
    dtype that `space` ('sRGB', 'L*a*b*', 'LCh') can be read from; raise a ValueError saying what to do."""
    if x.dim() < 3 or (channels is not None and x.shape[-3] != channels):
        hint = (' (for N pixels in an (N, 3) tensor x, pass x.T.reshape(3, N, 1))' if x.dim() < 3 else
                ' (channels last? pass x.movedim(-1, -3))' if x.shape[-1] == 3 else '')
        raise ValueError(f'{name} expects {space} as (..., {channels or "C"}, H, W), channels in dim -3; '
                         f'got shape {tuple(x.shape)}{hint}')
    if space == 'sRGB' and not (x.is_floating_point() or x.dtype == torch.uint8):
        raise ValueError(f'{name} reads uint8 as 8-bit levels (/ 255) and floating point as [0, 1]; got {x.dtype}: '
                         'convert it first (x.float() / 255 for 8-bit levels, / 65535 for 16-bit)')
    if space != 'sRGB' and (x.dtype in (torch.uint8, torch.bool) or x.is_complex()):
        raise ValueError(f'{name} expects {space} values in a floating-point tensor, got {x.dtype}'
                         + (": an 8-bit encoding (OpenCV's: L * 255 / 100, a + 128, b + 128)? Decode it to float first"
                            if x.dtype == torch.uint8 else ''))
    return x


def _no_autocast(x):
    """Autocast off on x's device, wherever torch has autocast (cuda, cpu, mps, xpu, ...)."""
    kind = x.device.type
    return torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else _Null()


class _Null:
    """A context manager that does nothing (contextlib.nullcontext, without a third import to copy along)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _matmul3(m, x, scale=(1.0, 1.0, 1.0)):
    """Apply a 3x3 matrix (nested tuples) to the channel dim -3 of x (..., 3, H, W), then divide
    output channel i by scale[i]. Python-float constants: no host-to-device copy (and sync) per call."""
    c0, c1, c2 = x.unbind(-3)
    return torch.stack([(r[0] * c0 + r[1] * c1 + r[2] * c2) / s for r, s in zip(m, scale)], dim=-3)


def srgb_to_linear(c):
    """Gamma-encoded sRGB in [0, 1] -> linear light in [0, 1], elementwise (any shape, the input's float
    dtype). Exact IEC 61966-2-1 piecewise curve; outside [0, 1] it goes on (linear below 0, the power above 1)."""
    # Clamp inside the power branch so that torch.where never differentiates a NaN.
    power = ((c.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4
    return torch.where(c > 0.04045, power, c / 12.92)


def linear_to_srgb(c):
    """Linear light -> gamma-encoded sRGB, elementwise (any shape, the input's float dtype); the exact
    inverse of srgb_to_linear, outside [0, 1] too."""
    power = 1.055 * c.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055
    return torch.where(c > 0.0031308, power, c * 12.92)


def _f(t):
    """CIE 1976 f(t) of XYZ / white (any shape): t^(1/3) above LAB_EPSILON, else t / LAB_KAPPA + 4/29.
    Clamped inside the cube root so that torch.where never differentiates t^(-2/3) at t <= 0."""
    return torch.where(t > LAB_EPSILON, t.clamp(min=LAB_EPSILON) ** (1.0 / 3.0), t / LAB_KAPPA + 4.0 / 29.0)


def _f_inv(t):
    """The exact inverse of _f (any shape): t^3 above LAB_DELTA (= f(LAB_EPSILON)), else LAB_KAPPA (t - 4/29)."""
    return torch.where(t > LAB_DELTA, t ** 3, LAB_KAPPA * (t - 4.0 / 29.0))


def rgb_to_lab(rgb):
    """sRGB (..., 3, H, W) in [0, 1] (gamma-encoded; uint8 is read as /255) -> L*a*b* (..., 3, H, W).

    L in [0, 100]; for inputs in [0, 1], a in [-86.2, 98.3] and b in [-107.9, 94.5]. Float64 gives
    float64; any other floating dtype (half and bfloat16 included) and uint8 give float32, also under
    autocast. Other integer dtypes raise a ValueError (8-bit levels in int64 would give L* = 9342 for white).
    White is (100, 0, 0) in float32; in float64 it is (100.000004, -1.7e-5, 6.7e-6), as the middle row of
    the 7-digit RGB_TO_XYZ sums to 1.0000001.
    """
    _image(rgb, 'rgb_to_lab', 'sRGB')
    with _no_autocast(rgb):
        x = _float(rgb) / 255.0 if rgb.dtype == torch.uint8 else _float(rgb)
        fx, fy, fz = _f(_matmul3(RGB_TO_XYZ, srgb_to_linear(x), scale=WHITE_D65)).unbind(-3)
        return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def lab_to_rgb(lab, clip=True):
    """L*a*b* (..., 3, H, W), L in [0, 100], a and b in Lab units -> gamma-encoded sRGB (..., 3, H, W),
    clipped to [0, 1] unless clip=False.

    Out-of-gamut colours (and L outside [0, 100]) give values outside [0, 1] when clip=False; a clipped
    channel has zero gradient. Float64 gives float64, other floating dtypes float32 (also under
    autocast); uint8 and bool raise a ValueError (uint8 cannot hold a signed a or b).
    """
    _image(lab, 'lab_to_rgb', 'L*a*b*')
    with _no_autocast(lab):
        lab = _float(lab)
        L, a, b = lab.unbind(-3)
        fy = (L + 16.0) / 116.0
        xyz = torch.stack([_f_inv(fy + a / 500.0) * WHITE_D65[0], _f_inv(fy) * WHITE_D65[1],
                           _f_inv(fy - b / 200.0) * WHITE_D65[2]], dim=-3)
        rgb = linear_to_srgb(_matmul3(XYZ_TO_RGB, xyz))
        return rgb.clamp(0.0, 1.0) if clip else rgb


def lab_to_lch(lab):
    """L*a*b* -> LCh_ab (..., 3, H, W): L unchanged, C = |ab| >= 0, h = atan2(b, a) in [0, 2 pi).

    A grey (C < GREY_CHROMA) has no hue: h = 0, whatever rounding left in a and b (up to 3.8e-5
    for 8-bit greys in float32 on a CPU, which would otherwise scatter over hue bins by the
    arithmetic of each device).
    At a = b = 0 the gradients are 0 (|ab| and atan2 have none there; autograd would give NaN); h has
    gradient 0 for a grey."""
    with _no_autocast(lab):
        L, a, b = _float(_image(lab, 'lab_to_lch', 'L*a*b*')).unbind(-3)
        zero_ab = (a == 0) & (b == 0)
        a = torch.where(zero_ab, torch.ones_like(a), a)  # any nonzero point: its values are replaced below
        zero = torch.zeros_like(a)
        C = torch.where(zero_ab, zero, torch.hypot(a, b))
        grey = C < GREY_CHROMA
        # atan2's backward takes 1 / (a^2 + b^2), inf for |ab| near 1e-20 in fp32 (1e-160 in fp64), and
        # 0 * inf = NaN passes the where below: a grey's atan2 sees (1, 0) instead.
        h = torch.atan2(torch.where(grey, zero, b), torch.where(grey, torch.ones_like(a), a))
        h = torch.remainder(h, 2 * math.pi)
        h = torch.where(grey | (h >= 2 * math.pi), zero, h)  # remainder(-1e-8, 2 pi) is 2 pi in fp32
        return torch.stack([L, C, h], dim=-3)


def lch_to_lab(lch):
    """LCh_ab (..., 3, H, W), C in Lab units, h in radians (any angle) -> L*a*b* (..., 3, H, W).
    Float32 (float64 for float64)."""
    with _no_autocast(lch):
        L, C, h = _float(_image(lch, 'lch_to_lab', 'LCh')).unbind(-3)
        return torch.stack([L, C * torch.cos(h), C * torch.sin(h)], dim=-3)


def lightness_input(lab):
    """The network input from L*a*b* (..., C, H, W) with L in channel 0: (L - 50) / 50 as (..., 1, H, W),
    L in [0, 100] -> [-1, 1]. Float32 (float64 for float64)."""
    return (_float(_image(lab, 'lightness_input', 'L*a*b*', channels=None)[..., :1, :, :]) - L_CENTER) / L_SCALE


def lab_input(lab):
    """Colour network input for transfer: ((L - 50) / 50, a / 50, b / 50), shape (..., 3, H, W); for sRGB
    colours a / 50 is in [-1.73, 1.97] and b / 50 in [-2.16, 1.89]. Float32 (float64 for float64)."""
    L, a, b = _float(_image(lab, 'lab_input', 'L*a*b*')).unbind(-3)
    return torch.stack([(L - L_CENTER) / L_SCALE, a / AB_SCALE, b / AB_SCALE], dim=-3)


# --- Bins and targets ---------------------------------------------------------------------------

def hue_bin(h):
    """Hue in radians, any shape -> int64 bin index in [0, HUE_BINS) of the same shape; any angle is
    taken modulo 2 pi (-0.1 is in the last bin)."""
    return torch.floor(h * (HUE_BINS / (2 * math.pi))).long().remainder(HUE_BINS)


def chroma_bin(c):
    """Chroma in Lab units, any shape -> int64 bin index in [0, CHROMA_BINS) of the same shape; chroma
    >= CHROMA_MAX lands in the last bin, below 0 in the first. NaN has no bin (the index is garbage)."""
    return torch.floor(c * (CHROMA_BINS / CHROMA_MAX)).clamp(0, CHROMA_BINS - 1).long()  # clamp first: inf


def hue_centers(dtype=torch.float32, device=None):
    """The hue bins' centre angles, (HUE_BINS,) in radians in (0, 2 pi)."""
    return (torch.arange(HUE_BINS, dtype=dtype, device=device) + 0.5) * (2 * math.pi / HUE_BINS)


_AB_GAMUT = {}  # computed once per process: the tables on the CPU, and a copy per device


def ab_gamut():
    """The joint ab classes: centres (Q, 2) of the AB_GRID cells that some 8-bit sRGB colour falls in.

    Every ab that the sRGB cube reaches is reached on its surface (the L-segment through a point of
    the projection ends on the surface), so enumerating the six faces at 8-bit steps is exact.
    Returns (centres (Q, 2) float32, lookup (G, G) int64 mapping a grid cell to its class or -1,
    offset): cell (i, j) has centre ((i - offset) * AB_GRID, (j - offset) * AB_GRID). The tensors
    are on the CPU and the caller's own (copies of the cached tables).
    """
    centres, lookup, _ = _gamut_tables()
    return centres.clone(), lookup.clone(), AB_OFFSET


# Built as normal tensors whatever mode the first call is in: decode('ab') multiplies by the cached
# centres, and autograd cannot save an inference-mode tensor for the backward.
@torch.inference_mode(False)
def _gamut_tables():
    """(centres, lookup, nearest) on the CPU, built on the first call (whatever the default device)."""
    if 'cpu' not in _AB_GAMUT:
        cpu = torch.device('cpu')
        v = torch.arange(256, dtype=torch.float64, device=cpu) / 255.0
        u, w = torch.meshgrid(v, v, indexing='ij')
        faces = []
        for axis in range(3):
            for side in (0.0, 1.0):
                chans = [u, w]
                chans.insert(axis, torch.full_like(u, side))
                faces.append(torch.stack(chans, 0).reshape(3, -1, 1))
        lab = rgb_to_lab(torch.cat(faces, 1))
        offset = AB_OFFSET
        idx = torch.round(lab[1:, :, 0] / AB_GRID).long() + offset  # (2, N)
        size = 2 * offset + 1
        hit = torch.zeros(size * size, dtype=torch.bool, device=cpu)
        hit[idx[0] * size + idx[1]] = True
        lookup = torch.full((size * size,), -1, dtype=torch.long, device=cpu)
        cells = hit.nonzero().squeeze(1)
        lookup[cells] = torch.arange(len(cells), device=cpu)
        centres = torch.stack([cells // size - offset, cells % size - offset], 1).float() * AB_GRID
        # For colours outside sRGB (possible in Lab, not in photos): the nearest gamut cell of each cell.
        axis = torch.arange(size, device=cpu) - offset
        grid = torch.stack(torch.meshgrid(axis, axis, indexing='ij'), -1).float() * AB_GRID
        nearest = torch.cdist(grid.view(-1, 2), centres).argmin(1)
        _AB_GAMUT['cpu'] = (centres, lookup.view(size, size), nearest.view(size, size))
    return _AB_GAMUT['cpu']


@torch.inference_mode(False)  # as _gamut_tables
def _gamut_on(device):
    """(centres, lookup, nearest) on `device`, copied there once (no per-step host-to-device copy)."""
    key = str(device)
    if key not in _AB_GAMUT:
        _AB_GAMUT[key] = tuple(t.to(device) for t in _gamut_tables())
    return _AB_GAMUT[key]


def output_dim(kind):
    """Number of network outputs per pixel for a loss kind (an int): huechroma 64 (32 hue and 32
    chroma bins), l2 2, ab Q = len(ab_gamut()[0])."""
    if kind == 'huechroma':
        return HUE_BINS + CHROMA_BINS
    if kind == 'l2':
        return 2
    if kind == 'ab':
        return len(_gamut_tables()[0])
    raise ValueError(f'unknown loss {kind!r}; expected one of {LOSSES}')


def _window_gather(maps, points, window):
    """Read (B, C, H, W) maps at a window x window neighbourhood of each point (B, P, 2).

    Returns (values (B, P, K, C), inside (B, P, K) bool), K = window * window: the window's
    pixels, and which of them lie in the image. A pixel beyond the edge is read at the edge (any
    value would do) and marked outside: the window is cut at the image's edge, as the authors'
    Caffe SparseHistogramExtractor cuts its integral-image box, so edge pixels do not count twice.
    """
    B, C, H, W = maps.shape
    r = torch.arange(window, device=maps.device) - window // 2
    dy, dx = torch.meshgrid(r, r, indexing='ij')
    y = points[..., 0:1].long() + dy.reshape(1, 1, -1)  # (B, P, K)
    x = points[..., 1:2].long() + dx.reshape(1, 1, -1)
    inside = (y >= 0) & (y < H) & (x >= 0) & (x < W)
    flat = maps.reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
    index = (y.clamp(0, H - 1) * W + x.clamp(0, W - 1)).reshape(B, y.shape[1] * y.shape[2], 1).expand(-1, -1, C)
    return flat.gather(1, index).reshape(B, points.shape[1], window * window, C), inside


def _share(inside):
    """(B, P, K) bool -> float32 weights: 1 / (pixels inside) for each window pixel inside, 0 outside."""
    inside = inside.to(torch.float32)
    return inside / inside.sum(-1, keepdim=True).clamp(min=1.0)


def _histogram(bins, n, share):
    """Normalised histogram (B, P, n) of integer bins (B, P, K), each entry adding its `share`
    (B, P, K) (see _share)."""
    out = torch.zeros(*bins.shape[:2], n, device=bins.device, dtype=torch.float32)
    return out.scatter_add_(2, bins, share)


def make_targets(kind, lab, points, window=7):
    """Targets of a loss kind at sampled pixels.

    lab: (B, 3, H, W) the true colours; points: (B, P, 2) integer (y, x); window: side of the
    square neighbourhood whose normalised bin histogram is the target (1 = one-hot of the pixel);
    near the image's edge only the window's pixels inside the image count (the authors' Caffe rule).
    Points should lie in the image; that is not checked (it would wait for the GPU): a point whose
    window misses the image gets all-zero histograms, and its centre values from the nearest edge
    pixel. Other shapes of lab or points raise a ValueError; B = 0 gives empty targets. The targets
    are not detached: where lab needs a gradient, so do all but the hue and chroma histograms.
    Returns a dict of float32 tensors; all have leading dims (B, P):
      huechroma: hue (B, P, 32), chroma (B, P, 32), hue_weight (B, P) = centre chroma / 128 clipped
                 to 1, lightness (B, P) = centre L / 100.
      l2: ab (B, P, 2) = centre (a, b) / L2_SCALE, lightness.
      ab: ab (B, P, Q) soft histogram over the gamut cells, lightness.
    """
    if window < 1 or window % 2 == 0:
        raise ValueError(f'target window must be a positive odd number, got {window}')
    if lab.dim() != 4 or lab.shape[1] != 3:
        raise ValueError(f'make_targets expects lab as (B, 3, H, W), got shape {tuple(lab.shape)} '
                         '(one image: pass lab[None] and points[None])')
    if points.dim() != 3 or points.shape[2] != 2 or points.shape[0] != lab.shape[0]:
        raise ValueError(f'make_targets expects points as (B, P, 2) (y, x) with the B = {lab.shape[0]} of lab, '
                         f'got shape {tuple(points.shape)}')
    with _no_autocast(lab):
        lab = lab.float()
        centre = _window_gather(lab, points, 1)[0][:, :, 0]  # (B, P, 3)
        lightness = centre[..., 0] / 100.0
        if kind == 'huechroma':
            # LCh of the window pixels only (B*P*K of them, not the whole B*H*W image). A grey
            # neighbour (no hue: lab_to_lch gives 0) counts in hue bin 0, as in the authors'
            # TensorFlow targets (HSV hue 0).
            values, inside = _window_gather(lab, points, window)
            share = _share(inside)
            lch = lab_to_lch(values.movedim(-1, 1))  # (B, 3, P, K)
            c = torch.hypot(centre[..., 1], centre[..., 2])
            return dict(hue=_histogram(hue_bin(lch[:, 2]), HUE_BINS, share),
                        chroma=_histogram(chroma_bin(lch[:, 1]), CHROMA_BINS, share),
                        hue_weight=(c / CHROMA_MAX).clamp(max=1.0), lightness=lightness)
        if kind == 'l2':
            return dict(ab=centre[..., 1:] / L2_SCALE, lightness=lightness)
        if kind == 'ab':
            values, inside = _window_gather(lab[:, 1:], points, window)
            return dict(ab=_ab_soft(values, _share(inside)), lightness=lightness)
    raise ValueError(f'unknown loss {kind!r}; expected one of {LOSSES}')


def _ab_soft(ab, share):
    """Soft joint-ab histogram (B, P, Q) of the window colours ab (B, P, K, 2).

    Each colour spreads Gaussian weights (sigma = AB_SIGMA) over the in-gamut cells among the 3x3
    grid cells around it (which hold its nearest cells), normalised per colour; a colour with no
    gamut cell nearby (outside sRGB) goes whole to the gamut cell nearest its own cell. Then the
    colours are averaged with weights `share` (B, P, K): those inside the image alike (see _share).
    """
    offset = AB_OFFSET
    centres, lookup, nearest = _gamut_on(ab.device)
    B, P, K, _ = ab.shape
    cell = torch.round(ab / AB_GRID).long()  # (B, P, K, 2)
    r = torch.arange(-1, 2, device=ab.device)
    nb = torch.stack(torch.meshgrid(r, r, indexing='ij'), -1).reshape(9, 2)
    cand = (cell.unsqueeze(3) + nb).clamp(-offset, offset)  # (B, P, K, 9, 2)
    cls = lookup[cand[..., 0] + offset, cand[..., 1] + offset]  # (B, P, K, 9), -1 = out of gamut
    d2 = ((cand.float() * AB_GRID - ab.unsqueeze(3)) ** 2).sum(-1)
    w = torch.exp(-d2 / (2 * AB_SIGMA ** 2)) * (cls >= 0)
    total = w.sum(-1, keepdim=True)  # (B, P, K, 1); 0: no gamut cell among the nine
    outside = (total == 0).to(w.dtype)
    # A 10th candidate per colour, the gamut cell nearest its own cell, weighs 1 when outside.
    own = cell.clamp(-offset, offset) + offset
    cls = torch.cat([cls, nearest[own[..., 0], own[..., 1]].unsqueeze(-1)], -1)  # (B, P, K, 10)
    w = torch.cat([w, outside], -1) / (total + outside)  # each colour's weights sum to 1
    w = w * share.unsqueeze(-1)  # the average over the window's colours inside the image
    out = torch.zeros(B, P, len(centres), device=ab.device, dtype=torch.float32)
    return out.scatter_add_(2, cls.clamp(min=0).reshape(B, P, K * 10), w.reshape(B, P, K * 10).float())


# --- Losses -------------------------------------------------------------------------------------

def _kl(target, logits):
    """KL(target || softmax(logits)) over the last dim, in float32 (float64 for float64 logits); 0 log 0 = 0,
    and 0 log q = 0 also where q = 0 (a logit of -inf, e.g. a masked class, where the target is 0)."""
    logp = F.log_softmax(_float(logits), dim=-1)
    return (torch.xlogy(target, target) - torch.where(target > 0, target * logp, 0.0)).sum(-1)


def lightness_weight(lightness):
    """The original's w(L) = min(3L, 1, 3(1 - L)), L = L* / 100 in [0, 1], any shape -> w in [0, 1] of
    the same shape (0 outside [0, 1]): dark and bright pixels count less."""
    return torch.minimum(torch.minimum(3 * lightness, torch.ones_like(lightness)), 3 * (1 - lightness)).clamp(min=0)


def color_loss(kind, logits, targets, valid=None, use_lightness_weight=False, norm=None):
    """The colorization loss, averaged over sampled pixels of valid images.

    logits: (B, P, D) network outputs (any float dtype), D = output_dim(kind), at the points of the
    targets (other shapes raise a ValueError); targets: from make_targets; valid: (B,)
    0/1 weights per image (grayscale or unreadable images get 0) or None. use_lightness_weight
    multiplies the per-pixel loss by w(L): the chroma term's for huechroma (as the original Caffe
    recipe did), the whole loss for l2 and ab. norm: what the summed per-pixel loss is divided by,
    default the number of valid sampled pixels of this batch (at least 1); data-parallel training
    passes (valid pixels over all replicas) / (number of replicas), so that the replicas' averaged
    gradient is that of the mean over all their pixels however the valid images fall.
    Returns (total, parts): a scalar tensor and a dict of named scalar tensors (no host sync).
    """
    if logits.dim() != 3 or logits.shape[2] != output_dim(kind) or targets['lightness'].shape != logits.shape[:2]:
        raise ValueError(f'color_loss({kind!r}) expects logits (B, P, {output_dim(kind)}) at the (B, P) points of '
                         f"the targets {tuple(targets['lightness'].shape)}, got {tuple(logits.shape)}")
    B, P = logits.shape[:2]
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    w = torch.ones(B, P, dtype=dtype, device=logits.device) if valid is None else valid.to(dtype).view(B, 1).expand(B, P)
    lw = lightness_weight(targets['lightness']) if use_lightness_weight else 1.0
    norm = w.sum().clamp(min=1.0) if norm is None else norm
    if kind == 'huechroma':
        chroma = (_kl(targets['chroma'], logits[..., HUE_BINS:]) * lw * w).sum() / norm
        hue = (HUE_WEIGHT * targets['hue_weight'] * _kl(targets['hue'], logits[..., :HUE_BINS]) * w).sum() / norm
        return chroma + hue, {'chroma': chroma, 'hue': hue}
    if kind == 'l2':
        l2 = (((_float(logits) - targets['ab']) ** 2).sum(-1) * lw * w).sum() / norm
        return l2, {'l2': l2}
    if kind == 'ab':
        ab = (_kl(targets['ab'], logits) * lw * w).sum() / norm
        return ab, {'ab': ab}
    raise ValueError(f'unknown loss {kind!r}; expected one of {LOSSES}')


# --- Decoding -----------------------------------------------------------------------------------

def decode(kind, logits, dim=-1):
    """Network outputs -> predicted (a, b) in Lab units, with the output channels at `dim`.

    logits: (B, P, D) with dim=-1, or (B, D, h, w) with dim=1, D = output_dim(kind) (else a
    ValueError). Returns the same shape with 2 channels (a, b) at `dim`, float32 (float64 for
    float64 logits).
      huechroma: hue = circular mean of the hue histogram; chroma = median of the chroma
                 histogram times min(R / 0.96, 1), R = resultant length of the hue histogram.
      ab: annealed mean (T = 0.38) of the cell centres.  l2: the regressed (a, b).
    """
    if logits.shape[dim] != output_dim(kind):
        raise ValueError(f'decode({kind!r}) expects {output_dim(kind)} channels in dim {dim}, '
                         f'got shape {tuple(logits.shape)}')
    with _no_autocast(logits):  # the ab annealed mean is a matmul, which autocast would run in bf16
        return _decode(kind, _float(logits).movedim(dim, -1)).movedim(-1, dim)


def _decode(kind, z):
    if kind == 'huechroma':
        p_hue = F.softmax(z[..., :HUE_BINS], -1)
        p_chroma = F.softmax(z[..., HUE_BINS:], -1)
        theta = hue_centers(z.dtype, z.device)
        x = (p_hue * torch.cos(theta)).sum(-1)
        y = (p_hue * torch.sin(theta)).sum(-1)
        h = torch.atan2(y, x)
        resultant = torch.hypot(x, y)
        chroma = histogram_median(p_chroma) * (CHROMA_MAX / CHROMA_BINS)
        chroma = chroma * (resultant / HUE_FADE_R).clamp(max=1.0)
        ab = torch.stack([chroma * torch.cos(h), chroma * torch.sin(h)], -1)
    elif kind == 'l2':
        ab = z * L2_SCALE
    elif kind == 'ab':
        centres = _gamut_on(z.device)[0]
        p = F.softmax(F.log_softmax(z, -1) / AB_TEMPERATURE, -1)
        ab = p @ centres.to(z.dtype)
    else:
        raise ValueError(f'unknown loss {kind!r}; expected one of {LOSSES}')
    return ab


def histogram_median(p):
    """Median of histograms p (..., n), each summing to 1, over bins of unit width on [0, n): (...) in
    bin units, in [0, n], linearly interpolated inside the bin where the cumulative sum crosses 1/2.
    (The authors' decoding took that bin's centre, k + 0.5: at most half a bin apart.)"""
    cdf = p.cumsum(-1)
    k = (cdf < 0.5).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)
    before = torch.where(k > 0, cdf.gather(-1, (k - 1).clamp(min=0)), torch.zeros_like(k, dtype=p.dtype))
    mass = p.gather(-1, k).clamp(min=1e-12)
    return (k.to(p.dtype) + ((0.5 - before) / mass).clamp(0.0, 1.0)).squeeze(-1)
