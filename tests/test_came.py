"CAME against came_pytorch's CAME on the native and ForEach paths: factored state, checkpoints, bf16, a Learner."
import math, re
import pytest
import torch
from came_pytorch import CAME as RefCAME
from fastxtend_optim.came import CAME, came, FACTORED_KEYS
from conftest import (make_params, set_grads, run, assert_close_lists, fx_groups, torch_groups, roundtrip, NO_WD, LRS)

PATHS = ('native', 'foreach')
SHAPES = ((64, 32), (32,), (8, 16, 12), (10, 64), (4, 3, 3, 3), (10,))  # 2-D, 1-D, 3-D, 2-D, 4-D (conv), 1-D
FACTORED, FLAT = (0, 2, 3, 4), (1, 5)


def params():
    return make_params(shapes=SHAPES)


def fx_came(ps, path, **kwargs):
    "Two param groups at lrs `LRS`, do_wd=False tensors `NO_WD` (a 1-D and a 1-D)"
    return fx_groups(CAME, ps, path, **kwargs)


def ref_came(ps, wd=0., beta1=0.9, beta2=0.999, beta3=0.9999, eps1=1e-30, eps2=1e-16, **kwargs):
    "came_pytorch's CAME over the same tensors (do_wd=False tensors in groups of their own with no decay)"
    return RefCAME(torch_groups(ps, wd), lr=LRS[0], betas=(beta1, beta2, beta3), eps=(eps1, eps2), **kwargs)


CASES = [dict(), dict(wd=0.1), dict(wd=0.05, beta1=0.5, beta2=0.9, beta3=0.99, clip_threshold=0.5),
         dict(beta1=0., eps1=1e-20, eps2=1e-10, clip_threshold=10.)]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', CASES)
def test_matches_came_pytorch_over_60_steps(path, kwargs):
    "1-D to 4-D tensors, two param groups, do_wd=False tensors, weight decay: within 1e-6 of the reference in fp32"
    ours, ref = params(), params()
    start = [p.detach().clone() for p in ours]
    opt = fx_came(ours, path, **kwargs)
    got, expected = run(opt, ours, 60), run(ref_came(ref, **kwargs), ref, 60)
    assert opt.path == path
    # measured: at most 4.2e-7 apart; 4.8e-6 at beta1=0, where m is the clipped update, the instability is eps2 and the
    # factored steps are ~1e5 * lr, so the weights travel up to 7.6
    assert_close_lists(got, expected, atol=1e-5 if kwargs.get('beta1') == 0 else 1e-6)
    travel = [(a - b).abs().max().item() for a, b in zip(got, start)]
    assert min(travel) > 0.01, travel  # every tensor did travel (measured >= 0.0129)
    for i in FACTORED:
        s = opt.state[ours[i]]
        assert 'sqr_avg' not in s and s['row_sqr_avg'].shape == SHAPES[i][:-1]
        assert s['col_res_avg'].shape == SHAPES[i][:-2] + SHAPES[i][-1:]
    assert all(sorted(opt.state[ours[i]]) == ['do_wd', 'grad_avg', 'sqr_avg', 'step'] for i in FLAT)


def test_weight_decay_is_the_references_decoupled_one():
    "wd moves the weights by -lr*wd*x beyond the run without it (the same gradients: the update does not read x)"
    a, b = params(), params()
    opt_a, opt_b = CAME(a, lr=1e-2, wd=0.5), CAME(b, lr=1e-2)
    for p, q in zip(a, b): p.grad = torch.ones_like(p); q.grad = torch.ones_like(q)
    before = [p.detach().clone() for p in a]
    opt_a.step(), opt_b.step()
    assert_close_lists([p.detach() for p in a], [q.detach() - 1e-2 * 0.5 * x for q, x in zip(b, before)], atol=1e-6)


@pytest.mark.parametrize('order', [('native', 'foreach', 'native'), ('foreach', 'native', 'foreach')])
def test_checkpoint_moves_between_paths(order):
    "A run moved between paths through weights_only checkpoints ends where one path alone ends, factored state and all"
    a = params()
    uninterrupted = run(fx_came(a, order[0], wd=0.1), a, 30)
    ps, last = params(), None
    for i, path in enumerate(order):
        ps = [p.detach().clone().requires_grad_() for p in ps]
        opt = fx_came(ps, path, wd=0.1)
        if last is not None: opt.load_state_dict(last)
        run(opt, ps, 10, start=10 * i)
        last = roundtrip(opt.state_dict())
    assert sorted(last['state'][2]) == sorted(['grad_avg', 'step', *FACTORED_KEYS])
    assert last['state'][2]['step'] == 30 and last['state'][2]['row_sqr_avg'].shape == (8, 16)
    assert_close_lists(ps, uninterrupted, atol=1e-6)


def test_resume_without_the_factored_state_differs():
    "The factored state matters: a resume that zeroes it does not continue the run"
    a, b = params(), params()
    uninterrupted = run(fx_came(a, 'foreach'), a, 20)
    first = fx_came(b, 'foreach')
    run(first, b, 10)
    sd = roundtrip(first.state_dict())
    for s in sd['state']:
        for k in FACTORED_KEYS:
            if k in s: s[k] = torch.zeros_like(s[k])
    second = fx_came(b, 'foreach')
    second.load_state_dict(sd)
    assert max((x - y).abs().max() for x, y in zip(run(second, b, 10, start=10), uninterrupted)) > 1e-3


