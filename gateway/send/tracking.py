"""Declic's own open and click tracking in the HTML part of an e-mail.

The HTML is parsed with selectolax's Lexbor engine: an HTML5 parser that builds the tree a
browser or mail client builds, so the links rewritten are the links the reader sees (a regex
would also rewrite an `<a href=` inside a comment or an attribute, and miss unquoted ones), and
fast enough (a fraction of a millisecond a message, see docs/performance.md) for the send path. The text part keeps its
links as written: people who read plain text see the URL itself, and a long opaque redirect there
would hide where the link goes.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import urlsplit

from selectolax.lexbor import LexborHTMLParser, LexborNode

from . import links

#: A link longer than this is left as written: its token would make a URL some clients and proxies cut.
MAX_TRACKED_URL = 2000
#: The document's doctype token as written. Lexbor writes every doctype back as `<!DOCTYPE html>`, but
#: e-mail templates often declare XHTML 1.0 Transitional on purpose: it keeps clients in "almost
#: standards" mode, where images in table cells leave no gap. Only this one leading token is matched.
_DOCTYPE = re.compile(r"\ufeff?\s*(<!doctype\s[^>]*>)", re.IGNORECASE)
_WRITTEN_DOCTYPE = "<!DOCTYPE html>"
#: What browsers' URL parser (WHATWG URL Standard) strips from an href's ends, C0 controls and space, and
#: removes from anywhere in it, ASCII tab and newline: `https://shop.example.com/new\n?ref=x` is followed
#: as `https://shop.example.com/new?ref=x`.
_ENDS = "".join(map(chr, range(0x21)))
_TAB_OR_NEWLINE = str.maketrans("", "", "\t\n\r")
#: What no Location header may carry (aiohttp refuses to send it, and the click would be a dropped connection).
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: A transparent 1x1 GIF, the smallest image every mail client shows.
PIXEL_GIF = bytes.fromhex("47494638396101000100800000000000ffffff21f90401000000002c00000000010001000002024401003b")


@dataclass(frozen=True)
class Tracking:
    """What to track in one message, and how to name its delivery in tokens."""

    public_url: str
    secret: bytes
    contact_id: int
    delivery: str
    sent_at: datetime
    opens: bool
    clicks: bool


def track_html(html: str, tracking: Tracking) -> str:
    """The HTML with its http(s) links sent through /t/c/ and an open pixel at the end of the body."""
    tree = LexborHTMLParser(html)
    base = tracking.public_url.rstrip("/")
    if tracking.clicks:
        number = 0
        for anchor in tree.tags("a"):
            url = followed(anchor.attributes.get("href") or "")
            if url is None or not _trackable(url, base):  # a control character left: the browser's to read
                continue
            number += 1
            token = links.make_tracking_token(tracking.secret, links.CLICK, _tracked(tracking, url, number))
            anchor.attrs["href"] = f"{base}/t/c/{token}"
    if tracking.opens and tree.body is not None:
        token = links.make_tracking_token(tracking.secret, links.OPEN, _tracked(tracking))
        tree.body.insert_child(_pixel())  # a copy, imported into this document
        if tree.body.last_child is not None:
            tree.body.last_child.attrs["src"] = f"{base}/t/o/{token}"
    written = tree.html or html
    doctype = _DOCTYPE.match(html)
    if doctype and written.startswith(_WRITTEN_DOCTYPE):
        written = doctype[1] + written[len(_WRITTEN_DOCTYPE) :]
    return written


def followed(href: str) -> str | None:
    """The URL a browser follows for this href, or None when a control character is left in it."""
    url = href.strip(_ENDS).translate(_TAB_OR_NEWLINE)
    return None if _CONTROL.search(url) else url


@functools.cache
def _pixel() -> LexborNode:
    """The pixel's <img>, parsed once: each message's tree gets a copy."""
    tree = LexborHTMLParser('<img width="1" height="1" alt="" style="display:block;width:1px;height:1px;border:0">')
    node = tree.css_first("img")
    assert node is not None
    return node


def _tracked(tracking: Tracking, url: str = "", number: int = 0) -> links.Tracked:
    return links.Tracked(tracking.contact_id, tracking.delivery, tracking.sent_at, url, number)


def _trackable(url: str, base: str) -> bool:
    """http(s) links to elsewhere: mailto:, tel:, anchors and Declic's own links (unsubscribe, confirm) stay."""
    if len(url) > MAX_TRACKED_URL or url.startswith(base + "/"):
        return False
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(parts.netloc)
