"Sophia against the authors' SophiaG on every path, Hessian state in checkpoints, and SophiaCallback in a Learner."
import warnings
import pytest
import torch
import torch.nn.functional as F
from sophia_opt import SophiaG
from fastai.callback.core import Callback
from fastai.callback.training import GradientAccumulation
from fastai.losses import MSELossFlat
import fastai.optimizer as fastai_optim
from fastxtend_optim.sophia import Sophia, sophia, SophiaCallback
from fastxtend_optim.demo import digits_dls, digits_learner
from conftest import (make_params, set_grads, fx_groups, torch_groups, roundtrip, assert_close_lists, PATH_KWARGS,
                      NO_WD, LRS)

PATHS = [p for p in PATH_KWARGS if p != 'eightbit']
WD, BS, RHO_G, K = 0.1, 64, 0.04, 5  # SophiaG's step(bs=BS) with rho=RHO_G is ours with rho=RHO_G*BS


def hessian_grads(params, step):
    "A fixed per-step stand-in for the sampled-label gradient, half the size of the training gradient"
    set_grads(params, step, seed=7)
    for p in params: p.grad.mul_(0.5)


def sophia_run(opt, params, steps, start=0, k=K, step=None):
    "Every `k` steps (from step 0) feed a Hessian estimate through `p.grad` and `update_hessian()`, then step"
    step = step or opt.step
    for i in range(start, start + steps):
        if i % k == 0:
            hessian_grads(params, i)
            opt.update_hessian()
        set_grads(params, i)
        step()
    return [p.detach().clone() for p in params]


def fx_sophia(params, path, **kwargs):
    return fx_groups(Sophia, params, path, **{'wd': WD, 'rho': RHO_G * BS, **kwargs})


def sophiag(params, **kwargs):
    return SophiaG(torch_groups(params, WD), rho=RHO_G, **kwargs)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', [dict(), dict(mom=0.9, sqr_mom=0.95)])
def test_every_path_matches_sophiag_over_60_steps(path, kwargs):
    "Two param groups (lrs 1e-3, 3e-3), do_wd=False tensors, the same Hessian estimates every 5 steps: within 1e-6"
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    opt = fx_sophia(ours, path, **kwargs)
    got = sophia_run(opt, ours, 60)
    betas = (kwargs.get('mom', 0.965), kwargs.get('sqr_mom', 0.99))
    r = sophiag(ref, betas=betas)
    want = sophia_run(r, ref, 60, step=lambda: r.step(bs=BS))
    assert opt.path == path
    assert_close_lists(got, want, atol=1e-6)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 0.05  # the weights did travel
    # both regimes of the ratio are exercised: clipped (|m| >= rho*h + eps) and Hessian-scaled
    m = torch.cat([opt.state[p]['grad_avg'].flatten() for p in ours])
    h = torch.cat([opt.state[p]['hessian'].flatten() for p in ours])
    clipped = (m.abs() >= RHO_G * BS * h).float().mean()
    assert 0.05 < clipped < 0.95, clipped


@pytest.mark.parametrize('path', ['native', 'foreach'])
def test_native_and_foreach_hessian_updates_equal_sophiags_bitwise(path):
    "update_hessian alone, before any step (lazy state), two groups: the reference's numbers exactly"
    ours, ref = make_params(), make_params()
    opt, r = fx_sophia(ours, path), sophiag(ref)
    for i in range(3):
        hessian_grads(ours, i); hessian_grads(ref, i)
        opt.update_hessian(); r.update_hessian()
    assert_close_lists([opt.state[p]['hessian'] for p in ours], [r.state[p]['hessian'] for p in ref], atol=0.)
    assert all('step' not in opt.state[p] for p in ours)
    assert_close_lists(ours, make_params(), atol=0.)  # no parameter moved


@pytest.mark.parametrize('path', PATHS)
def test_update_hessian_skips_parameters_without_gradient(path):
    "A frozen group (no gradient) keeps no Hessian state; the other group's is updated"
    ps = make_params()
    opt = fx_sophia(ps, path)
    hessian_grads(ps, 0)
    for p in ps[:3]: p.grad = None
    opt.update_hessian()
    assert all('hessian' not in opt.state[p] for p in ps[:3])
    for p in ps[3:]: torch.testing.assert_close(opt.state[p]['hessian'], 0.01 * p.grad * p.grad, atol=0., rtol=0.)


