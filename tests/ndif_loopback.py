"""A loopback NDIF server for tests: nnsight 0.8's client protocol, executed by nnsight's own server side.

Run as a subprocess::

    python tests/ndif_loopback.py --model FOLDER [--api-key KEY] [--inline-limit BYTES]

It binds 127.0.0.1 on a free port (port 0) and prints ``PORT <n>`` on stdout.
It loads the one model it serves from a local folder saved with
``save_pretrained`` (no network), and speaks what the nnsight 0.8 client
(``nnsight.intervention.backends.remote.RemoteBackend``) expects:

* ``GET /subscribe`` (websocket): the first frame is ``{"session_id": ...}``;
  status updates of that session's requests follow (JSON text frames; a
  COMPLETED whose result is small enough rides a binary frame holding
  ``ResponseModel.pickle()`` with the result blob as ``data``);
* ``POST /request`` (multipart): form field ``data`` holds the
  ``RequestModel`` JSON, file ``blob`` the payload; answers the RECEIVED
  ``ResponseModel`` as JSON (or 4xx with ``{"detail": ...}``);
* ``GET /response/{id}``: the latest ``ResponseModel`` of a request as JSON
  (404 before there is one), for the client's non-blocking mode;
* ``GET /result/{id}``: a staged result blob (COMPLETED carries its URL).

A result is ``torch.save`` of the values the trace saved (name -> value),
zstd-compressed when the request says ``compress``. Each request is executed
with nnsight's server side: ``RequestModel.deserialize(blob,
model._remoteable_persistent_objects(), compress)`` then
``tracer.execute(tracer.info.code)``, one request at a time.

The server cannot import ``hydra_probe``: a payload that refers to package code
by reference fails here as it would on NDIF. It stops by itself when its stdin
closes (the test process ended), after ``--idle`` seconds without a request,
after ``--lifetime`` seconds, or after ``--max-requests`` requests.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

# What NDIF does not have: the package under test. A payload must not need it.
sys.modules["hydra_probe"] = None  # type: ignore[assignment]

import torch  # noqa: E402
import tornado.httpserver  # noqa: E402
import tornado.netutil  # noqa: E402
import tornado.web  # noqa: E402
import tornado.websocket  # noqa: E402


class _Pushed(dict):
    """A frame's ``f_locals`` that remembers what the trace pushed back (its saved values)."""

    def __init__(self, shipped: dict) -> None:
        super().__init__(shipped)
        self.pushed: dict[str, Any] = {}

    def update(self, other=(), **kw) -> None:  # push() calls f_locals.update(variables)
        new = dict(other, **kw)
        self.pushed.update(new)
        super().update(new)


class Server:
    """State of the loopback server: the model, sessions, statuses and staged results."""

    def __init__(self, folder: str, name: str | None, api_key: str | None, inline_limit: int,
                 max_requests: int) -> None:
        import warnings

        import nnsight
        import transformers as tf

        hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        tok = tf.AutoTokenizer.from_pretrained(folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = nnsight.LanguageModel(hf, tokenizer=tok)
        self.persistent = self.model._remoteable_persistent_objects()
        self.names = {str(Path(folder).resolve()), folder, *([name] if name else [])}
        self.api_key = api_key
        self.inline_limit = inline_limit
        self.max_requests = max_requests
        self.n_requests = 0
        self.sessions: dict[str, tornado.websocket.WebSocketHandler] = {}
        self.responses: dict[str, str] = {}   # request id -> latest ResponseModel JSON
        self.results: dict[str, bytes] = {}   # request id -> staged result blob
        self.last_activity = time.monotonic()
        self.base_url = ""
        self.lock = asyncio.Lock()

    # ------------------------------------------------------------------ execution
    def execute(self, blob: bytes, compress: bool) -> bytes:
        """Run one request with nnsight's server side; the result blob (torch.save of the saved values)."""
        from nnsight.schema.request import RequestModel
        from nnsight.tracing.tracer import dec, inc

        tracer = RequestModel.deserialize(blob, self.persistent, compress)
        frame = tracer.info.frame
        frame.f_locals = _Pushed(frame.f_locals)
        inc()  # as the outermost trace: only saved values are pushed back
        try:
            with torch.no_grad():
                tracer.execute(tracer.info.code)
        finally:
            dec()
        buf = io.BytesIO()
        torch.save(frame.f_locals.pushed, buf, pickle_protocol=4)
        data = buf.getvalue()
        if compress:
            import zstandard as zstd

            data = zstd.ZstdCompressor(level=6).compress(data)
        return data

    def model_of(self, key: str) -> str | None:
        """The repo id a model key names (``"import.path:{json}"``), or None when unreadable."""
        try:
            return json.loads(key.split(":", 1)[1]).get("repo_id")
        except (IndexError, ValueError, AttributeError):
            return None


def _response(id: str, status: str, description: str = "", data: Any = None) -> Any:
    from nnsight.schema.response import ResponseModel, Status

    kw = {} if data is None else {"data": data}
    return ResponseModel(id=id, status=Status(status), description=description, **kw)


class Subscribe(tornado.websocket.WebSocketHandler):
    def initialize(self, server: Server) -> None:
        self.server = server
        self.session_id = ""

    def open(self) -> None:
        self.session_id = uuid.uuid4().hex
        self.server.sessions[self.session_id] = self
        self.server.last_activity = time.monotonic()
        self.write_message(json.dumps({"session_id": self.session_id}))

    def on_close(self) -> None:
        self.server.sessions.pop(self.session_id, None)


class Request(tornado.web.RequestHandler):
    def initialize(self, server: Server) -> None:
        self.server = server

    def fail(self, code: int, detail: str) -> None:
        self.set_status(code)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"detail": detail}))

    async def post(self) -> None:
        from nnsight.schema.request import RequestModel

        s = self.server
        s.last_activity = time.monotonic()
        if s.api_key and self.request.headers.get("ndif-api-key") != s.api_key:
            return self.fail(401, "missing or invalid API key (header ndif-api-key)")
        if s.n_requests >= s.max_requests:
            return self.fail(503, f"this loopback server takes at most {s.max_requests} requests")
        try:
            req = RequestModel.model_validate_json(self.get_body_argument("data"))
            blob = self.request.files["blob"][0]["body"]
        except Exception as e:  # noqa: BLE001 - any malformed request is the client's to fix
            return self.fail(400, f"malformed request: {e}")
        repo = s.model_of(req.model_key)
        if repo not in s.names:
            return self.fail(400, f"model {repo!r} is not served here; this server serves {sorted(s.names)[0]!r}")
        s.n_requests += 1
        rid = uuid.uuid4().hex
        received = _response(rid, "RECEIVED", "received")
        s.responses[rid] = received.model_dump_json()
        self.set_header("Content-Type", "application/json")
        self.finish(received.model_dump_json())
        asyncio.get_running_loop().create_task(self.run(rid, req, bytes(blob)))

    async def run(self, rid: str, req: Any, blob: bytes) -> None:
        s = self.server
        ws = s.sessions.get(req.session_id)

        def tell(resp: Any, binary: bytes | None = None) -> None:
            s.responses[rid] = resp.model_dump_json() if binary is None else \
                _response(rid, "COMPLETED", resp.description, f"{s.base_url}/result/{rid}").model_dump_json()
            if ws is not None and ws.ws_connection is not None:
                ws.write_message(binary if binary is not None else resp.model_dump_json(), binary=binary is not None)

        async with s.lock:  # one request at a time
            tell(_response(rid, "RUNNING", "running"))
            try:
                result = await asyncio.get_running_loop().run_in_executor(None, s.execute, blob, req.compress)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to the client
                tell(_response(rid, "ERROR", f"{type(e).__name__}: {e}"))
                return
            finally:
                s.last_activity = time.monotonic()
        s.results[rid] = result  # staged for download (a non-blocking client polls, then GETs it)
        if len(result) <= s.inline_limit:
            resp = _response(rid, "COMPLETED", "completed", result)
            tell(resp, resp.pickle())
        else:
            tell(_response(rid, "COMPLETED", "completed", f"{s.base_url}/result/{rid}"))


