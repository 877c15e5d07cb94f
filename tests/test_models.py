"The training benchmark's architectures (counts by hand and against fastai's own XResNet) and `fxo-bench train --model`."
import importlib.util, os, shutil, subprocess, sys
import pytest
import torch
import fastai
from fastxtend_optim import bench
from fastxtend_optim.models import (TRAIN_MODELS, DEFAULT_MODEL, build_model, param_count, xresnet18, xresnet50,
                                    xresnet101, xse_resnext50, xresnet_small, vit_s16, deberta_base)


def bottleneck(c, w):
    "A bottleneck block of width w on c channels: 1x1, 3x3, 1x1 convs (no bias) + 3 BatchNorms, identity conv if c != 4w"
    return c*w + 9*w*w + 4*w*w + 2*(w + w + 4*w) + (c*4*w + 2*4*w if c != 4*w else 0)


def basic(c, w):
    "A basic block: two 3x3 convs + 2 BatchNorms, identity conv if c != w"
    return 9*c*w + 9*w*w + 4*w + (c*w + 2*w if c != w else 0)


STEM = 3*32*9 + 32*32*9 + 32*64*9 + 2*(32 + 32 + 64)  # three ConvLayers 3->32->32->64 = 28,768


def resnet_params(block, layers, widths=(64, 128, 256, 512), expansion=4):
    total, c = STEM, 64
    for n, w in zip(layers, widths):
        for _ in range(n): total, c = total + block(c, w), w * expansion
    return total + c*1000 + 1000  # linear head to 1000 classes


def test_xresnet_counts_from_layer_math():
    # xresnet50: 25,576,264 in 167 tensors (9 stem + 16 blocks x 9 + 4 identity convs x 3 + 2 head); fastai's 25.6M
    assert param_count(xresnet50()) == (resnet_params(bottleneck, [3, 4, 6, 3]), 167) == (25_576_264, 167)
    assert param_count(xresnet101()) == (resnet_params(bottleneck, [3, 4, 23, 3]), 320) == (44_568_392, 320)
    # xresnet18: 11,708,744 in 68 tensors (9 + 8 x 6 + 3 identity convs x 3 + 2)
    assert param_count(xresnet18()) == (resnet_params(basic, [2, 2, 2, 2], expansion=1), 68) == (11_708_744, 68)
    assert param_count(xresnet_small()) == (1_485_730, 167)  # xresnet50's tensors at a quarter width, 10 classes


def fastai_xresnet_module(monkeypatch):
    "fastai's own fastai/vision/models/xresnet.py, loaded with torchvision hidden (its CPU-torch import fails)"
    monkeypatch.setitem(sys.modules, 'torchvision', None)  # the module then falls back to torch.hub
    spec = importlib.util.spec_from_file_location('fastai.vision.models.xresnet',
                                                  os.path.join(fastai.__path__[0], 'vision', 'models', 'xresnet.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize('name,ours', [('xresnet18', xresnet18), ('xresnet50', xresnet50),
                                       ('xse_resnext50', xse_resnext50)])
def test_xresnet_shapes_equal_fastais(name, ours, monkeypatch):
    real = getattr(fastai_xresnet_module(monkeypatch), name)(n_out=1000)
    assert [p.shape for p in ours(1000).parameters()] == [p.shape for p in real.parameters()]


def test_vit_s16_counts():
    # patch conv 3*16*16*384+384, cls 384, positions 197*384, 12 blocks of 1,774,464, norm 768, head 384*1000+1000:
    # 22,050,664 in 152 tensors (timm's vit_small_patch16_224: 22.05M)
    block = 2*384*2 + (384*1152 + 1152) + (384*384 + 384) + (384*1536 + 1536) + (1536*384 + 384)
    assert param_count(vit_s16()) == (295_296 + 384 + 197*384 + 12*block + 768 + 385_000, 152) == (22_050_664, 152)
    assert vit_s16(10)(torch.randn(1, 3, 32, 32)).shape == (1, 10)  # the CPU's 32x32 uses the first 5 positions


