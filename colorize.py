"""Colorization pre-training (Larsson et al., CVPR 2017) and colorizing photos with the result.

    python colorize.py --arch vgg16                                  # the built-in demo world
    python colorize.py -a vgg16 --data /imagenet/train /places205 --out runs/vgg16
    torchrun --nproc_per_node=8 colorize.py -a resnet152 --data /imagenet/train /places205
    python colorize.py -a vgg16 --out runs/vgg16 --resume            # continue after a crash
    python colorize.py --colorize photo.jpg folder/ --checkpoint runs/vgg16/checkpoint.pt
    python colorize.py -a vgg16 --benchmark [train|loader|colorize] # speed, against an in-run baseline

Training reads uint8 crops from Pillow workers and does all float work on the device: Lab,
the lightness input, P random pixels per image (sparse hypercolumns) and their 7x7 histogram
targets. On CUDA: bf16 autocast, torch.compile, channels_last, TF32. On a CPU: float32, eager,
and smaller defaults so the demo finishes in minutes. A run writes to --out: checkpoint.pt
(atomic, resumable exactly), log.jsonl, run.json and samples/step_NNNNNNN.png (gray | colour | truth).
SIGTERM or SIGUSR1 (a scheduler's notice) saves a checkpoint after the current step and stops.
"""
import argparse
import atexit
import collections
import contextlib
import datetime
import hashlib
import inspect
import json
import math
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import lab
from models import MODELS, build_model, fold_batchnorm, sample_points

HERE = Path(__file__).resolve().parent
DEMO_ROOT = Path(data.DEFAULT_DEMO_ROOT)  # beside the scripts
# Fixed seeds of validation, the same in every run so that runs compare (never --seed):
HOLDOUT_SEED = 12345  # which images --holdout sets aside from --data, and which of a large --val-data
EVAL_SEED = 1234  # the pixels the validation loss reads
PAPER_SAMPLES = 16_000_000  # the authors' VGG-16 schedule: 2M iterations x 8 images
# Defaults that depend on the machine and on the data (see README, "Defaults").
LOADER_PREFETCH = 4  # batches each loader process keeps ready
GPU_DEFAULTS = dict(crop=224, batch_size=128, demo_steps=2000, fc_dim=4096, holdout=256)
CPU_DEFAULTS = dict(crop=64, batch_size=8, demo_steps=100, fc_dim=1024, holdout=64)


class UserError(Exception):
    """A problem the user can fix (bad argument, missing data); printed as one line, no traceback."""


class Stopped(Exception):
    """A training loop met a stop signal (StopSignals): it saved a checkpoint after `step` and stopped."""

    def __init__(self, signum, step, checkpoint):
        super().__init__(f'stopped at step {step} by {signal.Signals(signum).name}')
        self.signum, self.step, self.checkpoint = signum, step, checkpoint


INTERRUPTED = 'interrupted: the last checkpoint written is intact; continue with {}'  # Ctrl-C in training
# Ctrl-C before the run folder holds a checkpoint: --resume would find none there.
INTERRUPTED_AT_START = 'interrupted before the run\'s first checkpoint: nothing to resume; run the same command again'
COMPILE_NOTE = ("torch.compile: the first step compiles the model (a minute or more, silent); the first progress "
                "line's img/s includes it")


def error_text(e):
    """The one line that main() prints for `e` when the user can fix its cause, else None (a bug:
    the traceback then). A UserError's message, also when DataLoader re-raised it from a worker
    (its text is then 'Caught UserError in DataLoader worker process N.' and the worker's traceback,
    whose last line ends in the message); an OSError of a full disk or an unwritable folder
    (data.os_error_text)."""
    if isinstance(e, UserError):
        text = str(e)
        return text.rstrip().splitlines()[-1].split('UserError: ', 1)[-1] if text.startswith('Caught ') else text
    return data.os_error_text(e) if isinstance(e, OSError) else None


def stop_status(e, resume=None, out=None, fresh=False):
    """For main() of both scripts: print the one line for `e` (a UserError, OSError, Ctrl-C or Stopped) and
    return the exit status, or None when the user cannot fix its cause (a bug: main re-raises it).
    `resume`: the flags that continue the interrupted run ('--resume'), None where there is none; `out`:
    the run folder, where known: Ctrl-C before it holds a checkpoint.pt says to start again instead, as
    it does for a `fresh` run (no --resume) stopped before its folder is known."""
    if isinstance(e, KeyboardInterrupt):
        started = not fresh and (out is None or (Path(out) / 'checkpoint.pt').exists())
        print((INTERRUPTED.format(resume) if started else INTERRUPTED_AT_START) if resume else 'interrupted',
              file=sys.stderr)
        return 130  # the shell's status for Ctrl-C
    if isinstance(e, Stopped):
        if not dist.is_initialized() or dist.get_rank() == 0:  # the ranks stopped together: one says so
            print(f'{e}: {e.checkpoint} holds it; continue with {resume}', file=sys.stderr)
        return 128 + e.signum  # the shell's status for a process ended by that signal
    if error_text(e) is None:
        return None
    print(f'error: {error_text(e)}', file=sys.stderr)
    return 2


# --- Arguments ----------------------------------------------------------------------------------

def finite_float(text):
    """The argparse type of the float flags (both scripts): float() without nan and inf, which a run
    would take in silence (--max-bad-share nan never stops it, finetune_voc.py's --clip-grad nan never
    clips) or only find at the first progress line (--lr nan)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'invalid float value: {text!r}') from None  # argparse's own words
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f'{text!r} is not a finite number')
    return value


def seed_int(text, least=-2 ** 63, most=2 ** 64 - 1):
    """The argparse type of the seed flags (both scripts): an int from `least` to `most` (None: any above), by
    default the range torch.manual_seed takes; finetune_voc.py's --label-seed, which seeds numpy, takes 0 up.
    A seed outside its range ended the run in a traceback, after the listing and the run folder were made."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'invalid int value: {text!r}') from None  # argparse's own words
    if value < least or most is not None and value > most:
        span = f'from {least} to {most}' if most is not None else f'at least {least}'
        raise argparse.ArgumentTypeError(f'{value} is not a seed: it must be {span}')
    return value


def refuse_non_finite(args):
    """fill_defaults (both scripts): a float flag that is nan or inf, which only a resumed run can have
    here (finite_float refuses it typed): its checkpoint's args, written before that refusal."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f'{flag_name(name)} is {v} in the checkpoint\'s args, not a finite number: give '
                                f'a finite {flag_name(name)} with --resume')


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-a', '--arch', default='vgg16', choices=sorted(MODELS), help='trunk architecture')
    p.add_argument('--objective', default='colorize', choices=('colorize', 'classify'),
                   help='colorize: the paper\'s pre-training; classify: the same trunk, loop and checkpoints '
                        'trained as a classifier on an ImageNet-layout folder (label = folder name), the '
                        'supervised baseline of RQ1/RQ3')
    p.add_argument('--classes', type=int, metavar='K',
                   help='--objective classify: a fixed random subset of K classes (folders)')
    p.add_argument('--loss', default='huechroma', choices=lab.LOSSES,
                   help='huechroma: hue and chroma histograms (the paper); l2: (a, b) regression; '
                        'ab: joint ab histogram (Zhang et al. style)')
    p.add_argument('--data', nargs='+', metavar='ROOT',
                   help='image folders (scanned recursively) or .txt lists of paths; default: the demo world')
    p.add_argument('--val-data', nargs='+', metavar='ROOT',
                   help='held-out image folders or lists, with --data; default: the demo val set, or --holdout '
                        'images set aside from --data')
    p.add_argument('--holdout', type=int, help='held-out images for validation (default 256; 64 on CPU), '
                   'set aside from --data when no --val-data is given')
    p.add_argument('--subset', type=int, metavar='N', help='train on a fixed random subset of N images (RQ3)')
    p.add_argument('--out', type=Path, help='run folder; default runs/<arch>-<loss> (runs/<arch>-classify for '
                   '--objective classify) beside colorize.py')
    p.add_argument('--steps', type=int, help='training steps; default: 16M images / global batch with --data '
                   '(the paper), 2000 (GPU) or 100 (CPU) on the demo')
    p.add_argument('--batch-size', type=int, help='images per GPU per step (default 128 on GPU, 8 on CPU)')
    p.add_argument('--lr', type=finite_float, help='peak learning rate; default 1e-3 * global batch / 8 '
                   '(the paper used 1e-3 at batch 8)')
    p.add_argument('--lr-milestones', type=finite_float, nargs='+', default=[0.5, 0.75, 0.875],
                   help='fractions of --steps where the lr drops x0.1 (the paper: 1.0M, 1.5M, 1.75M of 2M)')
    p.add_argument('--warmup', type=int, help='linear lr warm-up steps (default 2%% of --steps)')
    p.add_argument('--momentum', type=finite_float, default=0.9, help='SGD momentum (default %(default)s)')
    p.add_argument('--weight-decay', type=finite_float, default=5e-4,
                   help='weight decay, not on biases (default %(default)s)')
    p.add_argument('--crop', type=int, help='training crop side (default 224 on GPU, 64 on CPU)')
    p.add_argument('--short-side', type=int, nargs=2, metavar=('LO', 'HI'),
                   help='random short-side resize range before cropping (default crop x [1, 600 / 352], the '
                        "paper's 352-600 for a 352 crop)")
    p.add_argument('--points', type=int, default=128,
                   help='sampled pixels per image (sparse hypercolumns; default %(default)s)')
    p.add_argument('--border', type=int, help='pixels kept clear of the crop edge (default crop / 7: 32 at 224)')
    p.add_argument('--target-window', type=int, default=7, help='side of the target histogram window; 1 = one-hot '
                   '(default %(default)s)')
    p.add_argument('--lightness-weight', action='store_true',
                   help="weight each pixel's loss by w(L) = min(3L, 1, 3(1-L)) as the original Caffe code did "
                        '(huechroma: the chroma term)')
    p.add_argument('--fc-dropout', type=finite_float, default=0.0, metavar='P',
                   help='dropout after the ReLU of fc6 and fc7 (vgg16, alexnet), which the hypercolumn then reads; '
                        "the original Caffe recipe used 0.5 (default %(default)s)")
    p.add_argument('--width', type=finite_float, default=1.0,
                   help='channel width multiplier (< 1 only for smoke tests)')
    p.add_argument('--fc-dim', type=int, help='fc6/fc7 channels of VGG-16 and AlexNet (default 4096; 1024 on CPU)')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda when available)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model (default: on for CUDA, off on CPU)')
    p.add_argument('--seed', type=seed_int, default=0,
                   help='seed of the initial weights, data order, augmentation, pixels and dropout')
    p.add_argument('--workers', type=int, help='data loader processes per GPU (default: the cores this process may '
                   'use, its CPU affinity, split among the ranks of its node that share them, less one, at most '
                   '16; 1 on CPU)')
    p.add_argument('--handover', choices=('slots', 'torch'), default='slots',
                   help='how loader processes hand batches to the main process: slots (shared memory set aside '
                        'once, data.SlotBatches; default) or torch (DataLoader\'s own: new shared memory per batch)')
    p.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                   help='continue the run of CKPT (default: <out>/checkpoint.pt) with its settings (data, '
                        'network, schedule); a run flag given anew must have the run\'s value, a schedule or logging '
                        'flag wins (README: Resuming and changing a run); --device, --workers, --compile, --handover '
                        'are this process\'s own')
    p.add_argument('--log-every', type=int, default=None, help='steps between progress lines (default ~50 lines)')
    p.add_argument('--eval-every', type=int, default=None, help='steps between evaluations (default ~5 per run)')
    p.add_argument('--save-every', type=int, default=None, help='steps between checkpoints (default = --eval-every)')
    p.add_argument('--keep-every', type=int, default=None, metavar='N',
                   help='also keep the checkpoint of every N-th step as checkpoint-stepNNNNNNN.pt (a hard link: no '
                        'extra write), to fine-tune from several points of one run (default, or 0: keep only the '
                        'latest)')
    p.add_argument('--max-bad-share', type=finite_float, default=0.01,
                   help='stop when more than this share of images is unreadable '
                   '(default %(default)s)')
    p.add_argument('--exit-after', type=int, help='stop after this step as if killed (for testing --resume)')
    p.add_argument('--demo-root', type=Path, default=DEMO_ROOT, help='where the demo world is generated')
    p.add_argument('--benchmark', nargs='?', const='all', choices=('all', 'train', 'loader', 'colorize'),
                   help='instead of training, time training steps (synthetic data and the real loader; '
                        'compiled and eager; the same trunk as a classifier as baseline) and/or colorizing a '
                        '1-megapixel photo (at --net-short-side and at its own size); default: all; '
                        'loader: only the colorizer through the real loader, and the loader alone')
    p.add_argument('--bench-warmup', type=int, help='--benchmark: untimed steps, compilation included, and '
                   'untimed calls of --benchmark colorize (default 10 steps, 1 call)')
    p.add_argument('--bench-steps', type=int, help='--benchmark: timed steps, and timed calls of --benchmark '
                   'colorize, which gives their median (default 20 steps; 10 calls on a GPU, 3 on a CPU)')
    p.add_argument('--bench-profile', action='store_true',
                   help='--benchmark: also profile the training steps (torch.profiler): where the time goes, by '
                        'kernel family, and the longest kernels, in OUT/profile-*.txt; and time the colorizer with '
                        'every tap read by gathers (matmul_cells 0), the row "gathers"')
    p.add_argument('--bench-photo', type=int, nargs=2, default=[866, 1155], metavar=('H', 'W'),
                   help='--benchmark: size of the photo to colorize (default: 1 megapixel, 4:3)')
    # Colorizing photos.
    p.add_argument('--colorize', nargs='+', metavar='PATH', help='colorize these images or folders, then exit')
    p.add_argument('--checkpoint', type=Path, help='trained checkpoint for --colorize')
    p.add_argument('--output', type=Path, default=Path('colorized'),
                   help='folder for colorized images (default %(default)s)')
    p.add_argument('--skip-existing', action='store_true',
                   help='--colorize: leave an output that is newer than its photo and the checkpoint (a rerun '
                        'of a stopped job goes on where it stopped); default: every output written anew')
    p.add_argument('--net-short-side', type=int, metavar='N',
                   help='--colorize: the network sees each photo resized to this short side; its colour is '
                        'upsampled and put on the photo\'s full-resolution lightness (default: the middle of '
                        'the checkpoint\'s training --short-side range, where objects look as large as in '
                        'training; 0: the photo\'s own size, slower)')
    return p.parse_args(argv)


# --- Devices, precision, distributed ------------------------------------------------------------

def setup_device(args, distributed=True):
    """Returns (device, rank, world_size, local_rank); starts the process group under torchrun
    (one process too: DDP and its collectives then run as they would with more), unless not
    `distributed`."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    torchrun = distributed and 'RANK' in os.environ and 'MASTER_ADDR' in os.environ
    rank, local = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if args.device:
        device = parse_device(args.device)
    else:
        device = torch.device('cuda', local) if torch.cuda.is_available() else torch.device('cpu')
    if device.type == 'cuda':
        if torchrun:
            device = torch.device('cuda', local)
        elif device.index is None:  # plain 'cuda': the current device, as torch reads it
            device = torch.device('cuda', torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise UserError(f'--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)')
        torch.cuda.set_device(device)  # needs an index: torch.device('cuda') alone is refused
        capability = torch.cuda.get_device_capability(device)
        if capability < (8, 0) and rank == 0:
            print(f'warning: {device} has compute capability {capability[0]}.{capability[1]}, without native '
                  f'bfloat16: the bf16 autocast that training uses runs emulated (slowly) or fails there; an '
                  f'Ampere or newer GPU (8.0+) is what this code is made for', file=sys.stderr)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    if torchrun and 'TORCHELASTIC_RUN_ID' in os.environ:  # started by torchrun, not by hand
        data.exit_with_parent(os.getppid(), f'rank {rank}: torchrun (pid {os.getppid()}) is gone, so this process '
                                            f'stops too; continue the run with --resume')
    if torchrun and not dist.is_initialized():
        # Rank 0 alone lists the data (minutes for millions of files on a network file system),
        # evaluates and saves while the others wait in a collective: more than the 10-minute default.
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo',
                                timeout=datetime.timedelta(minutes=60))
    return device, rank, world, local


