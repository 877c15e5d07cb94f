"Adafactor against torch's and Hugging Face's on the native and ForEach paths: factored state, checkpoints, bad input."
import math, re
import pytest
import torch
from transformers.optimization import Adafactor as HFAdafactor
from fastxtend_optim.adafactor import Adafactor, AdafactorOptimizer, adafactor
from conftest import (make_params, set_grads, run, gappy_run, assert_close_lists, fx_groups, torch_groups, roundtrip,
                      assert_bf16_tracks_fp32, LRS)

PATHS = ('native', 'foreach')
SHAPES = ((64, 32), (32,), (3, 5, 7), (4097,), (10, 64), ())  # 2-D, 1-D, 3-D, 0-d; indexes 1 and 5 get do_wd=False


def params(dtype=torch.float32): return make_params(shapes=SHAPES, dtype=dtype)


def moved(got, start) -> float: return max((a - b).abs().max().item() for a, b in zip(got, start))


def torch_ref(ps, path, wd=0., **kwargs):
    "torch's Adafactor over the same grouping (lrs `LRS`, no decay for do_wd=False tensors), on the matching path"
    return torch.optim.Adafactor(torch_groups(ps, wd), foreach=path == 'foreach', **kwargs)


TORCH_CASES = [(dict(), dict()), (dict(wd=0.05), dict(wd=0.05)),
               (dict(beta2_decay=-0.5, eps1=1e-6, eps2=1e-2, clip_threshold=2.),
                dict(beta2_decay=-0.5, eps=(1e-6, 1e-2), d=2.))]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('ours,theirs', TORCH_CASES)
def test_matches_torch_adafactor_over_60_steps(path, ours, theirs):
    """1-D, 2-D, 3-D and 0-d tensors, two lrs, do_wd=False tensors, decay, torch's defaults (eps1 None): measured
    bitwise on the CPU (each path against torch's path of the same kind); 1e-6 allowed for other devices' kernels"""
    a, b = params(), params()
    start = [p.detach().clone() for p in a]
    opt = fx_groups(Adafactor, a, path, **ours)
    got, expected = run(opt, a, 60), run(torch_ref(b, path, **theirs), b, 60)
    assert opt.path == path
    assert_close_lists(got, expected, atol=1e-6)
    assert moved(got, start) > 0.05



@pytest.mark.parametrize('path', PATHS)
def test_relative_step_is_one_over_root_t_above_lr_as_torch(path):
    """At lr=1 the relative step min(lr, 1/sqrt(t)) is 1/sqrt(t) from the first step (at the lrs above it is lr for
    10^4 steps): 30 steps track torch's, step size and all"""
    a, b = params(), params()
    start = [p.detach().clone() for p in a]
    opt = Adafactor(a, lr=1., foreach=path == 'foreach')
    got, expected = run(opt, a, 30), run(torch.optim.Adafactor(b, lr=1., foreach=path == 'foreach'), b, 30)
    assert_close_lists(got, expected, atol=1e-6)
    assert moved(got, start) > 0.5

HF_CASES = [dict(), dict(beta1=0.9), dict(warmup_init=True),
            dict(relative_step=False, scale_parameter=False, beta1=0.5, clip_threshold=0.5, beta2_decay=-0.5),
            dict(relative_step=False)]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', HF_CASES)
def test_matches_hugging_face_adafactor(path, kwargs):
    """Hugging Face's relative-step mode (lr None, our lr 1e-2: its constant cap), its warmup, its manual lr and beta1,
    with its eps1 = 1e-30 (added to G^2 there, a floor here: both below fp32's resolution). Measured within 5e-7 of it
    after 60 steps; the weights travel at least 0.001 (warmup) and 0.05 (the rest)"""
    a, b = params(), params()
    start = [p.detach().clone() for p in a]
    relative = kwargs.get('relative_step', True)
    opt = fx_groups(Adafactor, a, path, eps1=1e-30, **kwargs)
    if relative: opt.set_hyper('lr', 1e-2)
    groups = torch_groups(b, 0.)
    for g in groups:
        if relative: g['lr'] = None
    hf = {('decay_rate' if k == 'beta2_decay' else k): v for k, v in kwargs.items()}
    got, expected = run(opt, a, 60), run(HFAdafactor(groups, **hf), b, 60)
    assert_close_lists(got, expected, atol=2e-6)
    assert moved(got, start) > (1e-3 if kwargs.get('warmup_init') else 0.05)


