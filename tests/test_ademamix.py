"AdEMAMix against a plain loop of the paper's update, bitsandbytes' AdEMAMix classes, across paths and checkpoints."
import math
import pytest
import torch
import bitsandbytes.optim as bnb_optim
from fastxtend_optim import core, base
from fastxtend_optim.ademamix import AdEMAMix, ademamix
from conftest import make_params, run, assert_close_lists, fx_groups, torch_groups, PATH_KWARGS
from test_fused import messy_run

WD = 0.05
SCHED = dict(t_alpha=30, t_beta3=40)


def fx_ade(params, path, **kwargs):
    return fx_groups(AdEMAMix, params, path, **{'wd': WD, 'beta3': 0.999, **kwargs})


class PaperAdEMAMix(torch.optim.Optimizer):
    "Pagliardini et al. 2024, Algorithm 1, one parameter at a time; schedules from each parameter's own step"
    def __init__(self, params, lr, betas, alpha, eps, weight_decay, t_alpha=None, t_beta3=None, l2=False):
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      t_alpha=t_alpha, t_beta3=t_beta3, l2=l2))

    @torch.no_grad()
    def step(self):
        for grp in self.param_groups:
            b1, b2, b3_end = grp['betas']
            for p in grp['params']:
                st = self.state[p]
                if not st: st.update(t=0, m1=torch.zeros_like(p), m2=torch.zeros_like(p), nu=torch.zeros_like(p))
                st['t'] += 1
                t, g = st['t'], p.grad + grp['weight_decay'] * p if grp['l2'] else p.grad
                a = grp['alpha'] if grp['t_alpha'] is None else min(t * grp['alpha'] / grp['t_alpha'], grp['alpha'])
                b3 = b3_end
                if grp['t_beta3'] is not None:
                    s, l1, l3 = t / grp['t_beta3'], math.log(b1), math.log(b3_end)
                    b3 = min(math.exp(l1 * l3 / ((1 - s) * l3 + s * l1)), b3_end)
                st['m1'] = b1 * st['m1'] + (1 - b1) * g
                st['m2'] = b3 * st['m2'] + (1 - b3) * g
                st['nu'] = b2 * st['nu'] + (1 - b2) * g * g
                m1_hat, nu_hat = st['m1'] / (1 - b1**t), st['nu'] / (1 - b2**t)
                # p - lr*(update + wd*p), written as decoupled decay is everywhere (one rounding of p, not two)
                if not grp['l2']: p.mul_(1 - grp['lr'] * grp['weight_decay'])
                p.sub_(grp['lr'] * (m1_hat + a * st['m2']) / (nu_hat.sqrt() + grp['eps']))