@pytest.mark.parametrize('kwargs', [dict(), dict(percentile_clipping=80)])
def test_fused_matches_native_with_missing_gradients(kwargs):
    "Tensor 2 has no gradient on some steps and some Hessian refreshes: it must not move then (fused within 1e-6)"
    def gappy(opt, ps):
        for i in range(40):
            if i % 3 == 0:
                hessian_grads(ps, i)
                if i % 7 in (2, 3, 4): ps[2].grad = None
                opt.update_hessian()
            set_grads(ps, i)
            if i % 7 in (2, 3, 4): ps[2].grad = None
            before = ps[2].detach().clone()
            opt.step()
            if ps[2].grad is None: assert torch.equal(ps[2], before)
        return [p.detach().clone() for p in ps]
    results = [gappy(fx_sophia(ps, path, **kwargs), ps) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


@pytest.mark.parametrize('path', PATHS)
def test_checkpoint_with_hessian_resumes_exactly(path):
    "Saved mid-run (Hessian state included) through weights_only, then continued: bitwise the uninterrupted run"
    a, b = make_params(), make_params()
    uninterrupted = sophia_run(fx_sophia(a, path), a, 30, k=4)
    first = fx_sophia(b, path)
    sophia_run(first, b, 15, k=4)
    saved = roundtrip({'params': [p.detach() for p in b], 'opt': first.state_dict()})
    assert all(s['hessian'].abs().sum() > 0 for s in saved['opt']['state'])
    c = [p.clone().requires_grad_() for p in saved['params']]
    second = fx_sophia(c, path, no_wd=())
    second.load_state_dict(saved['opt'])
    assert all(second.state[c[i]]['do_wd'] is False for i in NO_WD) and second.hypers[0]['lr'] == LRS[0]
    assert_close_lists(sophia_run(second, c, 15, start=15, k=4), uninterrupted, atol=0.)


def test_checkpoint_moves_native_fused_foreach():
    "One run moved native -> fused -> foreach through weights_only checkpoints ends where native alone ends"
    a = make_params()
    uninterrupted = sophia_run(fx_sophia(a, 'native'), a, 30, k=4)
    ps, last = make_params(), None
    for i, path in enumerate(('native', 'fused', 'foreach')):
        ps = [p.detach().clone().requires_grad_() for p in ps]
        opt = fx_sophia(ps, path)
        if last is not None: opt.load_state_dict(last)
        sophia_run(opt, ps, 10, start=10 * i, k=4)
        last = roundtrip(opt.state_dict())
    assert_close_lists(ps, uninterrupted, atol=1e-6)


def test_eightbit_and_bad_hypers_refused():
    w = [torch.zeros(3, requires_grad=True)]
    for bad, match in ((dict(eightbit=True), 'Sophia has no 8-bit path'), (dict(eps=0.), '`eps` must be a finite number > 0'),
                       (dict(rho=-0.1), '`rho` must be a finite number >= 0'), (dict(mom=1.), '`mom` must be in'),
                       (dict(sqr_mom=-0.1), '`sqr_mom` must be in'), (dict(wd=-1.), '`wd` must be'),
                       (dict(percentile_clipping=0), '`percentile_clipping` must be in')):
        with pytest.raises(ValueError, match=match): Sophia(w, lr=1e-3, **bad)
        with pytest.raises(ValueError, match=match): sophia(**bad)
    with pytest.raises(ValueError, match='state_bits=8'): sophia(eightbit=True)
    opt = Sophia(w, lr=1e-3)
    with pytest.raises(ValueError, match='`rho` must be'): opt.set_hyper('rho', -1.)
    assert opt.hypers[0]['rho'] == 0.04 and opt.hypers[0]['eps'] == 1e-15 and opt.hypers[0]['wd'] == 0.1


# --- the callback in a fastai Learner ---------------------------------------------------------------------------

LR, EPOCHS = 3e-3, 3


@pytest.fixture(scope='module')
def dls(): return digits_dls()


def fit(learn, epochs=EPOCHS, lr=LR, method='fit_one_cycle'):
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        getattr(learn, method)(epochs, lr)
    return learn


def count_calls(opt, name):
    "Wrap `opt.name` to count its calls"
    calls, fn = [], getattr(opt, name)
    setattr(opt, name, lambda *a, **kw: (calls.append(1), fn(*a, **kw))[1])
    return calls


class Spy(Callback):
    "After our callback: the loss and labels fastai computed are the ones it still has"
    order = SophiaCallback.order + 1
    def before_fit(self): self.bad = 0
    def after_loss(self): self.seen = (self.learn.loss.item(), self.learn.yb)
    def after_step(self):
        self.bad += self.learn.loss.item() != self.seen[0] or self.learn.yb is not self.seen[1]


@pytest.mark.parametrize('path', PATHS)
def test_callback_trains_digits_and_refreshes_every_k_steps(dls, path):
    "Refreshes after steps k, 2k, ...; train loss < 0.5 and accuracy > 0.93 after 3 epochs (fastai Adam: ~0.96)"
    learn = digits_learner(sophia(**PATH_KWARGS[path]), dls, cbs=Spy()).sophia(k=7)
    learn.create_opt()
    steps, refreshes = count_calls(learn.opt, 'step'), count_calls(learn.opt, 'update_hessian')
    fit(learn)
    cb = learn.sophia_hessian
    assert learn.opt.path == path and len(steps) == cb.steps == EPOCHS * len(dls.train)
    assert len(refreshes) == cb.refreshes == len(steps) // 7 and cb.skipped == 0
    train_loss, valid_loss, acc = learn.recorder.values[-1]
    assert train_loss < 0.5 and acc > 0.93, learn.recorder.values
    assert learn.spy.bad == 0
    p = next(iter(learn.model.parameters()))
    assert learn.opt.state[p]['hessian'].abs().sum() > 0


def test_refreshes_count_optimizer_steps_under_gradient_accumulation(dls):
    "n_acc=128 with bs=64: one optimizer step per two batches; k counts steps, not batches"
    learn = digits_learner(sophia(), dls, cbs=GradientAccumulation(n_acc=128)).sophia(k=3)
    learn.create_opt()
    steps, refreshes = count_calls(learn.opt, 'step'), count_calls(learn.opt, 'update_hessian')
    fit(learn, epochs=2, method='fit')
    assert len(steps) == (2 * len(dls.train)) // 2 and len(refreshes) == len(steps) // 3


@pytest.mark.parametrize('path', PATHS)
def test_estimate_equals_hand_computed_gnb(dls, path):
    "One refresh from a zero Hessian: (1 - sqr_mom) * B * g_hat**2, with g_hat from labels drawn with the same seed"
    learn = digits_learner(sophia(sqr_mom=0.9, **PATH_KWARGS[path]), dls).sophia(k=1, seed=11)
    fit(learn, epochs=1, method='fit')  # the fused layout exists; its Hessian buffer is what the kernel reads
    ws = [p for p, *_ in learn.opt.all_params()]
    for p in ws: learn.opt.state[p]['hessian'].zero_()
    learn.xb, learn.yb = (dls.valid.one_batch()[0],), ()
    learn.model.train()
    cb = learn.sophia_hessian
    cb.generator = None  # a fresh generator seeded with 11
    before = [b.clone() for b in learn.model.buffers()]
    cb.refresh()
    assert_close_lists(list(learn.model.buffers()), before, atol=0.)  # BatchNorm's statistics are as they were
    logits = learn.model(*learn.xb)
    y = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator(logits.device).manual_seed(11)).squeeze(-1)
    g_hat = torch.autograd.grad(F.cross_entropy(logits, y), ws)
    n = len(y)
    for p, g in zip(ws, g_hat):
        torch.testing.assert_close(learn.opt.state[p]['hessian'], 0.1 * n * g * g, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None or not p.grad.any() for p in ws)


def test_callback_refuses_other_optimizers_and_losses(dls):
    learn = digits_learner(fastai_optim.Adam, dls).sophia()
    with pytest.raises(TypeError, match='feeds Hessian estimates to the `Sophia` optimizer'): fit(learn, 1)
    learn = digits_learner(sophia(), dls).sophia()
    learn.loss_func = MSELossFlat()
    with pytest.raises(ValueError, match='needs a cross-entropy loss'): fit(learn, 1)
    with pytest.raises(ValueError, match='`k` must be an int >= 1'): SophiaCallback(k=2.5)
    assert isinstance(digits_learner(sophia(), dls).sophia(k=4), type(learn))  # returns the Learner, like to_fp16


def test_mixed_precision_callback_runs(dls):
    "to_fp16() beside the callback: on the CPU fastai's autocast and GradScaler are CUDA-only, so this is fp32"
    learn = digits_learner(sophia(), dls).to_fp16().sophia(k=5)
    fit(learn, epochs=1)
    assert learn.sophia_hessian.refreshes == len(dls.train) // 5 and learn.recorder.values[-1][-1] > 0.8
