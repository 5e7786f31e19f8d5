"""Admission policy, without torch or a model."""

from server.engine.params import SamplingParams
from server.engine.request import Request, Status
from server.engine.scheduler import Scheduler


def make(rid, prompt_len=10, max_tokens=10, n=1):
    return Request(rid, [1] * prompt_len, SamplingParams(max_tokens=max_tokens, n=n), emit=lambda out: None)


def test_fifo_and_row_budget():
    s = Scheduler(max_batch_size=4, max_batch_tokens=10_000)
    reqs = [make("a", n=2), make("b"), make("c", n=2), make("d")]
    for r in reqs:
        s.add(r)
    assert s.admit() == reqs[:2]  # c's two rows do not fit beside a+b's three
    assert [r.status for r in reqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING, Status.WAITING]
    assert s.admit() == []  # d would fit, but does not overtake c
    s.remove(reqs[0])
    assert s.admit() == [reqs[2], reqs[3]]  # 1 + 2 + 1 rows = 4
    assert not s.waiting and s.running == reqs[1:]


def test_token_budget_counts_padded_rows():
    # rows x longest reserved length must fit: 3 rows x 100 = 300 > 250
    s = Scheduler(max_batch_size=8, max_batch_tokens=250)
    long, short1, short2 = make("long", 50, 50), make("s1", 5, 5), make("s2", 5, 5)
    for r in (long, short1, short2):
        s.add(r)
    assert s.admit() == [long, short1]
    assert s.fits_alone(short2)
    assert not s.fits_alone(make("huge", 200, 100))
    s.remove(long)
    assert s.admit() == [short2]


def test_remove_waiting_and_has_work():
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000)
    a, b = make("a"), make("b")
    s.add(a)
    s.add(b)
    assert s.admit() == [a]
    s.remove(b)  # aborted while waiting
    assert b.status == Status.FINISHED and not s.waiting
    s.remove(a)
    assert not s.has_work()


# -- the step plan ---------------------------------------------------------------------------------------------------
def planned(s):
    """schedule() then fed(): what the step fed, as (prompt lengths of the group, start, end) per chunk."""
    plan = s.schedule()
    chunks = [([len(r.prompt_ids) for r in c.group.requests], c.start, c.end) for c in plan.chunks]
    s.fed(plan)
    return plan, chunks


def test_with_nothing_decoding_the_shortest_group_is_fed_whole_then_the_next():
    s = Scheduler(max_batch_size=8, max_batch_tokens=100_000, prefill_chunk=64, fused=True)
    for rid, length in [("a", 300), ("b", 20), ("c", 25)]:
        s.add(make(rid, length))
    plan, chunks = planned(s)
    assert [r.request_id for r in plan.admitted] == ["a", "b", "c"] and not plan.decode and not plan.fused
    assert chunks == [([20, 25], 0, 25)]  # grouped by length, padded to 25, fed whole: nobody waits
    plan, chunks = planned(s)
    # b and c decode now; the long prompt is fed a chunk at a time beside them, in one forward
    assert plan.decode and plan.fused and chunks == [([300], 0, 64)]
    starts = []
    while s.prefilling:
        plan, chunks = planned(s)
        starts.append(chunks[0][1])
    assert starts[-1] + 64 >= 300 and chunks[0][2] == 300  # the last chunk ends at the prompt's end
    assert not s.schedule().chunks  # all in: decode only


def test_chunks_share_the_budget_fewest_remaining_tokens_first_and_shrink_deep_in_a_prompt():
    s = Scheduler(max_batch_size=16, max_batch_tokens=1_000_000, prefill_chunk=64, fused=True)
    s.add(make("stream", 5))
    planned(s)  # the stream decodes from here on
    s.add(make("long", 2000))
    for i in range(3):
        s.add(make(f"pair{i}", 100))  # one group of 3 rows of 100
    plan, chunks = planned(s)
    # the 3 x 100 group has fewer tokens left than the long prompt: first, with 64 // 3 = 21 columns a row,
    # then the long one with at least MIN_CHUNK though the budget is spent
    assert chunks == [([100, 100, 100], 0, 21), ([2000], 0, 16)] and plan.fused
    s2 = Scheduler(max_batch_size=4, max_batch_tokens=1_000_000, prefill_chunk=64, fused=True)
    s2.add(make("stream", 5))
    planned(s2)
    s2.add(make("deep", 1500))
    sizes = []
    while not sizes or s2.prefilling:
        _, chunks = planned(s2)
        sizes.append((chunks[0][1], chunks[0][2] - chunks[0][1]))
    assert dict(sizes)[0] == 64 and all(size == 32 for start, size in sizes if 512 <= start < 1024 and start + size < 1500)
    assert all(size == 21 for start, size in sizes if 1024 <= start and start + size < 1500)


def test_two_forwards_a_step_feed_one_group_and_admit_none_meanwhile():
    s = Scheduler(max_batch_size=8, max_batch_tokens=100_000, prefill_chunk=32, fused=False)
    s.add(make("stream", 5))
    planned(s)
    s.add(make("long", 100))
    s.add(make("short", 10))
    plan, chunks = planned(s)
    assert plan.decode and not plan.fused and len(chunks) == 1 and chunks[0][0] == [10]
    s.add(make("late", 10))
    plan, chunks = planned(s)
    assert plan.admitted == [] and chunks[0][0] == [100]  # the long group is fed before anything joins
    while s.prefilling:
        planned(s)
    assert [r.request_id for r in s.schedule().admitted] == ["late"]


def test_a_group_with_prompt_logprobs_is_fed_whole_in_a_forward_of_its_own():
    s = Scheduler(max_batch_size=8, max_batch_tokens=100_000, prefill_chunk=16, fused=True)
    s.add(make("stream", 5))
    planned(s)
    echo = Request("echo", [1] * 200, SamplingParams(max_tokens=5, prompt_logprobs=1), emit=lambda out: None)
    s.add(echo)
    plan, chunks = planned(s)
    assert chunks == [([200], 0, 200)] and plan.decode and not plan.fused


def test_a_group_whose_requests_all_left_is_not_fed():
    s = Scheduler(max_batch_size=8, max_batch_tokens=100_000, prefill_chunk=16, fused=True)
    s.add(make("stream", 5))
    planned(s)
    gone = make("gone", 300)
    s.add(gone)
    planned(s)
    s.remove(gone)  # aborted while being prefilled
    plan, chunks = planned(s)
    assert chunks == [] and plan.decode and not s.prefilling
