"""Shared helpers: a deterministic multi-tensor model and a loop that steps an optimizer on it.

Every test runs once per device in `--devices` (default cpu,cuda; env FXO_TEST_DEVICES). A cuda case is skipped, and
counted as skipped, where torch sees no CUDA device; inside one, torch's default device is CUDA, so the tensors a
test makes live there. Random values come from CPU generators and are then moved, so both devices start alike.
`@pytest.mark.cpu_only` (or a module in `CPU_ONLY_MODULES`) keeps a test to the CPU, `cuda_only` to CUDA."""
import io, os
import pytest
import torch
from fastxtend_optim.demo import PATH_FUNCS as PATH_KWARGS

DEVICES = ('cpu', 'cuda')
CPU_ONLY_MODULES = {  # whole modules about the CPU: see CONTRIBUTING.md
    'test_bench.py': 'runs fxo-bench on the CPU, in subprocesses and in-process with device cpu',
    'test_models.py': "runs fxo-bench's CPU-sized models, in subprocesses",
    'test_distributed.py': 'runs process groups with gloo, the CPU backend, in torchrun subprocesses'}


def pytest_addoption(parser):
    parser.addoption('--devices', default=os.environ.get('FXO_TEST_DEVICES', ','.join(DEVICES)),
                     help='comma-separated devices each test runs on (default: cpu,cuda; env FXO_TEST_DEVICES)')


def pytest_configure(config):
    config.addinivalue_line('markers', 'cpu_only(reason): run this test on the CPU alone')
    config.addinivalue_line('markers', 'cuda_only: run this test on CUDA alone (skipped without it)')


def devices_for(node, devices) -> list[str]:
    "The devices `node` runs on, of `devices`"
    if node.get_closest_marker('cpu_only') or node.path.name in CPU_ONLY_MODULES: return [d for d in devices if d == 'cpu']
    if node.get_closest_marker('cuda_only'): return [d for d in devices if d == 'cuda']
    return list(devices)


def pytest_generate_tests(metafunc):
    devices = [d.strip() for d in metafunc.config.getoption('devices').split(',') if d.strip()]
    unknown = set(devices) - set(DEVICES)
    if unknown: raise pytest.UsageError(f'--devices: unknown {sorted(unknown)}; choose from {list(DEVICES)}')
    metafunc.parametrize('device', devices_for(metafunc.definition, devices), indirect=True)


@pytest.fixture(autouse=True)
def device(request):
    "The test's device; on 'cuda', torch's default device for the test's duration"
    dev = getattr(request, 'param', 'cpu')
    if dev == 'cpu':  # the default already: no device context, whose overhead every torch call would pay
        yield dev
        return
    if not torch.cuda.is_available(): pytest.skip('CUDA is not available')
    previous = torch.get_default_device()
    torch.set_default_device(dev)
    try: yield dev
    finally: torch.set_default_device(None if previous.type == 'cpu' else previous)


def randn(*shape, generator, dtype=torch.float32) -> torch.Tensor:
    "`torch.randn` drawn from a CPU `generator`, moved to the default device: the same values on every device"
    return torch.randn(*shape, generator=generator, dtype=dtype, device='cpu').to(torch.get_default_device())


def make_params(seed=0, shapes=((64, 32), (32,), (5000,), (4097,), (10, 64), (10,)), dtype=torch.float32):
    "Leaf tensors of varied sizes: some below bitsandbytes' 4096-element 8-bit threshold, one a partial block"
    g = torch.Generator().manual_seed(seed)
    return [randn(s, generator=g).to(dtype).requires_grad_() for s in shapes]


def set_grads(params, step, seed=1):
    "A gradient that depends on the parameter (pull toward 0.5) plus fixed per-step noise"
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    for p in params:
        noise = randn(p.shape, generator=g).to(p.device, p.dtype)
        p.grad = (p.detach() - 0.5) * 0.1 + noise


def run(opt, params, steps, start=0):
    "Step `opt` for `steps` steps with the gradients of `set_grads`"
    for i in range(start, start + steps):
        set_grads(params, i)
        opt.step()
    return [p.detach().clone() for p in params]


def assert_schedules_compile_nothing(opt, params, hypers:dict, steps:int=3):
    "Two fused steps, then `hypers` set (in order) and `steps` more: the kernels of the first steps serve them all"
    from torch._dynamo.utils import counters
    run(opt, params, 2)
    compiled = counters['stats']['unique_graphs']
    for k, v in hypers.items(): opt.set_hyper(k, v)
    run(opt, params, steps, start=2)
    assert counters['stats']['unique_graphs'] == compiled


def gappy_run(opt, params, steps):
    "Like `run`, but tensor 2 has no gradient on some steps: it must not move then, and its step count lags"
    for i in range(steps):
        set_grads(params, i)
        if i % 7 in (2, 3, 4): params[2].grad = None
        before = params[2].detach().clone()
        opt.step()
        if params[2].grad is None: assert torch.equal(params[2], before)
    return [p.detach().clone() for p in params]


def frozen_run(opt, params, steps=20, frozen=8, step=None):
    """Step `steps` times while the first group (`params[:3]`) has no gradient for the first `frozen` steps; `step(i)`
    replaces `opt.step()` where given (e.g. to step a second, late-built reference too)"""
    for i in range(steps):
        set_grads(params, i)
        if i < frozen:
            for p in params[:3]: p.grad = None
        step(i) if step is not None else opt.step()
    return [p.detach().clone() for p in params]


def held_weights(opt, params) -> list[torch.Tensor]:
    "The weights `opt` holds, in fp32: each 16-bit weight plus its Kahan compensation where it has one"
    from fastxtend_optim.lowprec import KAHAN_KEY
    return [p.detach().float() + opt.state[p][KAHAN_KEY].float() if KAHAN_KEY in opt.state[p] else p.detach().float()
            for p in params]


