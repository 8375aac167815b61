#!/usr/bin/env bash
# Installs llamad as a systemd service on this machine: the binaries into $PREFIX/bin,
# /etc/llamad/llamad.yaml (an existing one is kept), the unit, and starts it when
# systemd runs here. Builds first (ops/setup.sh) when there is no build yet.
#
#   ops/install-llamad.sh              # install, enable and start
#   ops/install-llamad.sh --no-start   # install only
#   DESTDIR=/tmp/root ops/install-llamad.sh --no-start   # into another root (packaging)
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${PREFIX:-/usr/local}"
DESTDIR="${DESTDIR:-}"
BUILD_DIR="${LLAMAD_BUILD_DIR:-build}"
START=1
for arg in "$@"; do
  case "$arg" in
    --no-start) START=0 ;;
    *) echo "install-llamad.sh: unknown argument '$arg' (only --no-start)" >&2; exit 2 ;;
  esac
done

[ -x "$BUILD_DIR/bin/llamad" ] || ops/setup.sh

bin="$DESTDIR$PREFIX/bin"
install -d "$bin" "$DESTDIR/etc/llamad" "$DESTDIR/etc/systemd/system" "$DESTDIR$PREFIX/share/doc/llamad"
for program in llamad llama-train llamactl llama-data; do
  install -m 0755 "$BUILD_DIR/bin/$program" "$bin/$program"
done
install -m 0644 README.md docs/jobspec.md "$DESTDIR$PREFIX/share/doc/llamad/"
config="$DESTDIR/etc/llamad/llamad.yaml"
if [ -e "$config" ]; then
  echo "install-llamad.sh: keeping the existing $config"
else
  install -m 0644 ops/systemd/llamad.yaml "$config"
fi
# A config that does not load would only show up as a failing service: say so now.
"$bin/llamad" --config "$config" --check >/dev/null
sed "s|/usr/local/|$PREFIX/|g" ops/systemd/llamad.service > "$DESTDIR/etc/systemd/system/llamad.service"
chmod 0644 "$DESTDIR/etc/systemd/system/llamad.service"
echo "install-llamad.sh: installed into ${DESTDIR:-/} (binaries in $PREFIX/bin, config /etc/llamad/llamad.yaml)"

if [ "$START" = 1 ] && [ -z "$DESTDIR" ]; then
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    systemctl enable llamad
    systemctl restart llamad  # a reinstall replaces a running llamad with the new binary
    systemctl --no-pager status llamad 2>&1 | head -n 5 || true
  else
    echo "install-llamad.sh: systemd is not running here; start llamad with:"
    echo "  $PREFIX/bin/llamad --config /etc/llamad/llamad.yaml"
  fi
fi
