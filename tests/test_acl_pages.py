"""``geproxy_plugins.acl.pages``: error page templates, their checks at load, the rendering of
every field, HTML escaping, Accept negotiation and the plain-text variants.

No proxy runs here: the pages module does no I/O once loaded, and these tests call it as the
``acl`` plugin does, with template files written under ``tmp_path``.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path

import pytest
from geproxy_plugins.acl.pages import (
    FIELDS,
    HTML_TYPE,
    MAX_TEMPLATE_SIZE,
    TEXT_TYPE,
    ErrorPages,
    PageFields,
    Template,
    accept_of,
    prefers_html,
)

from geproxy import Headers

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "etc" / "errors"

WHEN = datetime.datetime(2026, 12, 7, 19, 42, 4, tzinfo=datetime.timezone(
    datetime.timedelta(hours=1)))
IMF_WHEN = "Mon, 07 Dec 2026 18:42:04 GMT"

BROWSER = ("text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,"
           "*/*;q=0.8")
EVERY_FIELD = " ".join(f"{name}=${{{name}}}" for name in FIELDS)


def _fields(**changes: object) -> PageFields:
    values: dict[str, object] = dict(
        status=403, reason="Forbidden", error="http_request_denied", request_id="w1c12-3",
        client="10.1.2.3", host="blocked.example.net", time=WHEN,
        contact="helpdesk@example.com", rule="social")
    values.update(changes)
    return PageFields(**values)  # type: ignore[arg-type]


def _write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def _pages(tmp_path: Path, html: str, text: str | None = None) -> ErrorPages:
    """ErrorPages whose default page is ``html`` (and its .txt variant ``text``)."""
    page = _write(tmp_path / "denied.html", html)
    if text is not None:
        _write(tmp_path / "denied.txt", text)
    return ErrorPages.load(page, "", ())


def _body(answer: tuple[str, bytes] | None) -> str:
    assert answer is not None
    return answer[1].decode("utf-8")


# -- rendering ---------------------------------------------------------------------------------


def test_every_field_rendered(tmp_path: Path) -> None:
    pages = _pages(tmp_path, f"<p>{EVERY_FIELD}</p>\n")
    answer = pages.render(None, _fields(), "text/html")
    assert answer is not None and answer[0] == HTML_TYPE
    assert _body(answer) == (
        "<p>status=403 reason=Forbidden error=http_request_denied request_id=w1c12-3 "
        "client=10.1.2.3 host=blocked.example.net time=" + IMF_WHEN + " "
        "contact=helpdesk@example.com rule=social</p>\n")


def test_time_is_imf_fixdate_in_utc_whatever_the_zone() -> None:
    assert _fields().values()["time"] == IMF_WHEN
    with pytest.raises(ValueError, match="aware"):
        _fields(time=datetime.datetime(2026, 12, 7, 18, 42, 4))


def test_dollar_escape_and_lone_dollars(tmp_path: Path) -> None:
    template = "$$${status} costs $$5, $5 and $( stay; ${host}$$\n$"
    pages = _pages(tmp_path, template, template)
    expected = "$403 costs $5, $5 and $( stay; blocked.example.net$\n$"
    assert _body(pages.render(None, _fields(), "text/html")) == expected
    assert _body(pages.render(None, _fields(), "text/plain")) == expected


def test_css_and_javascript_braces_are_text(tmp_path: Path) -> None:
    html = "<style>p { color: red }</style><script>if (a) { b({}) }</script>${status}"
    pages = _pages(tmp_path, html)
    assert _body(pages.render(None, _fields(), "text/html")) == html.replace("${status}", "403")


def test_rule_shown_only_when_named(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "<p>${status} ${request_id}</p>")
    for accept in ("text/html", "*/*", None):
        assert "social" not in _body(pages.render(None, _fields(), accept))
    assert "social" in _body(_pages(tmp_path, "${rule}").render(None, _fields(), "text/html"))


def test_no_pages_means_the_usual_answer() -> None:
    pages = ErrorPages.load("", "", ())
    assert not pages
    assert pages.render(None, _fields(), "text/html") is None


def test_named_page_else_default(tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    errors.mkdir()
    default = _write(tmp_path / "denied.html", "default ${status}")
    _write(errors / "blocked.html", "blocked ${host}")
    pages = ErrorPages.load(default, str(errors), ["blocked", "blocked"])
    assert pages
    assert _body(pages.render("blocked", _fields(), "text/html")) == (
        "blocked blocked.example.net")
    assert _body(pages.render(None, _fields(), "text/html")) == "default 403"
    with pytest.raises(KeyError):
        pages.render("other", _fields(), "text/html")
    # A named page without a default page.
    only_named = ErrorPages.load("", str(errors), ["blocked"])
    assert _body(only_named.render("blocked", _fields(), "text/html")) == (
        "blocked blocked.example.net")
    assert only_named.render(None, _fields(), "text/html") is None


def test_407_fields(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "${status} ${reason}")
    fields = _fields(status=407, reason="Proxy Authentication Required", host="")
    assert _body(pages.render(None, fields, "text/html")) == (
        "407 Proxy Authentication Required")


# -- escaping ----------------------------------------------------------------------------------


HOSTILE_HOST = "<script>alert(\"x\")</script>'&amp;.example"
HOSTILE_CLIENT = "10.0.0.1\"><img src=x onerror=alert(1)>"


def test_html_escapes_every_value(tmp_path: Path) -> None:
    html = '<a title="${host}" href=\'/${client}\'>${host}</a> ${client} ${contact}'
    pages = _pages(tmp_path, html)
    fields = _fields(host=HOSTILE_HOST, client=HOSTILE_CLIENT, contact="a & b <admin@x>")
    body = _body(pages.render(None, fields, BROWSER))
    assert "<script" not in body and "<img" not in body
    assert body == (
        '<a title="&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&amp;amp;.example" '
        "href='/10.0.0.1&quot;&gt;&lt;img src=x onerror=alert(1)&gt;'>"
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&#x27;&amp;amp;.example</a> "
        "10.0.0.1&quot;&gt;&lt;img src=x onerror=alert(1)&gt; a &amp; b &lt;admin@x&gt;")


def test_plain_text_is_not_escaped_but_loses_controls(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "<p>${host}</p>", "host: ${host}\nclient: ${client}\n")
    fields = _fields(host="a&b<c>\r\nX-Injected: 1\x1b[2J\u202eexample",
                     client="10.0.0.1\x00\x85")
    body = _body(pages.render(None, fields, "text/plain"))
    assert body == "host: a&b<c>X-Injected: 1[2Jexample\nclient: 10.0.0.1\n"


def test_html_loses_controls_too(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "${host}")
    body = _body(pages.render(None, _fields(host="a\nb\u2066c\x7f"), "text/html"))
    assert body == "abc"


# -- negotiation -------------------------------------------------------------------------------


@pytest.mark.parametrize("accept, html", [
    (None, False),                                   # no Accept: anything, so plain text
    ("*/*", False),                                  # curl, requests
    ("text/*", False),
    ("text/html", True),
    ("TEXT/HTML", True),
    (BROWSER, True),                                 # a browser's navigation
    ("text/html;q=0", False),
    ("text/html;q=0, */*", False),
    ("text/html; q=0.000, text/*", False),
    ("text/html;q=0.5, text/plain;q=0.9", False),
    ("text/html;q=0.9, text/plain;q=0.5", True),
    ("text/plain, text/html", False),                # equal: plain text
    ("text/html, text/*;q=0.9", True),
    ("text/html;q=0.1, */*", False),
    ("text/html, */*;q=0.1", True),
    ("text/html;charset=utf-8", True),
    ("text/html;charset=iso-8859-1", False),         # not what is offered
    ("text/html;level=1", False),
    ("text/html;q=2", False),                        # a malformed q-value: range ignored
    ("text/html;q=high, */*", False),
    ("*/html", False),
    ("application/json", False),                     # neither: plain text, not 406
    ("image/*, application/xhtml+xml", False),
    ("", False),
    (",,;,", False),
    ("text/html , application/xml;q=0.9", True),
    ("text/html;q=0.8;level=1, text/plain;q=0.7", True),  # after q: not a type parameter
])
def test_accept_negotiation(accept: str | None, html: bool) -> None:
    assert prefers_html(accept) is html


def test_several_accept_fields_are_one_list() -> None:
    assert accept_of(Headers([("Host", "x")], frozen=True)) is None
    headers = Headers([("Accept", "text/plain;q=0.5"), ("accept", "text/html")], frozen=True)
    assert accept_of(headers) == "text/plain;q=0.5, text/html"
    assert prefers_html(accept_of(headers)) is True


def test_negotiation_picks_content_type(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "<p>${status}</p>")
    html = pages.render(None, _fields(), BROWSER)
    text = pages.render(None, _fields(), "*/*")
    assert html == (HTML_TYPE, b"<p>403</p>")
    assert text is not None and text[0] == TEXT_TYPE


def test_long_accept_is_bounded() -> None:
    # Only the first ranges are looked at: text/html far down the list is not seen.
    assert prefers_html("a/b, " * 1000 + "text/html") is False
    assert prefers_html("text/html, " + "a/b, " * 1000) is True


# -- the plain-text variant --------------------------------------------------------------------


def test_builtin_text_without_a_txt(tmp_path: Path) -> None:
    pages = _pages(tmp_path, "<p>${rule}</p>")
    assert pages.render(None, _fields(), "*/*") == (
        TEXT_TYPE, b"403 Forbidden\nRequest id: w1c12-3\nContact: helpdesk@example.com\n")
    assert _body(pages.render(None, _fields(contact=""), None)) == (
        "403 Forbidden\nRequest id: w1c12-3\n")


def test_txt_variant_beside_a_named_page(tmp_path: Path) -> None:
    _write(tmp_path / "blocked.html", "<p>${host}</p>")
    _write(tmp_path / "blocked.txt", "${host} is blocked (${request_id}, rule ${rule})\n")
    _write(tmp_path / "other.html", "<p>${host}</p>")
    pages = ErrorPages.load("", str(tmp_path), ["blocked", "other"])
    assert pages.render("blocked", _fields(), "*/*") == (
        TEXT_TYPE, b"blocked.example.net is blocked (w1c12-3, rule social)\n")
    assert _body(pages.render("other", _fields(), "*/*")).startswith("403 Forbidden\n")
    assert _body(pages.render("blocked", _fields(), BROWSER)) == "<p>blocked.example.net</p>"


def test_txt_variant_is_checked_at_load(tmp_path: Path) -> None:
    page = _write(tmp_path / "denied.html", "${status}")
    _write(tmp_path / "denied.txt", "${stauts}")
    with pytest.raises(ValueError, match=r"denied\.txt: line 1, column 1: unknown field "
                                         r"\$\{stauts\}; did you mean \$\{status\}\?"):
        ErrorPages.load(page, "", ())


# -- errors at load ----------------------------------------------------------------------------


def test_missing_files(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.html")
    with pytest.raises(ValueError, match=rf"^{missing}: no such file$"):
        ErrorPages.load(missing, "", ())
    with pytest.raises(ValueError, match=r"blocked\.html: no such file"):
        ErrorPages.load("", str(tmp_path), ["blocked"])
    with pytest.raises(ValueError, match=r"nodir: no such directory \(error_dir\)"):
        ErrorPages.load("", str(tmp_path / "nodir"), ())
    with pytest.raises(ValueError, match=r"deny_page blocked: .* no error_dir"):
        ErrorPages.load("", "", ["blocked"])


def test_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a regular file|cannot be read"):
        ErrorPages.load(str(tmp_path), "", ())
    fifo = tmp_path / "fifo.html"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"fifo\.html: not a regular file"):
        ErrorPages.load(str(fifo), "", ())


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable(tmp_path: Path) -> None:
    page = _write(tmp_path / "denied.html", "x")
    os.chmod(page, 0)
    with pytest.raises(ValueError, match=r"denied\.html: cannot be read: Permission denied"):
        ErrorPages.load(page, "", ())


@pytest.mark.parametrize("name", ["../secret", "a/b", ".hidden", "-x", "", "a b"])
def test_bad_page_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="a page name is"):
        ErrorPages.load("", str(tmp_path), [name])


def test_too_large(tmp_path: Path) -> None:
    exact = _write(tmp_path / "exact.html", "x" * MAX_TEMPLATE_SIZE)
    ErrorPages.load(exact, "", ())
    large = _write(tmp_path / "large.html", "x" * (MAX_TEMPLATE_SIZE + 1))
    with pytest.raises(ValueError, match=r"large\.html: larger than 64 KiB"):
        ErrorPages.load(large, "", ())


def test_not_utf8(tmp_path: Path) -> None:
    page = tmp_path / "latin1.html"
    page.write_bytes("<p>\nZugriff verweigert für ${host}</p>".encode("latin-1"))
    problem = "latin1.html: not UTF-8: line 2 has the byte 0xfc (offset 24)"
    with pytest.raises(ValueError, match=re.escape(problem)):
        ErrorPages.load(str(page), "", ())


def test_byte_order_mark_dropped(tmp_path: Path) -> None:
    page = tmp_path / "bom.html"
    page.write_bytes("\ufeff${status}".encode("utf-8"))
    assert _body(ErrorPages.load(str(page), "", ()).render(None, _fields(), BROWSER)) == "403"


@pytest.mark.parametrize("text, problem", [
    ("a\n <b>${hots}</b>", "line 2, column 5: unknown field ${hots}; did you mean ${host}?"),
    ("${Status}", "line 1, column 1: unknown field ${Status}; did you mean ${status}?"),
    ("${zzz}", "line 1, column 1: unknown field ${zzz} (fields: status, reason, error, "
               "request_id, client, host, time, contact, rule)"),
    ("x $host", "line 1, column 3: '$host': a field is written ${host}, a dollar sign $$"),
    ("${host", "line 1, column 1: '${' is not closed by '}' on its line"),
    ("${host\n}", "line 1, column 1: '${' is not closed"),
    ("${}", "line 1, column 1: '${}' is not a field name"),
    ("${ host }", "line 1, column 1: '${ host }' is not a field name"),
    ("ok\n\n  ${a{b}", "line 3, column 3: '${' is not closed"),
])
def test_template_mistakes(tmp_path: Path, text: str, problem: str) -> None:
    page = _write(tmp_path / "bad.html", text)
    with pytest.raises(ValueError, match="^" + re.escape(f"{page}: {problem}")):
        ErrorPages.load(page, "", ())


def test_template_parts() -> None:
    template = Template.parse("a${host}$$b${rule}", "t.html")
    assert template.parts == ("a", "host", "$b", "rule", "")
    assert template.fields == {"host", "rule"}
    assert Template.parse("", "t.html").parts == ("",)


# -- the shipped examples ----------------------------------------------------------------------


def test_example_pages_load_and_render() -> None:
    pages = ErrorPages.load(str(EXAMPLES / "denied.html"), str(EXAMPLES), ["blocked"])
    fields = _fields(host=HOSTILE_HOST)
    for name in (None, "blocked"):
        body = _body(pages.render(name, fields, BROWSER))
        assert body.startswith("<!DOCTYPE html>")
        assert "&lt;script&gt;" in body and "<script" not in body
        assert "w1c12-3" in body and "social" not in body
        # Self-contained: nothing is fetched from anywhere.
        assert "src=" not in body and "href=" not in body and "url(" not in body
        assert "@import" not in body
