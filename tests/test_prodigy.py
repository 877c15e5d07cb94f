"Prodigy against prodigyopt's Prodigy on the native and ForEach paths: the global d, param groups, checkpoints."
import math
import pytest
import torch
from prodigyopt import Prodigy as RefProdigy
from fastxtend_optim.prodigy import Prodigy, prodigy
from conftest import (make_params, set_grads, run, assert_close_lists, fx_groups, torch_groups, roundtrip, NO_WD, LRS)

PATHS = ('native', 'foreach', 'fused')
LR = 1.
GROWS = dict(d0=1e-3, d_coef=2.)  # d doubles in 10 steps and grows 30 times in 30 on `make_params`


def fx_prodigy(params, path, lr=LR, **kwargs):
    "Two param groups at one lr (the reference refuses two), do_wd=False tensors"
    opt = fx_groups(Prodigy, params, path, **kwargs)
    opt.set_hyper('lr', lr)
    return opt


def ref_prodigy(params, lr=LR, wd=0., decouple_wd=True, beta1=0.9, beta2=0.999, bias_correction=False, **kwargs):
    "prodigyopt's Prodigy over the same tensors (do_wd=False tensors in groups of their own with no decay)"
    groups = torch_groups(params, wd)
    for g in groups: g['lr'] = lr
    return RefProdigy(groups, betas=(beta1, beta2), decouple=decouple_wd, use_bias_correction=bias_correction,
                      **kwargs)


CASES = [dict(), dict(wd=0.05), dict(wd=0.05, decouple_wd=False), dict(bias_correction=True, d0=1e-4, lr=3.),
         dict(safeguard_warmup=True), dict(beta1=0., beta3=0.9, d_coef=2., growth_rate=1.1, eps=1e-6, d0=1e-5),
         dict(lr=3., beta2=0.99, wd=0.01)]  # measured: weights within 1.5e-6 of the reference's, d within 6e-6 relative


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', CASES)
def test_matches_prodigyopt_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, both decays, bias correction, safeguard, beta1=0, growth limit: 1e-5 in fp32"
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    opt, ref_opt = fx_prodigy(ours, path, **kwargs), ref_prodigy(ref, **kwargs)
    got, expected = run(opt, ours, 60), run(ref_opt, ref, 60)
    assert opt.path == path
    assert_close_lists(got, expected, atol=1e-5)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 0.05  # the weights did travel
    d, ref_d = opt.hypers[0]['d'], ref_opt.param_groups[0]['d']
    assert d > 10 * opt.hypers[0]['d0'] and math.isclose(d, ref_d, rel_tol=5e-5), (d, ref_d)
    assert all(h['d'] == d and h['d_steps'] == 60 for h in opt.hypers)


def test_d_has_the_same_bits_on_native_and_foreach():
    "The estimate's pre-pass is one code for both paths"
    runs = []
    for path in PATHS:
        ps = make_params()
        opt = fx_groups(Prodigy, ps, path, wd=0.05)  # two lrs, as fastai's discriminative lrs
        run(opt, ps, 30)
        runs.append(([dict(h) for h in opt.hypers], ps))
    assert runs[0][0] == runs[1][0]
    assert_close_lists(runs[0][1], runs[1][1], atol=1e-6)


def test_one_group_at_lr_zero_matches_the_reference():
    "A group at lr 0 neither moves nor feeds the estimate; the other group steps as the reference's"
    ours, ref = make_params(), make_params()
    opt = fx_prodigy(ours, 'foreach')
    opt.set_hyper('lr', [0., LR])
    groups = torch_groups(ref, 0.)
    for g, lr in zip(groups, (0., 0., LR, LR)): g['lr'] = lr
    got, expected = run(opt, ours, 40), run(RefProdigy(groups), ref, 40)
    assert_close_lists(got, expected, atol=1e-5)
    assert_close_lists(got[:3], make_params()[:3], atol=0.)


