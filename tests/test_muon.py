"Muon + AdamW against torch's Muon and AdamW on every path, the Muon/AdamW rule, checkpoints across paths, bad input."
import pickle
import pytest
import torch
from torch import nn
from fastxtend_optim.muon import Muon, muon, muon_splitter, newton_schulz
from conftest import make_params, set_grads, run, gappy_run, assert_close_lists, fx_groups, randn, LRS, NO_WD

PATHS = ('native', 'foreach', 'fused')
# two groups ([:3], [3:]); matrices of one shape in both, a tall and a wide one, a do_wd=False matrix (5), a conv (AdamW)
SHAPES = ((64, 32), (32,), (64, 32), (32, 64), (5000,), (10, 64), (10,), (8, 3, 3, 3))
DEFAULTS = dict(mom=0.95, nesterov=True, wd=0.1, ns_steps=5, eps=1e-7, adam_lr_mult=1., adam_mom=0.9,
                adam_sqr_mom=0.999, adam_eps=1e-8, adam_wd=0.01)


def params(dtype=torch.float32): return make_params(shapes=SHAPES, dtype=dtype)


class TorchMuonAdamW:
    "torch's Muon on the 2-D tensors and AdamW on the rest, grouped as `fx_groups` groups ours"
    def __init__(self, ps, no_wd=NO_WD, **kw):
        h = {**DEFAULTS, **kw}
        mg, ag = [], []
        for lr, idx in zip(LRS, (range(0, 3), range(3, len(ps)))):
            for decay in (True, False):
                sel = [ps[i] for i in idx if (i not in no_wd) == decay]
                mg.append(dict(params=[p for p in sel if p.ndim == 2], lr=lr, weight_decay=h['wd'] * decay))
                ag.append(dict(params=[p for p in sel if p.ndim != 2], lr=lr * h['adam_lr_mult'],
                               weight_decay=h['adam_wd'] * decay))
        self.opts = [torch.optim.Muon([g for g in mg if g['params']], momentum=h['mom'], nesterov=h['nesterov'],
                                      ns_steps=h['ns_steps'], eps=h['eps']),
                     torch.optim.AdamW([g for g in ag if g['params']], betas=(h['adam_mom'], h['adam_sqr_mom']),
                                       eps=h['adam_eps'])]

    def step(self):
        for o in self.opts: o.step()


def fx_muon(ps, path, **kw): return fx_groups(Muon, ps, path, **kw)


def assert_matches_torch(got, ref, start):
    "Matrices bit for bit, the AdamW tensors within 1e-6 (Adam's sqrt(v/bc2) against torch's sqrt(v)/sqrt(bc2)), and moved"
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=0. if a.ndim == 2 else 1e-6, rtol=0.)
    assert min((a - s).abs().max() for a, s in zip(got, start)) > 1e-3


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kw', [dict(), dict(nesterov=False, mom=0.9, ns_steps=3, eps=1e-3),
                                dict(wd=0.05, adam_wd=0.1, adam_lr_mult=0.5, adam_mom=0.8, adam_sqr_mom=0.95,
                                     adam_eps=1e-6)])
def test_every_path_matches_torch_muon_and_adamw_over_60_steps(path, kw):
    ours, ref = params(), params()
    start = [p.detach().clone() for p in ours]
    opt = fx_muon(ours, path, **kw)
    got = run(opt, ours, 60)
    assert opt.path == path
    assert_matches_torch(got, run(TorchMuonAdamW(ref, **kw), ref, 60), start)


@pytest.mark.parametrize('kw', [dict(), dict(percentile_clipping=80, nesterov=False)])
def test_fused_and_foreach_match_native_with_missing_gradients(kw):
    "Tensor 2 (a matrix) has no gradient on some steps and must not move then; clipping applies to both parts"
    ps = params()
    native = gappy_run(fx_muon(ps, 'native', **kw), ps, 40)
    for path in ('foreach', 'fused'):
        ps = params()
        assert_close_lists(gappy_run(fx_muon(ps, path, **kw), ps, 40), native, atol=1e-6)


def test_muon_group_hyper_overrides_the_ndim_rule():
    "Group 1 with muon=False: its matrices take AdamW (torch's AdamW), group 0's still take Muon"
    ours, ref = params(), params()
    opt = fx_muon(ours, 'foreach')
    opt.set_hyper('muon', [None, False])
    got = run(opt, ours, 30)
    tm = TorchMuonAdamW(ref[:3], no_wd=(1,))
    adam = torch.optim.AdamW([dict(params=[ref[i] for i in (3, 4, 6, 7)], lr=LRS[1], weight_decay=0.01),
                              dict(params=[ref[5]], lr=LRS[1], weight_decay=0.)], betas=(0.9, 0.999), eps=1e-8)
    for i in range(30):
        set_grads(ref, i)
        tm.step(); adam.step()
    assert 'sqr_avg' in opt.state[ours[3]] and 'sqr_avg' not in opt.state[ours[0]]
    assert_close_lists(got, [p.detach() for p in ref], atol=1e-6)


