"""opt.step() on FSDP2-sharded parameters against the same step in one process, per optimizer and path.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 tools/sharded-step-bench.py [--layers 24] [--width 256]

Each rank holds 1/world of every tensor, so a step that costs nothing for being sharded takes 1/world of the
one-process time; what it takes beyond that is the cost of sharding (reductions, Muon's gathers, the fused path's
staging). Rank 0 times its own steps (median of --rounds, after 3 untimed) and, while the other ranks wait, the whole
model's in one process; it prints a Markdown table."""
import argparse, statistics, time, warnings
import torch, torch.distributed as dist
from torch import nn
from fastxtend_optim.bench import OPTIMIZERS, PATH_FUNCS, has_path

NAMES = ['lion', 'adam', 'lars', 'lamb', 'stableadamw', 'adan', 'muon']


def model(layers:int, width:int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])


def stepper(name:str, path:str, net:nn.Module, sharded:bool):
    "An optimizer over `net` (sharded with FSDP2 first if asked) whose parameters hold one backward's gradients"
    if sharded:
        from torch.distributed.fsdp import fully_shard
        for m in net: fully_shard(m)
        fully_shard(net)
    params = list(net.parameters())
    opt = OPTIMIZERS[name]['partial'](**PATH_FUNCS[path])([params[:-2], params[-2:]], lr=1e-4)  # body, head
    net(torch.randn(8, net[0].in_features)).square().mean().backward()
    return opt


def median_ms(opt, rounds:int) -> float:
    times = []
    for i in range(rounds + 3):
        start = time.perf_counter()
        opt.step()
        if i >= 3: times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(layers:int, width:int, rounds:int):
    dist.init_process_group('gloo')
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')
    rank, world, rows = dist.get_rank(), dist.get_world_size(), []
    for name in NAMES:
        for path in ('foreach', 'fused', 'eightbit'):
            if not has_path(name, path): continue
            sharded = median_ms(stepper(name, path, model(layers, width), True), rounds)
            whole = median_ms(stepper(name, path, model(layers, width), False), rounds) if rank == 0 else 0.
            dist.barrier()
            rows.append((name, path, whole, sharded))
    if rank == 0:
        n = layers * (width * width + width)
        print(f'{n / 1e6:.2f}M parameters in {2 * layers} tensors, {world} gloo processes, 1 thread each, '
              f'torch {torch.__version__}; median of {rounds} steps\n')
        print(f'| optimizer | path | one process (ms) | sharded, rank 0 (ms) | sharded x {world} / one process |')
        print('|---|---|---|---|---|')
        for name, path, whole, sharded in rows:
            print(f'| {name} | {path} | {whole:.2f} | {sharded:.2f} | {sharded * world / whole:.2f} |')
    dist.destroy_process_group()


if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--layers', type=int, default=24)
    ap.add_argument('--width', type=int, default=256)
    ap.add_argument('--rounds', type=int, default=15)
    main(**vars(ap.parse_args()))