def test_lrs_scale_each_groups_step():
    "Unequal lrs (which the reference refuses): halving one group's lr halves its first step and leaves the other's"
    moves = []
    for lrs in ([1., 1.], [0.5, 1.]):
        ps = [torch.zeros_like(p).requires_grad_() for p in make_params()]  # moves of ~1e-6 at full precision
        opt = fx_prodigy(ps, 'native')
        opt.set_hyper('lr', lrs)
        start = [p.detach().clone() for p in ps]
        run(opt, ps, 1)
        moves.append([p.detach() - s for p, s in zip(ps, start)])
    assert_close_lists(moves[1][:3], [m * 0.5 for m in moves[0][:3]], atol=0., rtol=1e-5)
    assert_close_lists(moves[1][3:], moves[0][3:], atol=0.)


@pytest.mark.parametrize('order', [('native', 'foreach', 'native'), ('foreach', 'native', 'foreach'), ('fused', 'native', 'fused')])
def test_checkpoint_moves_between_paths(order):
    "A run moved between paths through weights_only checkpoints ends where one path alone ends; d travels in the hypers"
    a = make_params()
    uninterrupted = run(fx_prodigy(a, order[0], **GROWS), a, 30)
    ps, last = make_params(), None
    for i, path in enumerate(order):
        ps = [p.detach().clone().requires_grad_() for p in ps]
        opt = fx_prodigy(ps, path, **GROWS)
        if last is not None:
            opt.load_state_dict(last)
            assert opt.hypers[0]['d'] == last['hypers'][0]['d'] > GROWS['d0']
        run(opt, ps, 10, start=10 * i)
        last = roundtrip(opt.state_dict())
    assert last['hypers'][0]['d_steps'] == 30 and sorted(last['state'][0]) == ['grad_avg', 'p0', 's', 'sqr_avg', 'step']
    assert_close_lists(ps, uninterrupted, atol=1e-6)


def test_resume_without_the_estimate_differs():
    "The hypers carry d: a resume that drops it (d back at d0) does not continue the run"
    a, b = make_params(), make_params()
    uninterrupted = run(fx_prodigy(a, 'foreach', **GROWS), a, 20)
    first = fx_prodigy(b, 'foreach', **GROWS)
    run(first, b, 10)
    sd = roundtrip(first.state_dict())
    for h in sd['hypers']: h.update(d=1e-3, d_max=1e-3, d_numerator=0., d_steps=0)
    second = fx_prodigy(b, 'foreach', **GROWS)
    second.load_state_dict(sd)
    assert max((x - y).abs().max() for x, y in zip(run(second, b, 10, start=10), uninterrupted)) > 1e-3


@pytest.mark.parametrize('path', PATHS)
def test_zero_gradients_move_nothing(path):
    "While every gradient so far is 0 the estimate's denominator is 0: as the reference, no weight moves, not even by decay"
    ps = make_params()
    opt = fx_prodigy(ps, path, wd=0.1)
    before = [p.detach().clone() for p in ps]
    for p in ps: p.grad = torch.zeros_like(p)
    opt.step()
    assert_close_lists(ps, before, atol=0.)
    assert opt.hypers[0]['d'] == 1e-6 and opt.hypers[0]['d_steps'] == 0
    run(opt, ps, 1)
    assert opt.hypers[0]['d_steps'] == 1


