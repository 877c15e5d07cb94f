"Adam/AdamW against fastai, torch.optim and bitsandbytes, across paths, schedules and checkpoints."
import pytest
import torch
import bitsandbytes.optim as bnb_optim
import fastai.optimizer as fastai_optim
from fastxtend_optim import eightbit as eightbit_module
from fastxtend_optim.adam import Adam, adam
from conftest import (make_params, run, assert_close_lists, fx_groups, torch_groups, assert_matches_reference, NO_WD,
                      PATH_KWARGS)

WD = 0.05


def fx_adam(params, path, **kwargs):
    return fx_groups(Adam, params, path, **{'wd': WD, **kwargs})


@pytest.mark.parametrize('decouple_wd', [True, False])
def test_native_equals_fastai_adam_exactly(decouple_wd):
    ours, ref = make_params(), make_params()
    got = run(fx_adam(ours, 'native', decouple_wd=decouple_wd), ours, 100)
    expected = run(fx_groups(fastai_optim.Adam, ref, None, wd=WD, decouple_wd=decouple_wd), ref, 100)
    assert_close_lists(got, expected, atol=0.)


@pytest.mark.parametrize('path', ['native', 'foreach'])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_matches_torch_adam_and_adamw_over_100_steps(path, decouple_wd):
    "AdamW for decoupled decay, Adam(weight_decay) for L2; do_wd=False tensors are a group with weight_decay=0"
    ours, ref = make_params(), make_params()
    got = run(fx_adam(ours, path, decouple_wd=decouple_wd), ours, 100)
    torch_cls = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    expected = run(torch_cls(torch_groups(ref, WD), betas=(0.9, 0.99), eps=1e-5, foreach=False), ref, 100)
    assert_close_lists(got, expected, atol=1e-6)


def test_l2_skips_do_wd_false_tensors():
    "The fastxtend bug: in L2 mode a do_wd=False tensor got g += 1.0*p. With zero grads it must not move at all"
    for path in ('native', 'foreach', 'eightbit'):
        ps = make_params()
        opt = fx_adam(ps, path, decouple_wd=False)
        for p in ps: p.grad = torch.zeros_like(p)
        before = [p.detach().clone() for p in ps]
        opt.step()
        for i in NO_WD: assert torch.equal(ps[i], before[i]), path
        assert not torch.equal(ps[0], before[0]), path


@pytest.mark.parametrize('path', ['native', 'foreach'])
def test_amsgrad_matches_torch(path):
    ours, ref = make_params(), make_params()
    got = run(fx_adam(ours, path, amsgrad=True), ours, 100)
    expected = run(torch.optim.AdamW(torch_groups(ref, WD), betas=(0.9, 0.99), eps=1e-5, amsgrad=True, foreach=False),
                   ref, 100)
    assert_close_lists(got, expected, atol=1e-6)


def test_native_and_foreach_agree_with_amsgrad_and_l2():
    a, b = make_params(), make_params()
    kw = dict(amsgrad=True, decouple_wd=False)
    assert_close_lists(run(fx_adam(a, 'native', **kw), a, 100), run(fx_adam(b, 'foreach', **kw), b, 100), atol=1e-6)


@pytest.mark.parametrize('optim_bits,bnb_cls', [(8, bnb_optim.AdamW8bit), (32, bnb_optim.AdamW32bit)])
def test_eightbit_matches_bitsandbytes(optim_bits, bnb_cls):
    ours, ref = make_params(), make_params()
    opt = fx_adam(ours, 'eightbit', optim_bits=optim_bits)
    got = run(opt, ours, 20)
    expected = run(bnb_cls(torch_groups(ref, WD), betas=(0.9, 0.99), eps=1e-5), ref, 20)
    assert_close_lists(got, expected, atol=0.)
    big = torch.uint8 if optim_bits == 8 else torch.float32
    for p in ours:
        want = torch.float32 if p.numel() < 4096 else big
        assert opt.state[p]['state1'].dtype == want and opt.state[p]['state2'].dtype == want
    if optim_bits == 8: assert opt.state[ours[3]]['absmax2'].shape == (17,)  # 4097 elements: a partial block


