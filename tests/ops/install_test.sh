#!/usr/bin/env bash
# ops/install-llamad.sh into a scratch root: every file lands, the installed llamad
# accepts the installed config, the unit starts that llamad, and an existing config
# is kept on reinstall.
set -euo pipefail
source_dir="$1"
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
export PREFIX=/usr/local
# The test installs this build; it must not start one (ops/setup.sh) of its own.
[ -x "$LLAMAD_BUILD_DIR/bin/llamad" ] || { echo "no build in '$LLAMAD_BUILD_DIR'"; exit 1; }
DESTDIR="$root" "$source_dir/ops/install-llamad.sh" --no-start
for f in usr/local/bin/llamad usr/local/bin/llama-train usr/local/bin/llamactl usr/local/bin/llama-data \
         etc/llamad/llamad.yaml etc/systemd/system/llamad.service usr/local/share/doc/llamad/README.md; do
  [ -e "$root/$f" ] || { echo "missing after install: $f"; exit 1; }
done
resolved="$("$root/usr/local/bin/llamad" --config "$root/etc/llamad/llamad.yaml" --check)"
grep -q '^role: both$' <<<"$resolved" || { echo "$resolved"; exit 1; }
grep -q '^max_fault_drained_percent: 10$' <<<"$resolved" || { echo "$resolved"; exit 1; }
grep -q '^forget_lost_nodes_after_ms: 86400000$' <<<"$resolved" || { echo "$resolved"; exit 1; }
if out="$("$root/usr/local/bin/llamad" --config "$root/etc/llamad/llamad.yaml" --max-fault-drained-percent 101 \
          --check 2>&1)"; then
  echo "llamad accepted max_fault_drained_percent 101"; exit 1
fi
grep -q "max_fault_drained_percent: 101 is not between 0 and 100" <<<"$out" || { echo "$out"; exit 1; }
unit="$root/etc/systemd/system/llamad.service"
grep -q '^ExecStart=/usr/local/bin/llamad --config /etc/llamad/llamad.yaml$' "$unit" || { cat "$unit"; exit 1; }
grep -q '^KillMode=mixed$' "$unit" || { cat "$unit"; exit 1; }
echo "role: node" > "$root/etc/llamad/llamad.yaml"
echo "scheduler: 10.0.0.1:7070" >> "$root/etc/llamad/llamad.yaml"
out="$(DESTDIR="$root" "$source_dir/ops/install-llamad.sh" --no-start)"
grep -q "keeping the existing" <<<"$out" || { echo "$out"; exit 1; }
grep -q '^role: node$' "$root/etc/llamad/llamad.yaml" || { echo "the existing config was replaced"; exit 1; }
# A broken config stops the install with the file and key named.
echo "rol: node" > "$root/etc/llamad/llamad.yaml"
if out="$(DESTDIR="$root" "$source_dir/ops/install-llamad.sh" --no-start 2>&1)"; then
  echo "install accepted a config with an unknown key"; exit 1
fi
grep -q "unknown key 'rol'" <<<"$out" || { echo "$out"; exit 1; }
echo "install into a scratch root: ok"
