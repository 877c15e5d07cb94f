"""fastai optimizers with native, ForEach, fused and bitsandbytes 8-bit paths, low-bit state on the fused path, and a torch.optim face"""

__version__ = "0.0.1"
