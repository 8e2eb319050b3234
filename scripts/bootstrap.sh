#!/usr/bin/env bash
# Set up cicada on a fresh Debian/Ubuntu machine and run one job.
#
#   bash scripts/bootstrap.sh test    install everything, run the test suite
#   bash scripts/bootstrap.sh run     install everything, run the main job
#
# System packages are installed with apt-get when running as root (or with
# sudo when it is available); Python packages go into ./.venv.
set -euo pipefail
cd "$(dirname "$0")/.."
job="${1:-run}"
shift || true

# Qt offscreen (the panel and its tests): libegl1 .. fonts-dejavu-core
SYSTEM_PACKAGES=(python3-venv python3-dev libportaudio2 libsndfile1 jackd2 jack-tools
  libegl1 libgl1 libxkbcommon0 libfontconfig1 libfreetype6 libdbus-1-3 libglib2.0-0 libx11-6 fonts-dejavu-core)

install_system() {
  local missing=()
  for p in "${SYSTEM_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local SUDO=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
      echo "cicada: missing system packages: ${missing[*]}; install them as root (apt-get install ${missing[*]})" >&2
      return 0
    fi
  fi
  echo "cicada: installing system packages: ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_python() {
  local py="${PYTHON:-python3}"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  # torch is pinned: an unpinned torch pulls several GB of CUDA packages.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # constraints.txt pins every package at the versions the measurements were made with.
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[export,dev,gui]"
  # Compile the output-safety DSP now (numba caches it on disk), not during the first `cicada play`.
  .venv/bin/python -c "from engine.post import OutputSafety; OutputSafety(48000, 2); import engine.sampling as s; s.warmup()"
}

install_system
install_python

case "$job" in
  test)
    exec .venv/bin/python -m pytest -q "$@"
    ;;
  run)
    # Sound from the default pack and preset. Without packs/default (a
    # checkout that left it out), build a random-weight pack of the default
    # architecture so the engine still runs.
    pack_args=()
    if [ ! -f packs/default/manifest.toml ] && [ -z "${CICADA_PACK:-}" ]; then
      out="out/packs/tiny-random"
      [ -f "$out/manifest.toml" ] || .venv/bin/cicada export random --shape tiny --quantize int8 --out "$out" --force
      pack_args=(--pack "$out")
    fi
    # No sound device: cicada says so and plays into out/cicada-play.wav instead.
    exec .venv/bin/cicada play "${pack_args[@]}" "$@"
    ;;
  *)
    echo "usage: bash scripts/bootstrap.sh test|run [args...]" >&2
    exit 2
    ;;
esac
