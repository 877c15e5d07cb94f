"""The torch face in real trainers: Hugging Face `Trainer`, Lightning, Accelerate, and a plain loop with `GradScaler`.

Each trains a tiny model on the CPU, saves a checkpoint mid-run, resumes from it and compares with the uninterrupted
run. These need transformers and Lightning importable, so a torchvision that cannot load beside torch must not be
installed (`tools/install.sh dev` removes it; CONTRIBUTING.md says why)."""
import math
import pytest
import torch
from fastxtend_optim import torchface as fxt

pytestmark = pytest.mark.cpu_only(reason="the trainers run on the CPU (use_cpu, accelerator='cpu')")

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
