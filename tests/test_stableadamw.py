"StableAdamW against optimi's StableAdamW on every path, Cautious against a test-only loop, checkpoints across paths."
import pytest
import torch
import optimi
from fastxtend_optim.stableadamw import StableAdamW, stableadamw, stable_rms
from conftest import (assert_schedules_compile_nothing, assert_matches_reference, assert_bf16_tracks_fp32,
                      make_params, set_grads, run, gappy_run, assert_close_lists, fx_groups, torch_groups, NO_WD, LRS)

WD = 0.05
PATHS = ('native', 'foreach', 'fused')
DEFAULTS = dict(mom=0.9, sqr_mom=0.99, eps=1e-6, wd=0.01, cautious=False, percentile_clipping=100)


def fx_stable(params, path, **kwargs):
    return fx_groups(StableAdamW, params, path, **{'wd': WD, **kwargs})


def optimi_stable(params, mom=0.9, sqr_mom=0.99, eps=1e-6, wd=WD, foreach=False):
    return optimi.StableAdamW(torch_groups(params, wd), lr=LRS[1], betas=(mom, sqr_mom), eps=eps, foreach=foreach)


class LoopStableAdamW(torch.optim.Optimizer):
    "Test-only reference: optimi's math written out per tensor, plus the Cautious mask of Liang et al. 2024"
    def __init__(self, groups, mom=0.9, sqr_mom=0.99, eps=1e-6, cautious=False):
        super().__init__(groups, dict(lr=LRS[1], weight_decay=0.))
        self.mom, self.sqr_mom, self.eps, self.cautious = mom, sqr_mom, eps, cautious

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None: continue
                s, g = self.state[p], p.grad
                if not s: s.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                s['t'] += 1
                t = s['t']
                b1 = self.mom * (1 - self.mom ** (t - 1)) / (1 - self.mom ** t)
                b2 = self.sqr_mom * (1 - self.sqr_mom ** (t - 1)) / (1 - self.sqr_mom ** t)
                s['m'] = b1 * s['m'] + (1 - b1) * g
                s['v'] = b2 * s['v'] + (1 - b2) * g * g
                rms = (g * g / s['v'].clamp_min(self.eps ** 2)).mean().sqrt().item()
                lr = group['lr'] / max(1., rms)
                u = s['m'] / (s['v'].sqrt() + self.eps)
                if self.cautious:
                    mask = (u * g > 0).float()
                    u = u * mask * (u.numel() / (mask.sum() + 1))
                p.mul_(1 - lr * group['weight_decay']).sub_(lr * u)


def loop_stable(params, cautious=False, **kwargs):
    return LoopStableAdamW(torch_groups(params, kwargs.pop('wd', WD)), cautious=cautious, **kwargs)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', [dict(), dict(wd=0.3, mom=0.8, sqr_mom=0.9), dict(eps=1e-3, wd=0.)])
def test_every_path_matches_optimi_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors (optimi: weight_decay=0 groups), the RMS clip acting: within 1e-6"
    assert_matches_reference(fx_stable, optimi_stable, path, **kwargs)


def test_native_equals_optimi_closely_and_the_clip_acts():
    "The native path is optimi's op order (bitwise equal); the RMS exceeds 1 on many steps, so the clip is exercised"
    ours, ref = make_params(), make_params()
    opt, theirs = fx_stable(ours, 'native'), optimi_stable(ref)
    clipped = 0
    for i in range(60):
        set_grads(ours, i); set_grads(ref, i)
        opt.step(); theirs.step()
        clipped += sum(stable_rms(p.grad, opt.state[p]['sqr_avg'], 1e-6) > 1 for p in ours)
    assert clipped > 60  # of 360 tensor-steps
    assert_close_lists([p.detach() for p in ours], [p.detach() for p in ref], atol=0.)  # bitwise


def test_foreach_matches_optimi_foreach():
    ours, ref = make_params(), make_params()
    assert_close_lists(run(fx_stable(ours, 'foreach'), ours, 60), run(optimi_stable(ref, foreach=True), ref, 60),
                       atol=1e-6)


