"""Shard leases: one active folder per shard across kernel processes, kept in the KV bucket ``leases``.

Keys: ``shard.<n>`` (who folds shard ``n``) and ``member.<holder>`` (who is
alive, for the fair share). A write is a compare-and-set on the key's
revision; expiry is the bucket's ``max_age`` (the lease TTL set by
:func:`kernel.bootstrap.bootstrap`), never a comparison of client clocks.

A lease narrows, but does not remove, the window in which two kernels fold
the same shard (a paused process only learns that it lost a lease when it
next runs). Projection writes must therefore be fenced on their own KV
revision; the acquisition revision (:attr:`ShardLeases.held`) grows with
every new holder of a shard and can be recorded beside the data as a token.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import msgspec
import nats.errors
import structlog
from nats.js import JetStreamContext
from nats.js.errors import APIError, BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from kernel.errors import ConfigError, KernelError
from locator.subjects import LEASES_BUCKET

log = structlog.get_logger("noetl.kernel.leases")

OnAcquired = Callable[[int, int], Awaitable[None]]
OnLost = Callable[[int], Awaitable[None]]
Clock = Callable[[], float]

# What a flaky network or a restarting server raises; retried on the next tick.
_TRANSIENT = (nats.errors.Error, TimeoutError, OSError)
# nats-server's "wrong last sequence": a delete's compare-and-set found someone else's revision.
_WRONG_LAST_SEQUENCE = 10071
_HOLDER = re.compile(r"[A-Za-z0-9_=-]+(?:\.[A-Za-z0-9_=-]+)*")


class LeaseBucketError(KernelError):
    """The ``leases`` bucket is missing, or its TTL differs from the one this kernel was given."""


class LeaseValue(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON in a ``shard.<n>`` or ``member.<holder>`` key; the timestamps are for people, not for expiry."""

    holder: str
    acquired_at: str
    renewed_at: str


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(LeaseValue).decode


def shard_key(shard: int, group: str = "") -> str:
    """``shard.<n>``; a kernel running only some plug-ins leases in its own group: ``<group>.shard.<n>``."""
    return f"{group}.shard.{shard}" if group else f"shard.{shard}"


def member_key(holder: str, group: str = "") -> str:
    return f"{group}.member.{holder}" if group else f"member.{holder}"


async def lease_holder(kv: KeyValue, shard: int, group: str = "") -> LeaseValue | None:
    """Who holds ``shard`` right now, or ``None`` (for status pages and tests; not a fence)."""
    try:
        entry = await kv.get(shard_key(shard, group))
    except KeyNotFoundError:
        return None
    return _decode(entry.value or b"")


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class _Lease:
    token: int  # revision of the create that won the shard: the fencing token
    revision: int  # latest revision we wrote: the ``last`` of the next renewal
    acquired_at: str
    deadline: float  # clock() when the last successful write was *sent*, plus ttl


