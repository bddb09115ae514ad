"""Images for colorization pre-training and PASCAL VOC transfer, plus a procedural demo world.

Unlabeled sources (pre-training): `find_images` lists image files under folders (ImageNet's
train/nXXXXXXXX/*.JPEG, Places205's nested a/abbey/*.jpg, any folder) or in .txt lists, with an
optional per-root cache; `ColorImages` decodes, flags and augments them in DataLoader workers and
returns uint8 only (all float work happens later, on the device); `InfiniteSampler` feeds it
`(index, sample_seed)` pairs so that a run resumed at step s reads exactly the batches an
uninterrupted run would have read.

VOC (transfer): `voc_classification` reads VOC2007 ImageSets/Main, `voc_segmentation` reads
VOC2012 ImageSets/Segmentation (or the SBD-augmented train_aug set), `load_label` reads the
class-index PNGs.

Demo world: `ensure_demo(root)` writes, once, a small ImageNet-style folder of procedural
photos in which colour follows from what things are, and a VOC2007/VOC2012 devkit of the same
world, so that every command of the project runs end to end without downloads:

    python data.py demo                       # -> data/demo/{train,val,VOCdevkit} next to this file
    python data.py scan /data/imagenet/train /data/places205 --cache-dir runs/cache
    python data.py scan /data/packs/imagenet-256 --write all.txt   # a list to cut down to a subset

Packs (`pack_images`): decoding full-size photos is the bottleneck of pre-training, so the
images can be decoded, shrunk to a short side (--short-side, e.g. 256) and re-encoded once, into
a few large shard files with an index, then read without per-image file opens (resumable; run it
again to finish):

    python data.py pack --data /data/imagenet/train --out /data/packs/imagenet-256 --short-side 256
    python data.py verify /scratch/packs/imagenet-256   # after copying it: sizes and CRC32s as packed
    python colorize.py --data /scratch/packs/imagenet-256 --short-side 224 256 ...

find_images turns a pack root into one pseudo-path per image, PACK/index.npy/<i>/<folder>/<name>
(entry i; <folder>/<name> are those of the source, so class folders and file names read from
paths stay meaningful; never a real file, as index.npy is a file in a pack), which load_rgb and
ColorImages decode from the memory-mapped shards; bad files are reported under their original
paths.

Only torch, numpy, Pillow and the standard library are used; importing does no work.
"""
import argparse
import collections
import concurrent.futures
import contextlib
import errno
import functools
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
import zlib

import numpy as np
import torch
from PIL import Image, ImageFile, JpegImagePlugin, UnidentifiedImageError

VOC_CLASSES = (
    'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa',
    'train', 'tvmonitor')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')  # any letter case

# ColorImages statuses; the trainer weights status != STATUS_OK images by zero.
STATUS_OK, STATUS_BAD, STATUS_GRAY = 0, 1, 2
STATUS_NAMES = ('ok', 'bad', 'gray')

DEFAULT_DEMO_ROOT = os.path.join(os.path.dirname(os.path.realpath(__file__)), 'data', 'demo')


def _voc_colormap(n=256):
    """The VOC devkit's label colour map (VOClabelcolormap.m): bit 3j, 3j+1, 3j+2 of the class
    index become bit 7-j of R, G, B."""
    i = np.arange(n)
    cmap = np.zeros((n, 3), np.int64)
    for j in range(8):
        for ch in range(3):
            cmap[:, ch] |= ((i >> (3 * j + ch)) & 1) << (7 - j)
    return cmap.astype(np.uint8)


VOC_PALETTE = _voc_colormap()  # (256, 3) uint8; index 0 background, 1..20 VOC_CLASSES, 255 void


# ----------------------------------------------------------------------------------------------
# Finding images

_CACHE_VERSION = 1
_RACY_NS = 2_000_000_000  # directory mtimes this close to the scan are not trusted (coarse clocks)


def usable_core_ids():
    """The cores this process may run on (a cgroup or SLURM allocation, not the whole node): a set."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return set(range(os.cpu_count() or 1))


def usable_cores():
    """How many cores this process may run on (usable_core_ids)."""
    return len(usable_core_ids())


def find_images(roots, cache_dir=None, log=print):
    """Sorted, de-duplicated list of absolute image paths (str) from `roots` (a path or a list of
    paths). De-duplicated as strings: an image reached by two roots under two paths is listed twice.

    A root is either a folder, scanned recursively (extensions IMAGE_EXTENSIONS in any letter
    case; names starting with '.' skipped; symlinked folders followed, each real folder visited
    once, its images listed under the first path to it, depth first in name order), or a .txt
    file with one image path per line (relative paths are relative to the txt file's folder;
    blank lines and lines starting with '#' ignored, spaces at either end of a line dropped;
    UTF-8, a byte-order mark dropped; a UTF-16 list is a ValueError). Raises ValueError for a
    root that does not exist, a folder with no images, a list with no paths or whose first path
    is missing or a folder. Logs one line per root to `log`.

    With `cache_dir`, each folder root's listing is cached in cache_dir/images-<hash of the
    absolute root>.json together with the mtime of every scanned folder. The cache is reused
    while all those mtimes are unchanged (checked by stat, no listing): adding or removing a
    file or subfolder changes its parent's mtime and triggers a rescan. Editing a file in place
    does not, and need not. A scan is not cached when a folder changed less than 2 s before it
    (file-system clocks are coarse, so a later change could keep the same mtime), nor when the
    cache cannot be written (a read-only or full cache_dir): a warning goes to `log`, and the
    listing is returned all the same.

    A root that is a pack folder (`python data.py pack`, see pack_images) gives its pseudo-paths
    (`pack_paths`), which load_rgb and ColorImages read from the pack; an incomplete pack raises
    ValueError with the command that finishes it.
    """
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    if not roots:
        raise ValueError('find_images: expected at least one image folder or .txt list, got none')
    paths = []
    for root in roots:
        root = os.path.abspath(os.fspath(root))
        t0 = time.perf_counter()
        if os.path.isfile(root) and root.lower().endswith('.txt'):
            found, how = _read_list(root), 'listed'
        elif os.path.isdir(root) and _pack_state(root) is not None:
            found, how = pack_paths(root), 'packed'
        elif os.path.isdir(root):
            found, how = _scan_cached(root, cache_dir, log)
        elif os.path.exists(root):
            raise ValueError(f'image root {root} is a file but not a .txt list: expected a folder '
                             'of images or a .txt file with one image path per line')
        else:
            raise ValueError(f'image root {root} does not exist: expected a folder of images '
                             '(scanned recursively) or a .txt file with one image path per line')
        log(f'{len(found):,} images {how} in {root} ({time.perf_counter() - t0:.1f} s)')
        paths.extend(found)
    # Sorted as listed, then de-duplicated: each root's listing comes sorted or nearly (a pack's; a scan's, depth
    # first in name order), which Python's sort takes in about a pass, where sorting a set's order took 7 of the
    # 10 s that 3.7M paths took to list from their cache (and a 134 MB hash table), on every rank.
    paths.sort()
    return [p for i, p in enumerate(paths) if not i or p != paths[i - 1]]


def write_list(txt, paths):
    """Write `paths` (str or os.PathLike) to the list `txt` (atomically), one absolute path per line, as
    find_images reads them back. ValueError for no paths (find_images refuses an empty list) or a
    path that a line cannot hold (a line break, or spaces at either end); nothing is written then."""
    paths = [os.fspath(p) for p in paths]
    if not paths:
        raise ValueError(f'write_list: no paths to write to {txt}; a list without any is refused when read')
    odd = [p for p in paths if '\n' in p or '\r' in p or p != p.strip()]
    if odd:
        raise ValueError(f'{len(odd)} path(s) cannot be written to a list, whose lines are stripped: '
                         f'e.g. {odd[0]!r}; rename them')
    text = ''.join(os.path.abspath(p) + '\n' for p in paths)
    atomic_write(txt, lambda f: f.write(text.encode('utf-8', errors='surrogateescape')))


def _read_list(txt):
    """The paths listed in the .txt list `txt` (see find_images), normalised and joined to the list's
    folder; ValueError for a list in UTF-16, with no paths, or whose first entry is missing or a folder."""
    base = os.path.dirname(txt)
    # names in other encodings: their bytes; a byte-order mark (a list saved by a Windows editor) is dropped
    with open(txt, 'rb') as f:
        raw = f.read()
    if b'\0' in raw:  # no path holds a NUL byte: UTF-16 (Windows PowerShell's `>` writes it)
        raise ValueError(f'image list {txt} is not UTF-8 text (it holds NUL bytes: UTF-16, as Windows '
                         'PowerShell\'s `>` writes, or not text at all); save it as UTF-8, one path per line')
    # (universal newlines, as open() splits: not str.splitlines, which also splits at U+0085, U+2028...)
    lines = [s.strip() for s in io.TextIOWrapper(io.BytesIO(raw), encoding='utf-8-sig', errors='surrogateescape')]
    entries = [s for s in lines if s and not s.startswith('#')]
    if not entries:
        raise ValueError(f'image list {txt} holds no paths: expected one image path per line '
                         '(relative to the list\'s folder), found only blank or # lines')
    paths = [os.path.normpath(os.path.join(base, s)) for s in entries]
    # A wrong base folder makes every line wrong; catch that here rather than as 100% bad files.
    if not os.path.exists(paths[0]) and packed_entry(paths[0]) is None:
        raise ValueError(f'image list {txt}: its first entry {entries[0]!r} resolves to '
                         f'{paths[0]}, which does not exist; relative paths are taken from the '
                         'list\'s folder')
    if os.path.isdir(paths[0]):  # each line would be a bad image, a whole run of warnings
        raise ValueError(f'image list {txt}: its first entry {entries[0]!r} is the folder {paths[0]}; a list '
                         'names image files, one per line (pass a folder itself, not in a list, to scan it)')
    return paths


SCAN_PROGRESS_S = 30  # seconds between the progress lines of a long scan (millions of files on NFS)


def _scan(root, log=print):
    """Walk `root`; returns (image paths, [(folder, mtime_ns)], count of other files, examples,
    the subfolders that could not be listed). Every SCAN_PROGRESS_S seconds, logs how far it got."""
    files, dirs, seen, unreadable = [], [], set(), []
    n_other, other_examples = 0, []
    stack = [root]
    start = last = time.perf_counter()
    while stack:
        if dirs and time.perf_counter() - last >= SCAN_PROGRESS_S:
            last = time.perf_counter()
            log(f'scanning {root}: {len(files):,} images in {len(dirs):,} folders so far ({last - start:.0f} s)')
        d = stack.pop()
        try:
            st = os.stat(d)  # before listing, so a change during the listing invalidates the cache
            if (st.st_dev, st.st_ino) in seen:  # symlink cycle or a folder linked twice
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.append((d, st.st_mtime_ns))
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            if d == root:
                raise ValueError(f'image folder {root} cannot be listed ({e.strerror or e})') from None
            unreadable.append(d)  # e.g. lost+found at the root of a disk, or a folder removed meanwhile
            continue
        subdirs = []
        for e in entries:
            if e.name.startswith('.'):
                continue
            try:  # both follow symlinks; a link to itself (or a loop of links) raises ELOOP
                is_dir, is_file = e.is_dir(), e.is_file()
            except OSError:
                is_dir = is_file = False  # counted below with the other files
            if is_dir:
                subdirs.append(e.path)
            elif is_file and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                files.append(e.path)
            else:
                n_other += 1
                if len(other_examples) < 3:
                    other_examples.append(os.path.relpath(e.path, root))
        stack.extend(reversed(subdirs))  # depth first, in name order: deterministic
    return files, dirs, n_other, other_examples, unreadable


def _cache_path(cache_dir, root):
    return os.path.join(cache_dir, f'images-{hashlib.sha1(os.fsencode(root)).hexdigest()[:16]}.json')


def _load_cache(path, root, log):
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding='utf-8') as f:
            cache = json.load(f)
        if cache.get('version') != _CACHE_VERSION or cache.get('root') != root:
            return None
        dirs = [(os.path.join(root, d), mtime) for d, mtime in cache['dirs']]
        files = [os.path.join(root, p) for p in cache['files']]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # cut short, or edited by hand
        log(f'ignoring unreadable image cache {path} ({type(e).__name__}: {e}); rescanning {root}')
        return None
    for d, mtime in dirs:
        try:
            if os.stat(d).st_mtime_ns != mtime:
                return None
        except (OSError, TypeError, ValueError):
            return None
    return files


def _scan_cached(root, cache_dir, log):
    cache_file = _cache_path(cache_dir, root) if cache_dir else None
    if cache_file:
        cached = _load_cache(cache_file, root, log)
        if cached is not None:
            return cached, 'cached'
    start_ns = time.time_ns()
    files, dirs, n_other, examples, unreadable = _scan(root, log)
    if unreadable:
        log(f'warning: skipped {len(unreadable)} folder(s) under {root} that cannot be listed (permission '
            f'denied, or removed during the scan), e.g. {unreadable[0]}')
    if not files:
        seen = f'{n_other} other files (e.g. {", ".join(examples)})' if n_other else 'no files'
        raise ValueError(f'no images under {root}: expected files ending in '
                         f'{"/".join(IMAGE_EXTENSIONS)} (any case) in it or its subfolders; '
                         f'found {seen} in {len(dirs)} folders')
    if cache_file and unreadable:
        log(f'not caching the listing of {root}: some folders could not be listed')
    elif cache_file:
        racy = [d for d, mtime in dirs if mtime >= start_ns - _RACY_NS]
        if racy:
            log(f'not caching the listing of {root}: {racy[0]} changed less than 2 s ago')
        else:
            rel = lambda p: os.path.relpath(p, root)  # noqa: E731
            try:
                write_json(cache_file, {
                    'version': _CACHE_VERSION, 'root': root,
                    'dirs': [[rel(d), mtime] for d, mtime in dirs],
                    'files': [rel(p) for p in files]})
            except OSError as e:  # a read-only or full cache folder: the scan (an hour on NFS) is still good
                log(f'warning: not caching the listing of {root}: {e.filename or cache_file}: {e.strerror or e}')
    return files, 'scanned'


# File-system errors the user can fix (a full disk or quota, a read-only or foreign folder): the
# entry scripts print them as one line, with the hint of ERRNO_HINTS where there is one: a path whose
# parts are of the wrong kind (--out under a file, a file where the run folder goes, a folder where a
# checkpoint goes), or a storage that fails (EIO: the environment's, not a bug).
ERRNO_HINTS = {errno.ENOTDIR: 'a part of that path is a file, not a folder: choose another path',
               errno.EEXIST: 'a file is there, where a folder is needed: move the file or choose another path',
               errno.EISDIR: 'a folder is there, where a file is needed: move it away or choose another path',
               errno.EIO: 'the storage failed, a disk error or a network mount gone: check it'}
FIXABLE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, 'EDQUOT', errno.ENOSPC),
                  *ERRNO_HINTS}


def os_error_text(e):
    """'PATH: reason' for an OSError of FIXABLE_ERRNOS, else None."""
    if e.errno not in FIXABLE_ERRNOS:
        return None
    text = f'{e.filename}: {e.strerror}' if e.filename else e.strerror
    return f'{text} ({ERRNO_HINTS[e.errno]})' if e.errno in ERRNO_HINTS else text


@contextlib.contextmanager
def naming(path, doing):
    """An OSError raised inside that names no file (a write's or a flush's: ENOSPC, EIO) comes out
    naming `path`, with `doing` after its reason ('appending to it'), for the one-line message."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, f'{e.strerror} ({doing})', os.fspath(path)) from e
        raise


def atomic_write(path, write):
    """write(f) into a temp file beside `path` (binary), flush it to disk, rename it over `path`;
    returns None. Makes the missing folders of `path`.

    A crash or power loss at any moment leaves either the old file or the new one, never a
    truncated one (the fsyncs make the rename durable on journaling file systems and NFS too). An
    exception in write(f) (any, Ctrl-C too) removes the temp file and is re-raised; an OSError of a
    write that names no file (a full disk) comes out as OSError naming `path`. The new file has the
    permissions of any new file (0o666 less the umask), not those of the file it replaces. The temp
    file is named <path>.tmp-<host>-<pid>: two threads of one process must not write one path at
    once.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = f'{os.path.basename(path)}.tmp-{socket.gethostname()}-'
    tmp = os.path.join(folder, f'{prefix}{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a failed write (disk full, say) leaves no half file of a checkpoint's size
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save re-raises it as a RuntimeError
        if isinstance(e, (OSError, RuntimeError)) and isinstance(cause, OSError) and cause.filename is None:
            # A write's error names no file: name it.
            raise OSError(cause.errno, f'{cause.strerror} (writing it; what was there before is unchanged)',
                          path) from e
        raise
    # Those of processes killed mid-write, named as now or as before the host was in the name.
    _remove_stale_temps(folder, prefix, f'{os.path.basename(path)}.tmp-')
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_target(name):
    """The name of the file whose atomic_write left the temp file `name` (<file>.tmp-<host>-<pid>,
    or <file>.tmp-<pid> as before hosts were named), else None."""
    written, tmp, writer = name.partition('.tmp-')
    return written if tmp and writer.rpartition('-')[2].isdigit() else None


def write_png(path, array):
    """uint8 (H, W, 3), or (H, W, 4) RGBA, as a PNG at `path`, atomically (atomic_write): a disk that fills
    or a process killed mid-write leaves the file that was there (an earlier run's result), never a truncated one.
    Pillow's TypeError for an array of another dtype (float, int64: convert first), before anything is written."""
    image = Image.fromarray(array)
    atomic_write(path, lambda f: image.save(f, format='PNG'))


def json_safe(obj):
    """obj with each float NaN or inf in it (in dicts, lists, tuples) replaced by None. JSON has no such
    numbers: json.dumps writes NaN / Infinity, which Python reads back but strict readers (jq, JavaScript,
    most languages' parsers) refuse, the whole file. They arise from a diverging run (the evaluation just
    after the step that made the weights NaN) or a flag typed as nan or inf."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_text(obj, indent=None):
    """obj as strict JSON text: json_safe's null for each NaN or inf. TypeError for an object JSON cannot hold."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path, obj, indent=None):
    """obj as JSON at `path` (json_text: NaN and inf as null), atomically (atomic_write). TypeError for an
    object JSON cannot hold, the file at `path` left as it was."""
    atomic_write(path, lambda f: f.write(json_text(obj, indent).encode()))


def subset(paths, n, seed=0):
    """A fixed random subset of `n` of `paths`, sorted. One permutation of the sorted input per
    seed, of which the first n are taken: the same (n, seed) gives the same subset, and for one
    seed the subsets are nested (the 1000-subset contains the 100-subset)."""
    paths = sorted(paths)
    if not 0 <= n <= len(paths):
        raise ValueError(f'subset: asked for {n} images, but only {len(paths)} are available')
    perm = np.random.default_rng(seed).permutation(len(paths))
    return sorted(paths[i] for i in perm[:n])


# ----------------------------------------------------------------------------------------------
# Decoding

class BadImage(ValueError):
    """A file that cannot be decoded into an image; `path` and `reason` say which and why.

    BadImage(message), one argument, is how torch's DataLoader re-raises one from a worker process (the
    type called with a text that ends with the worker's traceback; a type that needs two arguments came
    back as a RuntimeError): the text names the file and the reason, and `path` and `reason` are None."""

    def __init__(self, path, reason=None):
        super().__init__(path if reason is None else f'{path}: {reason}')
        self.path, self.reason = (None, None) if reason is None else (path, reason)

    def __reduce__(self):  # pickled as its arguments: a process pool's worker sends it back whole
        return type(self), (self.path, self.reason) if self.reason is not None else self.args


def load_rgb(path, min_short_side=None, exif_orientation=True, to_srgb=False, alpha=False):
    """Decode `path` to RGB uint8 (H, W, 3), EXIF orientation applied (exif_orientation=False: the
    stored pixel grid, which annotations such as VOC's masks index; a pack holds its images already
    turned upright, so for its pseudo-paths the flag changes nothing).

    to_srgb=True (colorizing photos): an image with an embedded ICC profile (Adobe RGB, Display P3, a
    CMYK press profile, a gray gamma) has its pixels converted to sRGB first (`icc_to_srgb`); without
    it (training, packs) the stored values are taken as sRGB. alpha=True (colorizing photos): an image
    with transparency comes as RGBA uint8 (H, W, 4), its colour not composited (see `pil_to_rgb`).

    With `min_short_side`, large JPEGs are decoded at a reduced scale (1/2, 1/4, 1/8 through
    Image.draft) whose short side is still >= min_short_side. Raises BadImage (a ValueError)
    naming the file and the reason for empty, missing, truncated, unidentifiable or undecodable
    files. See `pil_to_rgb` for how each mode becomes RGB.

    A pack pseudo-path (PACK/index.npy/<i>/..., see `pack_paths`) decodes entry i of the pack from
    its memory-mapped shard; for an entry that was bad when packed, BadImage names the original
    source file and the reason recorded then.
    """
    path = os.fspath(path)
    entry = packed_entry(path)
    if entry is not None:
        reader, i = entry
        return reader.load_rgb(i, min_short_side)
    return _decode(path, path, min_short_side, exif_orientation, to_srgb=to_srgb, alpha=alpha)


def _decode(source, name, min_short_side=None, exif_orientation=True, as_image=False, to_srgb=False, alpha=False):
    """load_rgb's decoding of `source`, a file path or a binary file object; BadImage names
    `name`. as_image=True: the same pixels as a Pillow image in mode RGB, which the loader resizes
    as it is (a copy to numpy and back into Pillow took a tenth of its time per image)."""
    with decoding(name):
        if isinstance(source, str) and os.path.getsize(source) == 0:
            raise BadImage(name, 'empty file (0 bytes)')
        with Image.open(source) as im:
            if min_short_side and isinstance(im, JpegImagePlugin.JpegImageFile):  # MPO (cameras) too
                w, h = im.size
                scale = min_short_side / min(w, h)
                if scale < 1:
                    im.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))
            im.load()
            im = _apply_orientation(im) if exif_orientation else im
            im = icc_to_srgb(im, name) if to_srgb else im
            if not as_image:
                return pil_to_rgb(im, alpha)
            return im if im.mode == 'RGB' and 'transparency' not in im.info else Image.fromarray(pil_to_rgb(im))