def bf16_gap(make, steps=8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """bf16 weights and the same run in fp32 (`make(params)` builds the optimizer, with its default Kahan summation),
    per tensor: the mean gap between the weights they hold, the mean distance the fp32 weights travelled, the size"""
    lo, hi = make_params(dtype=torch.bfloat16), make_params()
    for p, q in zip(lo, hi): q.data = p.data.float()
    start = [q.detach().clone() for q in hi]
    opt = make(lo)
    low = run(opt, lo, steps)
    assert all(x.dtype == torch.bfloat16 and x.isfinite().all() for x in low)
    full = run(make(hi), hi, steps)
    mean_abs = lambda xs: torch.stack([x.abs().mean() for x in xs]).cpu()
    return (mean_abs([x - y for x, y in zip(held_weights(opt, lo), full)]), mean_abs([y - s for y, s in zip(full, start)]),
            torch.tensor([float(s.numel()) for s in start]))


def assert_bf16_tracks_fp32(make, steps=8, share=0.02, tensor_share=0.3):
    """bf16 weights with Kahan summation (the default) end within `share` of the fp32 weights' travel, on average over
    all weights, and within `tensor_share` of it in each tensor. Each step the pair holds the weight within ~2**-17 |w|,
    and 16-bit state is stochastically rounded (a bf16 ulp of m or v, 2**-9 relative, that averages out). Measured on
    every optimizer and path (3, 6, 8 and 12 steps): <= 0.40% over all weights (5 times below `share`), <= 8.7% in one
    tensor (the 10-element one, RMSProp and Adagrad; 3.4 times below `tensor_share`); rounded to nearest, bf16 weights
    miss 9% to 97% of the travel. Weights that never move miss all of it: a whole run that does not step (its travel
    is 0), a bf16 run that does not, or one tensor that does not (which the average alone would hide: the 10-element
    tensor is 0.1% of the weights). The travel is real: > 5e-5 on average (measured >= 1.0e-4) and > 1e-5 in each
    tensor (measured >= 4.4e-5), against ~6e-6 that a pair can miss at the weights' mean |w| of 0.8"""
    gaps, travels, sizes = bf16_gap(make, steps)
    gap, travel = (gaps * sizes).sum() / sizes.sum(), (travels * sizes).sum() / sizes.sum()
    assert travel > 5e-5 and gap <= share * travel, (gap, travel)
    assert (travels > 1e-5).all() and (gaps <= tensor_share * travels).all(), (gaps / travels, travels)


def lockstep_absmax(eight, full, a, b, steps):
    """Step an 8-bit and a full-precision optimizer side by side; returns the largest `absmax1` of the 8-bit
    tensors and half the widest gap of bitsandbytes' signed map, the two numbers the quantization bounds need"""
    import bitsandbytes.functional as BF
    absmax = 0.
    for i in range(steps):
        run(eight, a, 1, start=i)
        run(full, b, 1, start=i)
        absmax = max([absmax] + [eight.state[p]['absmax1'].max().item() for p in a if p.numel() >= 4096])
    return absmax, ((BF.create_dynamic_map(signed=True).sort().values.diff()).max() / 2).item()


def assert_matches_reference(opt_fn, ref_fn, path, steps=60, atol=1e-6, **kwargs):
    "`opt_fn(params, path, **kwargs)` and the reference `ref_fn(params, **kwargs)` end within `atol`, and moved"
    ours, ref = make_params(), make_params()
    start = [p.detach().clone() for p in ours]
    opt = opt_fn(ours, path, **kwargs)
    got = run(opt, ours, steps)
    assert opt.path == path
    assert_close_lists(got, run(ref_fn(ref, **kwargs), ref, steps), atol=atol)
    assert max((a - b).abs().max() for a, b in zip(got, start)) > 0.05  # the weights did travel


def assert_paths_match_native(opt_fn, paths=('fused', 'foreach'), steps=60, atol=1e-6, **kwargs):
    "Each of `paths` ends within `atol` of the native path, over the two-group model, and stayed on its path"
    a = make_params()
    native = run(fx_groups(opt_fn, a, 'native', **kwargs), a, steps)
    for path in paths:
        ps = make_params()
        opt = fx_groups(opt_fn, ps, path, **kwargs)
        assert_close_lists(run(opt, ps, steps), native, atol=atol)
        assert opt.path == path  # no silent fallback from the fused path


LRS = (1e-3, 3e-3)
NO_WD = (1, 5)  # indexes of `make_params` that get fastai's do_wd=False


def two_groups(params):
    "fastai param lists: two groups"
    return [params[:3], params[3:]]


def fx_groups(opt_fn, params, path, no_wd=NO_WD, **kwargs):
    "`opt_fn` over two param groups with lrs `LRS`; `no_wd` indexes get fastai's do_wd=False"
    opt = opt_fn(two_groups(params), lr=LRS[1], **PATH_KWARGS.get(path, {}), **kwargs)
    opt.set_hyper('lr', list(LRS))
    for i in no_wd: opt.state[params[i]]['do_wd'] = False
    return opt


def torch_groups(params, wd, no_wd=NO_WD, wd_key='weight_decay'):
    "The same grouping as `fx_groups`, as torch.optim param groups"
    groups = []
    for lr, idx in zip(LRS, (range(0, 3), range(3, 6))):
        for decay in (True, False):
            ps = [params[i] for i in idx if (i not in no_wd) == decay]
            if ps: groups.append({'params': ps, 'lr': lr, wd_key: wd if decay else 0.})
    return groups


def roundtrip(obj):
    "Save with torch.save and reload with weights_only=True, as fastai's Learner.load does"
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def assert_close_lists(a, b, atol, rtol=0.):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
