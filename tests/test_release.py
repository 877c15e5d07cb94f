"""Gradient release through fastai: each tensor steps during backward, bitwise as the normal step, and frees its gradient."""
from functools import partial
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.training import GradientClip, GradientAccumulation
from fastxtend_optim.release import GradientRelease
from fastxtend_optim.schedulefree import ScheduleFreeCallback
from fastxtend_optim.demo import digits_learner, digits_dls
from conftest import PATH_KWARGS
from test_common import OPTIMIZERS, CASES, FUSED

pytestmark = pytest.mark.cpu_only('fastai Learners on the digits data, on the CPU')
REFUSED = {'sophia': "Sophia's Hessian refresh", 'prodigy': "Prodigy's step size d",
           'ranger': 'Lookahead counts whole steps'}
DLS = digits_dls()


class NoGradsLeft(Callback):
    """After every backward (release has run by then), no parameter holds a gradient, on every path (the fused path keeps
    no gradient buffer under release), and no fused layout holds one; counts the backward passes"""
    order = GradientRelease.order + 1
    def before_fit(self): self.checked = 0
    def after_backward(self):
        assert all(p.grad is None for p in self.learn.model.parameters())
        assert all('g' not in layout.bufs for layout in getattr(self.learn.opt.runner, 'layouts', {}).values())
        self.checked += 1


def learner(name, path, release, cbs=(), **kw):
    extra = [GradientRelease(), NoGradsLeft()] if release else []
    if name == 'schedulefree_adamw': extra.append(ScheduleFreeCallback())  # a Learner needs it with Schedule-Free
    return digits_learner(partial(OPTIMIZERS[name], **PATH_KWARGS[path], **kw), dls=DLS, cbs=[*extra, *cbs])


def weights(learn) -> list[torch.Tensor]: return [p.detach().clone() for p in learn.model.parameters()]


def fitted(learn, fit=lambda l: l.fit_one_cycle(1, slice(1e-3, 1e-2))) -> list[torch.Tensor]:
    with learn.no_bar(), learn.no_logging(): fit(learn)
    return weights(learn)


@pytest.mark.parametrize('name,path', [c for c in CASES if c[0] not in REFUSED and c[1] != 'fused'])
def test_release_steps_bitwise_as_a_normal_step(name, path):
    "One epoch (fit_one_cycle) with discriminative learning rates: the same weights, to the bit, and no gradient kept"
    # Schedule-Free refuses lr schedules: a flat lr per group
    fit = (lambda l: l.fit(1, slice(1e-3, 1e-2))) if name == 'schedulefree_adamw' else (lambda l: l.fit_one_cycle(1, slice(1e-3, 1e-2)))
    normal = fitted(learner(name, path, False), fit)
    learn = learner(name, path, True)
    released = fitted(learn, fit)
    assert learn.no_grads_left.checked == len(DLS.train)
    assert all(torch.equal(a, b) for a, b in zip(normal, released))
    assert all(p.grad is None for p in learn.model.parameters())


# Fused: the kernel's variants can compile in another order (release steps the head's group first), and a variant may
# round an element an ulp apart; an epoch amplifies that (measured up to 6e-4 on Muon, whose Newton-Schulz runs in
# bf16). Three steps keep it at rounding level: 1e-6, and for Muon a bf16 ulp of its update, 3 * lr * 2**-7
FUSED_ATOL = {'muon': 3 * 1e-2 * 2**-7}


@pytest.mark.parametrize('bucket_mb', [25, 0.02], ids=['whole-groups', 'small-buckets'])
@pytest.mark.parametrize('name', [o for o in FUSED if o not in REFUSED])
def test_fused_release_steps_each_bucket_within_rounding_of_a_normal_step(name, bucket_mb):
    """Three batches on a digits MLP: each fused bucket (the model's groups whole, or 20 KiB of weights: one tensor, or a
    few small ones) steps when its last gradient arrives, and no gradient stays. No BatchNorm: a bias before one has a
    gradient that is pure rounding noise, which Adam's normalised step turns into lr-sized moves, so a one-row bucket
    (stepped eagerly, where the whole group's run is compiled) would differ by more than rounding"""
    from fastxtend_optim.demo import body_head_splitter
    from fastxtend_optim.release import Releaser
    def mlp():
        torch.manual_seed(0)
        body = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU())
        return torch.nn.Sequential(body, torch.nn.Linear(128, 10))
    models = [mlp(), mlp()]
    opts = [OPTIMIZERS[name](body_head_splitter(m), lr=1e-2, fused=True) for m in models]
    releaser = Releaser(opts[1], bucket_mb).attach()
    assert len(releaser.expected) == (2 if bucket_mb == 25 else 5)  # body: each tensor alone; head: one bucket
    for xb, yb in list(DLS.train)[:3]:
        for m, opt in zip(models, opts):
            torch.nn.functional.cross_entropy(m(xb), yb).backward()
            if opt is opts[1]: releaser.flush()
            else: opt.step(); opt.zero_grad()
        assert all(p.grad is None for p in models[1].parameters())
    releaser.detach()
    assert [opts[1].state[p]['step'] for p in models[1].parameters()] == [3] * len(list(models[1].parameters()))
    # a bucket's rows compile as a kernel of their own size, which may round an element an ulp apart from the group's
    # (vectorised body against scalar tail); three normalised steps amplify it: measured 1.8e-6 (RMSProp, eps 1e-8)
    atol = FUSED_ATOL.get(name, 1e-6 if bucket_mb == 25 else 1e-5)
    for a, b in zip(*(m.parameters() for m in models)): torch.testing.assert_close(b, a, atol=atol, rtol=0)