def test_deberta_base_counts():
    # DeBERTa-v3-base backbone: embeddings 128,100*768 + LayerNorm, 12 layers of 7,087,872, relative table 512*768 +
    # LayerNorm = 183,831,552 in 198 tensors (model card: 86M backbone + 98M embeddings); + pooler and 2-class head
    layer = 4*(768*768 + 768) + (768*3072 + 3072) + (3072*768 + 768) + 2*1536
    backbone = 128_100*768 + 1536 + 12*layer + 512*768 + 1536
    assert backbone == 183_831_552
    assert param_count(deberta_base()) == (backbone + 768*768 + 768 + 768*2 + 2, 202)


def test_registry():
    assert DEFAULT_MODEL == 'xresnet-small' and param_count(build_model(DEFAULT_MODEL)[0])[1] >= 100
    assert {'digits', 'xresnet18', 'xresnet50', 'xresnet101', 'xse-resnext50', 'convnext-tiny', 'convnext-small',
            'vit-s16', 'deberta-base'} <= set(TRAIN_MODELS)


def fxo_bench(*args, cwd):
    exe = shutil.which('fxo-bench')
    cmd = [exe] if exe else [sys.executable, '-m', 'fastxtend_optim.bench']
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_train_model_two_steps_through_the_cli(tmp_path):
    args = ['train', '--model', 'xresnet-small', '--steps', '2', '--bs', '4', '--opt', 'lion', '--path', 'native', 'foreach']
    res = fxo_bench(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    md = (tmp_path / 'fxo-bench' / 'train.md').read_text()
    head = md.splitlines()[0]
    assert head.startswith('fxo-bench train on ') and f'torch {torch.__version__}' in head and 'threads' in head
    assert f"command: `fxo-bench {' '.join(args)}`" in md
    assert 'xresnet-small: 1.49M parameters in 167 tensors' in md and 'batches of 4 × 3×32×32, 2 steps' in md
    rows = [[c.strip() for c in l.strip('|').split('|')] for l in md.splitlines() if l.startswith('| lion')]
    native, foreach, speedup = map(float, rows[0][1:])
    assert speedup == pytest.approx(native / foreach, abs=native / foreach * (5e-4 / native + 5e-4 / foreach) + 5e-4)
    assert [r[1] for r in rows[1:]] == ['native', 'foreach']
    assert all(float(r[4]) == pytest.approx(1_485_730 * 4 / 2**20, abs=1e-3) for r in rows[1:])  # Lion: one fp32 state
    assert (tmp_path / 'fxo-bench' / 'train.png').read_bytes()[:4] == b'\x89PNG'


def test_unknown_model_gets_one_line(tmp_path):
    res = fxo_bench('train', '--model', 'resnet9000', cwd=tmp_path)
    assert res.returncode == 2 and 'Traceback' not in res.stderr
    assert res.stderr.strip() == f"fxo-bench: error: unknown model 'resnet9000'; choose from {', '.join(TRAIN_MODELS)}"


@pytest.mark.skipif(importlib.util.find_spec('timm') is not None, reason='timm is installed')
def test_timm_only_model_refused_before_any_run(tmp_path):
    with pytest.raises(bench.BenchError, match="model 'convnext-tiny' needs timm"):
        bench.run_bench('train', ['lion'], ['native'], 1, None, 'small', None, None, 3, 'cpu', tmp_path,
                        models=['convnext-tiny'])


def test_default_optimizers_depend_on_the_model(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(bench, '_train', lambda opts, *a, **k: seen.append((opts, a[-4])))
    for models in (None, ['digits'], ['digits', 'vit-s16']):
        bench.run_bench('train', None, ['native'], 1, None, 'small', None, None, 3, 'cpu', tmp_path, models=models)
    assert seen == [(bench.MODEL_OPTS, [DEFAULT_MODEL]), (list(bench.OPTIMIZERS), ['digits']),
                    (bench.MODEL_OPTS, ['digits', 'vit-s16'])]
