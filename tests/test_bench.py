"fxo-bench as a user runs it: the tables it prints and writes, and its one-line errors."
import os
import shutil
import subprocess
import sys
import pytest
from fastxtend_optim import bench


def fxo_bench(*args, cwd):
    "Run the console script (or the module, where the script is not on PATH)"
    exe = shutil.which('fxo-bench')
    cmd = [exe] if exe else [sys.executable, '-m', 'fastxtend_optim.bench']
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run(cmd + list(args), cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def md_rows(text):
    "First column -> other cells of every body row of the Markdown tables in `text`"
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip('|').split('|')]
        if line.startswith('|') and not set(line) <= set('|-') and cells[0] not in ('optimizer', 'implementation'):
            rows.setdefault(cells[0], []).append(cells[1:])
    return rows


def test_train_prints_and_writes_the_speedup_table(tmp_path):
    res = fxo_bench('train', '--model', 'digits', '--epochs', '1', '--opt', 'lion', 'adam', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'ForEach speedup' in res.stdout and 'native step (ms)' in res.stdout
    assert bench.COMPILE_NOTE in res.stdout  # said before the fused runs compile
    # piped, as CI's log is: one short line per stage, not fastprogress' bar rewritten on one line
    assert 'training 1/8: lion native' in res.stdout and 'compiling 2/2: adam' in res.stdout
    assert max(map(len, res.stdout.splitlines())) < 200
    md = (tmp_path / 'fxo-bench' / 'train.md').read_text()
    rows = md_rows(md)
    assert set(rows) == {'lion', 'adam'}
    speed = rows['lion'][0]
    native, foreach, fused, eightbit, speedup, fused_speedup = map(float, speed)
    assert native > 0 and foreach > 0 and fused > 0 and eightbit > 0
    for ratio, path_ms in ((speedup, foreach), (fused_speedup, fused)):  # cells are rounded to 3 decimals
        rounding = native / path_ms * (5e-4 / native + 5e-4 / path_ms) + 5e-4
        assert ratio == pytest.approx(native / path_ms, abs=rounding)
    runs = rows['lion'][1:]
    assert [r[0] for r in runs] == ['native', 'foreach', 'fused', 'eightbit']
    assert all(float(r[1]) > 0.8 for r in runs)  # accuracy after one epoch
    assert (tmp_path / 'fxo-bench' / 'train.png').read_bytes()[:4] == b'\x89PNG'


def test_step_small_prints_ratios_against_peers(tmp_path):
    res = fxo_bench('step', '--size', 'small', '--rounds', '3', '--opt', 'lion', cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert 'floor 20 B/param' in res.stdout
    rows = md_rows((tmp_path / 'fxo-bench' / 'step.md').read_text())
    assert {'fastxtend_optim foreach', 'fastai Optimizer loop', 'lion-pytorch', 'bitsandbytes Lion8bit'} <= set(rows)
    assert {f'torch face {p}' for p in ('native', 'foreach', 'fused', 'eightbit')} <= set(rows)
    assert max(map(len, res.stdout.splitlines())) < 200
    assert float(rows['fastxtend_optim foreach'][0][1]) == 1.0  # × ForEach of itself
    ms, ratio = float(rows['lion-pytorch'][0][0]), float(rows['lion-pytorch'][0][1])
    assert ratio == pytest.approx(ms / float(rows['fastxtend_optim foreach'][0][0]), rel=0.02)
    first = float(rows['fastxtend_optim fused'][0][3])  # the fused path's first step compiles: seconds, not ms
    assert first > 10 * float(rows['fastxtend_optim fused'][0][0]) / 1000


@pytest.mark.parametrize('args,message', [
    (['--opt', 'adamax'], "unknown optimizer 'adamax'"),
    (['--path', 'turbo'], "unknown path 'turbo'"),
    (['--device', 'tpu'], "unknown device 'tpu'"),
    (['step', '--size', 'huge'], "unknown size 'huge'"),
    (['--epochs', '0'], '--epochs must be positive'),
    (['step', '--tensors', '-5'], '--tensors must be positive'),
    (['fly'], "unknown mode 'fly'"),
])
def test_bad_options_get_one_line(args, message, tmp_path):
    res = fxo_bench(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == f'fxo-bench: error: {message}' + res.stderr.strip().split(message, 1)[1]
    assert len(res.stderr.strip().splitlines()) == 1 and 'Traceback' not in res.stderr


def test_eightbit_without_bitsandbytes_is_refused(monkeypatch, tmp_path):
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, 'find_spec', lambda name, *a: None if name == 'bitsandbytes' else real(name, *a))
    with pytest.raises(bench.BenchError, match='the eightbit path needs bitsandbytes'):
        bench.run_bench('train', ['lion'], ['eightbit'], 1, 64, 'small', None, None, 3, 'cpu', tmp_path)
    bench.check_eightbit(['native', 'foreach'])  # the other paths need no bitsandbytes


def run_in_process(tmp_path, mode='train', opts=('lion',), paths=('native', 'foreach'), epochs=1, bs=64, size='small',
                   rounds=2, out=None):
    bench.run_bench(mode, list(opts), list(paths), epochs, bs, size, None, None, rounds, 'cpu', out or tmp_path,
                    models=['digits'])


def test_repeated_names_run_once(tmp_path, capsys):
    run_in_process(tmp_path, opts=('lion', 'lion'), paths=('native', 'native', 'foreach'))
    rows = md_rows((tmp_path / 'train.md').read_text())
    assert [r[0] for r in rows['lion'][1:]] == ['native', 'foreach']


def test_step_without_foreach_names_its_baseline(tmp_path, capsys):
    run_in_process(tmp_path, mode='step', opts=('adam',), paths=('native',))
    out = capsys.readouterr().out
    assert '× fastxtend_optim native' in out and '× ForEach' not in out


def test_batch_size_limits(tmp_path):
    with pytest.raises(bench.BenchError, match='larger than the training set'):
        run_in_process(tmp_path, bs=5000)
    run_in_process(tmp_path, paths=('native',), bs=700)  # 2 training batches: one is kept after warm-up
    assert float(md_rows((tmp_path / 'train.md').read_text())['lion'][1][2]) > 0  # its step time


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / 'f').write_text('')
    with pytest.raises(bench.BenchError, match='is a file, not a folder'):
        run_in_process(tmp_path, out=tmp_path / 'f')


def test_step_plot_legend_clears_the_bars(tmp_path):
    "The legend sits right of the axes, so it covers no bar, however tall"
    import pandas as pd
    from fastxtend_optim.bench import _plot_steps
    runs = pd.DataFrame([dict(optimizer=o, path=p, step_ms=ms) for o, ms in (('lion', 9.), ('adam', 30.))
                         for p in ('native', 'foreach', 'fused')])
    ax = _plot_steps(runs, tmp_path / 'steps.png')
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    renderer = FigureCanvasAgg(ax.figure).get_renderer()
    assert ax.get_legend().get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1


def test_train_under_a_launcher_reports_rank_0_alone(tmp_path):
    "torchrun starts 2 processes: they train under fastai's DDP, and rank 0 alone prints and writes the tables"
    exe = shutil.which('fxo-bench')
    assert exe, 'the fxo-bench console script is installed with the package'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--no-python', '--nproc-per-node', '2', exe,
           'train', '--model', 'digits', '--epochs', '1', '--opt', 'lion', '--path', 'native', 'foreach']
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore', 'OMP_NUM_THREADS': '1'}
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, start_new_session=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count('DDP over 2 processes') == 1 and res.stdout.count('ForEach speedup') == 1
    md = (tmp_path / 'fxo-bench' / 'train.md').read_text()
    assert "DDP over 2 processes (`learn.distrib_ctx()`): rank 0's timings" in md
    runs = md_rows(md)['lion'][1:]
    assert [r[0] for r in runs] == ['native', 'foreach']
    assert all(float(r[1]) > 0.8 for r in runs)  # accuracy after one epoch of 2 processes' batches


