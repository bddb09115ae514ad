import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import colorize
import lab

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


def _state(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _assert_same_weights(a, b):
    assert a['step'] == b['step']
    assert a['model'].keys() == b['model'].keys()
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k


# --- colorize.py: training ---------------------------------------------------------------------

def test_training_writes_run_folder_and_learns(folders, tmp_path, capsys):
    train, val = folders
    out = tmp_path / 'run'
    assert colorize.main(tiny_args(train, val, out, '--steps', '12', '--lr', '0.05', '--eval-every', '12')) == 0
    printed = capsys.readouterr().out
    assert 'step 12/12' in printed and 'eval step 12' in printed
    log = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    evals = [e for e in log if e.get('eval')]
    assert [e['step'] for e in evals] == [0, 12]
    assert evals[-1]['loss'] < evals[0]['loss']  # the head at least learns the colour statistics
    assert {'loss', 'chroma', 'hue', 'lr', 'img_per_s'} <= set(log[1])
    run = json.loads((out / 'run.json').read_text())
    assert run['torch'] == torch.__version__ and run['args']['arch'] == 'vgg16'
    grid = Image.open(out / 'samples' / 'step_000012.png')
    assert grid.size == (3 * 32, 6 * 32)  # gray | prediction | truth, one row per held-out image
    ckpt = _state(out / 'checkpoint.pt')
    assert ckpt['step'] == 12 and ckpt['config']['arch'] == 'vgg16'
    assert not any(k.startswith(('module.', '_orig_mod.')) for k in ckpt['model'])
    assert not list(out.glob('*.tmp'))


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


def test_resume_after_sigkill_is_exact(folders, tmp_path):
    """Kill a run at an arbitrary moment (checkpoints every step), resume: same weights."""
    train, val = folders
    common = ['--steps', '8', '--save-every', '1', '--lr', '0.02']
    assert colorize.main(tiny_args(train, val, tmp_path / 'a', *common)) == 0
    out = tmp_path / 'b'
    proc = subprocess.Popen([sys.executable, str(HERE / 'colorize.py'), *tiny_args(train, val, out, *common)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / 'checkpoint.pt').exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (out / 'checkpoint.pt').exists()
    killed_at = _state(out / 'checkpoint.pt')['step']
    assert colorize.main(tiny_args(train, val, out, *common, '--resume')) == 0
    _assert_same_weights(_state(tmp_path / 'a' / 'checkpoint.pt'), _state(out / 'checkpoint.pt'))
    assert killed_at <= 8


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


def test_torchrun_two_cpu_processes(folders, tmp_path):
    train, val = folders
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    out = tmp_path / 'ddp'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           str(HERE / 'colorize.py'), *tiny_args(train, val, out, '--steps', '4', '--batch-size', '2')]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'world 2' in result.stdout and 'step 4/4' in result.stdout
    assert json.loads((out / 'run.json').read_text())['world_size'] == 2
    assert _state(out / 'checkpoint.pt')['step'] == 4


# --- colorize.py: errors -----------------------------------------------------------------------

def test_errors_are_one_actionable_line(folders, tmp_path, capsys):
    train, val = folders
    cases = [
        (tiny_args(tmp_path / 'nowhere', val, tmp_path / 'o1', '--steps', '1'), 'nowhere'),
        (tiny_args(train, val, tmp_path / 'o2', '--steps', '1', '--border', '20'), '--border'),
        (tiny_args(train, val, tmp_path / 'o3', '--steps', '1', '--subset', '1000'), '--subset'),
        (['--colorize', str(val)], '--checkpoint'),
        (['--colorize', str(val), '--checkpoint', str(tmp_path / 'missing.pt')], 'does not exist'),
    ]
    for argv, needle in cases:
        assert colorize.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('error: ') and needle in err and 'Traceback' not in err, err
        assert len(err.strip().splitlines()) == 1
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(os.urandom(1000))
    assert colorize.main(['--colorize', str(val), '--checkpoint', str(corrupt)]) == 2
    assert 'could not be read' in capsys.readouterr().err


# --- colorize.py: colorizing photos ------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(folders, tmp_path_factory):
    train, val = folders
    out = tmp_path_factory.mktemp('trained')
    assert colorize.main(tiny_args(train, val, out, '--steps', '4')) == 0
    return out / 'checkpoint.pt'


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
                          '--max-side', '40']) == 0
    plain = np.asarray(Image.open(out / 'plain.png'))
    assert plain.shape == (77, 99, 3)
    assert np.asarray(Image.open(out / 'rotated.png')).shape == (99, 77, 3)
    assert np.asarray(Image.open(out / 'gray.png')).shape == (77, 99, 3)

    def lightness(a):
        return lab.rgb_to_lab(torch.from_numpy(a.copy()).permute(2, 0, 1).double() / 255)[0]
    # The output keeps the input's own lightness, pixel for pixel (up to 8-bit rounding and the
    # clipping of out-of-gamut colours).
    assert (lightness(plain) - lightness(rgb)).abs().median() < 1.0


def test_colorize_rejects_mismatched_checkpoint(trained, tmp_path, capsys):
    ckpt = _state(trained)
    ckpt['config']['arch'] = 'alexnet'
    bad = tmp_path / 'mismatch.pt'
    torch.save(ckpt, bad)
    img = _write_images(tmp_path / 'x', 1, 9)
    assert colorize.main(['--colorize', str(img), '--checkpoint', str(bad)]) == 2
    assert 'does not match the model' in capsys.readouterr().err


def test_lr_schedule_by_hand():
    args = colorize.parse_args(['--steps', '100', '--lr', '1.0', '--warmup', '4'])
    got = [colorize.lr_at(s, args) for s in (0, 3, 4, 49, 50, 74, 75, 87, 88, 99)]
    assert got == pytest.approx([0.25, 1.0, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


def test_benchmark_mode_tiny(folders, tmp_path, capsys):
    train, val = folders
    out = tmp_path / 'bench'
    assert colorize.main(tiny_args(train, val, out, '--benchmark', '--bench-warmup', '1', '--bench-steps', '2')) == 0
    rows = json.loads((out / 'benchmark.json').read_text())['rows']
    assert [(r['model'], r['data'].split()[0]) for r in rows] == [
        ('colorizer', 'synthetic'), ('classifier', 'synthetic'), ('colorizer', 'loader')]
    assert all(r['img_per_s'] > 0 and r['ms_per_step'] > 0 for r in rows)
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
    assert 'colorizer / classifier FLOP rate' in capsys.readouterr().out


def test_objective_classify_runs_with_folder_labels(tmp_path):
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


def test_evaluate_classifier_top1_by_hand():
    class Fixed(torch.nn.Module):  # predicts class 0 for dark images, 1 for bright ones
        def forward(self, x):
            m = x.mean((1, 2, 3))
            return torch.stack([-m, m], 1) * 10
    images = torch.stack([torch.full((3, 8, 8), v, dtype=torch.uint8) for v in (10, 20, 240, 250)])
    labels = torch.tensor([0, 1, 1, 1])  # the second is mislabelled: 3 of 4 right
    metrics = colorize.evaluate_classifier(Fixed(), images, labels, None, torch.device('cpu'))
    assert metrics['top1'] == 0.75
