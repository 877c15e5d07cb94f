"RAdam/SAdam against fastai's RAdam on every path, per-tensor step counts, checkpoints across paths."
import pytest
import fastai.optimizer as fastai_optim
from fastxtend_optim.radam import RAdam
from conftest import (assert_schedules_compile_nothing, assert_matches_reference, assert_bf16_tracks_fp32, frozen_run,
                      make_params, run, gappy_run, assert_close_lists, fx_groups)

WD = 0.05
PATHS = ('native', 'foreach', 'fused')


def fx_radam(params, path, **kwargs):
    return fx_groups(RAdam, params, path, **{'wd': WD, **kwargs})


def fastai_radam(params, **kwargs):
    return fx_groups(fastai_optim.RAdam, params, None, **{'wd': WD, **kwargs})


@pytest.mark.parametrize('beta', [0., 50.])
@pytest.mark.parametrize('decouple_wd', [True, False])
def test_native_equals_fastai_radam_exactly(decouple_wd, beta):
    ours, ref = make_params(), make_params()
    got = run(fx_radam(ours, 'native', decouple_wd=decouple_wd, beta=beta), ours, 60)
    assert_close_lists(got, run(fastai_radam(ref, decouple_wd=decouple_wd, beta=beta), ref, 60), atol=0.)


@pytest.mark.parametrize('path', ['foreach', 'fused'])
@pytest.mark.parametrize('kwargs', [dict(), dict(decouple_wd=False), dict(beta=50.), dict(beta=10., decouple_wd=False),
                                    dict(eps=0., sqr_mom=0.9)])
def test_every_path_matches_fastai_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, both decay modes, SAdam, the unrectified first steps: within 1e-6"
    assert_matches_reference(fx_radam, fastai_radam, path, **kwargs)


@pytest.mark.parametrize('path', PATHS)
def test_per_tensor_step_counts_match_fastai(path):
    "The first group is frozen (no gradient) for 8 steps: its tensors are unrectified while the others are rectified"
    ours, ref = make_params(), make_params()
    opt = fx_radam(ours, path)
    got = frozen_run(opt, ours)
    assert [opt.state[p]['step'] for p in ours] == [12] * 3 + [20] * 3
    assert_close_lists(got, frozen_run(fastai_radam(ref), ref), atol=1e-6)


def test_fused_schedules_do_not_recompile():
    "lr, mom and beta changes are kernel inputs; only turning SAdam on or off is a new kernel"
    ps = make_params()
    assert_schedules_compile_nothing(fx_radam(ps, 'fused', beta=10.), ps, dict(lr=5e-3, mom=0.8, beta=30.),
                                     steps=8)  # crosses into the rectified regime


@pytest.mark.parametrize('kwargs', [dict(), dict(percentile_clipping=80, beta=20.)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    results = [gappy_run(fx_radam(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)


@pytest.mark.parametrize('path', PATHS)
def test_bf16_steps(path):
    "bf16 parameters step on every path (the fused kernel in fp32) and agree with an fp32 run to bf16 resolution"
    assert_bf16_tracks_fp32(lambda ps: fx_radam(ps, path, beta=20.))
