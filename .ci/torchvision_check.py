"""Checks finetune_voc.py's torchvision interop against the real torchvision.models, at full width.

torchvision is no dependency of the project: test_all.py checks the same mapping against torchvision's
definitions written out by hand, and neither the tests nor .ci/run call this script. Run it where torch
and torchvision are installed (CPU is enough; a few minutes for all four architectures):

    python .ci/torchvision_check.py                       # alexnet vgg16 resnet50 resnet152
    python .ci/torchvision_check.py -a vgg16 --finetune   # also one finetune_voc.py step on the torchvision init

Per architecture, with random weights (torchvision's own init; BatchNorm statistics and affine
parameters drawn at random, so that folding them is not the identity):
  export  a colorize.py-format checkpoint -> `finetune_voc.py --export` -> torchvision.models.<arch>()
          .load_state_dict(strict=False): the keys left missing / unexpected, and the features of
          torchvision's network on an ImageNet-normalised RGB image against our BatchNorm network (not
          folded) on the lightness that README's formula gives for that image;
  init    torchvision's state_dict -> `--init` (finetune_voc.initial_trunk + make_finetune_model): our
          trunk on lightness against torchvision's on the gray RGB image of that lightness;
  trip    torchvision -> --init -> --export -> torchvision: which tensors come back bit-identical, and
          whether torchvision's network with the returned weights computes what it did.
Features are compared in float64 as max |ours - torchvision| / max |torchvision| per layer. "same pad":
torchvision's conv1 padding is replaced by padding the image with the gray whose lightness is 50 by
README's formula (what our zero padding of (L - 50) / 50 means), so only the weights differ; "as is":
both networks unchanged, so the border differs (ours pads L* = 50, torchvision the ImageNet mean
colour, L* 54.1 by the formula). AlexNet pads its conv1 and pools differently (README): there only
conv1 is compared with the padding harmonised; fc7 is reported as is. Exits 1 if a check fails.
"""
import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import colorize  # noqa: E402
import finetune_voc as ft  # noqa: E402

# README "Inits, input and export", typed here rather than read from finetune_voc.py (the code under check).
L_README = (10.765438, 23.061646, 62.671641, 8.704467)  # L* = k0 + kR R + kG G + kB B, RGB in [0, 1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's documented input normalisation
GRAY50 = (50 - L_README[0]) / sum(L_README[1:])  # the gray whose lightness is 50: our zero padding
FINAL = {'alexnet': 'classifier.6', 'vgg16': 'classifier.6', 'resnet50': 'fc', 'resnet152': 'fc'}
TOL = 1e-6  # float32 weights (measured: at most 2.1e-7), float64 arithmetic


def torchvision_models():
    """torchvision.models, and torchvision's version. Its models are pure Python: where the package's
    compiled ops do not load (a CUDA wheel beside a CPU torch), they are imported without them."""
    version = importlib.metadata.version('torchvision')
    try:
        return importlib.import_module('torchvision.models'), version
    except (RuntimeError, OSError, ImportError) as e:
        print(f'note: import torchvision failed ({type(e).__name__}: {str(e).splitlines()[0]}); '
              f'importing torchvision.models without its compiled ops')
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
        del sys.modules[name]
    spec = importlib.util.find_spec('torchvision')
    package = types.ModuleType('torchvision')
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules['torchvision'] = package
    return importlib.import_module('torchvision.models'), version


def image(size, gray=False, seed=0):
    """Smooth random colours (or grays) in [0, 1], float64 (1, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(1, 1 if gray else 3, 5, 5, generator=g, dtype=torch.float64)
    return F.interpolate(small, size=(size, size), mode='bicubic', align_corners=False).clamp(0, 1).expand(1, 3, -1, -1)


def lightness_input(rgb):
    """Our input (L - 50) / 50 with README's L* formula."""
    k = torch.tensor(L_README, dtype=rgb.dtype)
    return (k[0] + (k[1:].view(1, 3, 1, 1) * rgb).sum(1, keepdim=True) - 50) / 50


