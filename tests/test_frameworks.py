"""The torch face in real trainers: Hugging Face `Trainer`, Lightning, Accelerate, and a plain loop with `GradScaler`.

Each trains a tiny model on the CPU, saves a checkpoint mid-run, resumes from it and compares with the uninterrupted
run. These need transformers and Lightning importable, so a torchvision that cannot load beside torch must not be
installed (`tools/install.sh dev` removes it; CONTRIBUTING.md says why)."""
import importlib.util, math
import pytest
import torch
from fastxtend_optim import torchface as fxt

pytestmark = pytest.mark.cpu_only(reason="the trainers run on the CPU (use_cpu, accelerator='cpu')")


@pytest.fixture(autouse=True, scope='module')
def _importable_torchvision_or_none():
    "Say what is wrong where a torchvision that cannot load is installed (transformers' own error hides it)"
    if importlib.util.find_spec('torchvision') is None: return
    try: import torchvision  # noqa: F401
    except Exception as e:
        pytest.fail(f'torchvision is installed but cannot import ({type(e).__name__}: {e}); transformers and Lightning '
                    'fail with it: `bash tools/install.sh dev` removes it (CONTRIBUTING.md)', pytrace=False)

V, T, N = 64, 16, 64  # vocabulary, sequence length, sequences


def chains(seed=0) -> torch.Tensor:
    "`N` token sequences, each a walk through one fixed random permutation of the vocabulary: learnable, unlike noise"
    g = torch.Generator().manual_seed(seed)
    perm, ids = torch.randperm(V, generator=g), torch.empty(N, T, dtype=torch.long)
    ids[:, 0] = torch.randint(0, V, (N,), generator=g)
    for t in range(1, T): ids[:, t] = perm[ids[:, t - 1]]
    return ids


def max_diff(a, b) -> float:
    return max((x.detach() - y.detach()).abs().max().item() for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- Hugging Face Trainer
HF_STEPS, HF_SAVE = 12, 6


class Tokens(torch.utils.data.Dataset):
    def __init__(self): self.ids = chains()
    def __len__(self): return len(self.ids)
    def __getitem__(self, i): return dict(input_ids=self.ids[i], labels=self.ids[i])


def tiny_gpt2():
    "A GPT-2-shaped model from its config (2 layers, width 32, vocabulary 64), random weights: nothing downloaded"
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=T, n_embd=32, n_layer=2, n_head=2, bos_token_id=0,
                                      eos_token_id=0, loss_type='ForCausalLM'))


def hf_args(out, **kw):
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=HF_STEPS, logging_steps=1,
                             save_strategy='steps', save_steps=HF_SAVE, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, log_level='error', **kw)


HF_KW = dict(lion=dict(lr=3e-3), adam=dict(lr=1e-2), adan=dict(lr=1e-2))


