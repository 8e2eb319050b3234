"""OSCQuery over real HTTP: the tree lists every parameter with its range and live value; errors are JSON."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import pack as packfmt
from engine.control import osc as oscmod
from engine.control.controller import Controller
from engine.control.osc import OscError, OscServer
from engine.control.oscquery import DEFAULT_OSCQUERY_PORT, OscQueryServer, build_tree, find_node
from engine.params import Registry
from tests.engine.control.test_osc import Client, can_bind, make_controller


@pytest.fixture(scope="module")
def pack(tiny_pack_dir: Path) -> packfmt.Pack:
    return packfmt.load(tiny_pack_dir)


@pytest.fixture
def ctl(pack: packfmt.Pack) -> Iterator[Controller]:
    c = make_controller(pack)
    yield c
    c.close()


@pytest.fixture
def query(ctl: Controller) -> Iterator[OscQueryServer]:
    server = OscQueryServer(ctl.registry, port=0, osc_port=9123)
    server.start()
    yield server
    server.stop()


def get(server: OscQueryServer, path: str, source: str = "127.0.0.1") -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else None
    finally:
        conn.close()


def test_the_root_lists_every_parameter_with_its_range_and_value(query: OscQueryServer, ctl: Controller) -> None:
    status, root = get(query, "/")
    assert status == 200
    assert root["FULL_PATH"] == "/"
    cicada = root["CONTENTS"]["cicada"]
    assert cicada["FULL_PATH"] == "/cicada"
    nodes = cicada["CONTENTS"]
    for p in ctl.registry:
        node = nodes[p.name]
        assert node["FULL_PATH"] == f"/cicada/{p.name}"
        assert node["TYPE"] == p.osc_type
        assert node["ACCESS"] == 3
        assert node["VALUE"] == [ctl.registry.get(p.name)]
        assert node["DESCRIPTION"] == p.description
        if p.kind in (float, int):
            assert node["RANGE"] == [{"MIN": p.low, "MAX": p.high}]
        elif p.choices:
            assert node["RANGE"] == [{"VALS": list(p.choices)}]
        else:
            assert "RANGE" not in node
    assert nodes["temperature"]["TYPE"] == "f" and nodes["top_k"]["TYPE"] == "i"
    assert nodes["mute"]["TYPE"] == "T" and nodes["mute"]["VALUE"] == [False]
    assert nodes["quantize"]["RANGE"] == [{"VALS": ["off", "beat", "bar"]}]
    assert nodes["gain_db"]["UNIT"] == ["gain.db"] and nodes["latency_ms"]["UNIT"] == ["time.ms"]
    # the actions: write only
    assert nodes["panic"]["ACCESS"] == 2 and nodes["panic"]["TYPE"] == "T"
    assert nodes["select"]["RANGE"] == [{"MIN": 1, "MAX": 8}]
    assert nodes["preset"]["CONTENTS"]["load"] == {
        "FULL_PATH": "/cicada/preset/load", "ACCESS": 2, "TYPE": "s",
        "DESCRIPTION": nodes["preset"]["CONTENTS"]["load"]["DESCRIPTION"],
    }
    assert {"ping", "status", "subscribe", "unsubscribe", "start", "stop", "resume"} <= set(nodes)
    assert nodes["meter"]["ACCESS"] == 1 and "VALUE" not in nodes["meter"]


def test_one_node_an_attribute_host_info_and_errors(query: OscQueryServer, ctl: Controller) -> None:
    status, node = get(query, "/cicada/temperature")
    assert status == 200 and node["FULL_PATH"] == "/cicada/temperature" and node["CLIPMODE"] == ["both"]
    assert get(query, "/cicada/temperature?VALUE") == (200, {"VALUE": [1.0]})
    assert get(query, "/cicada/quantize?RANGE") == (200, {"RANGE": [{"VALS": ["off", "beat", "bar"]}]})
    assert get(query, "/cicada/preset/load")[1]["TYPE"] == "s"
    status, info = get(query, "/?HOST_INFO")
    assert status == 200
    assert info["NAME"] == "cicada" and info["OSC_PORT"] == 9123 and info["OSC_TRANSPORT"] == "UDP"
    assert info["EXTENSIONS"]["VALUE"] is True and info["EXTENSIONS"]["LISTEN"] is False
    assert get(query, "/cicada/temperature?HOST_INFO")[1] == info  # the path does not matter for HOST_INFO
    status, body = get(query, "/cicada/nothing")
    assert status == 404 and "GET /" in body["ERROR"]
    status, body = get(query, "/cicada/temperature?COLOUR")
    assert status == 400 and "unknown attribute" in body["ERROR"]
    assert get(query, "/cicada/ping?VALUE") == (204, None)  # an action has no value


def test_an_osc_change_reads_back_over_oscquery(ctl: Controller) -> None:
    osc = OscServer(ctl, port=0)
    osc.start()
    query = OscQueryServer(ctl.registry, port=0, osc_port=osc.port)
    query.start()
    try:
        assert get(query, "/?HOST_INFO")[1]["OSC_PORT"] == osc.port
        with Client(osc.port) as c:
            assert c.ask("/cicada/top_k", 33) == [("/cicada/top_k", [33])]
            assert c.ask("/cicada/mute", True) == [("/cicada/mute", [True])]
        assert get(query, "/cicada/top_k?VALUE") == (200, {"VALUE": [33]})
        assert get(query, "/")[1]["CONTENTS"]["cicada"]["CONTENTS"]["mute"]["VALUE"] == [True]
    finally:
        query.stop()
        osc.stop()


def test_the_same_rules_for_hosts_and_ports_as_osc() -> None:
    reg = Registry()
    with pytest.raises(OscError, match="--osc-allow"):
        OscQueryServer(reg, host="0.0.0.0", port=0).start()
    first = OscQueryServer(reg, port=0)
    first.start()
    try:
        with pytest.raises(OscError, match="--oscquery-port"):
            OscQueryServer(reg, port=first.port).start()
    finally:
        first.stop()
        first.stop()  # idempotent


@pytest.mark.skipif(not can_bind("127.0.0.2"), reason="needs 127.0.0.2 on the loopback interface (Linux)")
def test_clients_not_allowed_get_403(query: OscQueryServer) -> None:
    status, body = get(query, "/", source="127.0.0.2")
    assert status == 403 and "--osc-allow" in body["ERROR"]


def test_helpers_and_the_hint_port() -> None:
    tree = build_tree(Registry())
    assert find_node(tree, "/")["FULL_PATH"] == "/"
    assert find_node(tree, "/cicada/preset/save")["TYPE"] == "ss"
    assert find_node(tree, "/cicada/temperature/x") is None
    assert oscmod._OSCQUERY_HINT_PORT == DEFAULT_OSCQUERY_PORT
