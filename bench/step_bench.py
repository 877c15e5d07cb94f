"""Time `opt.step()` for each path of fastxtend_optim's Lion against its peers, as ratios of medians from one run.

    python bench/step_bench.py                 # ~22M parameters in 600 tensors (CPU default)
    python bench/step_bench.py --model small   # a quick check

Steps of all implementations are interleaved round by round, so machine noise hits them alike. The floor is the
bytes an update must move divided by the copy bandwidth measured in the same run.
"""
import argparse, statistics, time, warnings
import torch
from fastai.optimizer import Optimizer as FastaiOptimizer, weight_decay as fastai_weight_decay
from fastxtend_optim.lion import Lion, lion_step

warnings.filterwarnings('ignore')

MODELS = {  # name: (blocks, width); each block is 12 tensors shaped like a transformer layer
    'default': (50, 192),   # 22.1M parameters, 600 tensors
    'small': (8, 64),       # 0.4M parameters, 96 tensors
    'large': (50, 768),     # 354M parameters, 600 tensors (GPU)
}
LION_BYTES = 20  # per fp32 element: p read+write, g read, m read+write


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


def implementations(device):
    "name -> factory(params) for every implementation that is installed"
    impls = {
        'fastxtend_optim native': lambda ps: Lion(ps, lr=1e-4, foreach=False),
        'fastxtend_optim foreach': lambda ps: Lion(ps, lr=1e-4, foreach=True),
        'fastxtend_optim eightbit': lambda ps: Lion(ps, lr=1e-4, eightbit=True),
        'fastai Optimizer loop': lambda ps: FastaiOptimizer(ps, [fastai_weight_decay, fastai_lion_step], lr=1e-4, wd=0.1),
    }
    try:
        import lion_pytorch
        impls['lion-pytorch'] = lambda ps: lion_pytorch.Lion(ps, lr=1e-4, weight_decay=0.1)
    except ImportError: print('lion-pytorch not installed: skipped')
    try:
        import bitsandbytes.optim as bnb
        impls['bitsandbytes Lion8bit'] = lambda ps: bnb.Lion8bit(ps, lr=1e-4, weight_decay=0.1)
    except ImportError: print('bitsandbytes not installed: skipped')
    return impls


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--model', choices=MODELS, default='default')
    ap.add_argument('--rounds', type=int, default=15, help='timed steps per implementation')
    ap.add_argument('--warmup', type=int, default=3)
    ap.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = ap.parse_args()
    device = torch.device(args.device)
    shapes = model_shapes(*MODELS[args.model])
    numel = sum(torch.Size(s).numel() for s in shapes)
    opts = {name: make(make_params(shapes, device)) for name, make in implementations(device).items()}
    for opt in opts.values():
        for _ in range(args.warmup): opt.step()
    times = {name: [] for name in opts}
    for _ in range(args.rounds):
        for name, opt in opts.items(): times[name].append(timed(opt.step, device))
    floor = LION_BYTES * numel / copy_bandwidth(device) * 1000
    med = {name: statistics.median(ts) for name, ts in times.items()}
    base = med['fastxtend_optim foreach']
    print(f"\nLion opt.step(), {numel/1e6:.1f}M parameters in {len(shapes)} tensors, {device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.rounds}")
    print(f"floor: {LION_BYTES} B/param / measured copy bandwidth = {floor:.1f} ms\n")
    print('| implementation | ms | × ForEach | × floor |\n|---|---|---|---|')
    for name, ms in med.items(): print(f'| {name} | {ms:.1f} | {ms/base:.2f} | {ms/floor:.2f} |')


if __name__ == '__main__':
    main()
