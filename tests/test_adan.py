"Adan against optimi's Adan on every path (both decay modes), Cautious Adan against the paper's formula, per-tensor steps, checkpoints."
import pytest
import torch
import optimi
from optimi.adan import adan as optimi_adan
from fastxtend_optim.adan import Adan, adan
from conftest import (assert_schedules_compile_nothing, assert_matches_reference, frozen_run, make_params, set_grads,
                      run, gappy_run, assert_close_lists, fx_groups, torch_groups, NO_WD, LRS)

WD = 0.05
PATHS = ('native', 'foreach', 'fused')
BETAS = dict(beta1=0.98, beta2=0.92, beta3=0.99)


def fx_adan(params, path, **kwargs):
    return fx_groups(Adan, params, path, **{'wd': WD, **kwargs})


class OptimiAdanAdamWd(optimi.Adan):
    "optimi's Adan whose `step` passes `adam_wd` on to optimi's own functional `adan` (its class drops it)"
    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            lists = [[] for _ in range(7)]
            self._init_group(g, *lists)
            optimi_adan(*lists, lr=g['lr'], beta1=g['beta1'], beta2=g['beta2'], beta3=g['beta3'], eps=g['eps'],
                        weight_decay=g['weight_decay'], step=g['step'], adam_wd=g['adam_wd'], foreach=False)


def optimi_ref(params, adam_wd=False, wd=WD, beta1=0.98, beta2=0.92, beta3=0.99, eps=1e-6, **kwargs):
    cls = OptimiAdanAdamWd if adam_wd else optimi.Adan
    return cls(torch_groups(params, wd), lr=LRS[1], betas=(beta1, beta2, beta3), eps=eps, adam_wd=adam_wd,
               foreach=False)


@pytest.mark.parametrize('adam_wd', [False, True])
def test_native_equals_optimi(adam_wd):
    "Same operations in the same order as optimi's for-loop: equal to a few ulps over 60 steps"
    ours, ref = make_params(), make_params()
    got = run(fx_adan(ours, 'native', adam_wd=adam_wd), ours, 60)
    assert_close_lists(got, run(optimi_ref(ref, adam_wd=adam_wd), ref, 60), atol=1e-7)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', [dict(), dict(adam_wd=True), dict(wd=0.), dict(eps=0., beta1=0.9, beta2=0.5, beta3=0.9)])
def test_every_path_matches_optimi_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, Adan's and AdamW's decay, no decay, other betas: within 1e-6"
    assert_matches_reference(fx_adan, optimi_ref, path, **kwargs)


def test_optimi_class_ignores_adam_wd():
    "The fact documented in the notebook: optimi 0.3.3's `Adan(adam_wd=True)` steps exactly as `adam_wd=False`"
    a, b, c = make_params(), make_params(), make_params()
    on = run(optimi.Adan(a, lr=1e-2, weight_decay=0.5, adam_wd=True, foreach=False), a, 10)
    off = run(optimi.Adan(b, lr=1e-2, weight_decay=0.5, adam_wd=False, foreach=False), b, 10)
    honoured = run(OptimiAdanAdamWd(c, lr=1e-2, weight_decay=0.5, adam_wd=True, foreach=False), c, 10)
    assert_close_lists(on, off, atol=0.)
    assert max((x - y).abs().max() for x, y in zip(on, honoured)) > 1e-4


class CautiousAdanLoop:
    "Test-only reference: optimi's Adan math, per tensor, with the paper's mask u*g > 0 rescaled by numel/(kept + 1)"
    def __init__(self, groups, lr, betas=(0.98, 0.92, 0.99), eps=1e-6, adam_wd=False):
        self.groups, self.betas, self.eps, self.adam_wd, self.state = groups, betas, eps, adam_wd, {}

    @torch.no_grad()
    def step(self):
        b1, b2, b3 = self.betas
        hat = lambda b, t: b * (1 - b ** (t - 1)) / (1 - b ** t)
        for group in self.groups:
            lr, wd = group['lr'], group['weight_decay']
            for p in group['params']:
                g = p.grad
                s = self.state.setdefault(p, dict(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p),
                                                  n=torch.zeros_like(p), prev=g.clone()))
                s['t'] += 1
                t, d = s['t'], g - s['prev']
                s['m'] = torch.lerp(s['m'], g, 1 - hat(b1, t))
                s['v'] = torch.lerp(s['v'], d, 1 - hat(b2, t))
                s['n'] = s['n'] * hat(b3, t) + (1 - hat(b3, t)) * (g + b2 * d) ** 2
                s['prev'] = g.clone()
                u = (s['m'] + b2 * s['v']) / (s['n'].sqrt() + self.eps)
                mask = (u * g > 0).float()
                u = u * mask * (u.numel() / (mask.sum() + 1))
                if self.adam_wd: p.mul_(1 - lr * wd).sub_(lr * u)
                else: p.sub_(lr * u).div_(1 + lr * wd)


