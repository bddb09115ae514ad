"""Tests of data.py (CPU, seconds): python -m pytest -q test_data_part.py"""
import io
import json
import math
import os
import pickle
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import data

# ----------------------------------------------------------------------------------------------
# helpers


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


def test_find_images_imagenet_layout(tmp_path):
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


def test_find_images_follows_symlinked_folders_once(tmp_path):
    root = tmp_path / 'root'
    img = _write_rgb(root / 'a' / 'img.jpg', fmt='JPEG')
    os.symlink(root, root / 'a' / 'loop')          # a cycle
    os.symlink(root / 'a', root / 'b_link')         # the same folder twice
    ext = _write_rgb(tmp_path / 'outside' / 'o.jpg', fmt='JPEG')
    os.symlink(tmp_path / 'outside', root / 'c_link')  # a folder only reachable by a link
    found = data.find_images(root, log=lambda s: None)
    assert found == sorted([img, str(root / 'c_link' / 'o.jpg')])
    assert os.path.realpath(found[1]) == os.path.realpath(ext)


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
    v16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    assert roundtrip(Image.fromarray(v16), 'i16.png')[0, :, 0].tolist() == [0, 100, 255]
    i16b = Image.frombytes('I;16B', (3, 1), v16.astype('>u2').tobytes())
    assert data.pil_to_rgb(i16b)[0, :, 0].tolist() == [0, 100, 255]
    assert roundtrip(i16b, 'i16b.tif')[0, :, 0].tolist() == [0, 100, 255]
    # 32-bit integers beyond 16 bits and floats: stretched by their range.
    i32 = Image.fromarray(np.array([[0, 250000, 1000000]], np.int32))
    assert roundtrip(i32, 'i32.tif')[0, :, 0].tolist() == [0, 64, 255]  # 255 * 0.25 = 63.75
    f = Image.fromarray(np.array([[0, 0.25, 1]], np.float32))
    assert roundtrip(f, 'f.tif')[0, :, 0].tolist() == [0, 64, 255]
    out = roundtrip(Image.new('RGB', (4, 3), (1, 2, 3)), 'rgb.png')
    assert out.shape == (3, 4, 3) and out.dtype == np.uint8 and out[0, 0].tolist() == [1, 2, 3]


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


