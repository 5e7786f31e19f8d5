"""Automatic prefix caching: the keys and values of prompts seen before, kept by blocks of tokens.

A block is BLOCK tokens of a prompt, keyed by the hash of those tokens and of the block before it, so a key stands
for the whole prefix up to the block's end. A prompt's cached prefix is the run of its blocks found from the first:
a shared system prompt, a document asked about again, a chat's earlier turns. Each block keeps, per layer, its
keys and values for one row, (2, kv heads, BLOCK, head size): they depend on the model and the tokens alone
(prompts start at position 0), never on sampling parameters. Where every layer is on one device a block is one
tensor, (layers, 2, kv heads, BLOCK, head size), cut from one copy of the row's new blocks, so that keeping a
row costs two tensor operations per block rather than two per block and layer (64 finished rows of 93 tokens:
190 ms the per-layer way, a stall every stream would see); across devices (--device-map) a list per layer.

The pool is bounded in bytes; the least recently used blocks go first. A match touches its blocks from the last to
the first, so a prefix's later blocks are evicted before the earlier ones they extend. A matched `Hit` holds its
blocks (references), so an eviction between the match and the copy into the rows loses nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

BLOCK = 16


@dataclass(eq=False)
class Block:
    parent: int | None  # the key of the block before, None for a prompt's first
    tokens: tuple[int, ...]
    kv: torch.Tensor | list[torch.Tensor]  # indexed by layer: (2, kv heads, BLOCK, head size)
    nbytes: int


@dataclass
class Hit:
    """A prompt's cached blocks, from its first token."""

    blocks: list[Block] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return BLOCK * len(self.blocks)

    def kv(self, layer: int, n: int) -> torch.Tensor:
        """(2, kv heads, n, head size): the first n cached tokens of `layer`."""
        parts = [b.kv[layer] for b in self.blocks[: -(-n // BLOCK)]]
        return torch.cat(parts, dim=2)[:, :, :n]


def block_keys(ids: list[int], blocks: int) -> list[tuple[int, int | None, tuple[int, ...]]]:
    """(key, parent key, tokens) of the first `blocks` full blocks of `ids`."""
    out, parent = [], None
    for b in range(blocks):
        tokens = tuple(ids[b * BLOCK : (b + 1) * BLOCK])
        key = hash((parent, tokens))
        out.append((key, parent, tokens))
        parent = key
    return out


class PrefixCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # bytes
        self.blocks: OrderedDict[int, Block] = OrderedDict()
        self.nbytes = 0
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens whose keys and values came from the pool

    def match(self, ids: list[int]) -> Hit:
        """The cached blocks `ids` starts with, leaving its last token out (the step must compute at least one to
        have its logits). The tokens and the parent are compared too, so a hash collision cannot match."""
        hit = Hit()
        for key, parent, tokens in block_keys(ids, (len(ids) - 1) // BLOCK):
            block = self.blocks.get(key)
            if block is None or block.parent != parent or block.tokens != tokens:
                break
            hit.blocks.append(block)
        for key, _, _ in reversed(block_keys(ids, len(hit.blocks))):
            self.blocks.move_to_end(key)
        return hit

    def record(self, queried: int, used: int) -> None:
        self.queries += queried
        self.hits += used

    def store(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]], first: int) -> None:
        """Keep the full blocks of `ids` not yet kept. `layers`: per layer the row's keys and values, (kv heads,
        columns, head size), token i of `ids` at column first + i."""
        keys = block_keys(ids, len(ids) // BLOCK)
        new = [b for b, (key, _, _) in enumerate(keys) if key not in self.blocks]
        if new:
            start, end = first + new[0] * BLOCK, first + len(keys) * BLOCK
            one_device = len({k.device for k, _ in layers}) == 1
            if one_device:  # (layers, 2, kv heads, new tokens, head size) in one copy
                rows = torch.stack([t[:, start:end] for pair in layers for t in pair]).unflatten(0, (len(layers), 2))
            for b in new:
                key, parent, tokens = keys[b]
                if one_device:
                    at = (b - new[0]) * BLOCK
                    kv = rows[:, :, :, at : at + BLOCK].clone()
                else:
                    at = first + b * BLOCK
                    kv = [torch.stack([k[:, at : at + BLOCK], v[:, at : at + BLOCK]]) for k, v in layers]
                block = Block(parent, tokens, kv, kv.nbytes if one_device else sum(t.nbytes for t in kv))
                self.blocks[key] = block
                self.nbytes += block.nbytes
        for key, _, _ in reversed(keys):
            self.blocks.move_to_end(key)
        while self.nbytes > self.capacity and self.blocks:
            _, old = self.blocks.popitem(last=False)
            self.nbytes -= old.nbytes
