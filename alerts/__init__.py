"""Safety alerts (docs/protocol.md, "Safety alerts"): triggers, live location trails, delivery
over WebSocket, FCM push and SMS with retries, per-recipient status and escalation.

Offers `AlertService` (`alerts.service`: the ops, the durable plan and the reconciler),
`Deliverer` (`alerts.delivery`: per-route workers), the queues (`alerts.queue`), the providers
(`alerts.providers`: FCM, Twilio, the development outbox) and `Responders`.
"""
