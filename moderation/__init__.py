"""Moderation (docs/protocol.md, "Moderation"): watching channel streams, deleting, banning,
reports and the audit log. Every `mod.*` op requires the `moderator` role and every action is
audited.

Offers:
- `Moderation` (`moderation.service`): watchers and the moderation stream, deletions as
  tombstones, per-channel and global bans enforced on every node (control events) and on every
  reconnect (the store), the append-only audit log;
- `ModerationOps` (`moderation.ops`): the ops, including members' `report` of a message (with
  franking: the revealed plaintext checked against what the sender sent).

Bans, reports and the audit log are persisted through `storage`.
"""