def test_step_under_a_launcher_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv('WORLD_SIZE', '2')
    with pytest.raises(bench.BenchError, match='`step` times opt.step\\(\\) in one process, and 2 were launched'):
        run_in_process(tmp_path, mode='step')


def test_every_registered_optimizer_has_bench_settings():
    "fxo-bench's list is the registry's: a registered optimizer without its digits lr and bytes would be left out"
    from fastxtend_optim.registry import REGISTRY
    assert sorted(bench.BENCH_SETTINGS) == sorted(REGISTRY) == sorted(bench.STEP_HYPERS) == sorted(bench.PEERS)
    assert all(bench.OPTIMIZERS[n]['paths'] == e.paths for n, e in REGISTRY.items())


def test_the_torch_face_rows_step_the_fastai_rows_hypers():
    "The torch face's defaults are torch's where torch has the optimizer: its rows take the fastai face's instead"
    for name in bench.OPTIMIZERS:
        impls = bench._ours(name, ['foreach'], **bench.STEP_HYPERS[name])
        ours = impls['fastxtend_optim foreach'](bench.synthetic_params([(8, 4), (4,)], 'cpu'))
        face = impls['torch face foreach'](bench.synthetic_params([(8, 4), (4,)], 'cpu'))
        assert face.fx.hypers == ours.hypers, name