def test_loop_reference_is_optimi():
    "The test-only loop (used for Cautious) is optimi's StableAdamW when Cautious is off"
    a, b = make_params(), make_params()
    assert_close_lists(run(loop_stable(a), a, 60), run(optimi_stable(b), b, 60), atol=1e-6)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', [dict(), dict(wd=0.3, sqr_mom=0.9)])
def test_cautious_matches_the_papers_mask_on_every_path(path, kwargs):
    assert_matches_reference(fx_stable, loop_stable, path, cautious=True, **kwargs)


def test_cautious_changes_the_run():
    a, b = make_params(), make_params()
    diff = max((x - y).abs().max() for x, y in zip(run(fx_stable(a, 'foreach'), a, 30),
                                                      run(fx_stable(b, 'foreach', cautious=True), b, 30)))
    assert diff > 1e-3


@pytest.mark.parametrize('kwargs', [dict(), dict(percentile_clipping=80, cautious=True)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    "Tensor 2 misses gradients on some steps (its step count lags, so its betas differ): fused within 1e-6 of native"
    results = [gappy_run(fx_stable(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()), ('foreach', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)
    assert_close_lists(results[2], results[0], atol=1e-6)


def test_do_wd_false_is_not_decayed():
    "Zero gradients: every moment is 0, so only decay could move a tensor; do_wd=False tensors stay put"
    for path in PATHS:
        ps = make_params()
        opt = fx_stable(ps, path, wd=0.5)
        for p in ps: p.grad = torch.zeros_like(p)
        before = [p.detach().clone() for p in ps]
        opt.step()
        for i in range(len(ps)):
            if i in NO_WD: assert torch.equal(ps[i], before[i]), path
            else: torch.testing.assert_close(ps[i], before[i] * (1 - LRS[i >= 3] * 0.5), atol=1e-7, rtol=0)


def test_fused_schedules_do_not_recompile():
    "lr, mom, sqr_mom, eps and wd are kernel inputs"
    ps = make_params()
    assert_schedules_compile_nothing(fx_stable(ps, 'fused'), ps, dict(lr=5e-3, mom=0.8, sqr_mom=0.95, eps=1e-5,
                                                                       wd=0.2))


def test_eightbit_refused():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match='StableAdamW has no 8-bit path: no bitsandbytes kernel.*state_bits=8'): StableAdamW(w, lr=1e-3, eightbit=True)
    with pytest.raises(ValueError, match='StableAdamW has no 8-bit path'): stableadamw(eightbit=True)


@pytest.mark.parametrize('kwargs,msg', [(dict(mom=1.), '`mom` must be in [0, 1)'), (dict(mom=-0.1), '`mom` must be'),
                                        (dict(sqr_mom=1.5), '`sqr_mom` must be in [0, 1)'),
                                        (dict(eps=-1e-8), '`eps` must be a finite number >= 0'),
                                        (dict(wd=-0.01), '`wd` must be a finite number >= 0'),
                                        (dict(cautious='yes'), '`cautious` must be a bool'),
                                        (dict(percentile_clipping=0), '`percentile_clipping` must be in (0, 100]')])
def test_bad_hypers_refused_by_range(kwargs, msg):
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError) as e: StableAdamW(w, lr=1e-3, **kwargs)
    assert msg in str(e.value)
    opt = StableAdamW(w, lr=1e-3)
    (k, v), = kwargs.items()
    with pytest.raises(ValueError): opt.set_hyper(k, v)
    assert opt.hypers[0][k] == DEFAULTS[k]  # a refused value changes nothing


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    "bf16 parameters step on every path (the fused kernel in fp32) and agree with an fp32 run to bf16 resolution"
    assert_bf16_tracks_fp32(lambda ps: fx_stable(ps, path, wd=0.5))


def test_bf16_foreach_decay_is_not_rounded():
    "Zero gradients, wd=1, lr=3e-3: the factor 0.997 must not become bf16's 0.99609375 on the ForEach path"
    results = []
    for path in ('native', 'foreach'):
        ps = make_params(dtype=torch.bfloat16)
        opt = fx_stable(ps, path, wd=1., no_wd=())
        for p in ps: p.grad = torch.zeros_like(p)
        opt.step()
        results.append([p.detach().clone() for p in ps])
    assert_close_lists(results[1], results[0], atol=0.)
