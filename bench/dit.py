"""The one backbone: a Diffusion Transformer with adaLN-Zero conditioning.

Peebles & Xie, "Scalable Diffusion Models with Transformers" (ICCV 2023, arXiv 2212.09748).
The network predicts a velocity ``v = model(x, t, d, y)`` for the linear path
``x_t = (1 - t) x0 + t x1`` (t = 0 noise, t = 1 data), conditioned on

* ``t``  the time in [0, 1], sinusoidal embedding of ``1000 t`` (the DiT/ADM scale),
* ``d``  the step size the caller intends to take (shortcut models, Frans et al. 2025), embedded
         by its own MLP from ``log2(1/d)``; methods that ignore ``d`` pass the flow-matching level
         ``d = 1/128``. ``d_embedding="linear"`` embeds ``d`` itself like ``t`` instead, and
         ``t_scale`` replaces the 1000 (MeanFlow: continuous ``d = t - r``, both unscaled, as its
         JVP differentiates through them; methods/meanflow.py says why),
* ``y``  a class label, or the null label ``num_classes`` (classifier-free guidance).

The conditioning vector is ``c = emb_t(t) + emb_d(d) + emb_y(y)``; every block regresses its
LayerNorm shift/scale and a residual gate from ``c`` (adaLN-Zero, gates initialised to zero so every
block starts as the identity). Positions are fixed 2-D sin-cos; attention is torch SDPA.

Differences from the official shortcut-models JAX DiT, on purpose (docs/methods.md, "The official
DiT's warts"): queries are scaled by ``1/sqrt(head_dim)`` (SDPA), ``t`` is scaled to [0, 1000]
before the sinusoid, and the per-block adaLN layers are zero-initialised. Each has an option
reproducing the official DiT: ``attention="official"`` (1/head_dim), ``adaln_init="xavier"``
(size keys, e.g. ``+size.attention=official``), and the methods' ``embedding=raw`` (``t`` and
the level unscaled, ``d_scale``).

Parameter count: the DiT paper's table (33M / 130M / 458M / 675M for S/2, B/2, L/2, XL/2 on
32x32x4, 1000 classes, learned sigma) plus our ``d`` embedder, which adds ``256 D + D^2 + 2 D``
parameters (0.25M at S, 1.6M at XL, +0.24%); predicting only the velocity (no sigma channels)
removes ``D p^2 C`` (18k at XL). ``DiT.gflops`` counts multiply-accumulates as the DiT paper does.
No randomness inside ``forward``: label dropout is the method's job.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

#: DiT paper sizes, hidden / depth / heads (Table 1).
SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
FLOW_MATCHING_LEVEL = 1.0 / 128  # the finest step size, the shortcut paper's "d = 0"


def sinusoid(x: Tensor, dim: int, max_period: float = 10_000.0) -> Tensor:
    """ADM/DiT sinusoidal features of a batch of scalars ``x`` (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device) / half)
    # float64 stays float64 (derivative checks against finite differences); the rest runs in fp32
    args = (x if x.dtype == torch.float64 else x.float())[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ScalarEmbedder(nn.Module):
    """Sinusoid of ``scale * s`` followed by a two-layer MLP (DiT's TimestepEmbedder)."""

    def __init__(self, hidden: int, scale: float, freq_dim: int = 256):
        super().__init__()
        self.scale, self.freq_dim = scale, freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, s: Tensor) -> Tensor:
        return self.mlp(sinusoid(self.scale * s, self.freq_dim))


def step_level(d: Tensor) -> Tensor:
    """``log2(1/d)``: 0 for a single step of size 1, 7 for the flow-matching level 1/128."""
    return -torch.log2(d.float().clamp_min(2.0**-16))


#: What the ``d`` embedder sees: ``level`` = log2(1/d) in [0, 7], spread over the same range as
#: 1000 t; ``linear`` = d in [0, 1] itself, scaled like t (``t_scale``).
D_EMBEDDINGS = ("level", "linear")