def test_warmup_init_under_lr_one_hundredth_is_capped_by_lr():
    """With warmup_init, lr caps the ramp too: lr 1e-8 (below 1e-6*t) moves the weights 100 times less than lr 1e-6; any
    lr >= 1e-2 is Hugging Face's ramp (1e-6*t). In fp64, where moves of 1e-8 are not rounded away"""
    travels = []
    for lr in (1e-6, 1e-8, 1e-2, 1.):
        ps = params(torch.float64)
        start = [p.detach().clone() for p in ps]
        opt = Adafactor(ps, lr=lr, warmup_init=True)
        run(opt, ps, 3)
        travels.append(moved(ps, start))
    assert travels[0] == pytest.approx(100 * travels[1], rel=1e-6)
    assert travels[2] == travels[3] and travels[0] < travels[2] < 6 * travels[0]  # ramp 1e-6, 2e-6, 3e-6


def test_float64_uses_its_own_machine_epsilon_as_torch():
    "eps1=None is the weights' dtype's machine epsilon: fp64 weights against torch's in fp64, tiny gradients (floored)"
    a, b = params(torch.float64), params(torch.float64)
    opt, ref = Adafactor(a, lr=1e-2, eps1=None), torch.optim.Adafactor(b, lr=1e-2)
    for i in range(20):
        set_grads(a, i), set_grads(b, i)
        for p, q in zip(a, b): p.grad.mul_(1e-9), q.grad.mul_(1e-9)  # G^2 ~ 1e-18: near fp32's eps^2, far above fp64's
        opt.step(), ref.step()
    assert_close_lists(a, b, atol=1e-12)


@pytest.mark.parametrize('path', PATHS)
def test_a_zero_gradient_row_stays_finite_at_hugging_faces_eps(path):
    """eps1=1e-30: its square is 0 in fp32, so torch's floor would give 0/0 for a row of zero gradients; ours stops at
    fp32's smallest normal number, and that row does not move"""
    w = torch.randn(8, 6, requires_grad=True)
    before = w.detach().clone()
    opt = Adafactor([w], eps1=1e-30, **({} if path == 'foreach' else dict(foreach=False)))
    w.grad = torch.randn(8, 6)
    w.grad[3] = 0.
    opt.step()
    assert w.isfinite().all() and torch.equal(w[3], before[3]) and (w[2] - before[2]).abs().min() > 0


def test_native_and_foreach_agree_with_missing_gradients_and_clipping():
    "Tensors without a gradient on some steps (their step counts lag), percentile clipping, beta1 and decay"
    runs = [gappy_run(fx_groups(Adafactor, ps, path, percentile_clipping=80, beta1=0.9, wd=0.05), ps, 30)
            for path, ps in (('native', params()), ('foreach', params()))]
    assert_close_lists(runs[1], runs[0], atol=1e-6)
    assert moved(runs[0], params()) > 0.01


