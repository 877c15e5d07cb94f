from __future__ import annotations
import itertools, math, types, warnings
from dataclasses import dataclass
from typing import Callable
import torch
from torch import Tensor

BLOCK = 256

@dataclass(frozen=True)
class FusedSpec:
    "An optimizer's update on the fused path: element-wise math, and the scalars it needs each step"
    update: Callable  # (p, g, **state, **scalars) -> {'p': new p, state key: new value}; element-wise torch ops
    scalars: Callable  # (hyper, FusedGroup) -> {name: float (group-wide), 1-D tensor (one per tensor) or bool}

@dataclass
class FusedGroup:
    "What an optimizer's `scalars` sees of a tensor group on the fused path"
    params: list[Tensor]
    grads: list[Tensor]
    states: list[dict]
    grad_scales: Tensor  # percentile clipping's factor per tensor (ones when off)
    p_scale: float       # decoupled weight decay's factor on the weights (1 when none)
    l2: float            # L2 weight decay added to the gradients (0 when none)

    def effective_grads(self) -> list[Tensor]:
        "The gradients the update sees: clipped, plus L2 weight decay (new tensors unless both are off)"
        grads = self.grads
        if not bool((self.grad_scales == 1).all()): grads = torch._foreach_mul(grads, list(self.grad_scales.unbind()))
        return torch._foreach_add(grads, self.params, alpha=self.l2) if self.l2 else grads

def _blocks(p:Tensor) -> int: return math.ceil(p.numel() / BLOCK)

class _CudaBytes:
    "CUDA memory described by `__cuda_array_interface__`, holding on to the tensor that owns it"
    def __init__(self, owner:Tensor, ptr:int, nbytes:int):
        self.owner = owner
        self.__cuda_array_interface__ = dict(shape=(nbytes,), typestr='|u1', data=(ptr, False), version=2)

def own_storage_view(buf:Tensor, start:int, shape) -> Tensor:
    "`buf`'s elements from `start`, shaped `shape`, in a storage of their own that keeps `buf` alive"
    numel, size = math.prod(shape), buf.element_size()
    if numel == 0: return buf.new_zeros(shape)
    if buf.device.type == 'cpu':
        raw = buf.view(-1).view(torch.uint8).numpy()[start * size:(start + numel) * size]
        return torch.frombuffer(raw, dtype=buf.dtype).view(shape)
    if buf.device.type == 'cuda':
        raw = _CudaBytes(buf, buf.data_ptr() + start * size, numel * size)
        return torch.as_tensor(raw, device=buf.device).view(buf.dtype).view(shape)
    return buf.view(-1)[start:start + numel].view(shape)

class FusedLayout:
    "One tensor group's weights, gradients and state in `(blocks, BLOCK)` buffers; each tensor is a view of its rows"
    def __init__(self, params:list[Tensor], states:list[dict], state_keys:tuple):
        self.params, self.state_keys = list(params), tuple(state_keys)
        self.index = {id(p): i for i, p in enumerate(self.params)}
        counts = [_blocks(p) for p in self.params]
        self.starts = [0, *itertools.accumulate(counts)]
        p0 = self.params[0]
        self.block_member = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)).to(p0.device)
        self.bufs = {k: p0.new_zeros(self.starts[-1], BLOCK) for k in ('p', 'g', *self.state_keys)}
        self.views = {k: [self._view(buf, i) for i in range(len(self.params))] for k, buf in self.bufs.items()}
        self.views['p'] = [own_storage_view(self.bufs['p'], self.starts[i] * BLOCK, p.shape) for i, p in enumerate(self.params)]
        for i, (p, state) in enumerate(zip(self.params, states)):
            self.views['p'][i].copy_(p.detach())
            p.data = self.views['p'][i]
            self.sync(i, p, {k: v for k, v in state.items() if k in self.state_keys})
            for k in self.state_keys:
                if k in state: state[k] = self.views[k][i]
        self.ptrs = [p.data_ptr() for p in self.params]

    def _view(self, buf:Tensor, i:int) -> Tensor:
        p = self.params[i]
        return buf.view(-1)[self.starts[i] * BLOCK:][:p.numel()].view(p.shape)

    def sync(self, i:int, p:Tensor, state:dict):
        "Make member `i`'s gradient and state views of the buffers, copying in what was replaced"
        if p.grad is not None and p.grad is not self.views['g'][i]:
            self.views['g'][i].copy_(p.grad)
            p.grad = self.views['g'][i]
        for k in self.state_keys:
            view, cur = self.views[k][i], state.get(k)
            if cur is view: continue
            if cur is None: view.zero_()
            else: view.copy_(cur)
            state[k] = view

    def holds(self, params:list[Tensor]) -> bool:
        "Whether every tensor of `params` is a member and every member's weights still view the buffer"
        return all(id(p) in self.index for p in params) and all(p.data_ptr() == q for p, q in zip(self.params, self.ptrs))

    def runs(self, params:list[Tensor]) -> list[tuple[int, int]]:
        "Member index ranges `[a, b)` of consecutive members in `params` (in member order)"
        runs = []
        for i in (self.index[id(p)] for p in params):
            if runs and runs[-1][1] == i: runs[-1][1] = i + 1
            else: runs.append([i, i + 1])
        return [tuple(r) for r in runs]

