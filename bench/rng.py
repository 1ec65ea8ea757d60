"""Random-number keys: every random draw in a run is seeded from ``(seed, what, index)``.

Nothing random depends on how far a process has got or how many processes there are: a batch,
a reflow pair shard or an encoded image draws from ``torch.Generator().manual_seed(key)`` with a
key computed from the run's seed and the draw's own index. That is what makes a resumed run, a
run on ``W`` processes and a run with ``grad_accum = W`` bitwise the same run.

The keys are ``seed * 1_000_003 + index`` (1,000,003 is prime). Two seeds share keys only once
an index reaches 1,000,003 (about a million batches): a known limit for multi-seed studies at
paper scale, kept because every published number was drawn with these keys.
"""

from __future__ import annotations

SEED_STRIDE = 1_000_003  # prime: seeds are this far apart in key space
STEP_STRIDE = 7_919  # prime: consecutive optimizer steps
PART_STRIDE = 104_729  # prime: micro-batches of one step (parts < 7,919 never collide)


def stream_key(seed: int, index: int) -> int:
    """The key of draw ``index`` of a run seeded ``seed`` (batches, pair shards, encodings)."""
    return int(seed) * SEED_STRIDE + int(index)


def step_key(seed: int, step: int, part: int = 0) -> int:
    """The key of micro-batch ``part`` of optimizer step ``step`` (global RNG of the step)."""
    return stream_key(seed, int(step) * STEP_STRIDE + int(part) * PART_STRIDE) % 2**63


def generator(key: int):
    """A CPU ``torch.Generator`` seeded with ``key``."""
    import torch

    return torch.Generator().manual_seed(int(key))
