"""What ships for the operator's view (etc/grafana/geproxy.json, etc/prometheus/): the alert
rules pass ``promtool check rules`` and their own unit tests (``promtool test rules``, from
Debian's ``prometheus`` package), the dashboard is an importable Grafana dashboard, and
every metric and every label value that a dashboard query or a rule names is one that a real
proxy exposes, with ``workers = 1`` and ``workers = 2``.

The names are checked against the samples of a real scrape, not against the ``# HELP``
lines: a labelled counter shows no sample until it is first counted, so the proxy is first
driven through every case the queries look at (a GET, CONNECTs by name through the DNS
server, a denial by an [acl] rule, a name that does not resolve, nameservers that stop
answering, a parent that refuses). A name that only the ``# HELP`` line carried would let a
query stay empty forever unnoticed.
"""

from __future__ import annotations

import json
import re
import resource
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from geproxy.testing import (
    DNSServer,
    ProxyProcess,
    curl,
    free_port,
    kit_ini,
    require_tool,
    start_origin,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "etc" / "prometheus" / "geproxy-rules.yml"
RULES_TESTS = ROOT / "etc" / "prometheus" / "geproxy-rules.test.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "geproxy.json"

#: A metric named in a query (a histogram's or counter's sample names included).
METRIC = re.compile(r"\bgeproxy_[a-z0-9_]+")
#: A selector of a geproxy metric with its label matchers: ``geproxy_x{a="b", c=~"d|e"}``.
SELECTOR = re.compile(r"\b(geproxy_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r'([a-z_]+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
#: The suffixes a sample name adds to its family's name.
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _promtool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True,
                          timeout=30, cwd=RULES.parent)


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows included."""
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _dashboard_exprs() -> dict[str, str]:
    """The queries of every panel, and those of the template variables, by where they are
    (for the messages)."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    exprs = {f"panel {panel['title']!r} {target['refId']}": target["expr"]
             for panel in _panels(board) for target in panel.get("targets", [])}
    exprs.update({f"variable {variable['name']}": variable["query"]["query"]
                  for variable in board["templating"]["list"] if variable["type"] == "query"})
    return exprs


def _queries() -> dict[str, str]:
    """Every query shipped, by where it is (for the messages)."""
    found = {f"rule {rule.get('alert') or rule.get('record')}": rule["expr"]
             for rule in _rules()}
    found.update(_dashboard_exprs())
    return found


def _family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


# -- the files on their own ------------------------------------------------------------------


def test_promtool_accepts_the_rules():
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_the_rules_unit_tests_pass():
    """Each alert fires on the series it is for and stays silent on a healthy one
    (geproxy-rules.test.yml); promtool fails on any alert_rule_test that differs."""
    out = _promtool("test", "rules", str(RULES_TESTS))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout, out.stdout


def test_every_alert_is_unit_tested_firing_and_silent():
    """Every alert of the rules has a test where it fires and one where it does not."""
    tests = yaml.safe_load(RULES_TESTS.read_text(encoding="utf-8"))["tests"]
    fired: set[str] = set()
    silent: set[str] = set()
    for case in tests:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in _rules() if "alert" in rule}
    assert {"GeproxyWorkerRestarting", "GeproxyReloadFailing", "GeproxyDNSFailing",
            "GeproxyParentDown", "GeproxyDescriptorsNearLimit",
            "GeproxyRefusalsSpiking", "GeproxyDown"} <= alerts
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"