def _fused_apply(update:Callable, bufs:dict, scalars:Tensor, scalar_names:tuple, vectors:Tensor,
                 vector_names:tuple, block_member:Tensor, consts:dict):
    "Clip, decay and `update` rows of the buffers in place: `scalars` are group-wide, `vectors` hold one value per member"
    s = dict(zip(scalar_names, scalars.unbind()))
    v = {k: vec[block_member][:, None] for k, vec in zip(vector_names, vectors.unbind())}
    wide = {k: b.float() if b.element_size() < 4 else b for k, b in bufs.items()}  # fp16/bf16: math in fp32
    p = wide['p']
    g = wide['g'] * v.pop('grad_scale') + s.pop('l2') * p
    state = {k: b for k, b in wide.items() if k not in ('p', 'g')}
    for k, new in update(p * s.pop('p_scale'), g, **state, **s, **v, **consts).items(): bufs[k].copy_(new)

_KERNELS = {}
def fused_kernel(update:Callable) -> Callable:
    "`_fused_apply` compiled for `update`, once per process; its own code object, so each update has its own cache"
    if update not in _KERNELS:
        name = f"fused_{getattr(update, '__name__', 'update')}"
        fn = types.FunctionType(_fused_apply.__code__.replace(co_name=name), _fused_apply.__globals__, name)
        _KERNELS[update] = torch.compile(fn, dynamic=True)
    return _KERNELS[update]

_UNAVAILABLE = {}
def fused_unavailable(device:torch.device) -> str|None:
    "Why torch.compile cannot build fused kernels on `device`'s type, or `None` when it can"
    kind = device.type
    if kind not in _UNAVAILABLE: _UNAVAILABLE[kind] = _compiler_missing(kind)
    return _UNAVAILABLE[kind]

def _compiler_missing(kind:str) -> str|None:
    if kind == 'cpu':
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            get_cpp_compiler()
        except Exception as e: return f'torch.compile finds no C++ compiler ({e})'
        return None
    if kind == 'cuda':
        from torch.utils._triton import has_triton
        return None if has_triton() else 'torch.compile needs Triton on CUDA, and it is not installed'
    return f'torch.compile builds no fused kernels for {kind!r} devices here'

def tensor_key(opt, p:Tensor) -> tuple:
    "The part of a tensor group's key that belongs to the tensor: device, dtype and fastai's `do_wd`"
    return (p.device, p.dtype, opt.state[p].get('do_wd', True))

