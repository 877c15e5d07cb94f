"ADOPT (and its cautious option) against pytorch-optimizer's ADOPT on every path, per-tensor steps, checkpoints."
import pytest
import torch
from pytorch_optimizer import ADOPT as RefADOPT
from fastxtend_optim.adopt import ADOPT, adopt
from conftest import (assert_schedules_compile_nothing, assert_matches_reference, assert_bf16_tracks_fp32, frozen_run,
                      assert_paths_match_native, make_params, set_grads, run, gappy_run, assert_close_lists,
                      fx_groups, torch_groups, LRS, NO_WD)

WD = 0.05
PATHS = ('native', 'foreach', 'fused')


def fx_adopt(params, path, **kwargs):
    return fx_groups(ADOPT, params, path, **{'wd': WD, **kwargs})


def ref_adopt(params, wd=WD, decouple_wd=False, beta1=0.9, beta2=0.9999, foreach=False, **kwargs):
    "pytorch-optimizer's ADOPT over the same groups (do_wd=False tensors in groups of their own with no decay)"
    return RefADOPT(torch_groups(params, wd), betas=(beta1, beta2), weight_decouple=decouple_wd, foreach=foreach,
                    **kwargs)


CASES = [dict(), dict(decouple_wd=True), dict(cautious=True), dict(cautious=True, decouple_wd=True, wd=0.2),
         dict(beta1=0.5, beta2=0.99, eps=1e-3, wd=0.)]


@pytest.mark.parametrize('kwargs', CASES)
def test_native_equals_pytorch_optimizer_bitwise(kwargs):
    "The native path does the reference's per-parameter ops in its order: the same bits after 60 steps"
    assert_matches_reference(fx_adopt, ref_adopt, 'native', atol=0., **kwargs)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('kwargs', CASES)
def test_every_path_matches_pytorch_optimizer_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, L2 and decoupled decay, cautious, other betas/eps: within 1e-6 in fp32"
    assert_matches_reference(fx_adopt, ref_adopt, path, **kwargs)


@pytest.mark.parametrize('path', ['native', 'foreach'])
def test_native_and_foreach_match_the_references_foreach_bitwise_close(path):
    "The reference's own multi-tensor step (used when cautious is off) agrees too"
    ours, ref = make_params(), make_params()
    got = run(fx_adopt(ours, path, decouple_wd=True), ours, 60)
    assert_close_lists(got, run(ref_adopt(ref, decouple_wd=True, foreach=True), ref, 60), atol=1e-6)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_step_one_only_stores_the_squared_gradient(path, decouple_wd):
    "As the reference: step 1 moves the weights by decoupled decay only; v = g² (with L2, g includes wd*p); m = 0"
    ps = make_params()
    opt = fx_adopt(ps, path, decouple_wd=decouple_wd, wd=0.5)
    before = [p.detach().clone() for p in ps]
    set_grads(ps, 0)
    grads = [p.grad.clone() for p in ps]
    opt.step()
    for i, (p, b, g) in enumerate(zip(ps, before, grads)):
        decays = i not in NO_WD
        lr = LRS[i >= 3]
        torch.testing.assert_close(p.detach(), b * (1 - lr * 0.5) if decays and decouple_wd else b, atol=0, rtol=0)
        g_seen = g + 0.5 * b if decays and not decouple_wd else g
        torch.testing.assert_close(opt.state[p]['sqr_avg'], g_seen * g_seen, atol=1e-6, rtol=1e-6)
        assert not opt.state[p]['grad_avg'].any()


@pytest.mark.parametrize('path', PATHS)
def test_per_tensor_step_counts(path):
    "The first group has no gradient for 8 steps: its tensors take their own step 1 at step 9, as a reference built then"
    ours, ref = make_params(), make_params()
    opt = fx_adopt(ours, path, cautious=True)
    got = frozen_run(opt, ours)
    assert [opt.state[p]['step'] for p in ours] == [12] * 3 + [20] * 3
    groups = torch_groups(ref, WD)
    late = RefADOPT(groups[:2], betas=(0.9, 0.9999), cautious=True)  # torch_groups: two groups per fastxtend group
    early = RefADOPT(groups[2:], betas=(0.9, 0.9999), cautious=True)
    expected = frozen_run(None, ref, step=lambda i: (early.step(), late.step() if i >= 8 else None))
    assert_close_lists(got, expected, atol=1e-6)


@pytest.mark.parametrize('kwargs', [dict(), dict(percentile_clipping=80, cautious=True, decouple_wd=True)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    results = [gappy_run(fx_adopt(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


def test_paths_match_native_with_cautious_and_l2():
    assert_paths_match_native(ADOPT, wd=WD, cautious=True, beta2=0.99)


def test_fused_schedules_do_not_recompile():
    "lr, betas and eps are kernel inputs: changing them (and crossing step 1) compiles nothing new"
    ps = make_params()
    assert_schedules_compile_nothing(fx_adopt(ps, 'fused'), ps, dict(lr=5e-3, beta1=0.8, beta2=0.99, eps=1e-4))


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    "bf16 parameters step on every path (the fused kernel in fp32) and agree with an fp32 run to bf16 resolution"
    # 5 moving steps of lr (3e-3) times |m| <= 6**0.25 times the cautious rescale (about 2): under the helper's 0.05
    assert_bf16_tracks_fp32(lambda ps: fx_adopt(ps, path, cautious=True), steps=6)


def test_eightbit_is_refused_naming_the_optimizers_that_have_it():
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match='ADOPT has no 8-bit path: no bitsandbytes kernel.*state_bits=8'):
        ADOPT(w, lr=1e-3, eightbit=True)
    with pytest.raises(ValueError, match='ADOPT has no 8-bit path'): adopt(eightbit=True)


@pytest.mark.parametrize('bad,match', [
    (dict(beta1=1.), r'`beta1` must be in \[0, 1\), got 1.0'), (dict(beta1=-0.1), '`beta1` must be in'),
    (dict(beta2=1.), r'`beta2` must be in \[0, 1\)'), (dict(eps=0.), '`eps` must be a finite number > 0, got 0.0'),
    (dict(eps=-1e-8), '`eps` must be a finite number > 0'), (dict(cautious=1), '`cautious` must be a bool, got 1'),
    (dict(decouple_wd=None), '`decouple_wd` must be a bool'), (dict(wd=-0.1), '`wd` must be'),
    (dict(lr=-1.), '`lr` must be'), (dict(percentile_clipping=0), '`percentile_clipping` must be in')])
def test_bad_hypers_are_refused_by_range(bad, match):
    w = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match=match): ADOPT(w, **{'lr': 1e-3, **bad})
    opt = ADOPT(w, lr=1e-3)
    for k, v in bad.items():
        with pytest.raises(ValueError, match=match): opt.set_hyper(k, v)
    assert opt.hypers[0] == ADOPT(w, lr=1e-3).hypers[0]


def test_eps_zero_is_refused_because_the_reference_makes_nan():
    "The reason `eps` must be > 0: a gradient element 0 on the first two steps is 0/0 in the reference"
    p = torch.zeros(2, requires_grad=True)
    ref = RefADOPT([p], lr=0.1, eps=0.)
    for _ in range(2):
        p.grad = torch.tensor([0., 1.])
        ref.step()
    assert p.isnan()[0] and not p.isnan()[1]
