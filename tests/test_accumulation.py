"""Optimizer accumulation: micro-batches fold into the optimizer's state (steps with lr 0), alone and with gradient
release; exactly a known optimizer when the micro-batches agree, and within 0.01 accuracy of fastai's
GradientAccumulation when they differ."""
from functools import partial
import pytest
import torch
from fastai.basics import DataLoaders, DataLoader
from fastai.callback.training import GradientAccumulation
from fastxtend_optim.release import OptimizerAccumulation, GradientRelease, accumulating
from fastxtend_optim.demo import digits_learner, digits_dls
from fastxtend_optim.adam import adam
from fastxtend_optim.lion import lion
from fastxtend_optim.sgd import sgd
from conftest import PATH_KWARGS
from test_common import OPTIMIZERS, CASES

pytestmark = pytest.mark.cpu_only('fastai Learners on the digits data, on the CPU')
N, BS = 4, 32  # micro-batches per step, samples per micro-batch

# With n equal micro-batches, each accumulating optimizer is exactly another one with one batch per step:
# an EMA's decay b becomes b**n; Lion's update mixes its state after n-1 micro-steps (b1 * b2**(n-1)); SGD's undamped
# momentum buffer holds the sum 1 + mom + ... + mom**(n-1) of the gradient, so its lr is that many times larger
SAME_AS = {
    'adam': (adam(mom=0.9, sqr_mom=0.99, wd=0.1), adam(mom=0.9**N, sqr_mom=0.99**N, wd=0.1), 1e-2),
    'lion': (lion(beta1=0.9, beta2=0.99), lion(beta1=0.9 * 0.99**(N - 1), beta2=0.99**N), 1e-3),
    'sgd': (sgd(mom=0.9, wd=0.1, decouple_wd=False), sgd(mom=0.9**N, wd=0.1, decouple_wd=False), 1e-2),
}
SGD_LR_FACTOR = (1 - 0.9**N) / (1 - 0.9)


def repeated_dls(n:int) -> DataLoaders:
    "The digits' first 320 training samples in batches of `BS`, in order, each batch `n` times in a row"
    base = digits_dls(bs=BS)
    items = base.train.dataset[:10 * BS]
    batches = [items[j * BS:(j + 1) * BS] for j in range(10)]
    train = [x for b in batches for _ in range(n) for x in b]
    return DataLoaders(DataLoader(train, bs=BS, shuffle=False, drop_last=True), base.valid)


def weights(learn) -> list[torch.Tensor]: return [p.detach().clone() for p in learn.model.parameters()]


def trained(opt_func, dls, cbs=(), lr=1e-2, epochs=2, fit=None) -> tuple[list[torch.Tensor], object]:
    learn = digits_learner(opt_func, dls=dls, cbs=list(cbs))
    start = weights(learn)
    with learn.no_bar(), learn.no_logging():
        (fit or (lambda l: l.fit(epochs, slice(lr / 10, lr))))(learn)
    return start, learn


def travel(start, end) -> float: return sum((b - a).norm()**2 for a, b in zip(start, end)).sqrt().item()


@pytest.mark.parametrize('release', [False, True])
@pytest.mark.parametrize('path', ['native', 'foreach', 'fused'])
@pytest.mark.parametrize('name', list(SAME_AS))
def test_equal_micro_batches_step_as_the_mapped_optimizer(name, path, release):
    """Each batch 4 times in a row, accumulated, equals the mapped optimizer on each batch once (discriminative lrs,
    two epochs), within fp32 rounding of the distance travelled: b**n in one number against n products of b (measured up
    to 1.8e-5 of it on Adam, whose normalised step amplifies rounding; a window off by one micro-batch is ~1e-2 off)"""
    accumulating_func, same_func, lr = SAME_AS[name]
    cbs = [OptimizerAccumulation(N * BS)] + ([GradientRelease()] if release else [])
    start, acc = trained(partial(accumulating_func, **PATH_KWARGS[path]), repeated_dls(N), cbs, lr)
    mapped_lr = lr * (SGD_LR_FACTOR if name == 'sgd' else 1)
    _, once = trained(partial(same_func, **PATH_KWARGS[path]), repeated_dls(1), (), mapped_lr)
    moved = travel(start, weights(once))
    assert moved > 0.1
    assert travel(weights(once), weights(acc)) < 1e-4 * moved
    assert [acc.opt.state[p]['step'] for p in acc.model.parameters()][0] == N * 10 * 2  # every micro-batch counted


