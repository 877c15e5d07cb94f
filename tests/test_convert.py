"Checkpoints that move between the 8-bit path and the fp32 paths: the mapping, the conversions, their bounds, refusals."
import warnings
from functools import partial
import pytest
import torch
from fastxtend_optim.lion import Lion
from fastxtend_optim.adam import Adam, adam
from fastxtend_optim.lars import Lars
from fastxtend_optim.sgd import SGD
from fastxtend_optim.rmsprop import RMSProp
from fastxtend_optim.adagrad import Adagrad
from fastxtend_optim.lamb import Lamb
from fastxtend_optim.ademamix import AdEMAMix
from fastxtend_optim.radam import RAdam
from fastxtend_optim.eightbit import (BLOCKSIZE, QUANTIZER_SLACK, PathConversionWarning, dequantize_state,
                                      dynamic_map, quantization_bound, quantize_state)
from conftest import make_params, run, fx_groups, roundtrip

pytestmark = pytest.mark.cpu_only('bitsandbytes CPU kernels and their quantizer; the bounds are stated for it')

# optimizer, options that exercise what sits around the kernel, and the fp32 keys each bitsandbytes state holds
OPTS = {'lion': (Lion, {}, (('grad_avg',),)),
        'adam': (Adam, dict(decouple_wd=False), (('grad_avg',), ('sqr_avg',))),
        'lars': (Lars, dict(nesterov=True, clip=True, max_unorm=0.5), (('grad_avg',),)),
        'sgd': (SGD, dict(mom=0.9, dampening=0.2, wd=0.05, decouple_wd=False), (('grad_avg',),)),
        'rmsprop': (RMSProp, dict(wd=0.05, decouple_wd=False), (('sqr_avg',),)),
        'adagrad': (Adagrad, dict(wd=0.05, lr_decay=0.02, initial_accumulator_value=0.1), (('sqr_sum',),)),
        'lamb': (Lamb, dict(wd=0.05), (('grad_avg',), ('sqr_avg',))),
        'ademamix': (AdEMAMix, dict(t_alpha=20, t_beta3=20), (('grad_avg', 'slow_avg'), ('sqr_avg',)))}
SIGNED, UNSIGNED = dynamic_map('cpu', signed=True), dynamic_map('cpu', signed=False)
HALF_GAP = (SIGNED.diff().max() / 2).item()  # 0.00703: the widest half gap of either map (the signed one's)


def make(name, params, path, **kw):
    fn, opts, _ = OPTS[name]
    return fx_groups(fn, params, path, **opts, **kw)


def bnb_rows(state, j, keys):
    "State `j`'s fp32 values per key, dequantized where 8-bit"
    t = state[f'state{j}']
    if t.dtype != torch.uint8: return list(t) if len(keys) > 1 else [t]
    if len(keys) > 1: return [dequantize_state(t[k], state[f'absmax{j}'][k], state[f'qmap{j}']) for k in range(2)]
    return [dequantize_state(t, state[f'absmax{j}'], state[f'qmap{j}'])]


def load(opt, sd):
    "`opt.load_state_dict(sd)`; returns the warnings it raised"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        opt.load_state_dict(sd)
    return [w for w in caught if not str(w.message).startswith('Failed to load CPU gemm_4bit')]


@pytest.mark.parametrize('name', OPTS)
def test_each_bitsandbytes_state_is_the_fp32_state(name):
    "The 32-bit kernels beside the ForEach path: every mapped state is the same quantity (fp32 rounding apart)"
    a, b = make_params(), make_params()
    bits32, full = make(name, a, 'eightbit', optim_bits=32), make(name, b, 'foreach')
    run(bits32, a, 6), run(full, b, 6)
    for p, q in zip(a, b):
        for j, keys in enumerate(OPTS[name][2], 1):
            for k, v in zip(keys, bnb_rows(bits32.state[p], j, keys)):
                ref = full.state[q][k]
                assert (v - ref).abs().max() <= 1e-6 * ref.abs().max(), (k, p.shape)


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
@pytest.mark.parametrize('name', OPTS)
def test_eightbit_to_fp32_and_back_is_exact(name, path):
    "8 bits -> fp32 is the dequantized state, exactly; -> 8 bits again gives the codes and absmax back bitwise"
    a = make_params()
    eight = make(name, a, 'eightbit')
    run(eight, a, 5)
    saved = roundtrip(eight.state_dict())
    full = make(name, a, path, no_wd=())
    caught = load(full, saved)
    assert len(caught) == 1 and caught[0].category is PathConversionWarning
    assert f"converted the saved 8-bit state of 6 parameters to the fp32 state of the {path!r} path: 2 dequantized " \
           "from 8 bits, 4 taken from bitsandbytes' 32-bit state" in str(caught[0].message)
    for p, s in zip(a, saved['state']):
        st = full.state[p]
        assert st['step'] == 5 and set(OPTS[name][2][0]) <= set(st) and not {'state1', 'absmax1', 'qmap1'} & set(st)
        for j, keys in enumerate(OPTS[name][2], 1):
            for k, v in zip(keys, bnb_rows(s, j, keys)): assert torch.equal(st[k], v) and st[k].dtype == p.dtype

    back = make(name, a, 'eightbit', no_wd=())
    caught = load(back, roundtrip(full.state_dict()))
    assert len(caught) == 1 and "2 quantized to 8 bits" in str(caught[0].message) and "4 kept in 32 bits" in str(caught[0].message)
    for p, s in zip(a, saved['state']):
        st = back.state[p]
        for k in ('state1', 'state2', 'absmax1', 'absmax2'):
            if k in s: assert torch.equal(st[k], s[k]) and st[k].dtype == s[k].dtype, (k, p.shape)
    run(back, a, 2, start=5)  # and it steps


