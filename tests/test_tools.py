"The tools a GPU session depends on resolve from a fresh `bash tools/install.sh dev`, without the network."
import os, subprocess
from pathlib import Path
import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.cpu_only
def test_gpu_wheels_resolves_every_package_from_the_dev_install():
    "Every package gpu-wheels.sh pins is installed by the dev extra, so its resolution step cannot stop a GPU session"
    done = subprocess.run(['bash', 'tools/gpu-wheels.sh'], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, GPU_WHEELS_RESOLVE_ONLY='1'))
    assert done.returncode == 0, done.stdout + done.stderr
    pins = done.stdout.split()
    assert len(pins) == 17 and all('==' in pin and pin.split('==')[1] for pin in pins), pins
    assert any(pin.startswith('fastai==') for pin in pins) and any(pin.startswith('bitsandbytes==') for pin in pins)
