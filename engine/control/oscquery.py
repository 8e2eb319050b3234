"""OSCQuery: the OSC address space as JSON over HTTP, for clients that build their controls from it.

Follows the OSCQuery proposal (github.com/Vidvox/OSCQueryProposal)::

    GET /                      the whole tree: {"FULL_PATH": "/", "CONTENTS": {"cicada": {...}}}
    GET /cicada/temperature    one node: FULL_PATH, TYPE, RANGE, VALUE, DESCRIPTION, ACCESS, CLIPMODE, UNIT
    GET /cicada/temperature?VALUE     {"VALUE": [1.0]}   (any attribute: ?TYPE, ?RANGE, ?DESCRIPTION, ...)
    GET /?HOST_INFO            {"NAME": "cicada", "OSC_PORT": 9000, "OSC_TRANSPORT": "UDP", "EXTENSIONS": {...}}

Every registry parameter is a node ``/cicada/<name>`` with ACCESS 3 (read and
write): TYPE ``f``, ``i``, ``T`` (on/off; VALUE true/false) or ``s``; RANGE
``[{"MIN": .., "MAX": ..}]`` for numbers, ``[{"VALS": [...]}]`` for a choice.
Values are read from the registry at request time. The actions (``panic``,
``select``, ``preset/load``, ...) are nodes with ACCESS 2 (write only);
``meter`` and ``spectrum`` are ACCESS 1 nodes without a VALUE (they reach
subscribers over OSC, ``/cicada/subscribe``). An unknown path answers 404, an
unknown attribute 400, an attribute the node lacks 204, each with a JSON body
that says why. Values change over OSC only (no LISTEN/websocket streaming;
subscribe over OSC instead) and the server is not advertised over zeroconf:
clients connect to ``http://<host>:<port>/`` by hand.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

from engine.control.osc import PREFIX, SPECTRUM_BANDS, allow_networks, bind_error, client_allowed
from engine.params import PROMPT_SLOTS, Param, Registry

log = logging.getLogger("cicada.osc")

DEFAULT_OSCQUERY_PORT = 9001

# the proposal's UNIT names (units.md) for the units the registry uses; others are passed as they are
_UNITS = {"dB": "gain.db", "dBFS": "gain.db", "ms": "time.ms", "s": "time.second", "Hz": "time.hz",
          "BPM": "time.bpm"}
_ATTRIBUTES = ("FULL_PATH", "CONTENTS", "TYPE", "ACCESS", "VALUE", "RANGE", "DESCRIPTION", "UNIT", "CLIPMODE",
               "TAGS", "EXTENDED_TYPE", "CRITICAL")
EXTENSIONS = {
    "ACCESS": True, "VALUE": True, "RANGE": True, "DESCRIPTION": True, "UNIT": True, "CLIPMODE": True,
    "TAGS": True, "EXTENDED_TYPE": False, "CRITICAL": False, "LISTEN": False, "PATH_CHANGED": False,
    "PATH_RENAMED": False, "PATH_ADDED": False, "PATH_REMOVED": False, "HTML": False,
}

# the action nodes: (path under /cicada/, TYPE or "", ACCESS, RANGE or None, description)
ACTIONS: tuple[tuple[str, str, int, list[dict[str, Any]] | None, str], ...] = (
    ("select", "i", 2, [{"MIN": 1, "MAX": PROMPT_SLOTS}], "Recall prompt slot N into prompt A"),
    ("panic", "T", 2, None, "Fade to silence within 50 ms and stay silent (no argument or true); false resumes"),
    ("resume", "", 2, None, "Sound again after a panic"),
    ("start", "", 2, None, "Start generation"),
    ("stop", "", 2, None, "Stop generation"),
    ("preset/load", "s", 2, None, "Load a preset by name (replies /cicada/preset/loaded <name>)"),
    ("preset/save", "ss", 2, None, "Save the current values as a preset: name, description (optional)"),
    ("preset/list", "", 2, None, "Reply /cicada/preset/list <name> <name> ..."),
    ("status", "", 2, None, "Reply /cicada/status <json>: rtf, buffer, underruns, CPU, levels, prompt"),
    ("subscribe", "i", 2, [{"MIN": 1, "MAX": 65535}],
     "Feedback (changes, meter, spectrum, status) to your IP at this port (default: the port you send from) "
     "for 30 s; renew every few seconds"),
    ("unsubscribe", "i", 2, [{"MIN": 1, "MAX": 65535}], "Stop the feedback"),
    ("ping", "", 2, None, "Reply /cicada/pong"),
    ("meter", "ffff", 1, [{"MIN": -120.0, "MAX": 0.0}],
     "Peak L, peak R, RMS L, RMS R in dB, 20 times a second, to subscribers (/cicada/subscribe)"),
    ("spectrum", "b", 1, None,
     f"{SPECTRUM_BANDS} log-spaced bands in dB (float32 little-endian), 15 times a second, to subscribers"),
)


def param_node(p: Param, value: Any) -> dict[str, Any]:
    """One parameter's OSCQuery node."""
    node: dict[str, Any] = {
        "FULL_PATH": PREFIX + p.name,
        "TYPE": p.osc_type,
        "ACCESS": 3,
        "VALUE": [value],
        "DESCRIPTION": p.description,
        "TAGS": [p.group],
    }
    if p.kind in (float, int):
        node["RANGE"] = [{"MIN": p.low, "MAX": p.high}]
        node["CLIPMODE"] = ["both"]
    elif p.choices:
        node["RANGE"] = [{"VALS": list(p.choices)}]
    if p.unit:
        node["UNIT"] = [_UNITS.get(p.unit, p.unit)]
    return node


