"The memory meter behind `fxo-bench memory`: it must count what a process holds, or its table means nothing."
import os, subprocess, sys
import pytest

pytestmark = pytest.mark.cpu_only('the CPU meter reads /proc/self/status')
ENV = dict(os.environ, MALLOC_MMAP_THRESHOLD_='131072', MALLOC_TRIM_THRESHOLD_='131072')


def in_fresh_process(code:str) -> str:
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_cpu_meter_counts_a_40_mib_tensor_and_forgets_a_freed_one():
    "A freed 80 MiB tensor leaves the peak at reset; a 40 MiB tensor made after it raises the peak by 40 MiB (± 1)"
    got = in_fresh_process(
        "import torch\nfrom fastxtend_optim.memory import MemoryMeter\n"
        "m = MemoryMeter(torch.device('cpu'))\n"
        "big = torch.ones(20 * 2**20); del big\n"
        "m.reset(); start = m.now()\n"
        "x = torch.ones(10 * 2**20)\n"
        "print((m.peak() - start) / 2**20)")
    assert abs(float(got) - 40) <= 1


def test_fp32_adamw_costs_its_16_bytes_a_parameter():
    """Weights, gradients and AdamW's two moments in fp32: 16 bytes a parameter by construction; the meter must find
    that, plus at most 2 bytes of transients (one 1M-parameter layer's temporaries over 8M parameters)"""
    got = float(in_fresh_process("from fastxtend_optim.memory import bytes_per_param\n"
                                 "print(bytes_per_param('adam', 'fp32', 8.))"))
    assert 15.9 <= got <= 18, got
