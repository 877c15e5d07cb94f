"""Time `opt.step()` for each path of fastxtend_optim's optimizers against their peers, as ratios of medians from one run.

    python bench/step_bench.py                 # ~22M parameters in 600 tensors (CPU default)
    python bench/step_bench.py --model small   # a quick check
    python bench/step_bench.py --opt adam      # one optimizer

Steps of all implementations are interleaved round by round, so machine noise hits them alike. The floor is the
bytes an update must move divided by the copy bandwidth measured in the same run.
"""
import argparse, importlib, statistics, time, warnings
import torch
import fastai.optimizer as fastai_optim
from fastai.optimizer import Optimizer as FastaiOptimizer, weight_decay as fastai_weight_decay
from fastxtend_optim.lion import Lion, lion_step
from fastxtend_optim.adam import Adam
from fastxtend_optim.lars import Lars

warnings.filterwarnings('ignore')

MODELS = {  # name: (blocks, width); each block is 12 tensors shaped like a transformer layer
    'default': (50, 192),   # 22.1M parameters, 600 tensors
    'small': (8, 64),       # 0.4M parameters, 96 tensors
    'large': (50, 768),     # 354M parameters, 600 tensors (GPU)
}


def model_shapes(blocks, width):
    w = width
    block = [(w,), (w,), (3*w, w), (3*w,), (w, w), (w,), (w,), (w,), (4*w, w), (4*w,), (w, 4*w), (w,)]
    return block * blocks


def make_params(shapes, device):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).to(device).requires_grad_() for s in shapes]
    for p in params: p.grad = torch.randn(p.shape, generator=g).to(device) * 1e-2
    return params


def fastai_lion_step(p, lr, beta1, beta2, grad_avg=None, **kwargs):
    "Our Lion math in fastai's own stepper signature, to time fastai's per-parameter `Optimizer` loop"
    if grad_avg is None: grad_avg = torch.zeros_like(p)
    lion_step(p.data, p.grad, lr, beta1, beta2, grad_avg)
    return {'grad_avg': grad_avg}
fastai_lion_step.defaults = dict(beta1=0.9, beta2=0.99)


def ours(opt_fn, **hypers):
    "Our three paths of `opt_fn`"
    return {f'fastxtend_optim {path}': (lambda ps, kw=kw: opt_fn(ps, **hypers, **kw))
            for path, kw in (('native', dict(foreach=False)), ('foreach', dict(foreach=True)),
                             ('eightbit', dict(eightbit=True)))}


def peer(impls, name, module, make):
    "Add a peer from an optional package, or say it is skipped"
    try: impls[name] = make(importlib.import_module(module))
    except ImportError: print(f'{module} not installed: {name} skipped')


def lion_impls():
    impls = ours(Lion, lr=1e-4, wd=0.1)
    impls['fastai Optimizer loop'] = lambda ps: FastaiOptimizer(ps, [fastai_weight_decay, fastai_lion_step], lr=1e-4, wd=0.1)
    peer(impls, 'lion-pytorch', 'lion_pytorch', lambda m: lambda ps: m.Lion(ps, lr=1e-4, weight_decay=0.1))
    peer(impls, 'bitsandbytes Lion8bit', 'bitsandbytes.optim',
         lambda m: lambda ps: m.Lion8bit(ps, lr=1e-4, weight_decay=0.1))
    return impls


def adam_impls():
    kw = dict(betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    impls = ours(Adam, lr=1e-4, wd=0.01)
    impls['fastai Adam'] = lambda ps: fastai_optim.Adam(ps, lr=1e-4, wd=0.01)
    impls['torch AdamW foreach'] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True, **kw)
    impls['torch AdamW fused'] = lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True, **kw)
    peer(impls, 'bitsandbytes AdamW8bit', 'bitsandbytes.optim', lambda m: lambda ps: m.AdamW8bit(ps, lr=1e-4, **kw))
    return impls


def lars_impls():
    impls = ours(Lars, lr=1e-2)
    impls['fastai Larc (clip=False)'] = lambda ps: fastai_optim.Larc(ps, lr=1e-2, clip=False)
    peer(impls, 'bitsandbytes LARS8bit', 'bitsandbytes.optim',
         lambda m: lambda ps: m.LARS8bit(ps, lr=1e-2, momentum=0.9, max_unorm=0.))
    return impls


# per fp32 parameter, the bytes an update must move: p read+write (8), g read (4), each state read+write (8);
# LARS must also read p and g once more for the norms that scale its update (8)
OPTIMIZERS = {'lion': (lion_impls, 20), 'adam': (adam_impls, 28), 'lars': (lars_impls, 28)}


def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000


def copy_bandwidth(device, numel=64 * 2**20, rounds=10):
    "Bytes per second of a large device-to-device copy (read + write)"
    src, dst = torch.randn(numel, device=device), torch.empty(numel, device=device)
    ms = statistics.median(timed(lambda: dst.copy_(src), device) for _ in range(rounds))
    return 2 * 4 * numel / (ms / 1000)


def bench_one(name, device, shapes, args, bandwidth):
    "Time every implementation of optimizer `name` and print the table"
    make_impls, bytes_per_param = OPTIMIZERS[name]
    numel = sum(torch.Size(s).numel() for s in shapes)
    opts = {impl: make(make_params(shapes, device)) for impl, make in make_impls().items()}
    for opt in opts.values():
        for _ in range(args.warmup): opt.step()
    times = {impl: [] for impl in opts}
    for _ in range(args.rounds):
        for impl, opt in opts.items(): times[impl].append(timed(opt.step, device))
    del opts
    floor = bytes_per_param * numel / bandwidth * 1000
    med = {impl: statistics.median(ts) for impl, ts in times.items()}
    base = med['fastxtend_optim foreach']
    print(f"\n{name} opt.step(), {numel/1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"floor: {bytes_per_param} B/param / measured copy bandwidth = {floor:.1f} ms\n")
    print('| implementation | ms | × ForEach | × floor |\n|---|---|---|---|')
    for impl, ms in med.items(): print(f'| {impl} | {ms:.1f} | {ms/base:.2f} | {ms/floor:.2f} |')


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--opt', nargs='+', choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument('--model', choices=MODELS, default='default')
    ap.add_argument('--rounds', type=int, default=15, help='timed steps per implementation')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = model_shapes(*MODELS[args.model])
    bandwidth = copy_bandwidth(device)
    for name in args.opt: bench_one(name, device, shapes, args, bandwidth)


if __name__ == '__main__':
    main()
