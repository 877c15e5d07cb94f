"""The checks only a GPU can make: paged state, fp16 and bf16 through fastai's MixedPrecision, the profiler's CUDA
synchronisation, checkpoints between CUDA and the CPU, and 8-bit state memory. Every test is CUDA-only: without a
CUDA device each is collected once and counted as skipped. Run them all with `bash tools/gpu-check.sh OUT`."""
import io
import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastxtend_optim.adam import Adam, adam
from fastxtend_optim.lion import lion
from fastxtend_optim.eightbit import PAGED_MIN_NUMEL, BLOCKSIZE
from fastxtend_optim.demo import digits_dls, digits_learner
from fastxtend_optim.profiler import BATCH_PHASES
from conftest import make_params, run, fx_groups, assert_close_lists, randn, PATH_KWARGS

pytestmark = pytest.mark.cuda_only
PATHS = list(PATH_KWARGS)  # native foreach fused eightbit


def state_tensors(opt):
    return [v for p, *_ in opt.all_params() for k, v in opt.state[p].items() if torch.is_tensor(v)]


def big_params(n=2, numel=1 << 20, seed=0):
    "Large tensors (a multiple of the 8-bit block) with gradients, on the default device"
    g = torch.Generator().manual_seed(seed)
    ps = [randn(numel, generator=g).requires_grad_() for _ in range(n)]
    for p in ps: p.grad = randn(numel, generator=g) * 1e-2
    return ps


# --- paged state -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('optim_bits', [8, 32])
def test_paged_state_is_paged_and_steps_like_unpaged(optim_bits):
    """bitsandbytes marks its paged buffers (CUDA managed memory) with `is_paged` and `page_deviceid`; they sit outside
    torch's allocator, so creating them adds (almost) nothing to `memory_allocated`. Tensors below
    `PAGED_MIN_NUMEL` are not paged. Paged and unpaged state step alike, bit for bit"""
    def make():
        big, = big_params(1, numel=4 * PAGED_MIN_NUMEL)
        small = torch.zeros(1000, requires_grad=True)
        small.grad = torch.ones(1000)
        return [big, small]
    paged_ps, plain_ps = make(), make()
    grown = []
    for ps, paged in ((paged_ps, True), (plain_ps, False)):
        opt = Adam(ps, lr=1e-3, eightbit=True, optim_bits=optim_bits, is_paged=paged)
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        for _ in range(5): opt.step()
        torch.cuda.synchronize()
        grown.append(torch.cuda.memory_allocated() - before)
        big, small = (opt.state[p] for p in ps)
        for k in ('state1', 'state2'):
            assert getattr(big[k], 'is_paged', False) is paged, k
            if paged: assert big[k].page_deviceid == ps[0].device.index
            assert not getattr(small[k], 'is_paged', False)
    state_bytes = 2 * 4 * PAGED_MIN_NUMEL * (1 if optim_bits == 8 else 4)
    assert grown[1] >= state_bytes and grown[0] < 0.1 * state_bytes, grown
    assert_close_lists(paged_ps, plain_ps, atol=0.)


# --- mixed precision through a fastai Learner --------------------------------------------------------------------

class InfAt(Callback):
    "Make one parameter's gradient Inf at iteration `at`, and keep the weights and state as they were before the step"
    order = 5  # before MixedPrecision (10), whose before_step cancels a skipped step
    def __init__(self, at): self.at, self.seen = at, {}
    def _at(self, i): return self.training and self.epoch == 0 and self.iter == i
    def after_backward(self):
        if self._at(self.at): next(iter(self.model.parameters())).grad[0] = float('inf')
        self.seen['weights'] = [p.detach().clone() for p in self.model.parameters()]
        self.seen['state'] = [t.clone() for t in state_tensors(self.opt)]
        self.seen['steps'] = {id(p): s.get('step') for p, s in self.opt.state.items()}
    def after_batch(self):  # after MixedPrecision's after_step has updated the scale
        for i in (self.at - 1, self.at):
            if self._at(i): self.seen[f'scale{i - self.at}'] = self.learn.scaler.get_scale()
    def after_step(self):
        if not self._at(self.at): return
        self.seen['same_weights'] = all(torch.equal(a, b) for a, b in zip(self.model.parameters(), self.seen['weights']))
        self.seen['same_state'] = all(torch.equal(a, b) for a, b in zip(state_tensors(self.opt), self.seen['state'], strict=True))
        self.seen['same_steps'] = self.seen['steps'] == {id(p): s.get('step') for p, s in self.opt.state.items()}