def parse_device(name):
    """--device NAME -> torch.device, with one-line errors for a bad name or a missing GPU."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f'--device {name!r} is not a device: use cuda, cuda:N or cpu') from e
    if device.type not in ('cuda', 'cpu'):  # mps (Apple), xpu, ...: never run, so refused before any work
        raise UserError(f'--device {name}: this code runs on cuda (bf16) or cpu (float32) only; {device.type} is '
                        f'not supported (untested: precision, compile and the pinned copies are set up for '
                        f'cuda and cpu alone): use --device cpu')
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {name} asked for CUDA, but torch.cuda.is_available() is False')
    return device


def autocast(device):
    """bf16 autocast on CUDA; plain float32 elsewhere (tests run anywhere)."""
    return torch.autocast('cuda', dtype=torch.bfloat16) if device.type == 'cuda' else torch.autocast('cpu', enabled=False)


def cpu_note(args, world=1):
    """What the first line says of a CPU run (after fill_defaults): small defaults, which finish the demo in
    minutes, where the run has them (not with a typed --crop 224, say); with --data the steps stay the paper's
    16M images (2,000,000 of 8), which it says where the run has that many (a typed --steps 1000, or a
    1000-step run resumed without it, has not)."""
    cpu, gpu = CPU_DEFAULTS, GPU_DEFAULTS
    small = args.crop <= cpu['crop'] and args.batch_size <= cpu['batch_size']
    gpu_runs = f'a GPU runs {gpu["crop"]} crops, batch {gpu["batch_size"]}'
    if args.data is None and small and args.steps <= cpu['demo_steps']:
        return f' (CPU: small defaults so the demo finishes in minutes; {gpu_runs})'
    full = args.data is not None and args.steps == math.ceil(PAPER_SAMPLES / (args.batch_size * world))
    parts = ['small crop and batch'] if small else []
    parts += [gpu_runs] if (args.crop, args.batch_size) != (gpu['crop'], gpu['batch_size']) else []
    parts += ["the steps are the full schedule's: give --steps N for a short run"] if full else []
    return f' (CPU: {"; ".join(parts)})' if parts else ''


def fill_defaults(args, device, world):
    """Machine- and data-dependent defaults (smaller ones on a CPU, which train() then says); then the
    settings refused (refuse_invalid_settings) and the flags that change nothing warned of."""
    cores = cores_of_this_process()  # first: under DDP a collective, which every rank must reach
    refuse_non_finite(args)
    d = GPU_DEFAULTS if device.type == 'cuda' else CPU_DEFAULTS
    for name in ('steps', 'batch_size', 'points', 'crop', 'fc_dim', 'holdout', 'log_every', 'eval_every',
                 'save_every', 'subset', 'workers', 'warmup', 'bench_warmup', 'bench_steps'):
        value, least = getattr(args, name), 0 if name in ('workers', 'warmup', 'bench_warmup') else 1
        if value is not None and value < least:
            raise UserError(f'{flag_name(name)} must be at least {least}, got {value}')
    args.crop = args.crop if args.crop is not None else d['crop']
    args.batch_size = args.batch_size if args.batch_size is not None else d['batch_size']
    args.fc_dim = args.fc_dim if args.fc_dim is not None else d['fc_dim']
    args.holdout = args.holdout if args.holdout is not None else d['holdout']
    global_batch = args.batch_size * world
    if args.steps is None:
        args.steps = d['demo_steps'] if args.data is None else math.ceil(PAPER_SAMPLES / global_batch)
    args.lr = args.lr if args.lr is not None else 1e-3 * global_batch / 8
    args.warmup = args.warmup if args.warmup is not None else max(1, round(0.02 * args.steps))
    args.short_side = args.short_side or [args.crop, round(args.crop * 600 / 352)]
    args.border = args.border if args.border is not None else args.crop // 7
    args.compile = device.type == 'cuda' if args.compile is None else args.compile
    if args.workers is None:  # decoding JPEGs is what usually starves a GPU: give it the node's cores
        args.workers = max(1, min(16, cores - 1)) if device.type == 'cuda' else 1
    if getattr(args, 'derived_from_steps', None) is None:  # a fresh run; resume_intervals sets a resumed one's
        args.derived_from_steps = [name for name in STEP_INTERVALS if getattr(args, name) is None]
    derive_intervals(args)
    if getattr(args, 'sample_digits', None) is None:  # a fresh run; resume_settings sets a resumed one's
        args.sample_digits = max(SAMPLE_DIGITS, len(str(args.steps)))
    args.out = args.out or default_out(args)
    refuse_invalid_settings(args)
    # Warnings last, once no check above refuses the run (its error is then the one line to read).
    warn_flags_that_change_nothing(args)
    return args


def refuse_invalid_settings(args):
    """UserError for the first of the settings (after fill_defaults' defaults) that a run cannot use: a value
    out of its range, or flags that contradict each other or that the run would ignore in silence (--val-data
    without --data, --target-window with --loss l2, ...). Checked in a fixed order: a run with two of them
    stops with the same one each time."""
    typed = getattr(args, 'typed_flags', frozenset())
    if not 0 <= args.fc_dropout < 1:
        raise UserError(f'--fc-dropout is a probability in [0, 1), got {args.fc_dropout}')
    if args.data is None and 'val_data' in typed:
        raise UserError('--val-data without --data: a run without --data trains and validates on the demo world '
                        '(its own val set), which would ignore --val-data; give the training images with --data')
    if args.data is not None and 'demo_root' in typed:
        raise UserError('--demo-root is where the demo world goes, which a run with --data does not use: drop it')
    if 'target_window' in typed and args.loss == 'l2' and args.objective == 'colorize':
        raise UserError('--target-window sets the window of the histogram targets (--loss huechroma, ab); --loss l2 '
                        'regresses each pixel\'s own (a, b) and would ignore it: drop it')
    if 'classes' in typed and args.objective != 'classify':
        raise UserError('--classes applies to --objective classify; --objective colorize would ignore it: drop it')
    if args.fc_dropout and not has_fc(args.arch):
        raise UserError(f'--fc-dropout applies to fc6 and fc7, which {args.arch} does not have '
                        f'({", ".join(a for a in sorted(MODELS) if has_fc(a))} do)')
    if args.target_window < 1 or args.target_window % 2 == 0:
        raise UserError(f'--target-window must be odd and positive (a window centred on the pixel), '
                        f'got {args.target_window}')
    if args.border < 0:
        raise UserError(f'--border must be at least 0, got {args.border}')
    refuse_milestones_outside(args.lr_milestones)
    if args.keep_every is not None and args.keep_every < 0:
        raise UserError(f'--keep-every must be a step count, or 0 for none, got {args.keep_every}')
    refuse_crop_below_min(args.arch, args.crop)
    if args.crop <= 2 * args.border:
        raise UserError(f'--border {args.border} leaves no pixels to sample in a {args.crop} crop; '
                        f'use a smaller --border or a larger --crop')
    if args.short_side[0] > args.short_side[1]:
        raise UserError(f'--short-side {args.short_side[0]} {args.short_side[1]}: LO must not exceed HI')
    if args.short_side[0] < args.crop:
        raise UserError(f'--short-side {args.short_side[0]} {args.short_side[1]}: LO must be at least --crop '
                        f'{args.crop}, or crops would need padding (and colour targets for the padding)')


def warn_flags_that_change_nothing(args):
    """Warnings (rank 0, stderr) for typed flags that this run does not read: the colour targets' flags under
    --objective classify, --fc-dim for a trunk without fc6/fc7. Not refusals: they change nothing, and a
    script may pass the same flags to every -a and objective."""
    typed = getattr(args, 'typed_flags', frozenset())
    unread = sorted(typed & COLOR_TARGET_FLAGS) if args.objective == 'classify' else []
    unread_fc_dim = 'fc_dim' in typed and not has_fc(args.arch)
    if (unread or unread_fc_dim) and (not dist.is_initialized() or dist.get_rank() == 0):
        if unread:
            print(f'warning: --objective classify does not read {", ".join(map(flag_name, unread))} (the colour '
                  f'targets\' flags): they change nothing here', file=sys.stderr)
        if unread_fc_dim:
            print(unread_fc_dim_warning(args.arch), file=sys.stderr)


# The intervals that fill_defaults derives from --steps. A run records those that its first start did not
# type (args.derived_from_steps, saved with its args), so that a resume with another --steps derives
# them anew (resume_intervals). --keep-every has no default of --steps; --warmup (2% of --steps) is kept
# as the run had it: the warm-up it ran, which a longer --steps would restart part way.
STEP_INTERVALS = ('log_every', 'eval_every', 'save_every')


def derive_intervals(args):
    """Fill the STEP_INTERVALS that are None from args.steps: ~50 progress lines, ~5 evaluations, a
    checkpoint at each evaluation."""
    if args.log_every is None:
        args.log_every = max(1, args.steps // 50)
    if args.eval_every is None:
        args.eval_every = max(1, args.steps // 5)
    if args.save_every is None:
        args.save_every = args.eval_every


def resume_intervals(args, saved, intervals, derive, log):
    """--resume (both scripts; after merge_resumed_args): the `intervals` that the run's first start
    derived from --steps (saved['derived_from_steps']) and this command does not type are derived anew
    by `derive` when --steps changed, with a line to `log` (None: quiet); a 100-step run resumed to
    2000 evaluated every 20 steps before. Typed ones, then or now, are kept. A checkpoint without the
    record (before 2026-11-27) keeps its intervals, as then; the same --steps keeps them (exact)."""
    record = saved.get('derived_from_steps')
    args.derived_from_steps = ([name for name in record if name in intervals and name not in args.typed_flags]
                               if isinstance(record, list) else [])
    if saved.get('steps') == args.steps or not args.derived_from_steps:
        return
    was = {name: getattr(args, name) for name in args.derived_from_steps}
    for name in was:
        setattr(args, name, None)
    derive(args)
    if log and any(getattr(args, name) != value for name, value in was.items()):
        log(f'--steps {args.steps}: ' + ', '.join(f'{flag_name(name)} {getattr(args, name)}' for name in was)
            + f' (derived from --steps, where the run had {", ".join(str(v) for v in was.values())}; type them '
            f'to keep those)')


def unread_fc_dim_warning(arch):
    """The line for --fc-dim typed for a trunk without fc6/fc7 (both scripts): not a refusal, as a script may
    pass one --fc-dim to every -a."""
    return f'warning: --fc-dim sets the channels of fc6 and fc7, which {arch} does not have: it changes nothing here'


def refuse_milestones_outside(milestones):
    """--lr-milestones are fractions of --steps: one at 0 or below would drop the lr from the first step, one
    at 1 or above (a step count typed, say) never, in silence (both scripts)."""
    wrong = [m for m in milestones if not 0 < m < 1]
    if wrong:
        raise UserError(f'--lr-milestones {" ".join(f"{m:g}" for m in milestones)}: each is a fraction of --steps, '
                        f'between 0 and 1 (0.5: half way), got {wrong[0]:g}')


# Flags that define a run: --resume takes the ones not given from the checkpoint (so resuming with
# fewer flags, e.g. without --data, continues the same run). Given explicitly with another value,
# the schedule and logging flags win (a longer --steps, say, and the run says so); the others would
# change the data order, the pixels or the network, and are refused.
RUN_FLAGS = ('arch', 'objective', 'classes', 'loss', 'data', 'val_data', 'holdout', 'subset', 'demo_root',
             'seed', 'batch_size', 'crop', 'short_side', 'points', 'border', 'target_window',
             'lightness_weight', 'fc_dropout', 'width', 'fc_dim')
SCHEDULE_FLAGS = ('steps', 'lr', 'lr_milestones', 'warmup', 'momentum', 'weight_decay', 'max_bad_share',
                  'log_every', 'eval_every', 'save_every', 'keep_every')
# What runs made before a run flag existed did (their checkpoints' args lack it): a resume takes this
# value, and refuses another typed one, as for any run flag. (--objective and --classes came with
# 365c0cc, --fc-dropout with 947915a.)
LEGACY_ARGS = {'fc_dropout': 0.0, 'objective': 'colorize', 'classes': None}


PATH_FLAGS = ('data', 'val_data', 'demo_root')

# The flags each mode reads (dests). A flag typed for a mode that does not read it would be silently
# ignored, though the user believes it applied: main() refuses it (unread_flags_problem). Training
# reads every flag but these; --benchmark's kinds each read part of BENCHMARK_FLAGS (a warning names
# the rest, which a script may pass to all its kinds).
COLORIZE_FLAGS = frozenset({'colorize', 'checkpoint', 'output', 'net_short_side', 'device', 'skip_existing'})
BENCH_ONLY_FLAGS = frozenset({'benchmark', 'bench_warmup', 'bench_steps', 'bench_profile', 'bench_photo'})
BENCHMARK_FLAGS = BENCH_ONLY_FLAGS | {
    'net_short_side', 'arch', 'loss', 'data', 'demo_root', 'subset', 'batch_size', 'crop', 'short_side', 'points',
    'border', 'target_window', 'lightness_weight', 'fc_dropout', 'width', 'fc_dim', 'device', 'compile', 'seed',
    'workers', 'handover', 'out', 'momentum', 'weight_decay'}
BENCHMARK_COLORIZE_FLAGS = frozenset({'benchmark', 'bench_photo', 'bench_warmup', 'bench_steps', 'net_short_side',
                                      'arch', 'loss', 'width', 'fc_dim', 'fc_dropout', 'seed', 'crop', 'short_side',
                                      'device', 'out'})
BENCHMARK_KIND_FLAGS = {'all': BENCHMARK_FLAGS, 'train': BENCHMARK_FLAGS - {'bench_photo', 'net_short_side'},
                        'loader': BENCHMARK_FLAGS - {'bench_photo', 'net_short_side', 'bench_profile'},
                        'colorize': BENCHMARK_COLORIZE_FLAGS}
# The flags of the colour targets, which --objective classify does not read (fill_defaults warns).
COLOR_TARGET_FLAGS = frozenset({'loss', 'target_window', 'lightness_weight', 'points', 'border'})
UNREAD_HINTS = {  # (mode, flag) -> what the user may have meant
    ('training', 'checkpoint'): 'continue a run with --resume CKPT; fine-tune from it with finetune_voc.py --init CKPT',
    ('training', 'output'): '--out names the run folder',
    ('--benchmark', 'output'): '--out names the folder of benchmark.json',
    ('--colorize', 'out'): '--output names the folder of the colorized images',
    ('--benchmark', 'steps'): '--bench-steps sets the timed steps',
    ('--benchmark', 'resume'): 'it builds a fresh network of the flags given',
    ('--benchmark', 'objective'): 'it times the colorizer and the same trunk as a classifier',
}


def flag_name(dest):
    return '--' + dest.replace('_', '-')


def unread_flags_problem(args):
    """The one-line refusal of the first typed flag that the chosen mode (training, --colorize or
    --benchmark) does not read, or None. A warning line for --benchmark KIND's unread flags."""
    mode = '--colorize' if args.colorize else '--benchmark' if args.benchmark else 'training'
    reads = {'--colorize': COLORIZE_FLAGS, '--benchmark': BENCHMARK_FLAGS}.get(mode)
    if reads is None:  # training: every flag but those of the other modes
        reads = set(vars(args)) - (COLORIZE_FLAGS | BENCH_ONLY_FLAGS) | {'device'}
    if args.colorize and args.benchmark:
        return '--colorize and --benchmark are two modes: give one'
    for name in sorted(args.typed_flags - reads):
        hint = UNREAD_HINTS.get((mode, name))
        return (f'{flag_name(name)} does not apply to {mode}' + ('' if mode != 'training' else
                                                                 ' (without --colorize or --benchmark)')
                + f', which would ignore it{f" ({hint})" if hint else ""}: drop it')
    if args.benchmark:
        unread = sorted(args.typed_flags - BENCHMARK_KIND_FLAGS[args.benchmark])
        if unread:
            print(f'warning: --benchmark {args.benchmark} does not read {", ".join(map(flag_name, unread))} '
                  f'(other kinds of --benchmark do)', file=sys.stderr)
    return None


def cores_of_this_process():
    """This process's share of the cores it may run on (its CPU affinity), split evenly with the
    other processes of its node (under DDP) whose affinity overlaps it: torchrun's ranks all share
    the node's cores, while tasks that srun binds to cores of their own (--cpus-per-task) share none."""
    mine = data.usable_core_ids()
    if not dist.is_initialized():
        return len(mine)
    host, every = socket.gethostname(), [None] * dist.get_world_size()
    dist.all_gather_object(every, (host, sorted(mine)))
    sharing = sum(1 for other, cores in every if other == host and not mine.isdisjoint(cores))
    return max(1, len(mine) // sharing)


def absolute_paths(values, names, keywords=()):
    """Make the path flags `names` of the dict `values` absolute (in place; lists item by item; None
    and `keywords` kept) and return it: a run saves them so, and --resume from another working
    folder finds the same files (and a typed relative spelling of them is the same value)."""
    def absolute(v):
        if v is None or v in keywords:
            return v
        return Path(os.path.abspath(v)) if isinstance(v, Path) else os.path.abspath(v)
    for name in names:
        if name in values:
            v = values[name]
            values[name] = [absolute(x) for x in v] if isinstance(v, (list, tuple)) else absolute(v)
    return values


def resume_settings(args, ckpt, path, world, log=print):
    """Fill args from the checkpoint's run (see RUN_FLAGS); UserError where the command contradicts it."""
    saved = absolute_paths({**LEGACY_ARGS, **ckpt['args']}, PATH_FLAGS)
    merge_resumed_args(args, saved, RUN_FLAGS, SCHEDULE_FLAGS, path, log, must_exist=('data', 'val_data'))
    refuse_fewer_steps(args.steps, ckpt['step'], path)
    resume_intervals(args, saved, STEP_INTERVALS, derive_intervals, log)
    resume_sample_digits(args, saved, path, log)
    note_moved_lr(args, saved, ckpt['step'], lr_at, log)
    if ckpt.get('world', world) != world:
        raise UserError(f'{path} was trained by {ckpt["world"]} processes, this is {world}: the data order and '
                        f'the global batch depend on it; resume with torchrun --nproc_per_node={ckpt["world"]} '
                        f'(or the same total over nodes)')


# The digits of the step in the sample grids' names (samples/step_NNNNNNN.png), as in kept checkpoints'
# (kept_path): more if the first start's --steps has more. Fixed for the run (args.sample_digits), so
# that its grids sort by name in step order; a run from before 2026-11-27 (no record) keeps its 6.
SAMPLE_DIGITS = 7


def resume_sample_digits(args, saved, path, log):
    """--resume: the run's width of the sample grids' step (SAMPLE_DIGITS; 6 before the record), with a
    warning to `log` when --steps outgrows it (the names of the later grids would sort out of order)."""
    digits = args.sample_digits = saved.get('sample_digits', 6)
    if not isinstance(digits, int) or isinstance(digits, bool) or digits < 1:
        raise UserError(f'{path}: its args\' sample_digits is {digits!r}, not a number of digits (edited by '
                        f'hand?); set it to the digits of its sample grids\' names')
    if log and len(str(args.steps)) > digits and args.objective == 'colorize':
        log(f'warning: --steps {args.steps} has more digits than the names of this run\'s sample grids '
            f'(samples/step_{0:0{digits}d}.png): from step {10 ** digits} on, they sort out of step order by '
            f'name (step_{10 ** digits}.png before step_{2 * 10 ** (digits - 1)}.png)')


def note_moved_lr(args, saved, step, lr_at, log):
    """--resume with another --steps (or milestones, warm-up; both scripts): the milestones are
    fractions of --steps, so the rate of the next step can jump, e.g. up 100x when a finished 1000-step
    run goes on to 2000 (its three drops undone but the first). Print a line to `log` when it moved."""
    if all(saved.get(k) == getattr(args, k, None) for k in ('steps', 'lr_milestones', 'warmup')):
        return  # only --lr (--lr-gamma) changed: the line that says so is enough
    schedule = ('steps', 'lr', 'lr_milestones', 'lr_gamma', 'warmup')
    before = argparse.Namespace(**{**vars(args), **{k: saved[k] for k in schedule if k in saved}})
    was, now = lr_at(step, before), lr_at(step, args)
    if log and not math.isclose(was, now, rel_tol=1e-9):
        log(f'the learning rate of step {step + 1} is {now:g} where the run had {was:g} (--lr-milestones are '
            f'fractions of --steps {args.steps})')


def refuse_fewer_steps(steps, done, path):
    if steps < done:
        raise UserError(f'{path} is at step {done}: --steps {steps} would end before the run resumes; '
                        f'give --steps {done} or more, or leave the flag out')


def merge_resumed_args(args, saved, run_flags, schedule_flags, path, log=print, must_exist=()):
    """--resume: each flag of run_flags + schedule_flags not typed on the command line (not in
    args.typed_flags, see data.ArgumentParser) takes the saved value; typed with another value, a
    schedule flag wins with a line to `log` (None: quiet) and a run flag is refused (UserError).
    `must_exist`: path flags whose saved files the resumed run reads again; one that is gone (a data set
    moved) is refused with how to continue, rather than as a missing file or a changed flag.
    Returns {flag name: [saved, typed value]} of the schedule flags that changed."""
    for name in must_exist:
        was = saved.get(name)
        gone = [p for p in (was if isinstance(was, list) else [was])
                if isinstance(p, str) and os.path.isabs(p) and not os.path.exists(p)]
        if gone:
            flag = flag_name(name)
            raise UserError(f'{path} was trained with {flag} {gone[0]}, which no longer exists (moved, or not mounted '
                            f'here?). A resumed run reads the same paths, so {flag} cannot change: make {gone[0]} '
                            f'lead to the files again (e.g. ln -s NEW_PLACE {gone[0]}) and resume without {flag}')
    given_args, changed = plain_args(args), {}
    for name in run_flags + schedule_flags:
        if name not in saved:
            continue
        given, was = given_args[name], saved[name]
        # A trunk without fc6/fc7 (a ResNet) reads no --fc-dim: a typed one keeps its warning (fill_defaults), not
        # a refusal for changing the run
        unread = name == 'fc_dim' and saved.get('arch') in MODELS and not has_fc(saved['arch'])
        if name not in args.typed_flags or given == was or unread:
            setattr(args, name, Path(was) if isinstance(getattr(args, name), Path) and was is not None else was)
            continue
        flag = flag_name(name)
        shown = ' '.join(map(str, was)) if isinstance(was, list) else was
        if name not in schedule_flags:
            raise UserError(f'{path} was trained with {flag} {shown}; resuming with another {flag} would not continue '
                            f'that run: drop the flag, or start a new run with another --out')
        if log:
            log(f'resuming with {flag} {given} where {path} had {shown}')
        changed[name] = [was, given]
    return changed


def default_out(args):
    """runs/<arch>-<loss>, or runs/<arch>-classify for the supervised baseline (beside this file)."""
    return HERE / 'runs' / f'{args.arch}-{args.loss if args.objective == "colorize" else "classify"}'


def lr_at(step, args):
    """Pre-training's learning rate at `step` (from 0): linear warm-up over --warmup steps, then
    x0.1 at each milestone (fractions of --steps). finetune_voc.lr_at is the transfer protocols'."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * 0.1 ** sum(step >= m * args.steps for m in args.lr_milestones)


def step_seed(seed, step, rank):
    """Each step's randomness (pixels, dropout) is a function of (seed, step, rank): resuming is exact."""
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2 ** 63)


# --- Data ---------------------------------------------------------------------------------------

def image_sources(args, master, hold_out=True, held=None):
    """Returns (train paths, val paths), generating the demo world if no --data is given.
    hold_out=False (the benchmark, which never validates): without --val-data, no --holdout is set
    aside, and val is empty. held: the paths a resumed run set aside (its checkpoint's
    data.held_out), kept as they are when the listing has changed since (images added)."""
    log = print if master else (lambda *a, **k: None)  # one listing line per root, from rank 0
    if args.data is None:
        prepare_demo_world(args, master)
        if master:
            print(f'no --data given: training on the demo world in {args.demo_root}')
        train = data.find_images([args.demo_root / 'train'], log=log)
        val = data.find_images([args.demo_root / 'val'], log=log)
    else:
        train, val = listed_images(args, master, log)
        train = leave_out_run_folder(train, args.data, args.out, '--data', master)
        val = val and leave_out_run_folder(val, args.val_data, args.out, '--val-data', master)
        packed_twice(args, train + (val or []), master)
        for root in args.data:
            packed = data.pack_short_side(root)
            if master and packed is not None and packed < args.short_side[1]:
                print(f'warning: the pack {root} holds images resized to short side {packed}, below '
                      f'--short-side {args.short_side[0]} {args.short_side[1]}: larger sizes are upscaled, '
                      f'blurrier than the originals; pack at --short-side {args.short_side[1]} or train with '
                      + (f'--short-side {min(args.short_side[0], packed)} {packed}' if packed >= args.crop else
                         f'--crop {packed} --short-side {packed} {packed}'))
        if val is None and not hold_out:
            val = []
        elif val is None:
            train, val = hold_out_val(args, train, held, master)
    return train, val


def prepare_demo_world(args, master):
    """No --data: make the demo world in --demo-root (data.ensure_demo) where every rank can read it. Rank 0
    makes it; under DDP the first rank of each other node too, as another node may not see rank 0's (a
    --demo-root on its own disk, /tmp say; a shared one is then found done at once). Raises UserError on
    every rank when one could not. Every rank must call it (collectives: rank0_problem's broadcast, then
    all_gather_object under DDP)."""
    def make_demo():
        try:
            data.ensure_demo(args.demo_root)
        except (ValueError, OSError) as e:  # a foreign folder where the demo should be, a full disk
            return str(e)
    problem = rank0_problem(make_demo() if master else None)  # every rank learns it (and none waits forever)
    if problem:
        raise UserError(problem if master else f'rank 0 could not prepare the demo world: {problem}')
    if dist.is_initialized():
        first_on_node = not master and os.environ.get('LOCAL_RANK', '0') == '0'
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, make_demo() if first_on_node else None)
        problem = next((f'rank {r} could not prepare the demo world: {p}' for r, p in enumerate(every) if p), None)
        if problem:
            raise UserError(problem)