@pytest.mark.parametrize('beta1', [0., 0.9])
def test_state_is_factored_for_two_or_more_dims(beta1):
    "Row and column averages (fp32) for >= 2 dims, sqr_avg for 1-D and 0-d, grad_avg only with beta1 > 0"
    ps = params(torch.bfloat16)
    opt = Adafactor(ps, beta1=beta1)
    run(opt, ps, 2)
    extra = ['grad_avg'] if beta1 else []
    for p in ps:
        s = opt.state[p]
        keys = ['col_sqr_avg', 'row_sqr_avg'] if p.dim() >= 2 else ['sqr_avg']
        assert sorted(k for k in s if k not in ('step', 'kahan_comp')) == sorted(extra + keys)
        if p.dim() >= 2:
            assert s['row_sqr_avg'].shape == p.shape[:-1] and s['col_sqr_avg'].shape == p.shape[:-2] + p.shape[-1:]
            assert s['row_sqr_avg'].dtype == torch.float32 and (s['row_sqr_avg'] > 0).all()
        else: assert s['sqr_avg'].shape == p.shape


@pytest.mark.parametrize('order', [('native', 'foreach', 'native'), ('foreach', 'native', 'foreach')])
def test_checkpoint_moves_between_paths(order):
    "A run moved between paths through weights_only checkpoints ends where one path alone ends (factored state travels)"
    kw = dict(beta1=0.9, wd=0.05)
    a = params()
    uninterrupted = run(fx_groups(Adafactor, a, order[0], **kw), a, 30)
    ps, last = params(), None
    for i, path in enumerate(order):
        ps = [p.detach().clone().requires_grad_() for p in ps]
        opt = fx_groups(Adafactor, ps, path, **kw)
        if last is not None: opt.load_state_dict(last)
        run(opt, ps, 10, start=10 * i)
        last = roundtrip(opt.state_dict())
    assert sorted(last['state'][0]) == ['col_sqr_avg', 'do_wd', 'grad_avg', 'row_sqr_avg', 'step'] or \
        sorted(last['state'][0]) == ['col_sqr_avg', 'grad_avg', 'row_sqr_avg', 'step']
    assert last['state'][2]['row_sqr_avg'].shape == (3, 5) and last['state'][0]['step'] == 30
    assert_close_lists(ps, uninterrupted, atol=1e-6)


@pytest.mark.parametrize('key,shape,index', [('row_sqr_avg', (64, 1), 0), ('col_sqr_avg', (1, 32), 0),
                                             ('col_sqr_avg', (5,), 2), ('sqr_avg', (31,), 1)])
def test_wrongly_shaped_state_is_refused_on_load(key, shape, index):
    "torch's (n, 1)/(1, m) layout, a 3-D tensor's columns taken for its rows, a short vector: refused, nothing loaded"
    ps = params()
    opt = Adafactor(ps)
    run(opt, ps, 2)
    sd = roundtrip(opt.state_dict())
    sd['state'][index][key] = torch.zeros(shape)
    fresh = Adafactor(params())
    with pytest.raises(ValueError, match=re.escape(f"saved state '{key}' of parameter {index} has shape {tuple(shape)}")):
        fresh.load_state_dict(sd)
    assert all(len(s) == 0 for s in fresh.state.values())


@pytest.mark.parametrize('bad,match', [
    (dict(beta1=1.), r'`beta1` must be in \[0, 1\)'), (dict(beta2_decay=0.1), '`beta2_decay` must be a finite number <= 0'),
    (dict(eps1=-1e-30), '`eps1` must be a finite number >= 0'), (dict(eps2=0.), '`eps2` must be a finite number > 0'),
    (dict(clip_threshold=math.inf), '`clip_threshold` must be a finite number > 0'),
    (dict(relative_step=None), '`relative_step` must be a bool'), (dict(scale_parameter=1), '`scale_parameter` must be a bool'),
    (dict(warmup_init='yes'), '`warmup_init` must be a bool'), (dict(lr=-1.), '`lr` must be'),
    (dict(wd=-0.1), '`wd` must be'), (dict(percentile_clipping=0), '`percentile_clipping` must be in')])
def test_bad_hypers_are_refused(bad, match):
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match): Adafactor(w, **bad)
    opt = Adafactor(w)
    for k, v in bad.items():
        with pytest.raises(ValueError, match=match): opt.set_hyper(k, v)
    assert opt.hypers[0] == Adafactor(w).hypers[0]


