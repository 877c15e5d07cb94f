"""fastai optimizers with native, ForEach and bitsandbytes 8-bit paths

Modules:

- `fastxtend_optim.bench`: The `fxo-bench` command: train on bundled data with every optimizer and path under the profiler, or time `opt.step()` alone against the peers that are installed.
- `fastxtend_optim.demo`: A fastai Learner on real handwritten digits that ship with scikit-learn: what `fxo-bench`, the tests and the examples train.
- `fastxtend_optim.release`: Step each parameter during backward, as soon as its gradient is ready, and free that gradient at once: a model's full set of gradients never exists. Accumulate micro-batches into the optimizer's state, not into a gradient buffer."""

__version__ = "0.0.1"
