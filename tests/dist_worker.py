"""Runs of every optimizer and path on a small MLP, sharded with FSDP2 across processes or whole in one.

Under torchrun: `python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_worker.py fsdp OUT`
steps each case 20 times with FSDP2 (gloo on the CPU) and rank 0 saves the whole parameters to OUT;
`run_case(..., sharded=False)` is the same run in one process, on the whole batch. Mode `dcp` stops each sharded run
halfway, saves it with `torch.distributed.checkpoint` (beside OUT), loads it into a fresh model and optimizer and
finishes the run; `resume_case` finishes it from the checkpoint in one process."""
import os, sys
from functools import partial
import torch, torch.distributed as dist
from torch import nn
from fastai.callback.core import Callback
from fastxtend_optim.bench import OPTIMIZERS, has_path

STEPS, BATCH = 20, 16
PATH_KW = dict(native=dict(foreach=False), foreach=dict(foreach=True), fused=dict(fused=True),
               eightbit=dict(eightbit=True, min_8bit_size=0),  # quantize every tensor: sharding moves the blocks
               eightbit32=dict(eightbit=True, optim_bits=32))
LOWBIT_KW = dict(fused8=dict(fused=True, state_bits=8), fused4=dict(fused=True, state_bits=4))  # every tensor quantized
LOWBIT_CASES = [(n, p) for n in ('adam', 'lion', 'lamb', 'stableadamw', 'adan', 'muon') for p in LOWBIT_KW]
CASE_KWARGS = {  # what each optimizer runs with: decay, and the options that need whole-tensor math
    'lion': dict(wd=0.1, cautious=True), 'adam': dict(wd=0.01, percentile_clipping=90), 'lars': dict(clip=True, wd=0.01),
    'sgd': dict(mom=0.9, wd=0.01), 'rmsprop': dict(wd=0.01), 'adagrad': dict(wd=0.01), 'radam': dict(wd=0.01),
    'qhadam': dict(wd=0.01), 'lamb': dict(wd=0.01), 'ademamix': dict(wd=0.01), 'ranger': dict(),
    'adan': dict(wd=0.02, cautious=True), 'stableadamw': dict(wd=0.05), 'adopt': dict(wd=0.05, cautious=True),
    'sophia': dict(wd=0.05, rho=0.5), 'muon': dict(wd=0.05, muon=[None, False]),
    'schedulefree_adamw': dict(wd=0.05, warmup_steps=5)}


def cases() -> list[tuple[str, str]]:
    return [(n, p) for n in CASE_KWARGS for p in PATH_KW if has_path(n, p.replace('32', ''))]


def make_model(seed:int=0) -> nn.Sequential:
    "An MLP whose row counts (13, 7, 1) split unevenly over 2 ranks; the last layer's rows leave rank 1 empty"
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 13), nn.ReLU(), nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 1))


def make_opt(name:str, path:str, model:nn.Module, lr_scale:float=1., **extra):
    spec, kw = OPTIMIZERS[name], dict(CASE_KWARGS[name], **{**PATH_KW, **LOWBIT_KW}[path], **extra)
    if kw.get('eightbit'): kw.pop('cautious', None)  # bitsandbytes' kernels cannot mask
    layers = [m for m in model if isinstance(m, nn.Linear)]
    groups = [[p for m in layers[:-1] for p in m.parameters()], list(layers[-1].parameters())]
    opt = spec['opt'](groups, lr=spec['lr'] * lr_scale / 10, **kw)
    for p in (m.bias for m in layers): opt.state[p]['do_wd'] = False
    if kw.get('state_bits', 32) != 32: opt.set_state_bits(model.parameters(), kw['state_bits'])  # tiny tensors too
    return opt


def batches(step:int, rank:int=0, world:int=1):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(BATCH, 10, generator=g), torch.randn(BATCH, 1, generator=g)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def shard_model(model:nn.Module) -> nn.Module:
    "`model` sharded with FSDP2, layer by layer"
    from torch.distributed.fsdp import fully_shard
    for m in model.children():
        if any(True for _ in m.parameters()): fully_shard(m)
    return fully_shard(model)