def build_tree(registry: Registry) -> dict[str, Any]:
    """The whole namespace, with the registry's values as they are now."""
    snap = registry.snapshot()
    params = {p.name: param_node(p, snap[p.name]) for p in registry}
    contents: dict[str, Any] = dict(params)
    for path, type_, access, range_, description in ACTIONS:
        parent = contents
        parts = path.split("/")
        for i, part in enumerate(parts[:-1]):  # containers (preset/)
            sub = parent.setdefault(part, {
                "FULL_PATH": PREFIX + "/".join(parts[: i + 1]), "CONTENTS": {}, "ACCESS": 0,
                "DESCRIPTION": f"{part} actions",
            })
            parent = sub["CONTENTS"]
        node: dict[str, Any] = {"FULL_PATH": PREFIX + path, "ACCESS": access, "DESCRIPTION": description}
        if type_:
            node["TYPE"] = type_
        if range_ is not None:
            node["RANGE"] = [dict(r) for r in range_] * (len(type_) if len(range_) == 1 else 1)
        parent[parts[-1]] = node
    cicada = {"FULL_PATH": PREFIX.rstrip("/"), "CONTENTS": contents, "ACCESS": 0,
              "DESCRIPTION": "cicada: every parameter (read and write) and the engine's actions"}
    return {"FULL_PATH": "/", "CONTENTS": {"cicada": cicada}, "ACCESS": 0, "DESCRIPTION": "root"}


