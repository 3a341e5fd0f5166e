"""A small prefill/decode proxy for two (or more) ``vllm serve`` engines with LayoutcConnector
(or NixlConnector: the protocol is the same).

For each OpenAI completion or chat request it asks a prefill engine for one token with
``kv_transfer_params={"do_remote_decode": true, ...}``, then sends the original request to a
decode engine with the ``kv_transfer_params`` the prefill answered, unchanged, and relays the
decode engine's answer (streamed or not).  Engines are used round robin.  Standard library
only; one thread per client connection.

    python examples/vllm_pd_proxy.py --prefill http://127.0.0.1:8100 \\
        --decode http://127.0.0.1:8200 --port 8000

See docs/vllm.md ("Serving").
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
ROUTES = ("/v1/completions", "/v1/chat/completions")
MAX_BODY = 16 << 20


class Proxy(BaseHTTPRequestHandler):
    prefill: itertools.cycle
    decode: itertools.cycle
    lock = threading.Lock()
    timeout_s = 600.0

    def _next(self, engines: itertools.cycle) -> str:
        with self.lock:
            return next(engines)

    def _send_json(self, status: int, doc: dict) -> None:
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        if self.path not in ROUTES:
            self._send_json(404, {"error": f"no route {self.path}; use {', '.join(ROUTES)}"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._send_json(400, {"error": "a JSON body of at most 16 MiB is required"})
            return
        try:
            request = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as e:
            self._send_json(400, {"error": f"bad JSON: {e}"})
            return
        if not isinstance(request, dict):
            self._send_json(400, {"error": "the body must be a JSON object"})
            return
        prefill_req = dict(request, max_tokens=1, stream=False, kv_transfer_params=PREFILL_PARAMS)
        prefill_req.pop("max_completion_tokens", None)
        prefill_req.pop("stream_options", None)
        try:
            with self._post(self._next(self.prefill), prefill_req) as resp:
                answer = json.loads(resp.read())
        except (urllib.error.URLError, json.JSONDecodeError, OSError) as e:
            self._send_json(502, {"error": f"prefill engine failed: {e}"})
            return
        params = answer.get("kv_transfer_params")
        if not isinstance(params, dict):
            self._send_json(502, {"error": "the prefill engine returned no kv_transfer_params"})
            return
        decode_req = dict(request, kv_transfer_params=params)
        try:
            resp = self._post(self._next(self.decode), decode_req)
        except urllib.error.HTTPError as e:
            self._send_json(e.code, {"error": e.read().decode(errors="replace")})
            return
        except (urllib.error.URLError, OSError) as e:
            self._send_json(502, {"error": f"decode engine failed: {e}"})
            return
        with resp:
            self.send_response(resp.status)
            self.send_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
            self.end_headers()
            while chunk := resp.read1(65536):
                self.wfile.write(chunk)
                self.wfile.flush()

    def _post(self, base: str, doc: dict):
        req = urllib.request.Request(
            base.rstrip("/") + self.path,
            data=json.dumps(doc).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        return urllib.request.urlopen(req, timeout=self.timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="prefill/decode proxy for vLLM engines")
    ap.add_argument("--prefill", action="append", required=True, help="prefill engine URL")
    ap.add_argument("--decode", action="append", required=True, help="decode engine URL")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    Proxy.prefill = itertools.cycle(args.prefill)
    Proxy.decode = itertools.cycle(args.decode)
    server = ThreadingHTTPServer((args.host, args.port), Proxy)
    print(f"proxy on http://{args.host}:{args.port}: prefill {args.prefill}, decode {args.decode}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
