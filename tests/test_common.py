"What every optimizer must do alike, on every path: errors, state keys, pickling, None gradients."
import pickle
import pytest
import torch
from functools import partial
from fastxtend_optim.registry import REGISTRY
from conftest import (assert_bf16_tracks_fp32, make_params, run, fx_groups, roundtrip, assert_close_lists, PATH_KWARGS,
                      LRS, NO_WD)

TEST_KWARGS = {'sgd': dict(mom=0.9), 'prodigy': dict(d0=0.1)}  # the settings these tests want beyond the defaults
OPTIMIZERS = {n: partial(e.factory, **TEST_KWARGS.get(n, {})) for n, e in REGISTRY.items()}
NO_EIGHTBIT = {n for n, e in REGISTRY.items() if 'eightbit' not in e.paths}
FUSED = [n for n, e in REGISTRY.items() if 'fused' in e.paths]  # those with a fused path (and so low-bit state)
PATHS = list(PATH_KWARGS)
CASES = [(n, p) for n, e in REGISTRY.items() for p in e.paths]


@pytest.mark.parametrize('name,path', CASES)
def test_same_errors_on_every_path(name, path):
    opt_fn, kw, w = OPTIMIZERS[name], PATH_KWARGS[path], [torch.zeros(3, requires_grad=True)]
    for bad, match in ((dict(lr=-1.), '`lr` must be'), (dict(lr=1e-3, wd=-1.), '`wd` must be'),
                       (dict(lr=1e-3, percentile_clipping=0), '`percentile_clipping` must be in')):
        with pytest.raises(ValueError, match=match): opt_fn(w, **bad, **kw)
    with pytest.raises(ValueError, match='`params` is empty'): opt_fn([], lr=1e-3, **kw)
    with pytest.raises(ValueError, match='exclusive|has no 8-bit path'): opt_fn(w, lr=1e-3, foreach=True, eightbit=True)
    with pytest.raises(ValueError, match='apply only to the 8-bit path|has no 8-bit path'):
        opt_fn(w, lr=1e-3, foreach=False, optim_bits=32)
    opt = opt_fn(w, lr=1e-3, **kw)
    with pytest.raises(ValueError, match='`lr` must be'): opt.set_hyper('lr', -1.)
    assert opt.hypers[0]['lr'] == 1e-3


RESUME_KWARGS = {'adam': dict(amsgrad=False, decouple_wd=False), 'lars': dict(nesterov=True, clip=True),
                 'sgd': dict(dampening=0.2, wd=0.05, decouple_wd=False), 'rmsprop': dict(wd=0.05, decouple_wd=False),
                 'adagrad': dict(wd=0.05, lr_decay=0.02, initial_accumulator_value=0.1),
                 'qhadam': dict(nu_2=0.6, decouple_wd=False), 'ademamix': dict(t_alpha=20, t_beta3=20),
                 'adan': dict(adam_wd=True, cautious=True), 'stableadamw': dict(wd=0.05, cautious=True),
                 'adopt': dict(wd=0.05, cautious=True, decouple_wd=True), 'sophia': dict(mom=0.9, rho=0.5, wd=0.05),
                 'muon': dict(nesterov=False, wd=0.05, adam_wd=0.1),
                 'schedulefree_adamw': dict(wd=0.05, warmup_steps=20, r=1.)}


@pytest.mark.parametrize('name,path', CASES)
def test_checkpoint_resume_is_exact(name, path):
    "Saved mid-run through torch.save/torch.load(weights_only=True), then continued: bitwise the uninterrupted run"
    make = lambda ps, **kw: fx_groups(OPTIMIZERS[name], ps, path, **RESUME_KWARGS.get(name, {}), **kw)
    a, b = make_params(), make_params()
    uninterrupted = run(make(a), a, 30)
    first = make(b)
    run(first, b, 15)
    saved = roundtrip({'params': [p.detach() for p in b], 'opt': first.state_dict()})
    c = [p.clone().requires_grad_() for p in saved['params']]
    second = make(c, no_wd=())
    second.load_state_dict(saved['opt'])
    assert all(second.state[c[i]]['do_wd'] is False for i in NO_WD) and second.hypers[0]['lr'] == LRS[0]
    assert second.state[c[0]]['step'] == 15
    assert_close_lists(run(second, c, 15, start=15), uninterrupted, atol=0.)


