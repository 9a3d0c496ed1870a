"""Plugins for tests: a static resolver, a hook-call recorder, a record collector."""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence, Union, overload

from .. import errors, hookimpl
from ..models import Context, Record, Request, Response
from ..net.dns import literal_address


class StaticResolver:
    """A ``resolve`` plugin answering from a mapping; unknown names are NXDOMAIN.

    IP literals pass through (``None``) to the system resolver, which answers them without
    any lookup; ``localhost`` too. Counts lookups per name in ``queries``. With
    ``fallthrough=True`` unknown names pass through as well: for testing a resolver plugin
    (point it at the ``dns_server`` fixture, never at a real nameserver).
    """

    name = "static_resolver"

    def __init__(self, names: Optional[dict[str, Sequence[str]]] = None,
                 fallthrough: bool = False) -> None:
        self.names: dict[str, list[str]] = {k: list(v) for k, v in (names or {}).items()}
        self.fallthrough = fallthrough
        self.queries: dict[str, int] = {}

    def add(self, name: str, *addresses: str) -> None:
        self.names[name] = list(addresses)

    @hookimpl(tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Optional[list[tuple[Any, ...]]]:
        if host == "localhost" or literal_address(host, port) is not None:
            return None
        self.queries[host] = self.queries.get(host, 0) + 1
        if host not in self.names and self.fallthrough:
            return None
        if host not in self.names:
            raise errors.DNSError(f"{host}: not in the test resolver", rcode="NXDOMAIN")
        return [(a, port, 0, 0) if ":" in a else (a, port) for a in self.names[host]]


class HookRecorder:
    """Records every hook call, in order, as ``(hook name, detail)``.

    Its implementations are wrappers, so it sees each call whatever the other plugins answer.
    """

    name = "hook_recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.calls]

    @hookimpl(wrapper=True, tryfirst=True)
    def on_connect(self, ctx: Context) -> Any:
        self.calls.append(("on_connect", ctx.client_addr[0]))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def on_request(self, ctx: Context, request: Request) -> Any:
        self.calls.append(("on_request", f"{request.method} {request.target}"))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def route(self, ctx: Context, request: Request) -> Any:
        self.calls.append(("route", request.host))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def resolve(self, ctx: Context, host: str, port: int) -> Any:
        self.calls.append(("resolve", f"{host}:{port}"))
        return (yield)

    @hookimpl(wrapper=True, tryfirst=True)
    def on_response(self, ctx: Context, request: Request, response: Response) -> Any:
        self.calls.append(("on_response", str(response.status)))
        return (yield)

    @hookimpl
    def on_tls_handshake(self, ctx: Context, error: Optional[str]) -> None:
        self.calls.append(("on_tls_handshake", error or "ok"))

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        self.calls.append(("on_close", f"{record.method} {record.status}"))


class RecordCollector(Sequence[Record]):
    """Keeps every Record handed to ``on_close``, in the order they came, and is the sequence
    of them: ``collector[-1]``, ``len(collector)``, ``for record in collector``, slices (as
    lists). ``records`` is the list itself."""

    name = "record_collector"

    def __init__(self) -> None:
        self.records: list[Record] = []

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> list[Record]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Record, list[Record]]:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(list(self.records))  # a copy: records may arrive while a test iterates

    def __repr__(self) -> str:
        # A record's own repr holds its whole context: one line each says enough.
        shown = ", ".join(f"{r.method} {r.target} {r.status}" for r in self.records)
        return f"RecordCollector[{shown}]"

    @hookimpl
    def on_close(self, ctx: Context, record: Record) -> None:
        self.records.append(record)
