"The torch face: torch's keywords, param groups, schedulers and state dicts over the fastai face, against torch.optim and the fastai face."
import warnings
import pytest
import torch
import bitsandbytes.functional as bnb_functional
import bitsandbytes.optim as bnb_optim
from fastxtend_optim.eightbit import PathConversionWarning
from fastxtend_optim import torchface as fxt
from fastxtend_optim.registry import REGISTRY
from conftest import make_params, set_grads, run, assert_close_lists, torch_groups, roundtrip, LRS, PATH_KWARGS

WD = 0.05
SMALL = ((16, 8), (8,), (4100,), (12,), (10, 16), (10,))  # one tensor big enough for bitsandbytes' 8 bits
# the torch face's defaults that are torch's, not the declared ones, as the fastai face's hypers
TORCH_DEFAULT_HYPERS = dict(adam=dict(mom=0.9, sqr_mom=0.999, eps=1e-8, decouple_wd=False),
                            sgd=dict(decouple_wd=False), rmsprop=dict(decouple_wd=False))


def decay(i): return 1 / (1 + 0.1 * i)


def sched_run(opt, params, steps, start=0):
    "Step the torch-style `opt` with `set_grads`, a LambdaLR changing every group's lr each step"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    for i in range(start, start + steps):
        set_grads(params, i)
        opt.step()
        sched.step()
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize('path', ['native', 'foreach'])
@pytest.mark.parametrize('decoupled', [True, False])
def test_adam_and_adamw_match_torch_with_a_scheduler(path, decoupled):
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    face, torch_cls = (fxt.AdamW, torch.optim.AdamW) if decoupled else (fxt.Adam, torch.optim.Adam)
    opt = face(torch_groups(ours, WD), betas=(0.9, 0.99), eps=1e-6, **PATH_KWARGS[path])
    assert isinstance(opt, torch.optim.Optimizer) and opt.fx.path == path
    assert opt.fx.hypers[0]['decouple_wd'] is decoupled
    got = sched_run(opt, ours, 50)
    expected = sched_run(torch_cls(torch_groups(ref, WD), betas=(0.9, 0.99), eps=1e-6, foreach=False), ref, 50)
    assert_close_lists(got, expected, atol=1e-6)
    assert not torch.equal(got[0], make_params(shapes=SMALL)[0])


@pytest.mark.parametrize('path', ['native', 'foreach'])
@pytest.mark.parametrize('nesterov', [False, True])
def test_sgd_matches_torch_with_a_scheduler(path, nesterov):
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    kw = dict(momentum=0.9, nesterov=nesterov)
    got = sched_run(fxt.SGD(torch_groups(ours, WD), **kw, **PATH_KWARGS[path]), ours, 50)
    expected = sched_run(torch.optim.SGD(torch_groups(ref, WD), **kw, foreach=False), ref, 50)
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('path', ['native', 'foreach'])
@pytest.mark.parametrize('name', ['adagrad', 'rmsprop'])
def test_adagrad_and_rmsprop_match_torch_with_a_scheduler(path, name):
    "L2 weight decay, as torch's; RMSprop without momentum (fastai's momentum averages gradients, torch's updates)"
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    kw = dict(lr_decay=0.01, initial_accumulator_value=0.1, eps=1e-10) if name == 'adagrad' else dict(alpha=0.9, eps=1e-8)
    torch_cls = torch.optim.Adagrad if name == 'adagrad' else torch.optim.RMSprop
    got = sched_run(fxt.torch_optimizer(name, torch_groups(ours, WD), lr=1e-2, **kw, **PATH_KWARGS[path]), ours, 50)
    expected = sched_run(torch_cls(torch_groups(ref, WD), lr=1e-2, **kw, foreach=False), ref, 50)
    assert_close_lists(got, expected, atol=1e-6)


MOMENTUM = dict(sgd=(dict(momentum=0.9), dict(mom=0.9)))  # SGD's 8-bit path stores its momentum: it needs one


FACE_PATHS = dict(**PATH_KWARGS, fused8=dict(fused=True, state_bits=8))  # and low-bit state


