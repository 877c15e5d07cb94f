"The profiler callback on a real Learner: its numbers add up, point at the slow phase, and save and load back."
import time
import pandas as pd
import pytest
from fastai.callback.all import GradientAccumulation, MixedPrecision
from fastxtend_optim.lion import lion
from fastxtend_optim.adam import adam
from fastxtend_optim.demo import digits_dls, digits_learner
from fastxtend_optim.profiler import Profiler, BATCH_PHASES, state_bytes


@pytest.fixture(scope='module')
def dls():
    return digits_dls()


def fit(learn, epochs=1, lr=3e-3):
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(epochs, lr)
    return learn.profiler


def test_phases_add_up_to_the_fit(dls):
    """With no warm-up dropped, the batch phases tile training and `validate` covers validation. What is left out is
    fastai's own work between those events (epoch start and end, the recorder, the scheduler's before_fit): we allow
    5% of the fit plus 50 ms for it"""
    learn = digits_learner(lion(), dls).profile(warmup=0)
    start = time.perf_counter()
    prof = fit(learn, epochs=2)
    wall = time.perf_counter() - start
    assert prof.fit_seconds <= wall and prof.fit_seconds > 0.95 * wall
    df = prof.report()
    covered = df.loc[list(BATCH_PHASES), 'total_s'].sum() + df.loc['validate', 'total_s']
    assert abs(prof.fit_seconds - covered) <= 0.05 * prof.fit_seconds + 0.05
    assert abs(df.loc['train', 'total_s'] - df.loc[list(BATCH_PHASES), 'total_s'].sum()) <= 0.02 * df.loc['train', 'total_s'] + 0.01
    assert df.loc['opt_step', 'calls'] == 2 * len(dls.train)
    assert df.loc['epoch', 'calls'] == 2


def test_opt_step_is_largest_when_slowed(dls):
    learn = digits_learner(lion(foreach=True), dls).profile()
    fast = fit(learn).report()
    learn = digits_learner(lion(foreach=True), dls).profile()
    learn.create_opt()
    step = learn.opt.step
    learn.opt.step = lambda *a, **k: time.sleep(0.02) or step(*a, **k)
    slow = fit(learn).report()
    batch = list(BATCH_PHASES)
    assert slow.loc[batch, 'mean_ms'].idxmax() == 'opt_step' and slow.loc['opt_step', 'mean_ms'] >= 20
    assert fast.loc['opt_step', 'mean_ms'] < slow.loc['opt_step', 'mean_ms'] - 15
    assert fast.loc[batch, 'mean_ms'].idxmax() != 'opt_step' or fast.loc['opt_step', 'mean_ms'] < 5


def test_warmup_batches_dropped_once_per_fit(dls):
    prof = fit(digits_learner(lion(), dls).profile(warmup=5), epochs=2)
    assert prof.report().loc['forward', 'calls'] == 2 * len(dls.train) - 5


def test_validate_and_get_preds_keep_the_training_profile(dls):
    learn = digits_learner(lion(), dls).profile()
    before = fit(learn).report()
    with learn.no_bar():
        learn.validate()
        learn.get_preds()
    pd.testing.assert_frame_equal(learn.profiler.report(), before)
    assert learn.profiler.throughput()['train'] > 0


def test_gradient_accumulation_counts_only_real_steps(dls):
    learn = digits_learner(lion(), dls, cbs=GradientAccumulation(n_acc=128)).profile(warmup=0)
    df = fit(learn).report()
    assert df.loc['opt_step', 'calls'] == len(dls.train) // 2 == df.loc['zero_grad', 'calls']
    assert df.loc['backward', 'calls'] == len(dls.train)


def test_mixed_precision_and_lr_find(dls):
    learn = digits_learner(adam(), dls, cbs=MixedPrecision(amp_mode='bf16')).profile(warmup=0)
    assert fit(learn).report().loc['opt_step', 'calls'] == len(dls.train)
    n = len(dls.train) + 8  # past the end of an epoch: lr_find then cancels validation before it starts
    with learn.no_bar(), learn.no_logging(): learn.lr_find(num_it=n, show_plot=False)
    df = learn.profiler.report()
    assert df.loc['opt_step', 'calls'] == len(learn.recorder.lrs) > len(dls.train)  # every lr_find step, past an epoch
    assert 'validate' not in df.index  # lr_find cancels every validation before it starts: nothing stale is timed


def test_csv_markdown_and_png_round_trip(dls, tmp_path):
    prof = fit(digits_learner(lion(), dls).profile())
    df = prof.report()
    prof.to_csv(tmp_path / 'r.csv')
    back = pd.read_csv(tmp_path / 'r.csv', index_col='phase')
    pd.testing.assert_frame_equal(back, df, check_exact=False, rtol=1e-9)
    prof.to_markdown(tmp_path / 'r.md')
    lines = (tmp_path / 'r.md').read_text().splitlines()
    assert lines[0].split('|')[1:-1] == [' phase ', ' mean_ms ', ' std_ms ', ' calls ', ' total_s ', ' percent ']
    rows = {l.split('|')[1].strip(): [float(c) for c in l.split('|')[2:-1]] for l in lines[2:]}
    assert list(rows) == list(df.index)
    assert rows['opt_step'][2] == df.loc['opt_step', 'calls']
    assert abs(rows['opt_step'][0] - df.loc['opt_step', 'mean_ms']) <= 5e-4
    prof.plot(tmp_path / 'r.png')
    assert (tmp_path / 'r.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_profile_replaces_and_unprofile_removes(dls):
    learn = digits_learner(lion(), dls).profile().profile()
    assert sum(isinstance(cb, Profiler) for cb in learn.cbs) == 1
    learn.unprofile()
    assert not any(isinstance(cb, Profiler) for cb in learn.cbs) and not hasattr(learn, 'profiler')
    with learn.no_bar(), learn.no_logging(): learn.fit(1)  # trains without it


def test_state_bytes_per_path(dls):
    sizes = {}
    for path, kw in (('foreach', dict(foreach=True)), ('eightbit', dict(eightbit=True))):
        learn = digits_learner(lion(**kw), dls)
        prof = fit(learn.profile())
        assert prof.opt_path == path and prof.state_bytes == state_bytes(learn.opt)
        sizes[path] = prof.state_bytes
    n = sum(p.numel() for p in learn.model.parameters())
    assert sizes['foreach'] >= 4 * n                      # one fp32 momentum per parameter
    assert sizes['eightbit'] < 0.5 * sizes['foreach']    # uint8 codes for the two big matrices
