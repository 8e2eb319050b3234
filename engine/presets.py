"""Presets: small TOML files holding prompts, parameter values and control mappings.

::

    name = "default"
    description = "..."
    prompt = "Continuously stridulating, buzzing and sizzling sound of processed crickets"
    prompt_b = ""            # optional second prompt, for morphing
    seed = 0                 # optional

    [params]                 # any parameter of the registry (engine/params.py), by name
    morph = 0.0              # 0..1, prompt -> prompt_b
    temperature = 0.9
    top_k = 250
    guidance = 1.5
    gain_db = -6.0
    slot_1 = "Continuous, soft noise. Alarm like effect"

    [midi]                   # MIDI mappings (engine/control/midi.py), saved by MIDI learn
    note_base = 60
    [[midi.cc]]
    param = "morph"
    control = 21

    [osc]                    # OSC aliases: a controller's own addresses -> registry names
    "/1/fader1" = "morph"

Shipped presets live in ``presets/``; the ones a user saves go to the user
folder (``$CICADA_PRESETS``, else ``$XDG_CONFIG_HOME/cicada/presets``, else
``~/.config/cicada/presets``), which is searched first, so a saved preset
with a shipped name overrides it without touching the repository.

A preset that doesn't parse or validate is refused with one message naming
the file, the key and what is wrong (unknown key, wrong type, out of range);
nothing is half-applied. Saving writes a temporary file, flushes it and
renames it over the old one, so a crash mid-save leaves the old preset whole.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.generator import GenParams
from engine.pack import write_text_atomic
from engine.params import PARAM_BY_NAME, PARAMS, Param, ParamError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

_TOP_VALUES = ("prompt", "prompt_b", "seed")  # registry values kept at the top level (readable files)
_TOP = {"name": str, "description": str, "prompt": str, "prompt_b": str, "seed": int, "params": dict, "midi": dict,
        "osc": dict}
_KIND_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "text"}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.+-]{0,63}$")


class PresetError(Exception):
    """A preset that cannot be used; the message names the file, the key and the problem."""


def user_dir() -> Path:
    """Where presets a user saves go (and are looked up first)."""
    env = os.environ.get("CICADA_PRESETS")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "cicada" / "presets"


def search_path(folder: Path | None = None) -> list[Path]:
    """Folders searched for a preset name: the given one, or the user folder then the shipped one."""
    return [folder] if folder is not None else [user_dir(), PRESETS_DIR]


@dataclass(frozen=True)
class Preset:
    """A parsed, validated preset. ``values`` are registry values by name (only those the file sets)."""

    name: str
    path: Path | None
    description: str = ""
    values: Mapping[str, Any] = field(default_factory=dict)
    midi: Mapping[str, Any] = field(default_factory=dict)
    osc: Mapping[str, str] = field(default_factory=dict)

    def _get(self, name: str) -> Any:
        return self.values.get(name, PARAM_BY_NAME[name].default)

    @property
    def prompt(self) -> str:
        return str(self._get("prompt"))

    @property
    def prompt_b(self) -> str:
        return str(self._get("prompt_b"))

    @property
    def seed(self) -> int | None:
        v = self.values.get("seed")
        return None if v is None else int(v)

    @property
    def gain_db(self) -> float:
        return float(self._get("gain_db"))

    def gen_params(self) -> GenParams:
        return GenParams.from_values({p.name: self._get(p.name) for p in PARAMS})


def names(folder: Path | None = None) -> list[str]:
    """Every preset name, sorted (a user preset hides a shipped one of the same name)."""
    found: set[str] = set()
    for d in search_path(folder):
        if d.is_dir():
            found.update(p.stem for p in d.glob("*.toml") if not p.name.startswith("."))
    return sorted(found)


def find(name_or_path: str, folder: Path | None = None) -> Path:
    """A preset name (``default``) or a path to a ``.toml`` file -> its path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            raise PresetError(f"{p}: no such preset file")
        return p
    for d in search_path(folder):
        cand = d / f"{name_or_path}.toml"
        if cand.is_file():
            return cand
    where = " or ".join(str(d) for d in search_path(folder))
    raise PresetError(f"no preset named {name_or_path!r} in {where} (available: {', '.join(names(folder)) or 'none'}; "
                      "`cicada presets` lists them)")


def load(name_or_path: str, folder: Path | None = None) -> Preset:
    path = find(name_or_path, folder)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML ({exc}); fix the file or save the preset again") from None
    return parse(doc, path)


