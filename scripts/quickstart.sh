#!/usr/bin/env bash
# meshcert quickstart: a local CA holder with a builtin root and one node agent joined to it,
# issuing a real SVID for the current user. Runs until Ctrl-C.
#
#   ./scripts/quickstart.sh            (builds the binaries first)
#
# Everything lives under $MESHCERT_QUICKSTART_DIR (default: /tmp/meshcert-quickstart).
set -euo pipefail
cd "$(dirname "$0")/.."

dir=${MESHCERT_QUICKSTART_DIR:-/tmp/meshcert-quickstart}
uid=$(id -u)
gid=$(id -g)
user=$(id -un)
node=quickstart-node
mesh=mesh-a
td=quickstart.meshcert.test

echo "building meshcert-ca and meshcert-agent (cargo build --bins; the dev profile builds fastest)..." >&2
cargo build --bins --quiet -p meshcert-ca -p meshcert-agent
bin=target/debug

rm -rf "$dir"
mkdir -p "$dir/ca" "$dir/agent" "$dir/run"
chmod 0700 "$dir"

cat > "$dir/virtualmesh.yaml" <<YAML
apiVersion: networking.smh.solo.io/v1alpha1
kind: VirtualMesh
metadata:
  name: quickstart
spec:
  displayName: meshcert quickstart
  meshes:
    - name: $mesh
      trustDomain: $td
      type: generic
  certificateAuthority:
    builtin:
      ttlDays: 365
      rsaKeySizeBytes: 2048
      orgName: service-mesh-hub
  shared: {}
  enforceAccessControl: ENABLED
holder:
  listen: 127.0.0.1:0
  stateDir: $dir/ca
  adminSocket: $dir/run/ca-admin.sock
entries:
  - id: $user
    spiffeId: spiffe://$td/user/$user
    nodes: [$node]
    selectors: ["unix:uid:$uid"]
    ttl: 2m
    dir: $user
    owner: "$uid:$gid"
YAML

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo >&2
  echo "stopping..." >&2
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup INT TERM EXIT

"$bin/meshcert-ca" run --config "$dir/virtualmesh.yaml" >"$dir/ca.log" 2>&1 &
pids+=($!)
export MESHCERT_CA_ADMIN_SOCKET="$dir/run/ca-admin.sock"

addr=""
for _ in $(seq 1 300); do
  if [ -S "$MESHCERT_CA_ADMIN_SOCKET" ]; then
    addr=$("$bin/meshcert-ca" status -o json 2>/dev/null \
      | sed -n 's/^  "listenAddress": *"\([^"]*\)".*/\1/p' || true)
    [ -n "$addr" ] && break
  fi
  sleep 0.1
done
[ -n "$addr" ] || { echo "the CA holder did not start; see $dir/ca.log" >&2; cat "$dir/ca.log" >&2; exit 1; }

"$bin/meshcert-ca" bundle > "$dir/bundle.pem"
token=$("$bin/meshcert-ca" token create --node "$node" --mesh "$mesh")

cat > "$dir/agent.yaml" <<YAML
caAddress: $addr
caServerName: localhost
trustBundle: $dir/bundle.pem
nodeName: $node
mesh: $mesh
stateDir: $dir/agent
volumeDir: $dir/svids
workloadSocket: $dir/run/workload.sock
adminSocket: $dir/run/agent-admin.sock
YAML

# The token in the environment, not on the command line (readable by every local user).
MESHCERT_JOIN_TOKEN="$token" "$bin/meshcert-agent" run --config "$dir/agent.yaml" >"$dir/agent.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 300); do
  [ -e "$dir/svids/$user/svid.pem" ] && break
  sleep 0.1
done
[ -e "$dir/svids/$user/svid.pem" ] || { echo "no SVID yet; see $dir/agent.log" >&2; tail -20 "$dir/agent.log" >&2; exit 1; }

cat <<INFO

meshcert is running.
  CA holder          https://$addr   (log: $dir/ca.log)
  root bundle        $dir/bundle.pem
  agent              node $node in mesh $mesh   (log: $dir/agent.log)
  your SVID          $dir/svids/$user/svid.pem  (key: svid.key, bundle: bundle.pem)
  Workload API       export SPIFFE_ENDPOINT_SOCKET=unix://$dir/run/workload.sock
  agent status       $bin/meshcert-agent status --admin-socket $dir/run/agent-admin.sock
  mesh status        MESHCERT_CA_ADMIN_SOCKET=$MESHCERT_CA_ADMIN_SOCKET $bin/meshcert-ca status

The SVID lives 2 minutes and is rotated at about half of that. Press Ctrl-C to stop.
INFO

"$bin/meshcert-agent" status --admin-socket "$dir/run/agent-admin.sock" || true
wait
