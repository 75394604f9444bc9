"""Safety alerts (docs/protocol.md, "Safety alerts"): triggers, live location trails, delivery
over WebSocket, FCM push and SMS with retries, per-recipient status and escalation.

Offers `AlertService` (`alerts.service`: the ops; `alerts.plan`: the durable plan as pure
functions; `alerts.reconcile`: the reconciler on every node),
`Deliverer` (`alerts.delivery`: per-route workers), the queues (`alerts.queue`), the providers
(`alerts.providers`: FCM, Twilio, the development outbox) and `Responders`.
"""
