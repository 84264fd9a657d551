"""Make ``flask.session`` the stack's session (``environ["wsgistack.session"]``).

The session layer owns the cookie, the store and saving; Flask only gets a
view of the same mapping, so ``flask.session["x"] = 1`` and the layer see one
object.  The view is created without touching the session, so a request that
never reads it costs no store round trip.  Without a session layer, Flask gets
a plain dict that lives for one request.  Flask itself never sets a cookie.

Do not pair it with Flask's own cookie sessions or Flask-Session: the stack's
session layer replaces them.
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, Any

from flask.sessions import SessionInterface, SessionMixin

from middleware.base import SESSION

if TYPE_CHECKING:
    from flask import Flask, Request, Response

__all__ = ["EphemeralSession", "StackSession", "StackSessionInterface"]


class StackSession(SessionMixin):
    """A Flask session that reads and writes the stack's session object.

    ``modified``, ``new`` and ``accessed`` are the layer's (``flask.session.modified = True``
    after changing a nested value in place saves it); ``permanent`` is always true: the
    session's lifetime is the layer's timeouts, and setting it stores nothing.
    """

    def __init__(self, inner: MutableMapping[str, Any]) -> None:
        self.inner = inner

    @property
    def modified(self) -> bool:
        return bool(getattr(self.inner, "modified", False))

    @modified.setter
    def modified(self, value: bool) -> None:
        if value:
            # As Flask's own sessions: an empty new session is not stored, nor given a cookie
            # (many apps set modified on every request: every visitor would get a stored session).
            if len(self.inner) == 0 and self.new:
                return
            self.inner._changed()  # type: ignore[attr-defined]  # (also: a warning once the response started)
        else:
            self.inner.modified = False  # type: ignore[attr-defined]

    @property
    def new(self) -> bool:  # type: ignore[override]  # the layer's; Flask's is a writable attribute
        return bool(getattr(self.inner, "new", True))

    @property
    def accessed(self) -> bool:
        return bool(getattr(self.inner, "accessed", True))

    @accessed.setter
    def accessed(self, value: bool) -> None:
        self.inner.accessed = value  # type: ignore[attr-defined]

    @property
    def permanent(self) -> bool:
        return True

    @permanent.setter
    def permanent(self, value: bool) -> None:
        """Flask's ``session.permanent = True`` would store a ``_permanent`` key (and a cookie for every visitor)."""

    def __getitem__(self, key: str) -> Any:
        return self.inner[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self.inner[key] = value

    def __delitem__(self, key: str) -> None:
        del self.inner[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inner)

    def __len__(self) -> int:
        return len(self.inner)

    def rotate(self, carry: bool = True) -> None:
        """Give the session a new id, keeping its data (on a privilege change); ``carry=False``
        starts it empty (do this at login: nothing of an earlier user's session goes on)."""
        self.inner.rotate(carry=carry)  # type: ignore[attr-defined]

    def destroy(self) -> None:
        """Delete the session from the store and expire its cookie (do this at logout)."""
        self.inner.destroy()  # type: ignore[attr-defined]


class EphemeralSession(dict[str, Any], SessionMixin):
    """The session when the stack has no session layer: forgotten after the request."""

    def rotate(self, carry: bool = True) -> None:
        """Nothing to rotate: the data never leaves the request (``carry=False`` forgets it)."""
        if not carry:
            self.clear()

    def destroy(self) -> None:
        """Forget everything."""
        self.clear()


class StackSessionInterface(SessionInterface):
    """Hand Flask the stack's session; never save or set a cookie from Flask.

        app.session_interface = StackSessionInterface()
        # in a view: flask.session["user"] is environ["wsgistack.session"]["user"]
    """

    def open_session(self, app: Flask, request: Request) -> SessionMixin:
        inner = request.environ.get(SESSION)
        if inner is None:
            return EphemeralSession()
        return StackSession(inner)

    def save_session(self, app: Flask, session: SessionMixin, response: Response) -> None:
        """The session layer saves; Flask has nothing to do."""
