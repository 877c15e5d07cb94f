"QHAdam against fastai's QHAdam on every path, and checkpoints across paths."
import pytest
import fastai.optimizer as fastai_optim
from fastxtend_optim.qhadam import QHAdam
from conftest import assert_matches_reference, make_params, run, gappy_run, assert_close_lists, fx_groups

WD = 0.05
PATHS = ('native', 'foreach', 'fused')
KWARGS = [dict(), dict(decouple_wd=False), dict(nu_1=0.4, nu_2=0.6, mom=0.9, sqr_mom=0.99),
          dict(nu_1=1., nu_2=0.2, decouple_wd=False, eps=1e-6)]


def fx_qhadam(params, path, **kwargs):
    return fx_groups(QHAdam, params, path, **{'wd': WD, **kwargs})


def fastai_qhadam(params, **kwargs):
    return fx_groups(fastai_optim.QHAdam, params, None, **{'wd': WD, **kwargs})


@pytest.mark.parametrize('kwargs', KWARGS)
def test_native_equals_fastai_qhadam_exactly(kwargs):
    ours, ref = make_params(), make_params()
    got = run(fx_qhadam(ours, 'native', **kwargs), ours, 60)
    assert_close_lists(got, run(fastai_qhadam(ref, **kwargs), ref, 60), atol=0.)


@pytest.mark.parametrize('path', ['foreach', 'fused'])
@pytest.mark.parametrize('kwargs', KWARGS)
def test_every_path_matches_fastai_over_60_steps(path, kwargs):
    "Two param groups, do_wd=False tensors, both decay modes, nu_2 below 1: within 1e-6"
    assert_matches_reference(fx_qhadam, fastai_qhadam, path, **kwargs)


@pytest.mark.parametrize('kwargs', [dict(nu_2=0.6), dict(percentile_clipping=80, decouple_wd=False)])
def test_fused_matches_native_with_missing_gradients_and_clipping(kwargs):
    "Tensor 2 has no gradient on some steps (it must not move, its bias corrections lag); clipping in the core"
    results = [gappy_run(fx_qhadam(ps, path, **kwargs), ps, 40) for path, ps in
               (('native', make_params()), ('fused', make_params()))]
    assert_close_lists(results[1], results[0], atol=1e-6)
