"The tools a GPU session depends on resolve from a fresh `bash tools/install.sh dev`, without the network."
import os, subprocess, sys
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


@pytest.mark.cpu_only
def test_every_deliberate_fault_still_applies():
    "tools/faults.py's faults each find their line once, and their tests exist: the script cannot rot silently"
    import importlib.util
    spec = importlib.util.spec_from_file_location('faults', ROOT / 'tools' / 'faults.py')
    faults = sys.modules['faults'] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(faults)
    assert len(faults.FAULTS) >= 10
    for name, fault in faults.FAULTS.items():
        assert (ROOT / fault.path).read_text().count(fault.old) == 1, name
        assert fault.old != fault.new and (ROOT / fault.tests[0].split('::')[0]).exists(), name
