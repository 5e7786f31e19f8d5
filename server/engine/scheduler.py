"""Admission policy: which waiting requests join the running batch. No torch, no HTTP.

Budgets: `max_batch_size` rows, and `max_batch_tokens` tokens of KV cache. The batch is padded
to one timeline, so its cache holds rows x longest row; a request is admitted only if, with every
row grown to its reserved length (prompt + max_tokens), the batch still fits the token budget.
"""

from __future__ import annotations

from collections import deque

from .request import Request, Status


class Scheduler:
    def __init__(self, max_batch_size: int, max_batch_tokens: int) -> None:
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

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

    def schedule(self) -> list[Request]:
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
