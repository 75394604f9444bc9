"""The alert service's lane (alerts.lane): its work runs on its own thread and loop, so a busy
node loop does not hold it up; cancelling a caller cancels the work; callbacks go back."""

from __future__ import annotations

import asyncio
import threading

import pytest

from realtime_safety.alerts.lane import Lane


async def test_without_start_the_work_runs_in_the_callers_loop() -> None:
    lane = Lane("t")

    async def where() -> int:
        return threading.get_ident()

    assert await lane.run(where()) == threading.get_ident()


async def test_work_runs_on_the_lane_and_errors_come_back() -> None:
    lane = Lane("t")
    await lane.start()
    try:

        async def where() -> int:
            return threading.get_ident()

        async def fails() -> None:
            raise KeyError("x")

        assert await lane.run(where()) != threading.get_ident()
        with pytest.raises(KeyError):
            await lane.run(fails())
    finally:
        await lane.stop()
    assert await lane.run(where()) == threading.get_ident()  # stopped: inline again


async def test_a_blocked_node_loop_does_not_hold_up_the_lane() -> None:
    lane = Lane("t")
    await lane.start()
    done = threading.Event()
    try:

        async def work() -> None:
            await asyncio.sleep(0.01)  # a few turns of the lane's own loop
            done.set()

        pending = asyncio.ensure_future(lane.run(work()))
        await asyncio.sleep(0)  # handed to the lane
        # This loop is now blocked (as a flooded node's is): the lane finishes anyway.
        assert done.wait(timeout=10)
        await pending
    finally:
        await lane.stop()


async def test_cancelling_the_caller_cancels_the_work_on_the_lane() -> None:
    lane = Lane("t")
    await lane.start()
    started, cancelled = threading.Event(), threading.Event()
    try:

        async def forever() -> None:
            started.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        call = asyncio.ensure_future(lane.run(forever()))
        await asyncio.to_thread(started.wait, 10)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await asyncio.to_thread(cancelled.wait, 10)
    finally:
        await lane.stop()


async def test_back_runs_the_nodes_callback_on_the_nodes_loop() -> None:
    lane = Lane("t")
    main = threading.get_ident()
    await lane.start()
    try:

        async def node_side(x: int) -> tuple[int, int]:
            return threading.get_ident(), x * 2

        callback = lane.back(node_side)

        async def on_lane() -> tuple[int, tuple[int, int]]:
            return threading.get_ident(), await callback(21)

        lane_thread, (callback_thread, value) = await lane.run(on_lane())
        assert lane_thread != main and callback_thread == main and value == 42
    finally:
        await lane.stop()
