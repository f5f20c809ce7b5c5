"""The driver's wake-ups instead of a timer. Its puts' replies carry the buffer's report, and the
learner loop's status call after each step brings the batch taken and trained and the publish (the
sync-mode runs of tests/services/test_reliability.py wait on them); `GroupBuffer.watch` covers the
one change no call of the driver's brings back, a take dropping stale groups, so in a healthy run
it stays pending and costs no call a step. An idle driver sleeps and does no work until
something moves."""

import asyncio

from bad_wire import scored_batch

from async_pmd import wire
from async_pmd.config import AlgorithmConfig, BufferConfig
from services.buffer import GroupBuffer

N = 8


def test_buffer_watch_returns_only_when_a_take_drops_stale_groups():
    """A watch waits through puts (their replies carry the report) and a take that drops nothing;
    a take that drops stale groups ends it, even a take that then finds too few fresh groups
    (the driver has to send more); a watch of an older stale count returns at once."""
    buffer = GroupBuffer.__ray_actor_class__(
        algorithm=AlgorithmConfig(), buffer=BufferConfig(capacity_groups=64, max_staleness=1), group_size=N,
        pad_token_id=0, max_wire_bytes=2**20)

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def scenario():
        waiting = asyncio.create_task(buffer.watch(0, 0))
        await settle()
        assert not waiting.done()  # nothing changed yet
        counts = await buffer.put(wire.encode(scored_batch(["g0", "g1"], N)), 0)
        first, settled, status = counts["report"]
        assert (counts["held"], first, settled, status.held) == (2, 0, [], 2)
        assert "report" not in await buffer.put(wire.encode(scored_batch(["g2"], N)))  # no acked: counts only
        batch, metrics = await buffer.take(2, learner_step=0, timeout_s=1.0)
        assert batch is not None and metrics
        await settle()
        assert not waiting.done()  # puts and a take without stale groups do not wake it
        # g2 is version 0: at step 2 its staleness is 2 > 1, dropped; then too few groups remain.
        assert await buffer.take(1, learner_step=2, timeout_s=0.05) == (None, {})
        first, settled, status = await asyncio.wait_for(waiting, 1.0)
        assert status.stale == 1 and ("g2", "stale", 0) in settled
        assert (await buffer.watch(0, 0))[2].stale == 1  # already past: at once

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
        first, again, _, _ = buffer.report(1)  # one acknowledged: the second comes back
        assert (first, again) == (1, settled[1:])
        assert buffer.report(2)[:2] == (2, [])
        assert buffer.report(1)[:2] == (2, [])  # an older count never brings entries back

    asyncio.run(scenario())