def registry_cases():
    for name, entry in REGISTRY.items():
        for path in FACE_PATHS:
            if path.rstrip('8') in entry.paths: yield pytest.param(name, path, id=f'{name}-{path}')


@pytest.mark.parametrize('name,path', list(registry_cases()))
def test_each_torch_face_equals_its_fastai_face(name, path, device):
    "50 steps, four torch groups (two lrs, decay on and off), a LambdaLR on the torch face, the same lrs set on the fastai face"
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    torch_kw, fastai_kw = MOMENTUM.get(name, ({}, {}))
    face = fxt.torch_optimizer(name, torch_groups(ours, WD), **torch_kw, **FACE_PATHS[path])
    groups = torch_groups(ref, WD)
    fx = REGISTRY[name].factory([g['params'] for g in groups], lr=LRS[0], **fastai_kw, **FACE_PATHS[path],
                                **TORCH_DEFAULT_HYPERS.get(name, {}))
    fx.set_hyper('wd', [g['weight_decay'] for g in groups])
    base = [g['lr'] for g in groups]
    got = sched_run(face, ours, 50)
    for i in range(50):
        fx.set_hyper('lr', [lr * decay(i) for lr in base])
        set_grads(ref, i)
        fx.step()
    assert face.fx.path == fx.path == path.rstrip('8')
    assert_close_lists(got, [p.detach() for p in ref], atol=0.)


def test_keywords_map_to_the_fastai_hypers():
    ps = make_params()
    h = fxt.Lion(ps, lr=1e-4, betas=(0.8, 0.95), weight_decay=0.2).fx.hypers[0]
    assert (h['lr'], h['beta1'], h['beta2'], h['wd']) == (1e-4, 0.8, 0.95, 0.2)
    h = fxt.Adan(ps, betas=(0.9, 0.8, 0.7)).fx.hypers[0]
    assert (h['beta1'], h['beta2'], h['beta3']) == (0.9, 0.8, 0.7)
    h = fxt.RMSprop(ps, momentum=0.5, alpha=0.9).fx.hypers[0]
    assert (h['mom'], h['sqr_mom'], h['decouple_wd']) == (0.5, 0.9, False)
    h = fxt.AdamW(ps, decoupled_weight_decay=False, cautious=True).fx.hypers[0]
    assert (h['decouple_wd'], h['cautious'], h['eps'], h['sqr_mom'], h['wd']) == (False, True, 1e-8, 0.999, 1e-2)


def test_fastai_keywords_are_refused_with_torch_names():
    ps = make_params()
    for make, kw, torch_name in [(fxt.AdamW, dict(wd=0.1), 'weight_decay'), (fxt.AdamW, dict(mom=0.9), 'betas'),
                                 (fxt.AdamW, dict(sqr_mom=0.9), 'betas'), (fxt.SGD, dict(mom=0.9), 'momentum'),
                                 (fxt.Lion, dict(beta1=0.9), 'betas'), (fxt.RMSprop, dict(sqr_mom=0.9), 'alpha'),
                                 (fxt.AdamW, dict(decouple_wd=False), 'decoupled_weight_decay')]:
        with pytest.raises(TypeError, match=torch_name): make(ps, **kw)
    with pytest.raises(TypeError, match='weight_decay'): fxt.AdamW([{'params': ps[:2], 'wd': 0.}, {'params': ps[2:]}])
    with pytest.raises(TypeError, match='unexpected keyword'): fxt.AdamW(ps, nonsense=1)
    with pytest.raises(ValueError, match='maximize'): fxt.AdamW(ps, maximize=True)
    opt = fxt.AdamW(ps)
    opt.param_groups[0]['wd'] = 0.
    with pytest.raises(TypeError, match='weight_decay'): opt.step()


@pytest.mark.parametrize('path', ['foreach', 'eightbit'])
def test_torch_keywords_are_refused_by_the_fastai_face_with_fastai_names(path):
    ps = make_params()
    for name, kw, ours in [('adam', dict(weight_decay=0.1), '`wd=`'), ('adam', dict(betas=(0.9, 0.99)), '`mom=`, `sqr_mom=`'),
                           ('adam', dict(decoupled_weight_decay=False), '`decouple_wd=`'), ('sgd', dict(momentum=0.9), '`mom=`'),
                           ('lion', dict(betas=(0.9, 0.99)), '`beta1=`, `beta2=`'), ('rmsprop', dict(alpha=0.9), '`sqr_mom=`')]:
        with pytest.raises(TypeError, match=ours): REGISTRY[name].factory(ps, lr=1e-3, **kw, **PATH_KWARGS[path])