@pytest.mark.parametrize('key,shape,whole', [('row_sqr_avg', (16,), (8, 16)), ('col_sqr_avg', (8, 16), (8, 12)),
                                             ('row_res_avg', (8, 12), (8, 16)), ('col_res_avg', (12,), (8, 12))])
def test_wrongly_shaped_factored_state_is_refused(key, shape, whole):
    "A saved row or column average of the wrong shape (another model's) is refused by name, and nothing is loaded"
    ps = params()
    opt = fx_came(ps, 'foreach')
    run(opt, ps, 2)
    sd = roundtrip(opt.state_dict())
    sd['state'][2][key] = torch.zeros(shape)
    fresh = fx_came(params(), 'foreach')
    with pytest.raises(ValueError, match=re.escape(f"saved state '{key}' of parameter 2 has shape {tuple(shape)}, the parameter {whole}")):
        fresh.load_state_dict(sd)
    assert all(k not in s for s in fresh.state.values() for k in FACTORED_KEYS)
    sd['state'][2][key] = torch.zeros(whole)  # the right shape loads
    fresh.load_state_dict(sd)
    assert fresh.state[fresh.param_lists[0][2]][key].shape == whole


def test_missing_gradients_and_clipping_agree_across_paths():
    "Tensors without a gradient on some steps, percentile clipping: native and ForEach alike"
    from conftest import gappy_run
    results = [gappy_run(fx_came(ps, path, percentile_clipping=80, wd=0.05), ps, 30) for path, ps in
               (('native', params()), ('foreach', params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


@pytest.mark.parametrize('bad,match', [
    (dict(beta1=1.), r'`beta1` must be in \[0, 1\)'), (dict(beta2=-0.1), r'`beta2` must be in \[0, 1\)'),
    (dict(beta3=1.), r'`beta3` must be in \[0, 1\)'), (dict(eps1=0.), '`eps1` must be a finite number > 0'),
    (dict(eps2=math.inf), '`eps2` must be a finite number > 0'),
    (dict(clip_threshold=0.), '`clip_threshold` must be a finite number > 0'), (dict(wd=-0.1), '`wd` must be'),
    (dict(lr=-1.), '`lr` must be'), (dict(percentile_clipping=0), '`percentile_clipping` must be in')])
def test_bad_hypers_are_refused(bad, match):
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match): CAME(w, **{'lr': 1e-3, **bad})
    opt = CAME(w, lr=1e-3)
    for k, v in bad.items():
        with pytest.raises(ValueError, match=match): opt.set_hyper(k, v)
    assert opt.hypers[0] == CAME(w, lr=1e-3).hypers[0]


def test_torch_keywords_are_answered_with_ours_and_missing_paths_refused():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match='`betas` .*`beta1=`, `beta2=`, `beta3=`'): CAME(w, lr=1e-3, betas=(0.9, 0.99, 0.999))
    with pytest.raises(TypeError, match='`eps` .*`eps1=`, `eps2=`'): CAME(w, lr=1e-3, eps=(1e-30, 1e-16))
    with pytest.raises(TypeError, match='`weight_decay` .*`wd=`'): came(weight_decay=0.1)
    with pytest.raises(ValueError, match='no fused path'): CAME(w, lr=1e-3, fused=True)
    with pytest.raises(ValueError, match='CAME has no 8-bit path'): came(eightbit=True)
    with pytest.raises(TypeError): CAME(w)  # no default lr, as the reference
    d = CAME(w, lr=1e-3).hypers[0]
    assert (d['beta1'], d['beta2'], d['beta3'], d['eps1'], d['eps2'], d['clip_threshold'], d['wd']) == \
           (0.9, 0.999, 0.9999, 1e-30, 1e-16, 1., 0.)  # the reference's defaults


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    "bf16 weights (Kahan summation) track an fp32 run; the factored state stays fp32, the element-wise state bf16"
    from conftest import assert_bf16_tracks_fp32
    assert_bf16_tracks_fp32(lambda ps: fx_came(ps, path, wd=0.05), steps=8)
    ps = make_params(dtype=torch.bfloat16)
    opt = fx_came(ps, path)
    run(opt, ps, 2)
    s = opt.state[ps[0]]
    assert s['row_sqr_avg'].dtype == s['col_res_avg'].dtype == torch.float32 and s['grad_avg'].dtype == torch.bfloat16


def test_bf16_without_rounding_steps_and_agrees_across_paths():
    "bf16 weights and gradients with no Kahan summation: mixed-dtype math (fp32 factored state) on both paths"
    runs = []
    for p in PATHS:
        ps = make_params(dtype=torch.bfloat16)
        start = [x.detach().float() for x in ps]
        out = run(fx_came(ps, p, kahan_sum=False), ps, 5)
        assert all(x.dtype == torch.bfloat16 and x.isfinite().all() for x in out)
        assert (out[0].float() - start[0]).abs().max() > 1e-3
        runs.append([x.float() for x in out])
    assert_close_lists(runs[0], runs[1], atol=2**-7)  # within a bf16 ulp at |w| < 2



@pytest.mark.cpu_only('a fastai Learner on the digits data')
@pytest.mark.parametrize('path', PATHS)
def test_a_learner_trains(path):
    "Two epochs of fit_one_cycle on the digits data reach Adam's accuracy"
    from fastxtend_optim.demo import digits_learner
    learn = digits_learner(came(foreach=path == 'foreach', wd=0.01))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 3e-3)
    assert learn.opt.path == path
    assert learn.validate()[1] > 0.9
