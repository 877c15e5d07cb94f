"SGD against fastai's SGD, torch's SGD and bitsandbytes' SGD8bit/SGD32bit, across paths and checkpoints."
import pytest
import torch
import bitsandbytes.optim as bnb_optim
import fastai.optimizer as fastai_optim
from fastxtend_optim.sgd import SGD
from fastxtend_optim.lars import _buffer
from conftest import (assert_paths_match_native, lockstep_absmax, make_params, run, assert_close_lists, fx_groups,
                      torch_groups, LRS)

WD = 0.01
TORCH_CASES = [dict(mom=0.), dict(mom=0.9), dict(mom=0.9, dampening=0.3), dict(mom=0.9, nesterov=True)]


@pytest.mark.parametrize('mom', [0., 0.9])
@pytest.mark.parametrize('decouple_wd', [True, False])
@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
def test_matches_fastai_sgd(path, mom, decouple_wd):
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    got = run(fx_groups(SGD, ours, path, mom=mom, wd=0.1, decouple_wd=decouple_wd), ours, 60)
    expected = run(fx_groups(fastai_optim.SGD, ref, None, mom=mom, wd=0.1, decouple_wd=decouple_wd), ref, 60)
    assert_close_lists(got, expected, atol=1e-6, rtol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 1e-2


def torch_case_paths():
    return [(path, kw) for kw in TORCH_CASES for path in ('native', 'foreach', 'fused', 'eightbit')
            if not (path == 'eightbit' and kw['mom'] == 0)]


@pytest.mark.parametrize('path,kw', torch_case_paths())
def test_l2_matches_torch_sgd(path, kw):
    "torch's SGD: L2 decay, dampening (not at step 1) and Nesterov; the 8-bit path with fp32 state (same math)"
    ours, ref = make_params(), make_params()
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    got = run(fx_groups(SGD, ours, path, wd=WD, decouple_wd=False, **kw, **extra), ours, 60)
    sgd = torch.optim.SGD(torch_groups(ref, WD), lr=LRS[0], momentum=kw['mom'], dampening=kw.get('dampening', 0.),
                          nesterov=kw.get('nesterov', False), foreach=False)
    assert_close_lists(got, run(sgd, ref, 60), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('kw', [dict(mom=0.9, dampening=0.3, wd=WD), dict(mom=0.9, nesterov=True, wd=WD)])
def test_fused_and_foreach_equal_native_with_decoupled_decay(kw):
    assert_paths_match_native(SGD, **kw)


@pytest.mark.parametrize('optim_bits,bnb_cls', [(8, bnb_optim.SGD8bit), (32, bnb_optim.SGD32bit)])
def test_eightbit_matches_bitsandbytes_bitwise(optim_bits, bnb_cls):
    "The same kernel on the same state: bitwise without weight decay"
    ours, ref = make_params(), make_params()
    opt = fx_groups(SGD, ours, 'eightbit', mom=0.9, optim_bits=optim_bits)
    got = run(opt, ours, 30)
    expected = run(bnb_cls(torch_groups(ref, 0.), lr=LRS[0], momentum=0.9), ref, 30)
    assert_close_lists(got, expected, atol=0.)
    assert opt.state[ours[2]]['state1'].dtype == (torch.uint8 if optim_bits == 8 else torch.float32)


def test_eightbit_l2_matches_bitsandbytes():
    "L2 is added to the gradient before the kernel rather than inside it: one rounding apart per step"
    ours, ref = make_params(), make_params()
    got = run(fx_groups(SGD, ours, 'eightbit', mom=0.9, wd=WD, decouple_wd=False, optim_bits=32), ours, 50)
    expected = run(bnb_optim.SGD32bit(torch_groups(ref, WD), lr=LRS[0], momentum=0.9), ref, 50)
    assert_close_lists(got, expected, atol=1e-6)


def test_eightbit_stays_within_the_quantization_bound():
    """One rounding of the 8-bit buffer errs by at most half the widest gap of the signed dynamic map (0.0070) times
    its block's absmax; errors decay by `mom`, so the buffer stays within 0.0070*absmax/(1-mom) of the fp32 one,
    and each step moves a weight by lr times the buffer: after T steps at most T*lr*0.0070*absmax/(1-mom)"""
    mom, steps = 0.9, 50
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    eight, native = fx_groups(SGD, a, 'eightbit', mom=mom), fx_groups(SGD, b, 'native', mom=mom)
    absmax, half_gap = lockstep_absmax(eight, native, a, b, steps)
    buf_bound = half_gap * absmax / (1 - mom)
    for p, q, p0 in zip(a, b, start):
        if p.numel() < 4096: continue
        assert eight.state[p]['state1'].dtype == torch.uint8
        assert (_buffer(eight.state[p]) - native.state[q]['grad_avg']).abs().max() <= buf_bound
        assert (p - q).abs().max() <= steps * max(LRS) * buf_bound
        assert (p - q).norm() <= 0.05 * (q - p0).norm()  # measured: errors of successive steps largely cancel


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
def test_scheduled_mom_on_plain_sgd_is_ignored_as_in_fastai(path):
    "fit_one_cycle sets `mom` on every optimizer; fastai's SGD(mom=0) keeps stepping plain SGD, and so does ours"
    ours, ref = make_params(), make_params()
    opt, fa = fx_groups(SGD, ours, path), fx_groups(fastai_optim.SGD, ref, None)
    for o in (opt, fa): o.set_hyper('mom', 0.9)
    assert_close_lists(run(opt, ours, 10), run(fa, ref, 10), atol=1e-6)
    assert all('grad_avg' not in opt.state[p] for p in ours)


def test_eightbit_refuses_plain_sgd():
    with pytest.raises(ValueError, match='`eightbit=True` needs `mom` > 0'): SGD(make_params(), lr=1e-3, eightbit=True)
