"""A velocity MLP for low-dimensional data (2-D toys, action sequences, Gaussians).

Same contract as the DiT -- ``model(x, t, d, y) -> v`` with ``x`` of shape ``(N, *input_shape)`` --
so every method runs unchanged on a non-image domain (the shortcut paper swaps a robot policy's
diffusion head the same way). Conditioning embeddings are added to the first hidden layer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from bench.dit import D_EMBEDDINGS, ScalarEmbedder, default_d_scale, step_input


class VelocityMLP(nn.Module):
    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden: int = 256,
        depth: int = 4,
        num_classes: int = 0,
        name: str = "mlp",
        d_embedding: str = "level",  # "linear" and t_scale: as in bench.dit.DiT (MeanFlow)
        t_scale: float = 1000.0,
        d_scale: float | None = None,  # None: bench.dit.default_d_scale
    ):
        super().__init__()
        if d_embedding not in D_EMBEDDINGS:
            raise ValueError(f"unknown d_embedding {d_embedding!r}; choose one of level, linear")
        self.d_embedding = d_embedding
        self.input_shape = tuple(int(s) for s in input_shape)
        self.num_classes, self.name, self.hidden, self.depth = num_classes, name, hidden, depth
        dim = math.prod(self.input_shape)
        self.x_in = nn.Linear(dim, hidden)
        self.t_embed = ScalarEmbedder(hidden, scale=t_scale, freq_dim=64)
        d_scale = default_d_scale(d_embedding, t_scale) if d_scale is None else d_scale
        self.d_embed = ScalarEmbedder(hidden, scale=d_scale, freq_dim=64)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)
        layers: list[nn.Module] = []
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        self.body = nn.Sequential(*layers, nn.SiLU())
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # start at zero velocity, like the DiT's final layer
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        if y is None:
            y = torch.full((n,), self.num_classes, dtype=torch.long, device=x.device)
        h = self.x_in(x.flatten(1))
        d_in = step_input(d.expand(n), self.d_embedding)
        h = h + self.t_embed(t.expand(n)) + self.d_embed(d_in) + self.y_embed(y)
        return self.out(self.body(h)).view(x.shape)

    def gflops(self) -> float:
        dim = math.prod(self.input_shape)
        return (2 * dim * self.hidden + (self.depth - 1) * self.hidden**2) / 1e9
