"""The model runner: the forward passes and everything on the device. No scheduling, no text."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from . import attention, fused, llama
from .batch import Batch, Prefill
from .decoding import apply_processors
from .kvcache import KVCache
from .params import SamplingParams
from .prefix import Hit, PrefixCache
from .request import Request, Sequence, TokenLogprob
from .sampling import sample, token_logprobs
from .speculative import accept
from .scheduler import StepPlan

PROMPT_SLICE = 256  # prompt positions whose logits exist at once for prompt log-probabilities (echo): 256 x a
# 256,000-token vocabulary x 4 bytes is 262 MB, where a whole 2,048-token prompt would take 2.1 GB a row


def bare_requests(prompts, params: SamplingParams) -> list[Request]:
    """One-row requests that report nothing, for forwards the engine runs for itself (start-up checks, dry steps)."""
    out = []
    for i, ids in enumerate(prompts):
        r = Request(f"internal-{i}", list(ids), params, emit=lambda _: None)
        r.sequences = [Sequence(r, 0, detok=None)]
        out.append(r)
    return out


class ModelRunner:
    def __init__(self, model: Any, device: torch.device, vocab_size: int | None = None, max_rows: int | None = None,
                 max_cols: int | None = None, prefix: PrefixCache | None = None, onednn_min_tokens: int = 0) -> None:
        self.model = model
        self.onednn_min_tokens = onednn_min_tokens  # forwards of fewer tokens run without oneDNN (cpu.py)
        self.prefix = prefix  # prompts' keys and values kept for later prompts that start the same way
        self.device = device
        self.cache_limits = (max_rows, max_cols)  # what KV buffers may grow to: rows in a batch, tokens in a row
        # Logits past the tokenizer's last id are cut off: a padded vocabulary's extra ids (BLOOMZ has 200) are
        # never sampled, never beams, never in log-probabilities.
        self.vocab_size = vocab_size
        accepted = inspect.signature(model.forward).parameters
        # BLOOM uses ALiBi and takes no position ids; pass only what the model accepts.
        self.takes_positions = "position_ids" in accepted
        self.takes_logits_to_keep = "logits_to_keep" in accepted
        self.fused = False  # set by enable_fused() when the model passes its check
        self.native: llama.LlamaStep | None = None  # the decode step, where enable_native() finds it matches
        # Prompt log-probabilities come from the network's last hidden states, through the output layer a slice of
        # positions at a time; models that change their logits past that layer (soft-capping, a logit scale) take
        # every position's logits from the model at once instead.
        config = getattr(model, "config", None)
        plain_head = not any(getattr(config, a, None) for a in ("final_logit_softcapping", "logit_scale"))
        trunk = getattr(model, "base_model", model)
        self.trunk = trunk if trunk is not model and plain_head and model.get_output_embeddings() is not None else None

    def _inputs(self, attention_mask, positions, cache) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "past_key_values": cache, "use_cache": True}
        if self.takes_positions:
            kwargs["position_ids"] = positions
        return kwargs

    def _forward(self, input_ids, attention_mask, positions, cache, all_logits: bool = False) -> torch.Tensor:
        """Logits of the last position, (rows, vocab); of every position, (rows, tokens, vocab), if all_logits."""
        kwargs = self._inputs(attention_mask, positions, cache)
        if self.takes_logits_to_keep:
            kwargs["logits_to_keep"] = 0 if all_logits else 1
        self._matmuls(input_ids.numel())
        logits = self.model(input_ids=input_ids, **kwargs).logits[..., : self.vocab_size]
        return logits.float() if all_logits else logits[:, -1, :].float()

    def _matmuls(self, tokens: int) -> None:
        """Before a forward of `tokens` tokens: oneDNN on for its bf16 matmuls, or off where torch's own kernel is
        faster (one token: a stream decoding alone; cpu.py). A process-wide switch: forwards run on one thread."""
        if self.onednn_min_tokens:
            torch.backends.mkldnn.enabled = tokens >= self.onednn_min_tokens

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden)[..., : self.vocab_size].float()

    def start_prefill(self, requests: list[Request], hits: list[Hit | None] | None = None, start: int = 0) -> Prefill:
        """Left-pad the prompts to one width (one row per request); `prefill_step` then feeds them in chunks from
        column `start`, the columns before it copied from each row's prefix-cache hit."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.zeros((len(requests), width), dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        p = Prefill(requests, ids.to(self.device), mask.to(self.device), KVCache(width, *self.cache_limits), hits)
        if start:
            self._copy_cached(p, start)
        return p

    @torch.inference_mode()
    def _copy_cached(self, p: Prefill, start: int) -> None:
        """Fill the cache's columns before `start`: row i's last cached tokens up to there, zeros (masked) before
        its prompt begins."""
        width = p.ids.shape[1]
        counts = [max(0, len(r.prompt_ids) - (width - start)) for r in p.requests]
        source = next(h for h, n in zip(p.hits, counts, strict=True) if n)
        for layer in range(len(source.blocks[0].kv)):
            shape = source.blocks[0].kv[layer].shape  # (2, kv heads, BLOCK, head size)
            kv = source.blocks[0].kv[layer].new_zeros((2, len(p.requests), shape[1], start, shape[3]))
            for i, (hit, n) in enumerate(zip(p.hits, counts, strict=True)):
                if n:
                    kv[:, i, :, start - n :] = hit.kv(layer, n)
            p.cache.update(kv[0], kv[1], layer)

    def _remember(self, p: Prefill) -> None:
        """Keep the prompts' full blocks in the prefix cache (those not kept yet)."""
        width = p.ids.shape[1]
        layers = p.cache.live_layers()
        for i, r in enumerate(p.requests):
            self.prefix.store(r.prompt_ids, [(layer.keys[i], layer.values[i]) for layer in layers],
                              width - len(r.prompt_ids))

    def execute(self, plan: StepPlan, batch: Batch | None) -> tuple[torch.Tensor | None, list[tuple[Batch, torch.Tensor]]]:
        """Run a step's plan (scheduler.py): the running batch's logits if it decodes, and the batch and logits of
        each prompt group whose last chunk this was."""
        for c in plan.chunks:
            if c.group.state is None:
                c.group.state = self.start_prefill(c.group.requests, c.group.hits, c.start)
        if plan.fused:
            logits, done = self.fused_step(batch, [(c.group.state, c.start, c.end) for c in plan.chunks])
        else:
            logits = self.decode(batch) if plan.decode else None
            done = [self.prefill_step(c.group.state, c.start, c.end) for c in plan.chunks]
        return logits, [d for d in done if d is not None]

    def prefill(self, requests: list[Request]) -> tuple[Batch, torch.Tensor]:
        """The whole prefill in one forward."""
        p = self.start_prefill(requests)
        return self.prefill_step(p, 0, p.ids.shape[1])

    @torch.inference_mode()
    def prefill_step(self, p: Prefill, start: int, end: int) -> tuple[Batch, torch.Tensor] | None:
        """Feed columns start:end of the prompts; when the last one is in, return their batch and the logits of
        each row's last position. Prompt log-probabilities (echo) need every position, so such a prefill runs
        whole (start 0, end its width), and its logits are made a slice of positions at a time."""
        requests = p.requests
        wants = [r.params.prompt_logprobs is not None for r in requests]
        echo = any(wants)
        width = p.ids.shape[1]
        assert not echo or (start, end) == (0, width), "a prefill with prompt log-probabilities runs whole"
        ids, mask, positions = p.ids[:, start:end], p.attention_mask[:, :end], p.prompt_positions[:, start:end]
        head = None
        if echo and self.trunk is not None:  # the last hidden states of every position
            self._matmuls(ids.numel())
            scores = self.trunk(input_ids=ids, **self._inputs(mask, positions, p.cache)).last_hidden_state
            logits, head = self._head(scores[:, -1, :]), self._head
        else:
            scores = self._forward(ids, mask, positions, p.cache, all_logits=echo)
            logits = scores[:, -1, :] if echo else scores
        if end < width:
            return None
        for r, want, row_scores, row_ids in zip(requests, wants, scores, p.ids, strict=True):
            if want:
                r.prompt_logprobs = self._prompt_logprobs(row_scores, row_ids, len(r.prompt_ids),
                                                          r.params.prompt_logprobs, head)
        return self._prefilled(p, logits)

    def enable_fused(self) -> bool:
        """Fuse decode and prefill chunks into one forward if this model gives the same logits that way as through
        two forwards (fused.py); otherwise keep two."""
        previous = getattr(self.model.config, "_attn_implementation", None)
        if previous != "sdpa":
            return False
        fused.enable(self.model)
        try:
            self.fused = self._fused_matches()
        except Exception:  # a model whose attention does not take this path
            self.fused = False
        if not self.fused:
            fused.disable(self.model, previous)
        return self.fused

    def _fused_matches(self) -> bool:
        def requests(*prompts):
            return bare_requests(prompts, SamplingParams(max_tokens=4, temperature=0.0))

        running, first, second = ([1, 2, 3, 4, 5], [6, 7, 8]), ([9, 10, 11, 12, 13, 14, 15], [3, 4]), ([20, 21, 22],)
        batch, logits = self.prefill(requests(*running))
        tokens = [logits.argmax(-1)]
        expected = []
        for _ in range(2):
            batch.next_tokens = tokens[-1]
            expected.append(self.decode(batch))
            tokens.append(expected[-1].argmax(-1))
        expected += [self.prefill(requests(*second))[1], self.prefill(requests(*first))[1]]
        batch, _ = self.prefill(requests(*running))
        p1, p2 = self.start_prefill(requests(*first)), self.start_prefill(requests(*second))
        batch.next_tokens = tokens[0]  # step 1: 4 of 7 columns of the first group, all of the second
        decoded, done = self.fused_step(batch, [(p1, 0, 4), (p2, 0, 3)])
        got = [decoded]
        batch.next_tokens = tokens[1]  # step 2: the first group's last 3
        decoded, done2 = self.fused_step(batch, [(p1, 4, 7)])
        got += [decoded, done[1][1], done2[0][1]]
        return done[0] is None and all(torch.allclose(g, e, rtol=0.05, atol=0.05 * float(e.abs().max()))
                                       for g, e in zip(got, expected, strict=True))

    @torch.inference_mode()
    def fused_step(self, batch: Batch, feeds: list[tuple[Prefill, int, int]]) -> tuple[torch.Tensor, list]:
        """`decode(batch)` and `prefill_step(p, start, end)` for each (p, start, end) in `feeds`, in one forward
        (fused.py): the running rows' logits, and per prefill its batch and logits when this chunk was its last,
        else None."""
        rows = len(batch)
        batch.open_column()
        groups, ids, positions, keep, spans = [], [batch.next_tokens], [batch.positions], list(range(rows)), []
        for p, start, end in feeds:
            size, first = end - start, sum(t.numel() for t in ids)
            groups.append(fused.Group(p.cache, len(p.requests), size, fused.prefill_mask(p.attention_mask, start, end)))
            ids.append(p.ids[:, start:end].reshape(-1))
            positions.append(p.prompt_positions[:, start:end].reshape(-1))
            last = end == p.ids.shape[1]
            if last:  # each prompt's last position
                keep += [first + i * size + size - 1 for i in range(len(p.requests))]
            spans.append((p, last))
        step = fused.FusedStep(batch.cache, rows, attention.runs(batch.attention_mask), groups)
        self._matmuls(sum(t.numel() for t in ids))
        logits = fused.forward(self.model, step, torch.cat(ids).unsqueeze(0),
                               torch.cat(positions).unsqueeze(0) if self.takes_positions else None,
                               torch.tensor(keep, device=self.device))[:, : self.vocab_size]
        batch.positions += 1
        done, at = [], rows
        for p, last in spans:
            done.append(self._prefilled(p, logits[at : at + len(p.requests)]) if last else None)
            at += len(p.requests) if last else 0
        return logits[:rows], done

    def remember_rows(self, batch: Batch, rows: list[int]) -> None:
        """Keep finished rows' prompt and answer in the prefix cache (a chat's next turn starts with them): every
        token but the last sampled one, which was never fed."""
        layers = batch.cache.live_layers()
        for i in rows:
            seq = batch.seqs[i]
            ids = seq.request.prompt_ids + seq.token_ids[:-1]
            if seq.lookup is None:  # its tokens are the last columns
                kv = [(layer.keys[i], layer.values[i]) for layer in layers]
            else:  # rejected drafts left masked columns between them; and it may have fed past its stop
                cols = batch.attention_mask[i].nonzero().squeeze(1)[: len(ids)]
                kv = [(layer.keys[i].index_select(1, cols), layer.values[i].index_select(1, cols)) for layer in layers]
            self.prefix.store(ids, kv, kv[0][0].shape[1] - len(ids))

    def _prefilled(self, p: Prefill, logits: torch.Tensor) -> tuple[Batch, torch.Tensor]:
        requests = p.requests
        if self.prefix is not None and p.hits is not None:
            self._remember(p)  # before rows are duplicated (n > 1)
        batch = p.computed()
        rows = [i for i, r in enumerate(requests) for _ in r.sequences]
        if len(rows) > len(requests):  # n > 1: every choice starts from its request's prefilled cache row
            batch.select(rows, [s for r in requests for s in r.sequences])
            logits = logits[rows]
        return batch, logits

    @torch.inference_mode()
    def decode(self, batch: Batch) -> torch.Tensor:
        """Feed every row its next token; return the logits for the token after."""
        batch.open_column()
        if self.native is not None:
            self._matmuls(len(batch))
            logits = self.native(batch.next_tokens, batch.positions, batch.attention_mask, batch.cache)
        else:
            logits = self._forward(
                batch.next_tokens.unsqueeze(1), batch.attention_mask, batch.positions.unsqueeze(1), batch.cache
            )
        batch.positions += 1
        return logits

    def enable_native(self) -> str | None:
        """Decode through llama.py's step, on CPU, for a model of that shape whose logits match transformers'
        forward there; returns why not, or None."""
        if self.device.type != "cpu":
            return "not on CPU"
        try:
            why = llama.unsupported(self.model)
            if why is not None:
                return why
            if self._native_matches(llama.LlamaStep(self.model, self.vocab_size)):
                return None
            return "its logits differ from transformers' forward"
        except Exception as e:  # a model that looks the part but is not (remote code of the same model type)
            self.native = None
            return f"{type(e).__name__}: {e}"

    def _native_matches(self, step: llama.LlamaStep) -> bool:
        """Four decode steps of a padded batch of two and of one row, through transformers' forward and through
        `step`, from the same prompts and tokens: the same logits, within bf16's rounding. Where they are, the
        runner decodes through `step` from now on."""
        for prompts in (([1, 2, 3, 4, 5, 6, 7], [8, 9, 10]), ([11, 12, 13, 14],)):
            runs = []
            for native in (None, step):
                self.native = native
                batch, logits = self.prefill(bare_requests(prompts, SamplingParams(max_tokens=8, temperature=0.0)))
                found = [logits]
                for i in range(4):
                    batch.next_tokens = (runs[0][i] if runs else found[-1]).argmax(-1)
                    found.append(self.decode(batch))
                runs.append(found)
            self.native = None
            if not all(torch.allclose(g, e, rtol=0.05, atol=0.05 * float(e.abs().max()))
                       for g, e in zip(runs[1][1:], runs[0][1:], strict=True)):
                return False
        self.native = step
        return True

    @torch.inference_mode()
    def verify(self, batch: Batch, drafts: list[list[int]]) -> tuple[list[int], list[list[int]], list[int]]:
        """Feed every row its next token and its draft (up to k tokens; speculative.py) in one forward and keep what
        the model agrees with. Returns per row the draft tokens kept and the tokens taken (the kept draft and one
        more), and the rows whose logits held NaN."""
        k = max(len(d) for d in drafts)
        lengths = [len(d) for d in drafts]
        padded = torch.tensor([d + [0] * (k - len(d)) for d in drafts], dtype=torch.long).to(self.device)
        ids = torch.cat([batch.next_tokens.unsqueeze(1), padded], dim=1)
        batch.open_column(k + 1)
        positions = batch.positions.unsqueeze(1) + torch.arange(k + 1, device=self.device)
        if self.native is not None:
            self._matmuls(ids.numel())
            logits = self.native(ids, positions, batch.attention_mask, batch.cache)
        else:
            logits = self._forward(ids, batch.attention_mask, positions, batch.cache, all_logits=True)
        nan = torch.isnan(logits).flatten(1).any(dim=1)
        logits.masked_fill_(nan[:, None, None], 0.0)
        rows = batch.params
        kept, tokens = accept(logits, padded, torch.tensor(lengths, device=self.device), *rows.tensors(), rows.host)
        host = torch.cat([kept.unsqueeze(1), nan.long().unsqueeze(1), tokens], dim=1).tolist()
        kept_list = [line[0] for line in host]
        batch.settle(kept_list, k + 1)
        taken = [line[2 : 3 + line[0]] for line in host]
        batch.next_tokens = torch.tensor([t[-1] for t in taken], dtype=torch.long).to(self.device)
        return kept_list, taken, [row for row, line in enumerate(host) if line[1]]

    @torch.inference_mode()
    def sample(self, batch: Batch, logits: torch.Tensor) -> tuple[list[int], list[TokenLogprob | None], list[int]]:
        """Next token per row, after each row's processors, and its log-probability (with the top alternatives)
        for rows that ask; and the rows whose logits held NaN (their requests are to fail: such a row samples from
        zeros). Tokens, NaN flags and log-probabilities come to the host in one copy."""
        nan = torch.isnan(logits).any(dim=-1)
        logits.masked_fill_(nan.unsqueeze(1), 0.0)
        logits = apply_processors(logits, batch.seqs)
        rows = batch.params
        tokens = sample(logits, rows.temperature, rows.top_p, rows.top_k, [s.generator for s in batch.seqs],
                        rows.min_p, rows.host)
        batch.next_tokens = tokens
        params = [s.request.params for s in batch.seqs]
        asked = [i for i, p in enumerate(params) if p.logprobs is not None]
        # one float64 row per batch row: token, NaN flag, then (where asked) the chosen token's log-probability,
        # the best ids and their log-probabilities (ids are exact in float64)
        parts = [tokens.double().unsqueeze(1), nan.double().unsqueeze(1)]
        num_top = max((params[i].logprobs for i in asked), default=0)
        if asked:
            idx = torch.tensor(asked, device=self.device)
            chosen, top_ids, top_lps = token_logprobs(logits[idx], rows.temperature[idx], tokens[idx], num_top)
            figures = logits.new_zeros((len(params), 1 + 2 * num_top), dtype=torch.float64)
            figures[idx] = torch.cat([chosen.double().unsqueeze(1), top_ids.double(), top_lps.double()], dim=1)
            parts.append(figures)
        host = torch.cat(parts, dim=1).tolist()  # the step's one wait for the device
        out: list[TokenLogprob | None] = [None] * len(params)
        for row in asked:
            k, line = params[row].logprobs, host[row]
            ids, lps = line[3 : 3 + num_top], line[3 + num_top :]
            # tokens a processor banned (a grammar's mask, a -100 bias) have no log-probability to report
            top = [(int(t), v) for t, v in zip(ids[:k], lps[:k], strict=True) if v != float("-inf")]
            out[row] = TokenLogprob(int(line[0]), line[2], top)
        return [int(line[0]) for line in host], out, [row for row, line in enumerate(host) if line[1]]

    @staticmethod
    def _prompt_logprobs(scores: torch.Tensor, ids: torch.Tensor, length: int, k: int, head=None) -> list[TokenLogprob]:
        """Each prompt token's log-probability given the tokens before it (none for the first), raw model scores.
        `scores`: the row's logits, (width, vocab), or with `head` its last hidden states, (width, hidden), turned
        into logits PROMPT_SLICE positions at a time."""
        out = [TokenLogprob(int(ids[-length]), None, [])]
        targets = ids[-length + 1 :].tolist() if length > 1 else []
        for at in range(0, len(targets), PROMPT_SLICE):
            n = min(PROMPT_SLICE, len(targets) - at)
            part = scores.narrow(0, scores.shape[0] - length + at, n)
            lp = (head(part) if head is not None else part).log_softmax(dim=-1)
            want = torch.tensor(targets[at : at + n], device=lp.device)
            chosen = lp.gather(1, want.unsqueeze(1)).squeeze(1).tolist()
            top = lp.topk(k, dim=-1) if k else None
            top_ids, top_lps = (top.indices.tolist(), top.values.tolist()) if top is not None else ([], [])
            for j, (t, c) in enumerate(zip(targets[at : at + n], chosen, strict=True)):
                out.append(TokenLogprob(t, c, list(zip(top_ids[j], top_lps[j], strict=True)) if k else []))
        return out

    def new_generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)
