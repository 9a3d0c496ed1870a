"""dispatch.HookCall: the hot path's hook calls give what pluggy's own call gives.

Each case builds a plugin manager on geproxy's hookspecs and asks both ways: through
``HookCall`` and through pluggy (``pm.hook.NAME(**kwargs)``), with the same plugins.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Iterator, Optional

import pluggy
import pytest

from geproxy import hookimpl
from geproxy.models import Context, Headers, Record, Request, Response
from geproxy.policy import hookcall as dispatch
from geproxy.policy import hookspecs
from geproxy.policy.hookcall import HookCall
from geproxy.policy.plugins import Hooks
from geproxy.testing import curl, wait_for_records

CTX = Context(client_addr=("127.0.0.1", 40000), server_addr=("127.0.0.1", 3128), config=None)
REQUEST = Request("GET", "http://a.test/", "HTTP/1.1", Headers([("Host", "a.test")], frozen=True),
                  "http", "a.test", 80, "/")


def manager(*plugins: Any) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    return pm


class Answer:
    """on_request answering ``status`` (None: no answer); records that it was asked."""

    def __init__(self, status: Optional[int], asked: list[str], name: str) -> None:
        self.status, self.asked, self.name = status, asked, name

    @hookimpl
    def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
        self.asked.append(self.name)
        return Response(self.status) if self.status else None


def both(pm: pluggy.PluginManager, name: str, *args: Any) -> tuple[Any, Any]:
    """(HookCall's outcome, pluggy's), each a result or the exception raised."""
    call = HookCall(pm, name)
    outcomes = []
    for how in (lambda: call(*args),
                lambda: getattr(pm.hook, name)(**dict(zip(call.argnames, args, strict=True)))):
        try:
            outcomes.append(how())
        except Exception as exc:  # compared below, type and message
            outcomes.append((type(exc), str(exc)))
    return outcomes[0], outcomes[1]


def test_firstresult_stops_at_the_first_answer_in_pluggys_order():
    asked_direct: list[str] = []
    pm = manager(Answer(None, asked_direct, "first"), Answer(403, asked_direct, "second"),
                 Answer(200, asked_direct, "third"))
    direct, through_pluggy = both(pm, "on_request", CTX, REQUEST)
    # pluggy calls the last registered first: "third" answers and nothing else is asked.
    assert direct.status == through_pluggy.status == 200
    assert asked_direct == ["third", "third"]


def test_tryfirst_and_trylast_keep_their_places():
    asked: list[str] = []

    class Early(Answer):
        @hookimpl(tryfirst=True)
        def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
            return super().on_request(ctx, request)

    class Late(Answer):
        @hookimpl(trylast=True)
        def on_request(self, ctx: Context, request: Request) -> Optional[Response]:
            return super().on_request(ctx, request)

    pm = manager(Early(None, asked, "early"), Answer(None, asked, "middle"),
                 Late(401, asked, "late"))
    direct, through_pluggy = both(pm, "on_request", CTX, REQUEST)
    assert direct.status == through_pluggy.status == 401
    assert asked == ["early", "middle", "late"] * 2


def test_an_implementation_taking_fewer_arguments_gets_its_own():
    seen: list[tuple[Any, ...]] = []

    class HostOnly:
        @hookimpl
        def resolve(self, port: int, host: str) -> list[tuple[str, int]]:
            seen.append((port, host))
            return [("127.0.0.1", port)]

    pm = manager(HostOnly())
    direct, through_pluggy = both(pm, "resolve", CTX, "a.test", 8080)
    assert direct == through_pluggy == [("127.0.0.1", 8080)]
    assert seen == [(8080, "a.test")] * 2


def test_a_hook_without_firstresult_collects_every_answer():
    class Answers:
        def __init__(self, value: Any) -> None:
            self.value = value

        @hookimpl
        def on_response(self, ctx: Context, request: Request, response: Response) -> Any:
            return self.value

    pm = manager(Answers(1), Answers(None), Answers(3))
    direct, through_pluggy = both(pm, "on_response", CTX, REQUEST, Response(200))
    assert direct == through_pluggy == [3, 1]


def test_an_exception_goes_to_the_caller_and_stops_the_others():
    asked: list[str] = []

    class Raises:
        @hookimpl
        def on_request(self, ctx: Context, request: Request) -> None:
            asked.append("raises")
            raise ValueError("refused here")

    pm = manager(Answer(200, asked, "never"), Raises())
    direct, through_pluggy = both(pm, "on_request", CTX, REQUEST)
    assert direct == through_pluggy == (ValueError, "refused here")
    assert asked == ["raises", "raises"]


def test_plugins_registered_or_unregistered_later_are_seen():
    asked: list[str] = []
    pm = manager(Answer(None, asked, "first"))
    call = HookCall(pm, "on_request")
    assert call(CTX, REQUEST) is None
    later = Answer(204, asked, "later")
    pm.register(later)
    assert call(CTX, REQUEST).status == 204
    pm.unregister(later)
    assert call(CTX, REQUEST) is None
    assert asked == ["first", "later", "first"]


def test_a_wrapper_makes_the_call_pluggys_own():
    asked: list[str] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def on_request(self, ctx: Context, request: Request) -> Iterator[None]:
            answer = yield
            asked.append("wrapper")
            return answer or Response(418)

    pm = manager(Answer(None, asked, "plain"), Wrapper())
    direct, through_pluggy = both(pm, "on_request", CTX, REQUEST)
    assert direct.status == through_pluggy.status == 418
    assert asked == ["plain", "wrapper"] * 2


def test_hook_call_monitoring_sees_every_call():
    asked: list[str] = []
    pm = manager(Answer(200, asked, "plain"))
    call = HookCall(pm, "on_request")
    call(CTX, REQUEST)  # planned: direct
    monitored: list[str] = []
    undo = pm.add_hookcall_monitoring(lambda name, impls, kwargs: monitored.append(name),
                                      lambda outcome, name, impls, kwargs: None)
    assert call(CTX, REQUEST).status == 200
    undo()
    assert call(CTX, REQUEST).status == 200
    assert monitored == ["on_request"]
    assert asked == ["plain"] * 3


def test_pluggys_private_names_are_where_dispatch_reads_them():
    """dispatch.py reads two private names of pluggy to tell whether a manager's calls are
    observed. setup.py pins pluggy to the versions this passed on: a pluggy that moves them
    fails here, where the proxy would only have lost its fast path."""
    pm = manager(Answer(200, [], "plain"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fallback's warning fails the test too
        assert dispatch.unobserved(pm), (
            f"pluggy {pluggy.__version__}: _callers._multicall is not "
            "PluginManager._inner_hookexec any more: see dispatch.py")
        undo = pm.add_hookcall_monitoring(lambda *args: None, lambda *args: None)
        assert not dispatch.unobserved(pm)
        undo()
        assert dispatch.unobserved(pm)
        undo = pm.enable_tracing()
        assert not dispatch.unobserved(pm)
        undo()
        assert dispatch.unobserved(pm)


def test_without_pluggys_private_names_every_call_goes_through_pluggy(monkeypatch):
    """A pluggy without the names dispatch.py reads: calls still give pluggy's answer, by
    pluggy's own path, and a warning says why they are slower."""
    monkeypatch.setattr(dispatch, "_PLAIN_EXEC", None)
    asked: list[str] = []
    pm = manager(Answer(None, asked, "first"), Answer(204, asked, "second"))
    call = HookCall(pm, "on_request")
    with pytest.warns(RuntimeWarning, match="every hook call goes through pluggy"):
        assert call(CTX, REQUEST).status == 204
    assert asked == ["second"]


