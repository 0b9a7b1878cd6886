"""Laying queued batches out on the shared worker threads (`server.schedule`)."""

from __future__ import annotations

import pytest

from server.schedule import Backlog, plan


def test_an_idle_pool_starts_a_new_batch_now() -> None:
    assert plan(2, {}).start_ms("a") == 0.0


def test_a_variants_own_chain_runs_its_batches_one_after_another() -> None:
    p = plan(4, {"a": Backlog(running_ms=3.0, batches_ms=(2.0, 2.0))})
    assert p.ready_ms["a"] == pytest.approx(7.0)
    assert p.last_start_ms["a"] == pytest.approx(5.0)
    assert p.start_ms("a") == pytest.approx(7.0)
    assert p.start_ms("b") == 0.0  # three threads are idle


def test_batches_holding_every_thread_make_a_new_one_wait_for_the_first_to_end() -> None:
    busy = {"a": Backlog(running_ms=5.0), "b": Backlog(running_ms=2.0)}
    assert plan(2, busy).start_ms("c") == pytest.approx(2.0)
    assert plan(3, busy).start_ms("c") == 0.0


def test_a_batch_waiting_for_a_thread_goes_first_and_later_ones_do_not_delay_ours() -> None:
    backlogs = {"a": Backlog(running_ms=4.0, batches_ms=(4.0, 4.0, 4.0)),  # a long chain
                "b": Backlog(running_ms=1.0, running_waits=True)}  # waits for a thread
    p = plan(2, backlogs)
    # b takes the idle thread now; a's later batches are released after c arrives: c waits
    # only for b (1 ms), not for a's chain (16 ms)
    assert p.start_ms("c") == pytest.approx(1.0)
    assert p.ready_ms["b"] == pytest.approx(1.0)
    assert p.ready_ms["a"] == pytest.approx(16.0)
