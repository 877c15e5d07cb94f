"""Deliberate faults that the test suite must catch. Each fault changes one line of a copy of the package; the tests
named for it must then fail, and pass on the copy without the fault.

    python tools/faults.py            # every fault (about five minutes on 2 CPU cores)
    python tools/faults.py NAME ...   # some of them
    python tools/faults.py --list     # their names

Exit status 0 when every fault was caught. See CONTRIBUTING.md."""
from __future__ import annotations
import os, shutil, subprocess, sys, tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Fault:
    path: str   # a module file, relative to the repository root
    old: str    # text that occurs exactly once in it
    new: str    # what the fault puts there
    tests: tuple  # pytest arguments that select the tests which must catch it


FAULTS = {
    'adam-eps-dropped': Fault('fastxtend_optim/adam.py', 'denom = (sqr_avg / debias2).sqrt() + eps',
                              'denom = (sqr_avg / debias2).sqrt()', ('tests/test_adam.py',)),
    'adam-bias-correction-skipped': Fault(
        'fastxtend_optim/adam.py', "step_size=-h['lr'] / debias(mom, 1 - mom, steps)",
        "step_size=-h['lr'] * torch.ones_like(steps)", ('tests/test_adam.py',)),
    'lion-update-from-momentum-only': Fault('fastxtend_optim/lion.py', 'update = torch.lerp(grad, grad_avg, beta1).sign_()',
                                            'update = grad_avg.sign()', ('tests/test_lion.py',)),
    'decoupled-decay-grows-weights': Fault('fastxtend_optim/base.py', 'foreach_mul_(params, 1 - lr*wd)',
                                           'foreach_mul_(params, 1 + lr*wd)', ('tests/test_adam.py',)),
    'fused-falls-back-to-foreach': Fault(
        'fastxtend_optim/fused.py', 'if fused_unavailable(device) is not None and not eager: return False',
        'if not eager: return False', ('tests/test_fused.py::test_fused_matches_native_over_100_steps',)),
    'kahan-skipped': Fault(
        'fastxtend_optim/lowprec.py', "return 'kahan' if hyper.get('kahan_sum', None) in (None, True) else None",
        'return None', ('tests/test_lowprec.py::test_kahan_moves_16bit_weights_as_far_as_fp32',)),
    'stochastic-rounding-to-nearest': Fault(
        'fastxtend_optim/lowprec.py', 'return ((raw + (bits & low).to(torch.int32)) & ~low)',
        'return ((raw + (1 << (drop - 1))) & ~low)',
        ('tests/test_lowprec.py::test_stochastic_rounding_travels_as_far_on_average',)),
    '4bit-codes-truncated': Fault(
        'fastxtend_optim/lowbit.py', '(y * 16 + 0.5).floor().clamp(1, 16)', '(y * 16).floor().clamp(1, 16)',
        ('tests/test_lowbit.py::test_one_step_from_identical_state_is_within_the_quantizer_bound',)),
    'accumulation-moves-weights': Fault(
        'fastxtend_optim/release.py', "for h in opt.hypers: h['lr'] = 0.", 'for h in opt.hypers: pass',
        ('tests/test_accumulation.py', '-k', 'leave_weights and adam')),
    'release-keeps-gradients': Fault(
        'fastxtend_optim/release.py', 'for _, p in members: p.grad = None', 'for _, p in members: pass',
        ('tests/test_release.py', '-k', 'bitwise and adam')),
    'prodigy-estimate-forgets': Fault(
        'fastxtend_optim/prodigy.py', "d_numerator = h['d_numerator'] * prodigy_beta3(h) + numerator",
        'd_numerator = numerator', ('tests/test_prodigy.py', '-k', 'matches_prodigyopt')),
    'came-instability-ignored': Fault(
        'fastxtend_optim/came.py', 'update = approx_rsqrt(row_res_avg, col_res_avg).mul_(grad_avg)',
        'update = grad_avg', ('tests/test_came.py', '-k', 'matches_came_pytorch')),
    'adafactor-relative-step-constant': Fault('fastxtend_optim/adafactor.py', 'rho = min(lr, 1 / step ** 0.5)',
                                              'rho = lr', ('tests/test_adafactor.py', '-k', 'one_over_root')),
    'factored-state-shapes-unchecked': Fault(
        'fastxtend_optim/core.py', 'dict.fromkeys(self.state_keys + tuple(self.state_init))',
        'dict.fromkeys(self.state_keys)', ('tests/test_came.py', '-k', 'wrongly_shaped')),
}


def faulty_copy(fault:Fault|None, into:Path) -> Path:
    "The package and tests copied into `into`, with `fault` applied (none: as they are)"
    for part in ('fastxtend_optim', 'tests'):
        shutil.copytree(ROOT / part, into / part, ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(ROOT / 'pyproject.toml', into / 'pyproject.toml')
    if fault is not None:
        target = into / fault.path
        text = target.read_text()
        if text.count(fault.old) != 1: raise SystemExit(f'{fault.path} no longer holds {fault.old!r} once: update FAULTS')
        target.write_text(text.replace(fault.old, fault.new))
    return into


def tests_pass(copy:Path, tests:tuple) -> bool:
    "Whether the tests pass on `copy` (which must be the package the tests import)"
    env = dict(os.environ, PYTHONPATH=str(copy), FXO_TEST_DEVICES='cpu')
    where = subprocess.run([sys.executable, '-c', 'import fastxtend_optim; print(fastxtend_optim.__file__)'],
                           cwd=copy, env=env, capture_output=True, text=True).stdout.strip()
    if not where.startswith(str(copy)): raise SystemExit(f'the tests would import {where}, not the copy')
    done = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests], cwd=copy,
                          env=env, capture_output=True, text=True)
    if done.returncode not in (0, 1): raise SystemExit(f'pytest could not run {tests}:\n{done.stdout[-3000:]}')
    return done.returncode == 0


def main(names:list[str]) -> int:
    if names == ['--list']: print('\n'.join(FAULTS)); return 0
    unknown = [n for n in names if n not in FAULTS]
    if unknown: raise SystemExit(f'no fault {unknown}; --list names them')
    missed = []
    for name in names or list(FAULTS):
        fault = FAULTS[name]
        with tempfile.TemporaryDirectory() as clean, tempfile.TemporaryDirectory() as faulty:
            if not tests_pass(faulty_copy(None, Path(clean)), fault.tests):
                raise SystemExit(f'{name}: its tests fail without the fault')
            caught = not tests_pass(faulty_copy(fault, Path(faulty)), fault.tests)
        print(f"{'caught' if caught else 'MISSED'}  {name}", flush=True)
        if not caught: missed.append(name)
    print(f'{len(missed)} of {len(names or FAULTS)} faults missed' if missed else 'every fault caught')
    return 1 if missed else 0


if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
