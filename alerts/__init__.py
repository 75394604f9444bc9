"""Safety alerts (PROTOCOL.md section 7): triggers, live location trails, delivery over WebSocket,
FCM push and SMS with retries, per-recipient status and escalation.

Not built yet (issue 7). Until then `alert:` channels are readable by moderators only and the
server refuses `alert.*` ops as unknown.
"""