def test_eightbit_l2_matches_native_l2():
    "L2 goes into the gradient before the kernel: with fp32 state the kernel's arithmetic is the only difference"
    a, b = make_params(), make_params()
    got = run(fx_adam(a, 'eightbit', decouple_wd=False, optim_bits=32), a, 50)
    assert_close_lists(got, run(fx_adam(b, 'native', decouple_wd=False), b, 50), atol=1e-5)


class KernelSpy:
    "Records the β1 each path really used, by wrapping what the path calls"
    def __init__(self, opt, monkeypatch):
        self.used = []
        if opt.path == 'native':
            inner = opt.cbs[0]
            opt.cbs = [lambda p, g, **kw: self.used.append(kw['mom']) or inner(p, g, **kw)]
        elif opt.path == 'foreach':
            inner = opt.foreach_step
            opt.foreach_step = lambda *a, **kw: self.used.append(kw['mom']) or inner(*a, **kw)
        else:
            for name in ('optimizer_update_8bit_blockwise', 'optimizer_update_32bit'):
                inner_k = getattr(eightbit_module.bnb_functional(), name)
                monkeypatch.setattr(eightbit_module.bnb_functional(), name, self._wrap(inner_k))

    def _wrap(self, inner):
        return lambda **kw: self.used.append(kw['beta1']) or inner(**kw)


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_fit_one_cycle_schedules_mom_on_every_path(path, monkeypatch):
    from fastxtend_optim.demo import digits_learner, digits_dls
    from fastai.callback.all import Callback
    scheduled = []
    class Record(Callback):
        order = 99
        def before_step(self): scheduled.append(float(self.opt.hypers[-1]['mom']))
    learn = digits_learner(adam(**PATH_KWARGS[path]), digits_dls(), cbs=Record())
    learn.create_opt()
    spy = KernelSpy(learn.opt, monkeypatch)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, 1e-3)
    used = sorted(set(round(float(m), 9) for m in spy.used))
    assert min(used) < 0.86 and max(used) > 0.94          # the cycle 0.95 -> 0.85 -> 0.95 reached the update
    assert set(round(m, 9) for m in scheduled) == set(used)


class CautiousAdamW(torch.optim.Optimizer):
    "The paper's cautious AdamW (Liang et al. 2024), one tensor at a time, written out here as the reference"
    def __init__(self, params, lr, mom, sqr_mom, eps, decouple):
        super().__init__(params, dict(lr=lr, mom=mom, sqr_mom=sqr_mom, eps=eps, decouple=decouple))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, b1, b2, wd = group['lr'], group['mom'], group['sqr_mom'], group['weight_decay']
            for p in group['params']:
                s = self.state[p]
                if not s: s.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                s['t'] += 1
                g = p.grad if group['decouple'] else p.grad + wd * p
                s['m'].lerp_(g, 1 - b1)
                s['v'].mul_(b2).addcmul_(g, g, value=1 - b2)
                u = s['m'] / (1 - b1 ** s['t']) / ((s['v'] / (1 - b2 ** s['t'])).sqrt() + group['eps'])
                mask = (u * g > 0).float()
                if group['decouple']: p.mul_(1 - lr * wd)
                p.sub_(lr * u * mask * (mask.numel() / (mask.sum() + 1)))


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_cautious_matches_the_papers_formula(path, decouple_wd):
    "Cautious Adam/AdamW against the written-out formula: 60 steps, two groups, do_wd=False tensors, both decays"
    ref_fn = lambda ps: CautiousAdamW(torch_groups(ps, WD), lr=1e-3, mom=0.9, sqr_mom=0.99, eps=1e-5,
                                      decouple=decouple_wd)
    assert_matches_reference(lambda ps, path: fx_adam(ps, path, cautious=True, decouple_wd=decouple_wd), ref_fn, path)