def normalise(rgb):
    mean, std = (torch.tensor(v, dtype=rgb.dtype).view(1, 3, 1, 1) for v in (MEAN, STD))
    return (rgb - mean) / std


def randomise_batchnorm(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                if m.affine:
                    m.weight.uniform_(0.3, 1.0, generator=g)  # also the residual branches that start at zero
                    m.bias.normal_(0, 0.2, generator=g)
    return model


def first_conv(tvm):
    return tvm.features[0] if hasattr(tvm, 'features') else tvm.conv1


def tv_layers(arch, tvm, x, same_pad):
    """torchvision's features by our layer name; with same_pad, conv1's zero padding is replaced by the gray GRAY50."""
    conv1 = first_conv(tvm)
    pad = conv1.padding[0] if arch != 'alexnet' else 5  # AlexNet: our conv1 pads 5
    if same_pad:
        x = normalise(F.pad(x, (pad,) * 4, value=GRAY50))
        saved, conv1.padding = conv1.padding, (0, 0)
    else:
        x = normalise(x)
    out = {}
    try:
        if arch == 'vgg16':
            for i, layer in enumerate(tvm.features):
                x = layer(x)
                out.update({3: {'conv1_2': x}, 15: {'conv3_3': x}, 29: {'conv5_3': x}}.get(i, {}))
            x = torch.flatten(tvm.avgpool(x), 1)
            out['fc7'] = tvm.classifier[:5](x)[..., None, None]  # Linear, ReLU, Dropout, Linear, ReLU
        elif arch == 'alexnet':
            out['conv1'] = tvm.features[1](tvm.features[0](x))
            x = torch.flatten(tvm.avgpool(tvm.features(x)), 1)
            out['fc7'] = tvm.classifier[:6](x)[..., None, None]
        else:
            x = tvm.relu(tvm.bn1(tvm.conv1(x)))
            out['conv1'] = x
            x = tvm.maxpool(x)
            for i in range(1, 5):
                x = getattr(tvm, f'layer{i}')(x)
                out[f'layer{i}'] = x
    finally:
        if same_pad:
            conv1.padding = saved
    return out


def our_layers(arch, trunk, u):
    """Our trunk's features on lightness input u, by the names tv_layers uses."""
    names = dict(vgg16={'conv1_2': 'conv1_2', 'conv3_3': 'conv3_3', 'conv5_3': 'conv5_3', 'fc7': 'fc7'},
                 alexnet={'conv1': 'conv1', 'fc7': 'fc7'})
    if arch not in names:
        blocks = ft._resnet_blocks(arch)
        names[arch] = {'conv1': 'conv1', **{f'layer{s - 1}': blocks[s][-1] for s in (2, 3, 4, 5)}}
    out, hooks = {}, []
    for ours, theirs in {v: k for k, v in names[arch].items()}.items():
        hooks.append(getattr(trunk, ours).register_forward_hook(lambda m, i, o, key=theirs: out.__setitem__(key, o)))
    try:
        trunk(u)
    finally:
        for h in hooks:
            h.remove()
    return out


def compare(ours, theirs, centre_of_ours=()):
    """max |ours - theirs| / max |theirs| per layer; for the layers in centre_of_ours our map's centre
    cell against torchvision's vector (fc7 at 224: our fc6 is a padded conv whose centre cell sees pool5)."""
    errors = {}
    for name, ref in theirs.items():
        mine = ours[name]
        if name in centre_of_ours:
            mine = centre(mine)
        if name == 'conv1' and mine.shape != ref.shape:
            raise AssertionError(f'conv1 shapes differ: ours {tuple(mine.shape)}, torchvision {tuple(ref.shape)}')
        errors[name] = ((mine - ref).abs().max() / ref.abs().max()).item() if mine.shape == ref.shape else float('nan')
    return errors


def centre(x):
    """The centre cell of (B, C, h, w), as (B, C, 1, 1)."""
    return x[..., x.shape[-2] // 2:x.shape[-2] // 2 + 1, x.shape[-1] // 2:x.shape[-1] // 2 + 1]


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def fmt(errors):
    return ', '.join(f'{k} {v:.1e}' for k, v in errors.items())


class Checker:
    def __init__(self):
        self.failed = []

    def expect(self, ok, what):
        print(f'  [{"ok" if ok else "FAIL"}] {what}')
        if not ok:
            self.failed.append(what)


def check_export(arch, tvmodels, size, tmp, check):
    print(f'{arch}: export')
    config = dict(arch=arch, objective='colorize', loss='huechroma', width=1.0, fc_dim=4096, fc_dropout=0.0)
    torch.manual_seed(0)
    model = randomise_batchnorm(colorize.make_model(config), 1).eval()
    ckpt = tmp / f'{arch}-colorize.pt'
    torch.save(dict(model=model.state_dict(), optimizer={}, step=1, config=config, args={'arch': arch}), ckpt)
    out = tmp / f'{arch}-export.pth'
    check.expect(ft.main(['--export', str(out), '--init', str(ckpt)]) == 0, 'finetune_voc.py --export exits 0')
    sd = torch.load(out, weights_only=True)
    tvm = getattr(tvmodels, arch)()
    try:
        missing, unexpected = tvm.load_state_dict(sd, strict=False)
    except RuntimeError as e:
        check.expect(False, f'torchvision.models.{arch}() loads it: {str(e).splitlines()[:3]}')
        return
    final = FINAL[arch]
    check.expect(sorted(missing) == [f'{final}.bias', f'{final}.weight'] and not unexpected,
                 f'load_state_dict(strict=False): missing {sorted(missing)}, unexpected {sorted(unexpected)}')
    tvm, trunk = tvm.double().eval(), model.trunk.double().eval()
    rgb = image(size)
    with torch.no_grad():
        ours = our_layers(arch, trunk, lightness_input(rgb))
        for same_pad in (True, False):
            theirs = tv_layers(arch, tvm, rgb, same_pad)
            if arch == 'alexnet':
                if same_pad:
                    e = compare(ours, {'conv1': theirs['conv1']})
                    check.expect(e['conv1'] < TOL, f'same pad: conv1 {e["conv1"]:.1e}')
                else:
                    mine, ref = centre(ours['fc7']), theirs['fc7']
                    print(f'  as is: fc7 (our centre cell) {compare({"fc7": mine}, {"fc7": ref})["fc7"]:.2f} '
                          f'relative, cosine {cosine(mine, ref):.4f}')
                continue
            e = compare(ours, theirs, centre_of_ours=('fc7',) if size == 224 else ())
            if size != 224:
                e.pop('fc7', None)
            if same_pad:
                check.expect(max(e.values()) < TOL, f'same pad: {fmt(e)}')
            else:
                print(f'  as is: {fmt(e)}')


def torchvision_weights(arch, tvmodels, seed):
    torch.manual_seed(seed)
    return randomise_batchnorm(getattr(tvmodels, arch)(), seed + 1).eval()


def check_init(arch, tvmodels, size, tmp, check, finetune):
    print(f'{arch}: --init of a torchvision state_dict')
    tvm = torchvision_weights(arch, tvmodels, 2)
    path = tmp / f'{arch}-tv.pth'
    torch.save(tvm.state_dict(), path)
    if finetune:
        argv = ['--task', 'cls', '--init', str(path), '-a', arch, '--steps', '1', '--crop', '64', '--batch-size', '2',
                '--test-crops', '1', '--test-images', '2', '--out', str(tmp / f'{arch}-cls'), '--device', 'cpu',
                '--demo-root', str(tmp / 'demo'), '--no-feature-shift']
        check.expect(ft.main(argv) == 0, f'finetune_voc.py {" ".join(argv[:6])} --steps 1 ... exits 0')
    args = ft.parse_args(['--task', 'cls', '--init', str(path), '-a', arch])
    state, info = ft.initial_trunk(args)
    model = ft.make_finetune_model('cls', arch, state, str(path), 'gray', args.width, args.fc_dim)
    trunk = model.trunk.double().eval()
    tvm = tvm.double()
    gray = image(size, gray=True, seed=3)
    with torch.no_grad():
        ours = our_layers(arch, trunk, lightness_input(gray))
        for same_pad in (True, False):
            theirs = tv_layers(arch, tvm, gray, same_pad)
            if arch == 'alexnet':
                theirs = {'conv1': theirs['conv1']} if same_pad else {}
            e = compare(ours, theirs, centre_of_ours=('fc7',) if size == 224 else ())
            if size != 224:
                e.pop('fc7', None)
            if same_pad:
                check.expect(max(e.values()) < TOL, f'same pad, gray image: {fmt(e)}')
            elif e:
                print(f'  as is, gray image: {fmt(e)}')
        rgb = image(size, seed=4)  # colour enters through the lightness only: not claimed to agree
        theirs = tv_layers(arch, tvm, rgb, True)
        if arch == 'alexnet':
            theirs = {'conv1': theirs['conv1']}
        e = compare(our_layers(arch, trunk, lightness_input(rgb)), theirs, centre_of_ours=('fc7',) if size == 224 else ())
        if size != 224:
            e.pop('fc7', None)
        print('  same pad, colour image (not claimed): ' + fmt(e))


def check_round_trip(arch, tvmodels, size, check):
    print(f'{arch}: torchvision -> --init -> --export -> torchvision')
    tvm = torchvision_weights(arch, tvmodels, 5)
    sd0 = tvm.state_dict()
    state, _ = ft.trunk_from_torchvision(sd0, arch)
    sd1 = ft.export_torchvision(state, arch)
    same = [k for k in sd1 if torch.equal(sd1[k], sd0[k])]
    changed = [k for k in sd1 if k not in same]
    kinds = sorted({k.rsplit('.', 1)[-1] for k in changed})
    print(f'  {len(same)} of {len(sd1)} tensors identical; changed: {len(changed)} '
          f'({", ".join(changed[:3])}{", ..." if len(changed) > 3 else ""}; kinds {kinds})')
    if arch in ('alexnet', 'vgg16'):
        check.expect(changed == ['features.0.weight', 'features.0.bias'], f'only conv1 changes: {changed}')
    back = getattr(tvmodels, arch)()
    back.load_state_dict(sd1, strict=False)
    back, tvm = back.double().eval(), tvm.double().eval()
    with torch.no_grad():
        for gray, what in ((True, 'gray'), (False, 'colour')):
            x = image(size, gray=gray, seed=6)
            e = compare(tv_layers(arch, back, x, True), tv_layers(arch, tvm, x, True))
            if gray:
                check.expect(max(e.values()) < TOL, f'same function on a gray image (same pad): {fmt(e)}')
            else:
                print(f'  colour image (conv1 sees lightness only): {fmt(e)}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('-a', '--arch', nargs='+', default=['alexnet', 'vgg16', 'resnet50', 'resnet152'],
                   choices=sorted(FINAL), help='architectures to check (default: all four)')
    p.add_argument('--size', type=int, default=224, help='image side (default 224, where fc7 is compared)')
    p.add_argument('--finetune', action='store_true', help='also run one finetune_voc.py step on the demo world '
                   'from the torchvision init (slow on CPU for the wide trunks)')
    args = p.parse_args(argv)
    tvmodels, version = torchvision_models()
    print(f'torch {torch.__version__}, torchvision {version}')
    check = Checker()
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.arch:
            check_export(arch, tvmodels, args.size, Path(tmp), check)
            check_init(arch, tvmodels, args.size, Path(tmp), check, args.finetune)
            check_round_trip(arch, tvmodels, args.size, check)
    print(f'{len(check.failed)} check(s) failed' if check.failed else 'all checks passed')
    return 1 if check.failed else 0


if __name__ == '__main__':
    sys.exit(main())