def test_bad_values_raise_the_fastai_faces_error_and_change_nothing():
    ps = make_params()
    with pytest.raises(ValueError, match='`mom` must be in'): fxt.AdamW(ps, betas=(1.5, 0.9))
    with pytest.raises(ValueError, match='tuple of 2'): fxt.AdamW(ps, betas=0.9)
    opt = fxt.AdamW([{'params': ps[:3]}, {'params': ps[3:]}], lr=1e-3)
    set_grads(ps, 0)
    opt.param_groups[0]['lr'] = 2e-3
    opt.param_groups[1]['lr'] = -1.
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match='`lr` must be'): opt.step()
    assert [h['lr'] for h in opt.fx.hypers] == [1e-3, 1e-3]  # neither group changed
    assert_close_lists([p.detach() for p in ps], before, atol=0.)
    opt.param_groups[1]['lr'] = 1e-3
    opt.step()
    assert [h['lr'] for h in opt.fx.hypers] == [2e-3, 1e-3]
    opt.param_groups[0]['foreach'] = False
    with pytest.raises(ValueError, match='cannot change'): opt.step()


def test_closure_zero_grad_and_add_param_group():
    ps = make_params()
    opt = fxt.AdamW(ps[:3], lr=1e-2)
    def closure():
        loss = sum((p ** 2).sum() for p in ps)
        loss.backward()
        return loss
    before = ps[0].detach().clone()
    loss = opt.step(closure)
    assert loss.requires_grad and not torch.equal(ps[0], before)
    opt.zero_grad()
    assert all(p.grad is None for p in ps[:3])
    opt.add_param_group({'params': ps[3:], 'lr': 1e-1, 'weight_decay': 0.})
    assert opt.fx.hypers[1]['lr'] == 1e-1 and opt.fx.hypers[1]['wd'] == 0.
    set_grads(ps, 0)
    before = ps[4].detach().clone()
    opt.step()
    assert not torch.equal(ps[4], before) and opt.state[ps[4]]['step'] == 1
    with pytest.raises(TypeError, match='weight_decay'): opt.add_param_group({'params': [torch.zeros(2, requires_grad=True)], 'wd': 0.})
    assert len(opt.param_groups) == len(opt.fx.param_lists) == 2


def test_state_dict_has_torch_layout_and_names():
    ps = make_params()
    opt = fxt.AdamW(torch_groups(ps, WD))
    run(opt, ps, 2)
    sd, rp = opt.state_dict(), make_params()
    ref = torch.optim.AdamW(torch_groups(rp, WD))
    run(ref, rp, 2)
    rsd = ref.state_dict()
    assert sorted(sd['state']) == sorted(rsd['state'])
    assert set(sd['state'][0]) == set(rsd['state'][0]) == {'step', 'exp_avg', 'exp_avg_sq'}
    assert sd['state'][0]['step'].dtype == rsd['state'][0]['step'].dtype and float(sd['state'][0]['step']) == 2.
    assert [g['params'] for g in sd['param_groups']] == [g['params'] for g in rsd['param_groups']]
    assert set(rsd['param_groups'][0]) - set(sd['param_groups'][0]) <= {'maximize', 'capturable', 'differentiable'}
    mom = fxt.SGD(ps, momentum=0.9)
    run(mom, ps, 1)
    assert set(mom.state_dict()['state'][0]) == {'step', 'momentum_buffer'}