def test_every_alert_says_what_to_look_at():
    for rule in _rules():
        if "alert" not in rule:
            continue
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_the_dashboard_imports_into_any_grafana():
    """A Grafana dashboard model: its data source a variable (chosen at import), never a
    uid of one Grafana; every panel with a unique id, a title and its queries."""
    board = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert board["schemaVersion"] >= 36
    assert board["title"] and board["uid"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(_panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        assert panel.get("title"), panel["id"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, (
            panel["title"])
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
            assert target.get("datasource", panel["datasource"]) == panel["datasource"]
    # Laid out on Grafana's 24 columns, no panel over another.
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert cells.setdefault((x, y), panel["title"]) == panel["title"], (
                    f"{panel['title']!r} covers {cells[(x, y)]!r}")
    # No uid of a data source anywhere but the variable's.
    uids = re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text(encoding="utf-8"))
    assert set(uids) == {"${datasource}", board["uid"]}
    assert len(panels) >= 15


def test_every_dashboard_query_is_valid_promql(tmp_path):
    """promtool parses each panel's query, Grafana's variables given a value, as the
    expression of a recording rule."""
    given = {"$__rate_interval": "5m", "$__range": "1h", "$instance": ".+"}
    rules = []
    for n, expr in enumerate(_dashboard_exprs().values()):
        for variable, value in given.items():
            expr = expr.replace(variable, value)
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            expr = METRIC.findall(expr)[0]
        assert "$" not in expr, expr
        rules.append({"record": f"geproxy:dashboard_query_{n}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = _promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout, out.stdout


# -- against a real proxy --------------------------------------------------------------------


class Scrape:
    """A /metrics answer: each sample's value by (name, labels), and each sample name's
    labels with the values they took."""

    def __init__(self, text: str) -> None:
        self.values: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self.labels: dict[str, dict[str, set[str]]] = {}
        #: The host:port of the parent that refused (set by the fixture).
        self.parent = ""
        for metric in text_string_to_metric_families(text):
            for sample in metric.samples:
                self.values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
                labels = self.labels.setdefault(sample.name, {})
                for key, value in sample.labels.items():
                    labels.setdefault(key, set()).add(value)

    def total(self, name: str) -> float:
        return sum(value for (found, _), value in self.values.items() if found == name)


@pytest.fixture(scope="module", params=[1, 2], ids=["workers=1", "workers=2"])
def scraped(request, tmp_path_factory) -> Iterator[Scrape]:
    """A proxy's /metrics after traffic of every kind the queries look at."""
    workers = request.param
    origin = start_origin()
    dns = DNSServer()
    dead_parent = free_port()  # nothing listens there: the parent refuses
    dns.add("origin.test", "A", "127.0.0.1")
    dns.fail("missing.test", "NXDOMAIN")
    dns.add("slow.test", "A", "127.0.0.1")
    dns.add("stale.test", "A", "127.0.0.1", ttl=0)
    ini = kit_ini(f"""\
workers = {workers}
admin_listen = 127.0.0.1:0
[acl]
connect_ports = 1-65535
rules =
    no-blocked: deny dst blocked.test
    loopback: allow src 127.0.0.0/8
[resolver]
nameservers = {dns.nameserver}
timeout = 300ms
[dnscache]
min_ttl = 0s
[parents]
parents = http://127.0.0.1:{dead_parent}
rules =
    parent via-parent.test
""")
    path = tmp_path_factory.mktemp("observability") / "geproxy.ini"
    path.write_text(ini)
    proxy = ProxyProcess(str(path))
    try:
        assert wait_until(lambda: any("admin listener on" in line for line in proxy.log))
        line = next(line for line in proxy.log if "admin listener on" in line)
        found = re.search(r"admin listener on (\S+)", line)
        assert found is not None, line
        metrics = f"http://{found.group(1)}/metrics"
        if workers > 1:
            assert wait_until(lambda: sum(") serves" in line for line in proxy.log) >= workers)
        made = _drive(proxy, origin.port, dns)

        def scrape() -> Scrape:
            answer = requests.get(metrics, timeout=10)
            assert answer.status_code == 200, answer.text
            return Scrape(answer.text)

        # Each request is counted once its record is made, just after curl has its answer.
        assert wait_until(lambda: scrape().total("geproxy_requests_total") == made, 10)
        result = scrape()
        result.parent = f"127.0.0.1:{dead_parent}"
        yield result
    finally:
        proxy.stop()
        dns.stop()
        origin.server.stop(timeout=1)


def _drive(proxy: ProxyProcess, port: int, dns: DNSServer) -> int:
    """Real requests through ``proxy``, as many as it returns; ``port``: the origin's."""
    made = 0

    def get(host: str, *options: str) -> bytes:
        nonlocal made
        made += 1
        return curl("-i", *options, "-x", proxy.url, f"http://{host}:{port}/").stdout

    assert get("127.0.0.1").endswith(b"\r\n\r\nhello\n")
    # Tunnels by name: with two workers, one of them looks the name up twice (a hit).
    for _ in range(3):
        assert get("origin.test", "-p").endswith(b"\r\n\r\nhello\n")
    for host, status, error in (("blocked.test", 403, "http_request_denied"),
                                ("missing.test", 502, "dns_error"),
                                ("via-parent.test", 502, "connection_refused")):
        answer = get(host)
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
        assert f"error={error}".encode() in answer, answer
    # stale.test's answer (TTL 0) expires at once, and is kept for serve-stale.
    assert get("stale.test", "-p").endswith(b"\r\n\r\nhello\n")
    dns.mute = True  # the nameserver stops answering
    try:
        answer = get("slow.test")  # looked up by no worker before: the resolver's timeout
        assert answer.startswith(b"HTTP/1.1 504 "), answer
        assert b"error=dns_timeout" in answer, answer
        # The worker that looked stale.test up answers from its stale entry; the other one
        # (with workers) times out like slow.test. Bounded: each try lands on either.
        for _ in range(20):
            if get("stale.test", "-p").endswith(b"\r\n\r\nhello\n"):
                break
        else:
            raise AssertionError("no stale answer for stale.test")
    finally:
        dns.mute = False
    return made


def test_every_metric_a_query_names_is_exposed(scraped):
    missing = {where: sorted(set(METRIC.findall(expr)) - set(scraped.labels))
               for where, expr in _queries().items()}
    assert {where: names for where, names in missing.items() if names} == {}
    named = {_family(name) for expr in _queries().values() for name in METRIC.findall(expr)}
    # Every family the issue asks for is looked at somewhere.
    assert {"geproxy_requests", "geproxy_requests_in_flight", "geproxy_acl_denials",
            "geproxy_errors", "geproxy_tunnel_bytes", "geproxy_http_bytes",
            "geproxy_resolve_seconds", "geproxy_connect_seconds", "geproxy_dns_cache",
            "geproxy_workers_alive", "geproxy_reloads",
            "geproxy_reload_last_success_timestamp_seconds", "geproxy_process_open_fds",
            "geproxy_process_max_fds", "geproxy_process_resident_memory_bytes",
            "geproxy_process_cpu_seconds", "geproxy_parent_failures",
            "geproxy_process_start_time_seconds"} <= named


def test_every_label_value_a_query_filters_on_is_produced(scraped):
    """A matcher on a label value the proxy never writes would leave a query empty: each
    ``label="value"`` (and each alternative of ``label=~"a|b"``) is in the scrape, on a
    sample of that metric."""
    wrong = []
    for where, expr in _queries().items():
        for name, matchers in SELECTOR.findall(expr):
            for label, operator, value in MATCHER.findall(matchers):
                if label in {"job", "instance"}:  # Prometheus's own target labels
                    continue
                produced = scraped.labels.get(name, {}).get(label, set())
                if operator in {"=", "!="}:
                    wanted = {value}
                else:
                    assert re.fullmatch(r"[a-z0-9_.|]+", value), f"{where}: {value}"
                    wanted = set(value.split("|"))
                if wanted - produced:
                    wrong.append((where, name, label, sorted(wanted - produced)))
    assert wrong == []


def test_a_refusing_parent_is_counted_by_its_address(scraped):
    """The request routed to the parent that refuses: one failed attempt, named by the
    parent's host:port (the label an alert groups by)."""
    assert scraped.labels["geproxy_parent_failures_total"]["parent"] == {scraped.parent}
    assert scraped.values[("geproxy_parent_failures_total",
                           (("parent", scraped.parent),))] == 1


def test_each_worker_reports_its_descriptor_limit(scraped):
    """process_max_fds: each serving process's soft RLIMIT_NOFILE, which it inherits from
    the test here (geproxy changes no limit), beside its open descriptors."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    workers = scraped.labels["geproxy_process_open_fds"]["worker"]
    assert len(workers) == scraped.values[("geproxy_workers_alive", ())]
    for worker in workers:
        key = (("worker", worker),)
        assert scraped.values[("geproxy_process_max_fds", key)] == soft
        assert 0 < scraped.values[("geproxy_process_open_fds", key)] < soft


def test_the_dns_figures_the_dashboard_shows(scraped):
    """The tunnels by name went through the DNS server and the cache: lookups timed, a
    miss, a hit and a stale answer counted; the DNS failures counted by their Proxy-Status
    error (more than one timeout with workers: see _drive)."""
    for result in ("hit", "miss", "stale"):
        assert scraped.values[("geproxy_dns_cache_total", (("result", result),))] >= 1
    assert scraped.values[("geproxy_resolve_seconds_count", ())] >= 1
    assert scraped.values[("geproxy_errors_total", (("error", "dns_error"),))] == 1
    assert scraped.values[("geproxy_errors_total", (("error", "dns_timeout"),))] >= 1
    assert scraped.values[("geproxy_acl_denials_total", (("rule", "no-blocked"),))] == 1
