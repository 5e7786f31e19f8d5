"""The plan of each engine step: which waiting requests are admitted, whether the running batch decodes, and which
prompt columns are fed. No torch, no HTTP.

Admission has two budgets: `max_batch_size` rows, and `max_batch_tokens` tokens of KV cache. The batch is padded to
one timeline, so its cache holds rows x longest row; a request is admitted only if, with every row grown to its
reserved length (prompt + max_tokens), the batch still fits the token budget.

Admitted prompts are fed in groups of similar length (a group is padded to its longest prompt), fewest remaining
tokens first, within `prefill_chunk` tokens a step while the batch decodes, so long prompts join over several steps
while the streams keep getting tokens and short prompts do not wait behind them. With nothing decoding nobody waits:
the first group is fed whole. Where the runner cannot fuse decode rows and prompt chunks into one forward (`fused`
false), a step feeds one group, and no new group is admitted while one is being fed.

With a prefix cache (prefix.py), `lookup` gives each admitted prompt its cached start: groups are then formed by
the tokens left to compute, and a group starts at the first column some row has not cached (`done`), its rows'
cached columns before it copied in by the runner. With 16-bit weights (`cut_block`), a prompt's last partial block
(the tokens after its last full one) is fed in a chunk of its own (`cut`): the same prompt sent again finds every
full block cached and computes just that chunk, exactly as the first one did, so that repeating a request repeats
its answer in bf16 too, where a token's numbers depend on how many tokens are computed with it. (In fp32 they
differ by rounding alone, about 1e-5, and the extra chunk is not worth its forward.)
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .request import Request, Status

ATTENTION_DEPTH = 512  # prompt tokens fed past which a chunk is made smaller: it also attends to all before it
MIN_CHUNK = 16  # the fewest columns a group is fed in a step


@dataclass(eq=False)
class PromptGroup:
    """Admitted prompts fed together, left-padded to the longest; `done` of its `width` columns are in."""

    requests: list[Request]
    done: int = 0
    state: Any = None  # the runner's side of it (padded ids, mask, its own KV cache), made at its first chunk
    hits: list[Any] | None = None  # per request, its prefix-cache hit (None: no cache, or prompt log-probabilities)
    cut: int = 0  # no chunk runs across this column: where the prompts' last partial blocks start (0: none)

    @property
    def width(self) -> int:
        return max(len(r.prompt_ids) for r in self.requests)

    @property
    def echo(self) -> bool:
        """Whether a request wants prompt log-probabilities: then the group is fed whole, in a forward of its own."""
        return any(r.params.prompt_logprobs is not None for r in self.requests)


@dataclass(frozen=True)
class Chunk:
    group: PromptGroup
    start: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.group.width


@dataclass
class StepPlan:
    admitted: list[Request]  # new this step: their rows are to be made
    decode: bool  # the running batch takes one token per row
    chunks: list[Chunk] = field(default_factory=list)  # prompt columns to feed
    fused: bool = False  # decode and chunks in one forward


def by_length(requests: list[Request], length: Callable[[Request], int] | None = None) -> list[list[Request]]:
    """Requests in groups of similar prompt length (or `length`, the tokens each has left to compute): a group is
    padded to its longest, so a short prompt is not fed (and kept waiting) as long as a long one."""
    length = length or (lambda r: len(r.prompt_ids))
    groups: list[list[Request]] = []
    for r in sorted(requests, key=length):
        if groups and length(r) <= 2 * length(groups[-1][0]) + 16:
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int, prefill_chunk: int = 64,
                 fused: bool = False, lookup: Callable[[list[int]], Any] | None = None, cut_block: int = 0) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.fused = fused  # whether the runner runs decode rows and prompt chunks in one forward
        self.lookup = lookup  # a prompt's prefix-cache hit (anything with `tokens`: how many are cached), or None
        self.cut_block = cut_block  # the prefix cache's block (tokens), where prompts' last partial blocks are cut
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admitted: being prefilled (in a group) or in the batch
        self.prefilling: list[PromptGroup] = []

    def fits_alone(self, *requests: Request) -> bool:
        """Whether the requests could ever run together (an empty batch admits them)."""
        rows = sum(r.num_rows for r in requests)
        return rows <= self.max_batch_size and rows * max(r.reserved_len for r in requests) <= self.max_batch_tokens

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        if request in self.waiting:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
        request.status = Status.FINISHED

    def schedule(self) -> StepPlan:
        """The next step's plan. `fed(plan)` records it once it has run."""
        self.prefilling = [g for g in self.prefilling if any(r.status is Status.RUNNING for r in g.requests)]
        admitted = self.admit() if self.fused or not self.prefilling else []
        self.prefilling += self._groups(admitted)
        feeding = {r for g in self.prefilling for r in g.requests}
        decode = any(r not in feeding for r in self.running)
        chunks = self._chunks(decode)
        fused = decode and bool(chunks) and self.fused and not any(c.group.echo for c in chunks)
        return StepPlan(admitted, decode, chunks if fused else chunks[:1], fused)

    def _groups(self, admitted: list[Request]) -> list[PromptGroup]:
        if self.lookup is None:
            return [PromptGroup(group) for group in by_length(admitted)]
        hits = {r: self.lookup(r.prompt_ids) for r in admitted if r.params.prompt_logprobs is None}

        def left(r: Request) -> int:
            return len(r.prompt_ids) - (hits[r].tokens if r in hits else 0)

        groups = []
        for requests in by_length(admitted, left):
            g = PromptGroup(requests, hits=[hits.get(r) for r in requests])
            if not g.echo:  # from the first column a row has not cached; each row's columns before it are copied
                g.done = g.width - max(left(r) for r in requests)
                if self.cut_block:
                    g.cut = max(g.width - len(r.prompt_ids) + (len(r.prompt_ids) - 1) // self.cut_block * self.cut_block
                                for r in requests)
            for r in requests:
                r.cached_tokens = max(0, len(r.prompt_ids) - (g.width - g.done))
            groups.append(g)
        return groups

    def _chunks(self, decode: bool) -> list[Chunk]:
        order = sorted(self.prefilling, key=lambda g: (g.width - g.done) * len(g.requests))

        def chunk(g: PromptGroup, end: int) -> Chunk:
            return Chunk(g, g.done, g.cut if g.done < g.cut < end else end)

        if not decode:  # nobody waits: the first group whole (up to its cut)
            return [chunk(g, g.width) for g in order[:1]]
        chunks, budget = [], self.prefill_chunk
        for g in order:
            rows, left = len(g.requests), g.width - g.done
            # a chunk deep into a long prompt also attends to everything before it: fewer tokens per step there
            size = left if g.echo else min(left, max(MIN_CHUNK, budget // rows // (1 + g.done // ATTENTION_DEPTH)))
            chunks.append(chunk(g, g.done + size))
            budget -= (chunks[-1].end - g.done) * rows
            if budget <= 0:
                break
        return chunks

    def fed(self, plan: StepPlan) -> None:
        """The plan's chunks are in: groups whose last column is in leave (their requests are in the batch)."""
        for c in plan.chunks:
            c.group.done = c.end
        self.prefilling = [g for g in self.prefilling if g.done < g.width]

    def admit(self) -> list[Request]:
        """Admit waiting requests, oldest first, while both budgets hold; return the admitted ones."""
        rows = sum(r.num_rows for r in self.running)
        longest = max((r.reserved_len for r in self.running), default=0)
        admitted: list[Request] = []
        while self.waiting:
            r = self.waiting[0]
            new_rows, new_longest = rows + r.num_rows, max(longest, r.reserved_len)
            if new_rows > self.max_batch_size or new_rows * new_longest > self.max_batch_tokens:
                break
            self.waiting.popleft()
            r.status = Status.RUNNING
            self.running.append(r)
            admitted.append(r)
            rows, longest = new_rows, new_longest
        return admitted

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
