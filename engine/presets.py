"""Presets: TOML files in presets/ (shipped) holding a prompt pair and parameters.

::

    name = "default"
    description = "..."
    prompt = "Continuously stridulating, buzzing and sizzling sound of processed crickets"
    prompt_b = ""            # optional second prompt, for morphing
    seed = 0                 # optional

    [params]
    morph = 0.0              # 0..1, prompt -> prompt_b
    temperature = 1.0        # >= 0 (0 = greedy)
    top_k = 250              # >= 0 (0 = off)
    top_p = 0.0              # 0..1 (0 = off)
    guidance = 3.0           # >= 0 (classifier-free guidance scale)
    gain_db = 0.0            # -80..12

A preset that doesn't parse or validate is refused with one message naming
the file, the key and what is wrong; nothing is half-applied.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.generator import GenParams
from engine.sampling import SamplingParams

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"

# key -> (type, low, high)
_PARAMS: dict[str, tuple[type, float, float]] = {
    "morph": (float, 0.0, 1.0),
    "temperature": (float, 0.0, 10.0),
    "top_k": (int, 0, 1_000_000),
    "top_p": (float, 0.0, 1.0),
    "guidance": (float, 0.0, 30.0),
    "gain_db": (float, -80.0, 12.0),
}
_TOP = {"name": str, "description": str, "prompt": str, "prompt_b": str, "seed": int, "params": dict}


class PresetError(Exception):
    """A preset that cannot be used; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path | None
    description: str = ""
    prompt: str = ""
    prompt_b: str = ""
    seed: int | None = None
    morph: float = 0.0
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    guidance: float = 3.0
    gain_db: float = 0.0

    def gen_params(self) -> GenParams:
        return GenParams(
            prompt=self.prompt,
            prompt_b=self.prompt_b,
            morph=self.morph,
            sampling=SamplingParams(self.temperature, self.top_k, self.top_p, self.guidance),
        )


def find(name_or_path: str, folder: Path = PRESETS_DIR) -> Path:
    """A preset name (``default``) or a path to a ``.toml`` file -> its path."""
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.parent != Path("."):
        if not p.is_file():
            raise PresetError(f"{p}: no such preset file")
        return p
    cand = folder / f"{name_or_path}.toml"
    if not cand.is_file():
        known = ", ".join(sorted(x.stem for x in folder.glob("*.toml"))) or "none"
        raise PresetError(f"no preset named {name_or_path!r} in {folder} (available: {known})")
    return cand


def load(name_or_path: str, folder: Path = PRESETS_DIR) -> Preset:
    path = find(name_or_path, folder)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"{path}: cannot read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"{path}: not valid TOML ({exc})") from None
    return parse(doc, path)


def parse(doc: dict[str, Any], path: Path | None = None) -> Preset:
    where = str(path) if path else "preset"
    fields: dict[str, Any] = {}
    for key, value in doc.items():
        want = _TOP.get(key)
        if want is None:
            raise PresetError(f"{where}: unknown key {key!r} (known: {', '.join(_TOP)})")
        if not isinstance(value, want) or isinstance(value, bool):
            raise PresetError(f"{where}: {key} must be a {want.__name__}, got {type(value).__name__}")
        if key != "params":
            fields[key] = value
    for key, value in doc.get("params", {}).items():
        spec = _PARAMS.get(key)
        if spec is None:
            raise PresetError(f"{where}: unknown key params.{key} (known: {', '.join(_PARAMS)})")
        typ, lo, hi = spec
        ok = isinstance(value, int) if typ is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise PresetError(f"{where}: params.{key} must be a {typ.__name__}, got {value!r}")
        if not lo <= value <= hi:
            raise PresetError(f"{where}: params.{key} = {value} is out of range {lo:g}..{hi:g}")
        fields[key] = typ(value)
    name = fields.pop("name", path.stem if path else "preset")
    return Preset(name=name, path=path, **fields)
