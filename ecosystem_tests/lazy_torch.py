"""A fn whose module does not import torch: the worker meets torch only inside
the first item (a TensorFlow user keeps torch out of the parent this way)."""
from __future__ import annotations


def noise(item: tuple) -> tuple:
    import torch
    return item[0], torch.rand(6).numpy()
