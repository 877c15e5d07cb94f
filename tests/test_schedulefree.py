"Schedule-Free AdamW against the `schedulefree` package on every path, train/eval weights, checkpoints, the callback."
import pytest
import torch
import schedulefree
from fastai.learner import load_learner
from fastai.callback.core import Callback
from fastai.callback.tracker import SaveModelCallback
from fastxtend_optim.schedulefree import ScheduleFreeAdamW, schedulefree_adamw, ScheduleFreeCallback, x_weights
from fastxtend_optim.demo import digits_dls, digits_learner, PATH_FUNCS
from conftest import (assert_matches_reference, make_params, set_grads, run, gappy_run, roundtrip, assert_close_lists,
                      fx_groups, torch_groups, LRS)

WD = 0.05
PATHS = ('native', 'foreach', 'fused')
CASES = [dict(), dict(wd=WD), dict(wd=WD, warmup_steps=20, r=1.), dict(warmup_steps=10, weight_lr_power=0., beta1=0.8),
         dict(wd=WD, r=0.5, beta2=0.99, eps=1e-6)]


def fx_sf(params, path, **kwargs):
    return fx_groups(ScheduleFreeAdamW, params, path, **kwargs)


def ref_sf(params, wd=0., beta1=0.9, beta2=0.999, foreach=True, no_wd=(1, 5), **kwargs):
    "The package's optimizer over the same groups (lrs, do_wd=False tensors), in train mode"
    opt = schedulefree.AdamWScheduleFree(torch_groups(params, wd, no_wd=no_wd), betas=(beta1, beta2), foreach=foreach,
                                         **kwargs)
    opt.train()
    return opt


def x_of(ps, opt, beta1=0.9):
    "The evaluation point from the training point in `ps` and the optimizer's z, by the package's formula"
    return [p.detach().lerp(opt.state[p]['z'], 1 - 1 / beta1) for p in ps]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', CASES)
def test_every_path_matches_the_package_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, warmup, r, weight_lr_power, decay at y: within 1e-6"
    assert_matches_reference(fx_sf, ref_sf, path, **kwargs)


@pytest.mark.parametrize('path,foreach', [('native', False), ('foreach', True)])
def test_native_and_foreach_are_the_package_bitwise(path, foreach):
    "Same ops in the same order as the package's loop (native) and foreach (ForEach) code: equal, not just close"
    ours, ref = make_params(), make_params()
    kw = dict(wd=WD, warmup_steps=10, r=1.)
    got = run(fx_sf(ours, path, **kw), ours, 40)
    assert_close_lists(got, run(ref_sf(ref, foreach=foreach, **kw), ref, 40), atol=0.)


@pytest.mark.parametrize('path', PATHS)
def test_train_eval_switching_matches_the_package(path):
    "eval() and train() move the weights as the package's do; both are idempotent; a step in eval mode is refused"
    ours, ref = make_params(), make_params()
    opt, sf = fx_sf(ours, path, wd=WD, warmup_steps=5), ref_sf(ref, wd=WD, warmup_steps=5, foreach=path != 'native')
    atol = 0. if path != 'fused' else 1e-6
    for i in range(3):
        run(opt, ours, 10, start=10 * i); run(sf, ref, 10, start=10 * i)
        opt.eval(); opt.eval(); sf.eval()
        assert_close_lists(ours, ref, atol=atol)
        before = [p.detach().clone() for p in ours]
        with pytest.raises(RuntimeError, match='eval mode'): opt.step()
        assert_close_lists(ours, before, atol=0.)
        assert opt.state[ours[0]]['step'] == 10 * (i + 1)
        opt.train(); opt.train(); sf.train()
        assert_close_lists(ours, ref, atol=atol)


