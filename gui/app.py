"""`cicada gui`: open the panel on a running engine, or start one first.

The panel is a client: it finds an engine by its OSCQuery port. When nothing
answers there (and ``--no-start`` is not given, and the host is this
machine) it starts ``cicada serve`` as a detached process (its own session,
its output in a log file), so closing the panel leaves the sound playing;
opening the panel again connects to that same engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gui.client import EngineClient, engine_answers

log = logging.getLogger("cicada.gui")

REPO = Path(__file__).resolve().parent.parent
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="cicada gui",
        description="The cicada panel: steer a running engine (OSC + OSCQuery), or start one and steer it.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="engine host (default 127.0.0.1)")
    ap.add_argument("--osc-port", type=int, default=9000, help="engine OSC port, UDP (default 9000)")
    ap.add_argument("--oscquery-port", type=int, default=9001, help="engine OSCQuery port, HTTP (default 9001)")
    ap.add_argument("--no-start", action="store_true",
                    help="never start an engine: wait for one to answer (it connects by itself when one does)")
    ap.add_argument("--large", action="store_true", help="stage type size: large text and controls")
    ap.add_argument("--pack", type=Path, default=None, help="pack for an engine the panel starts")
    ap.add_argument("--preset", default=None,
                    help="preset to load: the starting preset of an engine the panel starts, else loaded over OSC")
    ap.add_argument("--device", default=None, help="output device for an engine the panel starts (index or name)")
    ap.add_argument("--null", action="store_true",
                    help="start the engine without a sound device (cicada serve --null), e.g. to try the panel")
    ap.add_argument("--log", type=Path, default=None,
                    help="log file of an engine the panel starts (default: $XDG_STATE_HOME/cicada/engine.log)")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what the panel does")
    return ap


def default_log() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "cicada" / "engine.log"


def engine_command(args: argparse.Namespace, device: str | None = None) -> list[str]:
    """The `cicada serve` command line for an engine the panel starts (paths made absolute)."""
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--osc-port", str(args.osc_port),
           "--oscquery-port", str(args.oscquery_port)]
    if args.null:
        cmd.append("--null")
    if args.pack is not None:
        cmd += ["--pack", str(Path(args.pack).resolve())]
    if args.preset:
        preset = Path(args.preset)
        cmd += ["--preset", str(preset.resolve()) if preset.suffix == ".toml" and preset.exists() else args.preset]
    device = device if device is not None else args.device
    if device and not args.null:
        cmd += ["--device", str(device)]
    return cmd


class EngineLauncher:
    """Starts `cicada serve` detached (own session, output to a log file), and restarts the one it started."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path: Path = args.log or default_log()

    def start(self, device: str | None = None) -> subprocess.Popen[bytes]:
        cmd = engine_command(self.args, device)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} cicada gui starts: {' '.join(cmd)}\n".encode())
            logf.flush()
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
            self.proc = subprocess.Popen(
                cmd, cwd=str(REPO), stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, close_fds=True,
            )
        log.info("started the engine (pid %d), log %s", self.proc.pid, self.log_path)
        return self.proc

    def restart(self, device: str | None = None) -> None:
        """Stop the engine this launcher started (SIGTERM: it fades out) and start it again."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5.0)
        if device is not None:
            self.args.device = device
        self.start()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the panel until its window closes; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from PyQt6.QtWidgets import QApplication
    except ImportError as exc:
        print(f"cicada gui: PyQt6 is not usable here ({exc}); install it with pip install -e '.[gui]' "
              "(and the Qt system libraries: libegl1 libgl1 libxkbcommon0 libfontconfig1 libdbus-1-3)",
              file=sys.stderr)
        return 1

    from gui.panel import Panel, apply_theme

    launcher: EngineLauncher | None = None
    if not engine_answers(args.host, args.oscquery_port):
        if args.no_start:
            print(f"cicada gui: no engine at {args.host}:{args.oscquery_port} yet; waiting for one", file=sys.stderr)
        elif args.host not in LOCAL_HOSTS:
            print(f"cicada gui: no engine answers at {args.host}:{args.oscquery_port}; start one there "
                  "(cicada serve) — the panel connects when it does", file=sys.stderr)
        else:
            launcher = EngineLauncher(args)
            launcher.start()
            print(f"cicada gui: started an engine (pid {launcher.proc.pid if launcher.proc else '?'}; "
                  f"log {launcher.log_path}); it keeps playing when the panel closes", file=sys.stderr)
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "cicada"])
    assert isinstance(app, QApplication)
    app.setApplicationName("cicada")
    apply_theme(app, large=args.large)
    client = EngineClient(args.host, args.osc_port, args.oscquery_port)
    panel = Panel(
        client,
        large=args.large,
        restart_engine=launcher.restart if launcher is not None else None,
        # an engine the panel starts loads the preset itself; a running one gets it over OSC
        preset=None if launcher is not None else args.preset,
    )
    panel.show()
    try:
        return int(app.exec())
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
