"""What the hooks and the plugins behind them cost a keep-alive request, without sockets.

    python bench/hooks_hot.py                # 20,000 requests per config, best of 5
    python bench/hooks_hot.py --requests 50000 --repeat 7

For each configuration of bench/features.py (audited, no access log, no rules, no metrics,
core only), the plugins are loaded and configured as the proxy does it
(`geproxy.policy.plugins.load`) and the hook calls of one plain keep-alive GET are made in
the proxy's order, through the core's own `Hooks`: `on_request`, `route`, `on_response`,
`on_progress`, `on_close`, with the Context, Request, Response and Record the proxy would
pass (the bench's wrk request, nginx's answer; a JSON access log really written to a file
in a temp dir). The table gives µs per request for each hook and in all, the best of
`--repeat` rounds: the price of each feature's plugins on the hot path, measured apart from
the noise of a rate (bench/features.py measures the same steps under load).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import core_hot
import features

from geproxy.models import Context, Record, Response
from geproxy.policy.plugins import Hooks, load
from geproxy.protocol import http11
from geproxy.protocol.semantics import response_fields
from geproxy.serve.generation import unconfigure

HOOKS = ("on_request", "route", "on_response", "on_progress", "on_close")


def calls(hooks: Hooks, config: Any) -> dict[str, Callable[[], object]]:
    """Each hook's call for one request, its arguments made once (a new Record each time
    for the two that read it, as the proxy makes one per request)."""
    request = http11.RequestHeadParser(65536).feed(core_hot.WRK)
    response = http11.ResponseHeadParser(65536).feed(core_hot.NGINX)
    assert request is not None and response is not None
    ctx = Context(client_addr=("127.0.0.1", 40000), server_addr=("127.0.0.1", 3128),
                  config=config, conn_id="c1", identity=hooks)
    ctx.requests = 2  # a request after the connection's first

    def record() -> Record:
        made = Record(ctx, method="GET", target=request.target, version="HTTP/1.1",
                      status=200, upstream_addr=("127.0.0.1", 8080), bytes_in=41,
                      bytes_out=221, request=request,
                      content_type="application/octet-stream")
        made.finish()
        return made

    edited = Response(200, response_fields(response, "geproxy"), b"", "", "HTTP/1.1")

    def on_request() -> object:
        return hooks.on_request(ctx, request)

    def route() -> object:
        return hooks.route(ctx, request)

    def on_response() -> object:
        return hooks.on_response(ctx, request, edited)

    def on_progress() -> object:
        return hooks.on_progress(ctx, record(), 41, 221)

    def on_close() -> object:
        return hooks.on_close(ctx, record())

    return {"on_request": on_request, "route": route, "on_response": on_response,
            "on_progress": on_progress, "on_close": on_close}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    if not 1 <= args.requests <= 10**6 or not 1 <= args.repeat <= 20:
        parser.error("--requests 1-1000000, --repeat 1-20")
    print("| config | " + " | ".join(HOOKS) + " | all, µs |")
    print("|---|" + "---:|" * (len(HOOKS) + 1))
    with tempfile.TemporaryDirectory(prefix="geproxy-hooks-") as tmp:
        for step in features.STEPS:
            home = Path(tmp) / step.replace(" ", "-")
            home.mkdir()
            path = home / "geproxy.ini"
            path.write_text(features.config(step, 3128, home))
            pm, config = load(str(path))
            try:
                made = calls(Hooks(pm), config)
                took = {name: core_hot.measure(call, args.requests, args.repeat)
                        for name, call in made.items()}
            finally:
                unconfigure(pm, config)
            # The Record made for on_progress and on_close is the proxy's too: counted in.
            cells = [f"{took[name]:.2f}" for name in HOOKS]
            print(f"| {step} | " + " | ".join(cells) + f" | {sum(took.values()):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