def _check_value(where: str, key: str, p: Param, value: Any) -> Any:
    """A preset's value must already be right: the right type and in range (files are not clamped)."""
    if p.kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif p.kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, p.kind)
    if not ok:
        raise PresetError(f"{where}: {key} must be {_KIND_WORDS[p.kind]} ({p.describe_range()}), got {value!r}")
    try:
        v, warning = p.coerce(value)
    except ParamError as exc:
        raise PresetError(f"{where}: {key}: {exc}") from None
    if warning is not None:
        raise PresetError(f"{where}: {key} = {value!r} is out of range {p.describe_range()}")
    return v


def parse(doc: Mapping[str, Any], path: Path | None = None) -> Preset:
    """Validate a preset document; raise PresetError naming the file, key and problem."""
    where = str(path) if path else "preset"
    for key, value in doc.items():
        want = _TOP.get(key)
        if want is None:
            raise PresetError(f"{where}: unknown key {key!r} (known: {', '.join(_TOP)}; parameters go in [params])")
        if not isinstance(value, want) or isinstance(value, bool):
            raise PresetError(f"{where}: {key} must be a {'table' if want is dict else want.__name__}, "
                              f"got {type(value).__name__}")
    values: dict[str, Any] = {}
    for key in _TOP_VALUES:
        if key in doc:
            values[key] = _check_value(where, key, PARAM_BY_NAME[key], doc[key])
    for key, value in doc.get("params", {}).items():
        p = PARAM_BY_NAME.get(key)
        if p is None or key in _TOP_VALUES:
            hint = f" (put {key} at the top level)" if key in _TOP_VALUES else ""
            known = ", ".join(n for n in PARAM_BY_NAME if n not in _TOP_VALUES)
            raise PresetError(f"{where}: unknown key params.{key}{hint} (known: {known})")
        values[key] = _check_value(where, f"params.{key}", p, value)
    osc = doc.get("osc", {})
    for addr, target in osc.items():
        if not addr.startswith("/") or not isinstance(target, str) or target not in PARAM_BY_NAME:
            raise PresetError(f"{where}: osc.{addr!r} must map an address starting with / to a parameter name "
                              f"(got {target!r})")
    midi = doc.get("midi", {})
    if midi:
        try:
            from engine.control.midi import MidiMap

            MidiMap.from_dict(midi)
        except ImportError:
            pass
        except (ValueError, TypeError, KeyError) as exc:
            raise PresetError(f"{where}: {exc}") from None
    name = doc.get("name", path.stem if path else "preset")
    return Preset(name=name, path=path, description=doc.get("description", ""), values=values, midi=midi, osc=osc)


def to_document(name: str, values: Mapping[str, Any], description: str = "",
                midi: Mapping[str, Any] | None = None, osc: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A preset document for registry ``values`` (prompts and seed at the top, the rest in [params])."""
    doc: dict[str, Any] = {"name": name}
    if description:
        doc["description"] = description
    for key in _TOP_VALUES:
        if key in values:
            doc[key] = values[key]
    doc["params"] = {k: v for k, v in values.items() if k in PARAM_BY_NAME and k not in _TOP_VALUES}
    if midi:
        doc["midi"] = dict(midi)
    if osc:
        doc["osc"] = dict(osc)
    return doc


def save(
    name: str,
    values: Mapping[str, Any],
    *,
    description: str = "",
    extra: Mapping[str, Any] | None = None,
    folder: Path | None = None,
) -> Path:
    """Write a preset atomically into ``folder`` (default: the user folder); return its path.

    ``extra`` may hold ``midi`` and ``osc`` tables. The document is validated
    before anything is written, so a preset that saves also loads.
    """
    import tomli_w

    if not _NAME_OK.match(name):
        raise PresetError(f"preset name {name!r}: use letters, digits, space, '-', '_', '.' or '+' (at most 64)")
    extra = extra or {}
    doc = to_document(name, values, description, extra.get("midi"), extra.get("osc"))
    dest_dir = folder if folder is not None else user_dir()
    path = dest_dir / f"{name}.toml"
    parse(doc, path)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, "# cicada preset (saved)\n" + tomli_w.dumps(doc))
    except OSError as exc:
        raise PresetError(f"{path}: cannot write ({exc}); check the folder's permissions or set CICADA_PRESETS") from None
    return path
