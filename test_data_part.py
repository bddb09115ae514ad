"""Tests of data.py (CPU, seconds): python -m pytest -q test_data_part.py"""
import io
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

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
