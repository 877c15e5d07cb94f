"Each optimizer inside a fastai Learner on scikit-learn's bundled digits, on every path."
import warnings
from functools import partial
import pytest
import torch
from fastai.callback.all import GradientAccumulation, MixedPrecision
import fastai.optimizer as fastai_optim
from fastxtend_optim.lion import lion
from fastxtend_optim.adam import adam
from fastxtend_optim.lars import lars
from fastxtend_optim.demo import digits_dls, digits_learner, PATH_FUNCS

OPTS = {'lion': (lion, 3e-3), 'adam': (adam, 3e-3), 'lars': (partial(lars, clip=True), 1.)}  # partial maker, peak lr
RUN_PATHS = {**PATH_FUNCS, 'fused8': dict(fused=True, state_bits=8), 'fused4': dict(fused=True, state_bits=4)}
CASES = [(o, p) for o in OPTS for p in RUN_PATHS]  # low-bit state: the two hidden matrices (the rest are small)


def opt_func(name, path): return OPTS[name][0](**RUN_PATHS[path])


@pytest.fixture(scope='module')
def dls():
    return digits_dls()


@pytest.fixture(scope='module')
def fastai_adam_accuracy(dls):
    learn = digits_learner(fastai_optim.Adam, dls)
    quiet_fit(learn, 3, 3e-3)
    return accuracy(learn)


def quiet_fit(learn, *args, method='fit_one_cycle', **kwargs):
    with learn.no_bar(), learn.no_logging(): getattr(learn, method)(*args, **kwargs)


def accuracy(learn):
    with learn.no_bar(): return float(learn.validate()[1])


def state_tensors(opt):
    return [v for p, *_ in opt.all_params() for v in opt.state[p].values() if torch.is_tensor(v)]


@pytest.mark.parametrize('name,path', CASES)
def test_fit_one_cycle_learns_digits(dls, name, path, fastai_adam_accuracy):
    learn = digits_learner(opt_func(name, path), dls)
    assert accuracy(learn) < 0.3
    quiet_fit(learn, 3, OPTS[name][1])
    assert accuracy(learn) > 0.9
    assert accuracy(learn) >= fastai_adam_accuracy - 0.03  # comparable with fastai's own Adam, same data and epochs
    assert learn.opt.path == ('fused' if path.startswith('fused') else path)
    if path in ('fused8', 'fused4'): assert learn.opt.state[learn.model[0][0].weight]['grad_avg'].dtype == torch.uint8
    # fastai's bias/norm handling reached the optimizer state
    bn = learn.model[0][1]
    assert learn.opt.state[bn.weight]['do_wd'] is False and learn.opt.state[bn.weight]['force_train'] is True


@pytest.mark.parametrize('name,path', CASES)
def test_freeze_slice_lrs_save_load_resume(dls, name, path, tmp_path):
    learn = digits_learner(opt_func(name, path), dls, path=tmp_path)
    learn.freeze()
    frozen = learn.model[0][0].weight.detach().clone()
    bn = learn.model[0][1].weight.detach().clone()
    quiet_fit(learn, 1, OPTS[name][1])
    assert torch.equal(learn.model[0][0].weight, frozen)          # frozen body Linear
    assert not torch.equal(learn.model[0][1].weight, bn)          # BatchNorm trains anyway (force_train)
    learn.unfreeze()
    quiet_fit(learn, 2, slice(OPTS[name][1] / 30, OPTS[name][1]))
    lrs = [h['lr'] for h in learn.opt.hypers]
    assert lrs[0] < lrs[1]
    assert accuracy(learn) > 0.85

    learn.save('stage1', with_opt=True)
    other = digits_learner(opt_func(name, path), dls, path=tmp_path)
    other.create_opt()
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # fastai turns a failed optimizer load into a warning
        other.load('stage1', with_opt=True)
    for a, b in zip(state_tensors(learn.opt), state_tensors(other.opt), strict=True): assert torch.equal(a, b)
    assert [h['lr'] for h in other.opt.hypers] == lrs
    acc = accuracy(other)
    quiet_fit(other, 1, OPTS[name][1] / 3)
    assert accuracy(other) >= acc - 0.02


@pytest.mark.parametrize('name,path', CASES)
def test_lr_find_restores_weights_and_state(dls, name, path):
    learn = digits_learner(opt_func(name, path), dls)
    quiet_fit(learn, 1, OPTS[name][1])
    weights = [p.detach().clone() for p in learn.model.parameters()]
    state = [t.clone() for t in state_tensors(learn.opt)]
    with learn.no_bar(), learn.no_logging(): res = learn.lr_find(num_it=30, show_plot=False)
    assert res.valley > 0
    for a, b in zip(learn.model.parameters(), weights): assert torch.equal(a, b)
    for a, b in zip(state_tensors(learn.opt), state, strict=True): assert torch.equal(a, b)


@pytest.mark.parametrize('name,path', CASES)
def test_gradient_accumulation_steps_once_per_two_batches(dls, name, path):
    learn = digits_learner(opt_func(name, path), dls, cbs=GradientAccumulation(n_acc=128))
    learn.create_opt()
    steps = []
    step = learn.opt.step
    learn.opt.step = lambda *a, **k: steps.append(1) or step(*a, **k)
    quiet_fit(learn, 1, OPTS[name][1])
    assert len(steps) == len(dls.train) // 2
    assert accuracy(learn) > 0.5


@pytest.mark.parametrize('name,path', CASES)
def test_mixed_precision_bf16(dls, name, path):
    """fastai's MixedPrecision hands `opt.param_groups` to its GradScaler. Its autocast targets CUDA, so on a CPU
    the forward pass stays fp32 and this checks the plumbing only; bf16 parameters are covered in test_lion.py"""
    learn = digits_learner(opt_func(name, path), dls, cbs=MixedPrecision(amp_mode='bf16'))
    quiet_fit(learn, 2, OPTS[name][1])
    assert accuracy(learn) > 0.85


@pytest.mark.parametrize('name', OPTS)
def test_fused_accuracy_within_001_of_foreach(dls, name):
    "Same seed, data order and schedule, through freeze and unfreeze: the two paths end within 0.01 accuracy"
    accs = []
    for path in ('foreach', 'fused'):
        learn = digits_learner(opt_func(name, path), dls)
        learn.freeze()
        quiet_fit(learn, 1, OPTS[name][1])
        learn.unfreeze()
        quiet_fit(learn, 2, slice(OPTS[name][1] / 10, OPTS[name][1]))
        assert learn.opt.path == path
        accs.append(accuracy(learn))
    assert abs(accs[0] - accs[1]) <= 0.01 and min(accs) > 0.85