def hf_train(name, out, resume=None):
    "Our `name` on the fused path with a cosine schedule, given to the Trainer as `optimizers=(opt, scheduler)`"
    from transformers import Trainer, get_cosine_schedule_with_warmup
    model = tiny_gpt2()
    opt = fxt.torch_optimizer(name, model.parameters(), weight_decay=0.1, fused=True, **HF_KW[name])
    sched = get_cosine_schedule_with_warmup(opt, 2, HF_STEPS)
    trainer = Trainer(model=model, args=hf_args(out), train_dataset=Tokens(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=resume)
    assert opt.fx.path == 'fused'
    return trainer, model


def losses(trainer) -> list[float]: return [h['loss'] for h in trainer.state.log_history if 'loss' in h]


@pytest.mark.parametrize('name', ['lion', 'adam', 'adan'])
def test_hf_trainer_resumes_bitwise(name, tmp_path):
    """Resumed from the step-6 checkpoint, the run ends bit for bit on the uninterrupted one: the Trainer replays the
    seeded sampler's order and restores the RNG (GPT-2's dropout is on), the weights, our state dict and the scheduler,
    all fp32 on deterministic CPU kernels. The loss falls by more than 0.3 in 12 steps."""
    full, model = hf_train(name, tmp_path)
    ls = losses(full)
    assert len(ls) == HF_STEPS and sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.3, ls
    saved = torch.load(tmp_path / f'checkpoint-{HF_SAVE}' / 'optimizer.pt', weights_only=True)
    assert set(saved) >= {'state', 'param_groups'} and len(saved['state']) == len(list(model.parameters()))
    if name == 'adam': assert set(saved['state'][0]) == {'step', 'exp_avg', 'exp_avg_sq'}  # torch's names
    resumed, model2 = hf_train(name, tmp_path / 'resumed', resume=tmp_path / f'checkpoint-{HF_SAVE}')
    assert losses(resumed) == ls  # steps 7-12 computed again, 1-6 from the checkpoint's log
    assert max_diff(model.parameters(), model2.parameters()) == 0.


def test_hf_trainer_resume_needs_the_optimizer_state(tmp_path, monkeypatch):
    "The control for the bitwise resume: a resumed Adam whose saved state is not loaded ends elsewhere"
    full, model = hf_train('adam', tmp_path)
    monkeypatch.setattr(fxt.TorchFace, 'load_state_dict', lambda self, sd: None)
    _, model2 = hf_train('adam', tmp_path / 'resumed', resume=tmp_path / f'checkpoint-{HF_SAVE}')
    assert max_diff(model.parameters(), model2.parameters()) > 1e-3


def test_hf_trainer_builds_our_class(tmp_path):
    """`optimizer_cls_and_kwargs`: the Trainer builds our class over its own groups (no decay on biases and LayerNorm)
    and its own cosine schedule. A name for `optim=` is not offered: `TrainingArguments` takes only the members of its
    closed `OptimizerNames` enum"""
    from transformers import Trainer
    args = hf_args(tmp_path, learning_rate=3e-3, weight_decay=0.1, lr_scheduler_type='cosine', warmup_steps=2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=Tokens(),
                      optimizer_cls_and_kwargs=(fxt.Lion, dict(lr=3e-3, fused=True)))
    trainer.train()
    opt = trainer.optimizer
    opt = getattr(opt, 'optimizer', opt)  # accelerate's wrapper
    assert isinstance(opt, fxt.Lion) and opt.fx.path == 'fused'
    assert sorted(g['weight_decay'] for g in opt.param_groups) == [0., 0.1]
    assert [h['wd'] for h in opt.fx.hypers] == [g['weight_decay'] for g in opt.param_groups]
    lrs = [h['learning_rate'] for h in trainer.state.log_history if 'learning_rate' in h]
    cosine = [3e-3 * s / 2 if s < 2 else 3e-3 * 0.5 * (1 + math.cos(math.pi * (s - 2) / (HF_STEPS - 2)))
              for s in range(HF_STEPS)]
    assert lrs == pytest.approx(cosine, rel=1e-6)
    ls = losses(trainer)
    assert sum(ls[-3:]) / 3 < sum(ls[:3]) / 3 - 0.3, ls


# ---------------------------------------------------------------- a small next-token model for the other trainers
def bigram() -> torch.nn.Module:
    "An MLP over each token's embedding that predicts the next token: learns the chains' permutation in a few steps"
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(V, 32), torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, V))


def next_token_loss(net, ids) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(net(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten())


def token_loader(batch_size=16) -> torch.utils.data.DataLoader:
    """The chains, shuffled by a `DistributedSampler` of one replica: its order is a function of the seed and of the
    epoch (which the trainers set), so a run resumed at an epoch's end sees the batches the uninterrupted one saw"""
    ds = torch.utils.data.TensorDataset(chains())
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, sampler=sampler)


# ---------------------------------------------------------------- Lightning
PL_STEPS, PL_SAVE = 12, 8  # 4 batches an epoch: the checkpoint ends epoch 2


def pl_fit(out, save=None, resume=None):
    "Lion (fused) and torch's CosineAnnealingLR, stepped every batch, from `configure_optimizers`; Lightning clips"
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net, self.losses = bigram(), []
        def training_step(self, batch, i):
            loss = next_token_loss(self.net, batch[0])
            self.losses.append(loss.item())
            return loss
        def configure_optimizers(self):
            opt = fxt.Lion(self.parameters(), lr=3e-3, weight_decay=0.1, fused=True)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, PL_STEPS)
            return dict(optimizer=opt, lr_scheduler=dict(scheduler=sched, interval='step'))

    module = Module()
    callbacks = [ModelCheckpoint(dirpath=out, every_n_train_steps=save, save_top_k=-1)] if save else []
    trainer = L.Trainer(accelerator='cpu', devices=1, max_steps=PL_STEPS, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=bool(save), callbacks=callbacks,
                        gradient_clip_val=0.5)
    trainer.fit(module, token_loader(), ckpt_path=resume)
    opt = trainer.optimizers[0]
    assert isinstance(opt, fxt.Lion) and opt.fx.path == 'fused'
    return module, trainer