def listed_images(args, master, log):
    """The listings of --data and --val-data: (train paths, val paths or None without --val-data), the same
    on every rank. Rank 0 scans (millions of files) and writes the listing cache (in the run folder); under
    DDP the other ranks then read it, and all compare theirs. Raises UserError on every rank when a rank
    could not list, or listed other images. Every rank must call it (collectives under DDP: rank0_problem's
    broadcast, then all_gather_object). log: where the listing lines go (rank 0's print)."""
    cache = args.out / 'cache'

    def scan():
        try:
            return (data.find_images(args.data, cache_dir=cache, log=log),
                    data.find_images(args.val_data, cache_dir=cache, log=log) if args.val_data else None), None
        except (ValueError, FileNotFoundError) as e:
            return None, str(e)
    found, problem = scan() if master else (None, None)
    if dist.is_initialized():
        problem = rank0_problem(problem)  # also the barrier before the others read the cache
        if not master and problem is None:
            found, problem = scan()
        # The ranks shard one list: a folder that changed between rank 0's scan and another's
        # (no cache is written for a folder changed in the last seconds) would split different ones.
        mine = None if problem else [data_identity(found[0]), found[1] and data_identity(found[1])]
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, (mine, problem))
        problem = problem or listing_problem(every)
    if problem:
        raise UserError(problem)
    return found


def hold_out_val(args, train, held, master):
    """--data without --val-data: set --holdout of the `train` paths aside for validation; returns (train
    paths without them, val paths sorted). A fixed random choice (HOLDOUT_SEED) from the whole listing, or
    for --objective classify --classes from the chosen classes' (the others dropped from train here). held:
    the paths a resumed run set aside (its checkpoint's data.held_out), kept as far as they are still listed
    (a warning for those that are not), so that images added to --data since do not change the choice."""
    if args.objective == 'classify' and args.classes is not None:
        # Held out from the chosen classes: drawn from all, most would be dropped with their class.
        names = set(chosen_classes(args, train))
        train = [p for p in train if class_folder(p) in names]
        if held is not None:  # a run from before, held out from all classes: the others' were dropped
            held = [p for p in held if class_folder(p) in names] or held
    if held is not None:  # the random choice below depends on the whole listing
        kept = set(held) & set(train)
        if master and len(kept) < len(held):
            print(f'warning: {len(held) - len(kept)} of the run\'s {len(held)} held-out images are no '
                  f'longer in --data: ' + (f'it validates on the other {len(kept)}' if kept else
                                           'it validates on a new choice, not comparable with before'))
        held = kept or None
    if held is None:
        if len(train) <= 2 * args.holdout:
            raise UserError(f'--data has {len(train)} images: too few to hold out --holdout '
                            f'{args.holdout} for validation; pass --val-data or a smaller --holdout')
        held = set(data.subset(train, args.holdout, seed=HOLDOUT_SEED))
    val = sorted(held)
    train = [p for p in train if p not in held]
    return train, val


def rank0_problem(problem):
    """Rank 0's `problem` (an error message, or None) on every rank under DDP, so that all stop
    together where rank 0 alone did the work; `problem` itself without DDP. Every rank must call it."""
    if not dist.is_initialized():
        return problem
    shared = [problem]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def leave_out_run_folder(paths, roots, out, flag, master):
    """`paths` listed from `roots` without the images under the run folder `out` when it lies inside one
    of the roots (`--data ~/photos --out ~/photos/run`): the run's own sample grids, written as it
    trains, are no training images (a resumed run would otherwise train on them, in another order).
    An `out` that is a root itself (`--data ~/photos --out ~/photos`): its samples/ folder. Inside as
    spelled or as resolved: a link in the root to a run folder elsewhere is listed through the link."""
    prefixes = []
    for root in roots:
        for base, out_path in ((os.path.abspath(root), os.path.abspath(out)),
                               (os.path.realpath(root), os.path.realpath(out))):
            run = os.path.join(out_path, 'samples') if out_path == base else out_path  # where write_grid puts them
            if os.path.isdir(root) and run.startswith(base.rstrip(os.sep) + os.sep):
                prefixes.append(os.path.join(os.path.abspath(root), os.path.relpath(run, base)) + os.sep)
    if not prefixes:
        return paths
    kept = [p for p in paths if not p.startswith(tuple(prefixes))]
    if master and len(kept) < len(paths):
        print(f'left out {len(paths) - len(kept)} image(s) under --out {out} (the run\'s own samples, not {flag} '
              f'images)')
    return kept


def packed_twice(args, paths, master):
    """A pack given beside the folder it was packed from (`--data PACK FOLDER`, or `--val-data FOLDER`) lists
    each of those images twice, as its packed copy and as the file: they train twice as often, and a
    held-out one is trained on through its other copy, which inflates the validation figures. Refused
    (UserError) for a fresh run; a resumed one, whose --data cannot change, gets a warning. The packs are
    those the listing reads (PACK/index.npy/<i>/<folder>/<name>): a pack given, or a .txt list of its images."""
    heads, files = set(), set()
    for p in paths:
        parts = data.pseudo_path_parts(p)
        if parts is None:
            files.add(p)
        else:
            heads.add(parts[0])
    packs = sorted(h for h in heads if data.pack_short_side(h) is not None)
    if not packs or not files:
        return
    for pack in packs:
        both = [s for s in data.PackReader(pack).sources() if s in files]
        if not both:
            continue
        line = (f'{len(both):,} images are both in the pack {pack} and listed as files (e.g. {both[0]}): the pack '
                f'was made from them, so they would be trained on twice, or validated on while trained on')
        if not args.resume:
            raise UserError(f'{line}; give the pack or the folder it was made from, not both')
        if master:
            print(f'warning: {line} (validation figures of this run are inflated)')


def listing_problem(every):
    """The error that stops every rank, or None: every = [(listing or None, problem or None)] by rank,
    listing = [data_identity of --data, of --val-data or None]. A rank's problem; else lists that
    differ (a folder that changed between rank 0's scan and another's)."""
    problem = next((f'rank {r}: {p}' for r, (_, p) in enumerate(every) if p), None)
    lists = [listing for listing, _ in every]
    differs = next((r for r, listing in enumerate(lists) if listing != lists[0]), None)
    if problem is None and differs is not None:
        problem = (f'rank 0 and rank {differs} listed different images (--data: {lists[0][0]["count"]:,} and '
                   f'{lists[differs][0]["count"]:,}): the folders changed while the ranks listed them; start '
                   f'again once they stay unchanged')
    return problem


def take_subset(args, train):
    """--subset N: a fixed random subset of the training images (RQ3); nested across N."""
    if not args.subset:
        return train
    if args.subset > len(train):
        found = 'found' if args.objective != 'classify' or args.classes is None else f'in the {args.classes} classes'
        raise UserError(f'--subset {args.subset} asks for more images than the {len(train)} {found}')
    return data.subset(train, args.subset, seed=0)


VAL_ORDER = 'fixed-random'  # saved in checkpoints: runs from before it validate on their first paths


def load_val_images(paths, crop, limit=256, keep_gray=False, first=False):
    """A fixed held-out batch: centre crops, uint8 (N, 3, crop, crop), and the indices of the
    paths used, in path order; unreadable images (and grayscale ones, which have no colour to
    predict) skipped. With more than `limit` paths (a --val-data folder), a fixed random `limit` of
    them: the first ones in path order would be the first few class folders (`first`: those, as
    runs did before VAL_ORDER, which a resumed one keeps)."""
    shuffle = len(paths) > limit and not first
    order = np.random.default_rng(HOLDOUT_SEED).permutation(len(paths)) if shuffle else range(len(paths))
    chosen = {}
    for i in order:
        if len(chosen) == limit:
            break
        try:
            rgb = data.center_crop(data.load_rgb(paths[i], min_short_side=crop), crop, crop)
        except data.BadImage as e:
            print(f'warning: skipping held-out image: {e}', file=sys.stderr)
            continue
        if keep_gray or not data.is_grayscale(rgb):
            chosen[int(i)] = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    if not chosen:
        raise UserError(f'no usable {"" if keep_gray else "colour "}images among the {len(paths)} held-out images')
    used = sorted(chosen)
    return torch.stack([chosen[i] for i in used]), used


class Labeled(torch.utils.data.Dataset):
    """ColorImages with a class label per image: item -> (image, status, label)."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, item):
        image, status = self.images[item]
        return image, status, self.labels[item[0]]


def parent_folder(path):
    """os.path.dirname(path), at under half its cost where the last separator has no other just before it
    (1.7 against 4.1 s for 2.4M paths: --objective classify labels millions at each start)."""
    head = path.rpartition(os.sep)[0]
    if head and not head.endswith(os.sep) and not os.altsep:
        return head  # what dirname gives: the part before the last separator, with no separators to strip
    return os.path.dirname(path)


def class_folder(path):
    """--objective classify: an image's label is the name of its folder (ImageNet train layout)."""
    head = parent_folder(path)
    return os.path.basename(head) if os.altsep else head[head.rfind(os.sep) + 1:]  # posixpath.basename's


def chosen_classes(args, paths):
    """The sorted class names of `paths`; with --classes K a fixed random subset of K of them (nested:
    the 10-class subset holds the 5-class one)."""
    return classes_among(args, {class_folder(p) for p in paths})


def classes_among(args, folders):
    """chosen_classes of the images whose class folders are the set `folders`."""
    names = sorted(folders)
    if len(names) < 2:
        raise UserError(f'--objective classify needs images in one folder per class (ImageNet train layout); '
                        f'found {len(names)} folder(s) under --data')
    if args.classes is not None:
        if not 2 <= args.classes <= len(names):
            raise UserError(f'--classes {args.classes}: give 2 to {len(names)} (the class folders found)')
        names = sorted(data.subset(names, args.classes, seed=1))
    return names


def class_labels(args, train, val):
    """--objective classify: label = name of the image's folder (ImageNet train layout); with
    --classes K, a fixed random subset of K classes (nested: the 10-class subset holds the 5-class one),
    then --subset N: N images of those classes."""
    seen = {}  # class folder name -> itself: one string per class, not per path (0.2 GB at 3.7M)
    folders = [seen.setdefault(name, name) for name in map(class_folder, train)]  # class_folder once per path
    names = classes_among(args, seen.keys())
    places = collections.defaultdict(set)  # class name -> the folders of that name (packs: not known)
    # Pack root -> whether it is one: data.packed_entry of its first pseudo-path, not of each (19 s for 1.28M,
    # checking each entry's name; one made again since it was listed gives bad images, counted, in training).
    packs = {}
    for p, name in zip(train, folders):
        parts = data.pseudo_path_parts(p)
        if parts is not None:
            if parts[0] not in packs:
                packs[parts[0]] = data.packed_entry(p) is not None
            if packs[parts[0]]:
                continue
        places[name].add(parent_folder(p))
    index = {n: i for i, n in enumerate(names)}
    merged = {n: sorted(d) for n, d in places.items() if len(d) > 1 and n in index}
    train_labels = [index.get(name) for name in folders]
    train = [p for p, k in zip(train, train_labels) if k is not None]
    train_labels = [k for k in train_labels if k is not None]
    if args.subset:
        train = take_subset(args, train)
        train_labels = [index[class_folder(p)] for p in train]
    val_labels = [index.get(class_folder(p)) for p in val]
    val = [p for p, k in zip(val, val_labels) if k is not None]
    if not val:
        raise UserError('--objective classify: no held-out image belongs to the training classes; '
                        'give --val-data with the same class folders, or use --holdout')
    return dict(names=names, train_paths=train, val_paths=val, merged=merged,
                train=train_labels, val=[k for k in val_labels if k is not None])


def make_loader(paths, args, rank, world, start_step, device, labels=None, stop_step=None):
    dataset = data.ColorImages(paths, args.crop, tuple(args.short_side), flip=True,
                               min_colorful=args.objective == 'colorize')
    if labels is not None:
        dataset = Labeled(dataset, labels)
    if len(paths) // world < args.batch_size:
        raise UserError(f'{len(paths)} training images over {world} process(es) are fewer than one batch of '
                        f'--batch-size {args.batch_size} each; use more images or a smaller --batch-size')
    sampler = data.InfiniteSampler(len(paths), args.batch_size, rank=rank, world_size=world,
                                   seed=args.seed, start_step=start_step, stop_step=stop_step)
    # Workers hand batches over through shared memory set aside once (data.SlotBatches), not per batch.
    slots = None if args.workers == 0 or args.handover == 'torch' else data.SlotBatches(
        args.workers, LOADER_PREFETCH + 1, args.batch_size, (3, args.crop, args.crop))
    loader = data.SigintDeferredLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        collate_fn=slots.collate if slots else None, pin_memory=device.type == 'cuda', drop_last=True,
        persistent_workers=args.workers > 0, prefetch_factor=LOADER_PREFETCH if args.workers > 0 else None,
        **worker_options(args.workers))
    return slots.batches(loader) if slots else loader


def model_input(lab_img):
    """What every network here sees: L* of a Lab batch (B, 3, H, W) (or of L itself, (B, 1, H, W)),
    as (L - 50) / 50 (B, 1, H, W) in [-1, 1], channels_last."""
    return lab.lightness_input(lab_img).contiguous(memory_format=torch.channels_last)


