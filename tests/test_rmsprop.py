"RMSProp against fastai's RMSProp, torch's RMSprop and bitsandbytes' RMSprop8bit/32bit, across paths and checkpoints."
import pytest
import torch
import bitsandbytes.optim as bnb_optim
import fastai.optimizer as fastai_optim
from fastxtend_optim.rmsprop import RMSProp
from conftest import assert_paths_match_native, make_params, run, assert_close_lists, fx_groups, torch_groups, LRS

WD = 0.01


@pytest.mark.parametrize('mom', [0., 0.9])
@pytest.mark.parametrize('decouple_wd', [True, False])
@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
def test_matches_fastai_rmsprop(path, mom, decouple_wd):
    "fastai steps with eps=1e-8 whatever it is given; ours with the default eps=1e-8"
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    got = run(fx_groups(RMSProp, ours, path, mom=mom, wd=0.1, decouple_wd=decouple_wd), ours, 60)
    expected = run(fx_groups(fastai_optim.RMSProp, ref, None, mom=mom, wd=0.1, decouple_wd=decouple_wd), ref, 60)
    assert_close_lists(got, expected, atol=1e-6, rtol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 1e-2


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
@pytest.mark.parametrize('eps', [1e-8, 1e-2])
def test_l2_matches_torch_rmsprop(path, eps):
    "torch's RMSprop(alpha=sqr_mom), L2 decay; eps=1e-2 shows eps is honoured (fastai would use 1e-8)"
    ours, ref = make_params(), make_params()
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    got = run(fx_groups(RMSProp, ours, path, sqr_mom=0.95, eps=eps, wd=WD, decouple_wd=False, **extra), ours, 60)
    torch_opt = torch.optim.RMSprop(torch_groups(ref, WD), lr=LRS[0], alpha=0.95, eps=eps, foreach=False)
    assert_close_lists(got, run(torch_opt, ref, 60), atol=1e-6, rtol=1e-6)


def test_eps_is_honoured_where_fastai_ignores_it():
    a, b = make_params(), make_params()
    ours = run(fx_groups(RMSProp, a, 'foreach', eps=1e-2), a, 20)
    fastai = run(fx_groups(fastai_optim.RMSProp, b, None, eps=1e-2), b, 20)
    assert max((x - y).abs().max() for x, y in zip(ours, fastai)) > 1e-4


@pytest.mark.parametrize('kw', [dict(mom=0.9, wd=WD), dict(mom=0.5, decouple_wd=False, wd=WD, eps=1e-3)])
def test_fused_and_foreach_equal_native(kw):
    assert_paths_match_native(RMSProp, **kw)


@pytest.mark.parametrize('optim_bits,bnb_cls', [(8, bnb_optim.RMSprop8bit), (32, bnb_optim.RMSprop32bit)])
def test_eightbit_matches_bitsandbytes_bitwise(optim_bits, bnb_cls):
    "The same kernel on the same state, L2 inside the kernel in both: bitwise"
    ours, ref = make_params(), make_params()
    opt = fx_groups(RMSProp, ours, 'eightbit', sqr_mom=0.95, eps=1e-6, wd=WD, decouple_wd=False, optim_bits=optim_bits)
    got = run(opt, ours, 30)
    expected = run(bnb_cls(torch_groups(ref, WD), lr=LRS[0], alpha=0.95, eps=1e-6), ref, 30)
    assert_close_lists(got, expected, atol=0.)
    assert opt.state[ours[2]]['state1'].dtype == (torch.uint8 if optim_bits == 8 else torch.float32)


def test_eightbit_decoupled_equals_native():
    a, b = make_params(), make_params()
    got = run(fx_groups(RMSProp, a, 'eightbit', wd=0.1, optim_bits=32), a, 50)
    assert_close_lists(got, run(fx_groups(RMSProp, b, 'native', wd=0.1), b, 50), atol=1e-6)


def test_eightbit_stays_within_the_update_bound():
    """The kernel updates v in fp32 before quantizing it, so on both paths v >= (1-sqr_mom)*g^2 when the step is taken
    and each weight moves by at most lr/sqrt(1-sqr_mom) per step: after T steps the paths differ by at most
    2*T*lr/sqrt(1-sqr_mom). That worst case is loose; as a whole the 8-bit run stays within 5% of the distance the
    fp32 run travelled (measured well below), while a wrong mapping (sqr_mom, eps, lr) moves it by far more"""
    sqr_mom, steps = 0.99, 50
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    eight = run(fx_groups(RMSProp, a, 'eightbit'), a, steps)
    native = run(fx_groups(RMSProp, b, 'native'), b, steps)
    for p, q, p0 in zip(eight, native, start):
        if p.numel() < 4096: continue
        assert (p - q).abs().max() <= 2 * steps * max(LRS) / (1 - sqr_mom) ** 0.5
        assert (p - q).norm() <= 0.05 * (q - p0).norm()


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
def test_scheduled_mom_without_momentum_is_ignored_as_in_fastai(path):
    ours, ref = make_params(), make_params()
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    opt, fa = fx_groups(RMSProp, ours, path, **extra), fx_groups(fastai_optim.RMSProp, ref, None)
    for o in (opt, fa): o.set_hyper('mom', 0.9)
    assert_close_lists(run(opt, ours, 10), run(fa, ref, 10), atol=1e-6)
    assert all('grad_avg' not in opt.state[p] for p in ours)


def test_eightbit_refuses_momentum():
    with pytest.raises(ValueError, match='`eightbit=True` needs `mom=0`'):
        RMSProp(make_params(), lr=1e-3, mom=0.9, eightbit=True)
