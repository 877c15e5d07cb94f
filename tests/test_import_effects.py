"""Nothing changes on import: importing the package leaves fastai's classes as they were.

Each check runs in a fresh interpreter. The first lists the fastai modules that importing every module of the package
loads; the second imports those fastai modules itself (their own `@patch`es are fastai's, not ours), records every
attribute of fastai's classes, imports the package and compares: an attribute that existed must be the same object,
and a new one must be in `ADDED` (the package's `@patch` additions, each a new method under a new name)."""
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest

pytestmark = pytest.mark.cpu_only

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_MODULES = sorted(p.stem for p in (ROOT / 'fastxtend_optim').glob('*.py') if p.stem not in ('__init__', '_modidx'))
IMPORTS = ['fastxtend_optim.all'] + [f'fastxtend_optim.{m}' for m in PACKAGE_MODULES]

ADDED = {  # what the package's `@patch`es add, by class: a new name here must be a deliberate choice
    'Learner': {'profile', 'unprofile', 'sophia'},  # profiler: `learn.profile()`; sophia: `learn.sophia(k)`
}
CLASSES = {  # fastai's classes to watch, by the module they live in; DistributedDL's needs accelerate
    'Learner': 'fastai.learner', 'Optimizer': 'fastai.optimizer', 'Callback': 'fastai.callback.core',
    'TfmdDL': 'fastai.data.core', 'DataLoader': 'fastai.data.load', 'DistributedDL': 'fastai.distributed',
    'DistributedTrainer': 'fastai.distributed',
}

LIST_FASTAI = """
import importlib, json, sys
for m in MODULES: importlib.import_module(m)
print(json.dumps(sorted(n for n in sys.modules if n == 'fastai' or n.startswith('fastai.'))))
"""

COMPARE = """
import importlib, inspect, json, sys
for m in FASTAI:
    try: importlib.import_module(m)
    except ImportError: pass
classes = {}
for name, mod in CLASSES.items():
    try: classes[name] = getattr(importlib.import_module(mod), name)
    except ImportError: pass
import fastai.learner
def snapshot(): return {n: {a: inspect.getattr_static(c, a) for a in dir(c)} for n, c in classes.items()}
before, callbacks = snapshot(), list(fastai.learner.defaults.callbacks)
for m in MODULES: importlib.import_module(m)
after = snapshot()
print(json.dumps(dict(
    watched=sorted(classes),
    changed=sorted(f'{n}.{a}' for n in before for a, v in before[n].items() if a not in after[n] or after[n][a] is not v),
    added={n: sorted(set(after[n]) - set(before[n])) for n in before},
    callbacks_changed=[c.__name__ for c in fastai.learner.defaults.callbacks] != [c.__name__ for c in callbacks])))
"""


def run(script:str, **names) -> dict:
    "`script` in a fresh interpreter, with `names` defined in it; its printed JSON"
    code = ''.join(f'{k} = {v!r}\n' for k, v in names.items()) + textwrap.dedent(script)
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def effects() -> dict:
    fastai_modules = run(LIST_FASTAI, MODULES=IMPORTS)
    return run(COMPARE, MODULES=IMPORTS, FASTAI=fastai_modules, CLASSES=CLASSES)


def test_the_package_is_all_imported():
    assert {'all', 'schedulefree', 'distributed', 'bench', 'profiler', 'sophia'} <= set(PACKAGE_MODULES)


def test_imports_replace_no_attribute_of_fastai(effects):
    "Learner.save/export/create_opt/fit, DistributedDL._broadcast and every other attribute: the same objects"
    assert {'Learner', 'Optimizer'} <= set(effects['watched'])
    assert effects['changed'] == [], effects['changed']


def test_imports_add_only_the_listed_patches(effects):
    assert {n: set(a) for n, a in effects['added'].items() if a} == ADDED


def test_imports_leave_fastai_default_callbacks(effects):
    assert effects['callbacks_changed'] is False


BROADCAST = """
import json, os, tempfile, torch, torch.distributed as dist
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL
from fastxtend_optim.distributed import BackendBroadcast
fastai_broadcast = DistributedDL.__dict__['_broadcast']
dist.init_process_group('gloo', init_method='file://' + os.path.join(tempfile.mkdtemp(), 'store'), rank=0, world_size=1)
try:
    dl = DistributedDL(DataLoader(list(range(10)), bs=5, shuffle=True), rank=0, world_size=1)
    other = DistributedDL(DataLoader(list(range(10)), bs=5), rank=0, world_size=1)
    BackendBroadcast()._fix(dl, DataLoader(list(range(4))))
    got = sorted(int(x) for b in dl for x in b)
    own = '_broadcast' in vars(dl) and '_broadcast' not in vars(other)
finally: dist.destroy_process_group()
print(json.dumps(dict(got=got, own=own, class_kept=DistributedDL.__dict__['_broadcast'] is fastai_broadcast)))
"""


def test_backend_broadcast_fixes_its_loaders_and_leaves_fastai_class():
    "On gloo the fixed loader broadcasts its indices on the CPU and yields every item; fastai's class keeps its method"
    pytest.importorskip('accelerate')
    res = run(BROADCAST)
    assert res == dict(got=list(range(10)), own=True, class_kept=True)