def gray_rgb(lab_img):
    """sRGB (B, 3, H, W) in [0, 1] of a Lab batch with its colour removed: the predict-gray baseline."""
    return lab.lab_to_rgb(torch.cat([lab_img[:, :1], torch.zeros_like(lab_img[:, 1:])], 1))


def prepare(images, args, device, generator=None):
    """uint8 (B, 3, H, W) on the host -> (network input, sampled pixels, their targets, the Lab
    image), all on the device."""
    rgb = images.to(device, non_blocking=True)
    lab_img = lab.rgb_to_lab(rgb)
    x = model_input(lab_img)
    B, _, H, W = rgb.shape
    points = sample_points(B, H, W, args.points, args.border, generator=generator, device=device)
    targets = lab.make_targets(args.loss, lab_img, points, window=args.target_window)
    return x, points, targets, lab_img


# --- Model and checkpoints ----------------------------------------------------------------------

class Classifier(torch.nn.Module):
    """The trunk as a plain classifier (global average pool of the deepest tap, one linear layer),
    trained with cross-entropy: --objective classify (K classes), and the benchmark's in-run
    baseline (1000 classes, on the same batches)."""

    def __init__(self, trunk, classes=1000):
        super().__init__()
        self.trunk = trunk
        self.fc = torch.nn.Linear(trunk.tap_channels[-1], classes)

    def forward(self, x):
        return self.fc(self.trunk(x)[-1].mean((2, 3)))


def model_config(args):
    config = dict(arch=args.arch, objective=args.objective, loss=args.loss, width=args.width, fc_dim=args.fc_dim,
                  fc_dropout=args.fc_dropout)
    if args.objective == 'classify':
        config['classes'] = list(args.class_names)
    return config


def has_fc(arch):
    """Whether the trunk has fc6/fc7 (AlexNet, VGG-16): read off its factory in MODELS, which then takes fc_dim."""
    return 'fc_dim' in inspect.signature(MODELS[arch]).parameters


def min_crop(arch):
    """The smallest input side the trunk of `arch` takes (models.Trunk.min_size: 32 for VGG-16's five poolings,
    1 for the others), read off a trunk of one channel per layer (milliseconds; built under fork_rng, so the
    random numbers of its init leave the run's unchanged; not on the meta device, whose first use imports
    torch._dynamo, a second). Both scripts refuse a smaller --crop before any data is read, which would
    otherwise stop at the first forward pass with a traceback (both scripts)."""
    with torch.random.fork_rng(devices=[]):
        return MODELS[arch](**trunk_kwargs(arch, 1e-3, 1)).min_size


def refuse_crop_below_min(arch, crop):
    """A --crop too small for the trunk of `arch` (min_crop): one line (both scripts)."""
    least = min_crop(arch)
    if crop < least:
        raise UserError(f'--crop {crop} is too small for -a {arch}: its trunk needs inputs of at least {least} '
                        f'pixels on each side; use --crop {least} or more')


def trunk_kwargs(arch, width, fc_dim):
    """The factory's width and, for a trunk with fc6/fc7, fc_dim (the others take none)."""
    return dict(width=width, fc_dim=fc_dim) if has_fc(arch) else dict(width=width)


def make_model(config):
    """The network a checkpoint's config describes: a HypercolumnNet (colorize) or a Classifier."""
    arch = config['arch']
    kwargs = trunk_kwargs(arch, config['width'], config['fc_dim'] if has_fc(arch) else None)
    if config.get('objective', 'colorize') == 'classify':
        model = Classifier(MODELS[config['arch']](**kwargs), len(config['classes']))
    else:
        model = build_model(config['arch'], lab.output_dim(config['loss']), **kwargs)
    if config.get('fc_dropout'):  # --fc-dropout (checkpoints from before it: none)
        model.trunk.fc_dropout.p = config['fc_dropout']
    return model


def rng_state():
    """The RNG states a checkpoint keeps (CUDA's only when this process uses CUDA: reading them would
    start it)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def save_checkpoint(path, model, optimizer, step, args, counts_by_rank, images, progress=None, held_out=None):
    """One dict, written to a temp file and renamed: a crash mid-write never corrupts the last one.
    counts_by_rank: every rank's image status counts (gather_counts); `images` (data_identity of
    the training list) lets --resume notice a changed image list; `progress`: Progress.state();
    `held_out`: the validation paths set aside from --data (None with --val-data or the demo)."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                 config=model_config(args), args=plain_args(args), world=len(counts_by_rank), rng=rng_state(),
                 data=dict(seed=args.seed, step=step, images=images, val_order=VAL_ORDER, held_out=held_out),
                 counts=dict(counts=summed(counts_by_rank)), counts_by_rank=counts_by_rank, progress=progress)
    atomic_save(state, path)


def kept_path(path, step):
    """Where keep_checkpoint keeps the checkpoint `path` of step `step`: <stem>-step<step>.pt beside it."""
    return path.with_name(f'{path.stem}-step{step:07d}.pt')


def kept_checkpoints(out):
    """The kept checkpoints (kept_path) in the run folder `out`, in step order, read from their names: the
    step has more than 7 digits from step 10,000,000 on, which a sort by name would put before step 2,000,000.
    A name with no step in it (checkpoint-step*.pt by hand) comes last."""
    def step(path):
        match = KEPT_NAME.fullmatch(path.name)
        return (0, int(match[1]), path.name) if match else (1, 0, path.name)
    return sorted(Path(out).glob('checkpoint-step*.pt'), key=step)


def keep_checkpoint(path, step):
    """A second name for the checkpoint just written at `path`, kept_path(path, step), which
    later checkpoints leave alone: a hard link (no copy; the next checkpoint.pt replaces its own name
    by a rename, not this file), or a copy where the file system has no hard links."""
    kept = kept_path(path, step)
    with contextlib.suppress(FileNotFoundError):
        kept.unlink()  # a stale one (refuse_to_overwrite keeps other runs' away): os.link cannot replace it
    try:
        os.link(path, kept)
    except OSError:
        with open(path, 'rb') as source:
            data.atomic_write(kept, lambda f: shutil.copyfileobj(source, f))
    return kept


def gather_counts(counter, world, device):
    """Every rank's status counts as [[count per status] per rank]; all ranks must call it."""
    if world == 1:
        return [list(counter.counts)]
    mine = torch.tensor(counter.counts, dtype=torch.int64, device=device)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [t.tolist() for t in every]


def summed(counts_by_rank):
    """Status counts over all ranks (of gather_counts' lists)."""
    return [sum(c) for c in zip(*counts_by_rank)]


def data_identity(paths, chunk=1 << 16):
    """(count, sha1 of the list, its paths joined by newlines): the data order of a run is a function of
    its image list. Hashed `chunk` paths at a time, where the joined list of 3.7M paths took 0.4 GB more
    at each start on every rank; the same digest."""
    digest = hashlib.sha1()
    for i in range(0, len(paths), chunk):
        digest.update(b'\n' if i else b'')
        digest.update(b'\n'.join(map(os.fsencode, paths[i:i + chunk])))
    return dict(count=len(paths), sha1=digest.hexdigest())


def resume_flags(out):
    """What continues the run in `out` (RUN before it is known): --resume alone would continue the
    default folder's run (colorize.py: runs/<arch>-<loss>), not necessarily this one."""
    return f'--resume --out {shlex.quote(str(out)) if out else "RUN"}'


def refuse_to_overwrite(out, resume_path=None):
    """A run must not replace the checkpoint of another one: that is lost work. `resume_path`: the
    checkpoint being continued (None for a fresh run), the only one that `out` may hold."""
    path = Path(out) / 'checkpoint.pt'
    if not path.exists():
        kept = kept_checkpoints(out)  # --keep-every's, of a run whose checkpoint.pt is gone
        if kept:
            raise UserError(f'--out {out} holds kept checkpoints of an earlier run ({kept[0].name}, ...), which '
                            f'this run could replace: choose another --out (or move them away)')
        return
    if resume_path is None:
        raise UserError(f'{path} exists (an earlier run); continue it with {resume_flags(out)}, or start afresh '
                        f'with another --out (or delete that folder)')
    if path.resolve() != Path(resume_path).resolve():
        own = Path(resume_path).parent / 'checkpoint.pt'
        hint = (f', or leave --out out to continue in {own.parent}' if not own.exists()
                or own.resolve() == Path(resume_path).resolve() else '')
        raise UserError(f'--out {out} holds another run ({path}); resuming {resume_path} there would replace '
                        f'it: choose another --out{hint}')


RUN_LOCK = '.lock'  # in a run folder: held (flock) by the process that trains into it
# What runs write into their folder (results.json, feature_shift.json: finetune_voc.py), and kept_path's names.
RUN_FILES = ('checkpoint.pt', 'log.jsonl', 'run.json', 'results.json', 'feature_shift.json')
KEPT_NAME = re.compile(r'checkpoint-step(\d+)\.pt')


def lock_run(out):
    """Take an exclusive lock on out/.lock and return its open file, which holds the lock until it is
    closed (by train() here, run() in finetune_voc.py, when the run ends however it ends): a second
    process training into the same folder (a --resume started while the run still goes on, a job
    started twice) would overwrite its checkpoints and log, and one of the two runs would be lost.
    Refused with UserError."""
    lock, holder = data.exclusive_lock(os.path.join(out, RUN_LOCK))
    if lock is None:
        raise UserError(f'{out} is in use by {holder}: a run (or a --resume of it) is still training there, and '
                        f'a second one would overwrite its checkpoints; wait for it to end (or stop it), then '
                        f'continue with {resume_flags(out)}')
    if lock.locked:  # (not where flock is missing)
        # No other process writes here, so every temp file of a write is a killed one's, also one of
        # another host (a job killed while saving, then requeued on another node: a checkpoint's size).
        for entry in os.scandir(out):
            written = data.atomic_write_target(entry.name)  # the file whose write left it
            if (written and entry.is_file(follow_symlinks=False)
                    and (written in RUN_FILES or KEPT_NAME.fullmatch(written))):
                with contextlib.suppress(OSError):
                    os.remove(entry.path)
    return lock


def remove_if_unused(out):
    """Remove the run folder `out`, made by this run, if the run ended having written nothing there but
    its lock: a run refused at start-up (a mistyped --data, too few images) leaves no folder behind.
    Called only by the lock's holder, before it lets go: a process that opens the .lock after it was
    removed makes a new one (rmdir then fails). (One that opened the old .lock before and takes its
    flock just after the holder lets go goes on into a folder that is gone, and fails at its first write.)"""
    with contextlib.suppress(OSError):
        if os.listdir(out) == [RUN_LOCK]:
            os.remove(os.path.join(out, RUN_LOCK))
            os.rmdir(out)


def atomic_save(obj, path):
    """torch.save to a temp file, then rename: a crash mid-write never leaves a truncated file. GPU
    tensors are saved as CPU tensors, so that a plain torch.load reads the file on any machine."""
    data.atomic_write(path, lambda f: torch.save(on_cpu(obj), f))


def on_cpu(tree):
    """`tree` (tensors in nested dicts, lists and tuples) with every tensor on the CPU."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(on_cpu(v) for v in tree)
    return tree


def plain_args(args):
    """vars(args) with paths as strings (JSON, and torch.load(weights_only=True), read it back)."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != 'typed_flags'}


def read_torch_file(path, missing, name, hint):
    """torch.load(path) to the CPU with weights_only=True (no code from the file runs). A missing
    file raises UserError(missing); an unreadable one '{name} could not be read (why); {hint}'."""
    path = Path(path)
    if path.is_dir():  # a run folder given for its checkpoint: the folder exists, so 'missing' would mislead
        inside = path / 'checkpoint.pt'
        raise UserError(f'{name} is a folder, not a checkpoint file' + (f': pass {inside}' if inside.is_file() else ''))
    if path.exists() and not path.is_file():  # a FIFO or a device: 'missing' would mislead, and a FIFO would hang
        raise UserError(f'{name} is not a regular file (a named pipe, a device, ...): pass a checkpoint file')
    if not path.is_file():
        raise UserError(missing)
    if path.stat().st_size == 0:  # torch.load's error says nothing there
        raise UserError(f'{name} is an empty file (0 bytes); {hint}')
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why, no traceback
        why = (str(e).splitlines() or [''])[0]
        raise UserError(f'{name} could not be read ({type(e).__name__}{": " + why if why else ""}); {hint}') from None


def checkpoint_fields_error(ckpt):
    """What is wrong with the fields of a dict with "model" and "config" that the scripts read (a checkpoint
    edited by hand, or another program's): their types, in a few words; None when they are as written."""
    kinds = {'config': (dict, 'a dict'), 'model': (dict, 'a dict'), 'args': (dict, 'a dict'), 'step': (int, 'an int')}
    wrong = [f'"{k}" is {type(v).__name__}' + (f' {v!r:.40}' if isinstance(v, (str, int, float, type(None))) else '')
             + f', not {name}' for k, (kind, name) in kinds.items()
             if k in ckpt and not (isinstance(v := ckpt[k], kind) and not isinstance(v, bool))]
    if not wrong and not all(torch.is_tensor(v) for v in ckpt['model'].values()):
        wrong = ['"model" holds other things than tensors']
    return '; '.join(wrong) or None


def load_checkpoint(path):
    """Reads a checkpoint written by save_checkpoint (never runs code from it)."""
    ckpt = read_torch_file(path, f'checkpoint {path} does not exist; train one with `python colorize.py --out DIR` '
                                 f'(it writes DIR/checkpoint.pt)',
                           f'checkpoint {path}', 'is it a complete file written by colorize.py?')
    if not isinstance(ckpt, dict) or 'model' not in ckpt or 'config' not in ckpt:
        raise UserError(f'{path} is not a colorize.py checkpoint (expected a dict with "model" and "config")')
    wrong = checkpoint_fields_error(ckpt)
    if wrong:
        raise UserError(f'{path} is not a checkpoint as the scripts write them: {wrong}')
    refuse_diverged_weights(ckpt['model'], f'checkpoint {path}')
    return ckpt


