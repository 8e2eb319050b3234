"""The Qt panel: a window that steers a running engine through its control API (OSC + OSCQuery) only.

Everything it shows comes from the engine: the parameter controls are built
from the OSCQuery tree (ranges, units and descriptions as tooltips), the
meter, spectrogram, status line and preset list from OSC feedback. Closing
the panel closes its socket, nothing else: the engine plays on.

Keys: Esc panic, Ctrl+R resume, Ctrl+L prompt A, Ctrl+S save a preset,
Ctrl+1..8 recall a prompt slot, F5 refresh the presets; Tab walks every
control in reading order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from PyQt6.QtCore import QObject, QStringListModel, Qt, QTimer, pyqtSignal
from PyQt6.QtGui import QCloseEvent, QColor, QFont, QKeySequence, QPalette, QShortcut
from PyQt6.QtWidgets import (
    QApplication,
    QComboBox,
    QCompleter,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QInputDialog,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QMainWindow,
    QPushButton,
    QScrollArea,
    QSizePolicy,
    QStatusBar,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from gui.client import PREFIX, EngineClient, ParamInfo
from gui.widgets import Control, LevelMeter, NumberControl, Spectrogram, TextControl, make_control

log = logging.getLogger("cicada.gui")

GROUP_TITLES = {"sampling": "Sampling", "output": "Output", "engine": "Engine", "sound": "Sound", "other": "Other"}
PROMPT_NAMES = ("prompt", "prompt_b", "morph")
DEFAULT_DEVICE = "(default device)"


def list_output_devices() -> list[str]:
    """Output devices PortAudio sees on this machine, as ``"index: name"`` (empty when it cannot tell)."""
    os.environ.setdefault("JACK_NO_START_SERVER", "1")  # listing must not start a JACK server
    try:
        import sounddevice as sd

        return [f"{i}: {d['name']}" for i, d in enumerate(sd.query_devices()) if d.get("max_output_channels", 0) > 0]
    except Exception as exc:  # no PortAudio library, no devices
        log.info("cannot list sound devices: %s", exc)
        return []


def param_label(p: ParamInfo) -> str:
    """A parameter's row label: its name in words, without a unit the number field already shows."""
    words = p.name.split("_")
    if len(words) > 1 and p.unit and words[-1].lower() == p.unit.lower().removesuffix("fs"):
        words = words[:-1]
    return " ".join(words)


# --------------------------------------------------------------------------- theme


def apply_theme(app: QApplication, large: bool = False) -> None:
    """A dark Fusion theme; ``large`` scales type and controls for a stage."""
    app.setStyle("Fusion")
    pal = QPalette()
    bg, base, text, dim, accent = "#1e2027", "#15171c", "#e6e8ee", "#8a90a0", "#d08a2c"
    for role, col in (
        (QPalette.ColorRole.Window, bg), (QPalette.ColorRole.WindowText, text), (QPalette.ColorRole.Base, base),
        (QPalette.ColorRole.AlternateBase, "#262932"), (QPalette.ColorRole.ToolTipBase, "#2b2e38"),
        (QPalette.ColorRole.ToolTipText, text), (QPalette.ColorRole.Text, text), (QPalette.ColorRole.Button, "#2b2e38"),
        (QPalette.ColorRole.ButtonText, text), (QPalette.ColorRole.BrightText, "#ff5050"),
        (QPalette.ColorRole.Highlight, accent), (QPalette.ColorRole.HighlightedText, "#101010"),
        (QPalette.ColorRole.PlaceholderText, dim), (QPalette.ColorRole.Link, accent),
    ):
        pal.setColor(role, QColor(col))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        pal.setColor(QPalette.ColorGroup.Disabled, role, QColor("#5a5f6c"))
    app.setPalette(pal)
    font = QFont(app.font())
    font.setPointSizeF(18.0 if large else max(10.0, font.pointSizeF()))
    app.setFont(font)
    app.setStyleSheet(
        """
        QGroupBox { border: 1px solid #343845; border-radius: 6px; margin-top: 1.1em; padding: 6px; }
        QGroupBox::title { subcontrol-origin: margin; left: 8px; padding: 0 4px; color: #d08a2c; }
        QPushButton#panic { background: #b3261e; color: white; font-weight: bold; border-radius: 6px;
                            padding: 6px 18px; border: 2px solid #e04a40; }
        QPushButton#panic:focus { border: 2px solid #ffffff; }
        QPushButton#panic:pressed { background: #7a1a14; }
        QPushButton#resume[panicking="true"] { background: #2f7a3c; color: white; font-weight: bold; }
        QLabel#status[state="up"] { color: #8fd89f; }
        QLabel#status[state="down"] { color: #ff7060; }
        QLabel#status[state="panic"] { color: #ffb040; }
        QToolButton#learn { padding: 1px 6px; }
        *:focus { outline: none; }
        QSlider:focus, QLineEdit:focus, QAbstractSpinBox:focus, QComboBox:focus, QListWidget:focus,
        QCheckBox:focus, QToolButton:focus, QPushButton:focus { border: 1px solid #d08a2c; }
        """
    )