def test_warmup_init_needs_relative_step():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match='`warmup_init=True` needs `relative_step=True`'):
        Adafactor(w, relative_step=False, warmup_init=True)
    opt = Adafactor(w, warmup_init=True)
    with pytest.raises(ValueError, match='`warmup_init=True` needs'): opt.set_hyper('relative_step', False)
    assert opt.hypers[0]['relative_step'] is True


def test_reference_keywords_and_missing_paths_are_refused():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match="`eps` is bitsandbytes'/torch's name: pass `eps1=`, `eps2=`"):
        Adafactor(w, eps=(None, 1e-3))
    with pytest.raises(TypeError, match='pass `wd=`'): adafactor(weight_decay=0.1)
    with pytest.raises(TypeError, match='unexpected keyword'): Adafactor(w, betas=(0.9, 0.999))
    with pytest.raises(TypeError, match='unexpected keyword'): Adafactor(w, d=1.)  # torch's clip_threshold
    with pytest.raises(TypeError, match='unexpected keyword'): Adafactor(w, decay_rate=-0.8)  # HF's beta2_decay
    with pytest.raises(ValueError, match='no fused path'): Adafactor(w, fused=True)
    with pytest.raises(ValueError, match='Adafactor has no 8-bit path'): adafactor(eightbit=True)


def test_defaults_are_torchs():
    h = Adafactor([torch.zeros(3, requires_grad=True)]).hypers[0]
    assert (h['lr'], h['beta2_decay'], h['eps1'], h['eps2'], h['clip_threshold'], h['wd']) == (1e-2, -0.8, None, 1e-3, 1., 0.)
    assert h['relative_step'] and h['scale_parameter'] and not h['warmup_init'] and h['beta1'] == 0.


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    "bf16 weights (Kahan summation; fp32 factored state) track an fp32 run, with decay and with beta1"
    assert_bf16_tracks_fp32(lambda ps: fx_groups(Adafactor, ps, path, wd=0.05), steps=8)
    assert_bf16_tracks_fp32(lambda ps: fx_groups(Adafactor, ps, path, beta1=0.9), steps=12)


def test_step_tensors_a_few_at_a_time_is_a_normal_step():
    "Gradient release steps tensors as their gradients arrive: each tensor's math is its own, so the bits are the same"
    a, b = params(), params()
    whole, parts = fx_groups(Adafactor, a, 'foreach', wd=0.05), fx_groups(Adafactor, b, 'foreach', wd=0.05)
    for i in range(5):
        set_grads(a, i), set_grads(b, i)
        whole.step()
        for j in (5, 4, 3, 2, 1, 0): parts.step_tensors([(0 if j < 3 else 1, b[j])])
    assert_close_lists(b, a, atol=0.)



@pytest.mark.cpu_only('a fastai Learner on the digits data')
@pytest.mark.parametrize('path', PATHS)
def test_a_learner_trains(path):
    """Two epochs of fit_one_cycle: 0.967 at lr_max 0.1 (measured; 0.889 at torch's default 1e-2, whose relative step is
    made for large models), both paths; with GradientRelease too: the same bits"""
    from fastxtend_optim.demo import digits_learner
    from fastxtend_optim.release import GradientRelease
    learn = digits_learner(adafactor(foreach=path == 'foreach', wd=0.01))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 0.1)
    assert learn.validate()[1] > 0.95
    assert learn.opt.state[next(learn.model.parameters())]['step'] > 10
    released = digits_learner(adafactor(foreach=path == 'foreach', wd=0.01), cbs=GradientRelease())
    with released.no_bar(), released.no_logging(): released.fit_one_cycle(2, 0.1)
    assert all(torch.equal(p, q) for p, q in zip(learn.model.parameters(), released.model.parameters()))