# warnings.filters' entry of filterwarnings('ignore', category=Image.DecompressionBombWarning)
_QUIET_BOMB_WARNING = ('ignore', None, Image.DecompressionBombWarning, None, 0)


@contextlib.contextmanager
def decoding(name):
    """Decode with Pillow inside: any failure but running out of memory comes out as BadImage naming
    `name`. Truncated files fail too: Pillow would otherwise pad one with gray as if it were whole.
    (So it sets Pillow's process-wide ImageFile.LOAD_TRUNCATED_IMAGES to False, for other code too.)
    Images of Image.MAX_IMAGE_PIXELS (89 MP) to twice that are decoded without Pillow's two-line
    DecompressionBombWarning, which came in the middle of the progress lines (a researcher's own large
    photos are no attack; those over twice the limit Pillow refuses, a BadImage): that warning is ignored
    from then on in this process, for other code too."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if _QUIET_BOMB_WARNING not in warnings.filters:  # (a context such as warnings.catch_warnings drops it)
        warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
    try:
        yield
    except BadImage:
        raise
    except FileNotFoundError:
        raise BadImage(name, 'no such file') from None
    except UnidentifiedImageError:
        raise BadImage(name, 'not an image (Pillow cannot identify its format)') from None
    except MemoryError:
        raise
    except Exception as e:  # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError...
        raise BadImage(name, f'cannot decode ({type(e).__name__}: {e})') from e


_TRANSPOSE = getattr(Image, 'Transpose', Image)  # Pillow >= 9.1 names them Image.Transpose.*
EXIF_ORIENTATION = {2: _TRANSPOSE.FLIP_LEFT_RIGHT, 3: _TRANSPOSE.ROTATE_180, 4: _TRANSPOSE.FLIP_TOP_BOTTOM,
                    5: _TRANSPOSE.TRANSPOSE, 6: _TRANSPOSE.ROTATE_270, 7: _TRANSPOSE.TRANSVERSE,
                    8: _TRANSPOSE.ROTATE_90}


def _apply_orientation(im):
    """The image as the camera meant it to be seen (EXIF tag 0x0112). Only the pixels are turned:
    ImageOps.exif_transpose also rewrites the EXIF block, and one malformed tag of a camera's
    made a readable photo fail there."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # an EXIF block Pillow cannot parse: the pixels as stored
        orientation = 1
    method = EXIF_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return im.transpose(method) if method is not None else im


ICC_MODES = {'RGB': 'RGB', 'RGBA': 'RGBA', 'CMYK': 'RGB', 'L': 'RGB'}  # Pillow mode -> mode after icc_to_srgb


def icc_to_srgb(im, name):
    """The loaded image `im` with its pixels converted from its embedded ICC profile to sRGB (LittleCMS
    through Pillow's ImageCms, perceptual intent; alpha kept); `im` itself when it has no profile. A
    palette image, or an L or RGB one with a transparency key, is first made RGB, RGBA or LA as
    pil_to_rgb reads it (the transform would drop a key's alpha; it takes no palette). A profile that
    cannot be used (unreadable, or of another colour space than the pixels) leaves the pixels as
    stored, with a warning naming `name`. A LAB image (a CIELab TIFF) is returned as it is: its values are
    L*a*b*, which pil_to_rgb converts to sRGB itself, so a profile it carries is not needed."""
    icc = im.info.get('icc_profile')
    if not icc or im.mode == 'LAB':
        return im
    key = im.mode in ('P', 'L', 'RGB') and 'transparency' in im.info
    if im.mode in ('P', 'PA') or key:
        im = im.convert('LA' if im.mode == 'L' else 'RGBA' if im.mode == 'PA' or key else 'RGB')
    try:
        if im.mode == 'LA':  # LittleCMS garbles gray + alpha (all 0 alpha): the gray alone, its alpha put back
            out = _icc_transform(icc, 'L').apply(im.getchannel('L'))
            out.putalpha(im.getchannel('A'))
            return out
        if im.mode not in ICC_MODES:
            raise ValueError(f'no conversion for mode {im.mode}')
        return _icc_transform(icc, im.mode).apply(im)
    except MemoryError:
        raise
    except Exception as e:  # ImageCms.PyCMSError, OSError, ImportError (a Pillow without LittleCMS)
        print(f'warning: {name}: its ICC profile was not applied, pixels taken as sRGB '
              f'({type(e).__name__}: {e})', file=sys.stderr)
        return im


@functools.lru_cache(maxsize=16)
def _icc_transform(icc, mode):
    """The ImageCms transform from the profile `icc` (bytes) to sRGB; photos of one camera share it."""
    from PIL import ImageCms  # not at import time: training never needs it
    source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    return ImageCms.buildTransform(source, ImageCms.createProfile('sRGB'), mode, ICC_MODES[mode])


def pil_to_rgb(im, alpha=False):
    """RGB uint8 (H, W, 3) from a loaded PIL image of any mode.

    1, L, P, RGB, CMYK, YCbCr, LAB: Pillow's own conversion (LAB, an 8-bit CIELab TIFF: L*a*b* relative
    to D50, as Photoshop and libtiff take them; through LittleCMS). LA, La, PA, RGBA, RGBa, and P or L or RGB
    with a transparency key: composited over white, or with alpha=True returned as RGBA (H, W, 4) as
    Pillow converts them (straight, not premultiplied, colour; a key's colour gets alpha 0).
    I;16* (16-bit): v / 257, i.e. the 16-bit range mapped onto 0..255 without clipping. I (32-bit: 16-bit
    PGM, which Pillow scales to 0..65535, and 32-bit TIFFs) and F have no fixed range, so the values'
    range decides: 0..1 -> x255 (F only), 0..255 as is, 0..65535 -> /257, any other range min-max
    stretched to 0..255.
    """
    mode = im.mode
    if mode.startswith('I;16'):
        a = np.asarray(im).astype(np.float32) / 257.0
        return _gray_to_rgb(a)
    if mode in ('I', 'F'):
        a = np.asarray(im).astype(np.float64)
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode == 'F' and lo >= 0 and hi <= 1:
            a = a * 255.0
        elif lo >= 0 and hi <= 255:
            pass
        elif lo >= 0 and hi <= 65535:
            a = a / 257.0
        else:
            a = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        return _gray_to_rgb(a)
    if mode in ('LA', 'La', 'PA', 'RGBA', 'RGBa') or 'transparency' in im.info:
        if alpha:
            return np.asarray(im.convert('RGBA'), dtype=np.uint8).copy()
        rgba = np.asarray(im.convert('RGBA'), dtype=np.float32)
        opacity = rgba[..., 3:] / 255.0
        out = rgba[..., :3] * opacity + 255.0 * (1.0 - opacity)
        return np.ascontiguousarray(np.round(out).astype(np.uint8))
    if mode != 'RGB':
        im = im.convert('RGB')
    return np.asarray(im, dtype=np.uint8).copy()


def _gray_to_rgb(a):
    g = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def is_grayscale(rgb, tol=6, quantile=0.99):
    """True if the image has negligible colour: the `quantile` (99th percentile) over pixels of
    max(|R-G|, |G-B|, |R-B|) (= max - min over the channels) is <= `tol` levels of 255. Scans of
    black-and-white photos and gray JPEGs stored as RGB (channels differ by JPEG noise of a few
    levels) pass; a photo with colour on more than 1% of its pixels does not. Large images are
    read on a strided grid of about 256x256 pixels."""
    h, w = rgb.shape[:2]
    step = max(1, min(h, w) // 256)
    r, g, b = (rgb[::step, ::step, c] for c in range(3))
    # Channel by channel: numpy's max over a last axis of 3 took 25x longer, more than the decoding.
    spread = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)  # uint8: max >= min
    # np.quantile interpolates between the sorted spreads k and k + 1, k = floor(quantile (n - 1)), so
    # the answer depends only on how many spreads are <= tol, unless that count puts the boundary at
    # k (with a margin of one against rounding): a count, not np.quantile's partition, which took
    # 1.5 ms of 1.7 for a 500 x 375 photo.
    n = spread.size
    k = math.floor(quantile * (n - 1))
    within = n - np.count_nonzero(spread > tol)  # sorted, spreads 0 .. within - 1 are <= tol
    if k + 2 < within:  # both neighbours <= tol
        return True
    if k - 1 >= within:  # the lower neighbour > tol, and the interpolation is not below it
        return False
    return bool(np.quantile(spread.astype(np.int16), quantile) <= tol)


# ----------------------------------------------------------------------------------------------
# Augmentation

def _short_side_size(h, w, short_side):
    """(height, width) with the short side `short_side` and the aspect ratio kept, the long side
    rounded to the nearest integer (at least 1)."""
    if h <= w:
        return short_side, max(1, round(w * short_side / h))
    return max(1, round(h * short_side / w)), short_side