@pytest.mark.parametrize('path', PATHS)
def test_fp16_grad_scaler_skips_the_inf_step_and_trains(path):
    "fp16 autocast with a GradScaler: the step with an Inf gradient changes neither weights nor state, and the scale halves"
    cb = InfAt(at=10)
    learn = digits_learner(lion(**PATH_KWARGS[path]), digits_dls(), cbs=[MixedPrecision(amp_mode='fp16'), cb])
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    assert next(learn.model.parameters()).is_cuda and learn.opt.path == path
    assert cb.seen['same_weights'] and cb.seen['same_state'] and cb.seen['same_steps']
    assert cb.seen['scale0'] == cb.seen['scale-1'] / 2
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in learn.model.parameters())
    with learn.no_bar(): assert float(learn.validate()[1]) > 0.85


@pytest.mark.parametrize('path', PATHS)
def test_bf16_autocast_trains_with_fp32_weights_and_state(path):
    learn = digits_learner(adam(**PATH_KWARGS[path]), digits_dls(), cbs=MixedPrecision(amp_mode='bf16'))
    with learn.no_bar(), learn.no_logging(): learn.fit_one_cycle(3, 3e-3)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert all(t.dtype in (torch.float32, torch.uint8) for t in state_tensors(learn.opt))
    with learn.no_bar(): assert float(learn.validate()[1]) > 0.85


# --- the profiler's CUDA synchronisation -------------------------------------------------------------------------

def timed_sleep(cycles:int) -> tuple:
    "Queue `torch.cuda._sleep(cycles)` between two CUDA events; returns the events"
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(); torch.cuda._sleep(cycles); end.record()
    return start, end


def gpu_sleep_cycles(ms:float) -> int:
    "Clock cycles of `torch.cuda._sleep` that keep the GPU busy about `ms` milliseconds, measured after a warm-up"
    x = torch.randn(4096, 4096)
    for _ in range(20): x @ x  # bring the clocks up
    start, end = timed_sleep(20_000_000)
    end.synchronize()
    return int(20_000_000 * ms / start.elapsed_time(end))


