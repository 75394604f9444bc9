"""Presence: who is in a channel right now, across nodes and crashes (docs/protocol-v1.md,
section 6).

Offers:
- `PresenceStore` with `MemoryPresence` (embedded topology) and `RedisPresence` (shared by all
  nodes; one atomic script per join or leave, pipelined) in `presence.store`;
- `PresenceTracker` (`presence.tracker`): a node's local counts, `join`/`leave` exactly once per
  user on every node, heartbeats, reaping of dead nodes' members within
  `RT_PRESENCE_NODE_TIMEOUT_S` + `RT_PRESENCE_HEARTBEAT_S`, rebuild after a Redis restart.

Presence data is ephemeral by design: it lives only in Redis (or in the process) and is rebuilt
from the live connections.
"""