def _pad_to(rgb, crop):
    """Zero-pad (centred; an odd pixel of padding goes below and right) so both sides are >= crop."""
    h, w = rgb.shape[:2]
    ph, pw = max(0, crop - h), max(0, crop - w)
    if ph == 0 and pw == 0:
        return rgb
    return np.pad(rgb, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


def random_crop(rgb, crop, short_side_range, flip, rng):
    """Training augmentation: resize (bilinear) so the short side is an integer drawn from
    U[lo, hi] (inclusive), zero-pad (centred) if smaller than `crop`, take a random crop x crop
    window, flip horizontally with p = 0.5 if `flip`. uint8 (H, W, 3) -> uint8 (crop, crop, 3),
    C-contiguous, possibly read-only (a view of Pillow's output: copy before writing into it).
    The draws from `rng` (np.random.Generator) are the same in number whatever the image."""
    x, flipped = _random_window(rgb, crop, short_side_range, flip, rng)
    return mirror(x) if flipped else np.ascontiguousarray(x)


def _random_window(rgb, crop, short_side_range, flip, rng):
    """random_crop's window before any flip, and whether to flip it: (uint8 (crop, crop, 3), possibly
    a read-only view, bool). `rgb` as _resized_crop takes it."""
    lo, hi = short_side_range
    short = int(rng.integers(lo, hi + 1))
    u_y, u_x, u_flip = rng.random(3)
    x = _resized_crop(rgb, crop, short, lambda room: int(u_y * (room + 1)), lambda room: int(u_x * (room + 1)))
    return x, bool(flip and u_flip < 0.5)


def mirror(a):
    """a[:, ::-1] (left to right) as a new C-contiguous array, for (H, W) or (H, W, C): torch's flip,
    as numpy's copy of 3-byte pixels takes about 10x longer."""
    return torch.from_numpy(np.require(a, requirements=('C', 'W'))).flip(1).numpy()


def center_crop(rgb, crop, short_side):
    """Validation view: resize so the short side is `short_side`, zero-pad if needed, take the
    central crop x crop window. uint8 (H, W, 3) -> uint8 (crop, crop, 3)."""
    return _resized_crop(rgb, crop, short_side, lambda room: room // 2, lambda room: room // 2)


def _resized_crop(rgb, crop, short_side, top, left):
    """The crop x crop window of `rgb` resized (bilinear) to short side `short_side` and zero-padded
    (centred) to at least crop x crop; top(room) and left(room) place it, room = padded side - crop.

    Only the resized pixels from the window's nearer edges through the window are computed (at most
    twice the window's, else the window alone: _resampled_window), never the whole resized image: a
    2 x 3000 banner at short side 600 would be 1.6 GB. Values match resizing the whole image with
    Pillow and cropping to within 1-2 levels of 255 (fixed-point rounding).
    `rgb`: uint8 (H, W, 3), or a Pillow image in mode RGB (resized as it is: the same pixels)."""
    image = rgb if isinstance(rgb, Image.Image) else None
    w, h = image.size if image is not None else rgb.shape[1::-1]
    nh, nw = (h, w) if min(h, w) == short_side else _short_side_size(h, w, short_side)
    y0, x0 = top(max(nh, crop) - crop), left(max(nw, crop) - crop)
    ch, cw = min(nh, crop), min(nw, crop)  # a side shorter than the crop is padded, not cut
    return _pad_to(resized_window(rgb, (nh, nw), y0, x0, ch, cw), crop)


def resized_window(rgb, size, top, left, height, width):
    """Rows [top, top + height) and columns [left, left + width) of `rgb` resized whole to size = (h, w)
    by Pillow's bilinear filter (widened by the scale when shrinking), computing only the window and what
    lies between it and the nearer edges (_resampled_window): within 2 levels of Pillow's whole resize,
    sliced. `rgb`: uint8 (H, W, 3), or a Pillow image in mode RGB. Returns uint8 (height, width, 3),
    possibly a read-only view of `rgb`. The training crops of both scripts are cut this way."""
    image = rgb if isinstance(rgb, Image.Image) else None
    w, h = image.size if image is not None else rgb.shape[1::-1]
    if tuple(size) == (h, w):
        return (rgb if image is None else np.asarray(image))[top:top + height, left:left + width]
    return _resampled_window(rgb, h, w, size[0], size[1], top, left, height, width)


def _resampled_window(rgb, h, w, nh, nw, y0, x0, ch, cw):
    """Rows [y0, y0 + ch) and columns [x0, x0 + cw) of `rgb` (h x w) resized whole to nh x nw by Pillow's
    bilinear filter (widened by the scale when shrinking): uint8 (ch, cw, 3), possibly a read-only view.

    torch's uint8 antialiased bilinear resize gives Pillow's pixels (within 1-2 levels) in about half
    Pillow's time, but it places output pixel i at (i + 0.5) * scale from its input's first pixel, with
    no fractional offset such as Pillow's box=. So it resizes the source from the window's nearer edge
    of each axis (mirrored when that is the far edge: the filter is symmetric) through the window, and
    the window is sliced out of that. Pillow resamples the window alone, from the source under it, where
    that would be over twice the window's pixels (a window far into a long banner), where `rgb` is a
    Pillow image and the source to resize over 16 times the window's pixels (a large photo shrunk over
    about 4 times: copying it out of Pillow would cost more than Pillow's resize), and where torch's
    output would be one column wide (short side 1, or crop 1 at an edge): torch's plain kernel, which
    CPUs without AVX2 (ARM) run, shrinks a width to 1 wrongly when the height changes too (tens of
    levels off; torch 2.4-2.13)."""
    (ry, fy, oh, ty), (rx, fx, ow, tx) = _axis_plan(h, nh, y0, ch), _axis_plan(w, nw, x0, cw)
    image, source = not isinstance(rgb, np.ndarray), (ry.stop - ry.start) * (rx.stop - rx.start)
    if _TORCH_AA is None or ow == 1 or oh * ow > 2 * ch * cw or (image and source > 16 * ch * cw):
        sy, sx = h / nh, w / nw
        return np.asarray((rgb if image else Image.fromarray(rgb)).resize(
            (cw, ch), Image.BILINEAR, box=(x0 * sx, y0 * sy, (x0 + cw) * sx, (y0 + ch) * sy)))
    # A dense, writable copy of the source slice (torch's fast path; np.asarray of an image is read-only),
    # through Pillow's crop where the slice is a small part of a Pillow image (a large PNG, say)
    if not image or 2 * source > h * w:
        t = torch.from_numpy(np.array(np.asarray(rgb)[ry, rx]))
    else:
        t = torch.from_numpy(np.array(rgb.crop((rx.start, ry.start, rx.stop, ry.stop))))
    flips = [d for d, f in ((0, fy), (1, fx)) if f]
    t = t.flip(flips) if flips else t
    # The op under F.interpolate(mode='bilinear', antialias=True), which cannot give it both: with size= the
    # scale is the slice's over the output's (not h / nh), with scale_factor= the output is floor(input x
    # scale), one short for some sizes at the whole axis (7 -> 61 rows: 60).
    out = _TORCH_AA(t.permute(2, 0, 1)[None], [oh, ow], False, nh / h, nw / w)
    out = out[0].permute(1, 2, 0)[ty:ty + ch, tx:tx + cw].numpy()
    return out[::-1 if fy else 1, ::-1 if fx else 1]


# A private op (there since torch 1.11): were a later torch to drop it, Pillow resizes every window (slower).
_TORCH_AA = getattr(torch.ops.aten, '_upsample_bilinear2d_aa', None)


def _axis_plan(n, nn, start, length):
    """_resampled_window's plan for one axis, n source pixels resized to nn, of which [start, start + length)
    are wanted: (the source slice to resize, whether mirrored, the output length, where the wanted part
    starts in that output)."""
    scale = n / nn
    mirrored = start > nn - start - length  # nearer the far edge: resize from there
    start = nn - start - length if mirrored else start
    out = start + length
    m = min(n, math.ceil(out * scale + max(scale, 1)) + 1)  # the source under the output, with the filter's reach
    if m == out:  # torch leaves an axis whose input and output lengths are equal as it is, whatever the scale
        m, out = (m + 1, out) if m < n else (m, out + 1)
    return (slice(n - m, n) if mirrored else slice(0, m)), mirrored, out, start


# ----------------------------------------------------------------------------------------------
# Dataset and sampler

class ColorImages(torch.utils.data.Dataset):
    """Unlabeled colour photos for colorization, decoded and augmented in DataLoader workers.

    dataset[(index, sample_seed)] -> (uint8 tensor (3, crop, crop), status), where sample_seed
    (from InfiniteSampler) alone drives the augmentation, so results do not depend on the number
    or order of workers. status: STATUS_OK (0); STATUS_BAD (1): the file could not be decoded,
    the image is all zeros and a warning naming the file and reason goes to stderr; STATUS_GRAY
    (2): the source image is grayscale (is_grayscale; only if `min_colorful`), image returned as is.
    Paths may be pack pseudo-paths (find_images on a pack): those are read from the pack, their
    gray flag is the one stored when packing, and bad ones are named by their source file.

    train=True: random_crop with a short side in `short_side_range` and flips. train=False: the
    deterministic validation view, center_crop at short side `short_side_range` (an int, or the
    low end of a range), no flip; a plain int index is accepted too.
    """

    def __init__(self, paths, crop, short_side_range, flip=True, min_colorful=True, train=True):
        if isinstance(short_side_range, int):
            short_side_range = (short_side_range, short_side_range)
        lo, hi = (int(s) for s in short_side_range)
        if not 0 < lo <= hi:
            raise ValueError('short_side_range must be (lo, hi) with 0 < lo <= hi, '
                             f'got {short_side_range}')
        self.crop, self.lo, self.hi = int(crop), lo, hi
        self.flip, self.min_colorful, self.train = flip and train, min_colorful, train
        # Paths as one byte buffer + offsets, not a list of str: with millions of files, forked
        # workers would otherwise copy the list page by page as reference counts are touched.
        self._offsets, self._buffer = _encode_strings(paths)

    def __len__(self):
        return len(self._offsets) - 1

    def path(self, index):
        """The path (str) of image `index`, as given."""
        return _decode_string(self._offsets, self._buffer, index)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            index, sample_seed = item
        elif not self.train:
            index, sample_seed = item, 0
        else:
            raise TypeError('ColorImages(train=True) takes (index, sample_seed) pairs; feed it '
                            'from InfiniteSampler (DataLoader(..., sampler=InfiniteSampler(...)))')
        path = self.path(int(index))
        try:
            entry = _packed_entry_or_bad(path)
            # Decode at least as large as the largest short side the augmentation asks for.
            # (As a Pillow image: resized as it is, see _decode; same pixels as load_rgb's.)
            if entry is None:
                im, gray = _decode(path, path, min_short_side=self.hi, as_image=True), None
            else:  # a packed image: its gray flag was computed when packing
                reader, i = entry
                im, gray = reader.load_rgb(i, min_short_side=self.hi, as_image=True), reader.is_gray(i)
        except BadImage as e:
            print(f'warning: bad image {e.path} ({e.reason}); returned as zeros with status 1',
                  file=sys.stderr, flush=True)
            return torch.zeros(3, self.crop, self.crop, dtype=torch.uint8), STATUS_BAD
        if self.min_colorful and gray is None:
            gray = is_grayscale(np.asarray(im))
        status = STATUS_GRAY if self.min_colorful and gray else STATUS_OK
        if self.train:
            out, flipped = _random_window(im, self.crop, (self.lo, self.hi), self.flip,
                                          np.random.default_rng(sample_seed))
            out = out[:, ::-1] if flipped else out
        else:
            out = center_crop(im, self.crop, self.lo)
        # (crop, crop, 3) -> (3, crop, crop): one copy, the flip done in it at no extra cost
        return torch.from_numpy(np.ascontiguousarray(out.transpose(2, 0, 1))), status


def _packed_entry_or_bad(path):
    """packed_entry(path), its ValueError a BadImage: a pack made again or damaged since the run listed it
    (seen by a loader process that opens it afresh) gives unreadable images, counted, not a traceback."""
    try:
        return packed_entry(path)
    except ValueError as e:
        raise BadImage(path, str(e)) from None


_MASK64 = (1 << 64) - 1


def _splitmix64(x):
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def augment_seed(seed, epoch, position):
    """The augmentation seed of the sample at `position` of `epoch`'s permutation: a 63-bit hash
    of (seed, epoch, position)."""
    h = _splitmix64(seed & _MASK64)
    h = _splitmix64(h ^ (epoch & _MASK64))
    return _splitmix64(h ^ (position & _MASK64)) >> 1


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless (index, sample_seed) pairs for one rank, batch after batch, from step `start_step`
    (up to `stop_step` when given: a training run's last step, so that the loader's workers never
    read, nor warn about, images of steps that will not run).

    Epoch e is the permutation torch.randperm(n) drawn with seed * 1000003 + e (mod 2^64; `seed`
    any int). Each epoch has
    steps_per_epoch = (n // world_size) // batch_size steps (the remainder is dropped so ranks
    stay in step); step k of the epoch reads positions [k * world_size * batch_size, ...) of the
    permutation, of which rank r takes the r-th block of batch_size. Global step s therefore
    reads positions fixed by (s, rank) alone: resuming at s reproduces an uninterrupted run, and
    the union over ranks is the same as one rank with world_size * batch_size. Use with
    DataLoader(dataset, batch_size=batch_size, sampler=this); it has no len().
    """

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=0, start_step=0, stop_step=None):
        if not 0 <= rank < world_size:
            raise ValueError(f'rank must be in [0, {world_size}), got {rank}')
        share = n // world_size
        if share < batch_size:
            raise ValueError(f'InfiniteSampler: {n} images over {world_size} ranks gives each rank '
                             f'{share} per epoch, fewer than one batch of {batch_size}; use more '
                             'images or a smaller batch')
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.stop_step = seed, start_step, stop_step
        self.steps_per_epoch = share // batch_size
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch):
        """Epoch `epoch`'s permutation of range(n): int64 numpy array (n,), cached for the last epoch."""
        if epoch != self._perm_epoch:
            # mod 2^64, as torch takes it (it refuses larger ints): a seed from time.time_ns() works too
            g = torch.Generator().manual_seed((self.seed * 1000003 + epoch) & _MASK64)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return self._perm

    def batch(self, step):
        """The (index, sample_seed) pairs this rank reads at global step `step`."""
        epoch, k = divmod(step, self.steps_per_epoch)
        start = (k * self.world_size + self.rank) * self.batch_size
        perm = self.permutation(epoch)
        return [(int(perm[p]), augment_seed(self.seed, epoch, p))
                for p in range(start, start + self.batch_size)]

    def __iter__(self):
        step = self.start_step
        while self.stop_step is None or step < self.stop_step:
            yield from self.batch(step)
            step += 1


def bad_share_exceeded(n_bad, n_seen, max_share, min_seen):
    """True when more than `max_share` of the images seen were bad files (once `min_seen` images
    have been seen, so that one early bad file does not stop a run)."""
    return n_seen >= min_seen and n_bad > max_share * n_seen


class StatusCounter:
    """Accumulates ColorImages statuses over batches; str() gives a one-line report."""

    def __init__(self):
        self.counts = [0] * len(STATUS_NAMES)

    def update(self, status):
        """status: int tensor (B,) of STATUS_* values."""
        c = torch.bincount(status.reshape(-1).long().cpu(), minlength=len(STATUS_NAMES)).tolist()
        self.counts = [a + b for a, b in zip(self.counts, c)]
        return self

    @property
    def seen(self):
        return sum(self.counts)

    @property
    def bad(self):
        return self.counts[STATUS_BAD]

    @property
    def gray(self):
        return self.counts[STATUS_GRAY]

    def state_dict(self):
        return {'counts': list(self.counts)}

    def load_state_dict(self, state):
        self.counts = list(state['counts'])

    def __str__(self):
        n = max(self.seen, 1)
        parts = ', '.join(f'{name} {c:,} ({100 * c / n:.2f}%)'
                          for name, c in zip(STATUS_NAMES, self.counts))
        return f'images {self.seen:,}: {parts}'


class SlotBatches:
    """Hands batches from DataLoader workers to the main process through a fixed ring of shared-memory
    slots, made once, instead of torch's default: a new shared-memory segment per batch, its file
    descriptor passed on request, mapped page by page and freed after, all in the one process that
    receives every batch. Here the main process (DataLoader's pinning thread on CUDA) only copies a
    batch out of memory it has had mapped all along.

        slots = SlotBatches(workers, depth, batch_size, (3, crop, crop))  # before the workers start
        loader = DataLoader(dataset, batch_size, num_workers=workers, prefetch_factor=depth - 1,
                            collate_fn=slots.collate, pin_memory=...)
        for images, status, *more in slots.batches(loader): ...

    dataset items: (uint8 image tensor of `image_shape`, int, ...); a batch comes out as default
    collation makes it: the images (B, *image_shape), then int64 (B,) tensors of the ints; pinned if
    the DataLoader pins. Worker w writes its k-th batch into slot k % depth of its row and sends only
    (w, k) and the ints by value. DataLoader gives worker w its task k + prefetch_factor only once
    its batch k has reached the caller, so depth = prefetch_factor + 1 never overwrites a batch not
    yet copied; every slot also carries the number of the batch in it, checked before and after the
    copy: a batch overwritten early raises an error instead of passing silently.
    """

    _live = {}  # id -> SlotBatches, in the main process: what a SlotBatch from a worker refers to

    def __init__(self, workers, depth, batch_size, image_shape):
        shape = (workers, depth, batch_size, *image_shape)
        try:
            self.images = torch.empty(shape, dtype=torch.uint8).share_memory_()
        except RuntimeError as e:
            raise RuntimeError(f'the loader could not set aside {math.prod(shape) / 2 ** 30:.2f} GiB of shared '
                               f'memory ({workers} workers x {depth} batches): is /dev/shm too small (in '
                               f'Docker: --shm-size)? Or use fewer --workers. ({e})') from e
        self.seq = torch.full((workers, depth), -1, dtype=torch.int64).share_memory_()
        self.depth, self.key, self._made = depth, f'{os.getpid()}-{id(self)}', 0
        SlotBatches._live[self.key] = self

    def close(self):
        SlotBatches._live.pop(self.key, None)

    def collate(self, samples):
        """In a worker: the batch into this worker's next slot; returns a SlotBatch."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            raise RuntimeError('SlotBatches.collate runs in DataLoader workers (num_workers > 0)')
        w, k = info.id, self._made
        self._made += 1
        s = k % self.depth
        self.seq[w, s] = -1  # being written
        torch.stack([item[0] for item in samples], out=self.images[w, s])
        self.seq[w, s] = k
        ints = tuple(np.array([item[j] for item in samples], dtype=np.int64) for j in range(1, len(samples[0])))
        return SlotBatch(self.key, w, s, k, ints)

    def take(self, w, s, k, pin):
        """In the main process: batch k of worker w copied out of slot s (into pinned memory if `pin`)."""
        if int(self.seq[w, s]) == k:
            # numpy's copy: one thread (a torch copy this large would wake the intra-op thread pool)
            images = self.images[w, s].pin_memory() if pin else torch.from_numpy(self.images[w, s].numpy().copy())
            if int(self.seq[w, s]) == k:
                return images
        raise RuntimeError(f'loader: batch {k} of worker {w} was overwritten before it was read (slot {s} '
                           f'of {self.depth}); does this DataLoader hand out more than {self.depth - 1} '
                           'batches per worker ahead (prefetch_factor)?')

    def batches(self, loader):
        """The loader's batches as tuples of tensors (SlotBatches taken out where not pinned); the
        slots are released when this generator ends or is dropped."""
        try:
            for batch in loader:
                yield batch.collated(pin=False) if isinstance(batch, SlotBatch) else batch
        finally:
            self.close()


class SlotBatch:
    """What a worker sends for one batch: where it is (slot s of worker w, its k-th batch) and the
    ints by value. DataLoader's pinning thread calls pin_memory(), which copies the batch out."""

    def __init__(self, key, w, s, k, ints):
        self.key, self.w, self.s, self.k, self.ints = key, w, s, k, ints

    def collated(self, pin):
        slots = SlotBatches._live.get(self.key)
        if slots is None:
            raise RuntimeError('a SlotBatch reached a process without its SlotBatches (closed?)')
        images = slots.take(self.w, self.s, self.k, pin)
        ints = [torch.from_numpy(a) for a in self.ints]
        if pin:
            ints = [t.pin_memory() for t in ints]
        return (images, *ints)

    def pin_memory(self, device=None):
        return self.collated(pin=True)


STALL_WARNING_S = 300  # seconds the training loop may wait for one batch before it says so


def watch_stalls(batches, after=None, who='', waiting_for='batch from the loader',
                 advice='A worker may be stuck reading a file (an unresponsive network mount?); Ctrl-C stops '
                        'the run; --resume then goes on from its last checkpoint, if it saved one'):
    """Yields what `batches` (a loader) yields. While the caller has waited `after` seconds for
    the next batch, and again at 2x, 4x, ... that, a line on stderr says so: a loader worker stuck
    in a read (an unresponsive network mount) would otherwise hold a run silent for ever. It only
    speaks: the wait goes on, as a slow file system may still answer and a suspended job resumes.
    The time a step spends on its own work between batches is not waiting. `who` prefixes the
    line ('rank 3: '), `waiting_for` and `advice` word it; `after` defaults to STALL_WARNING_S."""
    after = STALL_WARNING_S if after is None else after
    waiting = [None]  # time.monotonic() when the current wait began; None between batches
    done = threading.Event()

    def watch():
        began, warn_at = None, after
        while not done.wait(min(after / 4, 30)):
            since = waiting[0]
            if since != began:  # a new wait, or none
                began, warn_at = since, after
            if since is not None and time.monotonic() - since >= warn_at:
                try:
                    print(f'{who}no {waiting_for} for {time.monotonic() - since:.0f} s; still waiting. {advice}',
                          file=sys.stderr, flush=True)
                except OSError:  # no stderr to speak on: nothing else to do
                    pass
                warn_at *= 2

    # A plain DataLoader forks its workers here, before the thread below exists; SlotBatches' generator
    # and the pack's pool start theirs at the first item, when the thread waits and holds no lock.
    batches = iter(batches)
    threading.Thread(target=watch, name='watch_stalls', daemon=True).start()
    try:
        while True:
            waiting[0] = time.monotonic()
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                waiting[0] = None
            yield batch
    finally:
        done.set()


# ----------------------------------------------------------------------------------------------
# Packs: pre-resized JPEG bytes in a few large files, for training without per-image file opens

_PACK_VERSION = 2  # written by `pack`; packs of version 1 (no CRC32s) are still read, and finished as such
_PACK_INDEX = 'index.npy'
_PACK_NAMES, _PACK_NAME_OFFSETS = 'names.bin', 'names-offsets.npy'
_PACK_BAD = 'bad.jsonl'
_PACK_PROGRESS, _PACK_COMPLETE = 'progress.json', 'complete.json'
_PACK_LOCK = 'lock'  # held (flock) by the process writing the pack
_PACK_FILES = (_PACK_INDEX, _PACK_NAMES, _PACK_NAME_OFFSETS, _PACK_BAD, _PACK_PROGRESS,
               _PACK_COMPLETE, _PACK_LOCK)
PACK_SHARD_BYTES = 4 << 30  # a new shard once the current one would grow past 4 GiB
# index.npy's int64 columns by format version; crc: zlib.crc32 of the stored JPEG bytes (0 for none).
_PACK_COLUMNS = {1: ('shard', 'offset', 'length', 'status'), 2: ('shard', 'offset', 'length', 'status', 'crc')}
_PACK_CRC_FILES = (_PACK_INDEX, _PACK_NAMES, _PACK_NAME_OFFSETS)  # their CRC32s in complete.json (version 2)


def _shard_name(k):
    return f'shard-{k:05d}.bin'


def _is_shard_name(name):
    return (name.startswith('shard-') and name.endswith('.bin') and len(name) == 15
            and name[6:11].isdigit())


def _encode_strings(strings):
    """Strings as (int64 offsets (N + 1,), uint8 buffer): string i is buffer[offsets[i]:
    offsets[i + 1]] in UTF-8 (surrogateescape, so any file name round-trips)."""
    encoded = [os.fspath(s).encode('utf-8', 'surrogateescape') for s in strings]
    offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
    return offsets, np.frombuffer(b''.join(encoded), dtype=np.uint8)


def _size_or_none(path):
    """The size in bytes of the file `path`, None where there is none."""
    return os.path.getsize(path) if os.path.exists(path) else None


def _size_problem(path, size, expected):
    """What is wrong with the pack file `path` of `size` bytes (None: there is no such file)."""
    return f'{path} is missing' if size is None else f'{path} holds {size} bytes, {expected} expected'


def _decode_string(offsets, buffer, i):
    a, b = int(offsets[i]), int(offsets[i + 1])
    return bytes(buffer[a:b]).decode('utf-8', 'surrogateescape')


def shrink_to_short_side(rgb, short_side):
    """uint8 (H, W, 3) -> uint8 (h, w, 3) with min(h, w) == short_side, the aspect ratio kept (long
    side rounded), by Pillow: Image.fromarray(rgb).resize((w, h), Image.LANCZOS,
    reducing_gap=3.0), i.e. a box reduce() by the integer factor int(ratio / 3) first when that is
    at least 2 (shrinking 6x or more), then LANCZOS for the remaining 3x to 6x; below 6x, LANCZOS
    alone. Images whose short side is <= short_side are returned as they are (never upscaled)."""
    h, w = rgb.shape[:2]
    if min(h, w) <= short_side:
        return rgb
    nh, nw = _short_side_size(h, w, short_side)
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.LANCZOS, reducing_gap=3.0))


def _pack_one(path, short_side, quality):
    """(status, JPEG bytes, reason) of one source image; see pack_images."""
    try:
        rgb = load_rgb(path, min_short_side=short_side)
    except BadImage as e:
        return STATUS_BAD, b'', e.reason
    rgb = shrink_to_short_side(rgb, short_side)
    status = STATUS_GRAY if is_grayscale(rgb) else STATUS_OK
    buf = io.BytesIO()
    try:  # e.g. a panorama whose long side passes JPEG's 65,535 pixels
        Image.fromarray(rgb).save(buf, 'JPEG', quality=quality)
    except (OSError, ValueError) as e:
        return STATUS_BAD, b'', f'cannot re-encode as JPEG ({type(e).__name__}: {e})'
    return status, buf.getvalue(), ''


def _pack_task(task):
    """Runs in worker processes: [(status, JPEG bytes, reason)] for task = (paths, short side,
    quality)."""
    paths, short_side, quality = task
    return [_pack_one(p, short_side, quality) for p in paths]


def _process_pool(workers):
    """A pool of `workers` processes, forked (a spawned worker would spend seconds importing torch)
    except where there is no fork and on macOS, whose system libraries (which torch loads) may hold
    threads that fork does not copy: Python itself spawns there by default since 3.8. The callers'
    workers use numpy and Pillow only. The workers exit within a second of their parent's death (a
    killed `pack` leaves none behind)."""
    fork = 'fork' in multiprocessing.get_all_start_methods() and sys.platform != 'darwin'
    ctx = multiprocessing.get_context('fork' if fork else 'spawn')
    deferred = SigintDeferred() if fork else None
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_pool_worker_start,
                                                  initargs=(os.getpid(), deferred))
    if fork:
        # The workers are forked now (by submit, in this thread: all of them, on a fork pool's first task), with
        # a Ctrl-C deferred (SigintDeferred): one that landed while os.fork ran its at-fork hooks was lost, and
        # the work went on. Not deferred while anything waits on the workers: Ctrl-C always stops a wait.
        try:
            with deferred:
                pool.submit(int)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return pool