@pytest.mark.parametrize('sync', [True, False])
def test_profiler_sync_puts_slow_gpu_work_into_opt_step(sync):
    """A step that queues 20 ms of GPU work returns at once on the CPU. With the profiler's synchronisation (the
    default) that time lands in `opt_step`; without it, in whichever later phase waits for the GPU. The GPU time
    is read from CUDA events around the queued work, so clock changes do not matter"""
    cycles, events = gpu_sleep_cycles(20), []
    learn = digits_learner(lion(foreach=True), digits_dls()).profile(sync=sync)
    learn.create_opt()
    step = learn.opt.step
    learn.opt.step = lambda *a, **k: (step(*a, **k), events.append(timed_sleep(cycles)))[0]
    with learn.no_bar(), learn.no_logging(): learn.fit(1, 1e-3)
    torch.cuda.synchronize()
    slept = sorted(s.elapsed_time(e) for s, e in events)[len(events) // 2]  # ms, median
    batch_ms = learn.profiler.report().loc[list(BATCH_PHASES), 'mean_ms']
    assert slept >= 2, slept
    if sync: assert batch_ms.idxmax() == 'opt_step' and batch_ms['opt_step'] >= 0.8 * slept, (batch_ms, slept)
    else: assert batch_ms['opt_step'] < 0.5 * slept, (batch_ms, slept)  # the CPU did not wait
    assert learn.profiler.fit_seconds >= 0.8 * slept / 1000 * len(events)  # the GPU did


# --- checkpoints between CUDA and the CPU ------------------------------------------------------------------------

def save(opt, params) -> bytes:
    buf = io.BytesIO()
    torch.save({'opt': opt.state_dict(), 'params': [p.detach() for p in params]}, buf)
    return buf.getvalue()


def load(blob:bytes, device:str) -> dict:
    "As fastai's `Learner.load(device=...)` does: `torch.load(map_location=device)`, weights only"
    return torch.load(io.BytesIO(blob), map_location=device, weights_only=True)


@pytest.mark.parametrize('path', PATHS + ['paged'])
@pytest.mark.parametrize('src,dst', [('cuda', 'cpu'), ('cpu', 'cuda')])
def test_checkpoint_moves_between_cuda_and_cpu_and_continues(path, src, dst):
    """Adam on the two-group model: 10 steps on `src`, saved, loaded on `dst`, 10 more there. The loaded state equals
    the saved state, lives on `dst`, and the run continues as the `src` run does, within the two devices' rounding
    (fp32 paths: 1e-5; 8-bit: 5% of the distance the weights travel, bitsandbytes' CPU and CUDA kernels round apart)"""
    kw = dict(is_paged=True) if path == 'paged' else {}
    opt_path = 'eightbit' if path == 'paged' else path
    def make(device):  # tensor 2 is large enough to be paged
        with torch.device(device): ps = make_params(shapes=((64, 32), (32,), (2 * PAGED_MIN_NUMEL,), (4097,), (10, 64), (10,)))
        return ps, fx_groups(Adam, ps, opt_path, **(kw if device == 'cuda' else {}))
    a, opt_a = make(src)
    run(opt_a, a, 10)
    blob = save(opt_a, a)
    saved = [t.cpu().clone() for t in state_tensors(opt_a)]
    start = [p.detach().cpu().clone() for p in a]
    keep_going = [p.cpu() for p in run(opt_a, a, 10, start=10)]

    sd = load(blob, dst)
    b, opt_b = make(dst)
    with torch.no_grad():
        for p, w in zip(b, sd['params']): p.copy_(w)
    opt_b.load_state_dict(sd['opt'])
    for t, u in zip(state_tensors(opt_b), saved, strict=True):
        assert t.device.type == dst and torch.equal(t.cpu(), u)
    resumed = [p.cpu() for p in run(opt_b, b, 10, start=10)]
    assert opt_b.path == opt_path
    if opt_path == 'eightbit':
        travel = max((k - s).abs().max().item() for k, s in zip(keep_going, start))
        err = max((r - k).abs().max().item() for r, k in zip(resumed, keep_going))
        assert err <= 0.05 * travel, (err, travel)
    else: assert_close_lists(resumed, keep_going, atol=1e-5)


# --- 8-bit state memory ------------------------------------------------------------------------------------------

def state_memory(path, **kwargs):
    "Bytes the first step leaves allocated (the state) and its peak above the start, on 4 tensors of 1M elements"
    ps = big_params(4)
    opt = Adam(ps, lr=1e-3, **PATH_KWARGS[path], **kwargs)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    opt.step()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before, sum(p.numel() for p in ps)


def test_eightbit_state_is_a_quarter_of_fp32_plus_absmax():
    """Adam keeps two states per parameter: fp32 8 bytes, 8-bit 2 bytes plus two fp32 absmax per 256-element block
    (1/32 byte a parameter), so 8-bit is 0.254 of fp32. bitsandbytes' 32-bit state is fp32's 8 bytes. Peaks
    (`max_memory_allocated`) keep the same order"""
    fp32, fp32_peak, n = state_memory('native')
    q8, q8_peak, _ = state_memory('eightbit')
    q32, _, _ = state_memory('eightbit', optim_bits=32)
    assert abs(fp32 - 8 * n) <= 0.01 * 8 * n, fp32
    expected8 = 2 * n + 2 * 4 * n / BLOCKSIZE
    assert abs(q8 - expected8) <= 0.01 * expected8 + 4096, (q8, expected8)
    assert abs(q32 - 8 * n) <= 0.01 * 8 * n, q32
    assert q8_peak < fp32_peak
    print(f'\nAdam state on {n / 1e6:.1f}M params: fp32 {fp32 / n:.3f} B/param (peak {fp32_peak / n:.3f}), '
          f'8-bit {q8 / n:.3f} B/param (peak {q8_peak / n:.3f}), 8-bit/fp32 {q8 / fp32:.3f}')