def test_round_trip_keeps_zero_and_partial_blocks():
    "A block that never saw a gradient (all zero), a partial last block, and a tensor below min_8bit_size"
    a = [torch.randn(4097, requires_grad=True), torch.randn(300, requires_grad=True)]
    eight = Adam(a, lr=1e-2, eightbit=True)
    for i in range(3):
        for p in a: p.grad = torch.randn(p.shape)
        a[0].grad[:BLOCKSIZE] = 0
        a[0].grad[BLOCKSIZE:2 * BLOCKSIZE] = -torch.rand(BLOCKSIZE) - 1  # a block whose largest value is negative
        eight.step()
    s = eight.state[a[0]]
    assert s['absmax1'][0] == 0 and s['absmax2'][0] == 0 and s['absmax1'].shape == (17,)
    assert SIGNED[s['state1'][BLOCKSIZE:2 * BLOCKSIZE].long()].min() == SIGNED[0]  # stored at -0.9930, not -1
    assert s['state1'][-1:].numel() == 1 and eight.state[a[1]]['state1'].dtype == torch.float32
    saved = roundtrip(eight.state_dict())
    full = Adam(a, lr=1e-2, foreach=True)
    load(full, saved)
    assert (full.state[a[0]]['grad_avg'][:BLOCKSIZE] == 0).all()
    assert torch.equal(full.state[a[1]]['sqr_avg'], saved['state'][1]['state2'])  # 32-bit state: renamed
    back = Adam(a, lr=1e-2, eightbit=True)
    load(back, roundtrip(full.state_dict()))
    for s0, p in zip(saved['state'], a):
        for k in ('state1', 'state2', 'absmax1', 'absmax2'):
            if k in s0: assert torch.equal(back.state[p][k], s0[k]), k


@pytest.mark.parametrize('name', OPTS)
def test_fp32_to_eightbit_to_fp32_within_bound(name):
    "Each quantized state lies within `quantization_bound` of the saved fp32 value, and comes back as that value"
    a = make_params()
    full = make(name, a, 'foreach')
    run(full, a, 5)
    saved = roundtrip(full.state_dict())
    eight = make(name, a, 'eightbit', no_wd=())
    caught = load(eight, saved)
    assert len(caught) == 1 and str(caught[0].message).startswith(
        "converted the saved fp32 state of 6 parameters to the 8-bit path's state: 2 quantized to 8 bits")
    worst = 0.
    for p, s in zip(a, saved['state']):
        st = eight.state[p]
        quantized = p.numel() >= 4096
        assert (st['state1'].dtype == torch.uint8) == quantized
        for j, keys in enumerate(OPTS[name][2], 1):
            for r, (k, v) in enumerate(zip(keys, bnb_rows(st, j, keys))):
                if not quantized: assert torch.equal(v, s[k]); continue
                absmax = st[f'absmax{j}'][r] if len(keys) > 1 else st[f'absmax{j}']
                ratio = ((v - s[k]).abs() / quantization_bound(s[k], absmax, st[f'qmap{j}'])).max().item()
                assert ratio <= 1, (k, ratio)
                worst = max(worst, ratio)
    assert worst > 0.3  # the bound is not loose by orders of magnitude
    again = make(name, a, 'foreach', no_wd=())
    load(again, roundtrip(eight.state_dict()))
    for p in a:
        for j, keys in enumerate(OPTS[name][2], 1):
            for k, v in zip(keys, bnb_rows(eight.state[p], j, keys)): assert torch.equal(again.state[p][k], v)