def test_release_with_accumulation_keeps_no_gradient_and_steps_bitwise_as_without():
    "Adam, ForEach: no gradient after any backward, the same weights to the bit"
    from test_release import NoGradsLeft
    dls = digits_dls(bs=BS)
    _, plain = trained(adam(foreach=True), dls, [OptimizerAccumulation(N * BS)], fit=lambda l: l.fit_one_cycle(1, 1e-2))
    _, freed = trained(adam(foreach=True), dls, [OptimizerAccumulation(N * BS), GradientRelease(), NoGradsLeft()],
                       fit=lambda l: l.fit_one_cycle(1, 1e-2))
    assert freed.no_grads_left.checked == len(dls.train)
    assert all(torch.equal(a, b) for a, b in zip(weights(plain), weights(freed)))


@pytest.mark.parametrize('name', list(SAME_AS))
def test_differing_micro_batches_reach_gradient_accumulations_accuracy(name):
    """Shuffled digits, 4 micro-batches of 32 per step, fit_one_cycle over 4 epochs: accuracy within 0.01 of fastai's
    GradientAccumulation (measured: 0.003 apart, one validation sample), and both learn"""
    opt_func, _, lr = SAME_AS[name]
    fit = lambda l: l.fit_one_cycle(4, 1e-1 if name == 'sgd' else lr)
    dls = digits_dls(bs=BS)
    _, ga = trained(opt_func, dls, [GradientAccumulation(N * BS)], fit=fit)
    _, oa = trained(opt_func, dls, [OptimizerAccumulation(N * BS)], fit=fit)
    ga_acc, oa_acc = (float(l.recorder.values[-1][-1]) for l in (ga, oa))
    assert min(ga_acc, oa_acc) > 0.85
    assert abs(ga_acc - oa_acc) <= 0.01


@pytest.mark.parametrize('name,path', [c for c in CASES if c[0] not in ('ranger', 'schedulefree_adamw') and c[1] != 'fused'])
def test_accumulating_steps_leave_weights_to_the_bit_and_move_the_state(name, path):
    "Every optimizer that can accumulate: a step inside `accumulating` keeps each weight and changes its state"
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = OPTIMIZERS[name](list(model.parameters()), lr=1e-2, **PATH_KWARGS[path])
    before = weights_of(model)
    model(torch.randn(16, 8)).pow(2).mean().backward()
    with accumulating(opt): opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, weights_of(model)))
    assert opt.hypers[0]['lr'] == 1e-2
    moved = [k for p in model.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v) and v.any()]
    assert moved


def weights_of(model) -> list[torch.Tensor]: return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize('make,match', [
    (lambda: digits_learner(OPTIMIZERS['ranger'], cbs=OptimizerAccumulation(64)), 'Lookahead counts steps'),
    (lambda: digits_learner(OPTIMIZERS['schedulefree_adamw'], cbs=OptimizerAccumulation(64)), "Schedule-Free's z"),
    (lambda: digits_learner(sgd(), cbs=OptimizerAccumulation(64)), 'keeps no state'),
    (lambda: digits_learner(adam(), cbs=[OptimizerAccumulation(64), GradientAccumulation(64)]), 'use one of the two')])
def test_what_cannot_accumulate_is_refused_before_any_step(make, match):
    learn = make()
    start = weights(learn)
    with pytest.raises(ValueError, match=f'OptimizerAccumulation cannot run here: .*{match}'):
        with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    assert all(torch.equal(a, b) for a, b in zip(start, weights(learn)))


@pytest.mark.parametrize('n_acc', [0, -3, 2.5, True, '64'])
def test_bad_n_acc_is_refused(n_acc):
    with pytest.raises(ValueError, match='`n_acc` is a number of samples'): OptimizerAccumulation(n_acc)


@pytest.mark.parametrize('path', ['foreach', 'fused'])
@pytest.mark.parametrize('rounding', [{}, dict(stochastic_round=True)], ids=['kahan', 'stochastic'])
def test_bf16_weights_hold_their_value_through_accumulating_steps(path, rounding):
    """bf16 Adam after 3 real steps (a compensation is held): accumulating steps keep each held weight (weight plus
    compensation) exactly and move the state; the next real step moves the weights again"""
    from conftest import make_params, set_grads, held_weights
    params = make_params(dtype=torch.bfloat16)
    opt = OPTIMIZERS['adam'](params, lr=1e-3, **PATH_KWARGS[path], **rounding)
    for step in range(3): set_grads(params, step); opt.step()
    held, avg = held_weights(opt, params), [opt.state[p]['grad_avg'].clone() for p in params]
    for step in range(3, 6):
        set_grads(params, step)
        with accumulating(opt): opt.step()
    assert all(torch.equal(a, b) for a, b in zip(held, held_weights(opt, params)))
    assert all(not torch.equal(a, opt.state[p]['grad_avg']) for a, p in zip(avg, params))
    opt.step()  # stochastic rounding may leave a small tensor where it was: ~0.1 of a bf16 ulp a step
    assert sum((a != b).sum().item() for a, b in zip(held, held_weights(opt, params))) > 1000
