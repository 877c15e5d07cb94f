"LAMB against fastai's Lamb on every path, bitsandbytes' lamb kernel with and without 8-bit state, checkpoints."
import pytest
import torch
import fastai.optimizer as fastai_optim
from fastai.optimizer import debias
from fastxtend_optim import core, base
from fastxtend_optim.lamb import Lamb, lamb, lamb_direction, _moment
from conftest import lockstep_absmax, make_params, run, assert_close_lists, fx_groups, LRS, PATH_KWARGS
from test_fused import messy_run

WD = 0.05


def fx_lamb(params, path, **kwargs):
    return fx_groups(Lamb, params, path, **{'wd': WD, **kwargs})


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_matches_fastai_lamb(path, decouple_wd, monkeypatch):
    "Two groups, do_wd=False tensors, 60 steps; the 8-bit path with 32-bit state (the same math in the kernel)"
    monkeypatch.setattr(base, 'FOREACH_CPU_CHUNK', 1000)  # chunk boundaries inside the groups too
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    extra = dict(optim_bits=32) if path == 'eightbit' else {}
    got = run(fx_lamb(ours, path, decouple_wd=decouple_wd, **extra), ours, 60)
    expected = run(fx_groups(fastai_optim.Lamb, ref, None, wd=WD, decouple_wd=decouple_wd), ref, 60)
    assert_close_lists(got, expected, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 0.1


def test_fused_matches_native_through_the_storage_traps():
    "Replaced gradients, a tensor without a gradient on some steps (its norm must not count), L2 and clipping"
    results = []
    for path in ('native', 'fused'):
        ps = make_params()
        opt = fx_lamb(ps, path, decouple_wd=False, percentile_clipping=80)
        results.append(messy_run(opt, ps, 60))
        assert opt.path == path
    assert_close_lists(results[1], results[0], atol=1e-6)


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
def test_zero_weights_and_zero_directions_take_an_adam_step(path):
    "fastai's rule: q = 1 where |p| = 0 or |d| = 0 (an Adam step, zero here); |p| = 5 with direction (1, -1): q = 5/sqrt(2)"
    w, z, idle = torch.tensor([3., 4.], requires_grad=True), torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = Lamb([w, z, idle], lr=0.1, eps=1e-8, **PATH_KWARGS[path], **({'optim_bits': 32} if path == 'eightbit' else {}))
    w.grad, z.grad, idle.grad = torch.tensor([2., -4.]), torch.tensor([1., -1.]), torch.zeros(2)
    opt.step()
    q = 5 / 2**0.5
    torch.testing.assert_close(w.detach(), torch.tensor([3 - 0.1 * q, 4 + 0.1 * q]))
    torch.testing.assert_close(z.detach(), torch.tensor([-0.1, 0.1]))
    assert torch.equal(idle.detach(), torch.ones(2))


def test_eightbit_step_is_lamb_on_the_quantized_moments():
    """With 8-bit state, one step equals fastai's LAMB math applied in fp32 to the moments dequantized from the state:
    the trust ratio and the learning rate handed to the kernel are exact, only m and v are rounded"""
    ps = make_params()
    opt = fx_lamb(ps, 'eightbit')
    run(opt, ps, 10)
    from conftest import set_grads
    set_grads(ps, 10)
    expect = {}
    for i, p in enumerate(ps):
        s, lr = opt.state[p], LRS[0] if i < 3 else LRS[1]
        g, t, decay = p.grad.float(), s['step'] + 1, (1 - lr * WD) if i not in (1, 5) else 1.
        m = _moment(s, 1) * 0.9 + g * 0.1
        v = _moment(s, 2) * 0.99 + g * g * 0.01
        d = lamb_direction(m, v, debias(0.9, 0.1, t), debias(0.99, 0.01, t), 1e-5)
        pd = p.detach() * decay
        q = min(pd.norm() / d.norm(), 10.)
        expect[i] = pd - lr * q * d
    opt.step()
    assert any(opt.state[p]['state1'].dtype == torch.uint8 for p in ps)
    for i, p in enumerate(ps): torch.testing.assert_close(p.detach(), expect[i], atol=1e-6, rtol=1e-6)


def test_eightbit_stays_within_the_quantization_bound():
    """8-bit blockwise state rounds each element of m to the nearest of bitsandbytes' signed dynamic codes scaled by
    its block's absmax: an error of at most half the widest gap (0.0070) times absmax. m is re-rounded every step and
    old errors decay by `mom`, so |m8 - m| <= 0.0070*absmax/(1-mom), plus the drift of the gradients, which follow the
    weights (g = 0.1 (p - 0.5) + noise): 0.1 * max|p8 - p| at most. The weights: each LAMB step moves a tensor by
    lr*q*|d| <= lr*|p| in norm on both runs, so after T steps |p8 - p| <= 2*T*lr*max|p| (reached only if every step
    pointed the other way). Where the weights went, as a whole, is much closer: rounding errors of successive steps
    are independent and largely cancel (measured: 1.8% of the distance travelled), while a missing trust ratio (as in
    bitsandbytes' LAMB8bit) or a wrong factor in the mapping moves it by that factor."""
    mom, steps = 0.9, 50
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    eight, native = fx_lamb(a, 'eightbit'), fx_lamb(b, 'native')
    absmax, half_gap = lockstep_absmax(eight, native, a, b, steps)
    for p, q, p0 in zip(a, b, start):
        if p.numel() < 4096: continue
        drift = (p - q).abs().max().item()
        assert drift <= 2 * steps * max(LRS) * max(p0.abs().max().item(), q.abs().max().item())
        assert (_moment(eight.state[p], 1) - native.state[q]['grad_avg']).abs().max() <= \
            half_gap * absmax / (1 - mom) + 0.1 * drift / (1 - mom)
        assert (p - q).norm() <= 0.05 * (q - p0).norm()
    assert sum(eight.state[p]['state1'].dtype == torch.uint8 for p in a) == 2


def test_partial_checks_at_once_and_builds_every_path():
    with pytest.raises(ValueError, match='`sqr_mom` must be in'): lamb(sqr_mom=1.)
    with pytest.raises(ValueError, match='`eps` must be'): lamb(eps=-1e-8)
    w = [torch.zeros(3, requires_grad=True)]
    for path, kw in PATH_KWARGS.items(): assert lamb(**kw)(w, lr=1e-3).path == path
