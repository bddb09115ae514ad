"""Fine-tune a colorization network on PASCAL VOC (Larsson et al., CVPR 2017: its transfer protocols and questions).

    python finetune_voc.py --task cls --init runs/vgg16-huechroma/checkpoint.pt      # the demo world's VOC
    python finetune_voc.py --task cls --init CKPT --voc-root /data/VOCdevkit --out runs/cls-vgg16
    python finetune_voc.py --task seg --init CKPT --voc-root /data/VOCdevkit --train-split train_aug
    python finetune_voc.py --task seg --init CKPT --extended-fov                      # the paper's best
    python finetune_voc.py --task cls --init random -a alexnet                        # RQ1: random init
    python finetune_voc.py --task cls --init imagenet_vgg16.pth                       # RQ1: ImageNet labels
    python finetune_voc.py --task seg --init CKPT --label-fraction 0.1                # RQ3: 10% of the labels
    python finetune_voc.py --task cls --init CKPT --feature-shift                     # RQ4: CKA per layer
    python finetune_voc.py --task cls --init CKPT --freeze                            # linear probe
    python finetune_voc.py --out runs/cls-vgg16 --resume                              # continue after a crash
    python finetune_voc.py --export vgg16_color.pth --init CKPT                       # torchvision weights

--init takes a colorize.py checkpoint (BatchNorm folded, colorization head dropped), `random`
(Kaiming; a ResNet's residual branches at zero), or a state_dict in torchvision's naming (alexnet,
vgg16, resnet50, resnet152), whose RGB conv1 is converted to our lightness input. Classification:
random scale U[0.5, 2], 224 crops, multi-label BCE on a new 20-way layer over the global-average-pooled deepest tap; test = mean
logits of 10 random crops, AP both as the VOC2007 11-point interpolated AP and as the
non-interpolated AP. Segmentation: sparse hypercolumns (128 pixels per 448 crop), new head; test
= dense prediction at stride 4 over the whole val set, mIU from one confusion matrix. A run writes
to --out: checkpoint.pt (atomic, resumable), log.jsonl, results.json (metrics, init, flags, torch,
device, git commit) and with --feature-shift feature_shift.json. SIGTERM or SIGUSR1 during training
saves a checkpoint after the current step and stops. On CUDA: bf16 autocast, torch.compile,
channels_last, TF32; on a CPU: float32, eager and small defaults.
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import data
import lab
from colorize import CPU_DEFAULTS as COLORIZE_CPU_DEFAULTS, GPU_DEFAULTS as COLORIZE_GPU_DEFAULTS
from colorize import (COMPILE_NOTE, DEMO_ROOT, Progress, StopSignals, Stopped, UserError, absolute_paths, atomic_save,
                      autocast, checked_window, checkpoint_fields_error, diverged, environment, error_text,
                      finite_float, flag_name, fork_run, format_seconds, git_commit, has_fc, load_checkpoint,
                      load_mismatch, load_model_state, load_optimizer_state, lock_run, log_line,
                      make_model as make_colorization_model, merge_resumed_args, note_moved_lr, note_other_commit,
                      parameter_groups, peak_memory_gb, plain_args, progress_line, read_torch_file,
                      refuse_crop_below_min, refuse_diverged_weights, refuse_fewer_steps, refuse_milestones_outside,
                      refuse_non_finite, refuse_nonfinite_weights, refuse_to_overwrite, remove_if_unused, resume_flags,
                      resume_intervals, rng_state, seed_int, setup_device, step_seed, stop_status, trim_log,
                      trunk_kwargs, unread_fc_dim_warning, worker_context, worker_options)
from models import MODELS, Bottleneck, ConvBN, HypercolumnNet, fold_batchnorm, receptive_field

HERE = Path(__file__).resolve().parent
SEG_CLASSES = ('background',) + tuple(data.VOC_CLASSES)
IGNORE = 255  # VOC's "void" label: outlines and unlabelled pixels
EVAL_SEED = 1234  # test-time crops and held-out images: the same for every run, so runs compare

# Protocol defaults: cls the Kraehenbuehl et al. protocol the authors evaluated with, seg the
# authors' ResNet-152 recipe. lr milestones are fractions of --steps: cls halves every 10k of 80k,
# seg drops x0.1 at 22.5k and 30k of 40k. seg's train_split None: train_aug (train + SBD) when the
# devkit has it, else train. cls's weight decay 1e-6, biases at twice the lr and the new layer's
# bias at 0.1 are those of the protocol's code (Kraehenbuehl's voc-classification,
# src/train_cls.py); seg's weight decay 5e-4 is the authors' recipe's.
TASK_DEFAULTS = {
    'cls': dict(train_split='trainval', test_split='test', crop=224, batch_size=16, steps=80_000,
                lr=1e-3, lr_milestones=[k / 8 for k in range(1, 8)], lr_gamma=0.5, weight_decay=1e-6,
                bias_lr_mult=2.0, clip_grad=10.0, input='lab', test_crops=10, test_images=0, demo_steps=2000),
    'seg': dict(train_split=None, test_split='val', crop=448, batch_size=10, steps=40_000,
                lr=1e-3, lr_milestones=[22.5 / 40, 30 / 40], lr_gamma=0.1, weight_decay=5e-4,
                bias_lr_mult=1.0, clip_grad=0.0, input='gray', test_crops=1, test_images=0, demo_steps=2000),
}
# A CPU shrinks crop, batch and the test (crops; seg: 50 of the val images, ~1.5 s each at full
# resolution for VGG-16 on 2 cores) so that the demo finishes in minutes; on the demo world (no
# --voc-root) the run is short on any device (demo_steps).
CPU_DEFAULTS = {'cls': dict(crop=64, batch_size=8, test_crops=2, demo_steps=100),
                'seg': dict(crop=128, batch_size=4, test_images=50, demo_steps=50)}

# L* as an affine function of gamma-encoded sRGB in [0, 1]: L ~ k0 + kR R + kG G + kB B. Least
# squares of lab.rgb_to_lab's L* over all 17^3 = 4913 colours of the grid {0, 1/16, ..., 1}^3
# (least squares on the columns [1, R, G, B]). |error| over that grid: max 19.4, mean 3.8 L* units
# (worst at saturated colours, since L* is far from additive in R, G, B); on the 256 grays: max
# 12.0 (near black, at 16/255; 10.8 at black), mean 6.2. Used to fold the RGB input of torchvision's
# networks into our lightness conv1 and back; test_all.py measures it.
L_FROM_RGB = (10.765438, 23.061646, 62.671641, 8.704467)
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's input normalisation, RGB in [0, 1]
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_BN_EPS = 1e-5  # nn.BatchNorm2d's default, used by torchvision's ResNets


# --- Arguments ----------------------------------------------------------------------------------

def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--task', choices=['cls', 'seg'], help='cls: VOC2007 classification (default); '
                   'seg: VOC2012 segmentation')
    p.add_argument('-a', '--arch', choices=sorted(MODELS),
                   help="trunk architecture (default: the --init checkpoint's, else vgg16)")
    p.add_argument('--init', help='initial weights: a colorize.py checkpoint, "random" (Kaiming), or a '
                   "state_dict file in torchvision's naming (ImageNet-supervised weights)")
    p.add_argument('--input', choices=['lab', 'gray'], help='lab: (L-50)/50, a/50, b/50 with the a, b '
                   'conv1 weights starting at zero; gray: (L-50)/50 only (default: lab for cls, gray for seg)')
    p.add_argument('--voc-root', type=Path, help='a VOCdevkit folder holding VOC2007 (cls) or VOC2012 (seg); default: '
                   "the demo world's VOC-layout set, generated on first use under --demo-root")
    p.add_argument('--demo-root', type=Path, default=DEMO_ROOT, help='where the demo world lives / is generated')
    p.add_argument('--out', type=Path, help='run folder (default runs/voc-<task>-<arch>-<init name><variant> beside '
                   'finetune_voc.py; the variant names what sets the run apart from the protocol\'s: -lab or -gray '
                   '(--input), -fov, -labels0.1, -labelseed2, -probe (--freeze), -seed1)')
    p.add_argument('--train-split', help='training split (default: trainval for cls; for seg train_aug, i.e. '
                   'train + SBD, when SegmentationClassAug/ and train_aug.txt are present, else train)')
    p.add_argument('--test-split', help='evaluation split (default test for cls, val for seg)')
    p.add_argument('--steps', type=int, help='training iterations (default 80k cls, 40k seg; on the demo world '
                   '2000, on a CPU 100 cls / 50 seg); the lr milestones scale with it')
    p.add_argument('--batch-size', type=int, help='images per step (default 16 cls, 10 seg; 8 / 4 on a CPU)')
    p.add_argument('--lr', type=finite_float, help='initial learning rate (default 1e-3)')
    p.add_argument('--lr-milestones', type=finite_float, nargs='+', metavar='FRAC',
                   help='fractions of --steps where the lr is multiplied by --lr-gamma '
                        '(default cls 1/8, 2/8, ..., 7/8; seg 0.5625, 0.75)')
    p.add_argument('--lr-gamma', type=finite_float, help='lr factor at each milestone (default 0.5 cls, 0.1 seg)')
    p.add_argument('--momentum', type=finite_float, default=0.9, help='SGD momentum (default %(default)s)')
    p.add_argument('--weight-decay', type=finite_float, help='weight decay, not on biases (default 1e-6 cls, 5e-4 seg)')
    p.add_argument('--bias-lr-mult', type=finite_float, help="biases' lr as a multiple of --lr (default 2 cls, 1 seg)")
    p.add_argument('--clip-grad', type=finite_float, help='gradient-norm clip, 0 = off (default 10 cls, off seg)')
    p.add_argument('--dropout', type=finite_float, default=0.5,
                   help='dropout on fc6/fc7 (cls, AlexNet/VGG) or in the hypercolumn head (seg); '
                        'default %(default)s')
    p.add_argument('--crop', type=int, help='training crop side (default 224 cls, 448 seg; 64 / 128 on a CPU)')
    p.add_argument('--scale', type=finite_float, nargs=2, metavar=('LO', 'HI'),
                   help='random image scale factor range before cropping (default: cls 0.5 2 times '
                        '--crop / 224, so that a smaller crop sees as much of the image as the protocol\'s '
                        '224 crop and keeps seeing the labelled objects; seg 1 1, no scaling, as the authors\' '
                        'segmentation code)')
    p.add_argument('--test-crops', type=int, help='cls: random crops averaged per test image (default 10; 2 on a CPU)')
    p.add_argument('--test-images', type=int, help='evaluate on a fixed random subset of this many test images, '
                   '0 = all (default all; 50 for seg on a CPU, where dense prediction is slow)')
    p.add_argument('--points', type=int, default=128, help='seg: sampled pixels per image (sparse hypercolumns; '
                   'default %(default)s)')
    p.add_argument('--head-dim', type=int, default=1024,
                   help='seg: hidden width of the hypercolumn head (default %(default)s)')
    p.add_argument('--extended-fov', action='store_true',
                   help='two extra trunk layers (2x2 pool, 3x3 conv 1024, twice), tapped, newly initialised')
    p.add_argument('--width', type=finite_float, help='channel width multiplier for --init random (default 1); taken '
                   'from a checkpoint, where a different value is refused')
    p.add_argument('--fc-dim', type=int, help="fc6/fc7 channels for --init random (default: colorize.py's, "
                   '4096 on CUDA, 1024 on a CPU); taken from a checkpoint, where a different value is refused '
                   '(a ResNet has no fc6/fc7: a warning that it changes nothing)')
    p.add_argument('--label-fraction', type=finite_float, help='RQ3: train on this fixed random share of the '
                   'training images (chosen by --label-seed, not --seed)')
    p.add_argument('--label-seed', type=lambda text: seed_int(text, least=0, most=None), default=0,
                   help='seed of the --label-fraction subset')
    p.add_argument('--feature-shift', action=argparse.BooleanOptionalAction, default=False,
                   help='RQ4: after training, linear CKA per trunk layer between the initial and the '
                        'fine-tuned network on held-out images (--no-feature-shift: not, on --resume)')
    p.add_argument('--shift-images', type=int, default=64,
                   help='held-out images for --feature-shift (default %(default)s)')
    p.add_argument('--shift-pool', type=int, default=4,
                   help='--feature-shift: each map is average-pooled to this side '
                        'before CKA (default %(default)s)')
    p.add_argument('--freeze', action='store_true', help='linear probe: train only the new layers on a '
                   'frozen trunk (verified unchanged after training; with --input lab its conv1 a, b weights '
                   'stay zero, so its features see lightness only)')
    p.add_argument('--device', help='cuda, cuda:N or cpu (default: cuda when available)')
    p.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                   help='torch.compile the model for training (default: on for CUDA, off on CPU)')
    p.add_argument('--seed', type=seed_int, default=0, help='seed of the init, data order, augmentation and pixels')
    p.add_argument('--workers', type=int, help='data loader processes (default min(8, cores) on CUDA, 1 on CPU)')
    p.add_argument('--resume', nargs='?', const='auto', metavar='CKPT',
                   help='continue from CKPT (default: <out>/checkpoint.pt, which needs --out) with its flags; a run '
                        'flag given anew must have the run\'s value, a schedule, logging or test flag wins (README: '
                        'Run folders, results and resuming); --device, --workers, --compile are this process\'s own')
    p.add_argument('--log-every', type=int, help='steps between progress lines (default ~50 lines)')
    p.add_argument('--save-every', type=int, help='steps between checkpoints (default ~10 per run)')
    p.add_argument('--exit-after', type=int, help='stop after this step as if killed (for testing --resume)')
    p.add_argument('--export', type=Path, metavar='PATH', help="write --init's trunk (BN folded) as a "
                   "torchvision state_dict for -a's architecture, then exit")
    p.add_argument('--summarize', nargs='+', type=Path, metavar='RUN',
                   help='print mean +- std of the metrics of finished runs (folders with results.json, or '
                        'the files), grouped by everything but the seed, then exit')
    return p.parse_args(argv)


# --resume takes the flags not given from the checkpoint (colorize.merge_resumed_args). Given with
# another value, the schedule, logging and test flags win (a longer --steps, say, with a printed
# line, recorded in results.json); the run flags would change the network, the data or the
# randomness of the run being continued, and are refused.
RUN_FLAGS = ('task', 'arch', 'init', 'input', 'voc_root', 'demo_root', 'train_split', 'extended_fov', 'width',
             'fc_dim', 'head_dim', 'freeze', 'label_fraction', 'label_seed', 'seed', 'crop', 'batch_size',
             'dropout', 'scale', 'points', 'bias_lr_mult')
SCHEDULE_FLAGS = ('steps', 'lr', 'lr_milestones', 'lr_gamma', 'momentum', 'weight_decay', 'clip_grad',
                  'log_every', 'save_every', 'test_split', 'test_crops', 'test_images', 'feature_shift',
                  'shift_images', 'shift_pool')
PATH_FLAGS = ('init', 'voc_root', 'demo_root')  # saved absolute (colorize.absolute_paths)
LEGACY_ARGS = {'bias_lr_mult': 1.0}  # what runs made before a flag existed did (their args lack it)


# The flags that --export and --summarize read (dests): typed with either, another flag would be
# ignored in silence, so main() refuses it (unread_flags_problem). Training reads all but these two.
EXPORT_FLAGS = frozenset({'export', 'init', 'arch', 'width', 'fc_dim', 'seed'})
SUMMARIZE_FLAGS = frozenset({'summarize'})


def unread_flags_problem(args):
    """The one-line refusal of a typed flag that --export or --summarize does not read, or None."""
    if args.export and args.summarize:
        return '--export and --summarize are two modes: give one'
    if not (args.export or args.summarize):
        return None
    mode, reads = ('--export', EXPORT_FLAGS) if args.export else ('--summarize', SUMMARIZE_FLAGS)
    for name in sorted(args.typed_flags - reads):
        hint = ' (--export names the file it writes)' if (mode, name) == ('--export', 'out') else ''
        return f'{flag_name(name)} does not apply to {mode}, which would ignore it{hint}: drop it'
    return None


# The intervals that fill_defaults derives from --steps (recorded as in colorize.py, STEP_INTERVALS there).
STEP_INTERVALS = ('log_every', 'save_every')


def fill_defaults(args, device, warn=True):
    """Task-, machine- and data-dependent defaults (a CPU and the demo world get smaller ones); checks ranges.
    warn=False: without the --fc-dim warning of check_arch_flags (_run gives it once --init is read)."""
    refuse_non_finite(args)
    args.task = args.task or 'cls'
    task, cpu = TASK_DEFAULTS[args.task], CPU_DEFAULTS[args.task] if device.type != 'cuda' else {}
    for name in ('train_split', 'test_split', 'lr', 'lr_milestones', 'lr_gamma', 'weight_decay', 'bias_lr_mult',
                 'clip_grad', 'input'):
        if getattr(args, name) is None:
            setattr(args, name, task[name])
    for name in ('crop', 'batch_size', 'test_crops', 'test_images'):
        if getattr(args, name) is None:
            setattr(args, name, cpu.get(name, task[name]))
    if args.steps is None:
        args.steps = task['steps'] if args.voc_root is not None else cpu.get('demo_steps', task['demo_steps'])
    args.compile = device.type == 'cuda' if args.compile is None else args.compile
    if args.workers is None:
        args.workers = min(8, data.usable_cores()) if device.type == 'cuda' else 1
    if getattr(args, 'derived_from_steps', None) is None:  # a fresh run; resume_intervals sets a resumed one's
        args.derived_from_steps = [name for name in STEP_INTERVALS if getattr(args, name) is None]
    derive_intervals(args)
    for name in ('steps', 'batch_size', 'crop', 'test_crops', 'points', 'shift_images', 'shift_pool', *STEP_INTERVALS):
        if getattr(args, name) <= 0:  # (a typed --log-every 0 too: derive_intervals fills only those not given)
            raise UserError(f'{flag_name(name)} must be positive, got {getattr(args, name)}')
    typed = getattr(args, 'typed_flags', frozenset())
    if args.voc_root is not None and 'demo_root' in typed:
        raise UserError('--demo-root is where the demo world goes, which a run with --voc-root does not use: drop it')
    refuse_unread_training_flags(args)
    refuse_milestones_outside(args.lr_milestones)
    if args.test_images < 0:
        raise UserError(f'--test-images must be >= 0 (0 = all), got {args.test_images}')
    if args.task == 'seg' and args.points > args.crop ** 2:
        raise UserError(f'--points {args.points}: a {args.crop} crop has only {args.crop ** 2} pixels to sample '
                        f'(without replacement)')
    if args.scale is None and args.task == 'seg':
        args.scale = [1.0, 1.0]  # the authors' segmentation code: pad to the crop, crop, flip; no scaling
    elif args.scale is None:
        # Image labels hold for the whole image: a crop that sees less of it than the protocol's
        # 224 crop (a CPU's 64) would often miss the labelled objects, so the image shrinks with it.
        shrink = args.crop / TASK_DEFAULTS['cls']['crop']
        args.scale = [0.5 * shrink, 2.0 * shrink]
    if not 0 < args.scale[0] <= args.scale[1]:
        raise UserError(f'--scale {args.scale[0]} {args.scale[1]}: need 0 < LO <= HI')
    if args.label_fraction is not None and not 0 < args.label_fraction <= 1:
        raise UserError(f'--label-fraction must be in (0, 1], got {args.label_fraction}')
    if args.arch is not None:  # typed (-a), or resolved from --init before (initial_trunk); else _run checks later
        check_arch_flags(args, warn)
    return args


def check_arch_flags(args, warn=True):
    """fill_defaults' checks that need the arch: --dropout on a trunk without fc6/fc7, the crop's minimum, and
    last (a run refused above prints its error alone) the --fc-dim warning, unless warn=False. Without -a, _run
    calls this once --init has resolved the arch (initial_trunk builds or reads a trunk: seconds), after
    fill_defaults' cheap checks, so that a mistyped flag is refused first."""
    refuse_unread_training_flags(args)
    refuse_crop_below_min(args.arch, args.crop)
    if warn:
        warn_unread_fc_dim(args)


