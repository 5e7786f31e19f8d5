"""Beam search for one request, step by step, inside the shared batch.

The rules are Hugging Face's `generate(num_beams=K)` (transformers 5): keep the best 2K continuations
(more with several end tokens), finish those that hit an end token or the length limit, keep the K best
finished hypotheses scored with the length penalty, and stop per `early_stopping` (True, False or "never").
The engine owns the rows; this class only says which parent row each row continues and with which token.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .decoding import end_tokens
from .detokenizer import IncrementalDetokenizer, StopChecker
from .request import Request, SeqOutput

NEG = -1.0e9


class BeamGroup:
    def __init__(self, num_beams: int, max_tokens: int, num_eos: int, length_penalty: float,
                 early_stopping: bool | str, is_stop: Callable[[list[int]], bool]) -> None:
        self.k = num_beams
        self.keep = max(2, 1 + num_eos) * num_beams
        self.max_tokens = max_tokens
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.is_stop = is_stop  # does this candidate end here (end token or stop string)?
        self.running: list[list[int]] = [[] for _ in range(num_beams)]
        self.scores = torch.full((num_beams,), NEG)
        self.scores[0] = 0.0  # identical beams at first: only the first one may expand
        self.finished: list[list[int]] = [[] for _ in range(num_beams)]
        self.finished_scores = torch.full((num_beams,), NEG)
        self.is_finished = torch.zeros(num_beams, dtype=torch.bool)
        self.improvable = True
        self.done = False

    @property
    def length(self) -> int:
        return len(self.running[0])

    def step(self, logits: torch.Tensor) -> list[int]:
        """Advance one token. `logits` are the K rows' next-token logits; returns each row's parent row
        (the rows must be reordered so), after which row i continues with self.running[i][-1]."""
        top_scores, top_idx = self.top_candidates(logits)
        vocab = logits.shape[-1]
        parents = (top_idx // vocab).tolist()
        candidates = [self.running[b] + [t] for b, t in zip(parents, (top_idx % vocab).tolist(), strict=True)]
        at_limit = len(candidates[0]) >= self.max_tokens
        hits = torch.tensor([at_limit or self.is_stop(c) for c in candidates])

        running_scores = top_scores + hits.float() * NEG
        nxt = running_scores.topk(self.k).indices.tolist()
        self.running = [candidates[i] for i in nxt]
        self.scores = running_scores[nxt]
        row_parents = [parents[i] for i in nxt]

        just_finished = hits & (torch.arange(self.keep) < self.k)
        final = top_scores / (len(candidates[0]) ** self.length_penalty)
        if bool(self.is_finished.all()) and self.early_stopping is True:
            final = final + NEG
        if not self.improvable:
            final = final + NEG
        final = final + (~just_finished).float() * NEG
        merged = torch.cat([self.finished_scores, final])
        best = merged.topk(self.k).indices.tolist()
        pool = self.finished + candidates
        flags = torch.cat([self.is_finished, just_finished])
        self.finished = [pool[i] for i in best]
        self.finished_scores = merged[best]
        self.is_finished = flags[best]

        self._update_improvable()
        all_full = bool(self.is_finished.all()) and self.early_stopping is True
        self.done = not self.improvable or all_full or bool(hits.all())
        return row_parents

    def top_candidates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The best `keep` continuations (accumulated score, flat index row * vocab + token), found where the
        logits are (a GPU) and brought to the host in one copy; the rest of the bookkeeping is K to 2K numbers on
        the host."""
        log_probs = logits.float().log_softmax(dim=-1)
        acc = (log_probs + self.scores.to(log_probs.device, non_blocking=True).unsqueeze(1)).reshape(-1)
        top_scores, top_idx = acc.topk(self.keep)
        both = torch.stack([top_scores.double(), top_idx.double()]).cpu()  # indices < 2**53: exact in float64
        return both[0].float(), both[1].long()

    def _update_improvable(self) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_length = self.max_tokens
        else:
            best_length = self.length
        best_possible = self.scores[0] / (best_length**self.length_penalty)
        worst = torch.where(self.is_finished, self.finished_scores.min(), torch.tensor(NEG))
        self.improvable = self.improvable and bool((best_possible > worst).any())

    def best(self, n: int) -> list[list[int]]:
        """The n best finished hypotheses, best first."""
        return self.finished[:n]

    def settled(self) -> list[int]:
        """The longest token prefix shared by every hypothesis that can still be the answer."""
        hyps = self.running + [h for h, f in zip(self.finished, self.is_finished.tolist(), strict=True) if f]
        prefix = hyps[0]
        for h in hyps[1:]:
            i = 0
            while i < min(len(prefix), len(h)) and prefix[i] == h[i]:
                i += 1
            prefix = prefix[:i]
        return prefix


class BeamSearch:
    """A beam request's search plus its text: what is settled streams out to every choice; when the
    search ends, each of the n best hypotheses gets the rest of its own text."""

    def __init__(self, request: Request, tokenizer, eos_ids: set[int]) -> None:
        p = request.params
        self.request = request
        self.tokenizer = tokenizer
        self.enders = end_tokens(p, eos_ids)
        self.stops = tuple(s for s in p.stop if s)
        self.group = BeamGroup(p.num_beams, p.max_tokens, len(eos_ids), p.length_penalty, p.early_stopping, self._ends)
        self.detok = IncrementalDetokenizer(tokenizer, request.prompt_ids)
        self.stopper = StopChecker(p.stop)
        self.settled = 0

    def _ends(self, tokens: list[int]) -> bool:
        if tokens[-1] in self.enders:
            return True
        if not self.stops:
            return False
        tail = self.tokenizer.decode(tokens[-(max(map(len, self.stops)) + 4) :], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def outputs(self) -> list[SeqOutput]:
        """This step's SeqOutputs, one per choice."""
        n = self.request.params.n
        if not self.group.done:
            settled = self.group.settled()
            text = "".join(self.detok.add(t) for t in settled[self.settled :] if t not in self.enders)
            self.settled = len(settled)
            text, _ = self.stopper.feed(text)
            return [SeqOutput(i, text, []) for i in range(n)]
        outs = []
        for i, hyp in enumerate(self.group.best(n)):
            detok, stopper = self._fork()
            text = "".join(detok.add(t) for t in hyp[self.settled :] if t not in self.enders)
            text, hit = stopper.feed(text + detok.flush())
            text += "" if hit else stopper.flush()
            ended = hit or self._ends(hyp)
            outs.append(SeqOutput(i, text, list(hyp), "stop" if ended else "length"))
        return outs

    def _fork(self) -> tuple[IncrementalDetokenizer, StopChecker]:
        detok, stopper = copy.copy(self.detok), copy.copy(self.stopper)
        detok.ids = list(detok.ids)
        return detok, stopper
