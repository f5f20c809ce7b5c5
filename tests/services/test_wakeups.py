"""The driver's wake-ups instead of a timer: `GroupBuffer.watch` returns only once the buffer
changed (groups put, a batch taken), at once when the change already happened, and brings the
buffer's report with it. So an idle driver sleeps on this call (and on its requests, and on the
learner loop's status calls, which bring news of each publish: the sync-mode runs of
tests/services/test_reliability.py wait on them) and does no work until something moves."""

import asyncio

from bad_wire import scored_batch

from async_pmd import wire
from async_pmd.config import AlgorithmConfig, BufferConfig
from services.buffer import GroupBuffer

N = 8


def test_buffer_watch_returns_on_a_take_and_a_put_reports_itself():
    """A watch of the current steps taken waits: a put does not end it (the put's own reply
    carries the report, with the groups held), a take does; a watch of an older count returns
    at once."""
    buffer = GroupBuffer.__ray_actor_class__(
        algorithm=AlgorithmConfig(), buffer=BufferConfig(capacity_groups=64), group_size=N, pad_token_id=0,
        max_wire_bytes=2**20)

    async def scenario():
        waiting = asyncio.create_task(buffer.watch(0, 0))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # nothing changed yet
        counts = await buffer.put(wire.encode(scored_batch(["g0", "g1"], N)), 0)
        first, settled, status = counts["report"]
        assert (counts["held"], first, settled, status.held) == (2, 0, [], 2)
        assert "report" not in await buffer.put(wire.encode(scored_batch(["g2"], N)))  # no acked: counts only
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()  # puts do not wake the watch
        batch, metrics = await buffer.take(2, learner_step=0, timeout_s=1.0)
        assert batch is not None and metrics
        _, _, status = await waiting
        assert status.steps_taken == 1
        assert (await buffer.watch(0, 0))[2].steps_taken == 1  # already past: at once

    asyncio.run(scenario())


def test_buffer_reports_repeat_settled_groups_until_acknowledged():
    """A report the driver drops (its watch cancelled at a stop) loses nothing: the settled
    groups come again in every report until a later call acknowledges them by count."""
    buffer = GroupBuffer.__ray_actor_class__(
        algorithm=AlgorithmConfig(), buffer=BufferConfig(capacity_groups=64), group_size=N, pad_token_id=0,
        max_wire_bytes=2**20)

    async def scenario():
        await buffer.put(wire.encode(scored_batch(["g0", "g1", "g2"], N)))
        await buffer.take(2, learner_step=0, timeout_s=1.0)
        first, settled, status, _ = buffer.report(0, trained_steps=1)  # the loop confirms step 0
        assert first == 0 and [(u, o) for u, o, _ in settled] == [("g0", "trained"), ("g1", "trained")]
        assert status.trained == 2 and status.steps_taken == 1
        assert buffer.report(0)[:2] == (0, settled)  # not acknowledged: the same entries again
        first, again, _ = await buffer.watch(0, 1)  # one acknowledged: the second comes back
        assert (first, again) == (1, settled[1:])
        assert buffer.report(2)[:2] == (2, [])
        assert buffer.report(1)[:2] == (2, [])  # an older count never brings entries back

    asyncio.run(scenario())