MOVE_KWARGS = {'sgd': dict(nesterov=True, wd=0.05), 'rmsprop': dict(mom=0.9, wd=0.05, eps=1e-4),
               'adagrad': dict(wd=0.05, lr_decay=0.02, initial_accumulator_value=0.1), 'radam': dict(wd=0.05),
               'qhadam': dict(wd=0.05), 'lamb': dict(wd=0.05), 'ademamix': dict(wd=0.05, t_alpha=20, t_beta3=20),
               'adam': dict(amsgrad=True), 'lars': dict(clip=True, wd=0.01), 'ranger': dict(), 'adan': dict(wd=0.05),
               'stableadamw': dict(wd=0.05, cautious=True),
               'adopt': dict(wd=0.05, cautious=True), 'sophia': dict(wd=0.05, rho=0.5), 'muon': dict(wd=0.05),
               'schedulefree_adamw': dict(wd=0.05, warmup_steps=20, r=1.)}


@pytest.mark.parametrize('name', MOVE_KWARGS)
def test_checkpoint_moves_native_fused_foreach(name):
    "One run moved native -> fused -> foreach through weights_only checkpoints ends where native alone ends"
    make = lambda ps, path: fx_groups(OPTIMIZERS[name], ps, path, **MOVE_KWARGS[name])
    a = make_params()
    uninterrupted = run(make(a, 'native'), a, 30)
    ps, last = make_params(), None
    for i, path in enumerate(('native', 'fused', 'foreach')):
        ps = [p.detach().clone().requires_grad_() for p in ps]
        opt = make(ps, path)
        if last is not None: opt.load_state_dict(last)
        run(opt, ps, 10, start=10 * i)
        last = roundtrip(opt.state_dict())
    assert [s['step'] for s in last['state']] == [30] * len(ps)
    assert_close_lists(ps, uninterrupted, atol=1e-6)


@pytest.mark.parametrize('name', sorted(NO_EIGHTBIT))
def test_eightbit_is_refused_with_the_reason_and_the_fused_low_bit_state(name):
    "The refusal gives the reason, and points at the fused path's 8-bit state only where there is a fused path"
    d = REGISTRY[name].declaration
    with pytest.raises(ValueError, match=f'{REGISTRY[name].factory.__name__} has no 8-bit path: {d.no_eightbit}') as e:
        OPTIMIZERS[name]([torch.zeros(3, requires_grad=True)], lr=1e-3, eightbit=True)
    assert ('state_bits=8' in str(e.value)) == (d.fused is not None)


@pytest.mark.parametrize('name', OPTIMIZERS)
def test_native_and_foreach_share_state_keys_and_hypers(name):
    keys, hypers = [], []
    for path in ('native', 'foreach'):
        ps = make_params()
        opt = fx_groups(OPTIMIZERS[name], ps, path)
        run(opt, ps, 2)
        keys.append([sorted(opt.state[p]) for p in ps])
        hypers.append([dict(h) for h in opt.hypers])
    assert keys[0] == keys[1] and hypers[0] == hypers[1]
    assert all('step' in k for k in keys[0])


@pytest.mark.parametrize('name,path', CASES)
def test_pickles_and_skips_none_grads(name, path):
    ps = make_params()
    opt = fx_groups(OPTIMIZERS[name], ps, path)
    run(opt, ps, 1)
    ps[2].grad = None
    before = ps[2].detach().clone()
    opt.step()
    assert torch.equal(ps[2], before) and opt.state[ps[2]]['step'] == 1
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.path == path and clone.hypers == opt.hypers


@pytest.mark.parametrize('name', [o for o in OPTIMIZERS if o not in NO_EIGHTBIT])
def test_missing_bitsandbytes_fails_only_the_eightbit_path(name, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, 'bitsandbytes.functional', None)
    w = [torch.zeros(3, requires_grad=True)]
    OPTIMIZERS[name](w, lr=1e-3, foreach=True)
    with pytest.raises(ImportError, match="pip install 'bitsandbytes"):
        OPTIMIZERS[name](w, lr=1e-3, eightbit=True)


@pytest.mark.parametrize('name,path', CASES)
def test_bf16_steps(name, path):
    "bf16 parameters step on every path and agree with an fp32 run to bf16 resolution"
    assert_bf16_tracks_fp32(lambda ps: fx_groups(OPTIMIZERS[name], ps, path), steps=3)


@pytest.mark.parametrize('path', ['native', 'fused'])
def test_bf16_ranger_tracks_fp32_across_its_syncs(path):
    "12 steps: two Lookahead syncs (k=6) move the fp32 slow weights and rebuild the bf16 pair from them"
    assert_bf16_tracks_fp32(lambda ps: fx_groups(OPTIMIZERS['ranger'], ps, path), steps=12)