def test_bound_holds_over_scales_and_is_attained():
    "The stated bound over 2^18 values spread over nine decades; bitsandbytes' quantizer nearly reaches it"
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2**18, generator=g) * torch.logspace(-6, 3, 2**10).repeat_interleave(BLOCKSIZE)
    for code, vals in ((SIGNED, x), (UNSIGNED, x.square())):
        q, absmax = quantize_state(vals, code)
        err = (dequantize_state(q, absmax, code) - vals).abs()
        bound = quantization_bound(vals, absmax, code)
        assert (err <= bound).all() and (err / bound).max() > 0.95
        a = absmax.repeat_interleave(BLOCKSIZE)
        assert (bound <= a * (HALF_GAP + QUANTIZER_SLACK) * (1 + 1e-6)).all()  # the uniform form of the bound


def test_refused_conversions_change_nothing():
    a = make_params()
    ams = Adam(a, lr=1e-3, amsgrad=True)
    run(ams, a, 2)
    eight = Adam(a, lr=1e-3, eightbit=True)
    before = [dict(h) for h in eight.hypers]
    with pytest.raises(ValueError, match=r"\['max_sqr_avg'\] of parameter 0 has no place in bitsandbytes' 'adam'"):
        eight.load_state_dict(ams.state_dict())
    assert [dict(h) for h in eight.hypers] == before and not eight.state[a[0]]

    run(eight, a, 2)
    with pytest.raises(ValueError, match=r"holds \['grad_avg', 'sqr_avg'\], and this optimizer keeps \['grad_avg', 'max_sqr_avg', 'sqr_avg'\]"):
        Adam(a, lr=1e-3, amsgrad=True).load_state_dict(eight.state_dict())

    rms = RMSProp(a, lr=1e-3, mom=0.9)
    run(rms, a, 2)
    with pytest.raises(ValueError, match=r"\['grad_avg'\] of parameter 0 has no place in bitsandbytes' 'rmsprop'"):
        RMSProp(a, lr=1e-3, eightbit=True).load_state_dict(rms.state_dict())

    sgd8 = SGD(a, lr=1e-3, mom=0.9, eightbit=True)
    run(sgd8, a, 2)
    with pytest.raises(ValueError, match=r"this optimizer keeps \[\]"):
        SGD(a, lr=1e-3).load_state_dict(sgd8.state_dict())

    with pytest.raises(ValueError, match="cannot use the saved state keys .*'state1'.*no 8-bit path"):
        RAdam(a, lr=1e-3).load_state_dict(eight.state_dict())


@pytest.mark.parametrize('path', ['foreach', 'eightbit'])
def test_same_path_loads_stay_silent(path):
    a = make_params()
    opt = make('adam', a, path)
    run(opt, a, 3)
    assert load(make('adam', a, path), roundtrip(opt.state_dict())) == []


def fixed_grads(params, step):
    g = torch.Generator().manual_seed(7_919 + step)
    for p in params: p.grad = torch.randn(p.shape, generator=g)


@pytest.mark.parametrize('direction', ['fp32 to 8-bit', '8-bit to fp32'])
def test_resume_on_the_other_path_stays_within_the_derived_bound(direction):
    """SGD with momentum, the same gradients: continuing on the other path parts from continuing on the saving path by
    at most lr*mom*sum(e_t), where the 8-bit state errs by e_0 at the load (fp32 -> 8 bits: its quantization bound;
    8 bits -> fp32: 0, the fp32 state is the 8-bit one) and e_t <= mom*e_(t-1) + Q_t after the kernel's requantization
    at step t (Q_t: the block's absmax times the widest half gap plus the slack)"""
    lr, mom, n = 0.05, 0.9, 10
    a = [torch.randn(8192, requires_grad=True), torch.randn(100, requires_grad=True)]
    saver = SGD(a, lr=lr, mom=mom, eightbit=direction.startswith('8'))
    for i in range(5): fixed_grads(a, i); saver.step()
    saved = roundtrip({'params': [p.detach() for p in a], 'opt': saver.state_dict()})
    b, c = ([p.clone().requires_grad_() for p in saved['params']] for _ in range(2))
    full, eight = SGD(b, lr=lr, mom=mom), SGD(c, lr=lr, mom=mom, eightbit=True)
    caught = load(eight if direction.startswith('fp32') else full, saved['opt'])
    (eight if direction.startswith('8') else full).load_state_dict(saved['opt'])  # the saving path: silent
    assert len(caught) == 1
    s8 = eight.state[c[0]]
    ref = full.state[b[0]]['grad_avg']
    e = quantization_bound(ref, s8['absmax1'], SIGNED) if direction.startswith('fp32') else torch.zeros(8192)
    drift = torch.zeros(8192)
    for i in range(5, 5 + n):
        fixed_grads(b, i), fixed_grads(c, i)
        full.step(), eight.step()
        drift += lr * mom * e
        e = mom * e + s8['absmax1'].repeat_interleave(BLOCKSIZE)[:8192] * (HALF_GAP + QUANTIZER_SLACK)
    diff = (b[0] - c[0]).abs()
    bound = drift + 1e-6 * n  # plus fp32 rounding of the weights (|p| < 6, ulp 5e-7, one rounding per step)
    assert (diff <= bound).all() and diff.max() > 0
    print(f'{direction}: largest |dp| {diff.max():.2e}, its bound {bound.max():.2e}, largest ratio {(diff / bound).max():.2f}')
    torch.testing.assert_close(b[1], c[1], atol=1e-6, rtol=0)  # the 32-bit state of the small tensor: the same run