def train(model:nn.Module, opt, name:str, steps:range, sharded:bool, micro:int=1):
    "With `micro` > 1, that many batches accumulate into the optimizer's state before the weights step"
    from fastxtend_optim.release import accumulating
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    for step in steps:
        x, y = batches(step, rank, world)
        nn.functional.mse_loss(model(x), y).backward()
        if name == 'sophia' and step % 5 == 0: opt.update_hessian()  # the gradient as the Hessian estimate
        if (step + 1) % micro:
            with accumulating(opt): opt.step()
        else: opt.step()
        opt.zero_grad()


def whole_params(model:nn.Module, opt, sharded:bool) -> list[torch.Tensor]:
    if hasattr(opt, 'eval'): opt.eval()  # Schedule-Free: the averaged weights
    return [p.full_tensor() if sharded else p.detach().clone() for p in model.parameters()]


def run_case(name:str, path:str, sharded:bool=False, steps:int=STEPS, micro:int=1, **extra) -> list[torch.Tensor]:
    "`steps` batches of optimizer `name` on `path` (with `extra` options): the whole parameters after them"
    model = make_model()
    if sharded: model = shard_model(model)
    opt = make_opt(name, path, model, **extra)
    train(model, opt, name, range(steps), sharded, micro)
    return whole_params(model, opt, sharded)


# 16-bit weights that round: Kahan summation (the default) and stochastic rounding, sharded or whole
ROUNDING_CASES = [('adam', p, 'kahan') for p in ('native', 'foreach', 'fused')] + \
                 [('lion', p, 'stochastic') for p in ('foreach', 'fused')]
ROUNDING_KW = dict(kahan={}, stochastic=dict(stochastic_round=True))

def rounding_case(name:str, path:str, rounding:str, sharded:bool) -> list[torch.Tensor]:
    "STEPS steps with bf16 weights and `rounding`: the whole weights after them"
    model = make_model().to(torch.bfloat16)
    if sharded: model = shard_model(model)
    opt = make_opt(name, path, model, **ROUNDING_KW[rounding])
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    for step in range(STEPS):
        x, y = batches(step, rank, world)
        nn.functional.mse_loss(model(x.bfloat16()).float(), y).backward()
        opt.step(); opt.zero_grad()
    return whole_params(model, opt, sharded)


# options that take a second whole-tensor quantity: it must share the first one's reduction
REDUCTION_CASES = [('lars', p, dict(max_unorm=0.5, nesterov=True)) for p in ('native', 'foreach', 'fused', 'eightbit32')] + \
                  [('stableadamw', p, dict(cautious=True)) for p in ('native', 'foreach', 'fused')]

def all_reduces_per_step(name:str, path:str, **extra) -> tuple[int, int]:
    "The all-reduces one sharded `opt.step()` makes (after 2 steps), and the tensor groups it steps"
    from fastxtend_optim.core import gather_groups
    model = shard_model(make_model())
    opt = make_opt(name, path, model, **extra)
    train(model, opt, name, range(2), True)
    x, y = batches(2, dist.get_rank(), dist.get_world_size())
    nn.functional.mse_loss(model(x), y).backward()
    if name == 'sophia': opt.update_hessian()
    groups, calls, real = len(gather_groups(getattr(opt, 'opt', opt))), [], dist.all_reduce
    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    dist.all_reduce = counted
    try: opt.step()
    finally: dist.all_reduce = real
    return len(calls), groups


class TwoWide(nn.Module):
    """Two weights of 3 and 2 rows of 2^18: rank 0 holds 2^19 elements in two slices, rank 1 2^19 in one, so the CPU's
    ForEach chunks (2^19 elements) would split the ranks' groups differently"""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(2**18, 3, bias=False), nn.Linear(2**18, 2, bias=False)
    def forward(self, x): return self.a(x).sum(-1, keepdim=True) + self.b(x).sum(-1, keepdim=True)