def test_draft_keeps_short_side(tmp_path):
    y, x = np.mgrid[0:1200, 0:1600]
    rgb = np.stack([x * 255 // 1600, y * 255 // 1200, np.full_like(x, 128)], -1).astype(np.uint8)
    path = _write_rgb(tmp_path / 'big.jpg', rgb, fmt='JPEG')
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
    # Seeds: distinct within an epoch, and a sample gets a new one in each epoch.
    seeds = [s for r in ranks for _, s in r]
    assert len(set(seeds)) == len(seeds)
    assert data.InfiniteSampler(n, b, seed=8).batch(0) != data.InfiniteSampler(n, b, seed=7).batch(0)
    with pytest.raises(ValueError, match='fewer than one batch'):
        data.InfiniteSampler(10, 4, world_size=3)


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
    assert not data.bad_share_exceeded(5, 100, 0.01)  # too few seen to judge
    assert data.bad_share_exceeded(30, 1000, 0.01)
    assert not data.bad_share_exceeded(10, 1000, 0.01)


# ----------------------------------------------------------------------------------------------
# VOC


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
        png = Image.fromarray(lab, 'P')
        png.putpalette(data.VOC_PALETTE.tobytes())
        png.save(voc12 / 'SegmentationClass' / f'{name}.png')
        Image.fromarray(lab, 'L').save(voc12 / 'SegmentationClassAug' / f'{name}.png')
    (voc12 / 'ImageSets/Segmentation/train.txt').write_text('2007_000032\n2008_000001\n')
    (voc12 / 'ImageSets/Segmentation/val.txt').write_text('2011_000002\n')
    pairs = data.voc_segmentation(voc12, 'train')
    assert [os.path.basename(p) for p, _ in pairs] == ['2007_000032.jpg', '2008_000001.jpg']
    assert all(os.sep + 'SegmentationClass' + os.sep in lab for _, lab in pairs)
    label = data.load_label(pairs[0][1])
    assert label.dtype == np.uint8 and label[2, 3] == 15 and label[1, 2] == 255 and label[0, 0] == 0
    with pytest.raises(FileNotFoundError, match='train_aug'):
        data.voc_segmentation(voc12, 'train_aug')
    # The common DeepLab form of the list, at the VOC2012 root, with gray label PNGs.
    (voc12 / 'train_aug.txt').write_text(
        '/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n'
        '/JPEGImages/2008_000001.jpg /SegmentationClassAug/2008_000001.png\n')
    aug = data.voc_segmentation(voc12, 'train', augmented=True)
    assert [os.path.basename(os.path.dirname(lab)) for _, lab in aug] == ['SegmentationClassAug'] * 2
    assert np.array_equal(data.load_label(aug[0][1]), label)
    (voc12 / 'train_aug.txt').write_text('2007_000032\n2011_000002\n')  # leaks a val image
    with pytest.raises(ValueError, match='val'):
        data.voc_segmentation(voc12, 'train_aug')
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
    sizes = {Image.open(p).size for p in train}
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
    for img, lab in pairs[:10]:
        with Image.open(lab) as im:
            assert im.mode == 'P'
            assert bytes(im.getpalette()[:63]) == data.VOC_PALETTE[:21].tobytes()
        y = data.load_label(lab)
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
    for img, lab in data.voc_segmentation(paths['voc2012'], 'train'):
        rgb, y = data.load_rgb(img), data.load_label(lab)
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


# ----------------------------------------------------------------------------------------------
# packs


def _quiet(_):
    pass


def _reference_packed_jpeg(path, short_side, quality):
    """The bytes a pack should hold for `path`, by the Pillow calls pack_images documents: draft
    a JPEG to the smallest 1/2^k scale with short side >= short_side, EXIF transpose, RGB,
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
    # The on-disk format, read with numpy alone.
    index = np.load(pack / 'index.npy', mmap_mode='r')
    offsets = np.load(pack / 'names-offsets.npy')
    names = (pack / 'names.bin').read_bytes()
    assert [names[a:b].decode() for a, b in zip(offsets[:-1], offsets[1:])] == sources
    assert index.shape == (len(sources), 4) and index.dtype == np.int64
    shards = [(pack / f'shard-{k:05d}.bin').read_bytes() for k in range(len(info['shards']))]
    assert [len(b) for b in shards] == info['shards']
    by_name = {v: k for k, v in src.items()}
    for i, (source, path) in enumerate(zip(sources, paths)):
        shard, offset, length, status = (int(v) for v in index[i])
        kind = by_name[source]
        if kind.startswith('bad_'):
            assert status == data.STATUS_BAD and length == 0
            continue
        expected = _reference_packed_jpeg(source, 64, 85)
        assert shards[shard][offset:offset + length] == expected, kind
        rgb = data.load_rgb(path)
        assert np.array_equal(rgb, np.asarray(Image.open(io.BytesIO(expected)).convert('RGB'))), kind
        assert status == (data.STATUS_GRAY if kind == 'gray' else data.STATUS_OK), kind
    shapes = {by_name[s]: data.load_rgb(p).shape for s, p in zip(sources, paths) if 'bad' not in by_name[s]}
    assert shapes == {'big_jpeg': (64, 96, 3), 'png': (92, 64, 3), 'small': (50, 40, 3),
                      'rotated': (128, 64, 3), 'gray': (71, 64, 3)}
    # Decoding with a smaller short side drafts the stored JPEG, as for files.
    assert data.load_rgb(paths[sources.index(src['big_jpeg'])], min_short_side=30).shape == (32, 48, 3)


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
                     'nothing to do']
    assert {n: os.stat(part / n).st_mtime_ns for n in os.listdir(part)} == mtimes
    with pytest.raises(ValueError, match=r'other arguments: --short-side 48 \(asked: 40\)'):
        data.pack_images([root], part, **dict(kw, short_side=40))
    with pytest.raises(ValueError, match='other arguments: --data'):
        data.pack_images([root, tmp_path / 'whole'], part, **kw)


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


def test_pack_paths_cannot_be_real_files_and_out_checks(tmp_path):
    # A real folder called index.npy is not a pack: its files are read as files.
    real = _write_rgb(tmp_path / 'photos' / 'index.npy' / '000000001' / 'a' / 'b.png', _smooth_rgb(20, 30, 0))
    assert data.packed_entry(real) is None
    assert data.load_rgb(real).shape == (20, 30, 3)
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