def group_layout(opt, group) -> FusedLayout:
    "`group`'s layout, rebuilt when it lacks a member or a member's weights moved (`model.to`, `p.data = ...`)"
    layouts = opt.__dict__.setdefault('_fused_layouts', {})
    old = layouts.get(group.key)
    if old is not None and old.holds(group.params): return old
    members = {id(p) for p in group.params}
    if old is not None:
        if any(p.data_ptr() != q for p, q in zip(old.params, old.ptrs)): _warn_moved(opt)
        members |= {id(p) for p in old.params if tensor_key(opt, p) == group.key[1:]}
    params = [p for p in opt.param_lists[group.key[0]] if id(p) in members]
    layouts[group.key] = FusedLayout(params, [opt.state[p] for p in params], opt.state_keys)
    return layouts[group.key]

def _warn_moved(opt):
    if getattr(opt, '_warned_moved', False): return
    warnings.warn("a parameter's storage was replaced (`model.to`, `p.data = ...`, cuDNN's `flatten_parameters`): "
                  "the fused path copied it back into its buffers. If this happens every step, use the ForEach path.")
    opt._warned_moved = True

def _pack(values:list, device, width:int|None=None) -> Tensor:
    "Group-wide numbers as one fp32 vector, or per-tensor vectors as rows of one fp32 matrix of `width` columns"
    if width is None: return torch.tensor(values, dtype=torch.float32).to(device, non_blocking=True)
    return torch.stack([v.to(device=device, dtype=torch.float32) for v in values]) if values else \
        torch.zeros(0, width, device=device)

def fused_step(opt, group, grad_scales:list[Tensor]|None) -> bool:
    "Step `group` on the fused path, one compiled kernel per run of consecutive members; `False` if it cannot compile"
    device = group.params[0].device
    if fused_unavailable(device) is not None: return False
    layout = group_layout(opt, group)
    for p, s in zip(group.params, group.states): layout.sync(layout.index[id(p)], p, s)
    h, n = group.hyper, len(group.params)
    wd, decay = h.get('wd', 0.), group.do_wd and h.get('wd', 0.) != 0
    decouple = h.get('decouple_wd', True)
    scales = torch.ones(n, device=device) if grad_scales is None else torch.stack(grad_scales).float()
    fg = FusedGroup(group.params, [p.grad for p in group.params], group.states, scales,
                    p_scale=1 - h['lr'] * wd if decay and decouple else 1., l2=wd if decay and not decouple else 0.)
    named = dict(opt.fused.scalars(h, fg), grad_scale=scales, p_scale=fg.p_scale, l2=fg.l2)
    consts = {k: v for k, v in named.items() if isinstance(v, bool)}
    snames = tuple(k for k, v in named.items() if not isinstance(v, (bool, Tensor)))
    vnames = tuple(k for k, v in named.items() if isinstance(v, Tensor))
    members = torch.tensor([layout.index[id(p)] for p in group.params], device=device)
    per_member = torch.ones(len(vnames), max(2, len(layout.params)), device=device)  # 2+: no size-1 specialisation
    per_member[:, members] = _pack([named[k] for k in vnames], device, n)
    args = (_pack([float(named[k]) for k in snames], device), snames, per_member, vnames)
    return _run(opt, layout, args, consts, layout.runs(group.params))

def _run(opt, layout:FusedLayout, args:tuple, consts:dict, runs:list) -> bool:
    update, kernel = opt.fused.update, fused_kernel(opt.fused.update)
    for a, b in runs:
        rows = slice(layout.starts[a], layout.starts[b])
        bufs = {k: buf[rows] for k, buf in layout.bufs.items()}
        call = (update, bufs, *args, layout.block_member[rows], consts)
        if rows.stop - rows.start < 2 or fused_unavailable(layout.bufs['p'].device): _fused_apply(*call)
        else: _compiled_or_eager(kernel, call)
    return True

def _compiled_or_eager(kernel:Callable, call:tuple):
    "Run `kernel`; if compiling fails, record why (later steps take ForEach) and finish this step eagerly"
    from torch._dynamo.exc import BackendCompilerFailed
    from torch._inductor.exc import InductorError
    try: kernel(*call)
    except (BackendCompilerFailed, InductorError) as e:
        _UNAVAILABLE[call[1]['p'].device.type] = f'torch.compile failed: {str(e).splitlines()[0]}'
        _fused_apply(*call)
