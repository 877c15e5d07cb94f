"Adagrad against torch's Adagrad and bitsandbytes' Adagrad8bit/32bit, across paths and checkpoints."
import pytest
import torch
import bitsandbytes.optim as bnb_optim
from fastxtend_optim.adagrad import Adagrad
from conftest import make_params, set_grads, run, assert_close_lists, fx_groups, torch_groups, LRS

WD = 0.01
TORCH_CASES = [dict(), dict(lr_decay=0.05, initial_accumulator_value=0.1), dict(eps=1e-3, lr_decay=0.01)]


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
@pytest.mark.parametrize('kw', TORCH_CASES)
def test_l2_matches_torch_adagrad(path, kw):
    "torch's Adagrad with L2 decay, lr_decay and an initial accumulator; 8-bit with fp32 state (the same math)"
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    got = run(fx_groups(Adagrad, ours, path, wd=WD, **kw, **extra), ours, 60)
    torch_opt = torch.optim.Adagrad(torch_groups(ref, WD), lr=LRS[0], foreach=False, **kw)
    assert_close_lists(got, run(torch_opt, ref, 60), atol=1e-6, rtol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 1e-2


@pytest.mark.parametrize('path', ['foreach', 'fused', 'eightbit'])
def test_decoupled_equals_native(path):
    kw = dict(wd=0.1, decouple_wd=True, lr_decay=0.02, initial_accumulator_value=0.5)
    a, b = make_params(), make_params()
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    got = run(fx_groups(Adagrad, a, path, **kw, **extra), a, 60)
    assert_close_lists(got, run(fx_groups(Adagrad, b, 'native', **kw), b, 60), atol=1e-6)


@pytest.mark.parametrize('optim_bits,bnb_cls', [(8, bnb_optim.Adagrad8bit), (32, bnb_optim.Adagrad32bit)])
def test_eightbit_matches_bitsandbytes_bitwise(optim_bits, bnb_cls):
    "The same kernel on the same state: bitwise without weight decay"
    ours, ref = make_params(), make_params()
    opt = fx_groups(Adagrad, ours, 'eightbit', eps=1e-6, optim_bits=optim_bits)
    got = run(opt, ours, 30)
    expected = run(bnb_cls(torch_groups(ref, 0.), lr=LRS[0], eps=1e-6), ref, 30)
    assert_close_lists(got, expected, atol=0.)
    assert opt.state[ours[2]]['state1'].dtype == (torch.uint8 if optim_bits == 8 else torch.float32)


def test_eightbit_l2_matches_bitsandbytes():
    "L2 is added before the kernel here, inside it in bitsandbytes: one rounding apart per step"
    ours, ref = make_params(), make_params()
    got = run(fx_groups(Adagrad, ours, 'eightbit', wd=WD, optim_bits=32), ours, 50)
    expected = run(bnb_optim.Adagrad32bit(torch_groups(ref, WD), lr=LRS[0]), ref, 50)
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('init', [0., 0.5])
def test_eightbit_stays_within_the_update_bound(init):
    """s >= g^2 when each step is taken (the kernel updates s in fp32 before quantizing it), so each weight moves by at
    most lr per step on both paths: after T steps they differ by at most 2*T*lr. That worst case is loose; as a whole
    the 8-bit run stays within 5% of the distance the fp32 run travelled, while a wrong mapping moves it by far more"""
    steps, kw = 50, dict(lr_decay=0.02, initial_accumulator_value=init)
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    opt = fx_groups(Adagrad, a, 'eightbit', **kw)
    eight, native = run(opt, a, steps), run(fx_groups(Adagrad, b, 'native', **kw), b, steps)
    for p, q, p0 in zip(eight, native, start):
        if p.numel() < 4096: continue
        assert (p - q).abs().max() <= 2 * steps * max(LRS)
        assert (p - q).norm() <= 0.05 * (q - p0).norm()
    assert opt.state[a[2]]['state1'].dtype == torch.uint8


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
def test_late_first_gradient_starts_from_the_initial_value(path):
    "A tensor without a gradient for the first steps gets the initial value and lr_decay from its own step count"
    a, b = make_params(), make_params()
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    ours = fx_groups(Adagrad, a, path, initial_accumulator_value=0.3, lr_decay=0.05, **extra)
    ref = torch.optim.Adagrad(torch_groups(b, 0.), lr=LRS[0], initial_accumulator_value=0.3, lr_decay=0.05)
    for opt, ps in ((ours, a), (ref, b)):
        for i in range(20):
            set_grads(ps, i)
            if i < 5: ps[2].grad = None
            opt.step()
    assert ours.state[a[2]]['step'] == 15
    assert_close_lists(a, b, atol=1e-6)
