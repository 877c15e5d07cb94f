"LARS/LARC against fastai's Larc, torch's SGD and bitsandbytes, across paths and checkpoints."
import pytest
import torch
import bitsandbytes.optim as bnb_optim
import fastai.optimizer as fastai_optim
from fastxtend_optim import core
from fastxtend_optim.lars import Lars, _buffer
from conftest import lockstep_absmax, make_params, run, assert_close_lists, fx_groups, torch_groups, LRS, PATH_KWARGS

TRUST = 0.5  # large enough that 100 steps move the weights far from where they started


def fx_lars(params, path, **kwargs):
    return fx_groups(Lars, params, path, **{'trust_coeff': TRUST, **kwargs})


@pytest.mark.parametrize('clip', [True, False])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_native_matches_fastai_larc(clip, decouple_wd):
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    got = run(fx_lars(ours, 'native', clip=clip, wd=0.01, decouple_wd=decouple_wd), ours, 100)
    larc = fx_groups(fastai_optim.Larc, ref, None, clip=clip, trust_coeff=TRUST, wd=0.01, decouple_wd=decouple_wd)
    expected = run(larc, ref, 100)
    assert_close_lists(got, expected, atol=1e-6, rtol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 1e-2


@pytest.mark.parametrize('kwargs', [dict(), dict(nesterov=True), dict(dampening=0.3, max_unorm=0.01),
                                    dict(clip=True, decouple_wd=False, wd=0.1)])
def test_foreach_equals_native(kwargs, monkeypatch):
    monkeypatch.setattr(core, 'FOREACH_CPU_CHUNK', 1000)  # chunk boundaries inside the groups too
    a, b = make_params(), make_params()
    assert_close_lists(run(fx_lars(a, 'native', **kwargs), a, 100), run(fx_lars(b, 'foreach', **kwargs), b, 100),
                       atol=1e-6)


@pytest.mark.parametrize('path', ['native', 'foreach'])
@pytest.mark.parametrize('mom,dampening,nesterov', [(0.9, 0., False), (0.9, 0.3, False), (0.9, 0., True),
                                                    (0., 0., False)])
def test_no_trust_ratio_is_torch_sgd(path, mom, dampening, nesterov):
    ours, ref = make_params(), make_params()
    got = run(fx_lars(ours, path, trust_coeff=None, mom=mom, dampening=dampening, nesterov=nesterov, wd=0.01,
                      decouple_wd=False), ours, 100)
    sgd = torch.optim.SGD(torch_groups(ref, 0.01), momentum=mom, dampening=dampening, nesterov=nesterov, foreach=False)
    assert_close_lists(got, run(sgd, ref, 100), atol=1e-6)


def test_max_unorm_matches_bitsandbytes_lars32bit():
    "bitsandbytes' 32-bit LARS kernel applies the update-norm clip; so do all of ours"
    ours, ref = make_params(), make_params()
    kw = dict(trust_coeff=None, wd=0.01, decouple_wd=False, max_unorm=0.02)
    got = run(fx_lars(ours, 'foreach', **kw), ours, 30)
    expected = run(bnb_optim.LARS32bit(torch_groups(ref, 0.01), lr=1e-3, momentum=0.9, max_unorm=0.02), ref, 30)
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(), dict(nesterov=True), dict(dampening=0.3), dict(max_unorm=0.01),
                                    dict(decouple_wd=False, wd=0.1), dict(wd=0.01), dict(mom=0.),
                                    dict(trust_coeff=None, dampening=0.3)])
def test_eightbit_with_fp32_state_equals_native(kwargs):
    """With 32-bit state the kernel is exact, so the mapping of trust ratio, dampening, Nesterov and clip is checked.
    Nesterov is split into two updates of p (kernel, then -lr*g), each rounding once more: up to 2 ulp (1.2e-7
    relative) per step, so 50 steps allow 1e-5 relative"""
    a, b = make_params(), make_params()
    got = run(fx_lars(a, 'eightbit', optim_bits=32, **kwargs), a, 50)
    assert_close_lists(got, run(fx_lars(b, 'native', **kwargs), b, 50), atol=1e-6, rtol=1e-5)


def test_eightbit_stays_within_the_quantization_bound():
    """8-bit blockwise state rounds each momentum element to the nearest of 256 codes scaled by its block's absmax.
    The widest gap of bitsandbytes' signed dynamic map is 0.0141, so one rounding errs by at most 0.0070*absmax.
    The buffer is re-rounded every step and old errors decay by `mom`, so its error stays below
    0.0070*absmax/(1-mom). With clip=True each step moves a weight by at most lr times the buffer, so after T steps
    the weights differ by at most T*lr*0.0070*absmax/(1-mom), doubled for the trust ratio's own small drift."""
    mom, steps = 0.9, 50
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    eight, native = fx_lars(a, 'eightbit', clip=True, mom=mom), fx_lars(b, 'native', clip=True, mom=mom)
    absmax, half_gap = lockstep_absmax(eight, native, a, b, steps)
    buf_bound = half_gap * absmax / (1 - mom)
    for p, q, p0 in zip(a, b, start):
        if p.numel() < 4096: continue
        assert (_buffer(eight.state[p]) - native.state[q]['grad_avg']).abs().max() <= buf_bound
        assert (p - q).abs().max() <= 2 * steps * max(LRS) * buf_bound
        # The bounds above are worst cases. Where the weights went, as a whole: rounding errors of successive steps
        # are independent and largely cancel (measured: 1.8% of the distance travelled), while a wrong factor in the
        # mapping onto the kernel (lr, momentum, dampening) moves it by that factor (an lr off by half: 49%)
        assert (p - q).norm() <= 0.05 * (q - p0).norm()
    assert any(eight.state[p]['state1'].dtype == torch.uint8 for p in a)


def test_foreach_step_does_not_sync(monkeypatch):
    "No .item(), .tolist() or Python truth test of a tensor in the ForEach step"
    a = make_params()
    opt = fx_lars(a, 'foreach', clip=True, max_unorm=0.01)
    run(opt, a, 1)
    def refuse(*args, **kwargs): raise AssertionError('host sync in the ForEach step')
    before = [p.detach().clone() for p in a]
    for name in ('item', 'tolist', '__bool__', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    opt.step()  # a sync would raise inside it
    monkeypatch.undo()
    assert all(not torch.equal(p, q) for p, q in zip(a, before))  # and the step did step every tensor


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_zero_norms_fall_back_to_lr(path):
    """A zero gradient (a parameter left out of the forward pass) would give lr*trust_coeff*|p|/eps, a step of 1e5;
    a zero weight would give a ratio of 0 and never train. Both take the plain lr instead"""
    w, z = torch.ones(4, requires_grad=True), torch.zeros(4, requires_grad=True)
    opt = Lars([w, z], lr=0.1, mom=0.9, **PATH_KWARGS[path], **({'optim_bits': 32} if path == 'eightbit' else {}))
    w.grad, z.grad = torch.ones(4), torch.ones(4)
    opt.step()  # w: ratio 0.02*2/2 -> local lr 0.002; z: |p| = 0 -> lr
    torch.testing.assert_close(z.detach(), torch.full((4,), -0.1))
    torch.testing.assert_close(w.detach(), torch.full((4,), 1 - 0.002))
    w.grad = torch.zeros(4)
    opt.step()  # |g| = 0: lr times the momentum left in the buffer, 0.9 * 1
    torch.testing.assert_close(w.detach(), torch.full((4,), 1 - 0.002 - 0.1 * 0.9))