#: ``embedding`` option of the methods that use the level: the scales of ``t`` and of the level
#: ``log2(1/d)`` before the sinusoid. ``dit``: 1000 t and 1000/7 level (the DiT/ADM range);
#: ``raw``: t in [0, 1] and the integer level 0..7 as they are (the official shortcut DiT,
#: kvfrans/shortcut-models model.py:82-88 embeds ``t`` unscaled, l. 262 the integer level).
EMBEDDING_SCALES: dict[str, tuple[float, float]] = {"dit": (1000.0, 1000.0 / 7), "raw": (1.0, 1.0)}


def default_d_scale(d_embedding: str, t_scale: float) -> float:
    """The ``d`` embedder's scale when none is given: the level spread over the range of
    ``1000 t``; a linear ``d`` scaled like ``t``."""
    return 1000.0 / 7 if d_embedding == "level" else t_scale


def step_input(d: Tensor, how: str) -> Tensor:
    return step_level(d) if how == "level" else d


def sincos_2d(hidden: int, grid_h: int, grid_w: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE/DiT): half the channels per axis. (T, D)."""
    assert hidden % 4 == 0, f"hidden size {hidden} must be divisible by 4 for 2-D sin-cos"
    ys, xs = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    quarter = hidden // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def axis(pos: Tensor) -> Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([axis(xs), axis(ys)], dim=1).float()


#: ``attention`` of the DiT: the softmax temperature as a function of the head dimension.
#: ``sdpa``: 1/sqrt(head_dim) (DiT); ``official``: 1/head_dim (kvfrans/shortcut-models model.py:181).
ATTENTION_SCALES = {"sdpa": lambda head_dim: None, "official": lambda head_dim: 1.0 / head_dim}


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention. ``naive=True`` spells out the softmax (for bench.perf only)."""

    def __init__(self, hidden: int, heads: int, naive: bool = False, scale: float | None = None):
        super().__init__()
        assert hidden % heads == 0, f"hidden {hidden} is not divisible by heads {heads}"
        # None: 1/sqrt(head_dim) (DiT, SDPA's default); the official shortcut DiT uses 1/head_dim
        self.heads, self.naive = heads, naive
        self.scale = scale  # None is passed on: SDPA's own default, bitwise as before
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.naive:
            w = q @ k.transpose(-2, -1)
            w = w / math.sqrt(q.shape[-1]) if self.scale is None else w * self.scale
            out = w.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (N, heads, T, hd)
        return self.proj(out.transpose(1, 2).reshape(n, t, c))