class ShardLeases:
    """Hold a fair share of ``shards`` against every other kernel using the same bucket.

    Every ``interval`` (default ``ttl / 3``) :meth:`run` renews this kernel's
    membership and its leases, drops any lease it cannot renew (``on_lost``
    at once), then acquires free shards up to the fair share
    ``ceil(len(shards) / live members)`` or releases the ones above it.

    Bounds: a kernel that stops cleanly (``stop`` set) releases at once, so a
    survivor takes over within one ``interval``. A kernel that dies keeps its
    keys until the bucket ages them out, so a survivor takes over within
    ``ttl + interval`` (plus the server's expiry timer, a fraction of a
    second). Cancelling :meth:`run` counts as dying: nothing is released.
    A holder whose renewals keep failing stops claiming a lease ``ttl``
    after the last successful renewal was sent — before the server can
    hand it to anyone else — and :attr:`held` stops listing it at that
    instant even if ``on_lost`` is still on its way.

    ``holder`` must be unique per process (for example ``<host>-<pid>``).
    The callbacks run inside the tick: keep them short (start or cancel a
    task), or renewals wait for them. Drive it with :meth:`run`, or round by
    round with :meth:`tick`, never both at once.

    >>> async def main(js: JetStreamContext, stop: asyncio.Event) -> None:
    ...     async def start(shard: int, token: int) -> None: print("fold", shard, "token", token)
    ...     async def halt(shard: int) -> None: print("stop folding", shard)
    ...     leases = ShardLeases(js, holder="kernel-a", shards=range(4), ttl=5.0, on_acquired=start, on_lost=halt)
    ...     await leases.run(stop)  # returns after stop is set and every lease is released
    """

    def __init__(
        self,
        store: KeyValue | JetStreamContext,
        *,
        holder: str,
        shards: Sequence[int],
        ttl: float,
        on_acquired: OnAcquired,
        on_lost: OnLost,
        interval: float | None = None,
        call_timeout: float | None = None,
        clock: Clock = time.monotonic,
        group: str = "",
    ) -> None:
        if group and not re.fullmatch(r"[a-z0-9_-]{1,64}", group):
            raise ConfigError(f"lease group {group!r} must be 1-64 of a-z, 0-9, '_' or '-'")
        self.group = group
        if not (len(holder) <= 128 and _HOLDER.fullmatch(holder)):
            raise ConfigError(f"lease holder id {holder!r} must be letters, digits, '-', '_', '=' or inner dots")
        if ttl <= 0:
            raise ConfigError(f"lease ttl must be positive, got {ttl}")
        interval = ttl / 3 if interval is None else interval
        # Two renewals per TTL at least, so one late tick does not cost the lease.
        if not 0 < interval <= ttl / 2:
            raise ConfigError(f"lease interval must be in (0, ttl/2] = (0, {ttl / 2}], got {interval}")
        self._store = store
        self._kv: KeyValue | None = None
        self._js: JetStreamContext | None = None
        self._stream = f"KV_{LEASES_BUCKET}"
        self._prefix = f"$KV.{LEASES_BUCKET}."
        self.holder = holder
        self.shards = tuple(sorted(set(shards)))
        self.ttl = ttl
        self.interval = interval
        self._call_timeout = ttl / 2 if call_timeout is None else call_timeout
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._clock = clock
        self._leases: dict[int, _Lease] = {}
        self._joined_at = _utc_now()
        self._log = log.bind(holder=holder)

    @property
    def held(self) -> dict[int, int]:
        """Shard -> fencing token (the revision passed to ``on_acquired``) of every lease still in force."""
        now = self._clock()
        return {shard: lease.token for shard, lease in sorted(self._leases.items()) if now < lease.deadline}

    async def run(self, stop: asyncio.Event) -> None:
        """Tick until ``stop`` is set, then release every lease and leave; cancellation releases nothing."""
        while not stop.is_set():
            await self.tick()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self._pause())
        await self.release_all()

    async def open(self) -> KeyValue:
        """Bind the bucket; raise :class:`LeaseBucketError` if it is missing or has another TTL."""
        if self._kv is None:
            try:
                if isinstance(self._store, KeyValue):
                    kv = self._store
                    # KeyValue has no stream-level calls, and counting members needs two
                    # (subject counts, subject purge): borrow the context it wraps.
                    js: JetStreamContext = kv._js
                else:
                    js, kv = self._store, await self._store.key_value(LEASES_BUCKET)
                status = await kv.status()
            except BucketNotFoundError as e:
                raise LeaseBucketError(f"KV bucket {LEASES_BUCKET!r} does not exist: bootstrap the topology first") from e
            # With a longer client TTL than the bucket's, a holder would outlive its key.
            if status.ttl is None or abs(status.ttl - self.ttl) > 1e-3:
                raise LeaseBucketError(
                    f"KV bucket {status.bucket!r} expires keys after {status.ttl or 'never'} s, "
                    f"this kernel assumes {self.ttl} s (NOETL_LEASE_TTL must match the bootstrap)"
                )
            self._stream = status.stream_info.config.name or self._stream
            self._prefix = f"$KV.{status.bucket}."
            self._js, self._kv = js, kv
        return self._kv

    async def tick(self) -> None:
        """One round: expire, renew membership and leases, then rebalance to the fair share."""
        try:
            kv = await self.open()
        except _TRANSIENT as e:
            self._log.warning("leases.unreachable", error=_describe(e))
            return
        await self._expire_overdue()
        # Membership first: if we die, it ages out no later than our shard keys, so by the
        # time those come free a survivor already counts us gone and takes them.
        await self._renew_membership(kv)
        await asyncio.gather(*(self._renew(kv, shard) for shard in list(self._leases)))
        members = await self._count_members()
        if members is None:
            return
        share = math.ceil(len(self.shards) / members)
        await self._shed(share)
        await self._acquire(kv, share)

    async def release_all(self) -> None:
        """Give every lease back (``on_lost`` first) and withdraw membership; failures just age out."""
        for shard in list(self._leases):
            await self._drop(shard, reason="released", delete=True)
        if self._js is None:
            return
        try:
            # Purge, not delete: a delete marker would still count as a member until it aged out.
            await self._call(self._js.purge_stream(self._stream, subject=self._prefix + member_key(self.holder, self.group)))
        except _TRANSIENT as e:
            self._log.warning("leases.leave_failed", error=_describe(e))

    def _pause(self) -> float:
        # Wake early for a lease about to expire, so on_lost is not late.
        now = self._clock()
        deadlines = [lease.deadline - now for lease in self._leases.values()]
        return max(0.01, min([self.interval, *deadlines]))

    async def _call(self, op: Awaitable[int] | Awaitable[bool], timeout: float | None = None) -> int:
        return int(await asyncio.wait_for(op, self._call_timeout if timeout is None else timeout))

    async def _expire_overdue(self) -> None:
        now = self._clock()
        for shard, lease in list(self._leases.items()):
            if now >= lease.deadline:
                # The server ages the key out on its own; a delete would only add traffic to an outage.
                await self._drop(shard, reason="expired", delete=False)

    async def _renew_membership(self, kv: KeyValue) -> None:
        value = _encode(LeaseValue(holder=self.holder, acquired_at=self._joined_at, renewed_at=_utc_now()))
        try:
            # Only this process writes its member key, so a plain put is enough.
            await self._call(kv.put(member_key(self.holder, self.group), value))
        except _TRANSIENT as e:
            self._log.warning("leases.membership_failed", error=_describe(e))

    async def _renew(self, kv: KeyValue, shard: int) -> None:
        lease = self._leases.get(shard)
        if lease is None:
            return
        sent = self._clock()
        value = _encode(LeaseValue(holder=self.holder, acquired_at=lease.acquired_at, renewed_at=_utc_now()))
        try:
            # Never wait past the deadline: an answer after it could not make the lease ours again.
            timeout = min(self._call_timeout, lease.deadline - sent)
            revision = await self._call(kv.update(shard_key(shard, self.group), value, last=lease.revision), timeout)
        except KeyWrongLastSequenceError:
            await self._drop(shard, reason="taken", delete=False)
            return
        except _TRANSIENT as e:
            self._log.warning("leases.renew_failed", shard=shard, error=_describe(e))
            if self._clock() >= lease.deadline:
                await self._drop(shard, reason="expired", delete=False)
            return
        lease.revision, lease.deadline = revision, sent + self.ttl

    async def _count_members(self) -> int | None:
        assert self._js is not None  # open() succeeded before any tick gets here
        own = self._prefix + member_key(self.holder, self.group)
        try:
            info = await asyncio.wait_for(
                self._js.stream_info(self._stream, subjects_filter=self._prefix + member_key(">", self.group)), self._call_timeout
            )
        except _TRANSIENT as e:
            self._log.warning("leases.members_unknown", error=_describe(e))
            return None
        # Count ourselves even if our own membership write just failed.
        return len(set(info.state.subjects or {}) | {own})

    async def _shed(self, share: int) -> None:
        for shard in sorted(self._leases, reverse=True)[: max(0, len(self._leases) - share)]:
            await self._drop(shard, reason="rebalanced", delete=True)

    async def _acquire(self, kv: KeyValue, share: int) -> None:
        for shard in self.shards:
            if len(self._leases) >= share:
                return
            if shard in self._leases:
                continue
            now = _utc_now()
            sent = self._clock()
            try:
                revision = await self._call(
                    kv.create(shard_key(shard, self.group), _encode(LeaseValue(holder=self.holder, acquired_at=now, renewed_at=now)))
                )
            except (KeyWrongLastSequenceError, KeyNotFoundError):
                continue  # held by someone else (or aged out between create's two steps): try the next
            except _TRANSIENT as e:
                # A timed-out create may still land; that key then ages out unclaimed.
                self._log.warning("leases.acquire_failed", shard=shard, error=_describe(e))
                return
            self._leases[shard] = _Lease(token=revision, revision=revision, acquired_at=now, deadline=sent + self.ttl)
            self._log.info("leases.acquired", shard=shard, revision=revision)
            await self._notify_acquired(shard, revision)

    async def _notify_acquired(self, shard: int, revision: int) -> None:
        try:
            await self._on_acquired(shard, revision)
        except Exception:
            # A shard nobody folds is worse than one folded elsewhere: give it back.
            self._log.exception("leases.on_acquired_failed", shard=shard)
            await self._drop(shard, reason="on_acquired failed", delete=True)

    async def _drop(self, shard: int, *, reason: str, delete: bool) -> None:
        """Forget ``shard`` and tell the owner (before deleting, so nobody folds it twice)."""
        lease = self._leases.pop(shard, None)
        if lease is None:
            return
        self._log.info("leases.lost", shard=shard, reason=reason, revision=lease.revision)
        try:
            await self._on_lost(shard)
        except Exception:
            self._log.exception("leases.on_lost_failed", shard=shard)
        if delete and self._kv is not None:
            await self._delete(self._kv, shard, lease.revision)

    async def _delete(self, kv: KeyValue, shard: int, revision: int) -> None:
        try:
            await self._call(kv.delete(shard_key(shard, self.group), last=revision))
        except APIError as e:
            if e.err_code != _WRONG_LAST_SEQUENCE:
                self._log.warning("leases.release_failed", shard=shard, error=_describe(e))
            # Otherwise someone else already holds it: nothing of ours to delete.
        except _TRANSIENT as e:
            self._log.warning("leases.release_failed", shard=shard, error=_describe(e))


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__