def cautious_ref(params, adam_wd=False, wd=WD, **kwargs):
    return CautiousAdanLoop(torch_groups(params, wd), lr=LRS[1], adam_wd=adam_wd)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('adam_wd', [False, True])
def test_cautious_matches_the_papers_formula_on_every_path(path, adam_wd):
    "Cautious Adan against the test-only loop, two groups, do_wd=False tensors, both decays: within 1e-6 over 60 steps"
    assert_matches_reference(fx_adan, cautious_ref, path, cautious=True, adam_wd=adam_wd)


def test_cautious_masks_something():
    "The mask is not vacuous: cautious and plain Adan part ways"
    a, b = make_params(), make_params()
    on, off = run(fx_adan(a, 'foreach', cautious=True), a, 10), run(fx_adan(b, 'foreach'), b, 10)
    assert max((x - y).abs().max() for x, y in zip(on, off)) > 1e-4


@pytest.mark.parametrize('path', PATHS)
def test_first_step_sets_no_difference(path):
    "Step 1: v stays 0, n = g^2, prev_grad = g; the move is -lr*g/(|g|+eps), then divided by 1 + lr*wd"
    ps = make_params()
    start = [p.detach().clone() for p in ps]
    opt = fx_adan(ps, path)
    run(opt, ps, 1)
    set_grads(start, 0)
    for i, (p, p0) in enumerate(zip(ps, start)):
        s, g, lr = opt.state[p], p0.grad, LRS[0] if i < 3 else LRS[1]
        assert torch.equal(s['diff_avg'], torch.zeros_like(p)) and torch.equal(s['prev_grad'], g)
        torch.testing.assert_close(s['sqr_avg'], g * g, atol=0., rtol=1e-6)
        wd = 0. if i in NO_WD else WD
        torch.testing.assert_close(p.detach(), (p0 - lr * g / (g.abs() + 1e-6)) / (1 + lr * wd), atol=1e-6, rtol=0.)


@pytest.mark.parametrize('path', ['foreach', 'fused'])
def test_per_tensor_step_counts_match_native(path):
    "The first group has no gradient for 8 steps: its tensors then start at their own step 1 (d = 0, debiasing anew)"
    a, b = make_params(), make_params()
    opt = fx_adan(b, path)
    got = frozen_run(opt, b)
    assert [opt.state[p]['step'] for p in b] == [12] * 3 + [20] * 3
    assert_close_lists(got, frozen_run(fx_adan(a, 'native'), a), atol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(), dict(percentile_clipping=80, adam_wd=True), dict(cautious=True)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    results = [gappy_run(fx_adan(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


def test_fused_schedules_do_not_recompile():
    "lr, betas, wd and adam_wd are kernel inputs: changing them compiles nothing new"
    ps = make_params()
    assert_schedules_compile_nothing(fx_adan(ps, 'fused'), ps, dict(lr=5e-3, beta2=0.8, adam_wd=True, wd=0.1))


def test_eightbit_refused():
    with pytest.raises(ValueError, match='Adan has no 8-bit path: no bitsandbytes kernel.*state_bits=8'):
        Adan(make_params(), lr=1e-3, eightbit=True)
    with pytest.raises(ValueError, match='Adan has no 8-bit path'):
        adan(eightbit=True)


@pytest.mark.parametrize('kwargs,msg', [(dict(beta1=1.), '`beta1` must be in \\[0, 1\\)'),
                                        (dict(beta2=-0.1), '`beta2` must be in \\[0, 1\\)'),
                                        (dict(beta3=float('nan')), '`beta3` must be in \\[0, 1\\)'),
                                        (dict(eps=-1e-8), '`eps` must be a finite number >= 0'),
                                        (dict(wd=-0.1), '`wd` must be a finite number >= 0'),
                                        (dict(adam_wd='yes'), '`adam_wd` must be a bool'),
                                        (dict(cautious=1), '`cautious` must be a bool'),
                                        (dict(percentile_clipping=0), '`percentile_clipping` must be in')])
def test_bad_hypers_refused_by_range(kwargs, msg):
    ps = make_params()
    with pytest.raises(ValueError, match=msg): Adan(ps, lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match=msg): adan(**kwargs)
    opt = Adan(ps, lr=1e-3)
    (name, v), = kwargs.items()
    before = opt.hypers[0][name]
    with pytest.raises(ValueError, match=msg): opt.set_hyper(name, v)
    assert opt.hypers[0][name] == before
