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
    assert s.schedule() == reqs[:2]  # c's two rows do not fit beside a+b's three
    assert [r.status for r in reqs] == [Status.RUNNING, Status.RUNNING, Status.WAITING, Status.WAITING]
    assert s.schedule() == []  # d would fit, but does not overtake c
    s.remove(reqs[0])
    assert s.schedule() == [reqs[2], reqs[3]]  # 1 + 2 + 1 rows = 4
    assert not s.waiting and s.running == reqs[1:]


def test_token_budget_counts_padded_rows():
    # rows x longest reserved length must fit: 3 rows x 100 = 300 > 250
    s = Scheduler(max_batch_size=8, max_batch_tokens=250)
    long, short1, short2 = make("long", 50, 50), make("s1", 5, 5), make("s2", 5, 5)
    for r in (long, short1, short2):
        s.add(r)
    assert s.schedule() == [long, short1]
    assert s.fits_alone(short2)
    assert not s.fits_alone(make("huge", 200, 100))
    s.remove(long)
    assert s.schedule() == [short2]


def test_remove_waiting_and_has_work():
    s = Scheduler(max_batch_size=1, max_batch_tokens=1000)
    a, b = make("a"), make("b")
    s.add(a)
    s.add(b)
    assert s.schedule() == [a]
    s.remove(b)  # aborted while waiting
    assert b.status == Status.FINISHED and not s.waiting
    s.remove(a)
    assert not s.has_work()