class Response(tornado.web.RequestHandler):
    def initialize(self, server: Server) -> None:
        self.server = server

    def get(self, rid: str) -> None:
        if rid not in self.server.responses:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "application/json")
        self.finish(self.server.responses[rid])


class Result(tornado.web.RequestHandler):
    def initialize(self, server: Server) -> None:
        self.server = server

    def get(self, rid: str) -> None:
        if rid not in self.server.results:
            raise tornado.web.HTTPError(404)
        self.set_header("Content-Type", "application/octet-stream")
        self.finish(self.server.results.pop(rid))


async def _watch_stdin(stop: asyncio.Event) -> None:
    """Set ``stop`` when stdin reaches EOF (the parent closed it or died)."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)
    stop.set()


async def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder of the model to serve (save_pretrained)")
    p.add_argument("--name", default=None, help="another repo id under which the model is served")
    p.add_argument("--api-key", default=None, help="require this ndif-api-key header")
    p.add_argument("--inline-limit", type=int, default=1 << 20,
                   help="results up to this many bytes ride the websocket; larger ones are staged for download")
    p.add_argument("--idle", type=float, default=120.0, help="stop after this many seconds without a request")
    p.add_argument("--lifetime", type=float, default=900.0, help="stop after this many seconds in any case")
    p.add_argument("--max-requests", type=int, default=10_000)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    server = Server(a.model, a.name, a.api_key, a.inline_limit, a.max_requests)
    kw = {"server": server}
    app = tornado.web.Application([
        (r"/subscribe", Subscribe, kw),
        (r"/request", Request, kw),
        (r"/response/([0-9a-f]+)", Response, kw),
        (r"/result/([0-9a-f]+)", Result, kw),
    ], websocket_max_message_size=1 << 30)
    sockets = tornado.netutil.bind_sockets(0, address="127.0.0.1")
    port = sockets[0].getsockname()[1]
    server.base_url = f"http://127.0.0.1:{port}"
    http = tornado.httpserver.HTTPServer(app, max_buffer_size=1 << 30, max_body_size=1 << 30)
    http.add_sockets(sockets)
    print(f"PORT {port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().create_task(_watch_stdin(stop))
    start = time.monotonic()
    while not stop.is_set():  # bounded: idle, lifetime and stdin all end it
        now = time.monotonic()
        if now - server.last_activity > a.idle and not server.lock.locked():
            break
        if now - start > a.lifetime:
            break
        try:
            await asyncio.wait_for(stop.wait(), timeout=0.5)
        except asyncio.TimeoutError:
            pass
    http.stop()
    return 0


if __name__ == "__main__":
    code = asyncio.run(main())
    sys.stdout.flush()
    import os

    os._exit(code)  # the stdin reader thread may still block; leave at once