TORCH_MAKERS = dict(adamw=(lambda g: torch.optim.AdamW(g, betas=(0.9, 0.99), foreach=False),
                           lambda g: fxt.AdamW(g, betas=(0.9, 0.99))),
                    sgd=(lambda g: torch.optim.SGD(g, momentum=0.9, dampening=0.1, foreach=False),
                         lambda g: fxt.SGD(g, momentum=0.9, dampening=0.1)),
                    adagrad=(lambda g: torch.optim.Adagrad(g, lr=1e-2, initial_accumulator_value=0.1, foreach=False),
                             lambda g: fxt.Adagrad(g, lr=1e-2, initial_accumulator_value=0.1)),
                    rmsprop=(lambda g: torch.optim.RMSprop(g, lr=1e-3, foreach=False), lambda g: fxt.RMSprop(g, lr=1e-3)))


@pytest.mark.parametrize('kind', list(TORCH_MAKERS))
@pytest.mark.parametrize('direction', ['torch_to_ours', 'ours_to_torch'])
def test_checkpoints_move_between_torch_and_the_face(kind, direction):
    "10 steps on one side, its state dict (saved and reloaded) into the other, 10 more: within 1e-6 of not moving"
    torch_make, face_make = TORCH_MAKERS[kind]
    first, second = (torch_make, face_make) if direction == 'torch_to_ours' else (face_make, torch_make)
    got, expected, *_ = handover(first, second)
    assert_close_lists(got, expected, atol=1e-6)


def handover(first, second, shapes=SMALL, load=lambda opt, sd: opt.load_state_dict(sd)):
    """`first` steps 10 times; its state dict (saved and reloaded) goes into `second` over the same weights, which steps
    10 more. Returns those weights, `first`'s own after 20 steps, the state dict and `second`"""
    a, b, c = (make_params(shapes=shapes) for _ in range(3))
    opt_a = first(torch_groups(a, WD))
    run(opt_a, a, 10)
    expected = run(opt_a, a, 10, start=10)
    opt_c = first(torch_groups(c, WD))
    with torch.no_grad():
        for p, q in zip(b, run(opt_c, c, 10)): p.copy_(q)
    sd, opt_b = roundtrip(opt_c.state_dict()), second(torch_groups(b, WD))
    load(opt_b, sd)
    return run(opt_b, b, 10, start=10), expected, sd, opt_b


def test_the_fastai_faces_state_dict_loads():
    a, b = make_params(), make_params()
    face = fxt.AdamW(a)
    run(face, a, 5)
    fx = REGISTRY['adam'].factory(b, lr=1e-3, sqr_mom=0.999, eps=1e-8)
    run(fx, b, 5)
    face.load_state_dict(roundtrip({'state': fx.state_dict()['state'], 'hypers': [dict(fx.hypers[0], lr=5e-3)]}))
    assert face.param_groups[0]['lr'] == 5e-3 and face.param_groups[0]['betas'] == (0.9, 0.999)
    assert face.state[a[0]]['step'] == 5


