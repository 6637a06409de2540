"""The auth helper's own answers: whole HTTP/1.1 responses, small HTML pages, escaped."""

from __future__ import annotations

from collections.abc import Iterable
from html import escape

__all__ = ["page", "redirect", "REASONS"]

REASONS = {
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    502: "Bad Gateway",
}

_STYLE = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;background:#f4f6f8;color:#1d2733;"
    "margin:0}main{max-width:36em;margin:12vh auto;background:#fff;border-radius:8px;"
    "box-shadow:0 1px 4px rgba(0,0,0,.12);padding:2em 2.5em}h1{font-size:1.4em;margin-top:0}"
    "a.button{display:inline-block;background:#2563eb;color:#fff;padding:.5em 1.2em;border-radius:4px;"
    "text-decoration:none}footer{margin-top:2em;color:#6b7785;font-size:.8em}"
)

_SECURITY_HEADERS = (
    b"Cache-Control: no-store\r\n"
    b"X-Frame-Options: DENY\r\n"
    b"X-Content-Type-Options: nosniff\r\n"
    b"Referrer-Policy: no-referrer\r\n"
    b"Content-Security-Policy: default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'\r\n"
)


def _response(status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes, close: bool, headOnly: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, "Error").encode())]
    for name, value in headers:
        lines.append(name + b": " + value + b"\r\n")
    lines.append(b"Content-Length: %d\r\n" % len(body))
    if close:
        lines.append(b"Connection: close\r\n")
    lines.append(_SECURITY_HEADERS)
    lines.append(b"\r\n")
    if not headOnly:
        lines.append(body)
    return b"".join(lines)


def page(
    status: int,
    title: str,
    message: str,
    *,
    link: str | None = None,
    linkText: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    close: bool = False,
    headOnly: bool = False,
) -> bytes:
    """A whole response: an HTML page with ``title``, ``message`` and an optional link."""
    action = ""
    if link is not None:
        action = f'<p><a class="button" id="action" href="{escape(link)}">{escape(linkText or link)}</a></p>'
    body = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main><h1 id="title">{escape(title)}</h1><p id="message">{escape(message)}</p>{action}'
        "<footer>DIT4C</footer></main></body></html>\n"
    ).encode()
    allHeaders = [(b"Content-Type", b"text/html; charset=utf-8"), *headers]
    return _response(status, allHeaders, body, close, headOnly)


def redirect(location: str, *, headers: Iterable[tuple[bytes, bytes]] = (), close: bool = False) -> bytes:
    """A ``303 See Other`` to ``location`` (ASCII)."""
    return _response(303, [(b"Location", location.encode("ascii")), *headers], b"", close, True)
