"Lion against reference implementations, across paths, and through checkpoints."
import pytest
from fastxtend_optim.eightbit import PathConversionWarning
import torch
import bitsandbytes.optim as bnb_optim
import lion_pytorch
from fastxtend_optim import core, base
from fastxtend_optim.lion import Lion
from conftest import (make_params, set_grads, run, roundtrip, assert_close_lists, fx_groups, torch_groups,
                      assert_matches_reference,
                      NO_WD, PATH_KWARGS)

def fx_lion(params, path, wd=0.1, no_wd=NO_WD, **kwargs):
    return fx_groups(Lion, params, path, wd=wd, no_wd=no_wd, **kwargs)


def test_native_and_foreach_agree_over_100_steps():
    a, b = make_params(), make_params()
    ra, rb = run(fx_lion(a, 'native'), a, 100), run(fx_lion(b, 'foreach'), b, 100)
    assert_close_lists(ra, rb, atol=1e-6)
    # do_wd=False really skipped decay: with zero gradients only decayed tensors move
    for p in a + b: p.grad = torch.zeros_like(p)
    before = [p.detach().clone() for p in a]
    fx_lion(a, 'native').step()
    assert torch.equal(a[1], before[1]) and torch.equal(a[5], before[5])
    assert not torch.equal(a[0], before[0])


def test_foreach_chunks_change_nothing(monkeypatch):
    "Chunk boundaries inside a group (1000 elements: most tensors alone, two small ones together) give the same result"
    monkeypatch.setattr(base, 'FOREACH_CPU_CHUNK', 1000)
    assert base.foreach_chunks(make_params()[3:]) == [[0], [1, 2]]
    a, b = make_params(), make_params()
    assert_close_lists(run(fx_lion(a, 'native'), a, 30), run(fx_lion(b, 'foreach'), b, 30), atol=1e-6)


@pytest.mark.parametrize('path', ['native', 'foreach'])
def test_matches_lion_pytorch_over_100_steps(path):
    ours, ref = make_params(), make_params()
    got = run(fx_lion(ours, path), ours, 100)
    expected = run(lion_pytorch.Lion(torch_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.99)), ref, 100)
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('optim_bits,bnb_cls', [(8, bnb_optim.Lion8bit), (32, bnb_optim.Lion32bit)])
def test_eightbit_matches_bitsandbytes(optim_bits, bnb_cls):
    ours, ref = make_params(), make_params()
    opt = fx_lion(ours, 'eightbit', optim_bits=optim_bits)
    got = run(opt, ours, 20)
    expected = run(bnb_cls(torch_groups(ref, 0.1), lr=1e-3, betas=(0.9, 0.99)), ref, 20)
    assert_close_lists(got, expected, atol=0.)
    dtypes = [opt.state[p]['state1'].dtype for p in ours]
    big = torch.uint8 if optim_bits == 8 else torch.float32
    assert dtypes == [torch.float32 if p.numel() < 4096 else big for p in ours]
    if optim_bits == 8:
        assert opt.state[ours[3]]['absmax1'].shape == (17,)  # 4097 elements: 16 full blocks and a partial one


def test_eightbit_stays_near_native():
    "8-bit momentum is quantized, so the paths part ways slowly; bounded by the number of differing signs"
    a, b = make_params(), make_params()
    ra, rb = run(fx_lion(a, 'native'), a, 20), run(fx_lion(b, 'eightbit'), b, 20)
    for x, y in zip(ra, rb):
        # every step moves a weight by at most 2*lr when the signs differ: 20 steps * 2 * 3e-3
        assert (x - y).abs().max() <= 20 * 2 * 3e-3 + 1e-6
        assert (x - y).abs().mean() < 2e-3


def test_checkpoint_moves_between_native_and_foreach():
    a, b = make_params(), make_params()
    uninterrupted = run(fx_lion(a, 'native'), a, 20)
    first = fx_lion(b, 'foreach')
    run(first, b, 10)
    second = fx_lion(b, 'native', no_wd=())
    second.load_state_dict(roundtrip(first.state_dict()))
    assert_close_lists(run(second, b, 10, start=10), uninterrupted, atol=1e-6)