class DiTBlock(nn.Module):
    def __init__(
        self,
        hidden: int,
        heads: int,
        mlp_ratio: float = 4.0,
        naive_attention=False,
        attention_scale: float | None = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads, naive=naive_attention, scale=attention_scale)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))
        self.linear = nn.Linear(hidden, patch * patch * channels)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """DiT over inputs of shape ``input_shape = (C, H, W)``; returns a velocity of the same shape."""

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        hidden: int,
        depth: int,
        heads: int,
        patch: int = 2,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        naive_attention: bool = False,
        name: str = "",
        d_embedding: str = "level",
        t_scale: float = 1000.0,
        grad_checkpoint: bool = False,
        d_scale: float | None = None,
        attention: str = "sdpa",
        adaln_init: str = "zero",
    ):
        super().__init__()
        if attention not in ATTENTION_SCALES:
            raise ValueError(f"unknown attention {attention!r}; choose one of sdpa, official")
        if adaln_init not in ("zero", "xavier"):
            raise ValueError(f"unknown adaln_init {adaln_init!r}; choose one of zero, xavier")
        self.attention, self.adaln_init = attention, adaln_init
        if d_embedding not in D_EMBEDDINGS:
            raise ValueError(f"unknown d_embedding {d_embedding!r}; choose one of level, linear")
        channels, height, width = (int(s) for s in input_shape)
        if height % patch or width % patch:
            raise ValueError(f"input {height}x{width} is not divisible by patch size {patch}")
        self.input_shape = (channels, height, width)
        self.hidden, self.depth, self.heads, self.patch = hidden, depth, heads, patch
        self.mlp_ratio, self.num_classes, self.name = mlp_ratio, num_classes, name
        self.d_embedding = d_embedding
        self.grid = (height // patch, width // patch)
        # Recompute each block's activations in the backward instead of storing them (memory for
        # time, e.g. DiT-XL at large batch); the forward's values are unchanged.
        self.grad_checkpoint = grad_checkpoint

        self.patch_embed = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
        self.register_buffer("pos", sincos_2d(hidden, *self.grid)[None], persistent=False)
        self.t_embed = ScalarEmbedder(hidden, scale=t_scale)
        # log2(1/d) in [0, 7] is spread over the same range as 1000 t; a linear d is scaled like t.
        d_scale = default_d_scale(d_embedding, t_scale) if d_scale is None else d_scale
        self.d_embed = ScalarEmbedder(hidden, scale=d_scale)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)  # row `num_classes` = null label
        self.blocks = nn.ModuleList(
            DiTBlock(
                hidden,
                heads,
                mlp_ratio,
                naive_attention,
                ATTENTION_SCALES[attention](hidden // heads),
            )
            for _ in range(depth)
        )
        self.final = FinalLayer(hidden, patch, channels)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # Patch embedding initialised like a linear layer over the flattened patch (as in MAE).
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.hidden, -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        for emb in (self.t_embed, self.d_embed):
            for layer in emb.mlp[0], emb.mlp[2]:
                nn.init.normal_(layer.weight, std=0.02)
        # adaLN-Zero: every residual branch starts closed, the output starts at zero velocity.
        # adaln_init=xavier (official shortcut DiT, model.py:168): the blocks' adaLN layers keep
        # their Xavier weights (zero bias); only the final layer starts at zero.
        for block in self.blocks:
            if self.adaln_init == "zero":
                nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        for layer in (self.final.adaLN[-1], self.final.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def null_label(self, n: int, device: torch.device) -> Tensor:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def unpatchify(self, x: Tensor) -> Tensor:
        (gh, gw), p, c = self.grid, self.patch, self.input_shape[0]
        x = x.view(x.shape[0], gh, gw, p, p, c)  # (N, gh, gw, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, gh * p, gw * p)

    def forward(self, x: Tensor, t: Tensor, d: Tensor, y: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        assert x.shape[1:] == self.input_shape, f"expected (N, {self.input_shape}), got {x.shape}"
        if y is None:
            y = self.null_label(n, x.device)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos  # (N, T, D)
        c = self.t_embed(t.expand(n)) + self.d_embed(step_input(d.expand(n), self.d_embedding))
        c = c + self.y_embed(y)
        for block in self.blocks:
            if self.grad_checkpoint and torch.is_grad_enabled():
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return self.unpatchify(self.final(h, c))

    def gflops(self) -> float:
        """Forward multiply-accumulates per sample, in G (the DiT paper's "Gflops" convention).

        Counts every matmul: patch embedding, per block adaLN + qkv + QK^T + AV + projection +
        MLP, and the final layer. The conditioning MLPs are per sample, not per token, and are
        included too; norms, activations and softmax are not (as in the paper).
        """
        c = self.input_shape[0]
        t, d, p = self.grid[0] * self.grid[1], self.hidden, self.patch
        inner = int(d * self.mlp_ratio)
        per_block = d * 6 * d + t * d * 3 * d + 2 * t * t * d + t * d * d + 2 * t * d * inner
        embed = t * c * p * p * d + 2 * (256 * d + d * d)
        final = d * 2 * d + t * d * p * p * c
        return (embed + self.depth * per_block + final) / 1e9


def dit(size: str, input_shape, patch: int = 2, num_classes: int = 0, **kw) -> DiT:
    """Build a named DiT size (S, B, L, XL) for ``input_shape``."""
    if size not in SIZES:
        raise ValueError(f"unknown DiT size {size!r}; choose one of {', '.join(SIZES)}")
    hidden, depth, heads = SIZES[size]
    return DiT(input_shape, hidden, depth, heads, patch, num_classes, name=f"{size}/{patch}", **kw)