def test_lightning_resumes_bitwise(tmp_path, monkeypatch):
    """Resumed from the checkpoint at the end of epoch 2 (step 8), the run ends bit for bit on the uninterrupted one:
    Lightning restores the weights, our state dict and the scheduler, and the sampler's epoch gives the same order;
    nothing is random in training. (A checkpoint mid-epoch does not resume exactly: Lightning restarts a plain
    DataLoader's epoch, and says so.) The control: with the saved optimizer state not loaded, the run ends elsewhere"""
    full, trainer = pl_fit(tmp_path, save=4)
    assert len(full.losses) == PL_STEPS and full.losses[-1] < full.losses[0] - 0.3, full.losses
    ckpt = tmp_path / f'epoch=1-step={PL_SAVE}.ckpt'
    saved = torch.load(ckpt, weights_only=False)
    assert saved['loops']['fit_loop']['epoch_loop.batch_progress']['is_last_batch']
    assert len(saved['optimizer_states'][0]['state']) == len(list(full.parameters())) and saved['lr_schedulers'][0]['last_epoch'] == PL_SAVE
    resumed, trainer2 = pl_fit(tmp_path / 'resumed', resume=ckpt)
    assert resumed.losses == full.losses[PL_SAVE:]
    assert trainer2.lr_scheduler_configs[0].scheduler.last_epoch == PL_STEPS
    assert max_diff(full.parameters(), resumed.parameters()) == 0.
    monkeypatch.setattr(fxt.TorchFace, 'load_state_dict', lambda self, sd: None)
    control, _ = pl_fit(tmp_path / 'control', resume=ckpt)
    assert max_diff(full.parameters(), control.parameters()) > 1e-3


# ---------------------------------------------------------------- Accelerate
def test_accelerate_prepare_steps_as_the_plain_loop():
    """`Accelerator(cpu=True).prepare(model, opt, loader, scheduler)` wraps our AdamW (fused) and its scheduler; six
    steps end bit for bit where the same loop without accelerate ends"""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    def run(accelerate:bool):
        net = bigram()
        opt = fxt.Adam(net.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 6)
        loader, acc = token_loader(batch_size=8), None
        if accelerate:
            acc = Accelerator(cpu=True)
            net, opt, loader, sched = acc.prepare(net, opt, loader, sched)
            assert opt.optimizer.fx.path == 'fused'
        losses = []
        for i, (ids,) in enumerate(loader):
            if i == 6: break
            loss = next_token_loss(net, ids)
            acc.backward(loss) if acc else loss.backward()
            opt.step(); sched.step(); opt.zero_grad()
            losses.append(loss.item())
        return net, losses, opt

    try:
        wrapped, acc_losses, acc_opt = run(True)
    finally:
        AcceleratorState._reset_state(True); GradientState._reset_state()
    plain, losses, opt = run(False)
    assert type(acc_opt).__name__ == 'AcceleratedOptimizer' and isinstance(acc_opt.optimizer, fxt.Adam)
    assert acc_losses == losses and losses[-1] < losses[0] - 0.2, losses
    assert max_diff(wrapped.parameters(), plain.parameters()) == 0.
    assert acc_opt.optimizer.param_groups[0]['lr'] == opt.param_groups[0]['lr'] < 1e-2