# whole-tensor sums inside the chunk loop (no cautious mask: a mask flipped by a rounding-level difference moves a
# weight by lr, and every weight feeds the output here, so one flip spreads to thousands within two steps)
WIDE_CASES = [('lars', {}), ('stableadamw', {})]

def wide_case(name:str, sharded:bool, **options) -> list[torch.Tensor]:
    "3 ForEach steps on `TwoWide`, sharded or whole: a sharded group must step in one chunk on every rank"
    model = TwoWide()
    if sharded: model = shard_model(model)
    opt = OPTIMIZERS[name]['opt'](list(model.parameters()), lr=1e-3, foreach=True, **options)
    rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(4, 2**18, generator=g), torch.randn(4, 1, generator=g)
        n = 4 // world
        nn.functional.mse_loss(model(x[rank * n:(rank + 1) * n]), y[rank * n:(rank + 1) * n]).backward()
        opt.step(); opt.zero_grad()
    return [p.full_tensor() if sharded else p.detach().clone() for p in model.parameters()]


def finite_flags() -> list[bool]:
    "Sophia's `all_finite` on sharded gradients: as they are, then with an inf in rank 1's slice alone"
    from fastxtend_optim.core import local_tensor
    from fastxtend_optim.sophia import all_finite
    model = shard_model(make_model())
    x, y = batches(0, dist.get_rank(), dist.get_world_size())
    nn.functional.mse_loss(model(x), y).backward()
    params = list(model.parameters())
    grads = [p.grad for p in params]
    clean = all_finite(grads, params)
    if dist.get_rank() == 1: local_tensor(grads[0]).view(-1)[0] = float('inf')
    return [clean, all_finite(grads, params)]


def load_checkpoint(model:nn.Module, opt, ckpt:str):
    "Model and optimizer from a `torch.distributed.checkpoint` directory, laid out as `model` is"
    import torch.distributed.checkpoint as dcp
    from fastxtend_optim.distributed import load_sharded_state_dict
    sd = {'model': model.state_dict()}
    dcp.load(sd, checkpoint_id=ckpt, no_dist=not dist.is_initialized())
    model.load_state_dict(sd['model'])
    load_sharded_state_dict(opt, ckpt)


