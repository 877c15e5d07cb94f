"""fastai optimizers with native, ForEach and bitsandbytes 8-bit paths

Modules:

- `fastxtend_optim.bench`: The `fxo-bench` command: train on bundled data with every optimizer and path under the profiler, or time `opt.step()` alone against the peers that are installed."""

__version__ = "0.0.1"
