"""What the node's features declare (`protocol.Feature`), gathered into the tables every
connection reads: the ops, the ops an overloaded node sheds, and the urgent ops, with a quick
look at an undecoded frame for whether it may name one (so that the socket's read callback
decodes only those)."""

from __future__ import annotations

from collections.abc import Iterable

from realtime_safety.protocol import Feature, Op, Start


class UrgentOps:
    def __init__(self, features: Iterable[Feature], shed: frozenset[str]) -> None:
        self.ops: dict[str, Start] = {}
        for feature in features:
            assert feature.urgent.keys() <= feature.ops.keys(), "an urgent op is an op too"
            self.ops.update(feature.urgent)
        assert not shed & self.ops.keys(), "an urgent op is never shed"
        self._text = tuple(self.ops)
        self._bytes = tuple(name.encode() for name in self.ops)

    def mentioned(self, data: str | bytes) -> bool:
        """Whether `data` (a JSON or msgpack frame) has an urgent op's name in it."""
        if isinstance(data, str):
            return any(name in data for name in self._text)
        return any(name in data for name in self._bytes)


def op_tables(features: list[Feature]) -> tuple[dict[str, Op], frozenset[str], UrgentOps]:
    """Every feature's ops (each declared once), those shed first (never an alert op) and
    the urgent ones."""
    ops: dict[str, Op] = {}
    for feature in features:
        clash = ops.keys() & feature.ops.keys()
        assert not clash, f"ops declared twice: {sorted(clash)}"
        ops.update(feature.ops)
    shed = frozenset().union(*(f.shed for f in features))
    return ops, shed, UrgentOps(features, shed)
