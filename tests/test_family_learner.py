"fastai's optimizer family and the modern optimizers in a fastai Learner on the digits data, on every path they have."
from functools import partial
import pytest
import fastai.optimizer as fastai_optim
from fastxtend_optim.bench import OPTIMIZERS, has_path
from fastxtend_optim.demo import digits_dls, digits_learner, PATH_FUNCS
from test_learner import quiet_fit, accuracy

FASTAI = {'sgd': partial(fastai_optim.SGD, mom=0.9), 'rmsprop': fastai_optim.RMSProp, 'radam': fastai_optim.RAdam,
          'qhadam': fastai_optim.QHAdam, 'lamb': fastai_optim.Lamb, 'ranger': fastai_optim.ranger}
OTHERS = ('adagrad', 'ademamix', 'adan', 'stableadamw', 'adopt', 'sophia', 'muon',
          'schedulefree_adamw')  # no fastai class: compared with fastai's Adam
CASES = [(o, p) for o in [*FASTAI, *OTHERS] for p in PATH_FUNCS if has_path(o, p)]
EPOCHS = 3


@pytest.fixture(scope='module')
def dls(): return digits_dls()


@pytest.fixture(scope='module')
def reference(dls):
    "fastai's own class per optimizer (same lr, data order and seed), fitted once"
    cache = {}
    def get(name):
        if name not in cache:
            opt_func, lr = (FASTAI[name], OPTIMIZERS[name]['lr']) if name in FASTAI else (fastai_optim.Adam, 3e-3)
            learn = digits_learner(opt_func, dls)
            quiet_fit(learn, EPOCHS, lr)
            cache[name] = accuracy(learn)
        return cache[name]
    return get


@pytest.mark.parametrize('name,path', CASES)
def test_trains_digits_like_fastai(dls, reference, name, path):
    spec = OPTIMIZERS[name]  # Sophia brings its Hessian callback; Schedule-Free trains with `fit` (flat lr)
    learn = digits_learner(spec['partial'](**PATH_FUNCS[path]), dls, cbs=spec.get('cbs', list)())
    quiet_fit(learn, EPOCHS, spec['lr'], method=spec.get('fit', 'fit_one_cycle'))
    acc, ref = accuracy(learn), reference(name)
    assert learn.opt.path == path and acc > 0.9
    if name in FASTAI: assert abs(acc - ref) <= 0.03, (acc, ref)   # the same math as fastai's class
    else: assert acc >= ref - 0.03, (acc, ref)