def test_observers_are_isolated_and_named(caplog):
    """Hooks.on_close: every observer is called, whatever the one before it raised."""
    seen: list[str] = []

    class Fails:
        @hookimpl
        def on_close(self, ctx: Context, record: Record) -> None:
            raise RuntimeError("observer bug")

    class Counts:
        @hookimpl
        def on_close(self, record: Record) -> None:  # fewer arguments than the spec
            seen.append(record.method)

    pm = manager(Counts())
    pm.register(Fails(), name="failing-plugin")
    hooks = Hooks(pm)
    with caplog.at_level(logging.ERROR, logger="geproxy.policy.plugins"):
        hooks.on_close(CTX, Record(CTX, method="GET"))
    assert seen == ["GET"]
    assert "on_close of failing-plugin failed" in caplog.text


def test_a_plugin_registered_on_a_running_proxy_is_called(proxy_factory, origin):
    proxy = proxy_factory()
    out = curl("-sS", "-x", proxy.url, origin.url("/"))
    assert out.returncode == 0, out.stderr
    wait_for_records(proxy, 1)
    connects: list[str] = []

    class Late:
        @hookimpl
        def on_connect(self, ctx: Context) -> None:
            connects.append(ctx.client_addr[0])

    proxy.server.pm.register(Late())
    out = curl("-sS", "-x", proxy.url, origin.url("/"))
    assert out.returncode == 0, out.stderr
    assert connects == ["127.0.0.1"]


@pytest.mark.parametrize("name", ["on_connect", "on_request", "route", "resolve",
                                  "on_response", "on_close", "on_disconnect",
                                  "on_tls_handshake"])
def test_the_spec_argument_order_is_what_hooks_passes(name):
    """Hooks passes arguments positionally in the spec's order: the spec must not change
    order unnoticed."""
    expected = {
        "on_connect": ("ctx",), "on_request": ("ctx", "request"),
        "route": ("ctx", "request"), "resolve": ("ctx", "host", "port"),
        "on_response": ("ctx", "request", "response"), "on_close": ("ctx", "record"),
        "on_disconnect": ("ctx",), "on_tls_handshake": ("ctx", "error"),
    }
    assert HookCall(manager(), name).argnames == expected[name]
