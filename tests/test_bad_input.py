"Bad input, tried as a new user would, refused alike by every optimizer on every path, before anything changes."
import copy
import pytest
import torch
from conftest import make_params, set_grads, run, fx_groups, randn, PATH_KWARGS
from test_common import OPTIMIZERS, CASES


BETAS = {'lion': '`beta1=`, `beta2=`', 'ademamix': '`beta1=`, `beta2=`', 'lars': '`mom=`', 'sgd': '`mom=`',
         'adagrad': None, 'adan': '`beta1=`, `beta2=`', 'adopt': '`beta1=`, `beta2=`', 'muon': '`mom=`',
         'schedulefree_adamw': '`beta1=`, `beta2=`', 'prodigy': '`beta1=`, `beta2=`',
         'came': '`beta1=`, `beta2=`, `beta3=`', 'adafactor': None}  # what `betas=` is answered with; the rest have `mom` and `sqr_mom`


def _leaf(): return torch.zeros(3, requires_grad=True)


@pytest.mark.parametrize('name,path', CASES)
def test_bad_parameters_are_refused(name, path):
    make, kw, w = OPTIMIZERS[name], PATH_KWARGS[path], _leaf()
    with pytest.raises(ValueError, match='parameter 1 of param group 0 is parameter 0 of param group 0 again'):
        make([w, w], lr=1e-3, **kw)
    with pytest.raises(ValueError, match='appear only once'): make([[w], [_leaf(), w]], lr=1e-3, **kw)
    with pytest.raises(ValueError, match='not a leaf tensor'): make([_leaf() * 2], lr=1e-3, **kw)


@pytest.mark.parametrize('name,path', CASES)
def test_bad_hypers_are_reported_as_given(name, path):
    make, kw, w = OPTIMIZERS[name], PATH_KWARGS[path], [_leaf()]
    for bad in (float('inf'), float('nan')):
        with pytest.raises(ValueError, match='`lr` must be a finite number'): make(w, lr=bad, **kw)
    with pytest.raises(ValueError, match="got '1e-3'"): make(w, lr='1e-3', **kw)
    opt = make(w, lr=1e-3, **kw)
    with pytest.raises(ValueError, match='got inf'): opt.set_hyper('lr', float('inf'))
    assert opt.hypers[0]['lr'] == 1e-3


@pytest.mark.parametrize('name,path', CASES)
def test_torch_and_bitsandbytes_keywords_name_ours(name, path):
    make, kw, w = OPTIMIZERS[name], PATH_KWARGS[path], [_leaf()]
    with pytest.raises(TypeError, match="`weight_decay` is bitsandbytes'/torch's name: pass `wd=`"):
        make(w, lr=1e-3, weight_decay=0.1, **kw)
    betas = BETAS.get(name, '`mom=`, `sqr_mom=`')
    with pytest.raises(TypeError, match=f"`betas` is bitsandbytes'/torch's name: pass {betas}" if betas else
                       'unexpected keyword'):
        make(w, lr=1e-3, betas=(0.9, 0.99), **kw)
    if name == 'lars':
        with pytest.raises(TypeError, match='pass `mom=`'): make(w, lr=1e-3, momentum=0.9, **kw)


@pytest.mark.parametrize('name,path', CASES)
def test_sparse_gradient_is_refused_before_any_change(name, path):
    ps = make_params()
    opt = fx_groups(OPTIMIZERS[name], ps, path)
    run(opt, ps, 2)
    set_grads(ps, 2)
    ps[4].grad = ps[4].grad.to_sparse()
    before, state = [p.detach().clone() for p in ps], copy.deepcopy([opt.state[p] for p in ps])
    with pytest.raises(RuntimeError, match='parameter 1 of param group 1 has a sparse gradient'): opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(opt.state[p]['step'] == s['step'] == 2 for p, s in zip(ps, state))


@pytest.mark.parametrize('name,path', CASES)
def test_refused_load_changes_nothing(name, path):
    ps = make_params()
    opt = fx_groups(OPTIMIZERS[name], ps, path)
    run(opt, ps, 2)
    sd = copy.deepcopy(opt.state_dict())
    bad_hyper = copy.deepcopy(sd)
    bad_hyper['hypers'][1]['lr'] = float('nan')
    with pytest.raises(ValueError, match='`lr` must be a finite number'): opt.load_state_dict(bad_hyper)
    if path != 'eightbit':
        bad_shape = copy.deepcopy(sd)
        key = opt.state_keys[0]
        bad_shape['state'][0][key] = torch.zeros(7)
        with pytest.raises(ValueError, match=f"saved state '{key}' of parameter 0 has shape"): opt.load_state_dict(bad_shape)
    assert opt.hypers[1]['lr'] == sd['hypers'][1]['lr']
    for p, s in zip(ps, sd['state']):
        assert all(torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v for k, v in s.items())


@pytest.mark.parametrize('name,path', [c for c in CASES if c[0] != 'adam'])
def test_complex_parameters_are_refused_where_the_math_does_not_hold(name, path):
    z = torch.randn(4, 3, dtype=torch.cfloat, requires_grad=True)
    with pytest.raises(ValueError, match='parameter 0 of param group 0 is complex'):
        OPTIMIZERS[name]([z], lr=1e-3, **PATH_KWARGS[path])


@pytest.mark.parametrize('path', ['native', 'foreach', 'fused', 'eightbit'])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_complex_adam_matches_torch(path, decouple_wd):
    "Adam steps a complex tensor as its real and imaginary parts, as torch.optim.Adam(W) does"
    g = torch.Generator().manual_seed(0)
    z0 = randn(64, 70, dtype=torch.cfloat, generator=g)  # 8960 real elements: 8-bit state on that path
    ours, ref = z0.clone().requires_grad_(), z0.clone().requires_grad_()
    kw = dict(PATH_KWARGS[path], optim_bits=32) if path == 'eightbit' else PATH_KWARGS[path]
    opt = OPTIMIZERS['adam']([ours], lr=1e-2, mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.1, decouple_wd=decouple_wd, **kw)
    ref_cls = torch.optim.AdamW if decouple_wd else torch.optim.Adam
    ref_opt = ref_cls([ref], lr=1e-2, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.1)
    for _ in range(20):
        grad = randn(64, 70, dtype=torch.cfloat, generator=g)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step(); ref_opt.step()
    assert opt.state[ours]['step'] == 20 and opt.path == path
    torch.testing.assert_close(ours.detach(), ref.detach(), atol=1e-5, rtol=1e-5)


def test_complex_and_real_adam_fused_together():
    "On the fused path a real tensor takes the fused kernel and a complex one ForEach; both match torch's AdamW"
    g = torch.Generator().manual_seed(1)
    w0, z0 = randn(300, generator=g), randn(20, 10, dtype=torch.cfloat, generator=g)
    ours, ref = [w0.clone().requires_grad_(), z0.clone().requires_grad_()], [w0.clone().requires_grad_(), z0.clone().requires_grad_()]
    opt = OPTIMIZERS['adam'](ours, lr=1e-2, wd=0.1, fused=True)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.1)
    for _ in range(10):
        grads = [randn(w0.shape, generator=g), randn(z0.shape, dtype=torch.cfloat, generator=g)]
        for o, r, gr in zip(ours, ref, grads): o.grad, r.grad = gr.clone(), gr.clone()
        opt.step(); ref_opt.step()
    assert len(opt.runner.layouts) == 1   # the real tensor's group only
    for o, r in zip(ours, ref): torch.testing.assert_close(o.detach(), r.detach(), atol=1e-5, rtol=1e-5)
