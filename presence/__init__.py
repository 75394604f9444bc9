"""Presence: who is in a channel right now, across nodes and crashes (PROTOCOL.md section 6).

Not built yet (issue 4). It will own the presence records in Redis (in-process on the
embedded topology) and offer `join`/`leave` pushes exactly once per user, heartbeats that clear
a dead node's members within 30 s, and a user's global online status.
"""