def test_eightbit_checkpoint_converts_on_native_path():
    "An 8-bit checkpoint loads on the native path, dequantized, with one warning (test_convert checks the values)"
    a = make_params()
    eight = fx_lion(a, 'eightbit')
    run(eight, a, 2)
    native = fx_lion(a, 'native')
    with pytest.warns(PathConversionWarning, match='converted the saved 8-bit state') as caught:
        native.load_state_dict(eight.state_dict())
    assert len([w for w in caught if issubclass(w.category, PathConversionWarning)]) == 1
    assert all('grad_avg' in native.state[p] and 'state1' not in native.state[p] for p in a)


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_percentile_clipping_same_on_every_path(path):
    "Clipping happens before the path's math, so each path equals itself fed pre-clipped gradients"
    a = make_params()
    opt = fx_lion(a, path, percentile_clipping=50)
    clipped = make_params()
    ref = fx_lion(clipped, path)
    history = [[] for _ in a]
    for step in range(12):
        set_grads(a, step)
        set_grads(clipped, step)
        for i, p in enumerate(clipped):
            norm = p.grad.norm()
            history[i].append(norm)
            seen = torch.stack(history[i])
            limit = seen.sort().values[max(0, -(-len(seen) // 2) - 1)]  # nearest-rank 50th percentile
            if norm > limit: p.grad = p.grad * (limit / norm)
        opt.step()
        ref.step()
    assert_close_lists([p.detach() for p in a], [p.detach() for p in clipped], atol=1e-6)
    assert opt.state[a[0]]['gnorm_count'] == 12


def test_percentile_clipping_native_equals_foreach():
    a, b = make_params(), make_params()
    ra = run(fx_lion(a, 'native', percentile_clipping=10), a, 30)
    rb = run(fx_lion(b, 'foreach', percentile_clipping=10), b, 30)
    assert_close_lists(ra, rb, atol=1e-6)


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_none_grads_skipped_and_grads_untouched(path):
    a = make_params()
    opt = fx_lion(a, path, percentile_clipping=50)
    set_grads(a, 0)
    a[2].grad = None
    grads = [p.grad.clone() if p.grad is not None else None for p in a]
    before = a[2].detach().clone()
    opt.step()
    assert torch.equal(a[2], before)
    assert not opt.state.get(a[2])
    for p, g in zip(a, grads):
        if g is not None: assert torch.equal(p.grad, g)


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_set_hyper_reaches_every_path(path):
    "lr set mid-run is the lr the step uses: with zero momentum and wd=0 each weight moves by exactly lr"
    a = [torch.zeros(5000, requires_grad=True), torch.zeros(8, requires_grad=True)]
    opt = Lion(a, lr=1e-3, wd=0., **PATH_KWARGS[path])
    opt.set_hyper('lr', 0.25)
    for p in a: p.grad = torch.ones_like(p)
    opt.step()
    for p in a: torch.testing.assert_close(p.detach(), torch.full_like(p, -0.25))
    with pytest.raises(ValueError, match='`beta1`'):
        opt.set_hyper('beta1', 1.5)
    assert opt.hypers[0]['beta1'] == 0.9


NAN, INF = float('nan'), float('inf')


def two_bad_steps(numel=4, **kwargs):
    "Two steps whose gradient is NaN at 0, +Inf at 1 and +-1 elsewhere; the weights and the state after each"
    w = torch.zeros(numel, requires_grad=True)
    opt = Lion([w], lr=0.1, wd=0., **kwargs)
    out = []
    for _ in range(2):
        g = torch.ones(numel)
        g[0], g[1], g[3] = NAN, INF, -1.
        w.grad = g
        opt.step()
        out.append((w.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[w].items()}))
    return out


@pytest.mark.parametrize('path', ['native', 'foreach'])
def test_nonfinite_gradients(path):
    "As measured on the CPU (torch.sign(nan) is 0 there): see the table in the Lion notebook"
    (w1, s1), (w2, s2) = two_bad_steps(**PATH_KWARGS[path])
    m1, m2 = s1['grad_avg'], s2['grad_avg']
    assert w1[0] == 0 and w2[0] == 0 and m1[0].isnan() and m2[0].isnan()    # NaN: frozen weight, NaN momentum
    assert w1[1] == -0.1 and m1[1] == INF and w2[1] == -0.1 and m2[1].isnan()  # Inf: one step, then frozen
    torch.testing.assert_close(w2[2:], torch.tensor([-0.2, 0.2]))           # other elements unaffected


def test_nonfinite_gradients_eightbit():
    "bitsandbytes' kernels, as measured on the CPU: fp32 state keeps Inf; an Inf poisons a quantized block's absmax"
    (w1, s1), (w2, s2) = two_bad_steps(eightbit=True)
    assert w2[0] == 0 and s2['state1'][0].isnan()
    assert w2[1] == -0.2 and s2['state1'][1] == INF
    torch.testing.assert_close(w2[2:], torch.tensor([-0.2, 0.2]))
    (w1, s1), (w2, s2) = two_bad_steps(numel=4096, eightbit=True)
    assert w2[0] == 0 and w2[1] == -0.1
    assert s2['absmax1'][0] == INF and s2['absmax1'][1:].isfinite().all()
    torch.testing.assert_close(w2[256:], torch.full((4096 - 256,), -0.2))  # other blocks unaffected


def test_checkpoint_of_another_model_refused():
    a = make_params()
    opt = fx_lion(a, 'foreach')
    run(opt, a, 1)
    other = Lion(make_params()[:4], lr=1e-3)
    with pytest.raises(ValueError, match='param groups'):
        other.load_state_dict(opt.state_dict())


@pytest.mark.cpu_only  # on CUDA, test_cuda.py checks that the state is paged
def test_paged_falls_back_on_cpu_with_a_warning():
    a, b = make_params(), make_params()
    with pytest.warns(UserWarning, match='is_paged=True. needs CUDA'):
        paged = run(fx_lion(a, 'eightbit', is_paged=True), a, 5)
    assert_close_lists(paged, run(fx_lion(b, 'eightbit'), b, 5), atol=0.)


def test_bare_tensor_is_one_parameter():
    "As with fastai's optimizers, a single tensor is one parameter, not a list of its rows"
    w = torch.zeros(3, 2, requires_grad=True)
    opt = Lion(w, lr=0.1, wd=0.)
    w.grad = torch.ones(3, 2)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((3, 2), -0.1))


def test_state_dict_loads_with_plain_weights_only_after_numpy_hypers():
    "fastai's schedulers set hypers to numpy floats; the saved hypers are plain Python numbers"
    import numpy as np
    a = make_params()
    opt = fx_lion(a, 'foreach')
    opt.set_hyper('lr', np.array([1e-3, 2e-3]))
    run(opt, a, 2)
    loaded = roundtrip(opt.state_dict())
    assert [h['lr'] for h in loaded['hypers']] == [1e-3, 2e-3]
    assert all(type(h['lr']) is float for h in loaded['hypers'])


@pytest.mark.parametrize('path', ['native', 'foreach', 'eightbit'])
def test_non_contiguous_parameter(path):
    "A transposed leaf steps like its contiguous copy on every path"
    base = torch.randn(4096, 3)
    t = base.clone().t().detach().requires_grad_()
    c = t.detach().contiguous().requires_grad_()
    assert not t.is_contiguous()
    g = torch.randn(3, 4096)
    for w in (t, c):
        opt = Lion([w], lr=0.01, **PATH_KWARGS[path])
        for _ in range(3):
            w.grad = g.clone()
            opt.step()
    torch.testing.assert_close(t.detach(), c.detach(), atol=0., rtol=0.)


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
def test_cautious_matches_pytorch_optimizer(path):
    "Cautious Lion against pytorch-optimizer's `Lion(cautious=True)`, over 60 steps with two groups and do_wd=False"
    from pytorch_optimizer import Lion as PoLion
    ref_fn = lambda ps: PoLion(torch_groups(ps, 0.1), lr=1e-3, betas=(0.9, 0.99), cautious=True)
    assert_matches_reference(lambda ps, path: fx_lion(ps, path, cautious=True), ref_fn, path)
    plain, masked = make_params(), make_params()
    gap = [(a - b).abs().max() for a, b in zip(run(fx_lion(plain, path), plain, 20),
                                                run(fx_lion(masked, path, cautious=True), masked, 20))]
    assert min(gap) > 1e-3  # the mask changed every tensor


def test_cautious_refused_on_the_eightbit_path():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match='`cautious=True` is not available with `eightbit=True`'):
        Lion(w, lr=1e-3, cautious=True, eightbit=True)
    with pytest.raises(ValueError, match='`cautious` must be a bool'): Lion(w, lr=1e-3, cautious=1)
