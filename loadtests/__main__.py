"""python -m loadtests fanout | store | presence | alerts  (--help on each)"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from . import alerts, fanout, presence, store


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests")
    sub = parser.add_subparsers(dest="scenario", required=True)
    f = sub.add_parser("fanout", help="1 publisher -> 1 channel -> N subscribers, one node")
    f.add_argument("--subscribers", type=int, default=1000)
    f.add_argument("--messages", type=int, default=200)
    f.add_argument("--rate", type=float, default=50.0, help="publishes per second")
    f.add_argument("--clients", type=int, default=2, help="client processes")
    f.add_argument("--timeout", type=float, default=120.0, help="hard stop, seconds")
    f.add_argument("--out", type=Path, default=Path("loadtests/results"))
    st = sub.add_parser("store", help="cost of one durable append, grouped and not")
    st.add_argument("--backend", choices=["sqlite", "mongodb"], default="sqlite")
    st.add_argument("--publishers", default="1,8,64", help="comma-separated concurrencies")
    st.add_argument("--messages", type=int, default=2000, help="appends per run")
    pr = sub.add_parser("presence", help="cost of join/leave on a large channel (Redis)")
    pr.add_argument("--rate", type=float, default=1000.0, help="joins per second")
    pr.add_argument("--seconds", type=float, default=5.0)
    pr.add_argument("--members", type=int, default=10000, help="members already present")
    pr.add_argument("--redis-url", default=None, help="default: start a local redis-server")
    al = sub.add_parser("alerts", help="alert.trigger -> first provider request latency")
    al.add_argument("--alerts", type=int, default=200)
    al.add_argument("--rate", type=float, default=20.0, help="triggers per second")
    al.add_argument("--topology", choices=["redis", "embedded"], default="redis")
    args = parser.parse_args()
    if args.scenario == "alerts":
        if not (0 < args.alerts <= 5000 and 0 < args.rate <= 1000):
            parser.error("alerts 1..5000, rate 1..1000")
        lat = alerts.run(args.alerts, args.rate, args.topology)
        print("\n".join(f"| {k} | {v} |" for k, v in asdict(lat).items()))
        return 0 if lat.missing == 0 else 1
    if args.scenario == "presence":
        if not (0 < args.rate <= 20000 and 0 < args.seconds <= 120 and 0 <= args.members <= 10**6):
            parser.error("rate 1..20000, seconds 1..120, members 0..1000000")
        measured = presence.run(args.rate, args.seconds, args.members, args.redis_url)
        print("\n".join(f"| {k} | {v} |" for k, v in asdict(measured).items()))
        return 0
    if args.scenario == "store":
        counts = [int(x) for x in args.publishers.split(",")]
        if not (all(0 < c <= 1000 for c in counts) and 0 < args.messages <= 100000):
            parser.error("publishers 1..1000, messages 1..100000")
        print(store.report(store.run(args.backend, counts, args.messages)))
        return 0
    if not (0 < args.subscribers <= 20000 and 0 < args.messages <= 100000 and args.rate > 0):
        parser.error("subscribers 1..20000, messages 1..100000, rate > 0")
    result = fanout.run(args.subscribers, args.messages, args.rate, args.clients, args.timeout)
    print(fanout.report(result, args.out))
    return 0 if result.delivered == result.expected else 1


if __name__ == "__main__":
    sys.exit(main())
