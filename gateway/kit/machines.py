"""Opens and clicks that no person made: mail privacy proxies and link scanners.

Such fetches are stored like any other, flagged with the reasons found here, and left out of
triggers and KPIs by default. Each reason is a heuristic (sources in docs/tracking.md):

- `head`: a HEAD request. A person's browser follows a link with GET; link checkers often HEAD it.
- `no-agent`, `robot-agent`: no user agent, or one that names a security gateway (Barracuda,
  Proofpoint, Mimecast, Cisco IronPort, Trend Micro), a crawler or link previewer, or an HTTP
  library (curl, python-requests, Go-http-client...).
- `apple-mpp` (opens only): Apple Mail Privacy Protection loads every image of a message through
  Apple's proxies as it arrives, read or not, with a bare `Mozilla/5.0` user agent; Apple's own
  addresses are 17.0.0.0/8. Clicks are not affected by MPP.
- `too-soon` (clicks only): a click within `scanner_window` of sending. Gateways check links as
  the message arrives; people take longer to open a message and click.
- `burst` (clicks, flagged by the pipeline, which sees the other clicks): another link of the
  same message clicked within a couple of seconds; people click one link, scanners all of them.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import timedelta
from typing import Literal

#: Apple's own network (ARIN: Apple Inc., 17.0.0.0/8), where MPP proxies are commonly seen.
APPLE_NETWORK = ipaddress.ip_network("17.0.0.0/8")
#: What Apple's image proxy sends as its user agent: nothing more than this.
APPLE_PROXY_AGENT = "Mozilla/5.0"
#: User agents that say a program is fetching: security gateways, crawlers, previewers, HTTP libraries.
#: "cubot" is a phone brand, not a robot.
ROBOT_AGENT = re.compile(
    r"barracuda|proofpoint|mimecast|ironport|ciscosecureemail|trendmicro|trend micro|symantec|fortimail"
    r"|(?<!cu)bot(?:[/;\-_ )]|$)|crawler|spider|facebookexternalhit|preview"
    r"|python-requests|python-urllib|aiohttp|httpx|curl/|wget/|go-http-client|okhttp|java/|libwww|headlesschrome",
    re.IGNORECASE,
)


def machine_reasons(
    kind: Literal["open", "click"],
    *,
    method: str = "GET",
    user_agent: str | None,
    ip: str | None,
    after: timedelta | None = None,
    scanner_window: timedelta = timedelta(seconds=10),
) -> list[str]:
    """Why this open or click looks like a machine's; empty when it looks like a person's.

    `after` is how long after sending it came, when known.
    """
    reasons = []
    if method.upper() == "HEAD":
        reasons.append("head")
    agent = (user_agent or "").strip()
    if not agent:
        reasons.append("no-agent")
    elif ROBOT_AGENT.search(agent):
        reasons.append("robot-agent")
    if kind == "open" and (agent == APPLE_PROXY_AGENT or _in_apple_network(ip)):
        reasons.append("apple-mpp")
    if kind == "click" and after is not None and after < scanner_window:
        reasons.append("too-soon")
    return reasons


def _in_apple_network(ip: str | None) -> bool:
    try:
        return ip is not None and ipaddress.ip_address(ip.strip()) in APPLE_NETWORK
    except ValueError:
        return False