def test_bf16_matrices_match_torch_and_keep_their_momentum():
    """bf16 with Nesterov: bit for bit torch. Without: torch's in-place div_ rescales its bf16 buffer; ours stays the EMA.
    wd=0: the core's bf16 decay differs from torch's (`_foreach_mul_` rounds the factor to bf16 first; reported)"""
    for nesterov in (True, False):
        ours, ref = [torch.randn(16, 8).bfloat16().requires_grad_() for _ in range(2)]
        ref.data.copy_(ours.data)
        g = torch.randn(16, 8).bfloat16()
        ours.grad, ref.grad = g.clone(), g.clone()
        opt = Muon([ours], lr=0.02, nesterov=nesterov, wd=0., kahan_sum=False)  # plain bf16, as torch steps it
        topt = torch.optim.Muon([ref], lr=0.02, nesterov=nesterov, weight_decay=0.)
        opt.step(); topt.step()
        ema = torch.zeros(16, 8, dtype=torch.bfloat16).lerp_(g, 1 - 0.95)
        assert torch.equal(opt.state[ours]['grad_avg'], ema)
        if nesterov: assert torch.equal(ours, ref) and torch.equal(topt.state[ref]['momentum_buffer'], ema)
        else: assert not torch.equal(topt.state[ref]['momentum_buffer'], ema)


def test_splitter_groups_train_like_torch():
    "muon_splitter's dict groups: embedding and head on AdamW, hidden matrices on Muon, as torch's pair would"
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.Linear(16, 20))
    ours, ref = model(), model()
    opt = Muon(muon_splitter(ours), lr=0.02, adam_lr_mult=0.1)
    assert [h['muon'] for h in opt.hypers] == [True, False] and len(opt.param_lists[0]) == 2
    hidden = [ref[1].weight, ref[3].weight]
    rest = [p for p in ref.parameters() if all(p is not q for q in hidden)]
    topts = [torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=0.002, betas=(0.9, 0.999), eps=1e-8)]
    x = torch.randint(0, 20, (8, 5))
    for o, step in ((opt, [opt.step]), (None, [t.step for t in topts])):
        m = ours if o else ref
        for _ in range(10):
            m.zero_grad(); nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
            for s in step: s()
    assert_close_lists(list(ours.parameters()), list(ref.parameters()), atol=1e-6)


def test_trains_digits_with_the_splitter():
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy
    from fastxtend_optim.demo import digits_dls, digits_model
    torch.manual_seed(0)
    learn = Learner(digits_dls(), digits_model(), loss_func=CrossEntropyLossFlat(), opt_func=muon(fused=True),
                    splitter=muon_splitter, metrics=accuracy)
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(2, 0.02)
    assert learn.opt.path == 'fused' and [h['muon'] for h in learn.opt.hypers] == [True, False]
    with learn.no_bar(): assert learn.validate()[1] > 0.9


@pytest.mark.parametrize('bad,match', [(dict(mom=1.), '`mom` must be in \\[0, 1\\)'),
                                       (dict(ns_steps=100), '`ns_steps` must be an int in \\[0, 100\\)'),
                                       (dict(ns_steps=3.), '`ns_steps` must be an int'),
                                       (dict(eps=0.), '`eps` must be a finite number > 0'),
                                       (dict(nesterov=None), '`nesterov` must be a bool'),
                                       (dict(adam_lr_mult=-1.), '`adam_lr_mult` must be a finite number >= 0'),
                                       (dict(adam_mom=1.), '`adam_mom` must be in'),
                                       (dict(adam_sqr_mom=-0.5), '`adam_sqr_mom` must be in'),
                                       (dict(adam_eps=-1.), '`adam_eps` must be'), (dict(adam_wd=-1.), '`adam_wd` must be'),
                                       (dict(wd=-1.), '`wd` must be'), (dict(muon=1), '`muon` must be None, True or False'),
                                       (dict(eightbit=True), 'Muon has no 8-bit path.*state_bits=8')])
def test_bad_hypers_are_refused(bad, match):
    with pytest.raises(ValueError, match=match): Muon([torch.zeros(3, 2, requires_grad=True)], lr=1e-3, **bad)
    with pytest.raises(ValueError, match=match): muon(**bad)


def test_muon_true_on_a_vector_is_refused_and_changes_nothing():
    ps = params()
    opt = fx_muon(ps, 'foreach')
    with pytest.raises(ValueError, match='parameter 1 of param group 0 has shape \\(32,\\): Muon takes only 2-D'):
        opt.set_hyper('muon', True)
    assert [h['muon'] for h in opt.hypers] == [None, None]
    assert pickle.loads(pickle.dumps(opt)).hypers == opt.hypers


def test_batched_newton_schulz_is_torchs_bit_for_bit():
    from torch.optim._muon import _zeropower_via_newtonschulz as torch_ns
    g = torch.Generator().manual_seed(0)
    for shape in ((573, 191), (191, 764), (191, 191), (7, 3)):
        us = randn(3, *shape, generator=g)
        assert torch.equal(newton_schulz(us), torch.stack([torch_ns(u, (3.4445, -4.7750, 2.0315), 5, 1e-7) for u in us]))