def test_lr_schedulers_accept_the_face():
    ps = make_params()
    opt = fxt.Lion(ps, lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    for i in range(4):
        set_grads(ps, i)
        opt.step()
        sched.step()
    assert opt.fx.hypers[0]['lr'] == pytest.approx(1e-3 * (1 + torch.cos(torch.tensor(3 * torch.pi / 4)).item()) / 2)


def test_the_fastai_faces_methods_copies_and_signature():
    import copy, inspect
    ps = make_params()
    opt = fxt.ScheduleFreeAdamW(ps, lr=1e-3, foreach=False)
    assert opt.path == 'native'  # the fastai face's
    run(opt, ps, 2)
    opt.eval(); opt.train()
    twin = copy.deepcopy(opt)
    assert twin.fx is not opt.fx and twin.state[twin.param_groups[0]['params'][0]]['step'] == 2
    with pytest.raises(AttributeError): opt._no_such_thing
    params = inspect.signature(fxt.AdamW).parameters
    assert list(params)[:3] == ['params', 'lr', 'betas'] and params['betas'].default == (0.9, 0.999)
    assert 'betas' in fxt.Lion.__doc__ and 'beta1, beta2' in fxt.Lion.__doc__


def test_a_scheduled_lr_keeps_the_fused_layouts():
    "An lr copied each step is a plain hyper change: the fused path's buffers stay; `state_bits` rebuilds them"
    ps = make_params(shapes=SMALL)
    opt = fxt.AdamW(ps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    seen = set()
    for i in range(3):
        set_grads(ps, i)
        opt.step()
        sched.step()
        seen |= {id(v) for v in opt.fx.runner.layouts.values()}
    assert opt.path == 'fused' and len(seen) == 1
    opt.param_groups[0]['state_bits'] = 16
    set_grads(ps, 3)
    opt.step()
    assert opt.state[ps[0]]['grad_avg'].dtype == torch.bfloat16


def test_grad_scaler_unscales_and_skips_non_finite_steps():
    "torch.amp.GradScaler unscales the face's gradients, and skips the step (no count, no move) on an inf"
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    opt, plain = fxt.AdamW(ours, lr=1e-2), fxt.AdamW(ref, lr=1e-2)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.)
    scaler.scale(torch.ones(()))  # as `scaler.scale(loss).backward()` would: the scale starts
    for i in range(3):
        set_grads(ours, i)
        for p in ours: p.grad.mul_(scaler.get_scale())
        if i == 1: ours[0].grad[0, 0] = float('inf')
        before = [p.detach().clone() for p in ours]
        scaler.step(opt)
        scaler.update()
        if i == 1:
            assert_close_lists([p.detach() for p in ours], before, atol=0.)
            continue
        set_grads(ref, i)
        plain.step()
    assert opt.state[ours[0]]['step'] == 2 and scaler.get_scale() == 512.
    assert_close_lists([p.detach() for p in ours], [p.detach() for p in ref], atol=1e-6)


def test_a_live_state_dict_is_copied_not_shared():
    "torch's optimizer and the face, each with its own state after one loads the other's live state dict"
    a, b = make_params(shapes=SMALL), make_params(shapes=SMALL)
    theirs, ours = torch.optim.AdamW(a), fxt.AdamW(b)
    run(theirs, a, 2)
    ours.load_state_dict(theirs.state_dict())
    kept = theirs.state[a[0]]['exp_avg'].clone()
    run(ours, b, 1, start=2)
    assert torch.equal(theirs.state[a[0]]['exp_avg'], kept) and ours.state[b[0]]['step'] == 3


@pytest.mark.parametrize('maker', ['torch', 'face'])
def test_the_fastai_face_loads_torch_layout(maker):
    "torch's AdamW checkpoint, or the torch face's, into the fastai face: it continues within 1e-6 of not moving"
    make = (lambda g: torch.optim.AdamW(g, betas=(0.9, 0.99), foreach=False)) if maker == 'torch' else \
           (lambda g: fxt.AdamW(g, betas=(0.9, 0.99)))
    fastai_face = lambda g: REGISTRY['adam'].factory([x['params'] for x in g], lr=1.)
    got, expected, sd, fx = handover(make, fastai_face)
    assert [h['lr'] for h in fx.hypers] == [g['lr'] for g in sd['param_groups']]
    assert (fx.hypers[0]['mom'], fx.hypers[0]['sqr_mom'], fx.hypers[0]['wd'], fx.hypers[1]['wd']) == (0.9, 0.99, WD, 0.)
    assert all(set(s) == {'step', 'grad_avg', 'sqr_avg'} and s['step'] == 20 for s in fx.state.values() if 'step' in s)
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('direction', ['torch_to_ours', 'ours_to_torch'])
def test_amsgrad_checkpoints_move_and_a_mismatch_is_refused(direction):
    torch_make = lambda g: torch.optim.Adam(g, amsgrad=True, foreach=False)
    face_make = lambda g: fxt.Adam(g, amsgrad=True)
    first, second = (torch_make, face_make) if direction == 'torch_to_ours' else (face_make, torch_make)
    got, expected, sd, _ = handover(first, second)
    assert 'max_exp_avg_sq' in sd['state'][0]
    assert_close_lists(got, expected, atol=1e-6)
    if direction == 'torch_to_ours':
        plain = fxt.Adam(torch_groups(make_params(shapes=SMALL), WD))
        with pytest.raises(ValueError, match='amsgrad=True'): plain.load_state_dict(sd)
        assert not plain.state_dict()['state']  # nothing loaded


def test_clip_grad_norm_before_step_matches_torch():
    ours, ref = make_params(shapes=SMALL), make_params(shapes=SMALL)
    opt, theirs = fxt.AdamW(torch_groups(ours, WD), lr=1e-2), torch.optim.AdamW(torch_groups(ref, WD), lr=1e-2, foreach=False)
    for i in range(20):
        for ps, o in ((ours, opt), (ref, theirs)):
            set_grads(ps, i)
            norm = torch.nn.utils.clip_grad_norm_(ps, max_norm=0.5)
            o.step()
        assert norm > 0.5  # the clip was live
    assert_close_lists([p.detach() for p in ours], [p.detach() for p in ref], atol=1e-6)


def test_what_the_fastai_face_refuses_the_torch_face_refuses():
    ps = make_params()
    with pytest.raises(ValueError, match='only once'): fxt.AdamW([ps[0], ps[0]])
    with pytest.raises(ValueError, match='finite'): fxt.AdamW(ps, lr=float('nan'))
    opt = fxt.AdamW(ps)
    opt.param_groups[0]['weight_decay'] = float('inf')
    with pytest.raises(ValueError, match='finite'): opt.step()
    sparse = torch.nn.Parameter(torch.zeros(4, 3))
    sparse.grad = torch.sparse_coo_tensor([[0], [1]], [1.], (4, 3))
    with pytest.raises((ValueError, RuntimeError), match='sparse'): fxt.AdamW([sparse]).step()
    with pytest.raises(ValueError, match='complex'): fxt.Lion([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])
    fxt.AdamW([torch.zeros(3, dtype=torch.complex64, requires_grad=True)])  # Adam's math takes complex parameters


BNB_FACES = dict(adamw=(lambda g: bnb_optim.AdamW8bit(g, lr=1e-3), lambda g, **kw: fxt.AdamW(g, lr=1e-3, **kw)),
                 lion=(lambda g: bnb_optim.Lion8bit(g, lr=1e-4), lambda g, **kw: fxt.Lion(g, lr=1e-4, **kw)))


@pytest.mark.parametrize('kind', list(BNB_FACES))
def test_a_bitsandbytes_checkpoint_continues_bitwise_on_the_eightbit_face(kind):
    "bitsandbytes' own optimizer, 10 steps; its state dict into our 8-bit torch face: 10 more steps, bit for bit"
    bnb_make, face_make = BNB_FACES[kind]
    def load_unconverted(opt, sd):
        with warnings.catch_warnings():
            warnings.simplefilter('error', PathConversionWarning)  # the same path: nothing to convert
            opt.load_state_dict(sd)
    got, expected, sd, opt_b = handover(bnb_make, lambda g: face_make(g, eightbit=True), load=load_unconverted)
    assert any(bnb_optim.optimizer.Optimizer8bit._FSDP_WRAPPED_QUANT_STATE_KEY in s for s in sd['state'].values())
    assert any(s['state1'].dtype == torch.uint8 for s in opt_b.state.values())  # the 4100-element tensor's
    assert_close_lists(got, expected, atol=0.)


def test_a_bitsandbytes_checkpoint_loads_into_fp32_with_one_warning():
    bnb_make, face_make = BNB_FACES['adamw']
    a, b = make_params(), make_params()
    opt_a = bnb_make(torch_groups(a, WD))
    run(opt_a, a, 10)
    sd = roundtrip(opt_a.state_dict())
    opt_b = face_make(torch_groups(b, WD))
    with pytest.warns(PathConversionWarning) as caught: opt_b.load_state_dict(sd)
    assert len([w for w in caught if issubclass(w.category, PathConversionWarning)]) == 1
    s, q = opt_b.state[b[2]], opt_a.state[a[2]]
    assert set(s) == {'step', 'grad_avg', 'sqr_avg'} and s['step'] == 10
    code_gap = 2 / 255 * q['absmax1'].max()  # the signed map's widest gap, times the largest scale
    assert (s['grad_avg'] - bnb_functional.dequantize_blockwise(A=q['state1'], absmax=q['absmax1'], code=q['qmap1'],
                                                                 blocksize=256)).abs().max() < 1e-6 * code_gap


def test_every_torch_face_pickles():
    import pickle
    for name, face in fxt.TORCH_FACES.items():
        ps = make_params(shapes=SMALL)
        opt = face(ps, **MOMENTUM.get(name, ({}, {}))[0])
        run(opt, ps, 1)
        twin = pickle.loads(pickle.dumps(opt))
        assert twin.decl is opt.decl and twin.fx.state_dict()['hypers'] == opt.fx.state_dict()['hypers'], name


def test_what_would_change_the_state_is_refused():
    "torch's SGD starts momentum when a scheduler or a load sets it; the face refuses instead of ignoring it"
    ps = make_params(shapes=SMALL)
    opt = fxt.SGD(ps, lr=1e-2)
    set_grads(ps, 0)
    opt.param_groups[0]['momentum'] = 0.9
    with pytest.raises(ValueError, match=r"`mom=0.9` would change the state SGD keeps \(\[\] -> \['grad_avg'\]\)"): opt.step()
    assert opt.fx.hypers[0]['mom'] == 0.
    theirs = torch.optim.SGD(make_params(shapes=SMALL), lr=1e-2, momentum=0.9)
    with pytest.raises(ValueError, match='would change the state'):  # no state yet: the hypers alone say it
        REGISTRY['sgd'].factory(ps, lr=1e-2).load_state_dict(theirs.state_dict())
    run(theirs, theirs.param_groups[0]['params'], 1)
    with pytest.raises(ValueError, match=r"torch's \['momentum_buffer'\]"):
        REGISTRY['sgd'].factory(ps, lr=1e-2).load_state_dict(theirs.state_dict())


@pytest.mark.parametrize('theirs,ours', [
    (lambda g: torch.optim.RAdam(g), lambda g: fxt.RAdam(g)),  # torch's names, but no torch counterpart declared
    (lambda g: torch.optim.Adam(g), lambda g: fxt.Lion(g)),
    (lambda g: torch.optim.RMSprop(g, momentum=0.9), lambda g: fxt.RMSprop(g, momentum=0.9)),  # momentums differ
    (lambda g: torch.optim.RMSprop(g, centered=True), lambda g: fxt.RMSprop(g)),
    (lambda g: bnb_optim.Adam8bit(g), lambda g: fxt.Ranger(g))], ids=['radam', 'adam-lion', 'rmsprop-momentum',
                                                                    'rmsprop-centered', 'bnb-ranger'])
def test_another_optimizers_checkpoint_is_refused_and_nothing_changes(theirs, ours):
    a, b = make_params(), make_params()
    ref = theirs(a)
    run(ref, a, 2)
    opt = ours(b)
    before = opt.state_dict()
    with pytest.raises(ValueError, match="torch's|centered|no 8-bit path"): opt.load_state_dict(ref.state_dict())
    assert opt.state_dict() == before


def test_bitsandbytes_one_state_betas_map_to_the_hypers():
    "SGD8bit keeps (momentum, dampening) and RMSprop8bit (alpha, momentum) in `betas`"
    ps = make_params()
    sgd = bnb_optim.SGD8bit(make_params(), lr=1e-2, momentum=0.5, dampening=0.1)
    face = fxt.SGD(ps, lr=1e-2, momentum=0.9, eightbit=True)
    face.load_state_dict(sgd.state_dict())
    assert (face.fx.hypers[0]['mom'], face.fx.hypers[0]['dampening'], face.param_groups[0]['momentum']) == (0.5, 0.1, 0.5)
    rms = bnb_optim.RMSprop8bit(make_params(), lr=1e-2, alpha=0.5)
    fx = REGISTRY['rmsprop'].factory(ps, lr=1e-2, eightbit=True)
    fx.load_state_dict(rms.state_dict())
    assert (fx.hypers[0]['sqr_mom'], fx.hypers[0]['mom']) == (0.5, 0.)


def test_update_hypers_takes_one_change_per_group():
    opt = REGISTRY['adam'].factory([make_params()[:2], make_params()[2:]], lr=1e-3)
    with pytest.raises(ValueError, match='1 changes for 2 param groups'): opt.update_hypers([{'lr': 1.}])
    opt.update_hypers([{'lr': 1.}, {}])
    assert [h['lr'] for h in opt.hypers] == [1., 1e-3]