@pytest.mark.parametrize('name,path', [('adam', 'foreach'), ('lion', 'fused')])
def test_release_with_freeze_bf16_mixed_precision_and_save_load(name, path, tmp_path):
    "A frozen body (no hooks, no steps), then unfrozen; bf16 MixedPrecision; saved with the optimizer and reloaded"
    def course(release):
        learn = learner(name, path, release, cbs=[MixedPrecision(amp_mode='bf16')])
        learn.path = tmp_path
        learn.freeze()
        frozen = [p for p in learn.model.parameters() if not p.requires_grad]  # the body's Linears (BatchNorm trains)
        before = [p.detach().clone() for p in frozen]
        fitted(learn)
        assert len(frozen) == 4 and all(torch.equal(a, b) for a, b in zip(before, frozen))
        learn.unfreeze()
        fitted(learn)
        learn.save(f'mid{release}', with_opt=True)
        again = learner(name, path, release, cbs=[MixedPrecision(amp_mode='bf16')])
        again.path = tmp_path
        again.load(f'mid{release}', with_opt=True)
        return fitted(again, lambda l: l.fit(1, 1e-3))
    assert all(torch.equal(a, b) for a, b in zip(course(False), course(True)))


def test_lr_find_with_release_restores_the_weights_and_removes_its_hooks():
    learn = learner('adam', 'foreach', True)
    start = weights(learn)
    with learn.no_bar(), learn.no_logging(): found = learn.lr_find(show_plot=False)
    assert found.valley > 0 and all(torch.equal(a, b) for a, b in zip(start, weights(learn)))
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, (GradientRelease, NoGradsLeft))])
    xb, yb = DLS.one_batch()
    learn.loss_func(learn.model(xb), yb).backward()  # no hook left: the gradients stay
    assert all(p.grad is not None for p in learn.model.parameters())


@pytest.mark.parametrize('bucket_mb', [0, -1., float('inf'), float('nan'), True, '25'])
def test_bad_bucket_size_is_refused(bucket_mb):
    with pytest.raises(ValueError, match='`bucket_mb` is the MiB of weights'): GradientRelease(bucket_mb)


@pytest.mark.parametrize('setup,match', [
    (lambda: learner('sophia', 'foreach', True), REFUSED['sophia']),
    (lambda: learner('ranger', 'foreach', True), REFUSED['ranger']),
    (lambda: learner('adam', 'foreach', True, percentile_clipping=90), 'percentile_clipping'),
    (lambda: learner('adam', 'fused', True, cbs=[GradientClip()]), 'GradientClip'),
    (lambda: learner('adam', 'foreach', True, cbs=[GradientAccumulation(128)]), 'GradientAccumulation'),
    (lambda: learner('adam', 'foreach', True, cbs=[MixedPrecision()]), 'fp16 MixedPrecision')])
def test_what_needs_every_gradient_is_refused_before_any_step(setup, match):
    learn = setup()
    start = weights(learn)
    with pytest.raises(ValueError, match=f'GradientRelease cannot run here: .*{match}'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(start, weights(learn)))


class UnfreezeAfterFirstEpoch(Callback):
    def after_epoch(self):
        if self.epoch == 0: self.learn.unfreeze()


@pytest.mark.parametrize('path', ['foreach', 'eightbit'])
def test_unfreezing_inside_a_fit_hooks_the_new_tensors(path):
    """A callback unfreezes the body after the first epoch: release hooks its tensors from the next batch on, so they
    step as in a normal run, bitwise, and keep no gradient (the hooks do not depend on the path; the fused path's
    epochs can differ by amplified rounding, see above)"""
    def run(release):
        learn = learner('adam', path, release, cbs=[UnfreezeAfterFirstEpoch()])
        learn.freeze()
        return learn, fitted(learn, lambda l: l.fit(2, 1e-2))
    _, normal = run(False)
    learn, released = run(True)
    body = [p for p in learn.model[0].parameters()]
    assert all(p.requires_grad for p in body) and learn.no_grads_left.checked == 2 * len(DLS.train)
    assert all(torch.equal(a, b) for a, b in zip(normal, released))
