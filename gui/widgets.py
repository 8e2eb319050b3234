"""The panel's building blocks: parameter controls built from OSCQuery nodes, a level meter, a spectrogram.

Every control emits ``changed(value)`` when the *user* moves it and has
``set_value(value)`` for feedback from the engine, which blocks signals (no
echo back to the engine) and leaves a control alone while the user holds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from PyQt6.QtCore import QRectF, QSize, Qt, pyqtSignal
from PyQt6.QtGui import QColor, QFont, QImage, QPainter, QPen
from PyQt6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QHBoxLayout,
    QLineEdit,
    QSizePolicy,
    QSlider,
    QSpinBox,
    QWidget,
)

from gui.client import ParamInfo, Value

SLIDER_STEPS = 1000  # resolution of a float fader
MAX_INT_SLIDER_SPAN = 10_000  # wider integer ranges (a seed) get a number field only


class Control(QWidget):
    """Base of the per-parameter controls."""

    changed = pyqtSignal(object)

    def __init__(self, param: ParamInfo, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.param = param
        self.setToolTip(param.describe())

    def set_value(self, value: Value) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def value(self) -> Value:  # pragma: no cover - overridden
        raise NotImplementedError

    def focus_widgets(self) -> list[QWidget]:
        """The widgets of this control that take keyboard focus, in tab order."""
        return []

    @property
    def busy(self) -> bool:
        """True while the user holds or edits it (feedback waits)."""
        return False


def _decimals(span: float) -> int:
    if span <= 2:
        return 3
    if span <= 20:
        return 2
    return 1


class NumberControl(Control):
    """A fader and a number field (with the unit) for a float or int parameter."""

    def __init__(self, param: ParamInfo, parent: QWidget | None = None) -> None:
        super().__init__(param, parent)
        assert param.low is not None and param.high is not None
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        span = param.high - param.low
        self.is_int = param.type == "i"
        self.slider: QSlider | None = None
        if not self.is_int or span <= MAX_INT_SLIDER_SPAN:
            self.slider = QSlider(Qt.Orientation.Horizontal)
            self.slider.setObjectName(f"slider_{param.name}")
            if self.is_int:
                self.slider.setRange(int(param.low), int(param.high))
                self.slider.setPageStep(max(1, int(span // 10)))
            else:
                self.slider.setRange(0, SLIDER_STEPS)
                self.slider.setPageStep(SLIDER_STEPS // 10)
            self.slider.setMinimumWidth(120)
            self.slider.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
            self.slider.setToolTip(param.describe())
            self.slider.valueChanged.connect(self._from_slider)
            lay.addWidget(self.slider, 1)
        self.spin: QSpinBox | QDoubleSpinBox
        if self.is_int:
            self.spin = QSpinBox()
            self.spin.setRange(int(param.low), int(param.high))
        else:
            self.spin = QDoubleSpinBox()
            self.spin.setDecimals(_decimals(span))
            self.spin.setRange(param.low, param.high)
            self.spin.setSingleStep(span / 100.0 if span > 0 else 0.1)
        self.spin.setObjectName(f"spin_{param.name}")
        self.spin.setKeyboardTracking(False)  # typed numbers go on Enter, not per keystroke
        self.spin.setAccelerated(True)
        if param.unit:
            self.spin.setSuffix(f" {param.unit}")
        self.spin.setToolTip(param.describe())
        self.spin.setMinimumWidth(110 if self.slider is not None else 160)
        self.spin.valueChanged.connect(self._from_spin)
        lay.addWidget(self.spin, 0 if self.slider is not None else 1)
        self._put(param.value)

    # user -> engine
    def _from_slider(self, pos: int) -> None:
        v = self._slider_to_value(pos)
        self.spin.blockSignals(True)
        self.spin.setValue(v)  # type: ignore[arg-type]
        self.spin.blockSignals(False)
        self.changed.emit(v)

    def _from_spin(self, v: float) -> None:
        v = self.param.coerce(v)
        if self.slider is not None:
            self.slider.blockSignals(True)
            self.slider.setValue(self._value_to_slider(v))
            self.slider.blockSignals(False)
        self.changed.emit(v)

    def _slider_to_value(self, pos: int) -> Value:
        if self.is_int:
            return int(pos)
        return self.param.from_normalized(pos / SLIDER_STEPS)

    def _value_to_slider(self, v: Value) -> int:
        if self.is_int:
            return int(v)
        return int(round(self.param.normalized(v) * SLIDER_STEPS))

    # engine -> widget
    def _put(self, value: Value) -> None:
        try:
            v = self.param.coerce(value)
        except (TypeError, ValueError):
            return
        for w in (self.slider, self.spin):
            if w is not None:
                w.blockSignals(True)
        if self.slider is not None:
            self.slider.setValue(self._value_to_slider(v))
        self.spin.setValue(v)  # type: ignore[arg-type]
        for w in (self.slider, self.spin):
            if w is not None:
                w.blockSignals(False)

    def set_value(self, value: Value) -> None:
        if not self.busy:
            self._put(value)

    def value(self) -> Value:
        return self.param.coerce(self.spin.value())

    @property
    def busy(self) -> bool:
        return self.slider is not None and self.slider.isSliderDown()

    def focus_widgets(self) -> list[QWidget]:
        return [w for w in (self.slider, self.spin) if w is not None]


class BoolControl(Control):
    """A checkbox for an on/off parameter."""

    def __init__(self, param: ParamInfo, parent: QWidget | None = None) -> None:
        super().__init__(param, parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.box = QCheckBox("on")
        self.box.setObjectName(f"check_{param.name}")
        self.box.setToolTip(param.describe())
        self.box.setChecked(bool(param.value))
        self.box.toggled.connect(lambda on: self.changed.emit(bool(on)))
        lay.addWidget(self.box)
        lay.addStretch(1)

    def set_value(self, value: Value) -> None:
        self.box.blockSignals(True)
        self.box.setChecked(bool(self.param.coerce(value)))
        self.box.blockSignals(False)

    def value(self) -> Value:
        return self.box.isChecked()

    def focus_widgets(self) -> list[QWidget]:
        return [self.box]


class ChoiceControl(Control):
    """A combo box for a parameter with a fixed set of values."""

    def __init__(self, param: ParamInfo, parent: QWidget | None = None) -> None:
        super().__init__(param, parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.combo = QComboBox()
        self.combo.setObjectName(f"combo_{param.name}")
        self.combo.addItems(list(param.choices))
        self.combo.setToolTip(param.describe())
        self.set_value(param.value)
        self.combo.currentTextChanged.connect(lambda t: self.changed.emit(str(t)))
        lay.addWidget(self.combo)
        lay.addStretch(1)

    def set_value(self, value: Value) -> None:
        i = self.combo.findText(str(value))
        if i >= 0:
            self.combo.blockSignals(True)
            self.combo.setCurrentIndex(i)
            self.combo.blockSignals(False)

    def value(self) -> Value:
        return self.combo.currentText()

    def focus_widgets(self) -> list[QWidget]:
        return [self.combo]


class TextControl(Control):
    """A text field; the text goes to the engine on Enter."""

    def __init__(self, param: ParamInfo, parent: QWidget | None = None, placeholder: str = "") -> None:
        super().__init__(param, parent)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        self.edit = QLineEdit()
        self.edit.setObjectName(f"text_{param.name}")
        self.edit.setToolTip(param.describe() + "\nEnter sends it.")
        self.edit.setPlaceholderText(placeholder)
        self.edit.setClearButtonEnabled(True)
        self.edit.setText(str(param.value))
        self.edit.setCursorPosition(0)
        self.edit.returnPressed.connect(self._send)
        lay.addWidget(self.edit)

    def _send(self) -> None:
        self.edit.setModified(False)
        self.changed.emit(self.edit.text())

    def set_value(self, value: Value) -> None:
        if self.busy or self.edit.text() == str(value):
            return  # the same text again (a tree re-read) leaves the cursor where the user put it
        self.edit.setText(str(value))
        self.edit.setCursorPosition(0)  # show the start of a long prompt

    def value(self) -> Value:
        return self.edit.text()

    @property
    def busy(self) -> bool:
        return self.edit.hasFocus() and self.edit.isModified()

    def focus_widgets(self) -> list[QWidget]:
        return [self.edit]


def make_control(param: ParamInfo, parent: QWidget | None = None) -> Control:
    """The control that suits a parameter: fader + number, checkbox, combo box or text field."""
    if param.is_number:
        return NumberControl(param, parent)
    if param.is_bool:
        return BoolControl(param, parent)
    if param.is_choice:
        return ChoiceControl(param, parent)
    return TextControl(param, parent)


# --------------------------------------------------------------------------- meters


def _db_pos(db: float, floor: float) -> float:
    """dB -> 0..1 along a meter whose left end is ``floor`` dB."""
    if not math.isfinite(db):
        return 0.0
    return min(max((db - floor) / -floor, 0.0), 1.0)


class LevelMeter(QWidget):
    """Peak and RMS of each channel as horizontal bars, -60..0 dBFS, with a decaying peak hold."""

    FLOOR = -60.0

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.peak: list[float] = [-120.0, -120.0]
        self.rms: list[float] = [-120.0, -120.0]
        self.hold: list[float] = [-120.0, -120.0]
        self.updates = 0
        self.setMinimumHeight(max(54, int(self.fontMetrics().height() * 3.6)))
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setToolTip("Output level per channel: bar = RMS, bright line = peak, tick = peak hold (dBFS)")

    def sizeHint(self) -> QSize:
        fm = self.fontMetrics().height()
        return QSize(320, int(fm * 1.3) * max(2, len(self.peak)) + fm + 8)

    def set_levels(self, peak: Sequence[float], rms: Sequence[float]) -> None:
        peak, rms = [float(x) for x in peak], [float(x) for x in rms]
        if len(self.hold) != len(peak):
            self.hold = list(peak)
        self.hold = [max(p, h - 0.6) for p, h in zip(peak, self.hold)]  # ~12 dB/s at 20 Hz
        self.peak, self.rms = peak, rms
        self.updates += 1
        self.update()

    def paintEvent(self, event: object) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing, False)
        w, h = self.width(), self.height()
        p.fillRect(0, 0, w, h, QColor("#15171c"))
        n = max(1, len(self.peak))
        label_w = max(18, self.fontMetrics().height())
        scale_h = max(16, self.fontMetrics().height())
        bar_h = max(6, (h - scale_h - 4) // n - 3)
        x0, bw = label_w, w - label_w - 4
        font = QFont(self.font())
        font.setPointSizeF(max(6.0, font.pointSizeF() * 0.8))
        p.setFont(font)
        for i in range(n):
            y = 2 + i * (bar_h + 3)
            p.fillRect(x0, y, bw, bar_h, QColor("#23262e"))
            rms = _db_pos(self.rms[i], self.FLOOR)
            for lo, hi, col in ((0.0, 0.8, "#3fbf6f"), (0.8, 0.95, "#e0c040"), (0.95, 1.0, "#e05040")):
                a, b = lo, min(hi, rms)
                if b > a:
                    p.fillRect(int(x0 + a * bw), y, max(1, int((b - a) * bw)), bar_h, QColor(col))
            pk = _db_pos(self.peak[i], self.FLOOR)
            p.fillRect(int(x0 + pk * bw) - 1, y, 2, bar_h, QColor("#f0f0f0"))
            hd = _db_pos(self.hold[i], self.FLOOR)
            p.fillRect(int(x0 + hd * bw) - 1, y, 2, bar_h, QColor("#ff8060" if self.hold[i] > -1.0 else "#a0a8b8"))
            p.setPen(QColor("#a0a8b8"))
            p.drawText(QRectF(0, y, label_w - 2, bar_h), Qt.AlignmentFlag.AlignCenter, "LR"[i] if n == 2 else str(i + 1))
        ys = 2 + n * (bar_h + 3)
        p.setPen(QPen(QColor("#707888")))
        for db in (-60, -48, -36, -24, -12, -6, 0):
            x = int(x0 + _db_pos(db, self.FLOOR) * bw)
            p.drawLine(x, ys, x, ys + 3)
            p.drawText(QRectF(x - 20, ys + 2, 40, scale_h), Qt.AlignmentFlag.AlignHCenter, f"{db}")
        p.end()


def _palette() -> list[int]:
    """256 ARGB colours, dark blue -> purple -> orange -> pale yellow (an inferno-like map)."""
    stops = np.array([
        [0.00, 0, 0, 4], [0.15, 20, 11, 52], [0.35, 101, 21, 110], [0.55, 188, 55, 84],
        [0.75, 249, 142, 9], [0.90, 245, 219, 76], [1.00, 252, 255, 164],
    ])
    x = np.linspace(0, 1, 256)
    rgb = np.stack([np.interp(x, stops[:, 0], stops[:, c]) for c in (1, 2, 3)], axis=1).astype(np.uint32)
    return [int(0xFF000000 | (r << 16) | (g << 8) | b) for r, g, b in rgb]


class Spectrogram(QWidget):
    """A scrolling spectrogram: one column per spectrum message (log bands, low at the bottom).

    The colour scale spans ``RANGE_DB`` below a top that follows the loudest
    recent band (falling back slowly, between ``MIN_TOP_DB`` and 0 dB), so a
    quiet pack and a loud one both show their structure.
    """

    RANGE_DB = 70.0
    MIN_TOP_DB = -45.0
    TOP_FALL_DB = 0.05  # per column (~0.75 dB/s at 15 Hz)

    def __init__(self, columns: int = 150, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.columns = columns
        self.bands = 64
        self.columns_added = 0
        self.top_db = self.MIN_TOP_DB
        self._data = np.zeros((self.bands, columns), np.uint8)
        self._colors = _palette()
        self.setMinimumSize(200, 110)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.setToolTip("Spectrum of the output over time (log frequency, 30 Hz at the bottom; newest on the right)")

    def sizeHint(self) -> QSize:
        return QSize(self.columns, 160)

    def add(self, db: np.ndarray) -> None:
        """One spectrum, dB per band (low band first)."""
        db = np.asarray(db, np.float32).ravel()
        if db.size == 0:
            return
        if db.size != self.bands:
            self.bands = int(db.size)
            self._data = np.zeros((self.bands, self.columns), np.uint8)
        x = np.nan_to_num(db, nan=-200.0, posinf=0.0, neginf=-200.0)
        self.top_db = min(0.0, max(self.MIN_TOP_DB, float(x.max()), self.top_db - self.TOP_FALL_DB))
        floor = self.top_db - self.RANGE_DB
        col = np.clip((x - floor) / self.RANGE_DB, 0.0, 1.0) * 255.0
        self._data[:, :-1] = self._data[:, 1:]
        self._data[:, -1] = col[::-1].astype(np.uint8)  # row 0 at the top: the highest band
        self.columns_added += 1
        self.update()

    def image(self) -> QImage:
        """The current picture (bands x columns, indexed colours)."""
        data = np.ascontiguousarray(self._data)
        img = QImage(data.data, data.shape[1], data.shape[0], data.strides[0], QImage.Format.Format_Indexed8)
        img.setColorTable(self._colors)
        return img.copy()  # own the pixels: ``data`` is a temporary

    def paintEvent(self, event: object) -> None:  # noqa: N802 (Qt API)
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform, True)
        p.drawImage(QRectF(self.rect()), self.image())
        p.end()
