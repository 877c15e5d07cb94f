"What every optimizer with factored state (`FactoredOptimizer`: Adafactor, CAME) does alike: FSDP2 refused, shapes."
import pytest
import torch
from fastxtend_optim.factored import FactoredOptimizer
from fastxtend_optim.registry import REGISTRY

FACTORED = [n for n, e in REGISTRY.items() if issubclass(e.declaration.optimizer, FactoredOptimizer)]


def test_the_factored_optimizers_are_registered():
    assert sorted(FACTORED) == ['adafactor', 'came']


@pytest.mark.cpu_only('a one-process gloo group')
@pytest.mark.parametrize('name', FACTORED)
def test_fsdp2_sharded_parameters_are_refused(name):
    "A DTensor sharded over a mesh dimension (FSDP2's placement) is refused naming FSDP2; a replicated one steps"
    import tempfile, torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor, Shard, Replicate
    if dist.is_initialized(): pytest.skip('a process group is already running')
    make, title = REGISTRY[name].factory, REGISTRY[name].factory.__name__
    with tempfile.NamedTemporaryFile() as f:
        dist.init_process_group('gloo', init_method=f'file://{f.name}', rank=0, world_size=1)
        try:
            mesh = init_device_mesh('cpu', (1,))
            sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
            with pytest.raises(ValueError, match=f'{title} does not support parameters sharded by FSDP2'):
                make([sharded, torch.zeros(3, requires_grad=True)], lr=1e-3)
            replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
            opt = make([replicated], lr=1e-3)
            replicated.grad = distribute_tensor(torch.ones(4, 3), mesh, [Replicate()])
            opt.step()
            assert opt.path == 'foreach' and {'row_sqr_avg', 'col_sqr_avg'} <= set(opt.state[replicated])
        finally: dist.destroy_process_group()
