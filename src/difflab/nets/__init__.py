"""Backbones: ``net(x_in, c_noise) -> output`` with the shape of x_in; wrapped into denoisers by difflab.denoisers."""

from difflab.nets.mlp import MLP, SinusoidalEmbedding

__all__ = ["MLP", "SinusoidalEmbedding"]
