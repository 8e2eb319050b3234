"""cicada's Qt panel (`cicada gui`): a separate client process that steers an engine through OSC + OSCQuery only.

``gui.client`` (no Qt) speaks OSC and OSCQuery; ``gui.widgets`` and
``gui.panel`` are the window; ``gui.app.main`` is the entry point.
"""
