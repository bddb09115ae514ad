"""Where a loader process's CPU time per image goes, part by part, reading a pack (README, Benchmark):

    python .ci/loader_profile.py data/packs/demo-256 --crop 224 --short-side 224 256
    python .ci/loader_profile.py data/packs/demo-256 --processes 15   # 15 at once, as 15 loader processes

Times the parts of data.ColorImages.__getitem__ (training view, pack images), making the same calls in
the same order, one image at a time over the sampler's first --n samples, then the collate into a
batch-sized slot (torch.stack, as data.SlotBatches.collate does). Each part's figure is the best of
--repeats passes; the last line times ColorImages[...] and the collate with nothing timed inside, to
check the sum against. DataLoader's own work (receiving indices, sending the batch) is not in it: the
`--benchmark loader` row's ms of CPU per image minus this total is about that. --processes N runs N
copies at once, each printing its table: what the parts cost when N processes share the cores. The
last line is that untimed figure's mean over the processes (.ci/gpu's summary takes it).
"""
import argparse
import cProfile
import io
import math
import multiprocessing
import os
import pstats
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402

PARTS = ('index to pack entry (path, status)', 'read the bytes (PackReader.jpeg)', 'JPEG decode (open + load)',
         'EXIF orientation', 'np.random.default_rng(seed)', 'draws + resized crop (torch resize, to numpy)',
         'flip + HWC->CHW copy', 'collate (stack into the slot)')


def parts(ds, samples, batch_size, clock):
    """Seconds spent in each of PARTS over `samples` ((index, seed) pairs of a pack's images)."""
    spent = dict.fromkeys(PARTS, 0.0)
    slot = torch.empty(batch_size, 3, ds.crop, ds.crop, dtype=torch.uint8)
    batch = []
    for index, seed in samples:
        t = [clock()]
        reader, i = data._packed_entry_or_bad(ds.path(int(index)))
        status = data.STATUS_GRAY if reader.is_gray(i) else data.STATUS_OK
        t.append(clock())
        blob = reader.jpeg(i)
        name = reader.source(i)
        t.append(clock())
        with data.decoding(name), Image.open(io.BytesIO(blob)) as im:
            scale = ds.hi / min(im.size)  # data._decode's draft: a pack made larger than the short sides
            if scale < 1:
                im.draft('RGB', (math.ceil(im.size[0] * scale), math.ceil(im.size[1] * scale)))
            im.load()
            t.append(clock())
            im = data._apply_orientation(im)
        t.append(clock())
        rng = np.random.default_rng(seed)
        t.append(clock())
        x, flipped = data._random_window(im, ds.crop, (ds.lo, ds.hi), ds.flip, rng)
        t.append(clock())
        x = x[:, ::-1] if flipped else x
        batch.append((torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), status))
        t.append(clock())
        if len(batch) == batch_size:
            torch.stack([b[0] for b in batch], out=slot)
            np.array([b[1] for b in batch], dtype=np.int64)
            batch = []
        t.append(clock())
        for k, a, b in zip(PARTS, t, t[1:]):
            spent[k] += b - a
    return spent


def whole(ds, samples, batch_size, clock):
    """Seconds for ColorImages[...] and the collate, nothing timed inside."""
    slot = torch.empty(batch_size, 3, ds.crop, ds.crop, dtype=torch.uint8)
    t0 = clock()
    for a in range(0, len(samples) - batch_size + 1, batch_size):
        items = [ds[s] for s in samples[a:a + batch_size]]
        torch.stack([item[0] for item in items], out=slot)
        np.array([item[1] for item in items], dtype=np.int64)
    return clock() - t0