@pytest.mark.parametrize('path', PATHS)
def test_schedule_is_per_tensor(path):
    "The first group has no gradient for 8 steps: its tensors are a fresh run of the package started then"
    ours, late, early = make_params(), make_params(), make_params()
    opt = fx_sf(ours, path, no_wd=(), warmup_steps=5)
    ref_late = schedulefree.AdamWScheduleFree(late[:3], lr=LRS[0], warmup_steps=5); ref_late.train()
    ref_early = schedulefree.AdamWScheduleFree(early[3:], lr=LRS[1], warmup_steps=5); ref_early.train()
    for i in range(20):
        for ps in (ours, late, early): set_grads(ps, i)
        if i < 8:
            for p in ours[:3]: p.grad = None
        else: ref_late.step()
        opt.step(); ref_early.step()
    assert [opt.state[p]['step'] for p in ours] == [12] * 3 + [20] * 3
    assert opt.state[ours[0]]['weight_sum'] == ref_late.param_groups[0]['weight_sum']
    assert_close_lists(ours, late[:3] + early[3:], atol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(wd=WD), dict(percentile_clipping=80, warmup_steps=10, r=1.)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    results = [gappy_run(fx_sf(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_checkpoint_resumes_exactly(path, mode):
    """Saved at step 15 through torch.save/torch.load(weights_only=True) and continued: bitwise the uninterrupted run
    (in eval mode, the run that switched to eval and back at step 15: the saved weights are x)"""
    kw = dict(wd=WD, warmup_steps=20, r=1.)
    a, b = make_params(), make_params()
    whole = fx_sf(a, path, **kw)
    run(whole, a, 15)
    if mode == 'eval': whole.eval(); whole.train()
    uninterrupted = run(whole, a, 15, start=15)
    first = fx_sf(b, path, **kw)
    run(first, b, 15)
    if mode == 'eval':
        first.eval()
        x = [p.detach().clone() for p in b]
    saved = roundtrip({'params': [p.detach() for p in b], 'opt': first.state_dict()})
    assert saved['opt']['train_mode'] is (mode == 'train')
    if mode == 'eval': assert_close_lists(saved['params'], x, atol=0.)
    c = [p.clone().requires_grad_() for p in saved['params']]
    second = fx_sf(c, path, no_wd=(), **kw)
    second.load_state_dict(saved['opt'])
    assert second.train_mode is (mode == 'train') and second.state[c[0]]['step'] == 15
    assert second.state[c[1]]['do_wd'] is False
    second.train()
    assert_close_lists(run(second, c, 15, start=15), uninterrupted, atol=0.)


def test_checkpoint_moves_native_fused_foreach():
    "The same state on every path: native 10 steps, fused 10, ForEach 10 is the native run within 1e-6"
    kw = dict(wd=WD, warmup_steps=15, r=1.)
    a = make_params()
    native = run(fx_sf(a, 'native', **kw), a, 30)
    ps = make_params()
    opt = fx_sf(ps, 'native', **kw)
    for i, path in enumerate(('native', 'fused', 'foreach')):
        if i:
            saved = roundtrip({'params': [p.detach() for p in ps], 'opt': opt.state_dict()})
            ps = [p.clone().requires_grad_() for p in saved['params']]
            opt = fx_sf(ps, path, no_wd=(), **kw)
            opt.load_state_dict(saved['opt'])
        run(opt, ps, 10, start=10 * i)
    assert opt.path == 'foreach'
    assert_close_lists(ps, native, atol=1e-6)


def test_eightbit_and_bad_hypers_refused():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match='ScheduleFreeAdamW has no 8-bit path'): ScheduleFreeAdamW(w, lr=1e-3, eightbit=True)
    with pytest.raises(ValueError, match='ScheduleFreeAdamW has no 8-bit path'): schedulefree_adamw(eightbit=True)
    bad = {'beta1': [0., 1., -0.1], 'beta2': [1., -0.5], 'eps': [-1e-8], 'wd': [-0.1], 'warmup_steps': [-1, 2.5, True],
           'r': [-1.], 'weight_lr_power': [-2.], 'percentile_clipping': [0, 101]}
    for name, values in bad.items():
        for v in values:
            with pytest.raises(ValueError, match=f'`{name}` must be'): schedulefree_adamw(**{name: v})
    opt = ScheduleFreeAdamW(w, lr=1e-3)
    with pytest.raises(ValueError, match=r'`beta1` must be in \(0, 1\)'): opt.set_hyper('beta1', 1.)
    assert opt.hypers[0]['beta1'] == 0.9


# --- fastai Learner through the callback ---
LR, EPOCHS = 5e-3, 2
SF_KW = dict(warmup_steps=20, wd=0.01)


@pytest.fixture(scope='module')
def dls(): return digits_dls()


class Probe(Callback):
    "Checks that validation sees x; saves once mid-epoch 1 (train mode, through `x_weights`): the file holds x"
    order = ScheduleFreeCallback.order + 1
    def __init__(self, save=False): self.save, self.checked = save, 0
    def _x(self): return x_of(list(self.learn.model.parameters()), self.learn.opt)
    def after_train(self): self.x_point = self._x()
    def before_validate(self):
        if not self.training and hasattr(self, 'x_point'):
            assert_close_lists(list(self.learn.model.parameters()), self.x_point, atol=0.)
            self.checked += 1
    def after_batch(self):
        if not (self.save and self.training and self.epoch == 1 and self.iter == 5): return
        x, y = self._x(), [p.detach().clone() for p in self.learn.model.parameters()]
        with x_weights(self.learn): self.learn.save('mid')
        saved = torch.load(self.learn.path / self.learn.model_dir / 'mid.pth', weights_only=True)
        assert_close_lists([saved['model'][k] for k, _ in self.learn.model.named_parameters()], x, atol=0.)
        assert saved['opt']['train_mode'] is False
        assert_close_lists(list(self.learn.model.parameters()), y, atol=0.)  # y is back, bitwise
        assert self.learn.opt.train_mode
        self.checked += 10


def fit(learn, n):
    with learn.no_bar(), learn.no_logging(): learn.fit(n, LR)


def weights(learn): return [p.detach().clone() for p in learn.model.parameters()]


@pytest.mark.parametrize('path', PATHS)
def test_learner_trains_validates_saves_and_resumes_at_x(dls, path, tmp_path):
    """Through the callback: accuracy > 0.9 after 2 epochs (fastai's Adam reaches ~0.95 at 3e-3);
    validation runs at x; a save mid-epoch writes x and training goes on bitwise as without it; a checkpoint saved
    after `fit` (eval mode) loaded into a new Learner continues bitwise as the Learner that kept going"""
    opt_func = schedulefree_adamw(**SF_KW, **PATH_FUNCS[path])
    plain = digits_learner(opt_func, dls, path=tmp_path, cbs=ScheduleFreeCallback())
    fit(plain, EPOCHS)
    after2, rng = weights(plain), dls.train.rng.getstate()
    fit(plain, 1)
    probe = Probe(save=True)
    saving = digits_learner(opt_func, dls, path=tmp_path, cbs=[ScheduleFreeCallback(), probe])
    fit(saving, EPOCHS)
    assert probe.checked == EPOCHS + 10 and saving.opt.path == path
    assert sum(isinstance(c, ScheduleFreeCallback) for c in saving.cbs) == 1
    assert_close_lists(weights(saving), after2, atol=0.)
    with saving.no_bar(): assert float(saving.validate()[1]) > 0.9
    saving.save('end')
    resumed = digits_learner(opt_func, dls, path=tmp_path, cbs=ScheduleFreeCallback())
    resumed.load('end')
    assert resumed.opt.train_mode is False
    dls.train.rng.setstate(rng)
    fit(resumed, 1)
    assert_close_lists(weights(resumed), weights(plain), atol=0.)


def test_fit_one_cycle_refused_and_flat_fit_allowed(dls):
    learn = digits_learner(schedulefree_adamw(), dls, cbs=ScheduleFreeCallback())
    before = weights(learn)
    with pytest.raises(ValueError, match='fit_one_cycle'):
        with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(1, LR)
    assert_close_lists(weights(learn), before, atol=0.)
    with pytest.raises(ValueError, match='fit_one_cycle'):
        with learn.no_bar(), learn.no_logging(): learn.fit_flat_cos(1, LR)


def test_export_and_get_preds_use_x(dls, tmp_path):
    "In train mode, export through `x_weights` writes x and puts y back exactly; get_preds predicts at x"
    learn = digits_learner(schedulefree_adamw(**SF_KW), dls, path=tmp_path, cbs=ScheduleFreeCallback())
    fit(learn, 1)
    learn.opt.train()
    y = weights(learn)
    x = x_of(list(learn.model.parameters()), learn.opt)
    learn.dls.new_empty = lambda: dls  # the digits' plain-list datasets have no empty copy; export pickles them
    with x_weights(learn): learn.export('sf.pkl')
    del learn.dls.new_empty
    assert_close_lists(weights(learn), y, atol=0.)
    assert learn.opt.train_mode
    exported = load_learner(tmp_path / 'sf.pkl')
    assert_close_lists(list(exported.model.parameters()), x, atol=0.)
    with learn.no_bar(): preds, _ = learn.get_preds()
    assert learn.opt.train_mode is False
    assert_close_lists(weights(learn), x, atol=0.)
    learn.model.eval()
    with torch.no_grad(): expected = torch.softmax(learn.model(dls.valid.dataset[0][0][None]), -1)
    torch.testing.assert_close(preds[0], expected[0], atol=1e-6, rtol=0.)


@pytest.mark.parametrize('path', PATHS)
def test_a_learner_without_the_callback_is_refused_at_its_first_step(dls, path):
    """Nothing adds the callback: `fit` without it raises at the first step, before the weights or the state move;
    the callback for one `fit` (`fit(cbs=...)`) trains and ends at x"""
    learn = digits_learner(schedulefree_adamw(**SF_KW, **PATH_FUNCS[path]), dls)
    assert not any(isinstance(c, ScheduleFreeCallback) for c in learn.cbs)
    before = weights(learn)
    with pytest.raises(RuntimeError, match=r'without `ScheduleFreeCallback`.*cbs=ScheduleFreeCallback\(\)'): fit(learn, 1)
    assert_close_lists(weights(learn), before, atol=0.)
    assert all('step' not in learn.opt.state[p] for p in learn.model.parameters())
    with learn.no_bar(), learn.no_logging(): learn.fit(1, LR, cbs=ScheduleFreeCallback())
    assert learn.opt.train_mode is False and not any(isinstance(c, ScheduleFreeCallback) for c in learn.cbs)
    with pytest.raises(RuntimeError, match='without `ScheduleFreeCallback`'): fit(learn, 1)


def test_save_model_callback_saves_x(dls, tmp_path):
    "fastai's SaveModelCallback saves after validation, where the model holds x: no `x_weights` needed"
    learn = digits_learner(schedulefree_adamw(**SF_KW), dls, path=tmp_path,
                           cbs=[ScheduleFreeCallback(), SaveModelCallback(every_epoch=True, fname='sf')])
    fit(learn, 1)
    saved = torch.load(tmp_path / learn.model_dir / 'sf_0.pth', weights_only=True)
    assert learn.opt.train_mode is False  # after `fit`, x: the point the epoch's validation moved to
    assert_close_lists([saved[k] for k, _ in learn.model.named_parameters()], weights(learn), atol=0.)