# ---------------------------------------------------------------- a plain loop with GradScaler and clipping
def scaler_loop(opt_cls, dtype, inf_step=3, steps=8, max_norm=0.4, **kw):
    """`torch.amp.GradScaler('cpu')` with the forward under `dtype` autocast (`None`: fp32), `clip_grad_norm_` after
    unscaling, a cosine schedule; at `inf_step` one gradient is made inf, so the scaler skips that step and halves its
    scale. Per step: the loss, the gradient norm before clipping, the scale, how far the weights moved"""
    net = bigram()
    opt = opt_cls(net.parameters(), lr=1e-2, weight_decay=0.1, **kw)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.**10)
    ids, record = chains(), []
    for i in range(steps):
        with torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = next_token_loss(net, ids)
        scaler.scale(loss).backward()
        if i == inf_step: net[1].weight.grad[0, 0] = float('inf')
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm)
        before = [p.detach().clone() for p in net.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        sched.step()
        opt.zero_grad(set_to_none=True)
        moved = max_diff(before, net.parameters())
        record.append((loss.item(), norm.item(), scale, moved))
    return net, opt, record


@pytest.mark.parametrize('dtype,atol', [(None, 1e-6), (torch.float16, 1e-5)], ids=['fp32', 'fp16'])
def test_gradscaler_skips_the_inf_step_and_matches_torch_adamw(dtype, atol):
    """Our AdamW (fused) under GradScaler with clipping, against torch's AdamW in the same loop. The inf step moves
    no weight in either and halves the scale; the state's step count skips it too. The math is torch's AdamW: with
    an fp32 forward the weights end within 1e-6 after 8 steps (measured 2.4e-7, an fp32 ulp or two, as the torch
    face's own parity tests). Under fp16 autocast an fp32 ulp of difference in a weight can flip the rounding of an
    fp16 activation (2**-11 relative), which the next gradient and Adam's normalised step carry on: 1e-5 (measured
    7.4e-7 here, 2.1e-6 with clipping at norm 1)"""
    ours, opt, rec = scaler_loop(fxt.AdamW, dtype, fused=True)
    ref, ref_opt, ref_rec = scaler_loop(torch.optim.AdamW, dtype, foreach=False)
    assert opt.fx.path == 'fused'
    scales = [r[2] for r in rec]
    assert scales == [r[2] for r in ref_rec] == [2.**10] * 4 + [2.**9] * 4  # halved after the inf step only
    assert math.isinf(rec[3][1]) and rec[3][3] == 0. and all(r[3] > 1e-4 for i, r in enumerate(rec) if i != 3)
    norms, ref_norms = ([r[1] for i, r in enumerate(x) if i != 3] for x in (rec, ref_rec))
    assert norms == pytest.approx(ref_norms, rel=1e-5) and min(norms) > 0.4  # clipping was live on every step
    assert float(opt.state_dict()['state'][0]['step']) == 7 == float(ref_opt.state_dict()['state'][0]['step'])
    assert rec[-1][0] < rec[0][0] - 0.3
    assert max_diff(ours.parameters(), ref.parameters()) < atol


# ---------------------------------------------------------------- torch.optim's hooks, which frameworks may register
def hook_calls(opt) -> list[str]:
    "Register each of torch.optim.Optimizer's step and state-dict hooks on `opt`; step, save, load; the calls in order"
    calls, net_params = [], [p for g in opt.param_groups for p in g['params']]
    opt.register_step_pre_hook(lambda o, args, kw: calls.append('step_pre'))
    opt.register_step_post_hook(lambda o, args, kw: calls.append('step_post'))
    opt.register_state_dict_pre_hook(lambda o: calls.append('state_dict_pre'))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append('state_dict_post'))
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append('load_pre'))
    opt.register_load_state_dict_post_hook(lambda o: calls.append('load_post'))
    for p in net_params: p.grad = torch.ones_like(p)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    return calls


def test_step_hooks_run_as_torchs():
    ref = hook_calls(torch.optim.AdamW(bigram().parameters()))
    assert hook_calls(fxt.AdamW(bigram().parameters()))[:2] == ref[:2] == ['step_pre', 'step_post']


def test_state_dict_hooks_run_as_torchs():
    "torch.optim.Optimizer's public `register_state_dict_pre_hook` and its three siblings (torch >= 2.1)"
    ref = hook_calls(torch.optim.AdamW(bigram().parameters()))
    assert ref == ['step_pre', 'step_post', 'state_dict_pre', 'state_dict_post', 'load_pre', 'load_post']
    assert hook_calls(fxt.AdamW(bigram().parameters())) == ref