class SigintDeferred:
    """`with SigintDeferred():` around a fork: a Ctrl-C (SIGINT) inside is recorded, not raised, and goes to
    the SIGINT handler of before as the block ends (a KeyboardInterrupt there, by default). Raised inside
    os.fork's at-fork hooks (Python code: logging registers some), CPython would print "Exception ignored"
    and drop it, and the run went on. (Holding SIGINT back with pthread_sigmask was not enough: it holds it
    from this thread only, another thread takes it, and its handler still runs in this one's hooks.)

    A child forked inside starts with the recording handler: restore_in_child() puts back the one outside
    every SigintDeferred (nested, the one of before is the outer block's recorder, which would drop the
    child's Ctrl-C for good), and `got` then says whether a Ctrl-C reached it meanwhile. Handlers run in
    the main thread only, so in another thread this changes nothing (and a KeyboardInterrupt cannot land
    in its hooks); nor where the SIGINT handler was set outside Python (signal.getsignal None: an
    embedding program's), which signal.signal could not put back."""

    def __init__(self):
        self.got, self.previous, self.outside = [], None, None

    def _record(self, signum, frame):
        self.got.append(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) is not None:
            self.previous = signal.signal(signal.SIGINT, self._record)
            outer = getattr(self.previous, '__self__', None)
            self.outside = outer.outside if isinstance(outer, SigintDeferred) else self.previous
        return self

    def __exit__(self, *exc):
        self.restore()
        if self.got:
            signal.raise_signal(signal.SIGINT)

    def restore(self):
        """The SIGINT handler of before the block back (in the process that entered it)."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)

    def restore_in_child(self):
        """In a child forked inside the block: the SIGINT handler outside every SigintDeferred back."""
        if self.outside is not None:
            signal.signal(signal.SIGINT, self.outside)


if sys.platform != 'win32':  # (multiprocessing has no fork there)
    class SigintDeferredForkProcess(multiprocessing.context.ForkProcess):
        """A forked process whose start defers a Ctrl-C (SigintDeferred) while it forks: a DataLoader forks its
        workers at its first batch, and a Ctrl-C then was lost (training went on). A child that a Ctrl-C
        reached meanwhile ends at once, quietly: the parent stops too."""

        def start(self):
            self._sigint = SigintDeferred()
            with self._sigint:
                super().start()

        def run(self):
            self._sigint.restore_in_child()
            if not self._sigint.got:
                super().run()

    class SigintDeferredForkContext(multiprocessing.context.ForkContext):
        """multiprocessing's fork context, its processes SigintDeferredForkProcess: a DataLoader's
        multiprocessing_context (colorize.worker_context)."""
        Process = SigintDeferredForkProcess

    SIGINT_DEFERRED_FORK = SigintDeferredForkContext()  # (one, as multiprocessing has one of each context)


class SigintDeferredLoader(torch.utils.data.DataLoader):
    """A DataLoader whose iterator is built whole (its workers forked, its queues and pinning thread made)
    before a Ctrl-C that came meanwhile is raised (SigintDeferred). Raised in torch's loop that starts the
    workers (from SigintDeferredForkProcess.start of any worker but the first), it left a half-built
    iterator, whose __del__ printed an AttributeError traceback after the run's "interrupted" line. Only
    the building is deferred, not a persistent loader's next epoch, which waits for its workers: Ctrl-C
    always stops a wait."""

    def _get_iterator(self):
        with SigintDeferred():
            return super()._get_iterator()


def _pool_worker_start(parent, deferred):
    """A pool worker's start: the SIGINT handler of before _process_pool's SigintDeferred (`deferred`, which it
    forks the workers in; None for a spawned one) back, and exit_with_parent(parent)."""
    if deferred is not None:
        deferred.restore_in_child()
    exit_with_parent(parent)


PARENT_CHECK_S = 1.0  # seconds between exit_with_parent's looks at the parent process


def exit_with_parent(parent, message=None):
    """A daemon thread that ends this process (within PARENT_CHECK_S, a second, printing `message`
    to stderr) once its parent `parent` is gone. For a pool worker waiting for tasks, which would
    otherwise wait forever (it holds the queue's other end itself), and a torchrun worker whose
    torchrun was killed (it would train on unseen, holding its GPU)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        try:
            if message:
                print(message, file=sys.stderr, flush=True)
        finally:  # even when stderr died with the parent (a closed pipe)
            os._exit(1)
    threading.Thread(target=watch, daemon=True).start()


def _ordered_map(fn, args, pool, window):
    """fn(a) for a in `args`, in order; with a pool, at most `window` calls in flight (so the
    results of millions of images never pile up in memory)."""
    if pool is None:
        yield from map(fn, args)
        return
    pending = collections.deque()
    for a in args:
        pending.append(pool.submit(fn, a))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _read_json(path):
    """The JSON object in `path`, or None if there is no such file."""
    try:
        with open(path, encoding='utf-8') as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except ValueError as e:  # UnicodeDecodeError too
        raise ValueError(f'{path} is not valid JSON ({e}); it belongs to a pack: delete the '
                         'pack folder and pack again') from None
    if not isinstance(obj, dict):
        raise ValueError(f'{path} holds a JSON {type(obj).__name__}, not the object a pack writes there; '
                         'delete the pack folder and pack again')
    return obj


def _pack_command(root, params):
    """The `python data.py pack` command line that makes (or finishes) the pack `root`."""
    return ' '.join(['python data.py pack --data', *map(shlex.quote, params['roots']),
                     '--out', shlex.quote(root), '--short-side', str(params['short_side']),
                     '--quality', str(params['quality'])])


def _pack_state(root):
    """'complete', 'incomplete' (packing started, not finished) or None (not a pack)."""
    if os.path.isfile(os.path.join(root, _PACK_COMPLETE)) and any(
            os.path.exists(os.path.join(root, n)) for n in (_PACK_INDEX, _PACK_NAMES, _shard_name(0))):
        return 'complete'  # whole or not: PackReader checks (index.npy lost in a copy, say)
    if not os.path.isfile(os.path.join(root, _PACK_INDEX)):
        return None
    if os.path.exists(os.path.join(root, _PACK_PROGRESS)):
        return 'incomplete'
    return None


def pack_short_side(root):
    """The short side a complete pack's images were resized to, or None if `root` is not one."""
    if _pack_state(os.fspath(root)) != 'complete':
        return None
    return _read_json(os.path.join(os.fspath(root), _PACK_COMPLETE))['params']['short_side']


def _incomplete_pack_error(root):
    progress = _read_json(os.path.join(root, _PACK_PROGRESS))
    _check_progress(root, progress)  # damaged: that line (delete it, pack again), not a KeyError below
    done = f'{progress["done"]:,} of {progress["total"]:,} images packed'
    writer = _pack_writer(root)
    if writer is not None:  # its command run again would be refused: the pack is in use
        return ValueError(f'pack {root} is incomplete and still being written by {writer} ({done} so far): '
                          f'wait for that `data.py pack` to finish')
    return ValueError(f'pack {root} is incomplete ({done}): run `{_pack_command(root, progress["params"])}` '
                      f'again to finish it')


def _unstarted_pack_error(root):
    """The ValueError for a folder with no pack in it (_pack_state None) that `data.py pack` has begun, or None:
    its lock held (the pack lists its images, which can take minutes, then lays out its files), or pack files
    there, and nothing else, without the progress.json that a started pack records (stopped before it)."""
    writer = _pack_writer(root)
    if writer is not None:
        return ValueError(f'pack {root} is being started by {writer} (listing its images or laying out its '
                          f'files): wait for that `data.py pack` to finish')
    names = os.listdir(root) if os.path.isdir(root) else []
    if names and all(n.split('.tmp-')[0] in _PACK_FILES or _is_shard_name(n) for n in names):  # as _lock_pack
        return ValueError(f'pack {root} is unfinished: its `data.py pack` stopped before it recorded its '
                          f'progress ({_PACK_PROGRESS}); run that command again to pack it')
    return None


def _pack_writer(root):
    """'pid N on HOST' (what exclusive_lock wrote) while a process holds the lock of the pack `root`, else
    None (also where flock is missing or unsupported). Takes no lock itself and writes nothing."""
    try:
        import fcntl
        f = open(os.path.join(root, _PACK_LOCK))
    except (ImportError, OSError):
        return None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or 'another process'
        except OSError:
            return None
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def _source_tail(source):
    """(folder name, file name) of a source path, as repeated at the end of its pseudo-path."""
    parts = source.rsplit(os.sep, 2)
    if len(parts) == 3 and parts[1] and parts[2] and not os.altsep:  # as below, at a fourth of the cost
        return parts[1], parts[2]
    folder, name = os.path.split(source)
    return os.path.basename(folder) or '_', name


def pack_paths(root):
    """The pseudo-paths of the images of the complete pack `root`, in index order (so sorted):
    root/index.npy/<i>/<folder>/<name>, i zero-padded to 9 digits, <folder>/<name> the last two
    components of the image's source path (e.g. .../index.npy/000000000/n01440764/
    n01440764_10026.JPEG), so that code reading class folders or file names from paths sees the
    source's. Never a real file: index.npy is a file in a pack. Raises ValueError if the pack is
    incomplete."""
    reader = PackReader(root)
    width = max(9, len(str(len(reader) - 1)))  # zero-padded, so that sorting keeps the order
    head = os.path.join(reader.root, _PACK_INDEX)
    if os.altsep:  # (Windows: os.path.join's rules for drives)
        return [os.path.join(head, f'{i:0{width}d}', *_source_tail(source))
                for i, source in enumerate(reader.sources())]
    # os.path.join's result, as no part holds a separator (nor starts a root): 11 s for 3.7M images, now 3 s
    sep = os.sep
    return [f'{head}{sep}{i:0{width}d}{sep}' + sep.join(_source_tail(source))
            for i, source in enumerate(reader.sources())]


class PackReader:
    """Random access to a complete pack (see pack_images): source names and statuses from
    memory-mapped files, JPEG bytes read (pread) from the shards, each opened on first use. Pickles
    as its folder alone, so a copy in another process maps and opens the files itself (a forked copy
    shares the parent's open shards, safely: pread moves no shared file offset). Most code reaches
    it through load_rgb or ColorImages with pseudo-paths (`packed_entry`) rather than directly."""

    def __init__(self, root, check_shards=True):
        self.root = os.path.abspath(os.fspath(root))
        state = _pack_state(self.root)
        if state == 'incomplete':
            raise _incomplete_pack_error(self.root)
        if state is None:
            raise _unstarted_pack_error(self.root) or ValueError(
                f'{self.root} is not a pack: expected a folder written by `python data.py pack`')
        self.info = info = _read_json(os.path.join(self.root, _PACK_COMPLETE))
        self.version = info.get('version')
        if not (type(self.version) is int and self.version in _PACK_COLUMNS):
            raise ValueError(f'pack {self.root} has format version {self.version}, this data.py reads versions '
                             f'{", ".join(map(str, _PACK_COLUMNS))}: {_newer_or(self.version, "pack the images again")}')
        n, shards = info.get('total'), info.get('shards')
        if not (type(n) is int and n >= 0 and isinstance(shards, list) and shards
                and all(type(s) is int and s >= 0 for s in shards)):
            raise self._damaged(f'{_PACK_COMPLETE} lacks its image count or shard lengths')
        params = info.get('params')
        if not (isinstance(params, dict) and 'short_side' in params
                and (params['short_side'] is None or type(params['short_side']) is int)):
            raise self._damaged(f'{_PACK_COMPLETE} lacks its parameters (params.short_side)')  # pack_short_side's
        arrays = {}
        for name in (_PACK_INDEX, _PACK_NAME_OFFSETS):
            try:
                arrays[name] = np.load(os.path.join(self.root, name), mmap_mode='r')
            except FileNotFoundError:
                raise self._damaged(f'{name} is missing') from None
            except (ValueError, EOFError) as e:  # cut short, a flipped header byte, not an .npy
                raise self._damaged(f'{name} cannot be read ({e})') from None
        self.index, self._offsets = arrays[_PACK_INDEX], arrays[_PACK_NAME_OFFSETS]
        if (self.index.dtype != np.int64 or self.index.shape != (n, len(_PACK_COLUMNS[self.version]))
                or self._offsets.dtype != np.int64 or self._offsets.shape != (n + 1,)):
            raise self._damaged(f'{_PACK_COMPLETE} says {n} images, but {_PACK_INDEX} has shape '
                                f'{self.index.shape} ({self.index.dtype}) and {_PACK_NAME_OFFSETS} '
                                f'{self._offsets.shape} ({self._offsets.dtype})')
        names = os.path.join(self.root, _PACK_NAMES)
        size = _size_or_none(names)
        if int(self._offsets[0]) != 0:  # (the names would be read shifted)
            raise self._damaged(f'{_PACK_NAME_OFFSETS} starts at {int(self._offsets[0])}, not 0')
        if size is None or size == 0 or int(self._offsets[-1]) != size:
            raise self._damaged(_size_problem(names, size, int(self._offsets[-1])))
        self._names = np.memmap(names, np.uint8, 'r')
        for k, length in enumerate(shards if check_shards else ()):  # verify_pack names what they lose
            path = os.path.join(self.root, _shard_name(k))
            size = _size_or_none(path)
            if size is None or size < length:
                raise self._damaged(_size_problem(path, size, length))
        self._check_entries()
        self._shards = [None] * len(self.info['shards'])
        self._reasons = None

    def _damaged(self, what):
        return ValueError(f'pack {self.root} is damaged: {what}; delete the folder and pack again')

    def _check_entries(self, rows=1 << 20):
        """Every entry of index.npy a place within its shard with a status, and the name offsets in
        order: a flipped bit or a hand edit there would otherwise mislabel images or read others' bytes.
        Once per process and index file (a forked loader process inherits the check)."""
        path = os.path.join(self.root, _PACK_INDEX)
        st = os.stat(path)
        key = (path, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _CHECKED_PACKS:
            return
        shard_sizes = np.array(self.info['shards'] + [-1], dtype=np.int64)  # -1: no such shard
        for a in range(0, len(self.index), rows):
            shard, offset, length, status = np.asarray(self.index[a:a + rows, :4]).T
            shard = np.where((shard >= 0) & (shard < len(shard_sizes) - 1), shard, -1)
            wrong = ((shard < 0) | (offset < 0) | (length < 0) | (length > shard_sizes[shard] - offset)
                     | ~np.isin(status, (STATUS_OK, STATUS_GRAY, STATUS_BAD))
                     | ((status == STATUS_BAD) & (length != 0)))
            if wrong.any():
                i = a + int(np.argmax(wrong))
                raise self._damaged(f'entry {i} of {_PACK_INDEX} (shard, offset, length, status) is '
                                    f'{tuple(int(v) for v in self.index[i, :4])}: not bytes within a shard, '
                                    'or an unknown status')
        for a in range(0, len(self._offsets) - 1, rows):
            if (np.diff(np.asarray(self._offsets[a:a + rows + 1])) < 0).any():
                raise self._damaged(f'the name offsets in {_PACK_NAME_OFFSETS} go backwards')
        _CHECKED_PACKS.add(key)

    def __reduce__(self):  # never pickle the memory maps or the open shards
        return PackReader, (self.root,)

    def __len__(self):
        return len(self.index)

    def source(self, i):
        """The path of the file image i was packed from."""
        return _decode_string(self._offsets, self._names, i)

    def sources(self):
        """All source paths, in index order (faster than source(i) for each i)."""
        with open(os.path.join(self.root, _PACK_NAMES), 'rb') as f:
            buffer = f.read()
        offsets = self._offsets.tolist()
        return [buffer[a:b].decode('utf-8', 'surrogateescape')
                for a, b in zip(offsets[:-1], offsets[1:])]

    def status(self, i):
        return int(self.index[i, 3])

    def is_gray(self, i):
        return self.status(i) == STATUS_GRAY

    def reason(self, i):
        """Why image i could not be packed ('' if it was). Its status says that it is bad; a reason lost
        from a damaged bad.jsonl is said to be lost, rather than stop the run."""
        if self._reasons is None:
            self._reasons = {}
            with contextlib.suppress(OSError, UnicodeDecodeError):
                with open(os.path.join(self.root, _PACK_BAD), encoding='utf-8') as f:
                    for line in f:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            row = json.loads(line)
                            self._reasons[int(row['index'])] = str(row['reason'])
        if self.status(i) != STATUS_BAD:
            return ''
        return self._reasons.get(i) or f'unreadable when packed (the reason is missing from {_PACK_BAD})'

    def jpeg(self, i):
        """The stored JPEG bytes of image i (empty if bad). Read with pread, not through a memory map:
        a shard truncated while a run reads it (by hand, a sync tool, a network file system) then gives
        a short read, BadImage, where a map's page past the new end kills the process with SIGBUS
        (no message; a loader process's death a traceback)."""
        shard, offset, length = (int(v) for v in self.index[i, :3])
        if length == 0:
            return b''
        try:  # opened on first use: a shard removed since the pack was checked (made again) is unreadable
            if self._shards[shard] is None:
                self._shards[shard] = open(os.path.join(self.root, _shard_name(shard)), 'rb', buffering=0)
            f = self._shards[shard]
            if hasattr(os, 'pread'):
                blob = os.pread(f.fileno(), length, offset)
            else:  # Windows: one process per reader, one thread reading
                f.seek(offset)
                blob = f.read(length)
        except OSError as e:  # EIO: a bad sector, a network file system gone
            raise BadImage(self.source(i), f'cannot read {_shard_name(shard)} ({e.strerror})') from None
        if len(blob) < length:
            raise BadImage(self.source(i), f'{_shard_name(shard)} ends before its bytes (the shard was truncated '
                                           'or replaced since packing: pack again)')
        return blob

    def problem(self, i):
        """What is wrong with image i's stored bytes, '' if nothing (and for an image bad when packed,
        which stores none): with CRC32s (format version 2), bytes other than those packed; without,
        bytes that do not decode. Bytes that cannot be read (a shard cut short, missing) count in both."""
        if self.status(i) == STATUS_BAD:
            return ''
        try:
            blob = self.jpeg(i)
            if self.version < 2:
                _decode(io.BytesIO(blob), self.source(i), as_image=True)
        except BadImage as e:
            return e.reason
        if self.version >= 2 and zlib.crc32(blob) != int(self.index[i, 4]):
            return 'its bytes differ from those packed (CRC32 mismatch)'
        return ''

    def __del__(self):
        for f in getattr(self, '_shards', ()):
            if f is not None:
                f.close()

    def load_rgb(self, i, min_short_side=None, as_image=False):
        """Image i as load_rgb decodes it: RGB uint8 (H, W, 3) (as_image=True: a Pillow image in mode
        RGB, see _decode). Raises BadImage naming the source file for images that were bad when packed
        (with the reason recorded then) or whose stored bytes do not decode."""
        if self.status(i) == STATUS_BAD:
            raise BadImage(self.source(i), f'{self.reason(i)}; recorded when packing {self.root}')
        try:
            return _decode(io.BytesIO(self.jpeg(i)), self.source(i), min_short_side, as_image=as_image)
        except BadImage as e:
            raise BadImage(e.path, f'{e.reason}; in its packed copy, entry {i} of {self.root}'
                           ) from e


# (index.npy path, inode, size, mtime) of the packs whose entries this process checked (PackReader._check_entries).
_CHECKED_PACKS = set()

# (process id, pack folder) -> PackReader. Each process maps the index and opens the shards itself,
# once, on first use: DataLoader workers (forked or spawned) never pickle a memory map or a file.
_OPEN_PACKS = {}


def pseudo_path_parts(path):
    """(pack root, <i>, <folder>, <name>) if `path` has the shape of a pseudo-path into a pack,
    PACK/index.npy/<i>/<folder>/<name> (see pack_paths), else None. The shape only: no file is read."""
    if _PACK_INDEX not in path:  # most paths, at once (millions are checked when a run starts)
        return None
    parts = path.rsplit(os.sep, 4)
    if len(parts) == 5 and all(parts) and not parts[0].endswith(os.sep) and not os.altsep:
        # A pack's pseudo-paths, at a fifth of the cost of four os.path.split (3.5 us: 12 s for 3.7M), which
        # give the same parts where no two separators meet and the root is no drive or '/'
        root, index_name, digits, folder, name = parts
    else:
        rest, name = os.path.split(path)
        rest, folder = os.path.split(rest)
        head, digits = os.path.split(rest)
        root, index_name = os.path.split(head)
    if index_name != _PACK_INDEX or not (digits.isascii() and digits.isdigit()):
        return None
    return root, digits, folder, name


def packed_entry(path):
    """(PackReader, i) if `path` is a pseudo-path PACK/index.npy/<i>/<folder>/<name> into a pack
    (see pack_paths), else None. Such a string can name no real file: in a pack, index.npy is a
    file, not a folder. Raises ValueError for a pseudo-path into an incomplete pack, past its
    end, or whose <folder>/<name> is not that of entry i's source (a list from another pack)."""
    parts = pseudo_path_parts(path)
    if parts is None:
        return None
    root, digits, folder, name = parts
    key = (os.getpid(), root)
    reader = _OPEN_PACKS.get(key)
    if reader is None:
        if _pack_state(root) is None:  # a real folder that happens to be called index.npy
            return None
        reader = _OPEN_PACKS[key] = PackReader(root)
    i = int(digits)
    if i >= len(reader) or _source_tail(reader.source(i)) != (folder, name):
        found = (f'entry {i} is {reader.source(i)}' if i < len(reader) else
                 f'it holds only {len(reader):,} images')
        raise ValueError(f'{path} does not match the pack {reader.root}: {found}; was the pack '
                         'made again since this image list was made? List it again')
    return reader, i


# Failed images named one per line by verify_pack, and kept in its result; the rest only counted, by shard.
# At least 1: its result is empty only for a pack that verified (data.py verify's exit status).
VERIFY_SHOWN = 100


def verify_pack(root, workers=None, task_size=256, log=print, log_every=5.0):
    """Check the complete pack `root` against what `pack` recorded, after copying it, say: each shard's
    size, the CRC32s of index.npy, names.bin and names-offsets.npy, and each stored image's CRC32 (a
    pack of format version 1 has none: its images are decoded instead). Logs a line per failed file
    and image (source path, shard), progress every `log_every` s, and a summary; returns the failures it
    named, [(file name, entry i or None, what)]: every failed file and the first VERIFY_SHOWN failed images
    (the others are only counted, per shard: kept, a pack whose images all fail took ~300 bytes per image,
    1 GB for 3.7M, to say no more). Empty if and only if the pack verified. An index.npy that fails its
    CRC32 leaves the images unchecked: their places and CRC32s are read from it. A pack it cannot open
    at all raises PackReader's ValueError.
    `workers` processes (default usable_cores(); 1 = in this process) take `task_size` images a task."""
    try:
        reader = PackReader(root, check_shards=False)
    except ValueError as e:
        if _pack_state(os.path.abspath(os.fspath(root))) != 'complete':  # not a pack, or unfinished: as it says
            raise
        raise ValueError(f'{e} (a copy: copy it again from the original pack)') from None
    t_start = t_log = time.perf_counter()
    failed = _verify_files(reader)
    files_failed = len(failed)  # the images' failures come after
    for _, _, what in failed:
        log(f'failed: {what}')
    n, workers = len(reader), workers or usable_cores()
    per_shard = collections.Counter()  # failed images per shard, all of them (`failed` keeps the first few)
    images_failed = 0
    index_failed = any(name == _PACK_INDEX for name, _, _ in failed)  # would blame sound shards for its errors
    spans = [] if index_failed else [(a, min(a + task_size, n)) for a in range(0, n, task_size)]
    pool = _process_pool(workers) if workers > 1 and len(spans) > 1 else None
    try:
        found = _ordered_map(_verify_task, ((reader.root, a, b) for a, b in spans), pool, 4 * workers)
        for (_, b), problems in zip(spans, found):
            for i, what in problems:
                shard = _shard_name(int(reader.index[i, 0]))
                per_shard[shard] += 1
                images_failed += 1
                if images_failed <= VERIFY_SHOWN:
                    failed.append((shard, i, what))
                    log(f'failed: entry {i} ({reader.source(i)}) in {shard}: {what}')
            now = time.perf_counter()
            if now - t_log >= log_every:
                t_log, rate = now, b / max(now - t_start, 1e-9)
                log(f'verify: {b:,}/{n:,} images ({100 * b / n:.1f}%), {rate:,.0f} img/s, '
                    f'ETA {_duration((n - b) / rate)}, {files_failed + images_failed:,} failed')
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    log(_verify_summary(reader, failed, per_shard, time.perf_counter() - t_start))
    return failed


def _verify_files(reader):
    """verify_pack's checks of whole files: [(file name, None, what)]."""
    failed = []
    for k, length in enumerate(reader.info['shards']):
        path = os.path.join(reader.root, _shard_name(k))
        size = _size_or_none(path)
        if size != length:
            failed.append((_shard_name(k), None, _size_problem(path, size, length)))
    crcs = reader.info.get('crc32')
    if reader.version >= 2 and not (isinstance(crcs, dict) and all(n in crcs for n in _PACK_CRC_FILES)):
        failed.append((_PACK_COMPLETE, None, f'{os.path.join(reader.root, _PACK_COMPLETE)} lacks the CRC32s '
                       'of the files (its "crc32")'))
    elif reader.version >= 2:
        paths = {n: os.path.join(reader.root, n) for n in _PACK_CRC_FILES}
        failed += [(n, None, f'{path} differs from the file packed (CRC32 mismatch)') for n, path in paths.items()
                   if _file_crc32(path) != crcs[n]]
    return failed


def _verify_task(task):
    """Runs in worker processes: [(i, what is wrong)] for the images [a, b) of a pack, task = (root, a, b)."""
    root, a, b = task
    reader = PackReader(root, check_shards=False)
    return [(i, what) for i, what in ((i, reader.problem(i)) for i in range(a, b)) if what]


def _verify_summary(reader, failed, per_file, seconds):
    """verify_pack's last line; `failed` holds every failed file, `per_file` counts the failed images per shard."""
    n, stored = len(reader), int((reader.index[:, 2] > 0).sum())
    if failed:
        images, names = sum(per_file.values()), sorted({name for name, _, _ in failed} | set(per_file))
        more = f' ({images - VERIFY_SHOWN:,} not named above)' if images > VERIFY_SHOWN else ''
        checked = (f'{images:,} of {n:,} images{more}' if _PACK_INDEX not in names else
                   f'its {n:,} images not checked ({_PACK_INDEX} says where they are and their CRC32s)')
        return (f'pack {reader.root} FAILED verification: {checked}; '
                'files to copy again from the original pack: '
                + ', '.join(name + (f' ({per_file[name]:,} of its images)' if per_file[name] else '') for name in names)
                + f'; then verify again ({_duration(seconds)})')
    if reader.version < 2:
        return (f'pack {reader.root} has no checksums (format version 1, packed before CRC32s): its '
                f'shard sizes match and all {stored:,} stored images of {n:,} decode; a changed byte '
                f'that still decodes goes unseen (pack again for CRC32s) ({_duration(seconds)})')
    return (f'pack {reader.root} verified: shard sizes and the CRC32s of its files and all {stored:,} '
            f'stored images of {n:,} are as packed ({_duration(seconds)})')


def _duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f'{seconds // 3600} h {seconds % 3600 // 60:02d} min'
    if seconds >= 60:
        return f'{seconds // 60} min {seconds % 60:02d} s'
    return f'{seconds} s'


class _PackWriter:
    """Appends packed images to the shards, index and bad-file list of a pack being written;
    commit() makes everything so far durable and records it in progress.json."""

    def __init__(self, root, progress, shard_bytes):
        self.root, self.progress, self.shard_bytes = root, progress, shard_bytes
        self.shards = list(progress['shards'])
        self.counts = list(progress['counts'])
        # Undo whatever an interrupted run wrote after its last commit.
        for k, length in enumerate(self.shards):
            self._truncate(os.path.join(root, _shard_name(k)), length)
        for name in os.listdir(root):
            if _is_shard_name(name) and int(name[6:11]) >= len(self.shards):
                os.remove(os.path.join(root, name))
        self._truncate(os.path.join(root, _PACK_BAD), progress['bad_bytes'])
        self.index = np.load(os.path.join(root, _PACK_INDEX), mmap_mode='r+')
        self.shard = open(os.path.join(root, _shard_name(len(self.shards) - 1)), 'ab')
        self.bad = open(os.path.join(root, _PACK_BAD), 'ab')

    def _truncate(self, path, length):
        size = _size_or_none(path)
        if size is None or size < length:
            raise ValueError(f'pack {self.root} is damaged: {_size_problem(path, size, length)} (by '
                             f'{_PACK_PROGRESS}); delete {self.root} and pack again')
        if size > length:
            os.truncate(path, length)

    def add(self, i, status, blob, reason):
        k = len(self.shards) - 1
        if blob and self.shards[k] and self.shards[k] + len(blob) > self.shard_bytes:
            self._sync(self.shard)
            self.shard.close()
            self.shards.append(0)
            k += 1
            self.shard = open(os.path.join(self.root, _shard_name(k)), 'ab')
        with naming(self.shard.name, 'writing it'):
            self.shard.write(blob)
        row = (k, self.shards[k], len(blob), status, zlib.crc32(blob))
        self.index[i] = row[:self.index.shape[1]]  # a pack of version 1, begun before CRCs, goes on without
        self.shards[k] += len(blob)
        self.counts[status] += 1
        if status == STATUS_BAD:
            with naming(self.bad.name, 'writing it'):
                self.bad.write((json.dumps({'index': i, 'reason': reason}) + '\n').encode('utf-8'))

    @staticmethod
    def _sync(f):
        with naming(f.name, 'writing it'):
            f.flush()
            os.fsync(f.fileno())

    def commit(self, done):
        """Images [0, done) are written: make them durable, then record it atomically."""
        self._sync(self.shard)
        self._sync(self.bad)
        self.index.flush()
        self.progress.update(done=done, shards=list(self.shards), counts=list(self.counts),
                             bad_bytes=self.bad.tell())
        write_json(os.path.join(self.root, _PACK_PROGRESS), self.progress)

    def close(self):
        self.shard.close()
        self.bad.close()
        del self.index


def _file_crc32(path, block=1 << 24):
    """zlib.crc32 of the whole file `path`, read in blocks of `block` bytes."""
    crc = 0
    with open(path, 'rb') as f:
        for b in iter(lambda: f.read(block), b''):
            crc = zlib.crc32(b, crc)
    return crc


def _pack_start(root, params, paths):
    """Lay out an empty pack for `paths` in `root` (no pack files in it yet, or only those of a
    start that was interrupted before its first progress.json: `_lock_pack` has checked that it
    holds nothing else); returns the progress dict."""
    for name in os.listdir(root):
        if name != _PACK_LOCK:
            os.remove(os.path.join(root, name))
    offsets, buffer = _encode_strings(paths)
    with open(os.path.join(root, _PACK_NAMES), 'wb') as f:
        f.write(buffer.tobytes())
    np.save(os.path.join(root, _PACK_NAME_OFFSETS), offsets)
    index = np.lib.format.open_memmap(os.path.join(root, _PACK_INDEX), mode='w+', dtype=np.int64,
                                      shape=(len(paths), len(_PACK_COLUMNS[_PACK_VERSION])))
    index.flush()
    del index
    for name in (_shard_name(0), _PACK_BAD):
        open(os.path.join(root, name), 'wb').close()
    progress = {'version': _PACK_VERSION, 'params': params, 'total': len(paths), 'done': 0,
                'shards': [0], 'bad_bytes': 0, 'counts': [0] * len(STATUS_NAMES)}
    write_json(os.path.join(root, _PACK_PROGRESS), progress)
    return progress


def _check_progress(root, progress):
    """ValueError unless progress.json's dict has the fields and types that _pack_start writes."""
    fields = {'params': dict, 'total': int, 'done': int, 'shards': list, 'bad_bytes': int, 'counts': list}
    wrong = [k for k, kind in fields.items() if type(progress.get(k)) is not kind]
    if not wrong and not (0 <= progress['done'] <= progress['total'] and progress['shards']
                          and all(type(v) is int for v in progress['shards'] + progress['counts'])
                          and len(progress['counts']) == len(STATUS_NAMES)):
        wrong = ['done', 'shards', 'counts']
    if wrong:
        raise ValueError(f'{os.path.join(root, _PACK_PROGRESS)} is damaged (its {", ".join(wrong)}): '
                         f'delete {root} and pack again')


def _newer_or(version, advice):
    """What to do about a pack of format `version`, which this data.py does not read: `advice`, unless a
    newer data.py wrote it."""
    newer = type(version) is int and version > max(_PACK_COLUMNS)
    return 'a newer data.py wrote it: update this one (git pull), or ' + advice if newer else advice


def _check_pack_params(root, found, params):
    if not (type(found.get('version')) is int and found['version'] in _PACK_COLUMNS):
        raise ValueError(f'{root} holds a pack of format version {found.get("version")}, but this data.py knows '
                         f'versions {", ".join(map(str, _PACK_COLUMNS))}: '
                         + _newer_or(found.get('version'), f'pack into another folder, or delete {root} to repack'))
    old = found['params']
    flags = {'roots': '--data', 'short_side': '--short-side', 'quality': '--quality'}
    diffs = [f'{flag} {_cli_value(old.get(k))} (asked: {_cli_value(params[k])})'
             for k, flag in flags.items() if old.get(k) != params[k]]
    if diffs:
        raise ValueError(f'{root} holds a pack made with other arguments: {"; ".join(diffs)}. '
                         f'Pack into another folder, or delete {root} to repack')


def _cli_value(v):
    return ' '.join(map(shlex.quote, v)) if isinstance(v, list) else str(v)


def pack_images(roots, out, short_side, quality=90, workers=None, cache_dir=None, chunk=8192,
                task_size=16, shard_bytes=PACK_SHARD_BYTES, log=print, log_every=5.0):
    """Pack the images under `roots` (folders or .txt lists, as for find_images) into the folder
    `out`, pre-resized, for training with `--data out`; returns the complete.json dict.

    Each source is decoded by load_rgb (any mode, EXIF orientation; JPEGs drafted to a
    1/2^k scale whose short side is still >= short_side, as Pillow's draft picks it), shrunk by
    shrink_to_short_side (LANCZOS; never upscaled), flagged gray by is_grayscale of the shrunk
    pixels, and encoded as JPEG at `quality` (Pillow's default 4:2:0 chroma subsampling).
    Files that fail to decode are recorded as bad with their reason. The folder holds:

        shard-00000.bin, ...  the JPEG bytes back to back; a new shard once one would pass
                              `shard_bytes` (4 GiB)
        index.npy             int64 (N, 5): shard, offset, length, status, crc per image, in
                              the sorted order of find_images (np.load(..., mmap_mode='r'));
                              status STATUS_OK, STATUS_GRAY (still stored) or STATUS_BAD
                              (length 0, nothing stored); crc the zlib.crc32 of the stored
                              bytes (format version 2; version 1 packs have (N, 4), no crc)
        names.bin, names-offsets.npy  the source paths: UTF-8 (surrogateescape) back to back,
                              int64 (N + 1,) offsets; path i = names[off[i]:off[i + 1]]
        bad.jsonl             {"index": i, "reason": "..."} per bad image
        progress.json         params (roots, short_side, quality), done, shard lengths, ...
        complete.json         written last: version, params, total, shard lengths, status
                              counts, and the CRC32s of index.npy, names.bin, names-offsets.npy

    Work proceeds in chunks of `chunk` images, in order, over `workers` processes (default:
    usable_cores(); 1 = in this process) in tasks of `task_size` images; after each chunk the shards are
    synced and progress.json replaced atomically. Run again with the same arguments, it truncates
    the files to the recorded lengths and continues (the listing is the one saved at the start);
    on a complete pack it does nothing. Other arguments on an existing pack raise ValueError.

    Training reads a pack through its pseudo-paths (`pack_paths`), which find_images returns
    for a pack root.
    """
    out = os.path.abspath(os.fspath(out))
    if isinstance(roots, (str, os.PathLike)):
        roots = [roots]
    params = {'roots': sorted({os.path.abspath(os.fspath(r)) for r in roots}),
              'short_side': int(short_side), 'quality': int(quality)}
    if params['short_side'] < 1 or not 1 <= params['quality'] <= 100:
        raise ValueError(f'pack: expected short_side >= 1 and quality in 1..100, got '
                         f'{short_side} and {quality}')
    if out in params['roots']:
        raise ValueError(f'pack: --out {out} is also one of the --data roots; pick another folder')
    complete = _complete_pack(out, params, log)  # read only: no need for the lock
    if complete is not None:
        return complete
    lock = _lock_pack(out)
    try:
        return _pack(out, params, short_side, quality, workers, cache_dir, chunk, task_size, shard_bytes,
                     log, log_every)
    finally:
        lock.close()  # releases the lock


def _complete_pack(out, params, log):
    """complete.json's dict if `out` is a complete pack made with `params` (else ValueError), or None."""
    complete = _read_json(os.path.join(out, _PACK_COMPLETE))
    if complete is not None:
        PackReader(out)  # damaged (complete.json without its fields, say): that line, not a KeyError below
        _check_pack_params(out, complete, params)
        log(f'pack {out} is already complete ({complete["total"]:,} images, made with the same '
            'arguments): nothing to do (a pack holds the images listed when it started; to take in '
            'images added since, pack into a new folder)')
    return complete


def _lock_pack(out):
    """An exclusive lock on out/lock for the whole run: a second `pack` into the same folder (a
    job started twice) would cut back and interleave the first one's shards."""
    if os.path.isdir(out):
        foreign = [n for n in os.listdir(out) if not (n.split('.tmp-')[0] in _PACK_FILES or _is_shard_name(n))]
        if foreign:
            raise ValueError(f'{out} exists and holds files that are not part of a pack (e.g. '
                             f'{foreign[0]}): pack into a new or empty folder')
    os.makedirs(out, exist_ok=True)
    lock, holder = exclusive_lock(os.path.join(out, _PACK_LOCK), retry=0.05)  # readers probe it: _pack_writer
    if lock is None:
        raise ValueError(f'pack {out} is being written by {holder}: wait for it to finish (run the same '
                         'command again afterwards to check that it is complete)')
    return lock


def exclusive_lock(path, retry=None):
    """Take an exclusive flock on the file `path` without waiting (or, with `retry` seconds, trying once
    more after them: for a lock that others probe for microseconds), and write 'pid N on HOST' into it.
    Returns (the open file, which holds the lock until it is closed, None), or, where another process
    holds it, (None, what that process wrote). Where flock is missing (not POSIX) or unsupported (some
    network mounts), the file is returned unlocked: the work goes on without the guard. The file's
    attribute `locked` says which."""
    lock = open(path, 'a+')
    try:
        import fcntl
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if retry is None:
                raise
            time.sleep(retry)
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.locked = True
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        lock.close()
        return None, holder
    except (ImportError, OSError):
        lock.locked = False
    lock.seek(0)
    lock.truncate()
    lock.write(f'pid {os.getpid()} on {socket.gethostname()}\n')
    lock.flush()
    return lock, None


def _pack(out, params, short_side, quality, workers, cache_dir, chunk, task_size, shard_bytes, log, log_every):
    """pack_images' work, with the pack's lock held."""
    complete = _complete_pack(out, params, log)  # by a run that held the lock before this one
    if complete is not None:
        return complete
    progress = _resume_or_start_pack(out, params, cache_dir, log)
    total, start = progress['total'], progress['done']
    offsets, names = _pack_names(out, progress)
    spans = _pack_spans(start, total, chunk, task_size)
    tasks = (([_decode_string(offsets, names, i) for i in range(t0, t1)], short_side, quality)
             for t0, t1, _ in spans)
    workers = workers or usable_cores()
    writer = _PackWriter(out, progress, shard_bytes)
    pool = None
    t_start = t_log = time.perf_counter()
    try:
        if workers > 1 and total - start > task_size:
            pool = _process_pool(workers)
        results = watch_stalls(_ordered_map(_pack_task, tasks, pool, window=4 * workers),
                               waiting_for='image decoded', advice='A file may be stuck being read (an unresponsive '
                               'network mount?); Ctrl-C stops the pack, and the same command again goes on from '
                               'its last commit')
        for (t0, t1, chunk_end), packed in zip(spans, results):
            for i, (status, blob, reason) in zip(range(t0, t1), packed):
                writer.add(i, status, blob, reason)
            if t1 == chunk_end:
                writer.commit(t1)
            now = time.perf_counter()
            if now - t_log >= log_every:
                t_log = now
                rate = (t1 - start) / max(now - t_start, 1e-9)
                log(f'pack: {t1:,}/{total:,} images ({100 * t1 / total:.1f}%), {rate:,.0f} img/s, '
                    f'ETA {_duration((total - t1) / rate)}, {writer.counts[STATUS_BAD]:,} bad, '
                    f'{writer.counts[STATUS_GRAY]:,} gray')
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        writer.close()
    return _finish_pack(out, params, progress, writer, t_start, log)


def _resume_or_start_pack(out, params, cache_dir, log):
    """The progress dict of the unfinished pack in `out` (checked, and made with `params`), or, where none
    was begun, of a new one laid out for the images that find_images lists under params['roots'] now."""
    progress = _read_json(os.path.join(out, _PACK_PROGRESS))
    if progress is not None:
        _check_progress(out, progress)
        _check_pack_params(out, progress, params)
        log(f'resuming the pack in {out} at {progress["done"]:,}/{progress["total"]:,} images '
            '(the image list saved when it started)')
        return progress
    return _pack_start(out, params, find_images(params['roots'], cache_dir, log))


def _pack_names(out, progress):
    """(int64 offsets (N + 1,), uint8 names) of the source paths saved when the unfinished pack in `out`
    started, memory-mapped, after checking that they and index.npy hold progress['total'] images: a
    ValueError for a damaged copy, an OSError for an unreadable file."""
    total = progress['total']
    try:  # an interrupted copy of an unfinished pack
        offsets = np.load(os.path.join(out, _PACK_NAME_OFFSETS), mmap_mode='r')
        names = np.memmap(os.path.join(out, _PACK_NAMES), np.uint8, 'r')
        index = np.load(os.path.join(out, _PACK_INDEX), mmap_mode='r')
        if index.shape != (total, len(_PACK_COLUMNS[progress['version']])) or offsets.shape != (total + 1,):
            raise ValueError(f'{_PACK_INDEX} has shape {index.shape}, {_PACK_NAME_OFFSETS} {offsets.shape}; '
                             f'{_PACK_PROGRESS} says {total} images')
        del index
        if int(offsets[-1]) != len(names):
            raise ValueError(f'{_PACK_NAMES} holds {len(names)} bytes, {int(offsets[-1])} expected')
    except (OSError, ValueError, EOFError, IndexError) as e:
        if isinstance(e, OSError) and os_error_text(e) is not None:  # unreadable: the user's to fix
            raise
        raise ValueError(f'the unfinished pack in {out} is damaged ({e}): delete {out} and pack again') from None
    return offsets, names


def _pack_spans(start, total, chunk, task_size):
    """[(first image, end of the task, end of its chunk)] of the tasks that pack images [start, total): chunks
    of `chunk` images from `start`, each cut into tasks of `task_size`. Tasks never straddle chunks: the
    end of a task may be the end of a chunk, to commit."""
    return [(t0, min(t0 + task_size, c0 + chunk, total), min(c0 + chunk, total))
            for c0 in range(start, total, chunk)
            for t0 in range(c0, min(c0 + chunk, total), task_size)]


def _finish_pack(out, params, progress, writer, t_start, log):
    """Write complete.json for the pack in `out` that `writer` has written to the end (with the CRC32s of
    its index and names for format version 2 and later), log its summary and return complete.json's dict."""
    counts = dict(zip(STATUS_NAMES, writer.counts))
    info = {'version': progress['version'], 'params': params, 'total': progress['total'],
            'shards': writer.shards, 'counts': counts}
    if progress['version'] >= 2:
        info['crc32'] = {name: _file_crc32(os.path.join(out, name)) for name in _PACK_CRC_FILES}
    write_json(os.path.join(out, _PACK_COMPLETE), info)
    bad_note = f' (reasons in {os.path.join(out, _PACK_BAD)})' if counts['bad'] else ''
    log(f'packed {progress["total"]:,} images into {out} in {_duration(time.perf_counter() - t_start)}: '
        f'{counts["ok"]:,} ok, {counts["gray"]:,} gray, {counts["bad"]:,} bad{bad_note}; '
        f'{sum(writer.shards) / 1e9:.2f} GB in {len(writer.shards)} shard(s). '
        f'Train with --data {shlex.quote(out)}')
    return info


# ----------------------------------------------------------------------------------------------
# VOC readers

def _voc_dir(root, year):
    """Accept VOCdevkit/VOC<year> itself, VOCdevkit, or the folder above it. A VOC<other year>
    folder is refused: VOC2007 ships segmentation lists and masks too, which would silently stand in
    for VOC2012's (and VOC2012 classification lists for VOC2007's)."""
    root = os.fspath(root)
    voc = f'VOC{year}'
    other = re.fullmatch(r'VOC(\d{4})', os.path.basename(os.path.normpath(root)))
    if other and other.group(1) != str(year):
        raise FileNotFoundError(f'{root} is {other.group(0)}, where {voc} is needed: pass the VOCdevkit folder '
                                f'that holds both, or its {voc}')
    for cand in (root, os.path.join(root, voc), os.path.join(root, 'VOCdevkit', voc)):
        if os.path.isdir(os.path.join(cand, 'ImageSets')):
            return cand
    return root


def _extract_advice(voc_dir, year, tar):
    """How to extract `tar` (its members start with VOCdevkit/VOC<year>/) so that it fills `voc_dir`,
    the folder _voc_dir returned: in the folder above its VOCdevkit; or, for a devkit folder under
    another name (its ImageSets/ there, so _voc_dir would never look inside a VOCdevkit/ made in it),
    into it without the tar's two top folders."""
    voc_dir = os.path.abspath(voc_dir)
    parent = os.path.dirname(voc_dir)
    unpacks = f'(it unpacks into VOCdevkit/VOC{year}/)'
    if os.path.basename(voc_dir) == f'VOC{year}' and os.path.basename(parent) == 'VOCdevkit':
        return f'extract {tar} in {os.path.dirname(parent)} {unpacks}'
    if os.path.basename(voc_dir) == 'VOCdevkit':
        return f'extract {tar} in {parent} {unpacks}'
    if os.path.isdir(os.path.join(voc_dir, 'ImageSets')):
        return (f'extract {tar} into {voc_dir} without its VOCdevkit/VOC{year}/ prefix (tar -xf {tar} -C '
                f'{shlex.quote(voc_dir)} --strip-components=2)')
    return f'extract {tar} in {voc_dir} {unpacks}'


def _voc_list_lines(path):
    """[(line number, fields)] of the non-blank lines of a VOC list file. A byte-order mark (a file saved
    by a Windows editor) is dropped; bytes that are not UTF-8 are a ValueError naming the file."""
    try:
        with open(path, encoding='utf-8-sig') as f:
            return [(n, line.split()) for n, line in enumerate(f, 1) if line.split()]
    except UnicodeDecodeError as e:
        raise ValueError(f'{path} is not a text list of image ids ({e}); re-extract the dataset') from None


def _refuse_repeats(path, numbered_ids):
    """ValueError naming the first id that `path` lists twice: its image would count twice in training or,
    in a test split, in the figures."""
    seen = {}
    for lineno, i in numbered_ids:
        if i in seen:
            raise ValueError(f'{path}:{lineno}: {i} is listed again (first on line {seen[i]}); each image once')
        seen[i] = lineno


def voc_classification(voc2007_root, split):
    """VOC2007 classification set `split` (train, val, trainval, test).

    Returns (image paths, int8 array (N, 20) of labels in {1, -1, 0} in VOC_CLASSES order):
    1 present, -1 absent, 0 only 'difficult' instances (ignored in loss and AP). Reads
    ImageSets/Main/<class>_<split>.txt as distributed ('000005 -1' lines, one or more spaces).
    The paths are JPEGImages/<id>.jpg, not checked to exist (finetune_voc.py checks them).
    FileNotFoundError for a missing list file (with the tar to extract); ValueError for a list with
    a line of another form, no lines, an id twice, or other ids than the first class's list.
    """
    root = _voc_dir(voc2007_root, 2007)
    ids, labels = None, []
    for cls in VOC_CLASSES:
        path = os.path.join(root, 'ImageSets', 'Main', f'{cls}_{split}.txt')
        if not os.path.exists(path):
            tar = 'VOCtest_06-Nov-2007.tar' if split == 'test' else 'VOCtrainval_06-Nov-2007.tar'
            raise FileNotFoundError(
                f'{path} not found: expected the VOC2007 devkit layout <root>/ImageSets/Main/'
                f'<class>_{split}.txt under {os.fspath(voc2007_root)}; {_extract_advice(root, 2007, tar)}, '
                f'or use the demo world\'s '
                f'{os.path.join(DEFAULT_DEMO_ROOT, "VOCdevkit")} (`python data.py demo` writes it)')
        rows = {}
        order = []
        lines = _voc_list_lines(path)
        for lineno, parts in lines:
            if len(parts) != 2 or parts[1] not in ('1', '-1', '0'):
                raise ValueError(f'{path}:{lineno}: expected "<image id> <1|-1|0>", '
                                 f'found {" ".join(parts)!r}')
            rows[parts[0]] = int(parts[1])
            order.append(parts[0])
        if not order:
            raise ValueError(f'{path} lists no images')
        _refuse_repeats(path, [(n, parts[0]) for n, parts in lines])
        if ids is None:
            ids = order
        elif set(rows) != set(ids):
            raise ValueError(f'{path} lists different images than {VOC_CLASSES[0]}_{split}.txt '
                             f'({len(rows)} vs {len(ids)} ids); the devkit files must agree')
        labels.append([rows[i] for i in ids])
    paths = [os.path.join(root, 'JPEGImages', f'{i}.jpg') for i in ids]
    return paths, np.array(labels, dtype=np.int8).T.copy()


def _train_aug_lists(voc2012_dir):
    return [os.path.join(voc2012_dir, 'ImageSets', 'Segmentation', 'train_aug.txt'),
            os.path.join(voc2012_dir, 'train_aug.txt')]


def has_train_aug(voc2012_root):
    """Whether the SBD-augmented set (SegmentationClassAug/ and a train_aug.txt) is in the devkit."""
    root = _voc_dir(voc2012_root, 2012)
    return (os.path.isdir(os.path.join(root, 'SegmentationClassAug'))
            and any(os.path.exists(p) for p in _train_aug_lists(root)))


def train_aug_half_there(voc2012_root):
    """A line saying what of the SBD-augmented set is missing when only half of it is where has_train_aug
    looks (SegmentationClassAug/ without a train_aug.txt, or the other way round, or either one a
    folder too high): segmentation would then train on `train`, a seventh of train_aug. None otherwise."""
    root = _voc_dir(voc2012_root, 2012)
    if has_train_aug(root):
        return None
    parent = os.path.dirname(os.path.abspath(root))
    labels, lists = os.path.join(root, 'SegmentationClassAug'), _train_aug_lists(root)
    found = [p for p in (labels, os.path.join(parent, 'SegmentationClassAug')) if os.path.isdir(p)]
    found += [p for p in lists + [os.path.join(parent, 'train_aug.txt')] if os.path.exists(p)]
    if not found:
        return None
    return (f'found {" and ".join(found)}, but the SBD-augmented set (train_aug) needs both {labels}/ and '
            f'{lists[0]} (or {lists[1]})')


def voc_segmentation(voc2012_root, split):
    """VOC2012 segmentation set: list of (image path, label PNG path).

    split 'train', 'val', 'trainval': ImageSets/Segmentation/<split>.txt and SegmentationClass/.
    split 'train_aug': the SBD-augmented set in its common form, SegmentationClassAug/<id>.png and
    the list ImageSets/Segmentation/train_aug.txt (or train_aug.txt at the VOC2012 root), whose
    lines are ids or '/JPEGImages/x.jpg /SegmentationClassAug/x.png' pairs. train_aug must not
    overlap val.
    FileNotFoundError for a missing list or listed file; ValueError for a list with a line of another
    form, no lines or an image twice, or a train_aug that holds val images. Masks are not read: a mask
    of another size than its image, or with values that are no class, is not found here (load_label
    reads one; finetune_voc.py checks sizes from the headers before training).
    """
    root = _voc_dir(voc2012_root, 2012)
    list_path, label_dir = _segmentation_list(root, voc2012_root, split)
    pairs = _segmentation_pairs(root, list_path, label_dir)
    missing = [p for pair in pairs for p in pair if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f'{len(missing)} files listed in {list_path} are missing, e.g. '
                                f'{missing[0]}; the images go in JPEGImages/, labels in '
                                f'{label_dir}/')
    if split == 'train_aug':
        _refuse_val_in_train_aug(root, list_path, pairs)
    return pairs


def _segmentation_list(root, voc2012_root, split):
    """(list file, label folder name) of segmentation set `split` in the VOC2012 folder `root` (the
    `voc2012_root` given, as _voc_dir resolved it): train_aug's list and SegmentationClassAug/, or
    ImageSets/Segmentation/<split>.txt and SegmentationClass/. FileNotFoundError, saying what to get or
    extract, where they are not there."""
    if split == 'train_aug':
        lists = _train_aug_lists(root)
        list_path = next((p for p in lists if os.path.exists(p)), None)
        if list_path is None or not os.path.isdir(os.path.join(root, 'SegmentationClassAug')):
            raise FileNotFoundError(
                f'train_aug needs {lists[0]} (or {lists[1]}) and '
                f'{os.path.join(root, "SegmentationClassAug")}/; '
                'get SegmentationClassAug and train_aug.txt (SBD-augmented VOC, 10,582 images) and '
                'put them there, or use split "train"')
        return list_path, 'SegmentationClassAug'
    list_path = os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')
    if not os.path.exists(list_path):
        raise FileNotFoundError(
            f'{list_path} not found: expected the VOC2012 devkit layout <root>/ImageSets/'
            f'Segmentation/{split}.txt under {os.fspath(voc2012_root)}; '
            f'{_extract_advice(root, 2012, "VOCtrainval_11-May-2012.tar")}, '
            f'or use the demo world\'s {os.path.join(DEFAULT_DEMO_ROOT, "VOCdevkit")} (`python data.py '
            'demo` writes it)')
    return list_path, 'SegmentationClass'


def _segmentation_pairs(root, list_path, label_dir):
    """[(image path, label path)] of the list file `list_path` in the order listed: a line is an id (its
    JPEGImages/<id>.jpg and <label_dir>/<id>.png under `root`) or a '/JPEGImages/x.jpg /<label_dir>/x.png'
    pair relative to `root`. ValueError for a line of another form, no lines, or an image listed twice."""
    pairs, numbered = [], []
    for lineno, parts in _voc_list_lines(list_path):
        if len(parts) == 2:
            pairs.append(tuple(os.path.join(root, p.lstrip('/')) for p in parts))
        elif len(parts) == 1:
            pairs.append((os.path.join(root, 'JPEGImages', f'{parts[0]}.jpg'),
                          os.path.join(root, label_dir, f'{parts[0]}.png')))
        else:
            raise ValueError(f'{list_path}:{lineno}: expected an image id or "/JPEGImages/<id>.jpg '
                             f'/{label_dir}/<id>.png", found {" ".join(parts)!r}')
        numbered.append((lineno, pairs[-1][0]))
    if not pairs:
        raise ValueError(f'{list_path} lists no images')
    _refuse_repeats(list_path, numbered)
    return pairs


def _refuse_val_in_train_aug(root, list_path, pairs):
    """ValueError where the train_aug `pairs` (read from `list_path`) hold images of VOC2012 val (when
    its list is in `root`): training on them would inflate val mIU. Images are matched by id, the file
    name without its extension."""
    val_list = os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt')
    if os.path.exists(val_list):
        val_ids = {parts[0] for _, parts in _voc_list_lines(val_list)}  # as read for a split: BOM, CRLF
        aug_ids = {os.path.splitext(os.path.basename(img))[0] for img, _ in pairs}
        overlap = aug_ids & val_ids
        if overlap:
            raise ValueError(f'{list_path} contains {len(overlap)} images of the val set (e.g. '
                             f'{sorted(overlap)[0]}): training on them would inflate val mIU; '
                             'use the standard train_aug list, which excludes VOC2012 val')


def load_label(path):
    """Class indices uint8 (H, W) from a VOC label PNG: palette PNGs (SegmentationClass) read as
    indices, not colours; plain 8-bit gray PNGs (SegmentationClassAug) as is. 255 = ignore.
    Raises BadImage (a ValueError) naming the file for a missing, truncated or undecodable mask, or one
    of another mode (an RGB colour mask). The values are returned as stored, unchecked (a value that is
    no class, 21..254, included), and the size is not compared with the image's."""
    with decoding(path), Image.open(path) as im:
        if im.mode not in ('P', 'L'):
            raise BadImage(path, f'expected a palette (P) or 8-bit gray (L) PNG of class indices, found '
                                 f'mode {im.mode}; map colours to indices with VOC_PALETTE')
        return np.array(im, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------
# The demo world
#
# Colour model. Every pixel is (g, A, B): g is the gray level the pixel has in the grayscale
# photo (an sRGB value in [0, 1]); (A, B) is a colour offset relative to its luminance, in a
# plane orthogonal to the Rec. 709 luminance weights in linear RGB. Linear RGB = Y * (1 + A u + B v)
# with Y = lin(g), so luminance -- and hence L*, which is a function of luminance only -- is
# exactly g's whatever the hue: lightness carries shape and texture, never hue by itself.

_LUMA = np.array([0.2126, 0.7152, 0.0722])  # Rec. 709 / sRGB luminance weights (linear RGB)


@functools.lru_cache(maxsize=None)
def _opponent_basis():
    """Orthonormal u, v spanning the plane of linear-RGB offsets with zero luminance."""
    u = np.array([1.0, 0.0, 0.0]) - _LUMA * (_LUMA[0] / (_LUMA @ _LUMA))
    u /= np.linalg.norm(u)
    v = np.cross(_LUMA, u)
    v /= np.linalg.norm(v)
    return u.astype(np.float32), v.astype(np.float32)


def _srgb_to_linear(c):
    return np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)


@functools.lru_cache(maxsize=None)
def _srgb_luts():
    """Tables for the sRGB transfer function: gray level g (4096 steps) -> linear (floored at
    1e-5, to divide by), and linear (65536 steps) -> 8-bit sRGB; steps far below one level."""
    to_lin = np.maximum(_srgb_to_linear(np.linspace(0, 1, 4096)), 1e-5).astype(np.float32)
    lin = np.linspace(0, 1, 65536)
    srgb = np.where(lin > 0.0031308, 1.055 * np.power(np.maximum(lin, 0.0031308), 1 / 2.4) - 0.055,
                    lin * 12.92)
    return to_lin, np.round(np.clip(srgb, 0, 1) * 255).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _chroma_of(rgb8):
    """(A, B) relative colour offset of an sRGB colour (0..255 triple)."""
    u, v = _opponent_basis()
    lin = _srgb_to_linear(np.asarray(rgb8, np.float64) / 255.0)
    d = lin / max(lin @ _LUMA, 1e-6) - 1.0
    return float(d @ u), float(d @ v)


def _compose_rgb(g, ca, cb):
    """uint8 (H, W, 3) from gray level g and colour offsets (A, B), all (H, W) float32.
    The colour is scaled down where it would leave the RGB cube, keeping luminance exact.
    (In-place arithmetic: this runs on every pixel of thousands of images.)"""
    u, v = _opponent_basis()
    to_lin, to_srgb8 = _srgb_luts()
    t = np.clip(g, 0, 1)
    t *= 4095
    t += 0.5
    y = np.take(to_lin, t.astype(np.int32))
    d = []  # per channel (H, W): linear RGB_i = y * (1 + d_i)
    for i in range(3):
        di = ca * u[i]
        di += cb * v[i]
        d.append(di)
    dmax = np.maximum(np.maximum(d[0], d[1]), d[2])  # >= 0, as the luminance of d is 0
    dmin = np.minimum(np.minimum(d[0], d[1]), d[2])  # <= 0
    # The largest f <= 1 with y * (1 + f d_i) in [0, 1] for every channel, times y.
    fy = 1.0 / y
    fy -= 1.0
    fy /= np.maximum(dmax, 1e-9, out=dmax)
    np.minimum(fy, -1.0 / np.minimum(dmin, -1e-9, out=dmin), out=fy)
    np.minimum(fy, 1.0, out=fy)
    fy *= y
    out = np.empty(g.shape + (3,), np.uint8)
    for i in range(3):
        lin = d[i]
        lin *= fy
        lin += y
        np.clip(lin, 0, 1, out=lin)
        lin *= 65535
        lin += 0.5
        out[..., i] = np.take(to_srgb8, lin.astype(np.int32))
    return out


# Per class: shape, lightness texture (kind, parameter), base gray level, texture amplitude,
# main colour, second colour (where the texture is high) or None, mean orientation (degrees).
_CLASS_LOOKS = {
    'aeroplane':   ('cross',      ('stripes', 3.0),  0.62, 0.25, (230, 230, 235), (205, 35, 45), 0),
    'bicycle':     ('dumbbell',   ('rings', 4.0),    0.45, 0.30, (40, 90, 200), None, 0),
    'bird':        ('triangle',   ('noise', 5),      0.55, 0.30, (240, 200, 30), None, 90),
    'boat':        ('semicircle', ('bands', 2.5),    0.50, 0.35, (200, 40, 40), (235, 235, 235), 0),
    'bottle':      ('capsule',    ('gradient', 0.0), 0.45, 0.35, (40, 150, 60), None, 90),
    'bus':         ('rectangle',  ('grid', 3.0),     0.60, 0.30, (245, 170, 20), (70, 70, 80), 0),
    'car':         ('trapezoid',  ('gradient', 90.), 0.45, 0.20, (190, 20, 60), None, 0),
    'cat':         ('star',       ('stripes', 4.0),  0.55, 0.30, (225, 120, 40), None, 0),
    'chair':       ('lshape',     ('waves', 5.0),    0.50, 0.25, (140, 70, 160), None, 0),
    'cow':         ('ellipse',    ('spots', 4),      0.55, 0.45, (120, 70, 40), (240, 240, 230), 0),
    'diningtable': ('tshape',     ('rings', 3.0),    0.45, 0.25, (150, 95, 50), None, 0),
    'dog':         ('crescent',   ('noise', 3),      0.55, 0.25, (205, 170, 110), None, 0),
    'horse':       ('arrow',      ('gradient', 90.), 0.40, 0.30, (110, 50, 30), None, 0),
    'motorbike':   ('ring',       ('checker', 4.0),  0.45, 0.35, (220, 40, 160), (40, 40, 45), 0),
    'person':      ('hexagon',    ('split', 90.),    0.55, 0.30, (225, 170, 140), (40, 70, 150), 0),
    'pottedplant': ('flower',     ('rings', 2.0),    0.45, 0.30, (50, 160, 70), (190, 90, 50), 0),
    'sheep':       ('cloud',      ('dots', 5.0),     0.65, 0.20, (235, 230, 210), None, 0),
    'sofa':        ('ushape',     ('checker', 6.0),  0.50, 0.20, (30, 150, 160), None, 0),
    'train':       ('chevron',    ('hatch', 4.0),    0.45, 0.30, (170, 30, 30), (120, 120, 130), 0),
    'tvmonitor':   ('frame',      ('waves', 3.0),    0.35, 0.20, (35, 35, 40), (60, 120, 220), 0),
}
# Backgrounds: name -> main colour (textures in _background).
_BACKGROUNDS = {
    'sky': (90, 150, 230), 'grass': (70, 150, 50), 'sand': (220, 195, 140),
    'brick': (170, 70, 50), 'concrete': (125, 125, 128), 'water': (30, 120, 150),
    'horizon': (90, 150, 230),
}


def _box(p, q, cx, cy, hx, hy):
    return np.maximum(np.abs(p - cx) - hx, np.abs(q - cy) - hy)


def _norm(p, q):
    return np.sqrt(p * p + q * q)  # np.hypot is several times slower


def _frac(x):
    return x - np.floor(x)  # np.mod is 50x slower


def _polygon(p, q, k):
    """Regular k-gon of circumradius 1 as the intersection of k half-planes."""
    d = None
    for j in range(k):
        t = 2 * np.pi * (j + 0.5) / k
        e = p * math.cos(t) + q * math.sin(t)
        d = e if d is None else np.maximum(d, e)
    return d - math.cos(math.pi / k)


def _shape_distance(shape, p, q):
    """Approximate signed distance (in object radii; < 0 inside) of a shape of radius ~1."""
    if shape in ('star', 'flower', 'cloud'):
        r = _norm(p, q)
        c = p / np.maximum(r, 1e-6)  # cos(phi); cos(k phi) by Chebyshev polynomials (no arctan2)
        c2 = c * c
        if shape == 'star':  # five sharp points: cos(5 phi) raised to a power
            lobes = (0.5 + 0.5 * c * (5 + c2 * (-20 + 16 * c2))) ** 3
            return (r - (0.42 + 0.58 * lobes)) * 0.5
        if shape == 'flower':  # six round petals
            return (r - (0.72 + 0.28 * (-1 + c2 * (18 + c2 * (-48 + 32 * c2))))) * 0.7
        cos10 = -1 + c2 * (50 + c2 * (-400 + c2 * (1120 + c2 * (-1280 + 512 * c2))))
        return (r - (0.86 + 0.14 * cos10)) * 0.8
    if shape == 'ellipse':
        return (_norm(p, q / 0.62) - 1.0) * 0.62
    if shape == 'rectangle':
        return _box(p, q, 0, 0, 1.0, 0.5)
    if shape == 'triangle':
        return _polygon(p, q, 3)
    if shape == 'hexagon':
        return _polygon(p, q, 6)
    if shape == 'ring':
        return np.abs(_norm(p, q) - 0.72) - 0.28
    if shape == 'frame':
        return np.abs(np.maximum(np.abs(p), np.abs(q) / 0.8) - 0.75) - 0.22
    if shape == 'cross':
        return np.minimum(_box(p, q, 0, 0, 1.0, 0.24), _box(p, q, -0.25, 0, 0.24, 0.8))
    if shape == 'crescent':
        return np.maximum(_norm(p, q) - 1.0, 0.82 - _norm(p - 0.5, q))
    if shape == 'semicircle':
        q2 = q - 0.4
        return np.maximum(_norm(p, q2) - 1.0, q2)
    if shape == 'capsule':
        return _norm(np.maximum(np.abs(p) - 0.62, 0), q) - 0.36
    if shape == 'dumbbell':
        wheels = np.minimum(_norm(p - 0.55, q), _norm(p + 0.55, q)) - 0.42
        return np.minimum(wheels, _box(p, q, 0, 0, 0.55, 0.08))
    if shape == 'trapezoid':
        return np.maximum(np.abs(q) - 0.55, (np.abs(p) - (0.6 + 0.36 * (q + 0.55))) * 0.9)
    if shape == 'lshape':
        return np.minimum(_box(p, q, -0.6, 0, 0.3, 1.0), _box(p, q, 0.05, 0.7, 0.95, 0.3))
    if shape == 'tshape':
        return np.minimum(_box(p, q, 0, -0.72, 1.0, 0.26), _box(p, q, 0, 0.2, 0.24, 0.8))
    if shape == 'ushape':
        sides = np.minimum(_box(p, q, -0.72, 0, 0.26, 0.9), _box(p, q, 0.72, 0, 0.26, 0.9))
        return np.minimum(sides, _box(p, q, 0, 0.66, 0.98, 0.26))
    if shape == 'arrow':
        head = np.maximum(0.15 - p, (np.abs(q) - (1.0 - p) * 0.8) * 0.8)
        return np.minimum(_box(p, q, -0.42, 0, 0.6, 0.18), head)
    if shape == 'chevron':
        return np.maximum(np.abs(p + 0.35 - 0.8 * np.abs(q)) * 0.78 - 0.24, np.abs(q) - 0.9)
    raise ValueError(f'unknown shape {shape}')


def _lattice_noise(rng, x, y, cells):
    """Smooth value noise in [0, 1] at coordinates x, y in [0, cells] (any shape)."""
    grid = rng.random((cells + 2, cells + 2)).astype(np.float32)
    x = np.clip(x, 0, cells)
    y = np.clip(y, 0, cells)
    fx, fy = _frac(x), _frac(y)
    ix, iy = (x - fx).astype(np.int32), (y - fy).astype(np.int32)
    fx, fy = fx * fx * (3 - 2 * fx), fy * fy * (3 - 2 * fy)
    flat = iy * (cells + 2) + ix
    g = grid.ravel()
    top = np.take(g, flat) * (1 - fx) + np.take(g, flat + 1) * fx
    bottom = np.take(g, flat + cells + 2) * (1 - fx) + np.take(g, flat + cells + 3) * fx
    return top * (1 - fy) + bottom * fy


def _texture(kind, param, p, q, rng):
    """Texture value in [0, 1] in object coordinates (p, q), radius ~1."""
    tau = 2 * np.pi
    if kind == 'stripes':
        return 0.5 + 0.5 * np.sin(tau * param * (0.8 * p + 0.6 * q))
    if kind == 'bands':
        return np.clip(0.5 + 3 * np.sin(tau * param * q), 0, 1)
    if kind == 'rings':
        return 0.5 + 0.5 * np.sin(tau * param * _norm(p, q))
    if kind == 'checker':
        return np.clip(0.5 + 3 * np.sin(np.pi * param * p) * np.sin(np.pi * param * q), 0, 1)
    if kind == 'dots':
        fp, fq = _frac(param * p) - 0.5, _frac(param * q) - 0.5
        return np.clip((0.3 - _norm(fp, fq)) * 10 + 0.5, 0, 1)
    if kind == 'grid':
        fp, fq = np.abs(_frac(param * p) - 0.5), np.abs(_frac(param * q) - 0.5)
        return np.clip((0.3 - np.maximum(fp, fq)) * 12 + 0.5, 0, 1)
    if kind == 'waves':
        return 0.5 + 0.5 * np.sin(tau * param * (p + 0.12 * np.sin(tau * 1.5 * q)))
    if kind == 'hatch':
        a = np.abs(_frac(param * (p + q)) - 0.5)
        b = np.abs(_frac(param * (p - q)) - 0.5)
        return np.clip((0.12 - np.minimum(a, b)) * 12 + 0.5, 0, 1)
    if kind in ('gradient', 'split'):
        a = np.deg2rad(param)
        s = p * np.cos(a) + q * np.sin(a)
        return np.clip(0.5 + (0.5 if kind == 'gradient' else 5.0) * s, 0, 1)
    if kind == 'noise':
        return _lattice_noise(rng, (p + 1.2) * param / 2.4, (q + 1.2) * param / 2.4, param)
    if kind == 'spots':
        n = _lattice_noise(rng, (p + 1.2) * param / 2.4, (q + 1.2) * param / 2.4, param)
        return np.clip((n - 0.55) * 8 + 0.5, 0, 1)
    raise ValueError(f'unknown texture {kind}')


def _smooth_noise(rng, h, w, cell):
    """(h, w) float32 noise in about [0, 1], smooth over `cell` pixels."""
    small = rng.random((max(2, h // cell + 2), max(2, w // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _jitter_colour(rgb8, rng, hue_jitter=0.2, chroma_range=(0.75, 1.2)):
    a, b = _chroma_of(rgb8)
    t = rng.uniform(-hue_jitter, hue_jitter)
    s = rng.uniform(*chroma_range)
    return (s * (a * math.cos(t) - b * math.sin(t)), s * (a * math.sin(t) + b * math.cos(t)))


def _background(name, rng, h, w):
    """Gray level and colour offsets (each (h, w) float32, fresh) of a background."""
    yy = np.linspace(0, 1, h, dtype=np.float32)[:, None]  # (h, 1)
    xx = np.linspace(0, 1, w, dtype=np.float32)[None, :]  # (1, w)
    ca, cb = _jitter_colour(_BACKGROUNDS[name], rng)
    shift = rng.uniform(-0.08, 0.08)
    chroma = None  # (h, w) colour strength, None for 1 everywhere
    if name in ('sky', 'horizon'):
        cloud = _smooth_noise(rng, h, w, 24) - 0.5
        cloud *= 3
        np.clip(cloud, 0, 1, out=cloud)
        g = 0.62 + 0.18 * yy + 0.2 * cloud
        chroma = 1 - cloud
        if name == 'horizon':
            wave = np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6))
            line = rng.uniform(0.35, 0.7) + 0.03 * wave
            ground = yy > line
            ga, gb = _jitter_colour(_BACKGROUNDS['grass'], rng)
            n = _smooth_noise(rng, h, w, 3)
            g = np.where(ground, 0.35 + 0.25 * n, g)
            chroma[ground] = 1.0
            ca = np.where(ground, np.float32(ga), np.float32(ca))
            cb = np.where(ground, np.float32(gb), np.float32(cb))
    elif name == 'grass':
        g = 0.3 + 0.25 * _smooth_noise(rng, h, w, 3) + 0.2 * _smooth_noise(rng, h, w, 40)
    elif name == 'sand':
        g = 0.58 + 0.07 * np.sin(2 * np.pi * (yy * rng.uniform(6, 14) + 0.1 * np.sin(9 * xx))) \
            + 0.1 * _smooth_noise(rng, h, w, 2)
    elif name == 'brick':
        bh = int(rng.integers(10, 18))
        bw = bh * 2.5
        row = np.arange(h, dtype=np.float32)[:, None] // bh  # (h, 1)
        xs = np.arange(w, dtype=np.float32)[None, :] + (row % 2) * np.float32(bw / 2)  # (h, w)
        col = np.floor(xs / bw)
        mortar = (np.arange(h)[:, None] % bh < 2) | (xs - col * bw < 2)
        per_brick = _frac((row * 1000 + col) * np.float32(0.618034)) - 0.5
        g = np.where(mortar, 0.7, 0.4 + 0.12 * per_brick + 0.06 * _smooth_noise(rng, h, w, 2))
        chroma = np.where(mortar, np.float32(0.05), np.float32(1.0))
    elif name == 'concrete':
        g = 0.45 + 0.15 * _smooth_noise(rng, h, w, 2) + 0.1 * _smooth_noise(rng, h, w, 30)
        ca, cb = 0.3 * ca, 0.3 * cb
    elif name == 'water':
        ripple = yy * rng.uniform(8, 16) + 0.3 * _smooth_noise(rng, h, w, 20)
        g = 0.35 + 0.12 * np.sin(2 * np.pi * ripple) + 0.1 * yy
    else:
        raise ValueError(f'unknown background {name}')
    g = g.astype(np.float32, copy=False)
    g += np.float32(shift)
    if chroma is None:
        return g, np.full((h, w), ca, np.float32), np.full((h, w), cb, np.float32)
    ca, cb = chroma * ca, chroma * cb
    return g, ca.astype(np.float32, copy=False), cb.astype(np.float32, copy=False)


def _render_scene(rng, h, w):
    """One demo photo. Returns rgb uint8 (h, w, 3), class map uint8 (h, w) (0 background,
    1..20 = VOC_CLASSES), and per instance (class index 0..19, visible pixels, difficult)."""
    bg = list(_BACKGROUNDS)[rng.integers(len(_BACKGROUNDS))]
    g, ca, cb = _background(bg, rng, h, w)
    inst = np.full((h, w), -1, np.int16)
    n_obj = int(rng.choice([1, 2, 3, 4], p=[0.35, 0.3, 0.2, 0.15]))
    classes, full_areas = [], []
    side = min(h, w)
    for i in range(n_obj):
        k = int(rng.integers(len(VOC_CLASSES)))
        shape, (tex, param), base, amp, col1, col2, orient = _CLASS_LOOKS[VOC_CLASSES[k]]
        radius = rng.uniform(3, 6) if rng.random() < 0.15 else rng.uniform(0.12, 0.42) * side
        cy, cx = rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w
        theta = np.deg2rad(orient) + rng.uniform(-0.4, 0.4) + (np.pi if rng.random() < 0.5 else 0)
        # Bounding box of the whole (unclipped) object, for its full area.
        ext = radius * 1.1 + 1
        y0, y1 = int(math.floor(cy - ext)), int(math.ceil(cy + ext))
        x0, x1 = int(math.floor(cx - ext)), int(math.ceil(cx + ext))
        dy = (np.arange(y0, y1, dtype=np.float32) + 0.5 - cy)[:, None]
        dx = (np.arange(x0, x1, dtype=np.float32) + 0.5 - cx)[None, :]
        c, s = math.cos(theta), math.sin(theta)
        p = (c * dx + s * dy) / radius
        q = (-s * dx + c * dy) / radius
        alpha = np.clip(0.5 - _shape_distance(shape, p, q) * radius, 0, 1)  # anti-aliased edge
        full_areas.append(int((alpha >= 0.5).sum()))
        classes.append(k)
        # In-frame part.
        fy0, fy1, fx0, fx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
        if fy0 >= fy1 or fx0 >= fx1:
            continue
        sl = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
        frame = (slice(fy0, fy1), slice(fx0, fx1))
        a, p, q = alpha[sl], p[sl], q[sl]
        t = _texture(tex, param, p, q, rng).astype(np.float32)
        obj_g = base + rng.uniform(-0.15, 0.15) + amp * (t - 0.5)
        a1, b1 = _jitter_colour(col1, rng)
        if col2 is not None:
            a2, b2 = _jitter_colour(col2, rng)
            obj_a, obj_b = a1 + (a2 - a1) * t, b1 + (b2 - b1) * t
        else:
            obj_a, obj_b = a1, b1
        for layer, value in ((g, obj_g), (ca, obj_a), (cb, obj_b)):
            view = layer[frame]
            view += (value - view) * a  # alpha blend in place
        inst[frame][a >= 0.5] = i
    visible = np.bincount(inst[inst >= 0].ravel(), minlength=n_obj)
    instances = []
    for i, k in enumerate(classes):
        if visible[i] == 0:
            continue
        # VOC's 'difficult': too small or too hidden to recognise.
        difficult = visible[i] < 0.003 * h * w or visible[i] < 0.25 * full_areas[i]
        instances.append((k, int(visible[i]), bool(difficult)))
    label = np.where(inst >= 0, np.asarray(classes + [0], np.uint8)[inst] + 1, 0).astype(np.uint8)
    return _compose_rgb(g, ca, cb), label, instances


def _scene(seed, stream, index, size_range):
    """Scene number `index` of `stream`: depends on nothing else, so generation order and the
    number of worker processes do not change a single byte."""
    rng = np.random.default_rng([seed, stream, index])
    lo, hi = size_range
    h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    return _render_scene(rng, h, w)


def _colour_tables():
    """Build the cached colour tables now (see ensure_demo)."""
    _opponent_basis()
    _srgb_luts()
    for look in _CLASS_LOOKS.values():
        for colour in look[4:6]:
            if colour is not None:
                _chroma_of(colour)
    for colour in _BACKGROUNDS.values():
        _chroma_of(colour)


def _wnid(k):
    return f'n{k + 1:08d}'


def _image_labels(instances):
    """VOC image-level labels (20,) from instances: 1 if a non-difficult instance is present,
    0 if only difficult ones, -1 if none."""
    labels = np.full(len(VOC_CLASSES), -1, np.int8)
    for k, _, difficult in instances:
        labels[k] = 1 if not difficult else max(labels[k], 0)
    return labels


def _void_band(label, radius):
    """255 on pixels within `radius` of a pixel of another class, as VOC marks object outlines."""
    h, w = label.shape
    padded = np.pad(label, radius, mode='edge')
    band = np.zeros((h, w), bool)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            if 0 < dy * dy + dx * dx <= radius * radius:
                band |= padded[radius + dy:radius + dy + h, radius + dx:radius + dx + w] != label
    return np.where(band, 255, label).astype(np.uint8)


def _render_job(job):
    """Render and write scenes [start, stop) of one stream; runs in worker processes.
    kind 'world': ImageNet layout; 'voc07': JPEG only, returns image labels; 'voc12': JPEG and
    label PNG."""
    kind, out_dir, seed, stream, start, stop, size_range, quality = job
    labels = []
    for i in range(start, stop):
        rgb, label, instances = _scene(seed, stream, i, size_range)
        if kind == 'world':
            k = max(instances, key=lambda x: x[1])[0] if instances else 0  # dominant class
            path = os.path.join(out_dir, _wnid(k), f'{_wnid(k)}_{i}.JPEG')
        elif kind == 'voc07':
            labels.append(_image_labels(instances))
            path = os.path.join(out_dir, 'JPEGImages', f'{i + 1:06d}.jpg')
        else:
            name = f'2012_{i + 1:06d}'
            path = os.path.join(out_dir, 'JPEGImages', f'{name}.jpg')
            # mode 'L' from the uint8 array; putpalette makes it 'P' (Pillow 11.3 deprecates fromarray's mode)
            png = Image.fromarray(_void_band(label, max(1, round(min(label.shape) / 100))))
            png.putpalette(VOC_PALETTE.tobytes())
            png.save(os.path.join(out_dir, 'SegmentationClass', f'{name}.png'))
        Image.fromarray(rgb).save(path, 'JPEG', quality=quality)
    return labels


def _run_jobs(kind, out_dir, seed, stream, n, size_range, quality, pool, chunk=64):
    """Render scenes [0, n) of `stream` as `kind` (see _render_job), `chunk` scenes per job, in `pool` if
    given. Returns the image labels, one int8 (20,) row per scene in scene order, for 'voc07'; [] otherwise."""
    jobs = [(kind, out_dir, seed, stream, i, min(i + chunk, n), size_range, quality)
            for i in range(0, n, chunk)]
    results = pool.map(_render_job, jobs) if pool is not None else map(_render_job, jobs)
    return [row for rows in results for row in rows]


def make_demo_world(root, n_train=4000, n_val=200, seed=0, size_range=(160, 256), quality=90,
                    pool=None):
    """ImageNet-style demo folder: root/{train,val}/<wnid>/<wnid>_<i>.JPEG, the wnid
    (n00000001 .. n00000020, VOC_CLASSES order) naming the class of the object with the most
    visible pixels (not summed over objects of one class). Images are h x w, h and w each drawn
    from `size_range`. `pool`: an optional concurrent.futures executor to render in."""
    for split, n, stream in (('train', n_train, 0), ('val', n_val, 1)):
        for k in range(len(VOC_CLASSES)):
            os.makedirs(os.path.join(root, split, _wnid(k)), exist_ok=True)
        _run_jobs('world', os.path.join(root, split), seed, stream, n, size_range, quality, pool)
    return {'train': os.path.join(root, 'train'), 'val': os.path.join(root, 'val')}


def _write_lines(path, lines):
    with open(path, 'w') as f:
        f.write(''.join(f'{s}\n' for s in lines))


def make_demo_voc(root, n_trainval_2007=600, n_test_2007=300, n_train_2012=600, n_val_2012=200,
                  seed=1, size_range=(160, 256), quality=90, pool=None):
    """VOC devkit of the demo world (other scenes than make_demo_world's):
    root/VOCdevkit/VOC2007: JPEGImages/<6 digits>.jpg, ImageSets/Main/<class>_<split>.txt
    ('000005 -1' lines; 1 / -1 / 0 = difficult) and <split>.txt for train, val, trainval, test;
    root/VOCdevkit/VOC2012: JPEGImages/2012_<6 digits>.jpg, SegmentationClass/*.png (palette
    PNGs, VOC colour map, 255 on a band along object outlines), ImageSets/Segmentation/
    {train,val,trainval}.txt."""
    voc07 = os.path.join(root, 'VOCdevkit', 'VOC2007')
    main = os.path.join(voc07, 'ImageSets', 'Main')
    for d in (os.path.join(voc07, 'JPEGImages'), main):
        os.makedirs(d, exist_ok=True)
    n07 = n_trainval_2007 + n_test_2007
    labels = _run_jobs('voc07', voc07, seed, 2, n07, size_range, quality, pool)
    ids = [f'{i + 1:06d}' for i in range(n07)]
    is_train = np.zeros(n_trainval_2007, bool)
    order = np.random.default_rng([seed, 2]).permutation(n_trainval_2007)
    is_train[order[:n_trainval_2007 // 2]] = True
    splits = {'train': [i for i in range(n_trainval_2007) if is_train[i]],
              'val': [i for i in range(n_trainval_2007) if not is_train[i]],
              'trainval': list(range(n_trainval_2007)),
              'test': list(range(n_trainval_2007, n07))}
    for split, members in splits.items():
        _write_lines(os.path.join(main, f'{split}.txt'), [ids[i] for i in members])
        for k, cls in enumerate(VOC_CLASSES):
            # The devkit's own format, '%s %2d': positives read '000007  1'.
            _write_lines(os.path.join(main, f'{cls}_{split}.txt'),
                         [f'{ids[i]} {int(labels[i][k]):2d}' for i in members])

    voc12 = os.path.join(root, 'VOCdevkit', 'VOC2012')
    seg = os.path.join(voc12, 'ImageSets', 'Segmentation')
    for d in (os.path.join(voc12, 'JPEGImages'), os.path.join(voc12, 'SegmentationClass'), seg):
        os.makedirs(d, exist_ok=True)
    n12 = n_train_2012 + n_val_2012
    _run_jobs('voc12', voc12, seed, 3, n12, size_range, quality, pool)
    ids12 = [f'2012_{i + 1:06d}' for i in range(n12)]
    _write_lines(os.path.join(seg, 'train.txt'), ids12[:n_train_2012])
    _write_lines(os.path.join(seg, 'val.txt'), ids12[n_train_2012:])
    _write_lines(os.path.join(seg, 'trainval.txt'), ids12)
    return {'voc2007': voc07, 'voc2012': voc12}


_DEMO_MARKER = 'DEMO_COMPLETE.json'
_DEMO_VERSION = 1


def ensure_demo(root=DEFAULT_DEMO_ROOT, n_train=4000, n_val=200, n_trainval_2007=600,
                n_test_2007=300, n_train_2012=600, n_val_2012=200, seed=0, workers=None, log=print):
    """Generate the demo world under `root` unless it is already complete; returns its paths
    {'root', 'train', 'val', 'voc2007', 'voc2012'}.

    Generation goes to a temporary sibling folder renamed to `root` once complete (its marker
    DEMO_COMPLETE.json written last), so an interrupted run never leaves a world that looks
    complete; several processes calling it at once is safe (one rename wins). `workers`:
    processes to render in (default: the usable cores, at most 8, or 1 below 1,000 images; 1 = in this process).
    """
    counts = dict(n_train=n_train, n_val=n_val, n_trainval_2007=n_trainval_2007, n_test_2007=n_test_2007,
                  n_train_2012=n_train_2012, n_val_2012=n_val_2012)
    negative = next((name for name, n in counts.items() if n < 0), None)
    if negative:  # range() would make none, and the marker would record the negative count as the world's size
        raise ValueError(f'--{negative.replace("_", "-")} {counts[negative]}: an image count is 0 or more')
    root = os.path.abspath(os.fspath(root))
    params = {'version': _DEMO_VERSION, 'n_train': n_train, 'n_val': n_val,
              'n_trainval_2007': n_trainval_2007, 'n_test_2007': n_test_2007,
              'n_train_2012': n_train_2012, 'n_val_2012': n_val_2012, 'seed': seed}
    paths = {'root': root, 'train': os.path.join(root, 'train'), 'val': os.path.join(root, 'val'),
             'voc2007': os.path.join(root, 'VOCdevkit', 'VOC2007'),
             'voc2012': os.path.join(root, 'VOCdevkit', 'VOC2012')}
    if _demo_complete(root, params):
        return paths
    if os.path.exists(root) and os.listdir(root):
        raise ValueError(f'{root} exists and is not empty, but holds no complete demo world '
                         f'({_DEMO_MARKER} missing); delete it or pick another folder')
    tmp = _demo_temp(root)
    total = n_train + n_val + n_trainval_2007 + n_test_2007 + n_train_2012 + n_val_2012
    if workers is None:
        workers = min(usable_cores(), 8) if total >= 1000 else 1
    t0 = time.perf_counter()
    pool = None
    try:
        if workers > 1:
            # fork where there is fork (not on macOS): a spawned worker would spend seconds importing torch.
            # Forking is safe even if torch's thread pools run here: the workers use numpy
            # element-wise code and Pillow only, and the colour tables (the one use of BLAS)
            # are built before the fork.
            _colour_tables()
            pool = _process_pool(workers)
        make_demo_world(tmp, n_train, n_val, seed=seed, pool=pool)
        make_demo_voc(tmp, n_trainval_2007, n_test_2007, n_train_2012, n_val_2012, seed=seed + 1,
                      pool=pool)
        published = _publish_demo(tmp, root, params)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        shutil.rmtree(tmp, ignore_errors=True)
    if not published:
        log(f'took the demo world in {root} that another process finished first (the same world; this '
            f"process's copy, {time.perf_counter() - t0:.1f} s, was discarded)")
        return paths
    log(f'generated the demo world in {root} ({time.perf_counter() - t0:.1f} s): '
        f'{n_train} train + {n_val} val images (ImageNet layout), VOC2007 {n_trainval_2007} '
        f'trainval + {n_test_2007} test, VOC2012 segmentation {n_train_2012} train + '
        f'{n_val_2012} val')
    return paths


def _demo_temp(root):
    """A fresh, absent temporary folder beside `root` to generate the demo world in, named for this host
    and process (after removing those of this host whose process is gone: killed generations)."""
    parent, name = os.path.split(root)
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, f'.{name}.tmp-{socket.gethostname()}-')
    tmp = os.path.join(parent, f'.{name}.tmp-{socket.gethostname()}-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def _publish_demo(tmp, root, params):
    """Mark the world generated in `tmp` complete (its marker, holding `params`, written last) and rename
    it to `root` (where an empty folder may stand); True. A rename that fails because a concurrent call's
    complete world is there already is fine: False (that world is taken); any other failure raises."""
    write_json(os.path.join(tmp, _DEMO_MARKER), params)
    if os.path.isdir(root) and not os.listdir(root):
        os.rmdir(root)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _demo_complete(root, params):  # not a concurrent call that finished first
            raise
        return False
    return True


def _demo_complete(root, params):
    marker = os.path.join(root, _DEMO_MARKER)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        found = json.load(f)
    if found != params:
        raise ValueError(f'the demo world in {root} was generated with {found}, but {params} was '
                         'asked for; delete the folder to regenerate, or pick another folder')
    return True


def _remove_stale_temps(parent, *prefixes):
    """Delete the temporary files or folders `<prefix><pid>` in `parent` (any of `prefixes`) whose
    process, of this host (the prefix names it), is gone: left by a write or a generation that was
    killed. POSIX only (elsewhere os.kill would not probe but stop the process); never raises."""
    if os.name != 'posix':
        return
    with contextlib.suppress(OSError):
        for entry in os.listdir(parent):
            pid = next((entry[len(p):] for p in prefixes if entry.startswith(p) and entry[len(p):].isdigit()), None)
            if pid is None:
                continue
            try:
                os.kill(int(pid), 0)  # raises if no such process: the temp is stale
            except ProcessLookupError:
                stale = os.path.join(parent, entry)
                if os.path.isdir(stale):
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(stale)
            except (ValueError, OverflowError, PermissionError):  # not a pid; another user's process
                pass


# ----------------------------------------------------------------------------------------------

class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (the problem and where the flags are listed); the
    command-line parser of data.py, colorize.py and finetune_voc.py."""

    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (`{self.prog} --help` lists the flags)\n')

    def parse_args(self, args=None, namespace=None):
        """argparse's, plus `typed_flags`: the set of dests given on the command line, even at their
        default value (so that --resume can tell `--seed 0` typed from the default 0)."""
        args = list(sys.argv[1:] if args is None else args)  # read twice
        parsed = super().parse_args(args, namespace)
        defaults = [(action, action.default) for action in self._actions]
        try:  # parse again with no defaults: only what was typed is set
            for action, _ in defaults:
                action.default = argparse.SUPPRESS
            typed = super().parse_args(args, None if namespace is None else argparse.Namespace(**vars(namespace)))
        finally:
            for action, default in defaults:
                action.default = default
        parsed.typed_flags = frozenset(vars(typed))
        return parsed


def printable_output():
    """Print any path: a file name that is not UTF-8 holds surrogate escapes, which a strict stdout
    (Python's default under a UTF-8 locale without UTF-8 mode) refuses with UnicodeEncodeError. And
    print each line as it comes: stdout to a file (a cluster job's log) is block-buffered, so the
    lines of a long listing, say, would show up only at the first progress line, minutes later."""
    if hasattr(sys.stdout, 'reconfigure'):
        sys.stdout.reconfigure(errors='backslashreplace', line_buffering=True)


def main(argv=None):
    printable_output()
    ap = ArgumentParser(description='Data utilities: generate the demo world, list and cache the '
                        'images of pre-training folders, or pack them for fast training.')
    sub = ap.add_subparsers(dest='cmd', required=True)
    demo = sub.add_parser('demo', help='generate the procedural demo world (once)')
    demo.add_argument('--root', default=DEFAULT_DEMO_ROOT, help='folder to write the demo world to')
    demo.add_argument('--n-train', type=int, default=4000,
                      help='pre-training images (default %(default)s; colorize.py and finetune_voc.py run '
                      'without --data / --voc-root refuse a world of other sizes: give them --data '
                      'ROOT/train --val-data ROOT/val, or --voc-root ROOT/VOCdevkit)')
    demo.add_argument('--n-val', type=int, default=200, help='held-out pre-training images (default %(default)s)')
    scan = sub.add_parser('scan', help='list the images under folders or .txt lists (and cache '
                          'the listing, with --cache-dir)')
    scan.add_argument('roots', nargs='*', help='image folders or .txt lists of image paths')
    scan.add_argument('--data', nargs='+', default=[], metavar='ROOT',
                      help='more roots, given as pack and colorize.py take them')
    scan.add_argument('--cache-dir', default=None, help='folder for the listing cache')
    scan.add_argument('--write', metavar='LIST.txt',
                      help='also write the listing there, one absolute path per line: a list that --data '
                      'takes, to cut down to a subset (of a pack\'s images too)')
    pack = sub.add_parser('pack', help='decode, shrink and re-encode images into a few large '
                          'shard files for training with --data PACK (resumable)')
    pack.add_argument('--data', nargs='+', required=True, metavar='ROOT',
                      help='image folders (scanned recursively) or .txt lists of image paths, '
                      'as given to colorize.py --data')
    pack.add_argument('--out', required=True, help='pack folder to write (new, empty, or a pack '
                      'made with the same arguments, which is finished or left as it is)')
    pack.add_argument('--short-side', type=int, required=True,
                      help='shrink each image so its short side is this many pixels (smaller '
                      'images are kept as they are), e.g. 256')
    pack.add_argument('--quality', type=int, default=90, help='JPEG quality of the packed images (default %(default)s)')
    pack.add_argument('--workers', type=int, default=None,
                      help='decoding processes, at least 1 (default: the cores this process may use, its '
                      'CPU affinity; 1 = in this process)')
    pack.add_argument('--cache-dir', default=None, help='folder for the listing cache')
    verify = sub.add_parser('verify', help='check a pack (after copying it) against the sizes and CRC32s '
                            'recorded when it was packed; exit status 1 if a check fails')
    verify.add_argument('pack', help='pack folder')
    verify.add_argument('--workers', type=int, default=None,
                        help='checking processes, at least 1 (default: the cores this process may use; 1 = in '
                        'this process)')
    args = ap.parse_args(argv)
    fail = sub.choices[args.cmd].error  # `data.py pack --help`, not `data.py --help`, lists pack's flags
    try:  # a wrong path or argument: the message says what to do, no traceback needed
        if args.cmd == 'demo':
            ensure_demo(args.root, n_train=args.n_train, n_val=args.n_val)
        elif args.cmd == 'scan':
            roots = args.roots + args.data
            if not roots:
                fail('give the folders or .txt lists to scan: data.py scan ROOT [ROOT ...]')
            if args.write and not args.write.lower().endswith('.txt'):
                fail(f'--write {args.write}: a list must end in .txt, or --data would take it for a folder')
            paths = find_images(roots, args.cache_dir)
            print(f'{len(paths):,} images in total')
            if args.write:
                write_list(args.write, paths)
                print(f'listed in {args.write}')
        elif args.workers is not None and args.workers < 1:  # 0 would fall to the default: every core
            fail(f'--workers {args.workers}: give 1 (decode in this process) or more processes, or leave it out '
                 f'for the cores this process may use')
        elif args.cmd == 'verify':
            return 1 if verify_pack(args.pack, workers=args.workers) else 0
        else:
            pack_images(args.data, args.out, args.short_side, quality=args.quality,
                        workers=args.workers, cache_dir=args.cache_dir)
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        if os_error_text(e) is None:  # a bug, not the user's to fix: the traceback
            raise
        # Not fail(): its "--help lists the flags" would point at the flags, not at the disk or folder.
        again = ('; once there is room, the same command continues the pack'
                 if args.cmd == 'pack' and e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)) else '')
        print(f'{ap.prog} {args.cmd}: error: {os_error_text(e)}{again}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print('interrupted' + (': run the same command again to continue' if args.cmd == 'pack' else ''),
              file=sys.stderr)
        return 130
    return 0


if __name__ == '__main__':
    sys.exit(main())
