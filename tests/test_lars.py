"LARS/LARC against fastai's Larc, torch's SGD and bitsandbytes, across paths and checkpoints."
import warnings
import pytest
import torch
import torch.distributed.checkpoint as dcp
import bitsandbytes.optim as bnb_optim
import fastai.optimizer as fastai_optim
from fastxtend_optim import core, base
from fastxtend_optim.lars import Lars, _buffer
from fastxtend_optim.distributed import sharded_state_dict, load_sharded_state_dict
from conftest import (lockstep_absmax, make_params, set_grads, run, assert_close_lists, fx_groups, torch_groups, roundtrip,
                      LRS, PATH_KWARGS)

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
    monkeypatch.setattr(base, 'FOREACH_CPU_CHUNK', 1000)  # chunk boundaries inside the groups too
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


# `local_lr`: each tensor's learning rate in its state, fastai `Larc`'s key, on every path

LOCAL_LR_PATHS = {'native': {}, 'foreach': {}, 'fused': {}, 'eightbit32': dict(optim_bits=32), 'eightbit': {}}


def fx_path(params, path, **kwargs):
    "`fx_lars` on `path`, where 'eightbit32' is the 8-bit path with bitsandbytes' exact 32-bit state"
    return fx_lars(params, path.removesuffix('32'), **LOCAL_LR_PATHS[path], **kwargs)


def assert_holds_local_lr(opt, params):
    "Every tensor's state holds `local_lr`, a 0-d fp32 tensor on the tensor's device"
    for p in params:
        lr = opt.state[p]['local_lr']
        assert isinstance(lr, torch.Tensor) and lr.ndim == 0 and lr.dtype == torch.float32 and lr.device == p.device


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit32'])
@pytest.mark.parametrize('kwargs', [dict(clip=True, trust_coeff=1., wd=0.01),
                                    dict(clip=False, wd=0.01, decouple_wd=False)])
def test_local_lr_matches_fastai_larc(path, kwargs):
    """Step by step, each tensor's `local_lr` is fastai `Larc`'s, to fp32 rounding. `trust_coeff=1` with the clip caps
    some tensors on some steps (fastai then stores the float `lr`) and not others; the second case is L2 decay.
    Measured over 5 steps: ForEach and 32-bit 8-bit bitwise, native 1.4e-7 relative (its ratio in Python floats,
    fastai's in fp32: a few roundings of 2**-24), fused 3.6e-7 (its norms summed row by row); the clip 4.8e-8 (fp32
    `lr`). 2e-6 is 5 times the largest; a wrong formula (a norm before decay, L2 left out of |g|) moves it by 1e-3 or
    more, the clip by up to 100%"""
    ours, ref = make_params(), make_params()
    opt = fx_path(ours, path, **kwargs)
    larc = fx_groups(fastai_optim.Larc, ref, None, **{'trust_coeff': TRUST, **kwargs})
    capped = 0
    for i in range(5):
        run(opt, ours, 1, start=i)
        run(larc, ref, 1, start=i)
        assert_holds_local_lr(opt, ours)
        for p, q in zip(ours, ref):
            got, want = opt.state[p]['local_lr'].item(), larc.state[q]['local_lr']
            capped += isinstance(want, float)
            assert abs(got - float(want)) <= 2e-6 * float(want), (i, tuple(p.shape), got, float(want))
    assert opt.path == path.removesuffix('32')
    assert (0 < capped < 30) if kwargs['clip'] else capped == 0  # both of fastai's cases were compared


@pytest.mark.parametrize('path', list(LOCAL_LR_PATHS))
@pytest.mark.parametrize('kwargs', [dict(), dict(clip=True, max_unorm=0.01, nesterov=True)])
def test_local_lr_is_the_rate_each_tensor_stepped_with(path, kwargs):
    """After one step (the buffer is the gradient), each weight moved by `local_lr` times its update: the gradient,
    or 1.9 times it with Nesterov, where `max_unorm` scales it down and `local_lr` holds that factor too. 8-bit state
    quantizes nothing on the first step's update. The bound is fp32 rounding: the new weight rounds by half an ulp
    (2**-24 |p|; twice with 8-bit Nesterov, whose -lr*g is a second add), the step itself by a few 2**-24 of it. The
    steps are 1e-4 to 1e-3, the rounding below 5e-7: a rate off by 1% is 10 times the bound"""
    ps = make_params()
    opt = fx_path(ps, path, wd=0., **kwargs)
    start = [p.detach().clone() for p in ps]
    run(opt, ps, 1)
    assert_holds_local_lr(opt, ps)
    scale, eps = 1.9 if kwargs.get('nesterov') else 1., torch.finfo(torch.float32).eps
    for p, p0 in zip(ps, start):
        step = opt.state[p]['local_lr'] * scale * p.grad
        assert ((p0 - p.detach() - step).abs() <= eps * (p0.abs() + step.abs())).all(), tuple(p.shape)
    for p, p0, lr in zip(ps, start, [LRS[0]] * 3 + [LRS[1]] * 3):  # and it is the rate LARS's formula gives
        trusted = lr * TRUST * p0.norm() / p.grad.norm()
        if kwargs.get('clip'): trusted = trusted.clamp(max=lr)
        if kwargs.get('max_unorm'): trusted = trusted * (0.01 * p0.norm() / (scale * p.grad).norm()).clamp(max=1)
        torch.testing.assert_close(opt.state[p]['local_lr'], trusted, rtol=1e-5, atol=0)


@pytest.mark.parametrize('path', list(PATH_KWARGS))
def test_bf16_weights_keep_local_lr(path):
    "16-bit weights step as fp32 working copies off the fused path: `local_lr` still reaches their states"
    ps = make_params(dtype=torch.bfloat16)
    opt = fx_lars(ps, path)
    run(opt, ps, 2)
    assert_holds_local_lr(opt, ps)


def test_local_lr_is_kept_in_checkpoints_that_move_between_paths():
    """`local_lr` is saved and loaded as fastai's `Larc` checkpoints hold it, on every path and between paths, 8-bit
    included (its conversion carries it as it is), and the next step sets it again"""
    ps = make_params()
    order = ['native', 'foreach', 'fused', 'eightbit', 'native']
    opt = fx_lars(ps, order[0])
    run(opt, ps, 2)
    for i, path in enumerate(order[1:], 1):
        sd = roundtrip(opt.state_dict())
        saved = [s['local_lr'] for s in sd['state']]
        for s, p in zip(saved, ps): torch.testing.assert_close(s, opt.state[p]['local_lr'], rtol=0, atol=0)
        opt = fx_lars(ps, path)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # the 8-bit conversions' one warning: test_convert's
            opt.load_state_dict(sd)
        for s, p in zip(saved, ps): assert torch.equal(opt.state[p]['local_lr'], s)
        run(opt, ps, 1, start=2 + i)
        assert_holds_local_lr(opt, ps)


@pytest.mark.parametrize('path', list(PATH_KWARGS))
def test_sharded_state_dict_with_local_lr(path, tmp_path):
    "`sharded_state_dict` (which converts 8-bit state) takes a stepped LARS on every path and round-trips bitwise"
    ps = make_params()
    opt = fx_lars(ps, path)
    run(opt, ps, 2)
    dcp.save({'optim': sharded_state_dict(opt)}, checkpoint_id=tmp_path, no_dist=True)
    fresh = fx_lars(ps, path)
    load_sharded_state_dict(fresh, tmp_path)
    for p in ps:
        a, b = opt.state[p], fresh.state[p]
        assert a.keys() == b.keys() and 'local_lr' in a
        assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)