def refuse_diverged_weights(state, what):
    """A UserError where a floating-point tensor of the state_dict `state` holds NaN or inf (both scripts, on
    loading): the weights of a run that diverged, saved before the scripts checked them (nonfinite_weights),
    which would colorize every photo gray, or fine-tune to a NaN loss at step 1 without saying why."""
    bad = next((name for name, t in state.items()
                if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise UserError(f'{what} holds weights that are not finite ({bad} has NaN or inf): the weights of a run '
                        f'that diverged; use an earlier checkpoint of it (--keep-every) or train again')


def load_mismatch(error, model, state):
    """What a RuntimeError of model.load_state_dict(state) says does not fit, in a line: its first size
    mismatch (else its first line). When that is head.fc1 of a hypercolumn model, whose trunk fitted,
    the cause is named: the checkpoint's hypercolumn has another width than this code's taps give."""
    shapes = [line.strip() for line in str(error).splitlines() if 'size mismatch' in line]
    if not shapes:
        return str(error).splitlines()[0]
    fc1, trunk = state.get('head.fc1.weight'), getattr(model, 'trunk', None)
    if ('head.fc1.weight' in shapes[0] and torch.is_tensor(fc1) and fc1.dim() == 2
            and hasattr(trunk, 'tap_names') and fc1.shape[1] != trunk.hypercolumn_channels):
        return (f'{shapes[0]} Its trunk fits, but its head reads a hypercolumn of {fc1.shape[1]} channels, and '
                f'the taps of this code\'s trunk ({", ".join(trunk.tap_names)}) give {trunk.hypercolumn_channels}: '
                f'the checkpoint was written with other hypercolumn taps (models.py changed since?)')
    return shapes[0]


def load_model_state(model, state, path):
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f'checkpoint {path} does not match the model its config describes: '
                        f'{load_mismatch(e, model, state)}') from None
    if missing or unexpected:
        raise UserError(f'checkpoint {path} does not match the model: missing {missing[:3]}..., '
                        f'unexpected {unexpected[:3]}... ({len(missing)} missing, {len(unexpected)} unexpected)')


def git_commit():
    """The code's commit (HEAD of this file's repository), with '-dirty' appended (as `git describe
    --dirty` does) when tracked files differ from it; None outside a git checkout."""
    try:
        def git(*command):
            return subprocess.run(['git', *command], cwd=HERE, capture_output=True, text=True, timeout=10).stdout
        commit = git('rev-parse', 'HEAD').strip()
        if commit and git('--no-optional-locks', 'status', '--porcelain', '--untracked-files=no').strip():
            commit += '-dirty'
        return commit or None
    except (OSError, subprocess.SubprocessError):
        return None


# --- Evaluation ---------------------------------------------------------------------------------

def predict_ab(model, lightness, loss_kind):
    """Dense colour prediction: L (B, 1, H, W) in [0, 100] -> (a, b) (B, 2, H, W) in Lab units.

    The network sees (L - 50) / 50; its stride-4 prediction (cell i sits at pixel 4i + 1.5) is
    decoded and upsampled bilinearly to the input's resolution.
    """
    logits = model.dense(model_input(lightness))  # (B, D, ceil(H/4), ceil(W/4))
    ab = lab.decode(loss_kind, logits, dim=1)
    H, W = lightness.shape[-2:]
    return F.interpolate(ab, scale_factor=4, mode='bilinear', align_corners=False)[..., :H, :W]


def colorize_dense(model, lightness, loss_kind):
    """L (B, 1, H, W) in [0, 100] -> RGB (B, 3, H, W) in [0, 1], keeping the input's own L."""
    return lab.lab_to_rgb(torch.cat([lightness.float(), predict_ab(model, lightness, loss_kind)], 1))


def psnr(a, b):
    """Peak signal-to-noise ratio in dB of images in [0, 1], averaged over images."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp(min=1e-10)
    return (-10 * torch.log10(mse)).mean()


@torch.no_grad()
def evaluate(model, val_images, args, device, chunk=32):
    """Validation loss at fixed pixels, and PSNR / ab RMSE of dense colorizations vs predicting gray."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(EVAL_SEED)
    sums = dict(loss=0.0, psnr=0.0, psnr_gray=0.0, ab_rmse=0.0, ab_rmse_gray=0.0)
    for i in range(0, len(val_images), chunk):
        batch = val_images[i:i + chunk]
        x, points, targets, lab_img = prepare(batch, args, device, generator=gen)
        with autocast(device):
            total, _ = lab.color_loss(args.loss, model(x, points), targets,
                                      use_lightness_weight=args.lightness_weight)  # as in training
            rgb_pred = colorize_dense(model, lab_img[:, :1], args.loss)
        truth = batch.to(device).float() / 255.0
        gray = gray_rgb(lab_img)
        ab_pred = lab.rgb_to_lab(rgb_pred)[:, 1:]
        n = len(batch)
        sums['loss'] += total.item() * n
        sums['psnr'] += psnr(rgb_pred, truth).item() * n
        sums['psnr_gray'] += psnr(gray, truth).item() * n
        sums['ab_rmse'] += ((ab_pred - lab_img[:, 1:]) ** 2).mean().sqrt().item() * n
        sums['ab_rmse_gray'] += (lab_img[:, 1:] ** 2).mean().sqrt().item() * n
    model.train()
    return {k: v / len(val_images) for k, v in sums.items()}


@torch.no_grad()
def write_grid(model, images, args, device, path):
    """PNG grid, one row per held-out image: gray input | prediction | truth."""
    model.eval()
    lab_img = lab.rgb_to_lab(images.to(device))
    with autocast(device):
        pred = colorize_dense(model, lab_img[:, :1], args.loss)
    model.train()
    gray = gray_rgb(lab_img)
    truth = images.to(device).float() / 255
    rows = torch.cat([gray, pred.float(), truth], dim=3)  # (N, 3, H, 3W)
    grid = torch.cat(list(rows), dim=1)  # (3, N*H, 3W)
    array = (grid.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    data.write_png(path, array)  # atomic: a kill or a full disk leaves no truncated grid


# --- Training -----------------------------------------------------------------------------------

def train_step(model, optimizer, images, status, args, device):
    """One SGD step on a uint8 batch (B, 3, H, W) with statuses (B,); returns (loss, parts), no sync."""
    x, points, targets, _ = prepare(images, args, device)
    valid = status.to(device, non_blocking=True) == data.STATUS_OK  # copied from pinned memory, compared there
    with autocast(device):
        total, parts = lab.color_loss(args.loss, model(x, points), targets, valid=valid,
                                      use_lightness_weight=args.lightness_weight,
                                      norm=loss_norm(valid.sum() * points.shape[1]))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total, parts


def loss_norm(count):
    """What a loss summed over this batch's `count` valid items (pixels, images) is divided by: the
    count, at least 1. Under DDP the count over all replicas divided by their number (all-reduced on
    the device: no host sync), so that DDP's average of the replicas' gradients is that of the mean
    over all their items, however the valid ones fall."""
    count = count.to(torch.float32, copy=True)  # the all-reduce writes into it
    if not dist.is_initialized():
        return count.clamp(min=1)
    dist.all_reduce(count)
    return count.clamp(min=1) / dist.get_world_size()


def classify_step(model, optimizer, images, status, labels, args, device):
    """One SGD step of the supervised baseline on the lightness of the images; bad files weigh 0."""
    x = model_input(lab.rgb_to_lab(images.to(device, non_blocking=True)))
    valid = (status.to(device, non_blocking=True) != data.STATUS_BAD).float()
    with autocast(device):
        logits = model(x)
    ce = F.cross_entropy(logits.float(), labels.to(device, non_blocking=True), reduction='none')
    total = (ce * valid).sum() / loss_norm(valid.sum())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    return total, {'ce': total}


@torch.no_grad()
def evaluate_classifier(model, images, labels, args, device, chunk=64):
    model.eval()
    loss = correct = 0.0
    for i in range(0, len(images), chunk):
        x = model_input(lab.rgb_to_lab(images[i:i + chunk].to(device)))
        y = labels[i:i + chunk].to(device)
        with autocast(device):
            logits = model(x).float()
        loss += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return dict(loss=loss / len(images), top1=correct / len(images))


def parameter_groups(model, weight_decay):
    """Trainable parameters (frozen ones left out); no weight decay on biases and other 1-D tensors."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]


def load_optimizer_state(optimizer, state, args):
    """The saved SGD state of parameter_groups' two groups, with this run's momentum and weight
    decay (a new value given on --resume wins)."""
    optimizer.load_state_dict(state)
    for group, decay in zip(optimizer.param_groups, (args.weight_decay, 0.0)):  # as parameter_groups
        group['momentum'], group['weight_decay'] = args.momentum, decay


def open_run(args, device, world, master, run_lock):
    """Settle args and the run folder: a fresh run, or the --resume checkpoint's run (its flags).
    Rank 0 locks the folder (lock_run) into `run_lock`, a contextlib.ExitStack that train() closes
    when the run ends. Returns (checkpoint or None, its path or None)."""
    absolute_paths(vars(args), PATH_FLAGS)
    ckpt = resume_path = problem = None
    if args.resume:
        # --resume CKPT continues in CKPT's folder unless --out says otherwise.
        resume_path = (args.out or default_out(args)) / 'checkpoint.pt' if args.resume == 'auto' else Path(args.resume)
        args.out = args.out or resume_path.parent
        try:
            ckpt = load_checkpoint(resume_path)
        except UserError as e:
            if not dist.is_initialized():
                raise
            problem = str(e)  # perhaps this rank's alone (a node that does not see the run folder): say it on all
    same_start(problem, ckpt, args.out or default_out(args))
    if args.resume:
        if str(ckpt['config'].get('objective', 'colorize')).startswith('voc-'):
            raise UserError(f'{resume_path} is a finetune_voc.py checkpoint: continue it with finetune_voc.py '
                            f'--resume {resume_path}')
        if not all(isinstance(ckpt.get(k), dict) for k in ('args', 'optimizer', 'data', 'rng')):
            raise UserError(f'{resume_path} is a colorize.py checkpoint without its training state; '
                            f'use it with finetune_voc.py --init or colorize.py --colorize, not --resume')
        resume_settings(args, ckpt, resume_path, world, log=print if master else None)
    args.out = args.out or default_out(args)
    fill_defaults(args, device, world)
    made = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    problem = None
    if master:
        try:
            # Before the checks below: a run still training there is not to be joined.
            run_lock.enter_context(lock_run(args.out))
            if made:  # only once locked (a run refused by another's lock would remove its .lock), and run
                run_lock.callback(remove_if_unused, args.out)  # before the lock is let go (last in, first out)
        except UserError as e:
            problem = str(e)
    problem = rank0_problem(problem)  # every rank stops with rank 0, rather than wait for it at the listing
    if problem:
        raise UserError(problem if master else f'rank 0: {problem}')
    refuse_to_overwrite(args.out, resume_path)
    if resume_path is not None and master:
        fork_run(resume_path, args.out, ('log.jsonl', 'run.json'))
    return ckpt, resume_path


def same_start(problem, ckpt, out):
    """Under DDP, stop every rank with one line unless all loaded their --resume checkpoint (`problem`: why
    this one could not) and start at the same step (None: afresh). A node that does not see the run
    folder (--out on its own disk), or a job script that chose --resume on each node by what that node
    saw there, would have ranks train from different steps, lr and momentum, in step with each other."""
    if not dist.is_initialized():
        return
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, (problem, None if ckpt is None else ckpt.get('step', '?')))
    problem = next((f'rank {r}: {p}' for r, (p, _) in enumerate(every) if p), None)
    steps = [step for _, step in every]
    read = next((r for r, step in enumerate(steps) if step is not None), None)
    if problem and read is not None:
        problem += f' (rank {read} read it: every node must see the run folder, on a file system they share)'
    differs = next((r for r, step in enumerate(steps) if step != steps[0]), None)
    if problem is None and differs is not None:
        def start(step):
            return 'starts afresh' if step is None else f'resumes at step {step}'
        problem = (f'rank 0 {start(steps[0])} but rank {differs} {start(steps[differs])}: the ranks must see the '
                   f'same run folder {out} (on a file system that all nodes share) and get the same flags')
    if problem:
        raise UserError(problem)


def fork_run(resume_path, out, names):
    """--resume CKPT --out NEW, NEW not CKPT's folder: the run goes on in NEW and CKPT's folder
    stays as it was. The files `names` come along (then trimmed and extended as in place), so
    that NEW tells the whole run."""
    if Path(out).resolve() == Path(resume_path).parent.resolve():
        return
    for name in names:
        source, target = Path(resume_path).parent / name, Path(out) / name
        if source.is_file() and not target.exists():
            # Atomic: a copy cut short (a kill, a full disk) would stay, and 'not target.exists()' keep it.
            with open(source, 'rb') as f:
                data.atomic_write(target, lambda out: shutil.copyfileobj(f, out))
    print(f'continuing {resume_path} in {out} ({Path(resume_path).parent} stays as it is)')


def restore_training(ckpt, path, model, optimizer, counter, args, device, rank):
    """Load the checkpoint's weights, optimizer state, image counts and RNG states; returns its step."""
    load_model_state(model, ckpt['model'], path)
    load_optimizer_state(optimizer, ckpt['optimizer'], args)
    if 'counts_by_rank' in ckpt:  # each rank counts its own share of the images
        counter.load_state_dict(dict(counts=ckpt['counts_by_rank'][rank]))
    elif rank == 0:
        counter.load_state_dict(legacy_counts(ckpt['counts']))
    torch.set_rng_state(ckpt['rng']['cpu'])
    # (Each step reseeds from (seed, step, rank); the saved states matter only before step 1.)
    if device.type == 'cuda' and len(ckpt['rng']['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(ckpt['rng']['cuda'])
    return ckpt['step']


def legacy_counts(counts):
    """A checkpoint's image counts as data.StatusCounter reads them. The first commit (db53b26) saved
    {'seen', 'bad', 'gray'}, images read in all; later ones {'counts': [ok, bad, gray]}."""
    if 'counts' in counts or 'seen' not in counts:
        return counts
    return {'counts': [counts['seen'] - counts['bad'] - counts['gray'], counts['bad'], counts['gray']]}


def training_data(args, ckpt, resume_path, master):
    """The run's images: (train paths, val paths, labels or None, held_out, train_list), after
    --subset or --classes; held_out: the val paths set aside from --data (the checkpoint records
    them), or None; train_list: data_identity of the train paths. Checks a resumed run's class
    folders, and warns when its image list changed."""
    train_paths, val_paths = image_sources(args, master, held=ckpt['data'].get('held_out') if ckpt else None)
    held_out = val_paths if args.data is not None and args.val_data is None else None
    labels = None
    if args.objective == 'classify':
        labels = class_labels(args, train_paths, val_paths)
        train_paths, val_paths, args.class_names = labels['train_paths'], labels['val_paths'], labels['names']
        if labels['merged'] and master:
            name, where = next(iter(labels['merged'].items()))
            print(f'warning: {len(labels["merged"])} class folder name(s) occur in more than one place, and each '
                  f'is one class (the label is the folder name): e.g. {name} in {where[0]} and {where[1]}. Right '
                  f'for a class split over several --data roots; wrong for nested categories (Places365\'s '
                  f'apartment_building/outdoor and church/outdoor would be one class): give one level of '
                  f'class folders')
        trained_on = ckpt['config'].get('classes', args.class_names) if ckpt is not None else args.class_names
        if trained_on != args.class_names:  # a renamed, added or removed folder would remap the labels
            differ = sorted(set(trained_on) ^ set(args.class_names)) or ['(their order)']
            raise UserError(f'{resume_path} was trained on {len(trained_on)} classes, and the class folders '
                            f'now give {len(args.class_names)} others (differing: {", ".join(differ[:3])}); '
                            f'resuming would remap the labels')
    else:
        train_paths = take_subset(args, train_paths)
    train_list = data_identity(train_paths)
    if ckpt is not None and ckpt['data'].get('images', train_list) != train_list and master:
        print(f'warning: the training images changed since {resume_path} was written '
              f'({ckpt["data"]["images"]["count"]} then, {train_list["count"]} now): the run continues, '
              f'but not in the order it would have had' + ('' if held_out is None or 'held_out' in ckpt['data'] else
              '; and its held-out images, chosen from the listing by a checkpoint that did not record them, '
              'are others now: validation figures are not comparable across this resume'))
    if ckpt is not None and 'images' not in ckpt['data'] and args.data is not None and master:
        print(f'warning: {resume_path} does not record its training images (written before 996eedb, '
              f'2026-11-25), so a --data changed since cannot be noticed: it would change the data order'
              + ('' if held_out is None else ' and swap held-out images into training (validation figures '
                 'then not comparable across this resume)'))
    return train_paths, val_paths, labels, held_out, train_list


def validation_set(val_paths, labels, args, ckpt, master):
    """Rank 0's fixed held-out batch: uint8 images (with their labels for --objective classify);
    None on the other ranks."""
    if not master:
        return None
    classify = args.objective == 'classify'
    images, used = load_val_images(val_paths, args.crop, limit=args.holdout, keep_gray=classify,
                                   first=ckpt is not None and 'val_order' not in ckpt['data'])
    if len(used) < len(val_paths):
        print(f'validating on {len(used)} of the {len(val_paths)} held-out images (at most --holdout '
              f'{args.holdout}; unreadable{"" if classify else " and grayscale"} ones left out)')
    return (images, torch.tensor([labels['val'][i] for i in used])) if classify else images


def train(args):
    """Pre-train as `args` say (a fresh run, or --resume); returns the trained model (unwrapped).
    Rank 0 holds the run folder's lock (lock_run, in open_run) until the run ends, however it ends."""
    with contextlib.ExitStack() as run_lock:
        return _train(args, run_lock)


def _train(args, run_lock):
    device, rank, world, _ = setup_device(args)
    master = rank == 0
    ckpt, resume_path = open_run(args, device, world, master, run_lock)
    train_paths, val_paths, labels, held_out, train_list = training_data(args, ckpt, resume_path, master)
    if master:
        print(run_summary(args, device, world, len(train_paths), len(val_paths)))
    raw_model, optimizer, counter, start = build_training(args, ckpt, resume_path, device, rank)
    # raw_model stays unwrapped: what is evaluated and saved (no 'module.' or '_orig_mod.' prefixes)
    model = raw_model
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    fast_model = torch.compile(model) if args.compile else model  # what the training steps run

    classify = args.objective == 'classify'
    val = validation_set(val_paths, labels, args, ckpt, master)
    if master:
        write_run_info(args, device, world, len(train_paths), len(val_paths), resumed_at=start)
    loader = make_loader(train_paths, args, rank, world, start, device, labels=labels and labels['train'],
                         stop_step=args.steps)
    # The loader holds the paths itself (encoded) and the labels: the list (0.4 GB at 3.7M paths, also in
    # class_labels' dict) is not needed for the rest of the run, nor in the loader processes forked from this one.
    del train_paths, labels
    if master and start:
        trim_log(args.out / 'log.jsonl', start)
    # A fresh run, a fresh log; only the master writes one.
    with (open(args.out / 'log.jsonl', 'a' if start else 'w') if master else contextlib.nullcontext()) as log, \
            StopSignals(device) as stop:
        if master and start == 0:
            evaluate_and_show(raw_model, val, args, device, log, 0)

        progress, step, stopping = Progress(args.batch_size * world), start, False
        saved, saved_step = resume_path, start  # the checkpoint that holds the run's latest state, and its step
        if ckpt is not None:
            progress.restore(ckpt.get('progress'), device, rank)
        if master and args.compile and start < args.steps:
            print(COMPILE_NOTE, flush=True)
        # batch: uint8 images (B, 3, H, W) on the host, their statuses (B,), for classify also labels (B,).
        for batch in data.watch_stalls(loader, who=f'rank {rank}: ' if world > 1 else ''):
            if step >= args.steps:
                break
            torch.manual_seed(step_seed(args.seed, step, rank))
            counter.update(batch[1])  # host-side: the statuses never left the CPU
            for group in optimizer.param_groups:
                group['lr'] = lr_at(step, args)
            if classify:
                total, parts = classify_step(fast_model, optimizer, *batch, args, device)
            else:
                total, parts = train_step(fast_model, optimizer, *batch, args, device)
            step += 1
            progress.add(torch.stack([total, *parts.values()]))

            last = step == args.steps
            stopping = stop.agreed(step) and not last  # SIGTERM or SIGUSR1: save and stop (all ranks)
            log_now = step % args.log_every == 0 or last
            if log_now or step in (10, 100):  # early too: a broken dataset stops in seconds (all ranks, same steps)
                check_bad_share(counter, args, world, device)
            if log_now:
                log_progress(log, progress, counter, parts, step, args, device)
            with progress.paused():  # evaluation and saving do not count against img/s
                keep = args.keep_every and step % args.keep_every == 0
                save = step % args.save_every == 0 or last or keep or stopping
                show = step % args.eval_every == 0 or last
                if save or show:  # the sample grid too would make the folder anew (all ranks, same steps)
                    # In the steps since the last progress line: neither evaluate nor save them.
                    window = checked_window(log, args.out / 'log.jsonl', progress, step, lr_at(step - 1, args),
                                            world, master)
                if save:  # rank 0's weights are the ones saved (the replicas' are the same): every rank stops with it
                    refuse_nonfinite_weights(raw_model, optimizer, step, lr_at(step - 1, args), saved, saved_step,
                                             master)
                if master and show:
                    evaluate_and_show(raw_model, val, args, device, log, step)
                if save:
                    counts_by_rank = gather_counts(counter, world, device)
                    saved, saved_step = args.out / 'checkpoint.pt', step
                    if master:
                        save_checkpoint(saved, raw_model, optimizer, step, args, counts_by_rank, train_list, window,
                                        held_out)
                        if keep:
                            keep_checkpoint(saved, step)
            if stopping or (args.exit_after is not None and step >= args.exit_after):
                break
        # Still under StopSignals: the other ranks wait below while rank 0 saves, and a signal that
        # reached one of them there (a repeated one, or one at the last step) would kill it, and rank 0's
        # collective would then fail (gloo) or hang (NCCL).
        if stopping:
            if dist.is_initialized():
                dist.barrier()  # rank 0 has saved; a rank that exited sooner would have torchrun stop it
            raise Stopped(stop.signum, step, saved)
        all_counts = data.StatusCounter()  # over all ranks
        all_counts.load_state_dict(dict(counts=summed(gather_counts(counter, world, device))))
        if master:
            print(f'done: step {step}; {all_counts} (unreadable{"" if classify else " and grayscale"} images had '
                  f'zero weight); ' + (f'checkpoint {saved}' if saved else 'no checkpoint written yet'))
        if dist.is_initialized():
            dist.barrier()
    return raw_model


def run_summary(args, device, world, n_train, n_val):
    """The run's first line (rank 0 prints it): images, device and world, arch, task, crop, batch, steps, lr,
    and on a CPU what its small defaults mean (cpu_note)."""
    task = f'loss {args.loss}' if args.objective == 'colorize' else f'classify {len(args.class_names)} classes'
    ddp = f' ({dist.get_backend()} DDP)' if dist.is_initialized() else ''
    return (f'{n_train} training images, {n_val} held-out; device {device}, world {world}{ddp}; '
            f'arch {args.arch}, {task}, crop {args.crop}, batch {args.batch_size}x{world}, '
            f'{args.steps} steps, lr {args.lr:g}' + ('' if device.type == 'cuda' else cpu_note(args, world)))


def build_training(args, ckpt, resume_path, device, rank):
    """The model (unwrapped, on `device`, channels_last), its SGD optimizer and the image status counter, fresh
    from --seed or restored from the --resume checkpoint `ckpt`; returns (model, optimizer, counter, start step).
    Resuming in the run's own folder at a --keep-every step, it keeps the checkpoint that a stop between its
    save and its keep left unkept. No collectives: DDP wraps the model after (its broadcast is _train's)."""
    master = rank == 0
    torch.manual_seed(args.seed)
    model = make_model(model_config(args)).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    start, counter = 0, data.StatusCounter()
    if ckpt is not None:
        start = restore_training(ckpt, resume_path, model, optimizer, counter, args, device, rank)
        if master:
            print(f'resumed from {resume_path} at step {start}')
        own = args.out / 'checkpoint.pt'
        if (master and args.keep_every and start % args.keep_every == 0 and not kept_path(own, start).exists()
                and Path(resume_path).resolve() == own.resolve()):  # stopped between its save and its keep
            keep_checkpoint(own, start)
    return model, optimizer, counter, start


def log_progress(log, progress, counter, parts, step, args, device):
    """The progress line of `step` (stdout and log.jsonl) over the steps since the last one; stops the run
    (every rank at the same step) when their mean loss is not finite. Every rank calls it: the replicas' mean,
    all-reduced (progress.take), is the loss over all their pixels (loss_norm). `log`: rank 0's open
    log.jsonl, None on the other ranks, which print nothing. parts: the names of the loss parts (train_step)."""
    means, rate = progress.take(all_reduce=dist.is_initialized())
    problem = diverged(means, step, lr_at(step - 1, args))
    if problem:
        raise UserError(problem)
    if log is not None:
        # lr_at(step - 1): the lr of the step just taken (`step` counts it already).
        entry = dict(step=step, loss=means[0], lr=lr_at(step - 1, args), img_per_s=rate,
                     **dict(zip(parts, means[1:])), peak_mem_gb=peak_memory_gb(device),
                     bad=counter.bad, gray=counter.gray)
        # progress.images_per_step: args.batch_size x world, the global batch
        print(progress_line(entry, args.steps, progress.images_per_step, parts), flush=True)
        log_line(log, entry)


def checked_window(log, path, progress, step, lr, world=1, master=True):
    """The checks before a checkpoint (or a sample grid) is written at `step`, on every rank at the same
    steps; returns the open window, progress.state(world), to save with it. Raises UserError (every rank
    the same) when the log file `log` is no longer the file at `path` (the run folder removed: a checkpoint
    would make it anew, without the run's log), or when the window's loss is not finite (diverged since the
    last progress line: neither evaluate nor save those steps). `lr`: the lr of the step just taken.
    Collectives in this order: rank0_problem's broadcast, then progress.state's all-gather (world > 1).
    Shared by colorize.py and finetune_voc.py (one process: world 1, master), so the checks do not drift."""
    problem = rank0_problem(log_gone(log, path) if master else None)
    if problem:
        raise UserError(problem if master else f'rank 0: {problem}')
    window = progress.state(world)  # (every rank: the replicas' sums are gathered)
    problem = diverged(sum(window['sums_by_rank'] or [], []), step, lr)
    if problem:
        raise UserError(problem)
    return window


def refuse_nonfinite_weights(model, optimizer, step, lr, saved, saved_step, master=True):
    """Raise UserError on every rank, the last good checkpoint `saved` (of `saved_step`) left as it is, when
    rank 0's weights or optimizer state are no longer finite (nonfinite_weights); `lr`: the lr of the step
    just taken. Rank 0's weights are the ones saved (the replicas' are the same), so it alone checks, and
    every rank stops with it (rank0_problem: a collective, which every rank must reach). finetune_voc.py uses
    it too (one process: master)."""
    problem = rank0_problem(nonfinite_weights(model, optimizer, step, lr, saved, saved_step) if master else None)
    if problem:
        raise UserError(problem)


def check_bad_share(counter, args, world, device):
    """Stop the run (every rank at the same step) when too many images are unreadable, or when none
    of the first 100 or more could be trained on (all unreadable, or for colorization grayscale: zero
    weight; --objective classify trains on grayscale photos' lightness like any other's)."""
    seen, bad, gray = counter.seen, counter.bad, counter.gray
    if args.objective == 'classify':  # its loss weighs only unreadable images by zero (classify_step)
        gray = 0
    if world > 1:
        counts = torch.tensor([seen, bad, gray], dtype=torch.float64, device=device)
        dist.all_reduce(counts)
        seen, bad, gray = (int(v) for v in counts.tolist())
    if data.bad_share_exceeded(bad, seen, args.max_bad_share, min_seen=100):
        raise UserError(f'{bad} of {seen} images trained on so far were unreadable (more than '
                        f'--max-bad-share {args.max_bad_share}); see the warnings above for the files (the loader '
                        f'reads ahead, so they can name a few more)')
    if seen >= 100 and bad + gray == seen:  # the loss has had zero weight at every step: nothing is learned
        raise UserError(f'none of the {seen} images trained on so far could be read: check --data' if not gray else
                        f'none of the {seen} images trained on so far had colour ({gray} grayscale, {bad} '
                        f'unreadable), and colorization learns only from colour photos: check --data')


def evaluate_and_show(model, val, args, device, log, step):
    """Held-out metrics to stdout and log.jsonl; for colorization also the sample grid PNG."""
    if args.objective == 'classify':
        metrics = evaluate_classifier(model, *val, args, device)
        print(f'eval step {step}: val loss {metrics["loss"]:.4f} | top-1 {100 * metrics["top1"]:.2f}%', flush=True)
    else:
        metrics = evaluate(model, val, args, device)
        print(f'eval step {step}: val loss {metrics["loss"]:.4f} | PSNR {metrics["psnr"]:.2f} dB '
              f'(gray {metrics["psnr_gray"]:.2f}) | ab RMSE {metrics["ab_rmse"]:.2f} '
              f'(gray {metrics["ab_rmse_gray"]:.2f})', flush=True)
        write_grid(model, val[:8], args, device, args.out / 'samples' / f'step_{step:0{args.sample_digits}d}.png')
    log_line(log, dict(eval=True, step=step, **metrics))


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'


def environment(device):
    """What a result depends on besides its flags (run.json, results.json): versions, device, commit."""
    return dict(torch=torch.__version__, python=sys.version.split()[0], device=str(device),
                device_name=device_name(device), git_commit=git_commit())


def note_other_commit(before, now, step):
    """Say so when a run is resumed at `step` by another commit than `before`, which ran the steps
    before it (a git pull between; None where a commit is not known)."""
    if before and now and before != now:
        # '-dirty' kept: the one may be the other with uncommitted edits
        short = [c[:12] + ('-dirty' if c.endswith('-dirty') else '') for c in (before, now)]
        print(f'note: the steps before {step} ran commit {short[0]}, this is {short[1]}: what the code changed '
              f'between them (data, sampling, targets, loss) applies from here on')


def write_run_info(args, device, world, n_train, n_val, resumed_at=0):
    """run.json: args, versions, device, commit. A resumed run keeps the first start (its time,
    commit, versions and device) and lists each resumption (step, time, commit, torch, device), since
    those may differ between the parts (a git pull between them, say); args are the latest part's."""
    now = time.strftime('%Y-%m-%d %H:%M:%S')
    info = dict(args=plain_args(args), **environment(device), world_size=world, train_images=n_train,
                val_images=n_val, started=now)
    path = args.out / 'run.json'
    if resumed_at and path.exists():
        try:
            first = json.loads(path.read_text())
        except ValueError as e:  # UnicodeDecodeError too
            first = f'not JSON ({e})'
        if not isinstance(first, dict) or not isinstance(first.get('resumed', []), list):
            # Edited by hand or cut short: say so, rather than a traceback or dropping its record without a word.
            why = first if isinstance(first, str) else 'not the object this script writes'
            print(f'warning: {path} is {why}: it is written anew, without the first start\'s time, commit and '
                  'versions', file=sys.stderr)
            first = {}
        # A part edited by hand (no object, or a step that is no count) is dropped: the others still say when.
        first['resumed'] = [p for p in first.get('resumed', []) if isinstance(p, dict)
                            and type(p.get('step', 0)) is int]
        first.pop('step', None)  # (the first part starts at 0; this script writes no top-level step)
        part = dict(step=resumed_at, time=now, git_commit=info['git_commit'], torch=info['torch'],
                    device_name=info['device_name'], world_size=world)
        # The steps before resumed_at: the last part that started before it (not the latest part,
        # when a kept checkpoint of an earlier step is resumed in place).
        last = next((p.get('git_commit') for p in reversed([first] + first.get('resumed', []))
                     if p.get('step', 0) < resumed_at), None)
        note_other_commit(last, part['git_commit'], resumed_at)
        for name in ('started', 'torch', 'python', 'device', 'device_name', 'git_commit'):
            info[name] = first.get(name, info[name])
        info['resumed'] = first.get('resumed', []) + [part]
    data.write_json(args.out / 'run.json', info, indent=2)


STOP_SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1') if hasattr(signal, name))
STOP_CHECK_EVERY = 10  # under DDP: steps between the ranks' exchanges of their stop requests


class StopSignals:
    """SIGTERM and SIGUSR1 as a request to save a checkpoint and stop, met between two training
    steps, instead of the process dying with the steps since its last checkpoint. Schedulers send
    SIGTERM some seconds before SIGKILL (SLURM at a time limit, a preemption or scancel; torchrun
    passes it on to its ranks), and SLURM's --signal can send SIGUSR1 earlier. Ctrl-C (SIGINT) still
    stops at once, and SIGKILL cannot be caught. A repeated signal changes nothing: the one that
    torchrun passes on may come right after the scheduler's own.

        with StopSignals(device) as stop:
            for batch in loader:
                ...; step += 1
                if stop.agreed(step): ... save a checkpoint, then raise Stopped(stop.signum, step, path)

    One process reads its flag after every step. Under DDP the ranks must stop at the same step,
    and the signal may reach one rank, or reach it earlier: every STOP_CHECK_EVERY steps each rank
    starts an all-reduce (max) of its signal number and reads the one it started an interval
    before, so all stop within 2 x STOP_CHECK_EVERY steps of the first signal. On CUDA that result
    was copied to pinned memory behind an event an interval ago, so reading it does not wait for
    the GPU's queue to drain. The handlers belong to the main thread and are put back on exit.
    DataLoader workers ignore these signals (worker_options): a scheduler signals every process of
    the job, and the training process stops its workers itself."""

    def __init__(self, device):
        self.device, self.signum, self._old, self._started = device, None, {}, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            for sig in STOP_SIGNALS:
                self._old[sig] = signal.signal(sig, self._received)
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}

    def _received(self, signum, frame):  # a flag only: the loop prints and saves
        self.signum = self.signum or signum

    def agreed(self, step):
        """Whether to stop after `step`: the same answer on every rank (all ranks call it at every step)."""
        if not dist.is_initialized():
            return self.signum is not None
        if step % STOP_CHECK_EVERY:
            return False
        earlier = self._result()
        self._start()
        if earlier:
            self.signum = earlier  # every rank stops by the same signal, also one that had none
        return bool(earlier)

    def _start(self):
        flag = torch.tensor([self.signum or 0], dtype=torch.int32)
        cuda = self.device.type == 'cuda'
        if cuda:
            flag = flag.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if cuda:
            host, done = torch.empty(1, dtype=torch.int32, pin_memory=True), torch.cuda.Event()
            host.copy_(flag, non_blocking=True)
            done.record()
            self._started = host, done
        else:
            self._started = flag, None

    def _result(self):
        """The all-reduce started at the last exchange (0 before the first): the highest signal number."""
        if self._started is None:
            return 0
        host, done = self._started
        if done is not None:
            done.synchronize()
        return int(host[0])


def worker_options(workers):
    """DataLoader arguments for the `workers` of a training loader under StopSignals. A scheduler
    signals every process of the job, and the training process decides when to stop, so:
    - worker_init_fn: the workers ignore SIGTERM and SIGUSR1 (they used to die of it, ending the run
      in a traceback);
    - multiprocessing_context (worker_context): where Python forks them, or would start them from a
      forkserver (3.14's default on Linux), a fork that defers a Ctrl-C while it forks (one at that
      moment was lost, and training went on). Fork rather than the forkserver: the signal kills the
      forkserver, and torch's workers stop once their parent is gone, while a DDP rank still reads
      batches up to its next exchange. None without workers or under spawn (macOS, Windows);
    - at the interpreter's exit the daemonic children still alive get SIGKILL (registered once,
      however many loaders): multiprocessing's own exit handler, which runs after, sends them
      SIGTERM and waits without a limit, so a run that ended in a traceback (which keeps its loader
      alive until then) never exited."""
    atexit.unregister(_kill_daemonic_children)
    atexit.register(_kill_daemonic_children)
    return dict(worker_init_fn=ignore_stop_signals, multiprocessing_context=worker_context(workers))


def worker_context(workers):
    """A DataLoader's multiprocessing_context for `workers` processes: where Python forks them or starts
    them from a forkserver (Linux; see worker_options), a fork context that forks each with a Ctrl-C
    deferred (data.SigintDeferredForkContext: one at that moment was lost); None elsewhere (spawn)."""
    fork = workers and torch.multiprocessing.get_start_method() in ('fork', 'forkserver')
    return data.SIGINT_DEFERRED_FORK if fork else None


def ignore_stop_signals(worker_id=None):
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def _kill_daemonic_children():
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if children and hasattr(signal, 'SIGCHLD'):  # not DataLoader's handler: it would report each as a failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()


def diverged(values, step, lr):
    """The one line that stops a run whose training loss is no longer finite, or None.

    values: floats (the means of a progress line, or the sums of the open window at a checkpoint).
    A NaN or inf loss poisons the weights for good: the run would go on printing nan and save
    them, and the test after fine-tuning would score argmax over NaN logits. Every rank sees the
    same values (all-reduced or all-gathered), so every rank stops at the same step.
    """
    if all(math.isfinite(v) for v in values):
        return None
    return (f'the training loss is {next(v for v in values if not math.isfinite(v))} at step {step} (over the '
            f'steps since the last check): training diverged (lr {lr:g}); no checkpoint was written after it. '
            f'Lower --lr (given with --resume, it applies from the checkpoint on) or check the init')


def nonfinite_weights(model, optimizer, step, lr, saved, saved_step):
    """The one line that stops a run before it saves weights that are no longer finite, or None.

    The loss of a step is computed before its update, so the step that makes the weights NaN (or inf)
    still has a finite loss (diverged() sees it only at the next check); a checkpoint at that step
    would replace the last good one. Checks the model's parameters and buffers and the optimizer's
    state on their device with one host-device sync (a checkpoint's, which is rare). saved, saved_step:
    the run's latest checkpoint and its step (None before the first).
    """
    names = {id(p): name for name, p in model.named_parameters()}
    named = list(model.state_dict().items()) + [
        (f'{names.get(id(p), "a parameter")} ({key})', t)  # its momentum buffer, say
        for p, state in optimizer.state.items() for key, t in state.items()]
    named = [(name, t) for name, t in named if isinstance(t, torch.Tensor) and t.is_floating_point()]
    flags = [torch.isfinite(t).all() for _, t in named]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist() if flags else []  # the one sync
    if all(finite):
        return None
    name = next(name for (name, _), ok in zip(named, finite) if not ok)
    where = f'{saved} still holds step {saved_step}, left as it was' if saved else 'no checkpoint was written'
    return (f'the weights are no longer finite after step {step} ({name} holds NaN or inf; that step\'s training '
            f'loss was still finite): training diverged (lr {lr:g}); {where}. Lower --lr (given with --resume, it '
            f'applies from the checkpoint on) or check the init')


def log_gone(log, path):
    """None while the open log file `log` is still the file at `path`; else the one-line problem.
    A run folder removed (or moved) while the run trains is not made anew by the next checkpoint: the
    new folder would hold checkpoints without the run's log.jsonl, run.json and lock, as if whole.
    Never raises: under DDP rank 0 calls it just before a collective (rank0_problem) that the other
    ranks are already waiting in, so a stat that fails otherwise (ENOTDIR: a file now where the folder
    was; ESTALE: an NFS folder removed) is a problem to share too, not an exception on rank 0 alone."""
    try:
        if os.path.samestat(os.fstat(log.fileno()), os.stat(path)):
            return None
    except OSError:
        pass
    return (f'{path} was deleted or replaced while the run was training (its folder removed or moved?): stopped '
            f'rather than write checkpoints into a folder without the run\'s log; if the folder was moved '
            f'back, continue it with {resume_flags(Path(path).parent)}, else start afresh')


def log_line(log, entry):
    """Append `entry` to the open log.jsonl `log` as a line (data.json_text: NaN and inf as null), flushed.
    A full disk names the file."""
    with data.naming(log.name, 'appending to it; the checkpoints written are unchanged'):
        log.write(data.json_text(entry) + '\n')
        log.flush()


def trim_log(path, step):
    """Resuming at `step`: drop the log lines of later steps (the killed run got further than its
    last checkpoint; they will be logged again) and a line cut off mid-write, or garbled (bytes that are
    not UTF-8, as a crash of the machine can leave at a file's end: the log is written as ASCII)."""
    if not path.exists():
        return

    def write(f):
        # Line by line, where reading the whole log took 1.3 GB at 2M lines (--log-every 1). A line of
        # bytes ends at b'\n', which no UTF-8 sequence contains, so decoding each on its own gives what
        # decoding the whole file did; str.splitlines() then cuts it where it cut the whole text (also at
        # a '\r' or other line break of garbage).
        with open(path, 'rb') as log:
            for raw in log:
                for line in raw.decode('utf-8', 'replace').splitlines():
                    try:
                        if json.loads(line)['step'] <= step:
                            f.write((line + '\n').encode())
                    except (ValueError, KeyError, TypeError):
                        pass
    data.atomic_write(path, write)


def format_seconds(s):
    s = int(s)
    return f'{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}'


class Progress:
    """What a progress line reports: the means of on-device values (the loss and its parts) over
    the steps since the last line, and their img/s without the time spent in `paused()` blocks
    (evaluation, checkpoints). add() never syncs with the device; take() is the one host sync.
    state() and restore() carry the means of a window cut by a checkpoint over to the resumed
    run, so that its first line averages the same steps as an uninterrupted run's."""

    def __init__(self, images_per_step):
        self.images_per_step = images_per_step
        self._restart()

    def _restart(self):
        self.sums, self.steps, self.timed_steps, self.pause_s = None, 0, 0, 0.0
        self.start = time.perf_counter()

    def add(self, values):
        """values: (V,) tensor of this step's values, on the device."""
        values = values.detach()
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1
        self.timed_steps += 1

    def state(self, world=1):
        """The open window for a checkpoint: {'sums_by_rank': [[...] per rank] or None, 'steps': n}.
        With world > 1 every rank must call it (the replicas' sums are gathered)."""
        if self.sums is None:
            return dict(sums_by_rank=None, steps=0)
        every = [self.sums]
        if world > 1:
            every = [torch.empty_like(self.sums) for _ in range(world)]
            dist.all_gather(every, self.sums)
        return dict(sums_by_rank=[t.tolist() for t in every], steps=self.steps)

    def restore(self, state, device, rank=0):
        """Reopen a checkpoint's window with this rank's sums (img/s counts only the steps from now)."""
        if state and state.get('sums_by_rank'):
            self.sums = torch.tensor(state['sums_by_rank'][rank], dtype=torch.float32, device=device)
            self.steps = state['steps']

    @contextlib.contextmanager
    def paused(self):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.pause_s += time.perf_counter() - t

    def take(self, all_reduce=False):
        """([mean of each value], img/s) over the steps since the last take, then starts afresh.
        all_reduce: average the values over the DDP replicas first (every rank must call it)."""
        sums = self.sums
        if all_reduce:
            sums = sums.clone()
            dist.all_reduce(sums)
            sums = sums / dist.get_world_size()
        means = [v / self.steps for v in sums.tolist()]
        rate = self.timed_steps * self.images_per_step / max(time.perf_counter() - self.start - self.pause_s, 1e-9)
        self._restart()
        return means, rate


def peak_memory_gb(device):
    """Peak GPU memory since the last call (so the training lines do not show an evaluation's peak);
    None on a CPU, where it is not measured."""
    if device.type != 'cuda':
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def progress_line(entry, steps, images_per_step, parts=()):
    """'step s/S | loss L (part p ...) | lr | img/s | ETA | mem' (GPU only) from a log entry."""
    eta = (steps - entry['step']) * images_per_step / max(entry['img_per_s'], 1e-9)
    detail = ' (' + ' '.join(f'{k} {entry[k]:.4f}' for k in parts) + ')' if parts else ''
    return (f'step {entry["step"]}/{steps} | loss {entry["loss"]:.4f}{detail} | lr {entry["lr"]:.2e} | '
            f'{entry["img_per_s"]:.1f} img/s | ETA {format_seconds(eta)}'
            + ('' if entry['peak_mem_gb'] is None else f' | mem {entry["peak_mem_gb"]:.1f} GB'))


# --- Benchmark ------------------------------------------------------------------------------

def _graphs_compiled():
    """How many graphs dynamo has compiled in this process (a recompilation adds one)."""
    try:
        from torch._dynamo.utils import counters  # not public API: guard against its moving
        return counters['stats']['unique_graphs']
    except (ImportError, AttributeError, KeyError):
        return 0


def _timed(step, batches, warmup, iters, device, skip=0, span=contextlib.nullcontext()):
    """(seconds per step, peak GB, graphs compiled while timing, host seconds per step spent waiting
    for the next batch) over `iters` steps after `warmup` (which absorbs compilation) and after
    dropping `skip` batches unused (what a loader's workers queued up meanwhile: timed, they would
    flatter a loader slower than the step); one sync at each end of the timed span, none inside it.
    The wait splits the host's time: a step that waits long for batches is fed too slowly; one that
    spends its time inside `step` is bound by the host's own work there (launches, or a hidden
    wait for the GPU). `span`, a context manager, is entered for exactly the timed span (CpuUse)."""
    it = iter(batches)
    for _ in range(warmup):
        step(*next(it))
    if device.type == 'cuda':
        torch.cuda.synchronize(device)  # the host may run steps ahead: drop what the queue holds once they are done
    for _ in range(skip):
        next(it)
    graphs = _graphs_compiled()

    def timed_steps():  # -> host seconds spent waiting for batches
        waited = 0.0
        for _ in range(iters):
            t = time.perf_counter()
            batch = next(it)
            waited += time.perf_counter() - t
            step(*batch)
        return waited

    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with span:
            start.record()
            waited = timed_steps()
            end.record()
            end.synchronize()
        seconds, mem = start.elapsed_time(end) / 1000 / iters, torch.cuda.max_memory_allocated(device) / 2 ** 30
    else:
        with span:
            t0 = time.perf_counter()
            waited = timed_steps()
            seconds, mem = (time.perf_counter() - t0) / iters, 0.0
    return seconds, mem, _graphs_compiled() - graphs, waited / iters


def _stat_fields(stat_path):
    """The fields of a /proc/.../stat file after the process name (field 3 on); None if it cannot be
    read (gone, not Linux)."""
    try:
        with open(stat_path) as f:
            return f.read().rsplit(')', 1)[1].split()  # the name, in parentheses, may hold spaces
    except (OSError, IndexError):
        return None


def _cpu_seconds(stat_path):
    """User + system CPU seconds from a /proc/.../stat file (a process: all its threads, exited ones
    included; a /proc/PID/task/TID/stat: one thread); None if it cannot be read."""
    fields = _stat_fields(stat_path)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')  # 14, 15


def _children(pid):
    """The process ids whose parent is `pid` (the loader's worker processes, and any others)."""
    return [int(name) for name in os.listdir('/proc')
            if name.isdigit() and (_stat_fields(f'/proc/{name}/stat') or [None, None])[1] == str(pid)]


def _machine_busy():
    """(busy, total) CPU seconds of the whole machine since boot, summed over its CPUs, and the
    number of CPUs, from /proc/stat."""
    with open('/proc/stat') as f:
        lines = f.read().splitlines()
    ticks = [int(v) for v in lines[0].split()[1:]]
    cpus = sum(line.startswith('cpu') and line[3:4].isdigit() for line in lines)
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    hz = os.sysconf('SC_CLK_TCK')
    return (sum(ticks[:8]) - idle) / hz, sum(ticks[:8]) / hz, cpus  # guest time is counted in user already


class CpuUse:
    """Where the CPU went over a span (`with cpu:`), from /proc (Linux; elsewhere `result` is None):
    this process's main thread, its other threads (DataLoader's pinning thread, CUDA's), its child
    processes (the loader's workers; children started during the span are not seen) and the whole
    machine. Resolution: the kernel's clock tick, 10 ms, summed over the span."""

    def __init__(self):
        self.result = None

    def _read(self):
        pid = os.getpid()
        return dict(wall=time.perf_counter(), process=_cpu_seconds(f'/proc/{pid}/stat'),
                    main=_cpu_seconds(f'/proc/{pid}/task/{pid}/stat'),
                    children=sum(filter(None, (_cpu_seconds(f'/proc/{c}/stat') for c in self._kids))),
                    machine=_machine_busy())

    def __enter__(self):
        try:
            self._kids = _children(os.getpid())
            self._start = self._read()
        except OSError:  # no /proc
            self._start = None
        return self

    def __exit__(self, *exc):
        if self._start is None or exc[0] is not None:
            return
        end, start = self._read(), self._start
        if None in (end['process'], end['main'], start['process'], start['main']):
            return
        wall = end['wall'] - start['wall']
        busy, total = (e - s for e, s in zip(end['machine'][:2], start['machine'][:2]))
        # The kernel's idle and iowait counts may step back a little (its documentation says so for
        # iowait), which over a short span could make busy negative or above the total.
        busy = min(max(busy, 0.0), total)
        self.result = dict(seconds=wall, main=end['main'] - start['main'],
                           other_threads=max(0.0, (end['process'] - start['process']) - (end['main'] - start['main'])),  # ticks: >= -1
                           children=end['children'] - start['children'], machine_busy=busy, machine=total,
                           cpus=end['machine'][2])

    def per_step(self, steps, images, workers):
        """The span's CPU per training step and per image, for a benchmark row; None without /proc."""
        r = self.result
        if r is None or r['seconds'] <= 0:
            return None
        return dict(seconds=r['seconds'], main_thread_ms_per_step=1000 * r['main'] / steps,
                    other_threads_ms_per_step=1000 * r['other_threads'] / steps,
                    workers_ms_per_image=1000 * r['children'] / images,
                    workers_busy=r['children'] / (r['seconds'] * workers) if workers else 0.0,
                    # the busy share of the ticks counted, not of the wall time: a span of a few ms holds
                    # zero or a few 10 ms ticks, which over its wall time could read as more cores than there are
                    machine_busy_cores=r['cpus'] * r['machine_busy'] / r['machine'] if r['machine'] > 0 else 0.0,
                    machine_cores=r['cpus'])


def _flops_per_image(step, batch, batch_size, net):
    """Forward + backward FLOPs of one step of `net` (matmuls and convolutions), counted by torch:
    the network's, not those of reading its taps by matmuls (its matmul_cells is 0 meanwhile)."""
    from torch.utils.flop_counter import FlopCounterMode
    counter, matmul_cells = FlopCounterMode(display=False), getattr(net, 'matmul_cells', None)
    try:
        if matmul_cells is not None:
            net.matmul_cells = 0
        with counter:
            step(*batch)
    finally:
        if matmul_cells is not None:
            net.matmul_cells = matmul_cells
    return counter.get_total_flops() / batch_size


def _repeat(batch):
    while True:
        yield batch


def bench_counts(args, device, colorizing=False):
    """(untimed, timed) repeats of a --benchmark part: --bench-warmup and --bench-steps where given,
    else the part's own defaults: 10 and 20 training steps; 1 and 10 (a GPU) or 3 (a CPU) calls of
    colorize_array, a whole photo each."""
    default = (1, 10 if device.type == 'cuda' else 3) if colorizing else (10, 20)
    return (default[0] if args.bench_warmup is None else args.bench_warmup,
            default[1] if args.bench_steps is None else args.bench_steps)


def benchmark(args):
    """`--benchmark`: training throughput and/or colorizing speed; writes OUT/benchmark.json."""
    device, rank, world, _ = setup_device(args)
    args.objective = 'colorize'  # the classifier baseline is built from the same trunk
    fill_defaults(args, device, world)
    args.out.mkdir(parents=True, exist_ok=True)
    name = device_name(device)
    print(f'benchmark: {args.arch} loss {args.loss}, fc6/fc7 {args.fc_dim}, device {name}, torch {torch.__version__}')
    info = dict(arch=args.arch, loss=args.loss, batch=args.batch_size, crop=args.crop, points=args.points,
                fc_dim=args.fc_dim, device=name, torch=torch.__version__, git_commit=git_commit(),
                workers=args.workers, handover=args.handover,  # what the loader ran with
                switch_interval=sys.getswitchinterval(),
                sharing_strategy=torch.multiprocessing.get_sharing_strategy())
    if args.benchmark in ('all', 'train'):
        info['rows'] = benchmark_training(args, device, rank, world)
    if args.benchmark == 'loader':
        info['rows'] = benchmark_loader(args, device, rank, world)
    if args.benchmark in ('all', 'colorize'):
        info['colorize'] = benchmark_colorize(args, device, tuple(args.bench_photo))
    data.write_json(args.out / 'benchmark.json', info, indent=2)
    return info


def benchmark_training(args, device, rank, world):
    """Training img/s on synthetic device-resident data (compiled and eager, colorizer and the same
    trunk as a classifier), then end to end through the real loader. Returns the table's rows."""
    B, (warmup, iters) = args.batch_size, bench_counts(args, device)
    print(f'training steps: batch {B}, crop {args.crop}, {args.points} points')
    gen = torch.Generator().manual_seed(0)
    # All on the device: a copy from pageable host memory would wait for the GPU at every step.
    images = torch.randint(0, 256, (B, 3, args.crop, args.crop), dtype=torch.uint8, generator=gen).to(device)
    status = torch.zeros(B, dtype=torch.long).to(device)
    labels = torch.randint(0, 1000, (B,), generator=gen).to(device)
    rows = []
    for compiled in ([True, False] if args.compile else [False]):
        profiling = args.bench_profile and compiled == args.compile  # the rows that training runs like
        names = ['colorizer', 'classifier'] + (['gathers'] if profiling else [])  # gathers: what matmuls save
        for name in names:
            torch.manual_seed(args.seed)
            net = make_model(model_config(args))
            if name == 'classifier':
                net = Classifier(net.trunk)
            net = net.to(device).to(memory_format=torch.channels_last)
            opt = torch.optim.SGD(parameter_groups(net, args.weight_decay), lr=1e-4, momentum=args.momentum)
            fast = torch.compile(net, fullgraph=True) if compiled else net  # a graph break is an error here
            if name != 'classifier':
                step, batch = (lambda im, st: train_step(fast, opt, im, st, args, device)), (images, status)
                eager_step = lambda im, st: train_step(net, opt, im, st, args, device)  # noqa: E731
            else:
                step, batch = (lambda im, lb: classify_step(fast, opt, im, status, lb, args, device)), (images, labels)
                eager_step = lambda im, lb: classify_step(net, opt, im, status, lb, args, device)  # noqa: E731
            flops = _flops_per_image(eager_step, batch, B, net)
            if name == 'gathers':
                net.matmul_cells = 0  # read when compiling
            seconds, mem, recompiles, _ = _timed(step, _repeat(batch), warmup, iters, device)
            rows.append(dict(model=name, data='synthetic', compiled=compiled, img_per_s=B / seconds,
                             ms_per_step=1000 * seconds, gflops_per_img=flops / 1e9,
                             tflops=flops * B / seconds / 1e12, peak_mem_gb=mem, recompiles=recompiles))
            print_row(rows[-1])
            if profiling:
                rows[-1]['profile'] = profile_steps(step, batch, device, 1000 * seconds,
                                                    args.out / f'profile-{name}.txt',
                                                    steps=min(5, iters))
            del net, fast, opt
    rows += benchmark_loader(args, device, rank, world, flops=rows[0]['gflops_per_img'] * 1e9)
    ratio = rows[0]['tflops'] / rows[1]['tflops']
    print(f'colorizer / classifier FLOP rate ({"compiled" if args.compile else "eager"}): {ratio:.2f}; '
          f'loader / synthetic img/s: {rows[-2]["img_per_s"] / rows[0]["img_per_s"]:.2f}')
    return rows


def benchmark_loader(args, device, rank, world, flops=None):
    """The colorizer's training steps end to end, fed by the real loader (folders, a pack, or the
    demo), then the loader alone: two rows. `flops` per image: counted here unless given."""
    B, (warmup, iters) = args.batch_size, bench_counts(args, device)
    train_paths = take_subset(args, image_sources(args, rank == 0, hold_out=False)[0])
    torch.manual_seed(args.seed)
    net = make_model(model_config(args)).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(parameter_groups(net, args.weight_decay), lr=1e-4, momentum=args.momentum)
    fast = torch.compile(net, fullgraph=True) if args.compile else net
    batches = iter(make_loader(train_paths, args, rank, world, 0, device))
    if flops is None:
        flops = _flops_per_image(lambda im, st: train_step(net, opt, im, st, args, device), next(batches), B,
                                 net)
    queued = args.workers * LOADER_PREFETCH  # the most batches the workers hold ready
    # Both rows time each worker's making 4 batches or more (with 15 workers and 20 steps, each made one
    # or two, and a window of half a second on a GPU).
    steps = max(iters, 4 * args.workers)
    cpu = CpuUse()  # where the host's CPU goes while timing: main thread, other threads, workers
    seconds, mem, recompiles, waited = _timed(lambda im, st: train_step(fast, opt, im, st, args, device), batches,
                                              warmup, steps, device, skip=queued, span=cpu)
    rows = []
    rows.append(dict(model='colorizer', data=f'loader ({args.workers} workers)', compiled=args.compile,
                     img_per_s=B / seconds, ms_per_step=1000 * seconds, gflops_per_img=flops / 1e9,
                     tflops=flops * B / seconds / 1e12, peak_mem_gb=mem, recompiles=recompiles, steps=steps,
                     host_wait_ms=1000 * waited, cpu=cpu.per_step(steps, steps * B, args.workers)))
    print_row(rows[-1])
    # The loader alone: the most it can feed. Each batch's images only go to the device, as in a step
    # (on a CPU that reads each batch once, which matters: a page not read costs nothing). Queued
    # batches dropped first, as above.
    cpu = CpuUse()
    sink = torch.empty((B, 3, args.crop, args.crop), dtype=torch.uint8, device=device)
    seconds = _timed(lambda images, *rest: sink.copy_(images, non_blocking=True), batches, 0, steps, device,
                     skip=queued, span=cpu)[0]
    rows.append(dict(model='loader', data=f'alone ({args.workers} workers)', compiled=False, img_per_s=B / seconds,
                     ms_per_step=1000 * seconds, gflops_per_img=0.0, tflops=0.0, peak_mem_gb=0.0, recompiles=0,
                     steps=steps, cpu=cpu.per_step(steps, steps * B, args.workers)))
    print_row(rows[-1])
    return rows


def _matmul_tflops(device, n, iters=5):
    """The TFLOP/s of an n x n matmul in the precision colorizing runs in: the roof to compare with."""
    dtype = torch.bfloat16 if device.type == 'cuda' else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * iters / (time.perf_counter() - start) / 1e12


@torch.no_grad()
def benchmark_colorize(args, device, size):
    """Wall-clock seconds of colorize_array on a random (H, W) = `size` photo (uint8 in host memory to
    uint8 in host memory), for an untrained model of these args with BatchNorm folded, as
    `--colorize` runs it: at --net-short-side (default: the middle of --short-side) and at the
    photo's own size. The median of --bench-steps calls after --bench-warmup untimed ones (bench_counts).
    Returns the rows."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.backends.cudnn.benchmark = False  # as in --colorize, where every photo size is new
    torch.manual_seed(args.seed)
    model = fold_batchnorm(make_model(model_config(args)).eval()).to(device).eval()
    model = model.to(memory_format=torch.channels_last)
    photo = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    side = network_short_side(args.net_short_side, args.short_side)
    rows, (warmup, calls) = [], bench_counts(args, device, colorizing=True)
    n = 8192 if device.type == 'cuda' else 2048
    peak = _matmul_tflops(device, n)
    precision = 'bf16' if device.type == 'cuda' else 'float32'
    print(f'reference: a {n}x{n} matmul ({precision}) runs at {peak:.3g} TFLOP/s here')
    for short_side in dict.fromkeys([side, 0]):  # once if they are the same
        for _ in range(warmup):  # the allocator, lazy init
            colorize_array(model, photo, args.loss, device, short_side)
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            colorize_array(model, photo, args.loss, device, short_side)  # ends on the host: synced
            times.append(time.perf_counter() - start)
        counter = FlopCounterMode(display=False)
        with counter:
            colorize_array(model, photo, args.loss, device, short_side)
        rows.append(dict(photo=f'{size[1]}x{size[0]}', net_short_side=short_side, seconds=float(np.median(times)),
                         calls=calls, warmup_calls=warmup, gflops=counter.get_total_flops() / 1e9,
                         matmul_tflops=peak))
        r = rows[-1]
        print(f'colorize a {r["photo"]} photo, network at short side {short_side or "(own size)"}: '
              f'{1000 * r["seconds"]:.0f} ms (median of {calls} calls; {r["gflops"]:.0f} GFLOP, '
              f'{r["gflops"] / r["seconds"] / 1000:.3g} TFLOP/s)',
              flush=True)
    return rows


# Kernel families of --bench-profile, matched in order in the lower-cased kernel (CUDA) or op (CPU)
# name: Inductor's generated (fused) kernels; cuDNN/cuBLAS/CUTLASS convolutions and matmuls; copies.
PROFILE_FAMILIES = (('triton (fused)', ('triton',)),  # first: their names hold the ops they fuse
                    ('conv/matmul', ('conv', 'gemm', 'cutlass', 'cudnn', 'xmma', 'nvjet', 'wgrad', 'dgrad',
                                     'fprop', 'mm')),
                    ('copy/fill', ('memcpy', 'memset', 'copy', 'fill', 'zero')),
                    ('other', ('',)))


def kernel_family(name):
    """The PROFILE_FAMILIES entry a kernel or op name belongs to."""
    lower = name.lower()
    return next(family for family, words in PROFILE_FAMILIES if any(w in lower for w in words))


def _self_time_us(event, cuda):
    """An op's or kernel's own time in microseconds, on the GPU (named either way across torch
    versions) or the CPU."""
    if not cuda:
        return event.self_cpu_time_total
    value = getattr(event, 'self_device_time_total', None)
    return value if value is not None else getattr(event, 'self_cuda_time_total', 0)


def kernel_times(events, steps, cuda, cuda_type):
    """[(ms per step, calls per step, name)] of the profiled kernels (CPU: ops), longest first. On
    a GPU, CPU ops are left out (their kernels count), and so are the ranges that record_function
    annotations (e.g. "Optimizer.step#SGD.step") draw on the GPU timeline over kernels counted
    already. Torch before 2.5 does not mark those ranges (no is_user_annotation; its "Self CUDA"
    totals counted them, pytorch#130730): there a GPU event named as a CPU event is such a range,
    but for a Triton kernel, whose launch Inductor wraps in a CPU range of the kernel's own name
    (torch >= 2.1, whatever the version: so the rule is for the events without is_user_annotation)."""
    kernels = []
    cpu_names = set()
    if cuda and not any(hasattr(event, 'is_user_annotation') for event in events):
        cpu_names = {event.key for event in events
                     if event.device_type != cuda_type and not event.key.startswith('triton')}
    for event in events:
        if cuda and (event.device_type != cuda_type or getattr(event, 'is_user_annotation', False)
                     or event.key in cpu_names):
            continue
        ms = _self_time_us(event, cuda) / 1000 / steps
        if ms > 0:
            kernels.append((ms, event.count / steps, event.key))
    return sorted(kernels, reverse=True)


def profile_steps(step, batch, device, step_ms, path, steps=5):
    """What a step's time goes to: `steps` steps under torch.profiler, the GPU kernels' (CPU: the
    ops') own time per step by family and the 80 longest, written to `path`. Returns the families
    in ms per step and their sum, and for CUDA the share of the timed step (`step_ms`) that kernels
    kept the GPU busy (well below 1: the host or launches bound the step, not the GPU)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == 'cuda'
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step(*batch)
        if cuda:
            torch.cuda.synchronize(device)
    kernels = kernel_times(prof.key_averages(), steps, cuda, DeviceType.CUDA)
    families = {name: 0.0 for name, _ in PROFILE_FAMILIES}
    for ms, _, key in kernels:
        families[kernel_family(key)] += ms
    total = sum(families.values())
    busy = total / step_ms if cuda else None
    lines = [f'{"GPU kernels" if cuda else "CPU ops"}, own time per step over {steps} steps: {total:.2f} ms'
             + (f' ({100 * busy:.0f}% of the timed {step_ms:.2f} ms step)' if cuda else ''), '']
    lines += [f'{name:16s} {ms:9.2f} ms  {100 * ms / max(total, 1e-12):5.1f}%' for name, ms in families.items()]
    lines += ['', f'{"ms/step":>9s} {"calls":>6s}  name']
    lines += [f'{ms:9.3f} {calls:6.1f}  {key[:140]}' for ms, calls, key in kernels[:80]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    print(f'  profile: {total:.1f} ms of {"kernels" if cuda else "ops"} per step'
          + (f' ({100 * busy:.0f}% busy)' if cuda else '') + ': '
          + ', '.join(f'{name} {ms:.1f}' for name, ms in families.items()) + f'; top 80 in {path}', flush=True)
    return dict(families_ms=families, total_ms=total, busy=busy)


def print_row(r):
    if r['model'] == 'loader':
        print(f'{r["model"]:10s} {r["data"]:22s} {"":8s} {r["img_per_s"]:9.1f} img/s {r["ms_per_step"]:9.1f} '
              f'ms/batch (only the copy to the device: the most the loader can feed)', flush=True)
    else:
        print(f'{r["model"]:10s} {r["data"]:22s} {"compiled" if r["compiled"] else "eager":8s} '
              f'{r["img_per_s"]:9.1f} img/s {r["ms_per_step"]:9.1f} ms/step {r["gflops_per_img"]:8.3g} GFLOP/img '
              f'{r["tflops"]:8.3g} TFLOP/s {r["peak_mem_gb"]:6.1f} GB'
              + (f'  RECOMPILED {r["recompiles"]}x while timing' if r['recompiles'] else ''), flush=True)
    if 'host_wait_ms' in r:
        print(f'  host: {r["host_wait_ms"]:.1f} ms/step waiting for the loader\'s next batch, '
              f'{max(r["ms_per_step"] - r["host_wait_ms"], 0):.1f} ms/step not waiting (the step\'s own '
              'host work, or the GPU ahead of it)', flush=True)
    if r.get('cpu'):
        c = r['cpu']
        print(f'  cpu: main thread {c["main_thread_ms_per_step"]:.1f} ms/step, other threads '
              f'{c["other_threads_ms_per_step"]:.1f} ms/step, loader processes {c["workers_ms_per_image"]:.2f} '
              f'ms/image ({100 * c["workers_busy"]:.0f}% busy), machine {c["machine_busy_cores"]:.1f} of '
              f'{c["machine_cores"]:.0f} cores busy, over {c["seconds"]:.2f} s'
              + (' (under 1 s: the kernel counts CPU time in 10 ms ticks, so these are rough)'
                 if c['seconds'] < 1 else ''), flush=True)
    elif 'cpu' in r:  # CpuUse found no /proc (macOS, Windows)
        print('  cpu: not measured (it is read from /proc, which only Linux has)', flush=True)


# --- Colorizing photos --------------------------------------------------------------------------

def colorize_files(args, log_every=5.0):
    """--colorize: each input to a PNG in --output; a progress line every `log_every` s, then a summary.
    Returns the exit status: 0, or 1 if some inputs could not be decoded (each named)."""
    if args.checkpoint is None:
        raise UserError('--colorize needs --checkpoint CKPT (a checkpoint.pt written by training)')
    device = parse_device(args.device) if args.device else torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    ckpt = load_checkpoint(args.checkpoint)
    config = ckpt['config']
    if config.get('objective', 'colorize') != 'colorize':
        raise UserError(f'{args.checkpoint} was trained for {config["objective"]}, not colorization')
    model = make_model(config)
    load_model_state(model, ckpt['model'], args.checkpoint)
    # Inference only: BatchNorm folded into the convs (same outputs, fewer passes over the maps).
    model = fold_batchnorm(model.eval()).to(device).eval().to(memory_format=torch.channels_last)
    short_side = network_short_side(args.net_short_side, ckpt.get('args', {}).get('short_side'))
    jobs = output_names(args.colorize, args.output)
    if args.skip_existing:
        jobs = outputs_to_renew(jobs, args.checkpoint)
    args.output.mkdir(parents=True, exist_ok=True)
    failed, n = [], len(jobs)
    t_start = t_log = time.perf_counter()
    for k, (path, target) in enumerate(jobs, 1):
        try:
            # EXIF orientation applied, an ICC profile's colours converted to sRGB; grayscale: 3 equal channels;
            # a 4th channel, alpha, where the photo has transparency
            rgb = data.load_rgb(path, to_srgb=True, alpha=True)
        except data.BadImage as e:
            print(f'warning: skipping {e}', file=sys.stderr)
            failed.append(path)
        else:
            out = colorize_array(model, rgb[..., :3], config['loss'], device, short_side)
            if rgb.shape[2] == 4:  # transparency kept: a cut-out stays one
                out = np.concatenate([out, rgb[..., 3:]], axis=2)
            data.write_png(target, out)  # atomic: a kill or a full disk leaves the earlier result, not half a file
        now = time.perf_counter()
        if now - t_log >= log_every and k < n:
            t_log, rate = now, k / max(now - t_start, 1e-9)
            print(f'colorize: {k}/{n} images ({100 * k / n:.0f}%), {rate:.1f} img/s, '
                  f'ETA {format_seconds((n - k) / rate)}, {len(failed)} unreadable', flush=True)
    print(f'colorized {n - len(failed)} of {n} image(s) into {args.output} '
          f'in {format_seconds(time.perf_counter() - t_start)}' + unreadable_text(failed))
    return 1 if failed else 0  # as `data.py verify`: 1 says some inputs were not done, 2 that nothing could start


COLORIZE_SHOWN = 10  # unreadable inputs named in the summary line


def outputs_to_renew(jobs, checkpoint):
    """--skip-existing: the jobs (input, output) whose output is missing, or older than its input or the
    checkpoint (a photo edited, a model trained on since); says how many it leaves."""
    since = os.path.getmtime(checkpoint)
    todo = [(path, target) for path, target in jobs
            if not target.exists() or target.stat().st_mtime < max(since, os.path.getmtime(path))]
    if len(todo) < len(jobs):
        print(f'--skip-existing: left {len(jobs) - len(todo)} of {len(jobs)} output(s) that are newer than their '
              f'photo and the checkpoint')
    return todo


def first_few(items):
    """The first COLORIZE_SHOWN of `items` (str), joined by ', ', and how many more there are."""
    more = f' and {len(items) - COLORIZE_SHOWN} more' if len(items) > COLORIZE_SHOWN else ''
    return ', '.join(items[:COLORIZE_SHOWN]) + more


def unreadable_text(failed):
    """The summary's end for the unreadable inputs `failed` (each also had its warning line)."""
    return f'; {len(failed)} unreadable, skipped (see the warnings above): {first_few(failed)}' if failed else ''


def output_names(items, output):
    """[(input path, output PNG path)] for --colorize's files and folders. A folder's images keep their
    place below it (photos/a/x.jpg -> OUTPUT/a/x.png); names that would still collide get _2, _3, ...;
    an image named twice is colorized once; an output that would replace one of the inputs is refused;
    a folder's images under `output` (its earlier results) are no inputs."""
    jobs, earlier = [], 0
    out_root = os.path.realpath(output)
    for item in items:
        p = Path(item)
        if p.is_dir():
            root = Path(os.path.abspath(p))  # find_images' paths are absolute, joined below abspath(root)
            below = out_root.startswith(os.path.realpath(p) + os.sep)  # an --output inside the folder
            try:
                found = data.find_images([p])
            except ValueError as e:  # no images under it, an unfinished pack
                raise UserError(f'--colorize {item}: {e}') from None
            if found and data.pseudo_path_parts(found[0]) is not None:  # its images shrunk for training
                raise UserError(f'--colorize {item}: a pack (`data.py pack`), whose images are copies shrunk for '
                                'training; colorize the folders it was packed from')
            for path in found:
                if below and os.path.realpath(path).startswith(out_root + os.sep):  # earlier results
                    earlier += 1
                    continue
                jobs.append((path, Path(path).relative_to(root).with_suffix('.png')))
        elif p.is_file():
            jobs.append((str(p), Path(p.name).with_suffix('.png')))
        else:
            raise UserError(f'--colorize {item}: no such file or folder')
    if earlier:
        print(f'left out {earlier} image(s) under --output {output} (earlier results, not inputs)')
    inputs = {Path(path).resolve() for path, _ in jobs}
    taken, named, done, twice, renamed = set(), [], {}, [], []
    for path, rel in jobs:
        source = Path(path).resolve()
        if source in done:  # named twice (a file and its folder, a link to another input): colorized once
            if path != done[source][0]:
                twice.append((path, *done[source]))
            continue
        target, k = output / rel, 1
        # Compared without letter case: on macOS and Windows X.png and x.png are one file.
        while str(target).casefold() in taken:
            k += 1
            target = output / rel.with_name(f'{rel.stem}_{k}.png')
        if target.resolve() in inputs:
            raise UserError(f'--colorize would write over the input image {target}; choose another --output')
        if k > 1:
            renamed.append((path, target))
        taken.add(str(target).casefold())
        named.append((path, target))
        done[source] = (path, target)
    if twice:  # said, so that an output missing for an input name is not a mystery
        path, first, target = twice[0]
        print(f'{len(twice)} input name(s) are the same file as another one (a link, or a file given with its '
              f'folder), colorized once: e.g. {path} is {first}, colorized as {target}')
    if renamed:  # said, so that x_2.png can be traced back to its input
        print(f'{len(renamed)} input(s) would have had the output name of another one (x.jpg and x.png, X.jpg and '
              'x.jpg, or files of the same name from two folders) and got _2, _3, ...: '
              + first_few([f'{path} -> {target}' for path, target in renamed]))
    return named


def network_short_side(requested, training_range):
    """The short side at which the network sees a photo: --net-short-side (0: the photo's own), or
    by default the middle of the training --short-side range (LO, HI), where objects look as large
    as in training (256 for checkpoints that do not record it)."""
    if requested is None:
        lo, hi = training_range or (256, 256)
        return round((lo + hi) / 2)
    if requested < 0:
        raise UserError(f'--net-short-side must be 0 (the photo\'s own size) or positive, got {requested}')
    return requested


MAX_ASPECT = 16
BAND_PIXELS = 1 << 20  # colorize_array's full-resolution work, in bands of rows of about this many pixels


@torch.no_grad()
def colorize_array(model, rgb, loss_kind, device, short_side=0):
    """uint8 (H, W, 3) -> colorized uint8 (H, W, 3) at full resolution with the input's own lightness.

    The network sees the lightness resized to `short_side` (0: as it is), its long side at most
    MAX_ASPECT times that (a 4 x 6000 banner would otherwise become 303 x 454,500); the predicted
    colour is upsampled to (H, W).
    """
    full = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1).unsqueeze(0)  # uint8 (1, 3, H, W), host
    H, W = full.shape[-2:]
    # The full-resolution Lab conversions run in bands of rows: on a whole 48-megapixel photo their float
    # temporaries took 5.6 GB (now about 1 GB: L, the upsampled ab and one band).
    rows = max(1, BAND_PIXELS // W)
    bands = range(0, H, rows)
    L = torch.cat([lab.rgb_to_lab(full[..., r:r + rows, :].to(device))[:, :1] for r in bands], 2)  # (1, 1, H, W)
    scale = min(short_side / min(H, W), MAX_ASPECT * short_side / max(H, W)) if short_side else 1.0
    size = (max(1, round(H * scale)), max(1, round(W * scale)))
    small = L if size == (H, W) else F.interpolate(L, size=size, mode='bilinear', align_corners=False,
                                                   antialias=scale < 1)
    # Pad to a multiple of the deepest stride (edge pixels repeated): every tap then tiles the
    # image exactly, and images smaller than the trunk's receptive grid still work.
    h, w, stride = *small.shape[-2:], model.trunk.out_stride
    padded = F.pad(small, (0, -w % stride, 0, -h % stride), mode='replicate')
    with autocast(device):
        ab = predict_ab(model, padded, loss_kind)[..., :h, :w]
    if size != (H, W):
        ab = F.interpolate(ab, size=(H, W), mode='bilinear', align_corners=False)
    out = torch.empty(H, W, 3, dtype=torch.uint8)
    for r in bands:
        band = lab.lab_to_rgb(torch.cat([L[..., r:r + rows, :], ab[..., r:r + rows, :]], 1))[0]  # (3, rows, W)
        out[r:r + rows] = (band * 255 + 0.5).clamp(0, 255).byte().permute(1, 2, 0).cpu()
    return out.numpy()


def main(argv=None):
    data.printable_output()
    args = parse_args(argv)
    try:
        problem = unread_flags_problem(args)
        if problem:
            raise UserError(problem)
        if (args.colorize or args.benchmark) and int(os.environ.get('WORLD_SIZE', '1')) > 1:
            raise UserError(f'--{"colorize" if args.colorize else "benchmark"} runs on one device: '
                            'run it with python, not torchrun')
        if args.colorize:
            return colorize_files(args)
        if args.benchmark:
            benchmark(args)
        else:
            train(args)
    except (UserError, OSError, KeyboardInterrupt, Stopped) as e:
        # Name the run folder (as finetune_voc.py does): --resume alone continues runs/<arch>-<loss>,
        # another run than one trained into --out DIR, or with another -a or --loss. No folder yet and no
        # --resume: stopped before fill_defaults (under torchrun, waiting there for the other ranks), nothing
        # written, nothing to continue.
        resume = None if args.colorize or args.benchmark else (resume_flags(args.out) if args.out else '--resume')
        status = stop_status(e, resume=resume, out=args.out, fresh=args.out is None and not args.resume)
        if status is None:  # a bug, not the user's to fix: the traceback
            raise
        if dist.is_initialized():
            # Exit at once. Not through the process group's teardown: it would wait for the other ranks,
            # which may be anywhere (torch 2.4.1's gloo hung there). Nor through the interpreter's: with
            # the group alive, torch 2.4.1 could abort on gloo's threads ("terminate called without an
            # active exception").
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        return status
    if dist.is_initialized():
        # Every rank done with its collectives first: torch 2.4's gloo teardown could otherwise
        # hang in one rank once another had exited (2 of 6 runs started by hand; none of 10 with it).
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == '__main__':
    sys.exit(main())
