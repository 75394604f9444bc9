"""Benchmarks: measured, never asserted (`python -m realtime_safety.loadtests --help`).

Offers:
- `loadtests.compare` — fan-out and idle, ours vs the python-socketio + Redis peer vs the raw
  `websockets` ceiling, in one run; results as JSON, Markdown and PNG;
- `loadtests.chat` — rooms of a few members, everyone posting: latency against load;
- `loadtests.store`, `loadtests.presence`, `loadtests.alerts` — one subsystem each;
- `loadtests.targets` — the servers compared and how to start them (`Servers`);
- `loadtests.clients` — the picows benchmark sockets;
- `loadtests.fakeproviders` — recording FCM/Twilio stand-ins (also used by the tests).
"""
