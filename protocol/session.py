"""What a feature sees of the connection that sent a command: the session interface.

Every op of every feature is an `Op`: an async function of the calling `Session` and the
command's frame, returning the fields of its `ok` reply (or raising `ProtocolError`). A feature
package declares its ops next to its service as a `Feature` (its op table and what it does when
a session starts and ends); the server's connection implements `Session` and dispatches frames
through the table the node assembles from every feature. No feature imports the server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from .frames import Codec, Frame, ProtocolError
from .identity import Identity

T = TypeVar("T")
Reply = dict[str, Any]


class Session(Protocol):
    """One authenticated connection, as an op sees it."""

    @property
    def id(self) -> str:
        """Random per connection; shown to the client in the auth reply."""
        ...

    @property
    def identity(self) -> Identity:
        """Who is calling (the verified token; changes on `refresh`)."""
        ...

    @property
    def restricted(self) -> bool:
        """The user is banned everywhere: this session runs their own safety ops only."""
        ...

    @property
    def codec(self) -> Codec: ...

    @property
    def queued(self) -> int:
        """Frames waiting behind a full socket."""
        ...

    def send(self, obj: dict[str, Any]) -> None:
        """A reply or a push for this connection only (in order, never blocking)."""

    def push(self, frame: Frame) -> None:
        """A push shared with other connections (encoded once for all of them)."""

    def close(self, code: int, reason: str = "") -> None:
        """Close after the frames already queued."""

    async def bounded(self, call: Awaitable[T]) -> T:
        """A backend call bounded by the store timeout; a failure is `unavailable`."""
        ...

    def after_reply(self, then: Callable[[], None]) -> None:
        """Run `then` right after this command's `ok` reply is sent (e.g. a subscription's
        replay, which must follow its reply)."""


Op = Callable[[Session, dict[str, Any]], Awaitable[Reply]]
# An urgent op's start: a plain function, called from the socket's read callback, that starts
# the op's work at once (on a thread of its own: it must not wait for the event loop) and
# returns what to await for its reply.
Start = Callable[[Session, dict[str, Any]], Awaitable[Reply]]


class Sessions(Protocol):
    """The sessions open on this node (to act on a user's connections, or on every one)."""

    def of_user(self, user: str) -> list[Session]: ...

    def every(self) -> Iterable[Session]: ...


class Feature:
    """A feature's part of the protocol. Subclasses fill `ops` (op name -> handler), name the
        ops an overloaded node refuses first (`shed`: chat work, never safety work) and those that
    start as soon as their frame arrives (`urgent`), and may act
        when a session is authenticated (`started`) and when it ends (`ended`, always called, even
        after a failed start)."""

    ops: Mapping[str, Op] = {}
    shed: frozenset[str] = frozenset()
    # Ops that start the moment their frame arrives, when it is the session's next command
    # (an SOS must not wait a turn of a busy event loop); never shed. Their `ops` entry
    # stays the handler for every other case.
    urgent: Mapping[str, Start] = {}

    async def started(self, session: Session) -> None:
        return None

    async def ended(self, session: Session) -> None:
        return None


def moderator(session: Session) -> str:
    """The calling moderator's user id; `forbidden` for anyone else."""
    if not session.identity.is_moderator:
        raise ProtocolError("forbidden", "moderators only")
    return session.identity.user
