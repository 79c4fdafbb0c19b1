#!/usr/bin/env bash
# Checks the shipped systemd units: `systemd-analyze verify` in a scratch root holding the built
# binaries at their installed paths, and `systemd-analyze security` must rate each unit 2.0 or
# lower. Usage: systemd/check.sh [TARGET_DIR]   (default target/debug)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/debug}

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
ln -s usr/bin "$root/bin"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
cp systemd/*.service "$root/etc/systemd/system/"
cp "$(type -P kill)" "$root/usr/bin/kill"
for b in meshcert-agent meshcert-ca; do
  install -m 0755 "$bin/$b" "$root/usr/bin/$b"
done

status=0
for unit in meshcert-agent.service meshcert-ca.service; do
  if systemd-analyze verify --root="$root" "$unit"; then
    echo "verify $unit: ok"
  else
    echo "verify $unit: FAILED"; status=1
  fi
  score=$(systemd-analyze security --offline=yes "systemd/$unit" 2>/dev/null \
    | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
  if [ -n "$score" ] && awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
    echo "security $unit: $score (<= 2.0) ok"
  else
    echo "security $unit: '${score:-none}' FAILED (must be <= 2.0)"; status=1
  fi
done
exit $status
