"""Each row's decode pipeline: what shapes its logits before sampling, and what follows each token it takes.

A Sequence holds one DecodePipeline. Its processors (penalties, logit bias, min_tokens, a grammar's token mask)
each `apply` to the row's logits, in place, before temperature, top-k/top-p and min-p, and each `accept` the token
the row took; then the stop rules (end tokens, stop strings, length, a finished grammar) say whether the row ends.
Rows with no processors pay nothing. Beam search runs its slots' logits through the same processors and ends its
candidates with the same end tokens (`end_tokens`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .params import SamplingParams

if TYPE_CHECKING:
    from .request import SeqOutput, Sequence


class Processor:
    """One per-row rule: `apply` changes the row's logits, shape (vocab,), in place; `accept` sees the token taken
    and returns True when the row's answer is complete (a grammar that can take nothing more)."""

    def apply(self, logits: torch.Tensor, seq: Sequence) -> None:
        raise NotImplementedError

    def accept(self, seq: Sequence, token: int) -> bool:
        return False


class RepetitionPenalty(Processor):
    """Hugging Face's: logits of prompt and output tokens divided by the penalty (multiplied, if negative)."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def apply(self, logits, seq):
        seen = torch.tensor(seq.request.prompt_ids + seq.token_ids, device=logits.device).unique()
        vals = logits[seen]
        logits[seen] = torch.where(vals > 0, vals / self.penalty, vals * self.penalty)


class OpenAIPenalties(Processor):
    """OpenAI's presence and frequency penalties, over the generated tokens only."""

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence, self.frequency = presence, frequency

    def apply(self, logits, seq):
        if not seq.token_ids:
            return
        vocab = logits.shape[-1]
        counts = torch.bincount(torch.tensor(seq.token_ids, device=logits.device), minlength=vocab)[:vocab]
        counts = counts.to(logits.dtype)
        logits -= self.frequency * counts + self.presence * (counts > 0).to(logits.dtype)


class LogitBias(Processor):
    def __init__(self, bias: tuple[tuple[int, float], ...]) -> None:
        self.ids = [t for t, _ in bias]
        self.values = [b for _, b in bias]

    def apply(self, logits, seq):
        ids = torch.tensor(self.ids, device=logits.device)
        bias = torch.tensor(self.values, dtype=logits.dtype, device=logits.device)
        logits[ids] += bias.masked_fill(bias <= -100, float("-inf"))  # -100 bans outright


class MinTokens(Processor):
    """No end token before `count` tokens, unless the row's grammar already accepts its answer
    (then an end may be all it allows)."""

    def __init__(self, count: int, enders: set[int]) -> None:
        self.count, self.enders = count, sorted(enders)

    def apply(self, logits, seq):
        if len(seq.token_ids) < self.count and not seq.pipeline.complete():
            logits[[t for t in self.enders if t < logits.shape[-1]]] = float("-inf")


def end_tokens(params: SamplingParams, eos_ids: set[int]) -> set[int]:
    """The tokens that end a row: its stop_token_ids, and the model's end tokens unless ignore_eos."""
    return set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_ids))


class DecodePipeline:
    def __init__(self, params: SamplingParams, eos_ids: set[int], max_model_len: int | None = None) -> None:
        self.params = params
        self.enders = end_tokens(params, eos_ids)
        self.max_model_len = max_model_len
        self.processors: list[Processor] = []
        if params.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenalty(params.repetition_penalty))
        if params.presence_penalty or params.frequency_penalty:
            self.processors.append(OpenAIPenalties(params.presence_penalty, params.frequency_penalty))
        if params.logit_bias:
            self.processors.append(LogitBias(params.logit_bias))
        if params.min_tokens:
            self.processors.append(MinTokens(params.min_tokens, self.enders))
        self.grammar = params.grammar.processor() if params.grammar is not None else None
        if self.grammar is not None:  # last: whatever a bias did, the mask decides what may come
            self.processors.append(self.grammar)

    def complete(self) -> bool:
        """Whether the row's grammar (if any) accepts what it has so far."""
        return self.grammar is not None and self.grammar.accepting()

    def apply(self, logits: torch.Tensor, seq: Sequence) -> None:
        for p in self.processors:
            p.apply(logits, seq)

    def accept(self, seq: Sequence, token: int) -> SeqOutput:
        """Take the row's new token: tell the processors, detokenize, apply the stop rules."""
        from .request import SeqOutput

        seq.token_ids.append(token)
        complete = any([p.accept(seq, token) for p in self.processors])
        finish = None
        if token in self.enders:
            finish, delta = "stop", ""
        else:
            delta = seq.detok.add(token)
        text, hit = seq.stopper.feed(delta)
        if hit or complete:
            finish = "stop"
        elif finish is None and (len(seq.token_ids) >= self.params.max_tokens
                                 or (self.max_model_len is not None and seq.num_tokens >= self.max_model_len)):
            finish = "length"
        if finish is not None and not hit:
            tail, hit = seq.stopper.feed(seq.detok.flush())
            text += tail if hit else tail + seq.stopper.flush()
            finish = "stop" if hit or finish == "stop" else finish
        seq.finish_reason = finish
        return SeqOutput(seq.index, text, [token], finish)


def apply_processors(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Every row's processors on its logits, in place; rows without any are not touched."""
    for row, seq in enumerate(seqs):
        if seq.pipeline.processors:
            seq.pipeline.apply(logits[row], seq)
    return logits
