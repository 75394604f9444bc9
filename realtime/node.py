"""A server node: the store, the broker and hub, access control and the live connections.

Nodes are stateless apart from their sockets: everything another node must see goes through
the store (history, memberships) or the broker (messages, typing, control events).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from realtime_safety.alerts.checkin import CheckinOps, CheckinSettings
from realtime_safety.alerts.delivery import ROUTES, DeliverySettings
from realtime_safety.alerts.metrics import AlertMetrics
from realtime_safety.alerts.ops import AlertOps
from realtime_safety.alerts.pins import PinOps
from realtime_safety.alerts.providers import (
    FcmPush,
    OutboxPush,
    OutboxSms,
    PushProvider,
    SmsProvider,
    TwilioSms,
)
from realtime_safety.alerts.queue import JobQueue, RedisJobQueue, StoreJobQueue
from realtime_safety.alerts.responders import Responders
from realtime_safety.alerts.service import AlertService, AlertSettings
from realtime_safety.channels.acl import AccessControl, MembershipCache
from realtime_safety.channels.broker import Broker, BrokerUnavailable, InProcessBroker, RedisBroker
from realtime_safety.channels.hub import Hub
from realtime_safety.channels.metrics import ChannelMetrics
from realtime_safety.channels.ops import ChannelLimits, ChannelOps
from realtime_safety.channels.service import ChannelService
from realtime_safety.crypto.directory import KeyDirectory
from realtime_safety.crypto.member_log import e2ee_v2_features
from realtime_safety.crypto.ops import KeyOps
from realtime_safety.crypto.ops_v2 import DirectoryOps
from realtime_safety.moderation.ops import ModerationOps
from realtime_safety.moderation.service import Moderation
from realtime_safety.presence.ops import PresenceOps
from realtime_safety.presence.store import MemoryPresence, PresenceStore, RedisPresence
from realtime_safety.presence.tracker import PresenceTracker
from realtime_safety.protocol import CLOSE_GOING_AWAY, Feature, Session
from realtime_safety.storage import Store, StoreUnavailable, open_store

from .access import recheck_alerts
from .auth import TokenVerifier
from .config import Settings
from .features import op_tables
from .metrics import Gauges, NodeMetrics
from .overload import LoadMonitor
from .visibility import PresenceVisibility

log = logging.getLogger("realtime.node")


class StartupError(Exception):
    """The node cannot start; the message says why in one line."""


class Node:
    def __init__(
        self, settings: Settings, *, store: Store | None = None, broker: Broker | None = None
    ) -> None:
        self.settings = settings
        self.store = store or open_store(settings.store)
        if broker is None:
            broker = (
                RedisBroker(settings.redis_url, timeout_s=settings.store_timeout_s)
                if settings.redis_url
                else InProcessBroker()
            )
        self.broker = broker
        self.metrics = NodeMetrics()
        channel_metrics = ChannelMetrics(self.metrics.registry)
        self.hub = Hub(broker, self.store.messages, self._on_control, metrics=channel_metrics)
        self.memberships = MembershipCache(self.store.memberships)
        # The alert service runs on its own lane (alerts.lane): a MongoDB client is bound to
        # one event loop, so there it gets its own; the embedded store serves any loop.
        self._alert_store = open_store(settings.store) if settings.store.mongodb_uri else self.store
        self.alerts = self._alert_service(settings)
        self.moderation = Moderation(
            self.store.docs,
            self.store.messages,
            self.hub,
            self,
            kick=self._kick,
            broadcast=self.broadcast,
            spawn=self.spawn,
        )
        self.hub.on_mod = self.moderation.on_stream
        self.acl = AccessControl(self.memberships, self._can_see_alert, self.moderation.banned)
        self.keys = KeyDirectory(self.store.keys, settings.franking_key, self.store.records)
        self.channels = ChannelService(
            self.store,
            self.hub,
            timeout_s=settings.store_timeout_s,
            recovery_limit=settings.limits.recovery_limit,
            tag=self.keys.tag,
        )
        presence_store: PresenceStore = (
            RedisPresence(
                settings.redis_url,
                timeout_s=settings.store_timeout_s,
                node_timeout_s=settings.presence_node_timeout_s,
            )
            if settings.redis_url
            else MemoryPresence()
        )
        self.presence = PresenceTracker(
            presence_store,
            settings.node_id,
            self._publish_presence,
            heartbeat_s=settings.presence_heartbeat_s,
            node_timeout_s=settings.presence_node_timeout_s,
            push_limit=settings.presence_push_limit,
        )
        self._tasks: set[asyncio.Task[None]] = set()
        self.verifier = TokenVerifier(settings)
        self.connections: set[Session] = set()
        self._by_user: dict[str, set[Session]] = {}
        limits = settings.limits
        self.channel_ops = ChannelOps(
            acl=self.acl,
            hub=self.hub,
            service=self.channels,
            roster=self.presence,
            sessions=self,
            verify_envelope=self.keys.verify_envelope,
            limits=ChannelLimits(
                max_subscriptions=limits.max_subscriptions,
                max_body_bytes=limits.max_body_bytes,
                max_pending=limits.send_queue_frames,
                plaintext_namespaces=settings.plaintext_namespaces,
            ),
            metrics=channel_metrics,
            spawn=self.spawn,
        )
        # Every feature's part of the protocol, and the one op table the connections dispatch on.
        self.features: list[Feature] = [
            self.channel_ops,
            PresenceOps(
                self.presence,
                self.acl,
                PresenceVisibility(self.store, settings.presence_visibility).may_see,
            ),
            KeyOps(self.keys, self.store.keys, self.acl),
            DirectoryOps(self.store.records, settings.kt_signing_seed),
            *e2ee_v2_features(self),  # to-device messages, membership logs
            AlertOps(self.alerts),
            CheckinOps(self.alerts.checkins, self.alerts.lane),
            PinOps(self.alerts.pins, self.alerts.lane),
            ModerationOps(
                self.moderation,
                acl=self.acl,
                messages=self.store.messages,
                reports=self.store.reports,
                keys=self.keys,
            ),
        ]
        self.ops, self.sheddable, self.urgent = op_tables(self.features)
        self.load = LoadMonitor(
            settings.overload,
            queued_frames=lambda: sum(c.queued for c in self.connections),
            backend_calls=lambda: self.channels.in_flight,
            backend_latency=self.channels.slowest_s,
        )
        self.metrics.watch(
            Gauges(
                connections=lambda: len(self.connections),
                channels=lambda: self.hub.channel_count,
                queued_frames=lambda: sum(c.queued for c in self.connections),
                published=lambda: channel_metrics.published,
                shed_fraction=lambda: self.load.fraction,
                loop_lag_s=lambda: self.load.lag_s,
                shed=lambda: self.load.shed,
            )
        )
        self.draining = False
        self._idle = asyncio.Event()  # set whenever a connection goes away
        self._retention: asyncio.Task[None] | None = None

    async def start(self) -> None:
        timeout = self.settings.store_timeout_s
        try:
            async with asyncio.timeout(timeout + 1):
                await self.store.open()
        except (StoreUnavailable, TimeoutError) as exc:
            await self.store.close()
            raise StartupError(
                f"store ({self.settings.store_kind}) unavailable: {exc or 'no answer in time'}"
            ) from None
        try:
            await self.hub.start()
        except BrokerUnavailable as exc:
            await self.store.close()
            raise StartupError(f"broker unavailable: {exc}") from None
        await self.presence.start()
        await self.alerts.lane.start()
        if self._alert_store is not self.store:
            try:
                async with asyncio.timeout(timeout + 1):
                    await self.alerts.lane.run(self._alert_store.open())
            except (StoreUnavailable, TimeoutError) as exc:
                await self.stop()
                raise StartupError(
                    f"alert store unavailable: {exc or 'no answer in time'}"
                ) from None
        await self.alerts.start()
        self.load.start()
        if self.settings.retention_days:
            self._retention = asyncio.create_task(self._retention_loop(), name="retention")
        log.info(
            "node %s ready: broker=%s store=%s",
            self.settings.node_id,
            self.settings.broker_kind,
            self.settings.store_kind,
        )

    async def drain(self, code: int = CLOSE_GOING_AWAY, timeout_s: float = 10.0) -> None:
        """Close every socket with `code` and wait (bounded) for their handlers to finish."""
        self.draining = True
        for conn in list(self.connections):
            conn.close(code, "server going away")
        try:
            async with asyncio.timeout(timeout_s):
                while self.connections:
                    self._idle.clear()
                    await self._idle.wait()
        except TimeoutError:
            log.warning("%d connections did not close in time", len(self.connections))

    async def _retention_loop(self) -> None:
        """Delete messages past their namespace's retention, on every node (idempotent)."""
        while True:
            for namespace, days in self.settings.retention_days.items():
                cutoff = int((time.time() - days * 86400) * 1000)
                try:
                    deleted = await self.store.messages.purge(namespace, cutoff)
                except Exception as exc:
                    log.warning("retention of %s: failed (%s); retrying later", namespace, exc)
                    continue
                if deleted:
                    log.info("retention of %s: deleted %d messages", namespace, deleted)
            await asyncio.sleep(self.settings.retention_interval_s)

    async def stop(self) -> None:
        await self.load.stop()
        if self._retention is not None:
            self._retention.cancel()
            await asyncio.gather(self._retention, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.alerts.stop()
        if self._alert_store is not self.store:
            await self.alerts.lane.run(self._alert_store.close())
        await self.alerts.lane.stop()
        await self.presence.stop()
        await self.presence.store.close()
        await self.hub.close()
        await self.store.close()

    def spawn(self, coro: Any, name: str) -> None:
        """Run a background task owned by the node: logged if it fails, cancelled on stop."""
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    async def _publish_presence(self, channel: str, kind: str, user: str) -> None:
        try:
            await self.hub.publish_event(channel, kind, u=user)
        except BrokerUnavailable as exc:
            log.warning("presence %s of %s on %s not pushed: %s", kind, user, channel, exc)

    async def ready(self) -> dict[str, bool]:
        store_ok, broker_ok, queue_ok = await asyncio.gather(
            self.store.ping(),
            self.broker.ping(),
            self.alerts.lane.run(self.alerts.delivery.ready()),
        )
        return {
            "store": store_ok,
            "broker": broker_ok,
            "alert_queue": queue_ok,
            "accepting": not self.draining,
        }

    # --- connections ------------------------------------------------------------------

    def register(self, session: Session) -> None:
        self.connections.add(session)
        self._by_user.setdefault(session.identity.user, set()).add(session)

    def unregister(self, session: Session) -> None:
        self._idle.set()
        if session not in self.connections:
            return
        self.connections.discard(session)
        user = session.identity.user
        sessions = self._by_user.get(user)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._by_user[user]

    # `protocol.Sessions`: what features may do with the node's sessions
    def of_user(self, user: str) -> list[Session]:
        return list(self._by_user.get(user, ()))

    def every(self) -> list[Session]:
        return list(self.connections)

    async def session_started(self, session: Session) -> None:
        for feature in self.features:
            await feature.started(session)

    async def session_ended(self, session: Session) -> None:
        """Every feature lets go of the session (each one even if another fails)."""
        done = await asyncio.gather(
            *(f.ended(session) for f in self.features), return_exceptions=True
        )
        for feature, result in zip(self.features, done, strict=True):
            if isinstance(result, Exception):
                log.warning("%s: session end failed: %r", type(feature).__name__, result)

    def _kick(self, user: str, channel: str, reason: str, *, push: str = "unsubscribed") -> None:
        self.channel_ops.kick(user, channel, reason, push=push)

    async def broadcast(self, event: dict[str, Any]) -> None:
        """A control event for every node, this one included (at once)."""
        self._on_control(event)
        try:
            await self.hub.publish_control({**event, "from": self.settings.node_id})
        except BrokerUnavailable as exc:
            log.warning("control event %s not broadcast: %s", event.get("t"), exc)

    # --- cluster control events -------------------------------------------------------

    async def membership_changed(self, channel: str, user: str, added: bool) -> None:
        """Tell every node (this one included) so caches and subscriptions follow at once."""
        event = {"t": "member", "c": channel, "u": user, "added": added}
        self._on_control(event)
        try:
            await self.hub.publish_control(event)
            if not added:  # the remaining members share a new key before the next message
                await self.hub.publish_event(channel, "rekey")
        except BrokerUnavailable as exc:
            log.warning(
                "membership change not broadcast (%s); other nodes' caches are stale "
                "until their broker reconnects",
                exc,
            )

    def _alert_service(self, settings: Settings) -> AlertService:
        outbox = settings.data_dir / "outbox.jsonl"
        push: PushProvider
        sms: SmsProvider
        if settings.fcm_credentials:
            push = FcmPush(settings.fcm_credentials, settings.fcm_endpoint)
        else:
            push = OutboxPush(outbox)
        if settings.twilio_account_sid and settings.twilio_auth_token and settings.twilio_from:
            sms = TwilioSms(
                settings.twilio_account_sid,
                settings.twilio_auth_token,
                settings.twilio_from,
                settings.twilio_base_url,
            )
        else:
            sms = OutboxSms(outbox)
        redis_url = settings.redis_url
        queues: dict[str, JobQueue] = {
            route: RedisJobQueue(redis_url, route)
            if redis_url
            else StoreJobQueue(self._alert_store.docs, route)
            for route in ROUTES
        }
        return AlertService(
            self._alert_store.docs,
            queues,
            push,
            sms,
            Responders(settings.redis_url, settings.responder_ttl_s),
            self._alert_publish,
            self._online,
            AlertSettings(
                escalate_s=settings.alert_escalate_s,
                responder_radius_m=settings.responder_radius_m,
                responder_ttl_s=settings.responder_ttl_s,
                trail_days=settings.alert_trail_days,
                trigger_limit=settings.alert_trigger_limit,
                reconcile_s=settings.alert_reconcile_s,
                max_delay_s=settings.alert_max_delay_s,
                pin_attempts=settings.alert_pin_attempts,
                pin_pepper=settings.pin_pepper,
                checkin=CheckinSettings(
                    max_duration_s=settings.checkin_max_s, active_limit=settings.checkin_limit
                ),
                delivery=DeliverySettings(
                    retry_base_s=settings.alert_retry_base_s,
                    lease_s=settings.alert_lease_s,
                    provider_timeout_s=settings.alert_provider_timeout_s,
                    public_url=settings.public_url,
                    fallback_s=settings.alert_fallback_s,
                    fallback_tier_s=dict(settings.alert_fallback_tier_s),
                    apns_level=settings.alert_apns_level,
                ),
            ),
            settings.node_id,
            metrics=AlertMetrics(self.metrics.registry),
        )

    async def _alert_publish(self, target: str, push: dict[str, Any]) -> None:
        """An alert push to a channel's subscribers on every node, or to every connected
        moderator ("@moderators")."""
        if target == "@moderators":
            event = {"t": "moderators", "p": push}
            self._on_control(event)
            await self.hub.publish_control({**event, "from": self.settings.node_id})
        else:
            await self.hub.publish_event(target, "raw", p=push)

    async def _can_see_alert(self, user: str, alert_id: str, roles: frozenset[str]) -> bool:
        see = self.alerts.can_see(user, alert_id, "moderator" in roles, "responder" in roles)
        return await self.alerts.lane.run(see)

    async def _online(self, user: str) -> bool:
        try:
            return await self.presence.seems_online(user)  # invisible: never `offline`
        except Exception:
            return False

    def _on_control(self, event: dict[str, Any]) -> None:
        if event.get("t") in ("ban", "unban", "tokens"):
            if event.get("from") != self.settings.node_id:
                self.moderation.on_ban(event)
        elif event.get("t") == "moderators":
            if event.get("from") == self.settings.node_id:
                return  # delivered locally already
            frame = self.hub.frame(event["p"])
            for session in list(self.connections):
                if session.identity.is_moderator:
                    session.push(frame)
        elif event.get("t") == "contacts" and event.get("from") != self.settings.node_id:
            self.spawn(recheck_alerts(self, event.get("u")), "alerts-recheck")
        elif event.get("t") == "resync":
            # After a broker outage control events may have been missed.
            self.memberships.clear()
            self.spawn(recheck_alerts(self, None), "alerts-recheck")
        elif event.get("t") == "member":
            channel, user = event.get("c"), event.get("u")
            if not isinstance(channel, str) or not isinstance(user, str):
                return
            self.memberships.invalidate(channel, user)
            if not event.get("added"):
                self.channel_ops.kick(user, channel, "removed")