@pytest.mark.parametrize('saved_path,loaded_path', [('eightbit', 'foreach'), ('foreach', 'eightbit')])
def test_learner_load_converts_instead_of_starting_fresh(saved_path, loaded_path, tmp_path):
    "fastai turns an optimizer load error into a warning and a fresh optimizer: a path change must load instead"
    from fastxtend_optim.demo import digits_dls, digits_learner, PATH_FUNCS
    dls = digits_dls()
    learn = digits_learner(adam(**PATH_FUNCS[saved_path]), dls, path=tmp_path)
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 3e-3)
    learn.save('ckpt', with_opt=True)
    other = digits_learner(adam(**PATH_FUNCS[loaded_path]), dls, path=tmp_path)
    other.create_opt()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        other.load('ckpt', with_opt=True)
    messages = [str(w.message) for w in caught if not str(w.message).startswith('Failed to load CPU gemm_4bit')]
    assert not any('Could not load' in m for m in messages)
    assert sum(m.startswith('converted the saved') for m in messages) == 1
    params = [p for p, *_ in other.opt.all_params()]
    assert all(other.opt.state[p]['step'] == learn.opt.state[q]['step'] > 0
               for p, (q, *_) in zip(params, learn.opt.all_params()))
    big = [(p, q) for p, (q, *_) in zip(params, learn.opt.all_params()) if p.numel() >= 4096]
    assert len(big) == 2
    for p, q in big:
        src, dst = learn.opt.state[q], other.opt.state[p]
        if saved_path == 'eightbit':
            assert torch.equal(dst['grad_avg'], bnb_rows(src, 1, ('grad_avg',))[0])
        else:
            assert dst['state1'].dtype == torch.uint8
            v = bnb_rows(dst, 1, ('grad_avg',))[0]
            assert ((v - src['grad_avg']).abs() <= quantization_bound(src['grad_avg'], dst['absmax1'], SIGNED)).all()
    with other.no_bar(), other.no_logging(): other.fit(1, 1e-3)  # and it trains on


def test_state_takes_the_parameter_dtype():
    "bf16 parameters: the fp32 paths keep bf16 state (zeros_like(p)), the 8-bit path fp32/uint8 state"
    a = make_params(dtype=torch.bfloat16)
    eight = Lion(a, lr=1e-3, eightbit=True)
    run(eight, a, 3)
    saved = roundtrip(eight.state_dict())
    full = Lion(a, lr=1e-3, foreach=True)
    load(full, saved)
    for p, s in zip(a, saved['state']):
        assert full.state[p]['grad_avg'].dtype == torch.bfloat16
        assert torch.equal(full.state[p]['grad_avg'], bnb_rows(s, 1, ('grad_avg',))[0].to(torch.bfloat16))
    back = Lion(a, lr=1e-3, eightbit=True)
    load(back, roundtrip(full.state_dict()))
    assert [back.state[p]['state1'].dtype for p in a] == [torch.uint8 if p.numel() >= 4096 else torch.float32 for p in a]
    run(back, a, 1, start=3)


def test_complex_parameters_are_refused_not_converted():
    real = [torch.randn(5000, 2, requires_grad=True)]
    eight = Adam(real, lr=1e-3, eightbit=True)
    run(eight, real, 2)
    cplx = [torch.randn(5000, dtype=torch.complex64, requires_grad=True)]
    with pytest.raises(ValueError, match='parameter 0 is complex: the 8-bit path has no complex state'):
        Adam(cplx, lr=1e-3, foreach=True).load_state_dict(eight.state_dict())
    full = Adam(cplx, lr=1e-3, foreach=True)  # a complex checkpoint on an fp32 path: as before, silently
    run(full, cplx, 2)
    assert load(Adam(cplx, lr=1e-3, foreach=False), roundtrip(full.state_dict())) == []