def checkpoint_case(name:str, path:str, ckpt:str) -> list[torch.Tensor]:
    "Half the sharded run, saved to `ckpt`; a fresh sharded model (other weights) and optimizer load it and finish"
    import torch.distributed.checkpoint as dcp
    from fastxtend_optim.distributed import sharded_state_dict
    model = shard_model(make_model())
    opt = make_opt(name, path, model)
    train(model, opt, name, range(STEPS // 2), True)
    dcp.save({'model': model.state_dict(), 'optim': sharded_state_dict(opt)}, checkpoint_id=ckpt)
    model = shard_model(make_model(seed=1))
    opt = make_opt(name, path, model)
    load_checkpoint(model, opt, ckpt)
    train(model, opt, name, range(STEPS // 2, STEPS), True)
    return whole_params(model, opt, True)


UPSHARD_CASES = [('adam', 'foreach'), ('adam', 'eightbit'), ('lars', 'fused'), ('ranger', 'native'), ('muon', 'foreach'),
                 ('schedulefree_adamw', 'fused')]

def upshard_case(name:str, path:str, ckpt:str) -> list[torch.Tensor]:
    "Half the run in one process (rank 0, whole batches, saved without collectives), the rest sharded on every rank"
    import torch.distributed.checkpoint as dcp
    from fastxtend_optim.distributed import sharded_state_dict
    if dist.get_rank() == 0:
        model = make_model()
        opt = make_opt(name, path, model)
        train(model, opt, name, range(STEPS // 2), False)
        dcp.save({'model': model.state_dict(), 'optim': sharded_state_dict(opt)}, checkpoint_id=ckpt, no_dist=True)
    dist.barrier()
    model = shard_model(make_model(seed=1))
    opt = make_opt(name, path, model)
    load_checkpoint(model, opt, ckpt)
    train(model, opt, name, range(STEPS // 2, STEPS), True)
    return whole_params(model, opt, True)


class ComplexLinear(nn.Module):
    "One complex (4, 3) weight: its state is a real view (4, 3, 2), Lookahead's slow copy complex (4, 3)"
    def __init__(self, seed:int):
        super().__init__()
        torch.manual_seed(seed)
        self.w = nn.Parameter(torch.randn(4, 3, dtype=torch.cfloat))
    def forward(self, x): return (x.to(torch.cfloat) @ self.w.mT).abs().sum(-1, keepdim=True)


def restore_setups():
    """(module maker, optimizer maker) whose state is easy to lay out wrongly: a (100,) bias beside percentile
    clipping's (100,) history, and a complex weight under Lookahead"""
    from fastxtend_optim.adam import Adam
    from fastxtend_optim.lookahead import Lookahead
    bias_100 = lambda seed: (torch.manual_seed(seed), nn.Sequential(nn.Linear(3, 100), nn.Linear(100, 1)))[1]
    return {'hist_beside_bias': (bias_100, lambda ps: Adam(ps, lr=1e-2, percentile_clipping=90)),
            'complex_lookahead': (ComplexLinear, lambda ps: Lookahead(Adam(ps, lr=1e-2), k=100))}


def state_restored_case(setup:str, ckpt:str) -> bool:
    "3 sharded steps, saved; a fresh sharded module and optimizer load it: is every rank's state exactly as saved?"
    import torch.distributed.checkpoint as dcp
    from fastxtend_optim.distributed import sharded_state_dict, load_sharded_state_dict
    make_module, make = restore_setups()[setup]
    model = shard_model(make_module(0))
    opt = make(list(model.parameters()))
    for step in range(3):
        x, y = batches(step, dist.get_rank(), dist.get_world_size())
        nn.functional.mse_loss(model(x[:, :3]), y).backward(); opt.step(); opt.zero_grad()
    dcp.save({'optim': sharded_state_dict(opt)}, checkpoint_id=ckpt)
    fresh = shard_model(make_module(1))
    loaded = make(list(fresh.parameters()))
    load_sharded_state_dict(loaded, ckpt)
    same = lambda a, b: torch.equal(a, b) if torch.is_tensor(a) else a == b
    return all(s.keys() == t.keys() and all(same(s[k], t[k]) for k in s)
               for s, t in zip(opt.state_dict()['state'], loaded.state_dict()['state']))



def resume_case(name:str, path:str, ckpt:str, load_path:str|None=None) -> list[torch.Tensor]:
    "The second half of a sharded run, from its checkpoint, in one process (on `load_path`, by default `path`)"
    model = make_model(seed=1)
    opt = make_opt(name, load_path or path, model)
    load_checkpoint(model, opt, ckpt)
    train(model, opt, name, range(STEPS // 2, STEPS), False)
    return whole_params(model, opt, False)


def checkpoint_dir(out:str, name:str, path:str) -> str: return os.path.join(os.path.dirname(out), f'dcp-{name}-{path}')


# fastai: the digits Learner through `learn.distrib_ctx()` (Accelerate's DDP), or in one process on the same batches
RANK_BS, WORLD = 32, 2

def digits_items() -> list:
    "The digits training items, cut to whole global batches, in the order one process must see them"
    from fastxtend_optim.demo import digits_dls
    items = list(digits_dls(bs=RANK_BS).train.dataset)
    per_rank = len(items) // WORLD // RANK_BS * RANK_BS
    return items[:per_rank * WORLD]

def one_process_order(items:list) -> list:
    "fastai's DistributedDL gives rank r the r-th contiguous part: global batch k is every rank's k-th batch"
    half = len(items) // WORLD
    return [items[r * half + k * RANK_BS + i] for k in range(half // RANK_BS) for r in range(WORLD)
            for i in range(RANK_BS)]

def digits_learner_for(name:str, path:str, distributed:bool, **extra):
    from fastai.basics import Learner, DataLoaders, DataLoader, CrossEntropyLossFlat
    from fastxtend_optim.distributed import BackendBroadcast  # fastai.distributed's Learner.distrib_ctx comes with it
    from fastxtend_optim.demo import body_head_splitter
    items = digits_items()
    if not distributed: items = one_process_order(items)
    bs = RANK_BS if distributed else RANK_BS * WORLD
    dls = DataLoaders(DataLoader(items, bs=bs, shuffle=False, drop_last=True), DataLoader(items[:64], bs=64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU()), nn.Linear(32, 10))
    spec, kw = OPTIMIZERS[name], dict({**PATH_KW, **LOWBIT_KW}[path], **extra)
    kw.pop('min_8bit_size', None)
    cbs = (spec['cbs']() if 'cbs' in spec else []) + ([AllLowBit()] if 'state_bits' in kw else [])
    if distributed: cbs.append(BackendBroadcast())  # fastai's DistributedDL broadcasts on CUDA; gloo runs on the CPU
    return Learner(dls, model, loss_func=CrossEntropyLossFlat(), opt_func=spec['partial'](**kw), splitter=body_head_splitter,
                   cbs=cbs), spec

def fit_digits(learn, spec, epochs:int=1):
    with learn.no_bar(), learn.no_logging():
        if spec.get('fit') == 'fit': learn.fit(epochs, spec['lr'])
        else: learn.fit_one_cycle(epochs, spec['lr'])

def fastai_case(name:str, path:str, distributed:bool, rounding:str|None=None, micro:int=1) -> list[torch.Tensor]:
    """One epoch; with `rounding`, in pure bf16 (`CastInputs`) with Kahan summation or stochastic rounding; with
    `micro` > 1, that many batches accumulated into the optimizer's state per step (`n_acc` counts a rank's samples)"""
    learn, spec = digits_learner_for(name, path, distributed, **(ROUNDING_KW[rounding] if rounding else {}))
    if micro > 1:
        from fastxtend_optim.release import OptimizerAccumulation
        learn.add_cb(OptimizerAccumulation(micro * RANK_BS * (1 if distributed else WORLD)))
    if rounding:
        from fastxtend_optim.lowprec import CastInputs
        learn.model.bfloat16()
        learn.add_cb(CastInputs())
    if distributed:
        with learn.distrib_ctx(sync_bn=False, cpu=True): fit_digits(learn, spec)
    else: fit_digits(learn, spec)
    return [p.detach().clone() for p in learn.model.parameters()]

class AllLowBit(Callback):
    "Every tensor's state at the Learner's `state_bits` (the digits model's tensors are all small)"
    def before_fit(self):
        opt = self.learn.opt
        opt.set_state_bits([p for p, *_ in opt.all_params()], opt.hypers[0]['state_bits'])

ACCUMULATION_PATHS = ('foreach', 'fused')
ACCUMULATION_CASES = [(n, p) for n in ('adam', 'lion') for p in ACCUMULATION_PATHS]
LOWBIT_FASTAI = [('adam', 'fused8'), ('lion', 'fused4'), ('lamb', 'fused8')]

def fastai_cases() -> list[tuple[str, str]]:
    return [(n, p) for n in OPTIMIZERS for p in ('native', 'foreach', 'fused', 'eightbit') if has_path(n, p)]

def learner_resume_case(path:str, out:str) -> dict:
    "Adam: 2 epochs of `fit` whole, and 1 epoch, `Learner.save` (rank 0), `load` on every rank, 1 more epoch"
    from fastxtend_optim.profiler import Profiler
    whole, spec = digits_learner_for('adam', path, True)
    with whole.distrib_ctx(sync_bn=False, cpu=True), whole.no_bar(), whole.no_logging(): whole.fit(2, 1e-3)
    first, _ = digits_learner_for('adam', path, True)
    first.path = type(first.path)(out).parent
    with first.distrib_ctx(sync_bn=False, cpu=True), first.no_bar(), first.no_logging():
        first.fit(1, 1e-3); first.save(f'resume_{path}')
    dist.barrier()
    second, _ = digits_learner_for('adam', path, True)
    second.path = first.path
    second.load(f'resume_{path}')
    second.add_cb(Profiler(warmup=1))
    with second.distrib_ctx(sync_bn=False, cpu=True), second.no_bar(), second.no_logging(): second.fit(1, 1e-3)
    return dict(whole=[p.detach().clone() for p in whole.model.parameters()],
                resumed=[p.detach().clone() for p in second.model.parameters()],
                steps=second.opt.state[next(iter(second.model.parameters()))]['step'],
                profiled=len(second.profiler.durations.get('opt_step', [])))

def release_refusal_case() -> str:
    "GradientRelease under DDP: `fit` must refuse it before any step (the message), weights untouched"
    from fastxtend_optim.release import GradientRelease
    learn, _ = digits_learner_for('adam', 'foreach', True)
    learn.add_cb(GradientRelease())
    start = [p.detach().clone() for p in learn.model.parameters()]
    try:
        with learn.distrib_ctx(sync_bn=False, cpu=True), learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    except ValueError as e:
        moved = any(not torch.equal(a, b) for a, b in zip(start, learn.model.parameters()))
        return f'{e} (weights moved: {moved})'
    return 'not refused'

def gather_to_rank0(results:dict, out:str):
    "Every rank's results, saved by rank 0 as a list indexed by rank"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    if dist.get_rank() == 0: torch.save(everyone, out)

def guarded(fn, *args, **kwargs):
    try: return fn(*args, **kwargs)
    except Exception as e: return f'{type(e).__name__}: {e}'

def main(mode:str, out:str):
    dist.init_process_group('gloo')
    if mode == 'fsdp':
        results = {(n, p): guarded(run_case, n, p, True) for n, p in cases()}
        results.update({('all_reduces', n, p): guarded(all_reduces_per_step, n, p) for n, p in cases()})
        results['finite'] = guarded(finite_flags)
        results.update({('accumulation', n, p): guarded(run_case, n, p, True, micro=2) for n, p in ACCUMULATION_CASES})
        results.update({('rounding', n, p, r): guarded(rounding_case, n, p, r, True) for n, p, r in ROUNDING_CASES})
        results.update({('wide', n): guarded(wide_case, n, True, **kw) for n, kw in WIDE_CASES})
        results.update({(n, p): guarded(run_case, n, p, True) for n, p in LOWBIT_CASES})
        results.update({('all_reduces', n, p): guarded(all_reduces_per_step, n, p) for n, p in LOWBIT_CASES})
        for n, p, kw in REDUCTION_CASES:
            results['all_reduces', n, p, *kw] = guarded(all_reduces_per_step, n, p, **kw)
            results['options', n, p, *kw] = guarded(run_case, n, p, True, **kw)
    elif mode == 'fastai':
        results = {(n, p): guarded(fastai_case, n, p, True) for n, p in fastai_cases() + LOWBIT_FASTAI}
        results.update({('rounding', n, p, r): guarded(fastai_case, n, p, True, r) for n, p, r in ROUNDING_CASES})
        results['release_refused'] = guarded(release_refusal_case)
        results.update({('accumulation', p): guarded(fastai_case, 'adam', p, True, micro=2) for p in ACCUMULATION_PATHS})
        results.update({('resume', p): guarded(learner_resume_case, p, out) for p in ('foreach', 'fused', 'eightbit')})
    elif mode == 'dcp':
        results = {(n, p): guarded(checkpoint_case, n, p, checkpoint_dir(out, n, p)) for n, p in cases() + LOWBIT_CASES}
        results.update({('upshard', n, p): guarded(upshard_case, n, p, checkpoint_dir(out, f'one-{n}', p))
                        for n, p in UPSHARD_CASES})
        results.update({('restored', k): guarded(state_restored_case, k, checkpoint_dir(out, k, 'restored'))
                        for k in restore_setups()})
    else: raise SystemExit(f'unknown mode {mode!r}')
    gather_to_rank0(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__': main(*sys.argv[1:])