def refuse_unread_training_flags(args):
    """UserError for the first typed flag that unread_training_flags names."""
    typed = getattr(args, 'typed_flags', frozenset())
    for name, why in unread_training_flags(args):
        if name in typed:
            raise UserError(f'{flag_name(name)} {why}, so this run would ignore it: drop it')


def cpu_note(args):
    """What the first line says of a CPU run (after fill_defaults): small crop and batch and a smaller test,
    which finish the demo in minutes, where the run has them (not with a typed --crop 224, say); with
    --voc-root the steps stay the protocol's (80,000 / 40,000), which it says where the run has that many (a
    typed --steps 1000, or a 1000-step run resumed without it, has not)."""
    cpu = CPU_DEFAULTS[args.task]
    small = args.crop <= cpu['crop'] and args.batch_size <= cpu['batch_size']
    shrunk = ['small crop and batch'] if small else []
    if args.task == 'cls' and args.test_crops < TASK_DEFAULTS['cls']['test_crops']:
        shrunk.append(f'{args.test_crops} test crops')
    if args.task == 'seg' and args.test_images:
        shrunk.append(f'{args.test_images} test images')
    if args.voc_root is None and small and args.steps <= cpu['demo_steps']:
        return f' (CPU: {", ".join(shrunk)} so the demo finishes in minutes)'
    full = args.voc_root is not None and args.steps == TASK_DEFAULTS[args.task]['steps']
    parts = [', '.join(shrunk)] if shrunk else []
    parts += ["the steps are the protocol's: give --steps N for a short run"] if full else []
    return f' (CPU: {"; ".join(parts)})' if parts else ''