def profile(args, who=''):
    torch.set_num_threads(1)  # as in a DataLoader worker
    clock = time.thread_time if args.clock == 'cpu' else time.perf_counter
    paths = data.pack_paths(args.pack)
    ds = data.ColorImages(paths, args.crop, tuple(args.short_side))
    entries = [data.packed_entry(path) for path in paths]
    bad = {k for k, (reader, i) in enumerate(entries) if reader.status(i) == data.STATUS_BAD}
    if len(bad) == len(paths):
        sys.exit(f'{args.pack}: no readable image to time')
    it = (s for s in iter(data.InfiniteSampler(len(paths), args.batch_size, seed=0)) if s[0] not in bad)
    samples = [next(it) for _ in range(args.n - args.n % args.batch_size)]  # images bad when packed left out
    whole(ds, samples[:2 * args.batch_size], args.batch_size, clock)  # warm: opens the pack, reads its pages
    spent, totals = [], []
    for _ in range(args.repeats):
        spent.append(parts(ds, samples, args.batch_size, clock))
        totals.append(whole(ds, samples, args.batch_size, clock))
    n = len(samples)
    best = {k: min(s[k] for s in spent) * 1e3 / n for k in PARTS}
    lines = [f'{who}{n} images, crop {args.crop}, short side {args.short_side[0]}-{args.short_side[1]}, '
             f'ms per image ({args.clock} time, the best of {args.repeats} passes):']
    lines += [f'  {k:45s} {v:6.3f}' for k, v in best.items()]
    lines.append(f'  {"sum of the parts":45s} {sum(best.values()):6.3f}')
    lines.append(f'  {"ColorImages[...] + collate, untimed inside":45s} {min(totals) * 1e3 / n:6.3f} (passes: '
                 + ', '.join(f'{s * 1e3 / n:.3f}' for s in totals) + ')')
    print('\n'.join(lines), flush=True)
    if args.cprofile:
        prof = cProfile.Profile()
        prof.runcall(whole, ds, samples, args.batch_size, clock)
        pstats.Stats(prof).sort_stats('tottime').print_stats(20)
    return min(totals) * 1e3 / n


def host_cpus(cpuinfo, usable, cpu_max=None):
    """One line on the host's CPUs, from the text of /proc/cpuinfo: the model, logical CPUs on how many
    physical cores (two threads per core share one core's units: a loader process then gets less done per
    CPU second), this process's `usable` CPUs, the clock now, and the cgroup's cpu.max (quota and period in
    us; "max": none), where known. Read on the GPU host, it says why an image costs more CPU time there."""
    cpus = [dict((k.strip(), v.strip()) for k, _, v in (line.partition(':') for line in block.splitlines()))
            for block in cpuinfo.strip().split('\n\n') if 'processor' in block]
    cores = {(c.get('physical id'), c.get('core id')) for c in cpus}
    known = cpus and all(None not in core for core in cores)
    mhz = sorted(float(c['cpu MHz']) for c in cpus if c.get('cpu MHz'))
    line = (f'host: {cpus[0].get("model name", "?") if cpus else "?"}; {len(cpus)} logical CPUs on '
            + (f'{len(cores)} cores ({len(cpus) / len(cores):g} per core)' if known else 'an unknown number of cores')
            + f'; this process may use {usable}')
    line += f'; clock now {mhz[0]:.0f}-{mhz[-1]:.0f} MHz' if mhz else ''
    return line + (f'; cgroup cpu.max {cpu_max.strip()}' if cpu_max else '')


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def host_line():
    """host_cpus of this machine (.ci/gpu all prints it first)."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return host_cpus(_read('/proc/cpuinfo') or '', usable, _read('/sys/fs/cgroup/cpu.max'))


def _run(job):
    args, k = job
    return profile(args, who=f'process {k}: ')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('pack', help='a pack folder (python data.py pack ...)')
    p.add_argument('--crop', type=int, default=224, help='crop side (default 224, the GPU default)')
    p.add_argument('--short-side', type=int, nargs=2, default=(224, 256), metavar=('LO', 'HI'),
                   help='short side range of the resize (default 224 256)')
    p.add_argument('--batch-size', type=int, default=128, help='images per collated batch (default 128)')
    p.add_argument('--n', type=int, default=4096, help='images per pass (default 4096)')
    p.add_argument('--repeats', type=int, default=3, help='passes (default 3); the best of them is shown')
    p.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                   help='time.perf_counter (wall, default) or time.thread_time (CPU: not counting the time '
                        'the process waits for a core)')
    p.add_argument('--processes', type=int, default=1, help='copies run at once (default 1)')
    p.add_argument('--cprofile', action='store_true', help='also print cProfile of one untimed pass')
    args = p.parse_args(argv)
    if args.n < args.batch_size:
        p.error('--n must be at least --batch-size')
    print(host_line(), flush=True)
    if args.processes == 1:
        figures = [profile(args)]
    else:
        with multiprocessing.Pool(args.processes) as pool:
            figures = pool.map(_run, [(args, k) for k in range(args.processes)])
    print(f'ms of {args.clock} time per image, ColorImages[...] + collate untimed inside, the mean of '
          f'{len(figures)} process(es): {sum(figures) / len(figures):.3f}', flush=True)


if __name__ == '__main__':
    main()
