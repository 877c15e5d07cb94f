"fastai's optimizer family (and Adagrad, AdEMAMix) in a fastai Learner on the digits data, on every path they have."
from functools import partial
import pytest
import fastai.optimizer as fastai_optim
from fastxtend_optim.bench import OPTIMIZERS, has_path
from fastxtend_optim.demo import digits_dls, digits_learner, PATH_FUNCS
from test_learner import quiet_fit, accuracy

FASTAI = {'sgd': partial(fastai_optim.SGD, mom=0.9), 'rmsprop': fastai_optim.RMSProp, 'radam': fastai_optim.RAdam,
          'qhadam': fastai_optim.QHAdam, 'lamb': fastai_optim.Lamb, 'ranger': fastai_optim.ranger}
OTHERS = ('adagrad', 'ademamix')  # fastai has no class: compared with fastai's Adam at its usual lr
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
    learn = digits_learner(OPTIMIZERS[name]['partial'](**PATH_FUNCS[path]), dls)
    quiet_fit(learn, EPOCHS, OPTIMIZERS[name]['lr'])
    acc, ref = accuracy(learn), reference(name)
    assert learn.opt.path == path and acc > 0.9
    if name in FASTAI: assert abs(acc - ref) <= 0.03, (acc, ref)   # the same math as fastai's class
    else: assert acc >= ref - 0.03, (acc, ref)