def find_node(tree: dict[str, Any], path: str) -> dict[str, Any] | None:
    """The node at an OSC path (``/``, ``/cicada``, ``/cicada/preset/load``), or None."""
    node = tree
    for part in (p for p in path.split("/") if p):
        contents = node.get("CONTENTS")
        if not isinstance(contents, dict) or part not in contents:
            return None
        node = contents[part]
    return node


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "cicada-oscquery"

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        owner = self.server.owner
        if not owner.allowed(self.client_address[0]):
            self._json(403, {"ERROR": "this address may not query cicada: add it to --osc-allow"})
            return
        url = urlsplit(self.path)
        query = unquote(url.query).strip()
        attribute = query.split("&")[0].split("=")[0].upper() if query else ""
        if attribute == "HOST_INFO":  # the path does not matter for HOST_INFO
            self._json(200, owner.host_info())
            return
        path = unquote(url.path) or "/"
        node = find_node(build_tree(owner.registry), path)
        if node is None:
            self._json(404, {"ERROR": f"no OSC node at {path!r}: GET / lists them all"})
        elif not attribute:
            self._json(200, node)
        elif attribute not in _ATTRIBUTES:
            self._json(400, {"ERROR": f"unknown attribute {attribute!r}: use one of {', '.join(_ATTRIBUTES)} "
                                      f"or HOST_INFO"})
        elif attribute not in node:
            self._json(204, None)
        else:
            self._json(200, {attribute: node[attribute]})

    def do_HEAD(self) -> None:  # noqa: N802
        self._json(200, None)

    def _json(self, status: int, body: Any) -> None:
        data = b"" if body is None or status == 204 else json.dumps(body, allow_nan=False).encode("utf-8")
        self.send_response(status)
        if status != 204:
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data and self.command != "HEAD":
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("OSCQuery %s: " + format, self.client_address[0], *args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002
        log.debug("OSCQuery %s: " + format, self.client_address[0], *args)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    # Linux's SO_REUSEADDR never lets two listeners share a port (a second cicada still fails), but it lets
    # a restarted engine bind while the last connection's TIME_WAIT lingers
    allow_reuse_address = True
    owner: OscQueryServer

    def handle_error(self, request: Any, client_address: Any) -> None:  # no traceback per broken connection
        log.debug("OSCQuery: error while serving %s", client_address, exc_info=True)


class OscQueryServer:
    """OSCQuery over HTTP for a registry. ``osc_port`` is the OSC server's port (told in HOST_INFO);
    ``port=0`` picks a free port (``port`` is the bound one after ``start``). On any host but loopback an
    ``allow`` list of client addresses is required, as for OSC."""

    def __init__(
        self,
        registry: Registry,
        host: str = "127.0.0.1",
        port: int = DEFAULT_OSCQUERY_PORT,
        osc_port: int = 9000,
        name: str = "cicada",
        allow: list[str] | None = None,
    ) -> None:
        self.registry = registry
        self.host = host
        self.port = int(port)
        self.osc_port = int(osc_port)
        self.name = name
        self.allow = list(allow) if allow else []
        self.networks: tuple[Any, ...] = ()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Check the allow-list, bind, serve on a daemon thread. Raises :class:`~engine.control.osc.OscError`
        (an OSError) with a remedy."""
        if self._httpd is not None:
            return
        self.networks = allow_networks(self.host, self.allow, "--osc-allow", "OSCQuery")
        cls = _HTTPServer
        if ":" in self.host:
            cls = type("_HTTPServer6", (_HTTPServer,), {"address_family": socket.AF_INET6})
        try:
            httpd = cls((self.host, self.port), _Handler)
        except OSError as exc:
            raise bind_error(exc, "OSCQuery", self.host, self.port, "--oscquery-port", "--osc-host") from exc
        httpd.owner = self
        self._httpd = httpd
        self.port = int(httpd.server_address[1])
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.25},
                                        name="cicada-oscquery", daemon=True)
        self._thread.start()
        log.info("OSCQuery on http://%s:%d/ (OSC on port %d)", self.host, self.port, self.osc_port)

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def __enter__(self) -> OscQueryServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def allowed(self, ip: str) -> bool:
        return client_allowed(ip, self.networks)

    def host_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"NAME": self.name, "OSC_PORT": self.osc_port, "OSC_TRANSPORT": "UDP",
                                "EXTENSIONS": dict(EXTENSIONS)}
        if self.host not in ("0.0.0.0", "::", ""):
            info["OSC_IP"] = self.host
        return info

    def tree(self) -> dict[str, Any]:
        """The namespace as served at ``/`` (values as they are now)."""
        return build_tree(self.registry)