def test_missing_gradients_and_clipping_agree_across_paths():
    "Tensors without a gradient on some steps, percentile clipping: native and ForEach alike"
    from conftest import gappy_run
    results = [gappy_run(fx_prodigy(ps, path, percentile_clipping=80, wd=0.05), ps, 30) for path, ps in
               (('native', make_params()), ('foreach', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


def test_clear_state_restarts_the_estimate():
    ps = make_params()
    opt = fx_prodigy(ps, 'foreach', **GROWS)
    run(opt, ps, 10)
    assert opt.hypers[1]['d'] > 1e-3
    opt.clear_state()
    assert all(h['d'] == h['d_max'] == 1e-3 and h['d_steps'] == 0 for h in opt.hypers) and 'p0' not in opt.state[ps[0]]


def test_gradient_release_is_refused():
    ps = make_params()
    opt = fx_prodigy(ps, 'foreach')
    set_grads(ps, 0)
    with pytest.raises(RuntimeError, match='gradient release'): opt.step_tensors([(0, ps[0])])
    assert 'step' not in opt.state[ps[0]]


@pytest.mark.parametrize('bad,match', [
    (dict(beta1=1.), r'`beta1` must be in \[0, 1\)'), (dict(beta3=-0.1), r'`beta3` must be in \[0, 1\)'),
    (dict(eps=0.), '`eps` must be a finite number > 0'), (dict(d0=0.), '`d0` must be a finite number > 0'),
    (dict(d_coef=math.inf), '`d_coef` must be'), (dict(growth_rate=0.9), '`growth_rate` must be a number >= 1'),
    (dict(growth_rate=math.nan), '`growth_rate` must be'), (dict(bias_correction=1), '`bias_correction` must be a bool'),
    (dict(decouple_wd=None), '`decouple_wd` must be a bool'), (dict(lr=-1.), '`lr` must be'),
    (dict(percentile_clipping=0), '`percentile_clipping` must be in')])
def test_bad_hypers_are_refused(bad, match):
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match): Prodigy(w, **bad)
    opt = Prodigy(w)
    for k, v in bad.items():
        with pytest.raises(ValueError, match=match): opt.set_hyper(k, v)
    assert opt.hypers[0] == Prodigy(w).hypers[0]


def test_reference_keywords_and_missing_paths_are_refused():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(TypeError, match='`beta1=`, `beta2=`'): Prodigy(w, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match='`wd=`'): prodigy(weight_decay=0.1)
    with pytest.raises(ValueError, match='Prodigy has no 8-bit path'): prodigy(eightbit=True)
    with pytest.raises(ValueError, match='`d` must be a finite number > 0'): Prodigy(w).set_hyper('d', -1.)


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    """bf16 weights (Kahan summation around the Adam part) track an fp32 run. test_common's bf16 test runs at its lrs
    1e-3/3e-3, which for Prodigy multiply d0 = 1e-6: 3 steps travel 2e-9, under that test's 5e-5 floor. Here d0 = 0.1"""
    from conftest import assert_bf16_tracks_fp32
    assert_bf16_tracks_fp32(lambda ps: fx_groups(Prodigy, ps, path, d0=0.1), steps=3)
    assert_bf16_tracks_fp32(lambda ps: fx_prodigy(ps, path, **GROWS, wd=0.05), steps=12)


@pytest.mark.parametrize('path', PATHS)
def test_a_group_set_to_lr_zero_leaves_the_estimate(path):
    """A group whose lr drops to 0 mid-run stops feeding the estimate (its `s` leaves the denominator), as the
    reference: the other group steps as the reference's. It then holds still; the reference moves it on stale moments"""
    ours, ref = make_params(), make_params()
    opt = fx_prodigy(ours, path, **GROWS)
    groups = torch_groups(ref, 0.)
    for g in groups: g['lr'] = LR
    ref_opt = RefProdigy(groups, **GROWS)
    run(opt, ours, 10), run(ref_opt, ref, 10)
    held = [p.detach().clone() for p in ours[:3]]
    opt.set_hyper('lr', [0., LR])
    for g in groups[:2]: g['lr'] = 0.
    got, expected = run(opt, ours, 10, start=10), run(ref_opt, ref, 10, start=10)
    assert_close_lists(got[3:], expected[3:], atol=1e-5)
    assert_close_lists(got[:3], held, atol=0.)
    assert math.isclose(opt.hypers[0]['d'], ref_opt.param_groups[0]['d'], rel_tol=5e-5)


def test_a_learner_trains_with_one_cycle_at_lr_one_and_refuses_gradient_release():
    "fit_one_cycle scales Prodigy's lr multiplier (lr_max=1.); GradientRelease is refused before any step"
    from fastxtend_optim.demo import digits_learner
    from fastxtend_optim.release import GradientRelease
    learn = digits_learner(prodigy())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, lr_max=1.)
    assert learn.opt.hypers[0]['d'] > 1e-4 and learn.validate()[1] > 0.9
    learn = digits_learner(prodigy())
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1)  # fastai's default lr_max, 1e-3: d never moves
    assert learn.opt.hypers[0]['d'] == 1e-6
    learn = digits_learner(prodigy(), cbs=GradientRelease())
    start = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="GradientRelease cannot run here: .*Prodigy's step size d"):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1.)
    assert all(torch.equal(a, p) for a, p in zip(start, learn.model.parameters()))