def derive_intervals(args):
    """Fill the STEP_INTERVALS that are None from args.steps: ~50 progress lines, ~10 checkpoints."""
    if args.log_every is None:
        args.log_every = max(1, args.steps // 50)
    if args.save_every is None:
        args.save_every = max(1, args.steps // 10)


def warn_unread_fc_dim(args):
    """--fc-dim typed for a trunk without fc6/fc7 (any --init) changes nothing: a warning (run, --export)."""
    if 'fc_dim' in getattr(args, 'typed_flags', ()) and args.arch is not None and not has_fc(args.arch):
        print(unread_fc_dim_warning(args.arch), file=sys.stderr)


def unread_training_flags(args):
    """[(dest, why)] of the flags that this run (its task, arch, --label-fraction, --feature-shift) does not
    read: fill_defaults refuses them typed, as they would be ignored in silence."""
    unread = {'cls': [('points', 'applies to --task seg'), ('head_dim', 'applies to --task seg')],
              'seg': [('test_crops', 'applies to --task cls (segmentation is tested densely, once per image)')]}
    unread = unread[args.task]
    if args.task == 'cls' and args.arch is not None and not has_fc(args.arch):
        unread.append(('dropout', f'applies to fc6 and fc7 in --task cls, which {args.arch} does not have'))
    if args.label_fraction is None:
        unread.append(('label_seed', 'chooses the --label-fraction subset, and no --label-fraction is given'))
    if not args.feature_shift:
        unread += [(name, 'is a setting of --feature-shift, not given') for name in ('shift_images', 'shift_pool')]
    return unread


def variant_name(args):
    """What sets this run apart from the protocol's run of its init, for the default --out's name
    ('-lab-fov-labels0.1-probe-seed1'), so that runs over --label-fraction, --seed, ... need no --out."""
    parts = [args.input if args.input != TASK_DEFAULTS[args.task]['input'] else '',
             'fov' if args.extended_fov else '',
             f'labels{args.label_fraction:g}' if args.label_fraction is not None else '',
             f'labelseed{args.label_seed}' if args.label_fraction is not None and args.label_seed else '',
             'probe' if args.freeze else '', f'seed{args.seed}' if args.seed else '']
    return ''.join(f'-{p}' for p in parts if p)


def lr_at(step, args):
    """The learning rate of step `step` (from 0): --lr times --lr-gamma per milestone passed
    (fractions of --steps), with no warm-up, as the protocols' Caffe step policy; colorize.lr_at is
    pre-training's."""
    return args.lr * args.lr_gamma ** sum(step >= m * args.steps for m in args.lr_milestones)


# --- Metrics ------------------------------------------------------------------------------------

# The devkit's `for t=0:0.1:1` (VOCevalcls.m) as MATLAB builds it: the first half as 0 + k * 0.1, the
# second half as 1 - k * 0.1, so t = 0.6 and 0.7 are the doubles nearest 0.6 and 0.7 (np.linspace's
# are one ulp above: a recall of exactly 3/5 would miss its point) and t = 0.3 is 3 * 0.1, one ulp
# above 0.3 (a recall of exactly 3/10 misses it in the devkit too).
VOC07_RECALLS = np.r_[np.arange(6) * 0.1, 1 - np.arange(4, -1, -1) * 0.1]


def average_precision(scores, labels, eleven_point=False):
    """Average precision of one class (1-D inputs) or of each column (2-D (N, K) inputs -> (K,)).

    scores: real numbers, higher = more confident; labels: 1 positive, -1 negative, 0 "difficult"
    (removed before ranking, so its score changes nothing, as in the VOC devkit). Samples with
    equal scores form one threshold step (as scikit-learn does), so the result does not depend on
    their order. eleven_point=False: the non-interpolated AP of scikit-learn's
    average_precision_score, sum over threshold steps of (R_n - R_{n-1}) * P_n. eleven_point=True:
    the official VOC2007 AP, the mean over t in {0, 0.1, ..., 1} (VOC07_RECALLS) of the highest
    precision at a recall >= t (0 if none). A class with no positive sample has no AP: nan (mean_ap skips it).
    """
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(f'scores {scores.shape} and labels {labels.shape} must have the same shape')
    if scores.ndim == 2:
        return np.array([average_precision(scores[:, k], labels[:, k], eleven_point) for k in range(scores.shape[1])])
    if not np.isin(labels, (-1, 0, 1)).all():
        raise ValueError(f'labels must be 1, -1 or 0 (difficult), found {sorted(set(labels.tolist()))}')
    if not np.isfinite(scores).all():
        raise ValueError('scores contain nan or inf')
    keep = labels != 0
    s, positive = scores[keep], labels[keep] > 0
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float('nan')
    order = np.argsort(-s, kind='stable')
    s, positive = s[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last sample of each run of equal scores
    tp = np.cumsum(positive)[last]
    precision, recall = tp / (last + 1), tp / n_pos
    if eleven_point:
        return float(np.mean([precision[recall >= t].max(initial=0.0) for t in VOC07_RECALLS]))
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def mean_ap(aps):
    """mAP: the mean over classes that have an AP (classes with no positives, nan, are skipped)."""
    aps = np.asarray(aps, dtype=np.float64)
    return float(np.nanmean(aps)) if np.isfinite(aps).any() else float('nan')


def multilabel_loss(logits, labels):
    """Binary cross-entropy with logits (B, K) over labels (B, K) in {1, -1, 0}; 0 (difficult) is ignored.

    Summed over classes, averaged over images, as Caffe's SigmoidCrossEntropyLoss (divided by the
    batch size) did in the protocol's reference code: lr 1e-3 assumes that scale, 20x that of a
    mean over all B * 20 labels.
    """
    weight = (labels != 0).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, (labels > 0).to(logits.dtype), weight=weight, reduction='sum')
    return loss / logits.shape[0]


def confusion_matrix(pred, label, num_classes=len(SEG_CLASSES), ignore=IGNORE):
    """Confusion counts (num_classes, num_classes), rows = true class, columns = predicted class.

    pred, label: integer arrays of the same shape (torch tensors on any device, or numpy arrays);
    pixels whose label is `ignore` are skipped. Returns int64 of the input's kind (numpy in, numpy
    out). Any other label or prediction outside [0, num_classes) is an error.
    """
    as_numpy = isinstance(pred, np.ndarray) or isinstance(label, np.ndarray)
    pred = torch.as_tensor(pred)
    label = torch.as_tensor(label, device=pred.device)
    if pred.shape != label.shape:
        raise ValueError(f'pred {tuple(pred.shape)} and label {tuple(label.shape)} must have the same shape')
    pred, label = pred.reshape(-1).long(), label.reshape(-1).long()
    valid = label != ignore
    pred, label = pred[valid], label[valid]
    if len(label) and (label.min() < 0 or label.max() >= num_classes or pred.min() < 0 or pred.max() >= num_classes):
        raise ValueError(f'labels and predictions must be in [0, {num_classes}) or {ignore} (ignored); found '
                         f'labels {label.min().item()}..{label.max().item()}, '
                         f'predictions {pred.min().item()}..{pred.max().item()}')
    conf = torch.bincount(label * num_classes + pred, minlength=num_classes * num_classes)
    conf = conf.reshape(num_classes, num_classes)  # (true, predicted)
    return conf.cpu().numpy() if as_numpy else conf


def segmentation_scores(conf):
    """Scores of a confusion matrix (rows true, columns predicted) -> dict(miou, pixel_acc, iou).

    iou[k] = TP / (TP + FP + FN) per class; a class absent from the labels and never predicted has
    no IoU (nan) and is left out of miou, the mean over the others. pixel_acc = trace / total.
    """
    conf = np.asarray(torch.as_tensor(conf).cpu(), dtype=np.float64)
    tp = np.diag(conf)
    union = conf.sum(0) + conf.sum(1) - tp
    with np.errstate(invalid='ignore', divide='ignore'):
        iou = np.where(union > 0, tp / union, np.nan)
    total = conf.sum()
    return dict(miou=mean_ap(iou), pixel_acc=float(tp.sum() / total) if total else float('nan'), iou=iou.tolist())


def linear_cka(x, y):
    """Linear CKA (Kornblith et al. 2019) between two representations of the same N samples.

    x: (N, D1), y: (N, D2), torch or numpy. Features are centred over samples; with Gram matrices
    K = X X^T and L = Y Y^T, CKA = <K, L>_F / (||K||_F ||L||_F) in [0, 1], computed in float64.
    1 for identical (or orthogonally transformed, or isotropically scaled) features; nan when one
    side is constant over the samples. Biased towards 1 over few samples: over N = 2 it is 1 for
    any features (centred, both Gram matrices are multiples of [[1, -1], [-1, 1]]).
    """
    x, y = (torch.as_tensor(np.asarray(v) if not torch.is_tensor(v) else v).double() for v in (x, y))
    if x.dim() != 2 or y.dim() != 2 or len(x) != len(y):
        raise ValueError(f'linear_cka needs (N, D) matrices with the same N, got {tuple(x.shape)} and {tuple(y.shape)}')
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T  # (N, N): cheap however wide the features are
    denom = (k.norm() * l.norm()).item()
    return (k * l).sum().item() / denom if denom > 0 else float('nan')


# --- Models -------------------------------------------------------------------------------------

class VOCClassifier(nn.Module):
    """Trunk -> global average pool of the deepest tap -> `classifier` Linear(C, 20): (B, C_in, H, W) -> (B, 20)."""

    def __init__(self, trunk, num_classes=20):
        super().__init__()
        self.trunk = trunk
        self.classifier = nn.Linear(trunk.tap_channels[-1], num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.constant_(self.classifier.bias, 0.1)  # as the protocol's code

    def forward(self, x):
        return self.classifier(self.trunk(x)[-1].mean((2, 3)))


def map_size_before(trunk, layer, size):
    """Side of the map that reaches `layer` of a VGG / AlexNet trunk for a size x size input."""
    for name, _ in trunk.steps:
        if name == layer:
            return size
        m = trunk._modules[name]
        if isinstance(m, ConvBN):
            m = m.conv
        if isinstance(m, (nn.Conv2d, nn.MaxPool2d)):
            k, s, p = (v if isinstance(v, int) else v[0] for v in (m.kernel_size, m.stride, m.padding))
            size = (size + 2 * p - k) // s + 1
        elif isinstance(m, nn.ZeroPad2d):
            size += m.padding[0] + m.padding[1]
    raise ValueError(f'no layer {layer!r} in the trunk')


def unpad_fc6(trunk, crop):
    """Classification: make fc6 unpadded, i.e. the protocol's fully connected fc6 on pool5.

    Pre-training runs fc6 as a padded conv (a map of the input's size / 32 for the hypercolumn).
    At a 224 crop VGG-16's pool5 is 7x7 and the unpadded 7x7 fc6 gives one cell, exactly the
    Linear(512*7*7, 4096) of the protocol's network (and of torchvision's, for an ImageNet init);
    AlexNet's 7x7 pool5 gives 2x2. Returns whether fc6 changed: a crop too small for the kernel
    (a CPU's 64) keeps the padded conv. ResNets have no fc6. The weights are the same either way.
    """
    fc6 = getattr(trunk, 'fc6', None)
    if fc6 is None:
        return False
    pad = getattr(trunk, 'pad6', None)  # AlexNet: fc6 is padded by a ZeroPad2d before it
    pool5 = map_size_before(trunk, 'fc6' if pad is None else 'pad6', crop)
    if pool5 < fc6.conv.kernel_size[0]:
        return False
    fc6.conv.padding = (0, 0)
    if pad is not None:
        pad.padding = (0, 0, 0, 0)
    return True


def build_transfer_model(task, arch, in_channels=1, width=1.0, fc_dim=4096, extended_fov=False,
                         head_dim=1024, dropout=0.5):
    """The BN-free network fine-tuned on VOC: VOCClassifier (cls) or HypercolumnNet(trunk, 21) (seg)."""
    trunk = MODELS[arch](in_channels=in_channels, batchnorm=False, extended_fov=extended_fov,
                         **trunk_kwargs(arch, width, fc_dim))
    if task == 'cls':
        if hasattr(trunk, 'fc_dropout'):  # AlexNet, VGG-16: dropout after fc6 and fc7
            trunk.fc_dropout.p = dropout
        return VOCClassifier(trunk)
    # The test's dense prediction tiles by the trunk's receptive field: a layer that receptive_field
    # does not know fails here, not after training.
    receptive_field(trunk)
    return HypercolumnNet(trunk, len(SEG_CLASSES), head_dim=head_dim, dropout=dropout)


def first_conv_name(trunk):
    """Name of the trunk's first convolution (the one that sees the input), e.g. 'conv1_1.conv'."""
    return next(name for name, m in trunk.named_modules() if isinstance(m, nn.Conv2d))


def _is_new_trunk_layer(name):
    """The extended-FOV layers (fov1, fov2): part of the trunk, but new at transfer, so they train."""
    return re.match(r'fov\d+$', name.split('.')[0]) is not None


def new_layer_keys(model):
    """Keys of `model` that no pre-trained trunk provides: the classifier / head and the fov layers."""
    return {k for k in model.state_dict() if not k.startswith('trunk.') or _is_new_trunk_layer(k[len('trunk.'):])}


def check_keys(missing, unexpected, expected_missing, source):
    """The explicit key assert of a transfer load: the missing keys must be exactly the expected, and no
    key may be unexpected."""
    missing, unexpected = set(missing), sorted(set(unexpected))
    if missing != set(expected_missing) or unexpected:
        wrong_missing = sorted(missing - set(expected_missing))
        not_missing = sorted(set(expected_missing) - missing)
        raise UserError(f'{source} does not fit the model: keys it lacks {wrong_missing[:4]} '
                        f'({len(wrong_missing)}), keys it has that the model does not {unexpected[:4]} '
                        f'({len(unexpected)}), new layers it unexpectedly provides {not_missing[:4]}; '
                        f'is it for this --arch and trunk?')


def gray_to_lab_state(state, trunk):
    """A gray-input model's state dict -> the same model with L*a*b* input, a* and b* starting at zero.

    The first conv gets zero weights for a*, b* (input channels 1, 2); a hypercolumn head that
    taps the input gets zero fc1 columns for them. The lab model then computes on lab_input
    exactly what the gray model computes on lightness_input.
    """
    state = OrderedDict(state)
    key = f'trunk.{first_conv_name(trunk)}.weight'
    w = state[key]  # (O, 1, k, k)
    state[key] = torch.cat([w, w.new_zeros(w.shape[0], 2, *w.shape[2:])], 1)  # (O, 3, k, k)
    if 'head.fc1.weight' in state and trunk.tap_input:
        w = state['head.fc1.weight']  # (hidden, hypercolumn): the input tap's columns come first
        state['head.fc1.weight'] = torch.cat([w[:, :1], w.new_zeros(w.shape[0], 2), w[:, 1:]], 1)
    return state


def make_finetune_model(task, arch, trunk_state, source, input_kind='gray', width=1.0, fc_dim=4096,
                        extended_fov=False, head_dim=1024, dropout=0.5, seed=0):
    """Transfer model with `trunk_state` (a BN-free 1-channel trunk's state_dict) loaded.

    The new layers are initialised from `seed` in a gray-input model, so gray and lab models start
    identical (see gray_to_lab_state). Raises UserError unless the keys left missing are exactly
    the new layers and no key is left over.
    """
    torch.manual_seed(seed)
    model = build_transfer_model(task, arch, 1, width, fc_dim, extended_fov, head_dim, dropout)
    state = {f'trunk.{k}': v for k, v in trunk_state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch: name the first one, no traceback
        detail = next((line.strip() for line in str(e).splitlines() if 'size mismatch' in line), str(e).splitlines()[0])
        raise UserError(f'{source} does not fit a {arch} trunk of width {width}: {detail}') from None
    check_keys(missing, unexpected, new_layer_keys(model), source)
    if input_kind == 'gray':
        return model
    lab_model = build_transfer_model(task, arch, 3, width, fc_dim, extended_fov, head_dim, dropout)
    lab_model.load_state_dict(gray_to_lab_state(model.state_dict(), model.trunk))
    return lab_model


# --- Initial weights ----------------------------------------------------------------------------

def read_weights(path):
    """torch.load a weights file safely (no code runs), with one-line errors."""
    return read_torch_file(path, f'--init {path}: no such file; pass a colorize.py checkpoint, "random", or a '
                                 f'torchvision state_dict file (ImageNet-supervised weights are not downloaded '
                                 f'here: where torchvision and the network are, torch.save(torchvision.models.'
                                 f'vgg16(weights="IMAGENET1K_V1").state_dict(), "imagenet_vgg16.pth"))',
                           f'--init {path}', 'is it a complete checkpoint or state_dict?')


def colorization_trunk(ckpt, source):
    """A colorize.py checkpoint dict -> (BN-folded 1-channel trunk state_dict, the checkpoint's config).

    The pre-training model is rebuilt from the checkpoint's config and loaded strictly, BatchNorm
    is folded with the running statistics, and the pre-training head is dropped: the colorization
    head (head.fc1, head.out), or the classifier layer (fc) of `colorize.py --objective classify`.
    """
    config = ckpt['config']
    objective = config.get('objective', 'colorize')
    if objective not in PRETRAINING_HEADS:
        raise UserError(f'{source} is a {objective} checkpoint (fine-tuned by this script), not a pre-training '
                        f'one; pass the checkpoint.pt written by colorize.py')
    try:
        model = make_colorization_model(config)
    except (KeyError, ValueError, RuntimeError) as e:
        raise UserError(f'{source}: its config describes no model ({config}): '
                        f'{type(e).__name__}: {str(e).splitlines()[0]}') from None
    try:
        missing, unexpected = model.load_state_dict(ckpt['model'], strict=False)
    except RuntimeError as e:  # same names, other shapes
        raise UserError(f'{source}: its weights do not fit the model its config describes ({config}): '
                        f'{load_mismatch(e, model, ckpt["model"])}') from None
    if missing or unexpected:
        raise UserError(f'{source}: its weights do not fit a {config["arch"]} {objective} model of width '
                        f'{config["width"]}: missing {sorted(missing)[:4]} ({len(missing)}), unexpected '
                        f'{sorted(unexpected)[:4]} ({len(unexpected)}); is it a complete colorize.py checkpoint?')
    state = fold_batchnorm(model.eval()).state_dict()
    head = sorted(k for k in state if not k.startswith('trunk.'))
    if head != PRETRAINING_HEADS[objective]:
        raise UserError(f'{source}: expected the {objective} head {PRETRAINING_HEADS[objective]} beside the '
                        f'trunk, found {head}')
    return OrderedDict((k[len('trunk.'):], v) for k, v in state.items() if k.startswith('trunk.')), config


# The keys beside `trunk.` in a colorize.py checkpoint, per --objective: dropped before transfer.
PRETRAINING_HEADS = {
    'colorize': ['head.fc1.bias', 'head.fc1.weight', 'head.out.bias', 'head.out.weight'],
    'classify': ['fc.bias', 'fc.weight'],
}


def random_trunk(arch, width, fc_dim, seed):
    """Kaiming-initialised (fan-out, zero biases; models.Trunk.init_weights) BN-free 1-channel trunk;
    a ResNet's residual branches start at zero (models._resnet)."""
    torch.manual_seed(seed)
    return MODELS[arch](in_channels=1, batchnorm=False, **trunk_kwargs(arch, width, fc_dim)).state_dict()


def initial_trunk(args, random_fc_dim=4096):
    """The trunk --init names, as (state_dict of a BN-free 1-channel trunk, info dict).

    Resolves args.arch, args.width, args.fc_dim from the source and checks them against the flags;
    `random_fc_dim` is the fc6/fc7 width of --init random without --fc-dim.
    """
    if args.init is None:
        raise UserError('--init is required: a colorize.py checkpoint (runs/<arch>-<loss>/checkpoint.pt), '
                        '"random", or a torchvision state_dict file')
    if args.init == 'random':
        args.arch = args.arch or 'vgg16'
        args.width = args.width or 1.0
        args.fc_dim = args.fc_dim or random_fc_dim
        return random_trunk(args.arch, args.width, args.fc_dim, args.seed), dict(kind='random')
    obj = read_weights(args.init)
    if isinstance(obj, dict) and 'model' in obj and 'config' in obj:
        wrong = checkpoint_fields_error(obj)
        if wrong:
            raise UserError(f'--init {args.init} is not a checkpoint as colorize.py writes them: {wrong}')
        refuse_diverged_weights(obj['model'], f'--init {args.init}')
        state, config = colorization_trunk(obj, f'--init {args.init}')
        resolve(args, 'arch', config['arch'], args.init)
        resolve(args, 'width', config['width'], args.init)
        resolve_fc_dim(args, config['fc_dim'])
        # colorize.py --objective classify trains the supervised baseline (RQ1) in the same format.
        kind = 'classification' if config.get('objective') == 'classify' else 'colorization'
        return state, dict(kind=kind, path=str(args.init), config=config, step=obj.get('step'),
                           pretraining=pretraining_data(obj))
    if isinstance(obj, dict) and all(torch.is_tensor(v) for v in obj.values()):
        refuse_diverged_weights(obj, f'--init {args.init}')
        state, arch = trunk_from_torchvision(obj, args.arch, f'--init {args.init}')
        conv1 = state[torchvision_key_map(arch)[0][0] + '.weight']
        width = conv1.shape[0] / 64
        resolve(args, 'arch', arch, args.init)
        resolve(args, 'width', width, args.init)
        fc = torchvision_key_map(arch)[-1][0] + '.weight' if has_fc(arch) else None
        resolve_fc_dim(args, state[fc].shape[0] if fc else 4096)
        return state, dict(kind='torchvision', path=str(args.init))
    raise UserError(f'--init {args.init} is neither a colorize.py checkpoint (a dict with "model" and "config") '
                    f'nor a state_dict of tensors')


def pretraining_data(ckpt):
    """What a colorize.py checkpoint was pre-trained on (RQ3), for results.json's init: --subset N,
    --classes K, --data and --seed as given, and the image list it trained on (count and sha1, the
    checkpoint's data.images: N images of a --subset N run). A table over N is then read from the
    fine-tuning runs themselves, not from a pre-training folder that may have been redone since."""
    given = ckpt.get('args') or {}
    info = {k: given.get(k) for k in ('subset', 'classes', 'data', 'seed')}
    info['images'] = (ckpt.get('data') or {}).get('images')
    return info


def weights_digest(state):
    """The first 16 hex digits of a sha256 over a state_dict's names, dtypes, shapes and values:
    which weights a run started from (a colorize.py checkpoint file is rewritten as its run goes on)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f'{name} {t.dtype} {tuple(state[name].shape)}\n'.encode())
        h.update(memoryview(t.view(torch.uint8).numpy()))  # bytes: bf16 has no numpy dtype
    return h.hexdigest()[:16]


def resumed_init(saved, current, args):
    """The init a resumed run started from (the checkpoint's record `saved`), checked against what
    --init holds now (`current`). Where the file's weights changed (its pre-training went on, say),
    the run goes on from its checkpoint with a note, unless it needs the initial weights after
    training (--freeze checks them, --feature-shift compares with them): then UserError."""
    if not saved:
        return current
    if 'digest' in saved or 'random_digest' in saved:
        key = 'digest' if 'digest' in saved else 'random_digest'
        unchanged = saved[key] == current.get(key)
    else:  # a checkpoint from before digests (and absolute paths): its step is what it recorded
        unchanged = saved.get('step') == current.get('step')
        saved = {**saved, 'path': current.get('path')}
    if unchanged:
        return current
    steps = (f' (pre-training step {saved["step"]} then, {current["step"]} now)'
             if saved.get('step') is not None and saved.get('step') != current.get('step') else '')
    if saved.get('kind') == 'random':
        why, back = ('--init random builds other weights than this run started from (the code changed since it '
                     'started)', 'check out the commit that started it')
    else:
        why, back = f'--init {args.init} no longer holds the weights this run started from{steps}', 'put that file back'
    if args.freeze:
        raise UserError(f'{why}; --freeze checks the initial weights after training: {back}, or start a new run')
    if args.feature_shift:
        raise UserError(f'{why}; --feature-shift compares with the initial weights after training: {back}, or '
                        f'resume with --no-feature-shift')
    print(f'note: {why}; the run goes on from its checkpoint, and results.json names the init it started from')
    return saved


def resolve_fc_dim(args, value):
    """--fc-dim from the --init source (after its arch): checked where the trunk has fc6/fc7; for another
    trunk a typed --fc-dim changes nothing, so it gets warn_unread_fc_dim's warning, not a contradiction."""
    if has_fc(args.arch):
        resolve(args, 'fc_dim', value, args.init)
    else:
        args.fc_dim = value


def resolve(args, name, value, source):
    """Take a model property from the --init source; a flag that says otherwise is an error."""
    given = getattr(args, name)
    if given is not None and given != value and not (isinstance(value, float) and math.isclose(given, value)):
        raise UserError(f'{flag_name(name)} {given} contradicts {source}, which has {value}; '
                        f'omit the flag or pass {value}')
    setattr(args, name, value)


# --- torchvision export and import --------------------------------------------------------------

def _resnet_blocks(arch):
    """Our bottleneck names by stage, in order: {2: ('res2a', 'res2b', 'res2c'), 3: (...), ...}; {} for a
    trunk without bottlenecks (AlexNet, VGG-16)."""
    return dict(_bottleneck_stages(MODELS[arch]))


@functools.lru_cache(maxsize=None)
def _bottleneck_stages(factory):
    with torch.device('meta'):  # names only: nothing is allocated
        trunk = factory(in_channels=1, width=1 / 64, batchnorm=False)
    stages = {}
    for name, module in trunk.named_children():
        if isinstance(module, Bottleneck):
            stages.setdefault(int(name[3]), []).append(name)
    return {stage: tuple(names) for stage, names in stages.items()}


def torchvision_key_map(arch):
    """[(our module, torchvision module(s), kind)] for arch's trunk, first conv first.

    kind 'conv': conv with bias <-> conv with bias; ('fc', k): our k x k conv <-> torchvision's
    Linear (weight reshaped, flattening order (C, k, k) as after torchvision's avgpool + flatten);
    'conv_bn': our conv with bias <-> torchvision's bias-free conv + BatchNorm (a pair of names).
    """
    if arch == 'vgg16':
        names = ['conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
                 'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3']
        index = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
        return ([(f'{n}.conv', f'features.{i}', 'conv') for n, i in zip(names, index)]
                + [('fc6.conv', 'classifier.0', ('fc', 7)), ('fc7.conv', 'classifier.3', ('fc', 1))])
    if arch == 'alexnet':
        return ([(f'{n}.conv', f'features.{i}', 'conv') for n, i in zip(['conv1', 'conv2', 'conv3', 'conv4', 'conv5'],
                                                                       [0, 3, 6, 8, 10])]
                + [('fc6.conv', 'classifier.1', ('fc', 6)), ('fc7.conv', 'classifier.4', ('fc', 1))])
    stages = _resnet_blocks(arch)  # any ResNet of models.py's _resnet: torchvision's layout, other depths alike
    if stages:
        entries = [('conv1.conv', ('conv1', 'bn1'), 'conv_bn')]
        for stage, blocks in stages.items():
            for i, block in enumerate(blocks):
                tv = f'layer{stage - 1}.{i}'
                for k, branch in enumerate(['branch2a', 'branch2b', 'branch2c'], 1):
                    entries.append((f'{block}.{branch}.conv', (f'{tv}.conv{k}', f'{tv}.bn{k}'), 'conv_bn'))
                if i == 0:  # the projection shortcut
                    entries.append((f'{block}.branch1.conv', (f'{tv}.downsample.0', f'{tv}.downsample.1'), 'conv_bn'))
        return entries
    raise ValueError(f'no torchvision key map for {arch!r}: there is one for alexnet, vgg16 and the ResNets '
                     f'(models._resnet); write its entries in torchvision_key_map')


def torchvision_final(arch):
    """The name of torchvision's final 1000-way layer, which the trunk leaves out."""
    return 'classifier.6' if arch in ('alexnet', 'vgg16') else 'fc'


def torchvision_keys(arch):
    """The trunk keys torchvision's model has (all but the final 1000-way layer), in order."""
    keys = []
    for _, tv, kind in torchvision_key_map(arch):
        if kind == 'conv_bn':
            keys += [f'{tv[0]}.weight'] + [f'{tv[1]}.{s}' for s in
                                           ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')]
        else:
            keys += [f'{tv}.weight', f'{tv}.bias']
    return keys


def _light_consts(device, dtype):
    k = torch.tensor(L_FROM_RGB, dtype=dtype, device=device)
    mean = torch.tensor(IMAGENET_MEAN, dtype=dtype, device=device)
    return k[0], k[1:], mean, torch.tensor(IMAGENET_STD, dtype=dtype, device=device)


def rgb_conv_from_lightness(weight, bias):
    """Our conv1 on u = (L - 50) / 50 -> the conv on torchvision's input x_c = (rgb_c - mean_c) / std_c.

    With L ~ k0 + sum_c k_c rgb_c (L_FROM_RGB): u = (k0 - 50 + sum_c k_c mean_c) / 50 + sum_c
    (k_c std_c / 50) x_c, so W_c = W k_c std_c / 50 and b' = b + sum(W) (k0 - 50 + sum_c k_c mean_c) / 50.
    weight (O, 1, k, k), bias (O,) -> (O, 3, k, k), (O,). Exact away from the border only: zero
    padding means L = 50 for us, RGB = the ImageNet mean for torchvision (L* 49.3; 54.1 by
    L_FROM_RGB, which is what the folded conv1 sees).
    """
    k0, k, mean, std = _light_consts(weight.device, weight.dtype)
    w = weight * (k * std / 50).view(1, 3, 1, 1)  # (O, 1, k, k) -> (O, 3, k, k)
    b = bias + weight.sum((1, 2, 3)) * (k0 - 50 + (k * mean).sum()) / 50
    return w, b


def lightness_conv_from_rgb(weight, bias):
    """torchvision's conv1 on normalised RGB -> ours on (L - 50) / 50; the inverse of rgb_conv_from_lightness.

    A gray pixel has rgb_c = g for all c, and L ~ k0 + K g (K = sum_c k_c), so x_c = (50 u + 50 -
    k0) / (K std_c) - mean_c / std_c: W = (50 / K) sum_c W_c / std_c, b' = b + sum_c sum(W_c)
    ((50 - k0) / K - mean_c) / std_c. weight (O, 3, k, k) -> (O, 1, k, k). Colour enters through
    the lightness only: --input lab then starts a*, b* at zero like every init.
    """
    k0, k, mean, std = _light_consts(weight.device, weight.dtype)
    total = k.sum()
    w = (weight / std.view(1, 3, 1, 1)).sum(1, keepdim=True) * (50 / total)  # (O, 3, k, k) -> (O, 1, k, k)
    b = bias + (weight.sum((2, 3)) * (((50 - k0) / total - mean) / std)).sum(1)
    return w, b


def export_torchvision(trunk_state, arch):
    """Our BN-free 1-channel trunk state_dict -> a state_dict that torchvision's `arch()` loads.

    Names and shapes are torchvision's; the final 1000-way layer is absent, so
    `torchvision.models.vgg16().load_state_dict(sd, strict=False)` reports exactly
    classifier.6.weight and classifier.6.bias missing (resnet: fc.weight, fc.bias). The network
    takes RGB in [0, 1] normalised with the ImageNet mean/std: conv1 folds the affine RGB -> L*
    approximation L_FROM_RGB (see rgb_conv_from_lightness). ResNet convs have no bias in
    torchvision: each folded bias b goes to the BatchNorm after it as weight 1, bias b, running
    mean 0, running variance 1 - eps (so that var + eps = 1). Notes: torchvision's AlexNet conv1
    pads 2 where ours pads 5, so its conv1 grid is shifted by 3 pixels; torchvision's fc6 sees
    pool5 adaptively pooled to 7x7 (VGG) / 6x6 (AlexNet) where ours is a convolution.
    Works on meta tensors (shapes only).
    """
    key_map = torchvision_key_map(arch)
    expected = {f'{ours}.{s}' for ours, _, _ in key_map for s in ('weight', 'bias')}
    if set(trunk_state) != expected:
        raise UserError(f'the trunk does not match torchvision {arch}: '
                        f'missing {sorted(expected - set(trunk_state))[:4]}, '
                        f'unexpected {sorted(set(trunk_state) - expected)[:4]} (an --extended-fov or BatchNorm trunk?)')
    out = OrderedDict()
    for i, (ours, tv, kind) in enumerate(key_map):
        w, b = trunk_state[f'{ours}.weight'], trunk_state[f'{ours}.bias']
        if i == 0:
            if w.shape[1] != 1:
                raise UserError(f'export expects a lightness (1-channel) conv1, found {w.shape[1]} input channels')
            w, b = rgb_conv_from_lightness(w, b)
        if kind == 'conv_bn':
            out[f'{tv[0]}.weight'] = w
            out[f'{tv[1]}.weight'] = torch.ones_like(b)
            out[f'{tv[1]}.bias'] = b
            out[f'{tv[1]}.running_mean'] = torch.zeros_like(b)
            out[f'{tv[1]}.running_var'] = torch.full_like(b, 1 - TORCHVISION_BN_EPS)
            out[f'{tv[1]}.num_batches_tracked'] = torch.zeros((), dtype=torch.long, device=b.device)
        else:
            out[f'{tv}.weight'] = w.reshape(w.shape[0], -1) if kind != 'conv' else w  # (O, C, k, k) -> (O, C*k*k)
            out[f'{tv}.bias'] = b
    return out


def trunk_from_torchvision(sd, arch=None, source='state_dict'):
    """A torchvision state_dict (alexnet, vgg16, a ResNet of MODELS) -> (our BN-free 1-channel trunk state, arch).

    The inverse of export_torchvision: BatchNorm folded into the convs, Linear fc6/fc7 reshaped to
    convs, the RGB conv1 turned into a lightness conv1 (lightness_conv_from_rgb). The keys must be
    exactly torchvision's (num_batches_tracked and the final 1000-way layer may be absent).
    """
    if sd and all(k.startswith('module.') for k in sd):  # saved from DataParallel / DDP
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    detected = detect_torchvision_arch(sd, source)
    if arch is not None and arch != detected:
        raise UserError(f'{source} holds torchvision {detected} weights, but -a {arch} was given; '
                        f'omit -a or pass {detected}')
    final = torchvision_final(detected)
    required = [k for k in torchvision_keys(detected) if not k.endswith('num_batches_tracked')]
    optional = ({k for k in torchvision_keys(detected) if k.endswith('num_batches_tracked')}
                | {f'{final}.weight', f'{final}.bias'})
    missing, unexpected = sorted(set(required) - set(sd)), sorted(set(sd) - set(required) - optional)
    if missing or unexpected:
        raise UserError(f'{source} is not a torchvision {detected} state_dict: missing {missing[:4]} ({len(missing)}), '
                        f'unexpected {unexpected[:4]} ({len(unexpected)})')
    state = OrderedDict()
    for i, (ours, tv, kind) in enumerate(torchvision_key_map(detected)):
        if kind == 'conv_bn':
            w = sd[f'{tv[0]}.weight'].float()
            bn = {s: sd[f'{tv[1]}.{s}'].float() for s in ('weight', 'bias', 'running_mean', 'running_var')}
            scale = bn['weight'] / torch.sqrt(bn['running_var'] + TORCHVISION_BN_EPS)
            w, b = w * scale.view(-1, 1, 1, 1), bn['bias'] - bn['running_mean'] * scale
        else:
            w, b = sd[f'{tv}.weight'].float(), sd[f'{tv}.bias'].float()
            if kind != 'conv':
                k = kind[1]
                w = w.reshape(w.shape[0], -1, k, k)  # (O, C*k*k) -> (O, C, k, k)
        if i == 0:
            if w.shape[1] != 3:
                raise UserError(f'{source}: conv1 has {w.shape[1]} input channels, expected RGB (3)')
            w, b = lightness_conv_from_rgb(w, b)
        state[f'{ours}.weight'], state[f'{ours}.bias'] = w.contiguous(), b.contiguous()
    return state, detected


def detect_torchvision_arch(sd, source):
    if 'layer4.0.conv1.weight' in sd:
        blocks = tuple(len({k.split('.')[1] for k in sd if k.startswith(f'layer{i}.')}) for i in (1, 2, 3, 4))
        resnets = {}  # blocks per stage -> arch, for the ResNets of MODELS
        for arch in MODELS:
            stages = _resnet_blocks(arch)
            if stages:
                resnets[tuple(len(names) for names in stages.values())] = arch
        if blocks not in resnets:
            known = ', '.join(f'{arch} {list(b)}' for b, arch in resnets.items())
            raise UserError(f'{source}: a ResNet with {list(blocks)} blocks in layer1..4; models.py has {known}')
        return resnets[blocks]
    if 'features.28.weight' in sd:
        return 'vgg16'
    if 'features.10.weight' in sd and 'classifier.1.weight' in sd:
        return 'alexnet'
    raise UserError(f'{source} is neither a colorize.py checkpoint nor a torchvision {"/".join(sorted(MODELS))} '
                    f'state_dict (first keys: {list(sd)[:3]})')


def export(args):
    """--export PATH --init CKPT: write the trunk as a torchvision state_dict."""
    state, info = initial_trunk(args)
    warn_unread_fc_dim(args)
    sd = export_torchvision(state, args.arch)
    args.export.parent.mkdir(parents=True, exist_ok=True)
    atomic_save(sd, args.export)
    final = torchvision_final(args.arch)
    # torchvision's networks are full width, with 4096-channel fc6/fc7 (AlexNet, VGG-16).
    off = [f'width {args.width:g} (torchvision: 1)'] if args.width != 1.0 else []
    if has_fc(args.arch) and args.fc_dim != 4096:
        off.append(f'fc6/fc7 with {args.fc_dim} channels (torchvision: 4096)')
    loads = (f'torchvision.models.{args.arch}().load_state_dict(torch.load(PATH, weights_only=True), strict=False) '
             f'leaves exactly {final}.weight, {final}.bias missing' if not off else
             f'NOT loadable by torchvision.models.{args.arch}(): {" and ".join(off)}; the names are its own, so a '
             f'network built with these sizes loads it')
    # Folded: the BatchNorm of colorize.py's trunks and of torchvision's ResNets ('conv_bn'); a random trunk is
    # made without, and torchvision's AlexNet and VGG-16 have none.
    folded = info['kind'] in ('colorization', 'classification') or info['kind'] == 'torchvision' and any(
        kind == 'conv_bn' for _, _, kind in torchvision_key_map(args.arch))
    print(f'wrote {args.export} ({info["kind"]} init, {"BatchNorm folded" if folded else "no BatchNorm to fold"}): '
          f'{loads}. Input: RGB in [0, 1] normalised with mean {IMAGENET_MEAN}, std {IMAGENET_STD}; conv1 folds '
          f'L* ~ {L_FROM_RGB[0]:.2f} + {L_FROM_RGB[1]:.2f} R + {L_FROM_RGB[2]:.2f} G + {L_FROM_RGB[3]:.2f} B.')


# --- Data ---------------------------------------------------------------------------------------

def random_scale_crop(rgb, label, crop, scale, rng, flip=True):
    """Scale the image by U[scale], pad to at least crop, random crop, flip.

    The padding is the protocol's zero padding of the network input: mid grey (L* = 50, a* = b* = 0,
    lab.GRAY_SRGB8), which the network sees as 0, as its own convolutions' padding; labels pad with 255.

    rgb uint8 (H, W, 3), label uint8 (H, W) or None -> uint8 (crop, crop, 3), (crop, crop) or None.
    An image smaller than the crop lands at a random place in it. Always the same number of draws.
    """
    s = rng.uniform(*scale)
    u_y, u_x, u_flip = rng.random(3)
    H, W = rgb.shape[:2]
    h, w = max(1, round(H * s)), max(1, round(W * s))
    out = np.full((crop, crop, 3), lab.GRAY_SRGB8, np.uint8)
    out_label = np.full((crop, crop), IGNORE, np.uint8)
    (src_y, dst_y, n_y), (src_x, dst_x, n_x) = (_crop_window(size, crop, u) for size, u in ((h, u_y), (w, u_x)))
    # Only the window is resampled (bilinear as Pillow's whole resize, within 2 levels): at s = 2 a whole
    # VOC image would be 1000 x 750, several ms per crop, ten crops per test image.
    out[dst_y:dst_y + n_y, dst_x:dst_x + n_x] = data.resized_window(rgb, (h, w), src_y, src_x, n_y, n_x)
    if label is not None:
        if (h, w) != (H, W):  # class indices: nearest, no blending
            label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        out_label[dst_y:dst_y + n_y, dst_x:dst_x + n_x] = label[src_y:src_y + n_y, src_x:src_x + n_x]
    if flip and u_flip < 0.5:
        out, out_label = data.mirror(out), out_label[:, ::-1]
    return np.ascontiguousarray(out), (np.ascontiguousarray(out_label) if label is not None else None)


def _crop_window(size, crop, u):
    """(source start, destination start, length) along one axis for a random crop at u in [0, 1)."""
    if size >= crop:
        return int(u * (size - crop + 1)), 0, crop
    return 0, int(u * (crop - size + 1)), size


def _load(path):
    """A VOC image as stored: its masks index the stored pixels, whatever an EXIF tag says."""
    try:
        return data.load_rgb(path, exif_orientation=False)
    except data.BadImage as e:
        raise UserError(f'cannot read VOC image {e}; re-extract the dataset') from None


def mask_size_error(image_path, image_size, label_path, label_size):
    """The UserError of a mask whose (width, height) is not its image's."""
    return UserError(f'{label_path} is {label_size[0]}x{label_size[1]} but {image_path} is '
                     f'{image_size[0]}x{image_size[1]}; labels must match their images')


def _load_label(path):
    """A VOC mask (data.load_label); a truncated or broken one, or one with a value that is no class
    (0..20) and not void (255), is a UserError naming it. Such a value made an IndexError in the loss
    (a device-side assert on CUDA), or in the test's confusion matrix after training."""
    try:
        label = data.load_label(path)
    except ValueError as e:  # BadImage: missing, truncated, not an image, another mode
        raise UserError(f'cannot read VOC mask {e}; re-extract the dataset') from None
    wrong = np.unique(label[(label > len(data.VOC_CLASSES)) & (label != IGNORE)])
    if wrong.size:
        raise UserError(f'VOC mask {path} holds {"values" if wrong.size > 1 else "value"} '
                        f'{", ".join(map(str, wrong[:5].tolist()))}{", ..." if wrong.size > 5 else ""}, where a '
                        f'mask holds class indices 0..{len(data.VOC_CLASSES)} and {IGNORE} (void): map them to those')
    return label


def _header_size(path):
    """(width, height) from the file's header; UserError naming the file if it cannot be read."""
    try:
        with data.decoding(path), Image.open(path) as im:
            return im.size
    except data.BadImage as e:  # missing, not an image, a header cut short (struct.error, OSError, ...)
        raise UserError(f'cannot read VOC image or mask {e}; re-extract the dataset') from None


def check_label_sizes(pairs):
    """Each (image, mask) pair's sizes, read from the file headers: a mask that does not match its
    image is an error now, not in a worker mid-training or at the test after it. (A mask truncated
    past its header is found when it is read: _load_label.)"""
    for image_path, label_path in pairs:
        image_size, label_size = _header_size(image_path), _header_size(label_path)
        if image_size != label_size:
            raise mask_size_error(image_path, image_size, label_path, label_size)


class VOCClassification(torch.utils.data.Dataset):
    """VOC2007 images with their 20 labels, decoded and augmented in workers; uint8 out.

    views=None (training): dataset[(index, sample_seed)] -> (uint8 (3, crop, crop), int8 (20,)).
    views=V (test): dataset[index] -> (uint8 (V, 3, crop, crop), int8 (20,)), V random crops drawn
    with a seed fixed per image (EVAL_SEED and `ids[index]`, the image's place in the whole test split,
    default its place here), the same in every run, --test-images or not.
    """

    def __init__(self, paths, labels, crop, scale, views=None, ids=None):
        self.paths, self.labels = list(paths), torch.from_numpy(labels)
        self.crop, self.scale, self.views = crop, scale, views
        self.ids = list(range(len(self.paths))) if ids is None else list(ids)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, item):
        index, seed = item if self.views is None else (item, (EVAL_SEED, self.ids[item]))
        rgb = _load(self.paths[index])
        rng = np.random.default_rng(seed)
        crops = [random_scale_crop(rgb, None, self.crop, self.scale, rng)[0] for _ in range(self.views or 1)]
        x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)  # (V, crop, crop, 3) -> (V, 3, crop, crop)
        return (x[0] if self.views is None else x), self.labels[index]


class VOCSegmentation(torch.utils.data.Dataset):
    """VOC2012 (image, label) pairs.

    train=True: dataset[(index, sample_seed)] -> (uint8 (3, crop, crop), uint8 (crop, crop)),
    random scale in `scale` = (lo, hi) (the script's default (1, 1): none), crop (image padded with mid grey,
    label with 255) and flip.
    train=False: dataset[index] -> the whole image uint8 (3, H, W) and its label uint8 (H, W).
    """

    def __init__(self, pairs, crop=None, scale=None, train=True):
        self.pairs, self.crop, self.scale, self.train = list(pairs), crop, scale, train

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, item):
        index, seed = item if self.train else (item, None)
        image_path, label_path = self.pairs[index]
        rgb, label = _load(image_path), _load_label(label_path)
        if rgb.shape[:2] != label.shape:
            raise mask_size_error(image_path, rgb.shape[1::-1], label_path, label.shape[::-1])
        if self.train:
            rgb, label = random_scale_crop(rgb, label, self.crop, self.scale, np.random.default_rng(seed))
        image = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
        return image, torch.from_numpy(np.ascontiguousarray(label))


def voc_sets(args):
    """(training set, test set, test ids) for the task, after --label-fraction and --test-images; the
    ids are the test images' places in the whole --test-split (their crops' seeds); UserError for
    missing data."""
    root = _voc_root(args)
    train, test = _read_voc_splits(args, root)
    _check_voc_sets(args, train, test)
    if args.label_fraction is not None:
        train = _label_fraction_share(args, train)
    test, test_ids = _test_images_share(args, test)
    if len(train) < args.batch_size:
        raise UserError(f'{len(train)} training images are fewer than one batch of {args.batch_size}; '
                        f'use a smaller --batch-size or a larger --label-fraction')
    return train, test, test_ids


def _voc_root(args):
    """--voc-root, or without it the demo world's VOCdevkit at --demo-root (generated on first use)."""
    if args.voc_root is not None:
        return args.voc_root
    try:
        demo = data.ensure_demo(args.demo_root)
    except ValueError as e:
        raise UserError(str(e)) from None
    root = os.path.join(demo['root'], 'VOCdevkit')
    print(f"no --voc-root given: using the demo world's VOC-layout set in {root} (generated on first use)")
    return root


def _read_voc_splits(args, root):
    """(training items, test items) of --train-split and --test-split in the devkit `root`: (path, int8 (20,)
    labels) for cls, (image path, label path) for seg. For seg without --train-split, args.train_split
    becomes train_aug where SBD is there, else train (with a warning where only half of SBD is)."""
    try:
        if args.task == 'cls':
            train_paths, train_labels = data.voc_classification(root, args.train_split)
            test_paths, test_labels = data.voc_classification(root, args.test_split)
            return list(zip(train_paths, train_labels)), list(zip(test_paths, test_labels))
        if args.train_split is None:  # the protocol: train + SBD (10,582 images) when it is there
            args.train_split = 'train_aug' if data.has_train_aug(root) else 'train'
            half = data.train_aug_half_there(root)
            if half:
                print(f'warning: {half}; training on train (a seventh of its images), not train_aug: put '
                      f'both there, or pass --train-split train to silence this')
        return data.voc_segmentation(root, args.train_split), data.voc_segmentation(root, args.test_split)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None


def _check_voc_sets(args, train, test):
    """UserError, before any training, for listed images that are not there, splits that share images,
    or (seg) a mask of another size than its image."""
    missing = [p for p, _ in train + test if not os.path.exists(p)]
    if missing:
        raise UserError(f'{len(missing)} images listed in the VOC sets are missing, e.g. {missing[0]}; '
                        f'extract JPEGImages completely')
    shared = {p for p, _ in train} & {p for p, _ in test}
    if shared:
        raise UserError(f'--train-split {args.train_split} and --test-split {args.test_split} share {len(shared)} '
                        f'images (e.g. {min(shared)}): testing on training images would inflate the figures; '
                        f'choose splits that do not overlap (the protocol: trainval/test for cls, train/val or '
                        f'train_aug/val for seg)')
    if args.task == 'seg':
        check_label_sizes(train + test)


def _label_fraction_share(args, train):
    """The --label-fraction share of the training items (RQ3), drawn by --label-seed alone (so that runs of
    other seeds train on the same images), in the listing's order; for cls, a warning naming the classes
    left without a positive image."""
    n = max(1, round(args.label_fraction * len(train)))
    keep = set(data.subset(range(len(train)), n, seed=args.label_seed))
    train = [train[i] for i in sorted(keep)]
    if args.task == 'cls':  # a random share, not stratified: a small one can miss a class entirely
        absent = [c for c, k in zip(data.VOC_CLASSES, np.stack([y for _, y in train]).T) if not (k == 1).any()]
        if absent:
            print(f'warning: --label-fraction {args.label_fraction:g} (a random share of the images, not '
                  f'stratified by class) left {len(absent)} class(es) without a positive training image: '
                  f'{", ".join(absent)}; their test AP measures nothing learnt from labels')
    return train


def _test_images_share(args, test):
    """(test items, their places in the whole test split): --test-images of them drawn by EVAL_SEED, in the
    listing's order, or all of them."""
    if 0 < args.test_images < len(test):
        print(f'evaluating on {args.test_images} of the {len(test)} {args.test_split} images (--test-images; '
              f'0 = all, as the paper)')
        test_ids = sorted(data.subset(range(len(test)), args.test_images, seed=EVAL_SEED))
        return [test[i] for i in test_ids], test_ids
    return test, list(range(len(test)))


def _paths_and_labels(items):
    """[(path, int8 (20,) labels)] -> (paths, int8 (N, 20)), as VOCClassification takes them."""
    return [p for p, _ in items], np.stack([labels for _, labels in items]).astype(np.int8)  # (N, 20)


def make_datasets(args, train, test, test_ids):
    """(training dataset, test dataset) of the task from voc_sets' items: VOCClassification (the test with
    --test-crops views per image, seeded by `test_ids`) or VOCSegmentation (the test on whole images)."""
    if args.task == 'cls':
        return (VOCClassification(*_paths_and_labels(train), args.crop, tuple(args.scale)),
                VOCClassification(*_paths_and_labels(test), args.crop, tuple(args.scale), views=args.test_crops,
                                  ids=test_ids))
    return (VOCSegmentation(train, args.crop, tuple(args.scale), train=True), VOCSegmentation(test, train=False))


def network_input(images, input_kind, device):
    """uint8 RGB (..., 3, H, W) -> the network input on `device`: lab (3 channels) or gray (1)."""
    lab_img = lab.rgb_to_lab(images.to(device, non_blocking=True))
    x = lab.lab_input(lab_img) if input_kind == 'lab' else lab.lightness_input(lab_img)
    return x.contiguous(memory_format=torch.channels_last) if device.type == 'cuda' and x.dim() == 4 else x


# --- Training -----------------------------------------------------------------------------------

def train_loss(model, batch, args, device):
    """The task's loss on one training batch (a scalar tensor)."""
    images, target = batch
    x = network_input(images, args.input, device)
    target = target.to(device, non_blocking=True)
    if args.task == 'cls':
        with autocast(device):
            logits = model(x)
        return multilabel_loss(logits.float(), target)
    points = sample_labelled_points(target, args.points)  # (B, P, 2)
    labels = target.long()[torch.arange(len(target), device=device)[:, None], points[..., 0], points[..., 1]]  # (B, P)
    with autocast(device):
        logits = model(x, points)  # (B, P, 21)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),  # (B*P, 21), (B*P,)
                           ignore_index=IGNORE, reduction='sum')
    return loss / (labels != IGNORE).sum().clamp(min=1)


def sample_labelled_points(labels, count):
    """`count` pixels per image, uniform without replacement among those with a label (not 255).

    labels: (B, H, W) integer class maps on the device -> (B, count, 2) int64 (y, x). Padding and void
    outlines are 255, often a sixth of a crop: sampling them would waste points. An image with fewer
    labelled pixels than `count` gets all of them, topped up with unlabelled ones (ignored by the
    loss). Random keys plus a top-k: no host sync, unlike torch.multinomial's checks.
    """
    B, H, W = labels.shape
    keys = torch.rand(B, H * W, device=labels.device) + (labels.reshape(B, H * W) != IGNORE)  # labelled: [1, 2)
    index = keys.topk(count, dim=1, sorted=False).indices  # (B, count)
    return torch.stack([index // W, index % W], dim=-1)


def set_train_mode(model, freeze):
    model.train()
    if freeze:  # frozen features: no dropout inside the pre-trained trunk either
        for name, module in model.trunk.named_children():
            if not _is_new_trunk_layer(name):
                module.eval()
    return model


def freeze_pretrained(model):
    """--freeze: no gradient for the pre-trained trunk; the new layers (head, fov) still train."""
    for name, p in model.trunk.named_parameters():
        p.requires_grad_(_is_new_trunk_layer(name))


def save_checkpoint(path, model, optimizer, step, args, init_info, progress=None):
    """One dict, written to a temp file and renamed (a crash mid-write never corrupts the last one)."""
    config = dict(objective=f'voc-{args.task}', task=args.task, arch=args.arch, width=args.width, fc_dim=args.fc_dim,
                  input=args.input, extended_fov=args.extended_fov, head_dim=args.head_dim)
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step, config=config,
                 args=plain_args(args), init=init_info, progress=progress, rng=rng_state())
    atomic_save(state, path)


def read_resume(args):
    """Load the --resume checkpoint; the flags not given come from it (RUN_FLAGS, SCHEDULE_FLAGS)."""
    if args.resume == 'auto' and args.out is None:
        raise UserError('--resume needs --out DIR (the run folder) or the checkpoint path: --resume CKPT')
    path = args.out / 'checkpoint.pt' if args.resume == 'auto' else Path(args.resume)
    args.out = args.out or path.parent
    if path.is_dir() and (path / 'checkpoint.pt').is_file():  # the run folder, for its checkpoint
        raise UserError(f'--resume {path} is a run folder, not a checkpoint file: continue it with '
                        f'{resume_flags(path)}')
    if not path.exists():
        raise UserError(f'--resume: {path} does not exist; start the run without --resume (or pass --out of a run)')
    ckpt = load_checkpoint(path)  # a folder, a FIFO, a device: read_torch_file says what it is
    if not str(ckpt.get('config', {}).get('objective', '')).startswith('voc-'):
        raise UserError(f'--resume {path} is not a finetune_voc.py checkpoint; pass it as --init instead')
    if not isinstance(ckpt.get('optimizer'), dict):  # a copy stripped to its weights, say
        raise UserError(f'--resume {path} is a finetune_voc.py checkpoint without its training state (its optimizer): '
                        f'it cannot be continued')
    saved = absolute_paths({**LEGACY_ARGS, **ckpt['args']}, PATH_FLAGS, keywords=('random',))
    changed = merge_resumed_args(args, saved, RUN_FLAGS, SCHEDULE_FLAGS, path, must_exist=('init', 'voc_root'))
    refuse_fewer_steps(args.steps, ckpt['step'], path)
    resume_intervals(args, saved, STEP_INTERVALS, derive_intervals, print)
    note_moved_lr(args, saved, ckpt['step'], lr_at, print)
    # The commit that trained the steps before this one (None: a checkpoint from before 2026-11-27 did
    # not say): results.json's git_commit is only the last part's, and a git pull may come between.
    args.resumptions = saved.get('resumptions', []) + [dict(step=ckpt['step'], changed=changed,
                                                            trained_by=saved.get('git_commit'))]
    note_other_commit(saved.get('git_commit'), args.git_commit, ckpt['step'])
    args.resume_path = path
    return ckpt


def make_loader(dataset, args, device, start_step):
    sampler = data.InfiniteSampler(len(dataset), args.batch_size, seed=args.seed, start_step=start_step,
                                   stop_step=args.steps)  # no reads of steps that will not run
    return data.SigintDeferredLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
        pin_memory=device.type == 'cuda', drop_last=True, persistent_workers=args.workers > 0,
        **worker_options(args.workers))


def train(model, train_set, args, device, init_info, ckpt=None):
    """SGD on the task loss from the checkpoint's step (or 0) to --steps; returns the step reached."""
    optimizer = torch.optim.SGD(parameter_groups(model, args.weight_decay), lr=args.lr, momentum=args.momentum)
    lr_mults = (1.0, args.bias_lr_mult)  # of parameter_groups' two groups: weights, then biases
    start = 0
    if ckpt is not None:
        load_model_state(model, ckpt['model'], args.resume_path)
        load_optimizer_state(optimizer, ckpt['optimizer'], args)
        start = ckpt['step']
        print(f'resumed from {args.resume_path} at step {start}')
    fast_model = torch.compile(model) if args.compile else model
    trainable = [p for group in optimizer.param_groups for p in group['params']]
    if start:
        trim_log(args.out / 'log.jsonl', start)  # the lines the killed run wrote after its checkpoint
    progress, step = Progress(args.batch_size), start
    saved = args.resume_path if ckpt is not None else None  # the run's latest checkpoint (its step: saved_step)
    saved_step = start
    if ckpt is not None:
        progress.restore(ckpt.get('progress'), device)
    set_train_mode(model, args.freeze)
    loader = make_loader(train_set, args, device, start) if start < args.steps else []
    if args.compile and start < args.steps:
        print(COMPILE_NOTE, flush=True)
    # A fresh run starts a fresh log. SIGTERM or SIGUSR1 (StopSignals): save after the step and stop.
    with open(args.out / 'log.jsonl', 'a' if start else 'w') as log, StopSignals(device) as stop:
        for batch in data.watch_stalls(loader):
            if step >= args.steps:
                break
            torch.manual_seed(step_seed(args.seed, step, 0))  # pixels and dropout: a function of (seed, step)
            for group, mult in zip(optimizer.param_groups, lr_mults):
                group['lr'] = lr_at(step, args) * mult
            loss = train_loss(fast_model, batch, args, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip_grad > 0:
                torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad)
            optimizer.step()
            step += 1
            progress.add(loss.reshape(1))
            if step % args.log_every == 0 or step == args.steps:
                (mean,), rate = progress.take()
                problem = diverged([mean], step, lr_at(step - 1, args))
                if problem:
                    raise UserError(problem)
                entry = dict(step=step, loss=mean, lr=lr_at(step - 1, args), img_per_s=rate,
                             peak_mem_gb=peak_memory_gb(device))
                print(progress_line(entry, args.steps, args.batch_size), flush=True)
                log_line(log, entry)
            exit_now = stop.agreed(step) or (args.exit_after is not None and step >= args.exit_after)
            if step % args.save_every == 0 or step == args.steps or exit_now:
                # The run folder still there (not made anew without its log), the loss finite since the last
                # progress line and the weights finite: else stop, and the last good checkpoint stays.
                window = checked_window(log, args.out / 'log.jsonl', progress, step, lr_at(step - 1, args))
                refuse_nonfinite_weights(model, optimizer, step, lr_at(step - 1, args), saved, saved_step)
                with progress.paused():  # saving does not count against img/s
                    save_checkpoint(args.out / 'checkpoint.pt', model, optimizer, step, args, init_info,
                                    window)
                saved, saved_step = args.out / 'checkpoint.pt', step
            if exit_now:
                break
    # Also at the last step, or during its save: the test that follows would not finish before the
    # scheduler's SIGKILL; --resume runs only the test.
    if stop.signum is not None:
        raise Stopped(stop.signum, step, args.out / 'checkpoint.pt')
    return step


def check_frozen(model, initial_state):
    """--freeze: fail loudly if any pre-trained trunk weight differs from its initial value."""
    changed = [k for k, v in model.trunk.state_dict().items()
               if not _is_new_trunk_layer(k) and not torch.equal(v.cpu(), initial_state[f'trunk.{k}'])]
    if changed:
        raise RuntimeError(f'--freeze: {len(changed)} frozen trunk tensors changed during training, e.g. '
                           f'{changed[:3]}; this is a bug in the freezing code')


# --- Evaluation ---------------------------------------------------------------------------------

TEST_PROGRESS_S = 30  # seconds between the progress lines of a test


class EvalProgress:
    """A line every TEST_PROGRESS_S seconds while a test set is evaluated (a minute or more on the
    full VOC sets): images done, img/s, ETA. Counts on the host, so it costs no GPU sync."""

    def __init__(self, total, what):
        self.total, self.what, self.done = total, what, 0
        self.start = self.last = time.perf_counter()

    def add(self, n):
        self.done += n
        now = time.perf_counter()
        if now - self.last >= TEST_PROGRESS_S and self.done < self.total:
            self.last, rate = now, self.done / (now - self.start)
            print(f'{self.what}: {self.done:,}/{self.total:,} images | {rate:.1f} img/s | '
                  f'ETA {format_seconds((self.total - self.done) / rate)}', flush=True)


@torch.no_grad()
def evaluate_classification(model, test_set, args, device):
    """Mean logits over each image's test crops -> per-class AP (11-point and non-interpolated) and mAPs."""
    model.eval()
    # Not worker_options: its workers ignore SIGTERM and SIGUSR1 for a training loop that stops itself (StopSignals).
    # No handler is set during the test, so the signal ends this process at once, and the workers with it.
    loader = data.SigintDeferredLoader(test_set, batch_size=max(1, args.batch_size), num_workers=args.workers,
                                       multiprocessing_context=worker_context(args.workers))
    scores, labels = [], []
    progress = EvalProgress(len(test_set), f'testing on VOC2007 {args.test_split}')
    for images, target in data.watch_stalls(loader):
        B, V = images.shape[:2]
        x = network_input(images.flatten(0, 1), args.input, device)  # (B*V, C, crop, crop)
        with autocast(device):
            logits = model(x)
        scores.append(logits.float().view(B, V, -1).mean(1).cpu())  # (B, 20)
        labels.append(target)
        progress.add(B)
    scores, labels = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    ap11, ap = average_precision(scores, labels, eleven_point=True), average_precision(scores, labels)
    names = data.VOC_CLASSES
    print(f'VOC2007 {args.test_split} classification, {len(scores)} images x {args.test_crops} crops')
    print(f'{"class":<14}{"AP VOC07 11-point":>19}{"AP non-interpolated":>21}')
    for name, a, b in zip(names, ap11, ap):
        print(f'{name:<14}{100 * a:>19.1f}{100 * b:>21.1f}')
    results = dict(map_voc07_11point=mean_ap(ap11), map_noninterpolated=mean_ap(ap),
                   ap_voc07_11point=dict(zip(names, ap11.tolist())), ap_noninterpolated=dict(zip(names, ap.tolist())),
                   test_images=len(scores), test_crops=args.test_crops)
    print(f'{"mAP":<14}{100 * results["map_voc07_11point"]:>19.1f}{100 * results["map_noninterpolated"]:>21.1f}'
          '   (11-point: the official VOC2007 measure; non-interpolated: scikit-learn average_precision_score)'
          + left_out_classes(names, ap, 'no positive test image'))
    return results


def left_out_classes(names, values, why):
    """'' when every class has a value; else the note that the mean is over the others (custom splits)."""
    missing = [name for name, v in zip(names, values) if np.isnan(v)]
    if not missing:
        return ''
    kept = len(names) - len(missing)
    return (f'\n(the mean is over {kept} class{"" if kept == 1 else "es"}: {", ".join(missing)} '
            f'{"has" if len(missing) == 1 else "have"} {why}, so no score)')


@torch.no_grad()
def predict_segmentation(model, images, input_kind, device):
    """uint8 (B, 3, H, W) -> class map (B, H, W): dense head at stride 4, bilinear x4, cropped, argmax."""
    x = network_input(images, input_kind, device)
    H, W = x.shape[-2:]
    with autocast(device):
        logits = model.dense(x, stride=4)  # (B, 21, ceil(H/4), ceil(W/4)); cell i sits at pixel 4i + 1.5
    logits = F.interpolate(logits.float(), scale_factor=4, mode='bilinear', align_corners=False)[..., :H, :W]
    return logits.argmax(1)


@torch.no_grad()
def evaluate_segmentation(model, test_set, args, device):
    """Dense prediction over the whole test set, one image at a time; mIU from one confusion matrix."""
    model.eval()
    # Every image size would trigger a new cuDNN autotuning round: slower than it saves here.
    autotune, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False
    # Not worker_options (see evaluate_classification).
    loader = data.SigintDeferredLoader(test_set, batch_size=1, num_workers=args.workers,
                                       multiprocessing_context=worker_context(args.workers))
    conf = torch.zeros(len(SEG_CLASSES), len(SEG_CLASSES), dtype=torch.long, device=device)
    progress = EvalProgress(len(test_set), f'testing on VOC2012 {args.test_split}')
    try:
        for image, label in data.watch_stalls(loader):
            conf += confusion_matrix(predict_segmentation(model, image, args.input, device), label.to(device),
                                     len(SEG_CLASSES), IGNORE)
            progress.add(1)
    finally:
        torch.backends.cudnn.benchmark = autotune
    scores = segmentation_scores(conf)
    print(f'VOC2012 {args.test_split} segmentation, {len(test_set)} images')
    print(f'{"class":<14}{"IoU":>8}')
    for name, iou in zip(SEG_CLASSES, scores['iou']):
        print(f'{name:<14}{100 * iou:>8.1f}')
    print(f'mIU {100 * scores["miou"]:.1f} | pixel accuracy {100 * scores["pixel_acc"]:.1f}'
          + left_out_classes(SEG_CLASSES, scores['iou'], 'no pixel in the labels or the predictions'))
    return dict(miou=scores['miou'], pixel_acc=scores['pixel_acc'], iou=dict(zip(SEG_CLASSES, scores['iou'])),
                test_images=len(test_set), confusion=conf.cpu().tolist())


# --- Feature shift (RQ4) ------------------------------------------------------------------------

@torch.no_grad()
def trunk_features(trunk, images, input_kind, device, pool=4, chunk=16):
    """Each tap except the input, average-pooled to pool x pool: {tap name: (N, C * pool * pool) float32, CPU}."""
    trunk.eval()
    out = {}
    for i in range(0, len(images), chunk):
        x = network_input(images[i:i + chunk], input_kind, device)
        with autocast(device):
            maps = trunk(x)
        for name, m in zip(trunk.tap_names, maps):
            if name != 'input':
                out.setdefault(name, []).append(F.adaptive_avg_pool2d(m.float(), pool).flatten(1).cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


def feature_shift(trunk_before, trunk_after, images, input_kind, device, pool=4):
    """{tap name: linear CKA between the two trunks' features on the same images}, trunk order."""
    before = trunk_features(trunk_before, images, input_kind, device, pool)
    after = trunk_features(trunk_after, images, input_kind, device, pool)
    return {name: linear_cka(before[name], after[name]) for name in before}


def held_out_paths(test_items, n):
    """The first n (by a fixed shuffle, EVAL_SEED) of the test images' paths, sorted."""
    paths = sorted(item[0] for item in test_items)
    return data.subset(paths, min(n, len(paths)), seed=EVAL_SEED)


def held_out_images(paths, crop):
    """The images at `paths` (held_out_paths) as centre crops: uint8 (n, 3, crop, crop)."""
    crops = [data.center_crop(_load(p), crop, crop) for p in paths]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2)  # (n, crop, crop, 3) -> (n, 3, crop, crop)


# --- Main ---------------------------------------------------------------------------------------

def run(args):
    """Fine-tune and test on VOC as `args` say; returns the results (None when --exit-after stopped the run).
    The run folder's lock (lock_run) is held until the run ends, however it ends."""
    with contextlib.ExitStack() as run_lock:
        return _run(args, run_lock)


def _run(args, run_lock):
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise UserError('finetune_voc.py trains on one device (the paper batches are small); '
                        'run it with python, not torchrun')
    device, _, _, _ = setup_device(args, distributed=False)
    absolute_paths(vars(args), PATH_FLAGS, keywords=('random',))
    args.git_commit = git_commit()  # saved with the checkpoint's args, for the next resumption's trained_by
    ckpt = read_resume(args) if args.resume else None
    args.task = args.task or 'cls'
    # The cheap checks first, so a mistyped flag is refused before --init builds or reads a trunk (seconds); those
    # that need the arch wait for --init to resolve it, unless -a is typed (or resumed). The --fc-dim warning comes
    # after --init is read in any case: a run refused there (-a contradicting it, say) prints its error alone.
    arch_known = args.arch is not None
    fill_defaults(args, device, warn=False)
    # --init random gets colorize.py's fc6/fc7 width on this device, so RQ1 compares equal networks.
    colorize_defaults = COLORIZE_GPU_DEFAULTS if device.type == 'cuda' else COLORIZE_CPU_DEFAULTS
    trunk_state, init_info = initial_trunk(args, colorize_defaults['fc_dim'])
    if arch_known:
        warn_unread_fc_dim(args)
    else:
        check_arch_flags(args)
    # The weights' digest; for --init random apart from 'digest' (--summarize groups runs by that, and
    # each seed's random weights differ), so that a resume sees when the code builds others now.
    init_info['digest' if init_info['kind'] != 'random' else 'random_digest'] = weights_digest(trunk_state)
    if ckpt is not None:
        init_info = resumed_init(ckpt.get('init'), init_info, args)
    init_name = _init_name(args, init_info)
    args.out = args.out or HERE / 'runs' / f'voc-{args.task}-{args.arch}-{init_name}{variant_name(args)}'
    _open_run_folder(args, run_lock)
    train_items, test_items, test_ids = voc_sets(args)
    train_set, test_set = make_datasets(args, train_items, test_items, test_ids)
    print(_run_line(args, init_info, device, len(train_set), len(test_set)))
    model, initial_state = _transfer_model(args, trunk_state, device)
    step = train(model, train_set, args, device, init_info, ckpt)
    if args.exit_after is not None and step < args.steps:
        print(f'stopped at step {step} (--exit-after); continue with {resume_flags(args.out)}')
        return None
    if args.freeze:
        check_frozen(model, initial_state)
    evaluate = evaluate_classification if args.task == 'cls' else evaluate_segmentation
    try:
        results = dict(task=args.task, metrics=evaluate(model, test_set, args, device), steps=step)
        if args.feature_shift:
            results['feature_shift'] = run_feature_shift(model, initial_state, test_items, args, device)
    except UserError as e:  # an unreadable test image, say: the training it follows is not lost
        raise UserError(f'{error_text(e)} (testing after training; the trained weights are saved in '
                        f'{args.out / "checkpoint.pt"}: once that is fixed, {resume_flags(args.out)} runs '
                        f'only the test)') from None
    results.update(init=init_info, args=plain_args(args), **environment(device),
                   train_images=len(train_set), test_images=len(test_set),
                   finished=time.strftime('%Y-%m-%d %H:%M:%S'))
    write_json(args.out / 'results.json', results)
    print(f'results in {args.out / "results.json"}')
    return results


def _init_name(args, init_info):
    """The init's part of the default run folder's name: the colorize.py run folder of --init (e.g.
    vgg16-huechroma), with a kept step (vgg16-huechroma-step0010000), or the init's kind (random, ...)."""
    init_name = init_info['kind']
    if init_name in ('colorization', 'classification'):
        init_name = Path(args.init).parent.name or init_name
        kept = re.fullmatch(r'checkpoint-(step\d+)', Path(args.init).stem)
        init_name += f'-{kept.group(1)}' if kept else ''
    return init_name


def _open_run_folder(args, run_lock):
    """Make --out and lock it for the rest of the run (held by `run_lock`, which also removes a folder this
    made if the run leaves nothing in it); refuse a finished or foreign folder there, and copy the
    --resume run's log into it when resuming from another folder."""
    made = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    # Before the checks below: a run still training there is not joined.
    run_lock.enter_context(lock_run(args.out))
    if made:  # only once locked (a run refused by another's lock would remove its .lock), and run
        run_lock.callback(remove_if_unused, args.out)  # before the lock is let go (last in, first out)
    refuse_to_overwrite(args.out, args.resume_path if args.resume else None)
    if args.resume:
        fork_run(args.resume_path, args.out, ('log.jsonl',))


def _run_line(args, init_info, device, n_train, n_test):
    """The line that opens a run's output: its data, init, input, model variant, device and schedule."""
    return (f'{args.task}: {n_train} training images ({args.train_split}'
            + (f', label fraction {args.label_fraction:g} by seed {args.label_seed}' if args.label_fraction else '')
            + f'), {n_test} test ({args.test_split}); {args.arch} from {init_info["kind"]} init'
            + (f' (pre-trained on --subset {init_info["pretraining"]["subset"]})'
               if (init_info.get('pretraining') or {}).get('subset') else '') + ', '
            f'input {args.input}'
            + (', frozen pre-trained trunk' if args.freeze else '') + (', extended FOV' if args.extended_fov else '')
            + f'; device {device}, crop {args.crop}, batch {args.batch_size}, {args.steps} steps, lr {args.lr:g}'
            + ('' if device.type == 'cuda' else cpu_note(args)))


def _transfer_model(args, trunk_state, device):
    """(the model to fine-tune on `device`, its initial state_dict on the CPU): the task's network on the
    trunk weights `trunk_state`, fc6 unpadded for cls where the protocol's fully connected fc6 needs it, the
    pre-trained part frozen with --freeze. The initial state is what check_frozen and --feature-shift
    compare the fine-tuned model with."""
    model = make_finetune_model(args.task, args.arch, trunk_state, f'--init {args.init}', input_kind=args.input,
                                width=args.width, fc_dim=args.fc_dim, extended_fov=args.extended_fov,
                                head_dim=args.head_dim, dropout=args.dropout, seed=args.seed)
    if args.task == 'cls' and unpad_fc6(model.trunk, args.crop):
        print(f'fc6 runs unpadded at a {args.crop} crop, as the protocol\'s fully connected fc6 (where pool5 is '
              f'larger than its kernel, at more than one position, averaged)')
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if args.freeze:
        freeze_pretrained(model)
        if args.input == 'lab':
            print("--freeze --input lab: conv1's a*, b* weights start at zero and stay there, so the trunk's "
                  'features see lightness only' + (" (the new head also reads each pixel's own a*, b* through "
                                                  'the input tap)' if args.task == 'seg' and model.trunk.tap_input
                                                  else ''))
    model = model.to(device)
    if device.type == 'cuda':
        model = model.to(memory_format=torch.channels_last)
    return model, initial_state


def run_feature_shift(model, initial_state, test_items, args, device):
    """--feature-shift (RQ4): linear CKA per tap between the trunk at `initial_state` and the fine-tuned
    `model`, on --shift-images held-out test images; printed, written to feature_shift.json and returned."""
    before = copy.deepcopy(model)
    before.load_state_dict(initial_state)
    chosen = held_out_paths(test_items, args.shift_images)
    images = held_out_images(chosen, args.crop)
    shift = feature_shift(before.trunk, model.trunk, images, args.input, device, args.shift_pool)
    fewer = (f' (--shift-images {args.shift_images}, but the evaluated test set has {len(images)})'
             if len(images) < args.shift_images else '')
    print(f'feature shift (linear CKA, initial vs fine-tuned, {len(images)} held-out images{fewer}, maps pooled '
          f'to {args.shift_pool}x{args.shift_pool}; 1 = unchanged)')
    for name, value in shift.items():
        print(f'{name:<12}{value:>8.4f}')
    if len(images) < 10:
        print(f'warning: linear CKA over {len(images)} images says little: it is biased towards 1 over few '
              f'samples (over 2 it is exactly 1, whatever the features); use --shift-images of tens or more')
    # Which images (their VOC ids): CKA values of two runs compare only over the same ones, and the
    # draw is from the evaluated test set, so --test-images changes it.
    ids = [Path(p).stem for p in chosen]
    write_json(args.out / 'feature_shift.json', dict(cka=shift, images=len(images), pool=args.shift_pool,
                                                     crop=args.crop, image_ids=ids))
    return shift


def write_json(path, obj):
    """Atomic JSON, indented; nan (no AP / IoU for a class) becomes null (data.write_json)."""
    data.write_json(path, obj, indent=2)


SUMMARY_METRICS = {'cls': ('map_voc07_11point', 'map_noninterpolated'), 'seg': ('miou', 'pixel_acc')}
SUMMARY_SHOWN = ('task', 'arch', 'input', 'steps', 'label_fraction', 'freeze', 'extended_fov')
# Runs that differ only in the seed, or in what does not shape the metrics (the demo world is the
# same wherever it was generated; feature shift is measured after them).
SUMMARY_GROUP = tuple(k for k in RUN_FLAGS + SCHEDULE_FLAGS
                      if k not in ('init', 'seed', 'log_every', 'save_every', 'demo_root', 'feature_shift',
                                   'shift_images', 'shift_pool'))
# Of those, the ones a resume may change that shape the training (the test's apply to the whole test).
SUMMARY_TRAINING = tuple(k for k in SCHEDULE_FLAGS if k in SUMMARY_GROUP and not k.startswith('test_'))


def schedule_changes(resumptions):
    """'at step S: flag old->new, ...; at step ...' of the resumes that changed the training's schedule
    (args.resumptions), or None: such a run trained otherwise than its final flags say. (A change
    typed on resuming a finished run, which only tests, trained nothing, but the final flags hold it.)"""
    parts = []
    for entry in resumptions or ():
        changed = {k: v for k, v in sorted((entry.get('changed') or {}).items()) if k in SUMMARY_TRAINING}
        if changed:
            parts.append(f"at step {entry['step']}: " + ', '.join(f'{k} {json.dumps(a)}->{json.dumps(b)}'
                                                                 for k, (a, b) in changed.items()))
    return '; '.join(parts) or None


def summarize(paths):
    """Mean +- sample std over seeds of each group of finished runs (same init and flags but --seed).

    Every flag that shapes a result (SUMMARY_GROUP) must match within a group, and so must the
    changes of the training's schedule made on resuming (schedule_changes: a run trained 2,000
    steps at one --lr and resumed to 4,000 at another is not a 4,000-step run at the latter); the
    printed line names the usual flags, any other flag that differs between the groups, and such
    changes. A second run of a seed already in its group (the same run given twice, or a repeat) is
    left out with a warning: it is not an independent sample.
    """
    records, unfinished = [], []
    for path in paths:
        if path.is_dir() and not (path / 'results.json').exists() and (path / 'checkpoint.pt').exists():
            unfinished.append(path)  # a run still going, or killed
            continue
        records.append(_summary_record(path))
    groups = _summary_groups(records)
    if unfinished:
        print(f'warning: --summarize leaves out {len(unfinished)} unfinished run(s) (a checkpoint, no '
              f'results.json): {" ".join(map(str, unfinished))}')
    if not groups:
        raise UserError('--summarize: none of the runs named has finished (results.json)')
    ambiguous = {i for i in {g[0] for g in groups.values()}  # one init path at several pre-training steps
                 if len({g[3] for g in groups.values() if g[0] == i}) > 1}
    varying = _varying_flags(groups)
    return [_summary_row(groups[key], ambiguous, varying)
            for key in sorted(groups, key=lambda k: (groups[k][1]['task'], str(groups[k][0]), k))]


def _summary_record(path):
    """(results.json path, init, pre-training step, weights digest, flags, seed, metrics) of the run folder or
    results.json `path`, as summarize groups it: the init's path absolute (or its kind), the SUMMARY_GROUP
    flags with paths absolute, `resumed` (schedule_changes) and no --fc-dim for an arch without fc6/fc7.
    UserError for a path that is not there or a file that is not a results.json of this script."""
    path = path / 'results.json' if path.is_dir() else path
    if not path.is_file():
        raise UserError(f'--summarize: {path} does not exist (expected a run folder holding results.json)')
    try:
        r = json.loads(path.read_text())
        # Paths absolute (older runs saved them as typed, relative to the folder run from: this one).
        init = os.path.abspath(r['init']['path']) if r['init'].get('path') else r['init']['kind']
        step = r['init'].get('step')  # one checkpoint file at another pre-training step: another init
        digest = r['init'].get('digest')  # the weights themselves: a file replaced by another run's
        flags = absolute_paths({k: {**LEGACY_ARGS, **r['args']}.get(k) for k in SUMMARY_GROUP}, PATH_FLAGS,
                               keywords=('random',))
        flags['resumed'] = schedule_changes(r['args'].get('resumptions'))
        if flags.get('arch') in MODELS and not has_fc(flags['arch']):
            flags['fc_dim'] = None  # no fc6/fc7 (a ResNet): its --fc-dim, typed or not, shaped nothing
        metrics = r['metrics']
    except (ValueError, KeyError, AttributeError, TypeError):
        raise UserError(f'--summarize: {path} is not a results.json written by finetune_voc.py') from None
    return path, init, step, digest, flags, r['args'].get('seed'), metrics


def _summary_groups(records):
    """{key: (init, flags, [metrics of each run], step, weights)} of _summary_record's records, in the
    order first seen: one group per init, pre-training step, weights (where they tell runs of one init
    apart) and flags. A second run of a seed already in its group is left out with a warning."""
    # One init file at one pre-training step can still hold other weights (a pre-training run redone
    # into the same folder: another --loss, --subset, seed): where the runs record different digests
    # there, each digest is an init of its own. (A run from before digests joins none of them.)
    digests = {}
    for _, init, step, digest, *_ in records:
        digests.setdefault((init, step), set()).add(digest)
    replaced = {k for k, d in digests.items() if len(d - {None}) > 1}
    groups, seen = {}, {}
    for path, init, step, digest, flags, seed, metrics in records:
        weights = digest if (init, step) in replaced else None
        key = json.dumps([init, step, weights, flags], sort_keys=True)  # lists (scale, milestones) too
        if (key, seed) in seen:
            print(f'warning: --summarize leaves out {path}: the same settings and seed {seed} as {seen[key, seed]}')
            continue
        seen[key, seed] = path
        groups.setdefault(key, (init, flags, [], step, weights))[2].append(metrics)
    return groups


def _varying_flags(groups):
    """{task: [the flags not normally shown (SUMMARY_SHOWN) that tell the task's groups apart]}."""
    varying = {}
    for task in {g[1]['task'] for g in groups.values()}:
        flags = [g[1] for g in groups.values() if g[1]['task'] == task]
        varying[task] = [k for k in SUMMARY_GROUP
                         if k not in SUMMARY_SHOWN and len({json.dumps(f[k]) for f in flags}) > 1]
    return varying


def _summary_row(group, ambiguous, varying):
    """The row of one of _summary_groups' groups: its init as typed from here (with its pre-training step
    where that init path is in `ambiguous`, its weights digest where those tell it apart), its flags, the
    number of runs, and (mean, sample std) in percent of each SUMMARY_METRICS of its task; printed as one
    line, with the flags of `varying` for its task."""
    init, flags, runs, step, weights = group
    task = flags['task']
    shown_init = init
    if os.path.isabs(init) and not os.path.relpath(init).startswith('..'):
        shown_init = os.path.relpath(init)  # saved absolute; shown as typed from here
    if init in ambiguous and step is not None:
        shown_init += f' (step {step})'
    if weights is not None:
        shown_init += f' (weights {weights})'
    row = dict(init=shown_init, **flags, runs=len(runs))
    for name in SUMMARY_METRICS[task]:
        values = np.array([m[name] for m in runs], dtype=np.float64) * 100
        row[name] = (values.mean(), values.std(ddof=1) if len(values) > 1 else float('nan'))
    shown = ' '.join(f'{k}={row[k]}' for k in (*SUMMARY_SHOWN[1:], *varying[task])
                     if row[k] is not None and row[k] is not False)  # 0 is a value to show
    if row['resumed']:
        shown += f' (resumed with another schedule {row["resumed"]})'
    metrics = ' | '.join(f'{name} {m:.1f}' + (f' +- {sd:.1f}' if len(runs) > 1 else '')  # one run: no spread
                         for name, (m, sd) in ((n, row[n]) for n in SUMMARY_METRICS[task]))
    print(f'{task} init={shown_init} {shown} | {metrics} (n={len(runs)})')
    return row


def main(argv=None):
    data.printable_output()
    args = parse_args(argv)
    try:
        problem = unread_flags_problem(args)
        if problem:
            raise UserError(problem)
        if args.summarize:
            summarize(args.summarize)
        elif args.export:
            export(args)
        else:
            run(args)
    except (UserError, OSError, KeyboardInterrupt, Stopped) as e:
        status = stop_status(e, resume=None if args.summarize or args.export else resume_flags(args.out),
                             out=args.out, fresh=args.out is None and not args.resume)  # (as colorize.py's)
        if status is None:  # a bug, not the user's to fix: the traceback
            raise
        return status
    return 0


if __name__ == '__main__':
    sys.exit(main())