def paper(params, decouple_wd=True, **kw):
    return PaperAdEMAMix(torch_groups(params, WD), lr=1e-3, betas=(0.9, 0.999, 0.999), alpha=5., eps=1e-8,
                         weight_decay=WD, l2=not decouple_wd, **kw)


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
@pytest.mark.parametrize('kw', [dict(), dict(decouple_wd=False, **SCHED)])
def test_matches_the_paper_loop(path, kw, monkeypatch):
    "Two groups, do_wd=False tensors, 60 steps, both decay modes, schedules; the 8-bit path with 32-bit state"
    monkeypatch.setattr(base, 'FOREACH_CPU_CHUNK', 1000)
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    got = run(fx_ade(ours, path, **kw, **(dict(optim_bits=32) if path == 'eightbit' else {})), ours, 60)
    assert_close_lists(got, run(paper(ref, **kw), ref, 60), atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 0.1


@pytest.mark.parametrize('kw', [dict(), SCHED])
def test_native_equals_bitsandbytes_32bit_kernel_exactly(kw):
    "Same operations as bitsandbytes' CPU kernel: bitwise equal to AdEMAMix(optim_bits=32), schedules included"
    ours, ref = make_params(), make_params()
    got = run(fx_ade(ours, 'native', **kw), ours, 30)
    bnb = bnb_optim.AdEMAMix(torch_groups(ref, WD), lr=1e-3, betas=(0.9, 0.999, 0.999), optim_bits=32, **kw)
    assert_close_lists(got, run(bnb, ref, 30), atol=0.)


@pytest.mark.parametrize('optim_bits,kw', [(8, dict()), (8, SCHED), (32, SCHED)])
def test_eightbit_matches_bitsandbytes_bitwise(optim_bits, kw):
    "The same kernel on the same state: bitsandbytes' AdEMAMix8bit / AdEMAMix(optim_bits=32), to the last bit"
    ours, ref = make_params(), make_params()
    opt = fx_ade(ours, 'eightbit', optim_bits=optim_bits, **kw)
    got = run(opt, ours, 20)
    bnb = bnb_optim.AdEMAMix(torch_groups(ref, WD), lr=1e-3, betas=(0.9, 0.999, 0.999), optim_bits=optim_bits, **kw)
    assert_close_lists(got, run(bnb, ref, 20), atol=0.)
    for p, q in zip(ours, ref):
        assert opt.state[p]['state1'].shape == (2, *p.shape) == bnb.state[q]['state1'].shape
        assert opt.state[p]['state1'].dtype == bnb.state[q]['state1'].dtype
        if 'absmax1' in bnb.state[q]: assert torch.equal(opt.state[p]['absmax1'], bnb.state[q]['absmax1'])


def test_bitsandbytes_ademamix32bit_crashes_and_ours_does_not():
    p = torch.zeros(5000, requires_grad=True)
    p.grad = torch.ones(5000)
    with pytest.raises(RuntimeError, match="doesn't match the broadcast shape"):
        bnb_optim.AdEMAMix32bit([p], lr=1e-3).step()
    q = torch.zeros(5000, requires_grad=True)
    q.grad = torch.ones(5000)
    AdEMAMix([q], lr=1e-3, eightbit=True, optim_bits=32).step()
    assert q.isfinite().all() and (q < 0).all()


def test_eightbit_state_stays_close_to_native():
    """8-bit blockwise state rounds m1 and m2 to the nearest signed dynamic code times their block's absmax (half the
    widest gap: 0.0070*absmax) and each step re-rounds; old errors decay by beta, so |m1_8 - m1| <= 0.0070*absmax/(1-beta1)
    plus the drift of the gradients (g = 0.1 (p - 0.5) + noise, 0.1 max|p8 - p| per step, summed likewise).
    Where the weights went, as a whole: within 5% of the distance travelled (measured 1.4-1.5%)."""
    import bitsandbytes.functional as BF
    a, b = make_params(), make_params()
    start = [p.detach().clone() for p in b]
    eight, native = fx_ade(a, 'eightbit'), fx_ade(b, 'native')
    run(eight, a, 40); run(native, b, 40)
    half_gap = ((BF.create_dynamic_map(signed=True).sort().values.diff()).max() / 2).item()
    for p, q, p0 in zip(a, b, start):
        if p.numel() < 4096: continue
        s = eight.state[p]
        m1 = BF.dequantize_blockwise(s['state1'][0], absmax=s['absmax1'][0], code=s['qmap1'], blocksize=256)
        drift = (p - q).abs().max().item()
        assert (m1 - native.state[q]['grad_avg']).abs().max() <= (half_gap * s['absmax1'][0].max() + 0.1 * drift) / 0.1
        assert (p - q).norm() <= 0.05 * (q - p0).norm()


def test_fused_matches_native_through_the_storage_traps():
    results = []
    for path in ('native', 'fused'):
        ps = make_params()
        results.append(messy_run(fx_ade(ps, path, percentile_clipping=80, **SCHED), ps, 60))
    assert_close_lists(results[1], results[0], atol=1e-6)


def test_partial_checks_at_once():
    with pytest.raises(ValueError, match='`beta2` must be in'): ademamix(beta2=1.)
    with pytest.raises(ValueError, match='`t_beta3` needs'): ademamix(t_beta3=10, beta3=0.)
    w = [torch.zeros(3, requires_grad=True)]
    for path, kw in PATH_KWARGS.items(): assert ademamix(**kw)(w, lr=1e-3).path == path
