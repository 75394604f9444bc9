"""python -m realtime_safety.loadtests compare | fanout | chat | idle | store | presence | alerts
| sos-under-load | faults (see --help)"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

from . import alerts, chat, compare, presence, sos, store

TOPOLOGIES = ["redis", "embedded"]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m realtime_safety.loadtests")
    sub = parser.add_subparsers(dest="scenario", required=True)
    out = Path("loadtests/results")

    cmp_ = sub.add_parser("compare", help="fan-out: ours vs python-socketio+Redis vs raw ceiling")
    cmp_.add_argument("--subscribers", default="1000,5000", help="comma-separated")
    cmp_.add_argument("--messages", type=int, default=100)
    cmp_.add_argument("--rate", type=float, default=100.0, help="publishes per second")
    cmp_.add_argument("--targets", default="realtime,socketio,django,raw")
    cmp_.add_argument(
        "--topology",
        choices=TOPOLOGIES,
        default="redis",
        help="ours: Redis + MongoDB (the deployment), or one embedded node (in-process "
        "broker, SQLite; the peer still uses Redis)",
    )
    cmp_.add_argument("--clients", type=int, default=2, help="client processes")
    cmp_.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="server nodes on one Redis, subscribers split across them "
        "(realtime and socketio only)",
    )
    cmp_.add_argument("--timeout", type=float, default=180.0)

    fan = sub.add_parser("fanout", help="fan-out on our server only")
    fan.add_argument("--subscribers", default="1000")
    fan.add_argument("--messages", type=int, default=200)
    fan.add_argument("--rate", type=float, default=50.0)
    fan.add_argument("--topology", choices=TOPOLOGIES, default="embedded")
    fan.add_argument("--clients", type=int, default=2)
    fan.add_argument("--timeout", type=float, default=120.0)

    ch = sub.add_parser("chat", help="rooms of a few members, everyone posting")
    ch.add_argument("--clients", type=int, default=2000)
    ch.add_argument("--room-size", type=int, default=10)
    ch.add_argument(
        "--intervals", default="5", help="seconds between one client's posts (load levels, a,b,..)"
    )
    ch.add_argument("--seconds", type=float, default=20.0, help="how long everyone posts")
    ch.add_argument("--targets", default="realtime,socketio,django,raw")
    ch.add_argument("--topology", choices=TOPOLOGIES, default="redis")
    ch.add_argument("--timeout", type=float, default=180.0)

    idl = sub.add_parser("idle", help="server memory per idle connection")
    idl.add_argument("--connections", type=int, default=5000)
    idl.add_argument("--targets", default="realtime")

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
    al.add_argument("--topology", choices=TOPOLOGIES, default="redis")

    so = sub.add_parser("sos-under-load", help="SOS alert latency while chat floods the node")
    so.add_argument("--clients", type=int, default=600)
    so.add_argument("--room-size", type=int, default=10)
    so.add_argument("--interval", type=float, default=0.1, help="seconds between one's posts")
    so.add_argument("--seconds", type=float, default=20.0)
    so.add_argument("--alerts", type=int, default=20, help="alerts during the flood, 1/s")
    so.add_argument("--idle-alerts", type=int, default=10)
    so.add_argument("--topology", choices=TOPOLOGIES, default="embedded")

    fl = sub.add_parser("faults", help="inject real faults; report sent/acked/delivered/lost")
    fl.add_argument("names", nargs="*", default=["list"], help="scenario names, 'all' or 'list'")
    fl.add_argument("--scale", type=float, default=1.0, help="1.0: the README's figures")
    args = parser.parse_args()

    if args.scenario == "faults":
        return _faults(args.names, args.scale, out)

    if args.scenario in ("compare", "fanout"):
        counts = _ints(args.subscribers)
        if not (
            all(0 < c <= 20000 for c in counts) and 0 < args.messages <= 100000 and args.rate > 0
        ):
            parser.error("subscribers 1..20000, messages 1..100000, rate > 0")
        kinds = args.targets.split(",") if args.scenario == "compare" else ["realtime"]
        nodes = getattr(args, "nodes", 1)
        if nodes > 1:
            kinds = [k for k in kinds if k != "raw"]  # the ceiling is one process
            args.clients = max(args.clients, nodes)
        rows = [
            asdict(
                compare.fanout(
                    kind,
                    n,
                    args.messages,
                    args.rate,
                    clients=args.clients,
                    timeout_s=args.timeout,
                    topology=args.topology,
                    nodes=nodes,
                )
            )
            for n in counts
            for kind in kinds
        ]
        print(compare.write(rows, out, args.scenario))
        return 0
    if args.scenario == "chat":
        intervals = [float(x) for x in args.intervals.split(",") if x.strip()]
        if not (
            0 < args.clients <= 20000
            and 2 <= args.room_size <= args.clients
            and args.clients % args.room_size == 0
            and all(0.05 <= i <= 60 for i in intervals)
            and 0 < args.seconds <= 300
        ):
            parser.error("clients 1..20000 in rooms of 2.. (a divisor), intervals 0.05..60 s")
        rows = [
            asdict(
                chat.run(
                    kind,
                    args.clients,
                    args.room_size,
                    interval,
                    args.seconds,
                    topology=args.topology,
                    timeout_s=args.timeout,
                )
            )
            for interval in intervals
            for kind in args.targets.split(",")
        ]
        print(compare.write(rows, out, "chat"))
        return 0
    if args.scenario == "idle":
        if not 0 < args.connections <= 20000:
            parser.error("connections 1..20000")
        rows = [compare.idle(kind, args.connections) for kind in args.targets.split(",")]
        print(compare.write(rows, out, "idle"))
        return 0
    if args.scenario == "store":
        counts = _ints(args.publishers)
        if not (all(0 < c <= 1000 for c in counts) and 0 < args.messages <= 100000):
            parser.error("publishers 1..1000, messages 1..100000")
        print(store.report(store.run(args.backend, counts, args.messages)))
        return 0
    if args.scenario == "presence":
        if not (0 < args.rate <= 20000 and 0 < args.seconds <= 120 and 0 <= args.members <= 10**6):
            parser.error("rate 1..20000, seconds 1..120, members 0..1000000")
        measured = presence.run(args.rate, args.seconds, args.members, args.redis_url)
        print("\n".join(f"| {k} | {v} |" for k, v in asdict(measured).items()))
        return 0
    if args.scenario == "sos-under-load":
        if not (
            0 < args.clients <= 20000
            and 2 <= args.room_size <= args.clients
            and args.clients % args.room_size == 0
            and 0.05 <= args.interval <= 60
            and 0 < args.seconds <= 300
            and 0 < args.alerts <= 1000
            and 0 < args.idle_alerts <= 1000
        ):
            parser.error("clients 1..20000 in rooms of 2.. (a divisor), interval 0.05..60 s")
        result = sos.run(
            args.clients,
            args.room_size,
            args.interval,
            args.seconds,
            args.alerts,
            args.idle_alerts,
            topology=args.topology,
        )
        print("\n".join(f"| {k} | {v} |" for k, v in asdict(result).items()))
        return 0 if result.alerts_lost == 0 else 1
    if not (0 < args.alerts <= 5000 and 0 < args.rate <= 1000):
        parser.error("alerts 1..5000, rate 1..1000")
    lat = alerts.run(args.alerts, args.rate, args.topology)
    print("\n".join(f"| {k} | {v} |" for k, v in asdict(lat).items()))
    return 0 if lat.missing == 0 else 1


def _faults(names: list[str], scale: float, out: Path) -> int:
    from .faults import scenarios
    from .faults.report import HEADER

    known = scenarios()
    if names == ["list"]:
        print("\n".join(f"{name:28} {s.help}" for name, s in known.items()))
        return 0
    chosen = list(known) if names == ["all"] else names
    unknown = [n for n in chosen if n not in known]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}; try: faults list", file=sys.stderr)
        return 2
    rows = []
    for name in chosen:
        result = known[name].run(scale)
        rows.append(result)
        print(result.row(), flush=True)
    table = HEADER + "\n" + "\n".join(r.row() for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.md").write_text(table + "\n")
    print("\n" + table)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