# --------------------------------------------------------------------------- the bridge


class Bridge(QObject):
    """Carries the client's callbacks (on its threads) into the GUI thread as queued signals, each with the
    time it was heard (``time.monotonic()``): a busy GUI thread may run it after the user has moved on."""

    message = pyqtSignal(str, object, float)
    tree = pyqtSignal(object, float)
    connection = pyqtSignal(bool)

    def attach(self, client: EngineClient) -> None:
        client.on_message = lambda addr, args: self.message.emit(addr, args, time.monotonic())
        client.on_tree = lambda params: self.tree.emit(params, time.monotonic())
        client.on_connection = lambda up: self.connection.emit(up)


# --------------------------------------------------------------------------- the panel


class Panel(QMainWindow):
    """The cicada panel; owns its :class:`EngineClient` (closed with the window, the engine plays on).

    ``device_lister`` lists output devices (default: PortAudio's, on this
    machine); ``restart_engine(device)`` restarts an engine this panel
    started, or is None when there is none to restart.
    """

    def __init__(
        self,
        client: EngineClient,
        *,
        large: bool = False,
        device_lister: Callable[[], list[str]] | None = list_output_devices,
        restart_engine: Callable[[str | None], None] | None = None,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.large = large
        self.device_lister = device_lister
        self.restart_engine = restart_engine
        self.initial_preset = preset
        self.params: dict[str, ParamInfo] = {}
        self.controls: dict[str, Control] = {}
        self._moved: dict[str, float] = {}  # when the user last changed each parameter here (monotonic)
        # text fields showing text the engine refused: kept until the user sends again or the value changes
        self._refused: set[str] = set()
        self.learn_buttons: dict[str, QToolButton] = {}
        self.slot_edits: dict[int, TextControl] = {}
        self.slot_buttons: dict[int, QPushButton] = {}
        self.status: dict[str, Any] = {}
        self.presets: list[str] = []
        self.known_prompts: list[str] = []
        self.panicking = False
        self.connected = False
        self.messages: list[tuple[str, str]] = []  # (kind, text) of errors and warnings, newest last
        self._tree_signature: tuple[tuple[str, str, Any, Any, tuple[str, ...]], ...] | None = None
        self._closed = False

        self.setWindowTitle(f"cicada — {client.host}:{client.osc_port}")
        self._build()
        self._shortcuts()
        self.bridge = Bridge(self)
        self.bridge.message.connect(self._on_message)
        self.bridge.tree.connect(self._on_tree)
        self.bridge.connection.connect(self._on_connection)
        self.bridge.attach(client)
        self._watch = QTimer(self)  # the status line ages even when nothing arrives
        self._watch.timeout.connect(self._refresh_status_line)
        self._watch.start(500)
        client.start()
        if client.tree:  # fetched before the panel existed
            self._on_tree(client.tree)
        if device_lister is not None:
            QTimer.singleShot(0, self._fill_devices)

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        central = QWidget()
        root = QVBoxLayout(central)
        root.setSpacing(8)

        top = QHBoxLayout()
        self.status_label = QLabel("connecting…")
        self.status_label.setObjectName("status")
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.status_label.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.status_label.setWordWrap(True)
        top.addWidget(self.status_label, 1)
        self.resume_button = QPushButton("Resume  (Ctrl+R)")
        self.resume_button.setObjectName("resume")
        self.resume_button.setToolTip("Sound again after a panic (/cicada/resume)")
        self.resume_button.clicked.connect(self.resume)
        top.addWidget(self.resume_button)
        self.panic_button = QPushButton("PANIC  (Esc)")
        self.panic_button.setObjectName("panic")
        self.panic_button.setToolTip("Silence now: fades out within 50 ms and stays silent until Resume")
        self.panic_button.setMinimumHeight(72 if self.large else 44)
        self.panic_button.setMinimumWidth(220 if self.large else 150)
        self.panic_button.clicked.connect(self.panic)
        top.addWidget(self.panic_button)
        root.addLayout(top)

        cols = QHBoxLayout()
        cols.setSpacing(10)
        root.addLayout(cols, 1)

        # left: prompts
        left = QVBoxLayout()
        self.prompt_box = QGroupBox("Prompt")
        self.prompt_grid = QGridLayout(self.prompt_box)
        left.addWidget(self.prompt_box)
        self.slots_box = QGroupBox("Prompt slots")
        self.slots_grid = QGridLayout(self.slots_box)
        left.addWidget(self.slots_box)
        left.addStretch(1)
        cols.addLayout(left, 4)

        # middle: every other parameter, grouped
        self.params_widget = QWidget()
        self.params_layout = QVBoxLayout(self.params_widget)
        self.params_layout.setContentsMargins(0, 0, 0, 0)
        self.waiting_label = QLabel("waiting for the engine's parameter tree (OSCQuery)…")
        self.params_layout.addWidget(self.waiting_label)
        self.params_layout.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.params_widget)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.params_scroll = scroll
        cols.addWidget(scroll, 5)

        # right: meters, presets, device
        right = QVBoxLayout()
        meter_box = QGroupBox("Level")
        ml = QVBoxLayout(meter_box)
        self.meter = LevelMeter()
        ml.addWidget(self.meter)
        right.addWidget(meter_box)
        spec_box = QGroupBox("Spectrogram")
        sl = QVBoxLayout(spec_box)
        self.spectrogram = Spectrogram()
        sl.addWidget(self.spectrogram)
        right.addWidget(spec_box, 2)

        preset_box = QGroupBox("Presets")
        pl = QVBoxLayout(preset_box)
        self.preset_list = QListWidget()
        self.preset_list.setObjectName("presets")
        self.preset_list.setToolTip("Double-click or Enter loads a preset")
        self.preset_list.itemActivated.connect(lambda item: self.load_preset(item.text()))
        self.preset_list.setMinimumHeight(90)
        pl.addWidget(self.preset_list, 1)
        pb = QHBoxLayout()
        self.load_button = QPushButton("Load")
        self.load_button.clicked.connect(self._load_selected)
        self.save_button = QPushButton("Save as…  (Ctrl+S)")
        self.save_button.clicked.connect(lambda: self.save_preset())
        self.refresh_button = QPushButton("Refresh")
        self.refresh_button.setToolTip("Ask the engine for its presets again (F5)")
        self.refresh_button.clicked.connect(self.refresh_presets)
        for b in (self.load_button, self.save_button, self.refresh_button):
            pb.addWidget(b)
        pl.addLayout(pb)
        right.addWidget(preset_box, 2)

        dev_box = QGroupBox("Output device")
        dl = QGridLayout(dev_box)
        self.device_combo = QComboBox()
        self.device_combo.setObjectName("device")
        self.device_combo.addItem(DEFAULT_DEVICE)
        self.device_combo.setToolTip("Sound devices on this machine (PortAudio). The engine opens its device when "
                                     "it starts: a new choice applies on restart.")
        self.device_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.device_combo.setMinimumContentsLength(18)
        dl.addWidget(self.device_combo, 0, 0, 1, 2)
        note = QLabel("applies on restart")
        note.setStyleSheet("color: #8a90a0")
        dl.addWidget(note, 1, 0)
        self.restart_button = QPushButton("Restart engine")
        self.restart_button.setToolTip("Restart the engine this panel started, on the chosen device")
        self.restart_button.setEnabled(self.restart_engine is not None)
        self.restart_button.clicked.connect(self._restart_engine)
        dl.addWidget(self.restart_button, 1, 1)
        right.addWidget(dev_box)
        cols.addLayout(right, 4)

        self.setCentralWidget(central)
        self.setStatusBar(QStatusBar())
        self.completer_model = QStringListModel([])
        self.resize(1400 if self.large else 1180, 900 if self.large else 720)
        self._build_prompt_section()
        self._set_tab_order()

    def _completer(self) -> QCompleter:
        c = QCompleter(self.completer_model, self)
        c.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        c.setFilterMode(Qt.MatchFlag.MatchContains)
        c.setCompletionMode(QCompleter.CompletionMode.PopupCompletion)
        return c

    def _learn_button(self, name: str) -> QToolButton:
        b = QToolButton()
        b.setObjectName("learn")
        b.setText("learn")
        b.setToolTip(f"MIDI learn: the next MIDI control you move steers {name} (/cicada/midi/learn {name})")
        b.setFocusPolicy(Qt.FocusPolicy.StrongFocus)
        b.clicked.connect(lambda: self.midi_learn(name))
        self.learn_buttons[name] = b
        return b

    @staticmethod
    def _clear(layout: QGridLayout | QVBoxLayout) -> None:
        while layout.count():
            item = layout.takeAt(0)
            w = item.widget() if item is not None else None
            if w is not None:
                w.setParent(None)
                w.deleteLater()

    def _build_prompt_section(self) -> None:
        """Prompt A, the morph fader and prompt B; the slot list (all from the tree's parameters)."""
        g = self.prompt_grid
        self._clear(g)
        for n in PROMPT_NAMES:
            self.controls.pop(n, None)
            self.learn_buttons.pop(n, None)
        labels = {"prompt": "&A", "prompt_b": "&B", "morph": "morph"}
        placeholders = {"prompt": "what to hear — Enter sends (Ctrl+L)", "prompt_b": "what the morph moves towards"}
        row = 0
        for name in PROMPT_NAMES:
            p = self.params.get(name)
            if p is None:
                continue
            ctl = (TextControl(p, placeholder=placeholders[name]) if p.type == "s" and not p.choices
                   else make_control(p))
            if isinstance(ctl, TextControl):
                ctl.edit.setCompleter(self._completer())
            ctl.changed.connect(lambda v, n=name: self.set_param(n, v))
            lab = QLabel(labels[name])
            lab.setToolTip(p.describe())
            lab.setBuddy(ctl.focus_widgets()[0] if ctl.focus_widgets() else None)
            g.addWidget(lab, row, 0)
            g.addWidget(ctl, row, 1)
            if isinstance(ctl, NumberControl):
                g.addWidget(self._learn_button(name), row, 2)
            self.controls[name] = ctl
            row += 1
        if row == 0:
            g.addWidget(QLabel("(no prompt parameters yet)"), 0, 0)

        sg = self.slots_grid
        self._clear(sg)
        self.slot_edits.clear()
        self.slot_buttons.clear()
        slots = sorted((int(n.split("_", 1)[1]), p) for n, p in self.params.items()
                       if n.startswith("slot_") and n.split("_", 1)[1].isdigit())
        for r, (i, p) in enumerate(slots):
            ctl = TextControl(p, placeholder=f"slot {i}: Enter stores, Select recalls into A")
            ctl.edit.setCompleter(self._completer())
            ctl.changed.connect(lambda v, n=p.name: self.set_param(n, v))
            b = QPushButton(f"Select {i}")
            b.setToolTip(f"Recall slot {i} into prompt A (/cicada/select {i})" + (f", Ctrl+{i}" if i <= 9 else ""))
            b.clicked.connect(lambda _=False, i=i: self.select_slot(i))
            sg.addWidget(QLabel(str(i)), r, 0)
            sg.addWidget(ctl, r, 1)
            sg.addWidget(b, r, 2)
            self.slot_edits[i] = ctl
            self.slot_buttons[i] = b
            self.controls[p.name] = ctl
        self.slots_box.setVisible(bool(slots))

    def _build_params(self) -> None:
        """A group box per registry group, a row per parameter: name, control, MIDI learn."""
        lay = self.params_layout
        self._clear(lay)
        for name in list(self.controls):
            if name not in PROMPT_NAMES and not name.startswith("slot_"):
                self.controls.pop(name)
                self.learn_buttons.pop(name, None)
        groups: dict[str, list[ParamInfo]] = {}
        for p in self.params.values():
            if p.name in PROMPT_NAMES or p.name.startswith("slot_") or p.group in ("prompt", "slots"):
                continue
            groups.setdefault(p.group, []).append(p)
        for group, params in groups.items():
            box = QGroupBox(GROUP_TITLES.get(group, group.capitalize()))
            grid = QGridLayout(box)
            grid.setColumnStretch(1, 1)
            for r, p in enumerate(params):
                ctl = make_control(p)
                ctl.changed.connect(lambda v, n=p.name: self.set_param(n, v))
                ctl.setEnabled(p.writable)
                lab = QLabel(param_label(p))
                lab.setToolTip(p.describe())
                fw = ctl.focus_widgets()
                if fw:
                    lab.setBuddy(fw[0])
                grid.addWidget(lab, r, 0)
                grid.addWidget(ctl, r, 1)
                if p.writable and not isinstance(ctl, TextControl):
                    grid.addWidget(self._learn_button(p.name), r, 2)
                self.controls[p.name] = ctl
            lay.addWidget(box)
        lay.addStretch(1)
        bar = self.params_scroll.verticalScrollBar().sizeHint().width()
        self.params_scroll.setMinimumWidth(self.params_widget.minimumSizeHint().width() + bar + 4)

    def _set_tab_order(self) -> None:
        """Tab walks the window in reading order: prompts, slots, parameters, presets, device, resume, panic."""
        chain: list[QWidget] = []
        for name in PROMPT_NAMES:
            if name in self.controls:
                chain += self.controls[name].focus_widgets()
                if name in self.learn_buttons:
                    chain.append(self.learn_buttons[name])
        for i in sorted(self.slot_edits):
            chain += self.slot_edits[i].focus_widgets() + [self.slot_buttons[i]]
        for name, ctl in self.controls.items():
            if name in PROMPT_NAMES or name.startswith("slot_"):
                continue
            chain += ctl.focus_widgets()
            if name in self.learn_buttons:
                chain.append(self.learn_buttons[name])
        chain += [self.preset_list, self.load_button, self.save_button, self.refresh_button, self.device_combo,
                  self.restart_button, self.resume_button, self.panic_button]
        for a, b in zip(chain, chain[1:]):
            QWidget.setTabOrder(a, b)

    def _shortcuts(self) -> None:
        def key(seq: str | QKeySequence.StandardKey, fn: Callable[[], Any]) -> None:
            sc = QShortcut(QKeySequence(seq), self)
            sc.setContext(Qt.ShortcutContext.WindowShortcut)
            sc.activated.connect(fn)

        key("Esc", self.panic)
        key("Ctrl+R", self.resume)
        key("Ctrl+S", lambda: self.save_preset())
        key("Ctrl+L", self.focus_prompt)
        key("F5", self.refresh_presets)
        for i in range(1, 9):
            key(f"Ctrl+{i}", lambda i=i: self.select_slot(i))

    # ------------------------------------------------------------------ actions (all through OSC)

    def set_param(self, name: str, value: Any) -> None:
        """Send a user's change (throttled to ~50 Hz per parameter by the client)."""
        self._moved[name] = time.monotonic()
        self._refused.discard(name)
        self.client.set_param(name, value)

    def _show_value(self, name: str, value: Any, heard: float, change: bool) -> bool:
        """Put an engine value heard at ``heard`` into its control; False (and nothing shown) when it is out
        of date: the user moved ``name`` here after it was heard. A field showing text the engine refused
        keeps it (the user may be about to fix a typo) through re-reads of the tree (``change`` False); a
        change of the value (feedback, ``change`` True) replaces it."""
        if self._moved.get(name, -math.inf) > heard:
            return False
        ctl = self.controls.get(name)
        if ctl is not None and (change or name not in self._refused):
            self._refused.discard(name)
            ctl.set_value(value)
        return True

    def panic(self) -> None:
        self.client.send(f"{PREFIX}/panic")
        self._set_panicking(True)
        self.statusBar().showMessage("PANIC: silent until Resume (Ctrl+R)", 5000)

    def resume(self) -> None:
        self.client.send(f"{PREFIX}/resume")
        self._set_panicking(False)

    def select_slot(self, slot: int) -> None:
        self.client.send(f"{PREFIX}/select", int(slot))

    def midi_learn(self, name: str) -> None:
        self.client.send(f"{PREFIX}/midi/learn", name)
        self.statusBar().showMessage(f"MIDI learn {name}: move a control on your MIDI controller", 8000)

    def focus_prompt(self) -> None:
        ctl = self.controls.get("prompt")
        if isinstance(ctl, TextControl):
            ctl.edit.setFocus(Qt.FocusReason.ShortcutFocusReason)
            ctl.edit.selectAll()

    def load_preset(self, name: str) -> None:
        self.client.send(f"{PREFIX}/preset/load", name)
        self.statusBar().showMessage(f"loading preset {name}…", 3000)

    def _load_selected(self) -> None:
        item = self.preset_list.currentItem()
        if item is not None:
            self.load_preset(item.text())

    def save_preset(self, name: str | None = None, description: str = "") -> None:
        """Save the engine's current values as a preset (asks for a name when none is given)."""
        if name is None:
            current = str(self.status.get("preset") or "")
            name, ok = QInputDialog.getText(self, "Save preset", "Preset name:", QLineEdit.EchoMode.Normal, current)
            if not ok:
                return
        name = name.strip()
        if not name:
            return
        args: list[Any] = [name] + ([description] if description else [])
        self.client.send(f"{PREFIX}/preset/save", *args)
        self.statusBar().showMessage(f"saving preset {name}…", 4000)

    def refresh_presets(self) -> None:
        self.client.send(f"{PREFIX}/preset/list")

    def _restart_engine(self) -> None:
        if self.restart_engine is None:
            return
        dev = self.device_combo.currentText()
        device = None if dev == DEFAULT_DEVICE else dev.split(": ", 1)[-1]  # by name: indices differ by host
        self.statusBar().showMessage(f"restarting the engine on {dev}…", 5000)
        self.restart_engine(device)

    def _fill_devices(self) -> None:
        if self.device_lister is None:
            return
        names = self.device_lister()
        self.device_combo.clear()
        self.device_combo.addItem(DEFAULT_DEVICE)
        self.device_combo.addItems(names)

    # ------------------------------------------------------------------ engine -> panel

    def _on_connection(self, up: bool) -> None:
        self.connected = up
        if up:
            self.refresh_presets()
            self.client.send(f"{PREFIX}/prompts")
            if self.initial_preset:
                self.load_preset(self.initial_preset)
                self.initial_preset = None
        self._refresh_status_line()

    def _on_tree(self, params: list[ParamInfo], heard: float = math.inf) -> None:
        sig = tuple((p.name, p.type, p.low, p.high, p.choices) for p in params)
        self.params = {p.name: p for p in params}
        if sig != self._tree_signature:
            focused = QApplication.focusWidget()
            self._tree_signature = sig
            self._build_prompt_section()
            self._build_params()
            self._set_tab_order()
            if focused is None or focused.window() is not self:
                self.focus_prompt()
        else:
            for p in params:
                self._show_value(p.name, p.value, heard, change=False)
        for p in params:
            if p.name in ("prompt", "prompt_b") or p.name.startswith("slot_"):
                self._add_prompts([str(p.value)])

    def _on_message(self, address: str, args: list[Any], heard: float = math.inf) -> None:
        if self._closed or not address.startswith(PREFIX + "/"):
            return
        name = address[len(PREFIX) + 1:]
        if name == "meter":
            if len(args) >= 2:
                n = len(args) // 2
                self.meter.set_levels([float(a) for a in args[:n]], [float(a) for a in args[n:2 * n]])
        elif name == "spectrum":
            if args and isinstance(args[0], (bytes, bytearray)):
                self.spectrogram.add(np.frombuffer(bytes(args[0]), "<f4"))
        elif name == "status":
            if args and isinstance(args[0], str):
                with contextlib.suppress(ValueError):
                    self._on_status(json.loads(args[0]))
        elif name == "panic":
            self._set_panicking(bool(args[0]) if args else True)
        elif name in ("preset/list", "presets"):
            self._set_presets([str(a) for a in args])
        elif name == "preset/loaded":
            preset = str(args[0]) if args else ""
            self.status["preset"] = preset
            self.statusBar().showMessage(f"preset {preset} loaded", 4000)
            # the engine sends a preset's values to the other subscribers, not to the client that asked:
            # read them all back from the tree
            self.client.request_tree()
            self._select_preset(preset)
            self._refresh_status_line()
        elif name == "preset/saved":
            self.statusBar().showMessage(f"saved preset {args[0] if args else ''}"
                                         + (f" to {args[1]}" if len(args) > 1 else ""), 6000)
            self.refresh_presets()
        elif name == "running":
            self.status["running"] = bool(args[0]) if args else True
            self._refresh_status_line()
        elif name.startswith("midi/"):  # learn acknowledged, a mapping made: say so
            self.statusBar().showMessage(f"MIDI {name[5:]}: {' '.join(str(a) for a in args)}", 8000)
        elif name == "prompts":
            self._add_prompts([str(a) for a in args])
        elif name in ("error", "warning"):
            text = " ".join(str(a) for a in args[1:]) if len(args) > 1 else " ".join(str(a) for a in args)
            where = str(args[0]) if len(args) > 1 else ""
            self.messages.append((name, f"{where}: {text}" if where else text))
            del self.messages[:-50]
            if name == "error" and where == f"{PREFIX}/prompts":
                return  # an engine without the prompt list: completion from what we have seen
            refused = where[len(PREFIX) + 1:] if where.startswith(PREFIX + "/") else ""
            if name == "error" and isinstance(self.controls.get(refused), TextControl):
                self._refused.add(refused)  # keep the refused text on screen
            self.statusBar().showMessage(f"{name}: {text}", 8000)
        elif name in self.controls and args:
            if not self._show_value(name, args[0], heard, change=True):
                return
            p = self.params.get(name)
            if p is not None:
                with contextlib.suppress(TypeError, ValueError):
                    p.value = p.coerce(args[0])
            if name in ("prompt", "prompt_b") or name.startswith("slot_"):
                self._add_prompts([str(args[0])])

    def _on_status(self, st: dict[str, Any]) -> None:
        self.status = st
        if "panic" in st:
            self._set_panicking(bool(st["panic"]))
        if st.get("prompt"):
            self._add_prompts([str(st["prompt"])])
        if isinstance(st.get("prompts"), list):
            self._add_prompts([str(p) for p in st["prompts"]])
        if "peak_db" in st and "rms_db" in st and self.meter.updates == 0:
            self.meter.set_levels(st["peak_db"], st["rms_db"])
        self._refresh_status_line()

    def _set_presets(self, names: list[str]) -> None:
        self.presets = names
        current = self.preset_list.currentItem().text() if self.preset_list.currentItem() else None
        self.preset_list.clear()
        for n in names:
            QListWidgetItem(n, self.preset_list)
        self._select_preset(current or str(self.status.get("preset") or ""))

    def _select_preset(self, name: str) -> None:
        items = self.preset_list.findItems(name, Qt.MatchFlag.MatchExactly)
        if items:
            self.preset_list.setCurrentItem(items[0])

    def _add_prompts(self, prompts: list[str]) -> None:
        new = [p for p in (s.strip() for s in prompts) if p and p not in self.known_prompts]
        if new:
            self.known_prompts = sorted(self.known_prompts + new, key=str.lower)
            self.completer_model.setStringList(self.known_prompts)

    def _set_panicking(self, on: bool) -> None:
        if on == self.panicking:
            return
        self.panicking = on
        self.resume_button.setProperty("panicking", "true" if on else "false")
        self.resume_button.setText("Resume — silent now  (Ctrl+R)" if on else "Resume  (Ctrl+R)")
        for w in (self.resume_button,):
            w.style().unpolish(w)
            w.style().polish(w)
        self._refresh_status_line()

    def status_text(self) -> str:
        """The status line: connection, panic, rtf, buffer, underruns, CPU, preset."""
        c = self.client
        if not self.connected:
            return f"○ disconnected: no engine answers at {c.host}:{c.osc_port} (OSCQuery {c.oscquery_port}); retrying…"
        st = self.status
        parts = ["● connected"]
        if self.panicking:
            parts.append("PANIC (silent)")
        elif st and not st.get("running", True):
            parts.append("stopped")
        if st.get("rtf") is not None:
            parts.append(f"rtf {float(st['rtf']):.2f}")
        if st.get("buffer_ms") is not None:
            target = f"/{float(st['latency_ms']):.0f}" if st.get("latency_ms") is not None else ""
            parts.append(f"buffer {float(st['buffer_ms']):.0f}{target} ms")
        if "underruns" in st:
            parts.append(f"underruns {st['underruns']}")
        if st.get("cpu_pct") is not None:
            parts.append(f"CPU {float(st['cpu_pct']):.0f}%")
        if st.get("limiter_db"):
            parts.append(f"limiter {float(st['limiter_db']):.1f} dB")
        if st.get("preset"):
            parts.append(f"preset {st['preset']}")
        return "  ·  ".join(parts)

    def _refresh_status_line(self) -> None:
        self.status_label.setText(self.status_text())
        state = "down" if not self.connected else ("panic" if self.panicking else "up")
        if self.status_label.property("state") != state:
            self.status_label.setProperty("state", state)
            self.status_label.style().unpolish(self.status_label)
            self.status_label.style().polish(self.status_label)

    # ------------------------------------------------------------------ closing

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt API)
        """Close the link only: the engine keeps playing."""
        self._closed = True
        self._watch.stop()
        self.client.on_message = self.client.on_tree = self.client.on_connection = None
        self.client.close()
        super().closeEvent(event)
