"""The baseline: a bare aiohttp server that reads the POST body and answers 200 (no checks, no storage).

Run by bench/ingest.py in its own process: `python bench/_bare_server.py --port P`.
"""

from __future__ import annotations

import argparse
import itertools

from aiohttp import web

from declic_gateway.cli.listen import event_loop

_ids = itertools.count(1)


async def handle(request: web.Request) -> web.Response:
    await request.read()
    # The same shape of answer as Declic's, so both responses cost the client the same.
    return web.json_response({"status": "accepted", "id": next(_ids)})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/hooks/{source}", handle)
    # The event loop `declic serve` runs on: the ratio compares the servers, not the loops.
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=event_loop())


if __name__ == "__main__":
    main()
