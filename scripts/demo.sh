#!/usr/bin/env bash
# `make demo`: boots a sandbox VM with the shim, shows how QEMU is confined (its uid, seccomp
# mode and root), pings the guest from its network namespace, hot-plugs a second NIC and
# pings through it, runs a command in a container inside the sandbox (its busybox root
# filesystem bound into the virtio-fs share), then stops it with SIGTERM and checks that
# nothing is left: no QEMU or virtiofsd process, no namespace, no TAP, no mount, no run
# directory. Then containerd runs a container in a VM through the shim: a private containerd
# (its own root, state and sockets in the demo's temp dir) and `ctr run --rm --runtime
# io.containerd.kata.v2`, and again nothing is left. Last, VM templates: a template made once
# (`sandbox template create`), a sandbox restored from it (its own MAC, hostname and clock),
# stopped, and the template deleted.
#
# `make demo` first installs what is missing (`make deps`) and builds the guest
# (`make guest-assets`). Needs root. Env: GUEST_DIR, CARGO, DEMO_CONFIG.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export GUEST_DIR=${GUEST_DIR:-$REPO/.cache/guest}
CARGO=${CARGO:-cargo}
CONFIG=${DEMO_CONFIG:-$REPO/configs/configuration-qemu.toml}
SHIM=$REPO/target/release/containerd-shim-kata-v2
ID=demo-$$
WORK=$(mktemp -d /tmp/kata-demo.XXXXXX)
RUN_ROOT=$WORK/run
READY=$WORK/ready.json
LOG=$WORK/shim.log
READY_LIMIT=240   # seconds for boot + agent under TCG
STOP_LIMIT=30     # seconds for teardown after SIGTERM

say()  { printf '\033[1mdemo:\033[0m %s\n' "$*"; }
die()  { printf '\033[1;31mdemo: FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
now()  { date +%s%N; }
ms()   { echo $(( ($(now) - $1) / 1000000 )); }
field() { sed -n "s/.*\"$1\":\"\\{0,1\\}\\([^\",]*\\).*/\\1/p" "${2:-/dev/stdin}" | head -n1; }

[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces, TAP devices): run sudo make demo"

shim_pid=""
containerd_pid=""
cleanup() {
    local rc=$?
    if [ -n "$containerd_pid" ] && kill -0 "$containerd_pid" 2>/dev/null; then
        kill -TERM "$containerd_pid" 2>/dev/null || true
        wait "$containerd_pid" 2>/dev/null || true
    fi
    if [ $rc -ne 0 ] && [ -f "$WORK/containerd.log" ]; then
        echo "--- containerd log (with the shim's) ---" >&2; tail -n 30 "$WORK/containerd.log" >&2
    fi
    if [ -n "$shim_pid" ] && kill -0 "$shim_pid" 2>/dev/null; then
        say "cleaning up after a failure: SIGTERM to the shim ($shim_pid)"
        kill -TERM "$shim_pid" 2>/dev/null || true
        for _ in $(seq $((STOP_LIMIT * 10))); do kill -0 "$shim_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$shim_pid" 2>/dev/null || true
    fi
    # What a dead shim left is in its record: the shim's own cleanup removes it.
    if [ $rc -ne 0 ] && [ -x "$SHIM" ]; then
        "$SHIM" sandbox cleanup --id "${current_id:-$ID}" --run-root "$RUN_ROOT" >&2 || true
    fi
    [ -n "${TSTORE:-}" ] && rm -rf "$TSTORE"
    if [ $rc -ne 0 ] && [ -f "$LOG" ]; then
        echo "--- shim log ($LOG) ---" >&2; tail -n 30 "$LOG" >&2
    fi
    # Never delete through a mount: a bound root filesystem would lose its files.
    if awk -v w="$WORK/" 'index($5, w) == 1 { found = 1 } END { exit !found }' /proc/self/mountinfo; then
        printf 'demo: mounts are left under %s; not removing it\n' "$WORK" >&2
        return
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

t0=$(now)
say "building the shim (release, default features)"
t=$(now)
"$CARGO" build --release --quiet -p containerd-shim-kata-v2
build_ms=$(ms "$t")
"$SHIM" --version

say "checking the host"
"$SHIM" sandbox check --config "$CONFIG"

# Starts `sandbox run` for id $1 with configuration $2 in the background (pid in shim_pid)
# and waits for its ready file $3; its stderr goes to $4.
start_sandbox() {
    current_id=$1
    "$SHIM" sandbox run --config "$2" --id "$1" --run-root "$RUN_ROOT" \
        --ready-file "$3" >"$WORK/facts.txt" 2>"$4" &
    shim_pid=$!
    for _ in $(seq $((READY_LIMIT * 10))); do
        [ -s "$3" ] && return 0
        kill -0 "$shim_pid" 2>/dev/null || die "the shim exited before the sandbox was ready"
        sleep 0.1
    done
    die "the sandbox was not ready within ${READY_LIMIT}s"
}

# Stops the sandbox of shim_pid with SIGTERM and waits for the shim to exit with status 0.
stop_sandbox() {
    kill -TERM "$shim_pid"
    for _ in $(seq $((STOP_LIMIT * 10))); do kill -0 "$shim_pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$shim_pid" 2>/dev/null && die "the shim did not exit within ${STOP_LIMIT}s of SIGTERM"
    local rc=0
    wait "$shim_pid" || rc=$?
    shim_pid=""
    [ $rc -eq 0 ] || die "the shim exited with status $rc"
}

say "starting sandbox $ID in the background"
t=$(now)
start_sandbox "$ID" "$CONFIG" "$READY" "$LOG"
ready_ms=$(ms "$t")
cat "$WORK/facts.txt"
ns=$(field netns_name "$READY")
vmm_pid=$(field vmm_pid "$READY")
guest1=$(field guest_ip "$READY")
tap1=$(field tap "$READY")
[ -n "$ns" ] && [ -n "$guest1" ] && [ -n "$vmm_pid" ] || die "could not read the facts in $READY"
status_of() { awk -v k="$1:" '$1 == k { print $2; exit }' "/proc/$vmm_pid/status"; }
echo "  QEMU $vmm_pid: uid $(status_of Uid) ($(id -nu "$(status_of Uid)" 2>/dev/null || echo '?')), seccomp mode $(status_of Seccomp), root $(readlink "/proc/$vmm_pid/root")"

say "ping $guest1 (guest eth0, via $tap1) from namespace $ns"
t=$(now)
ip netns exec "$ns" ping -c 3 -W 2 "$guest1" | tail -n 2
ping1_ms=$(ms "$t")

say "hot-plugging a second NIC"
t=$(now)
nic2=$("$SHIM" sandbox hotplug-nic --json --id "$ID" --run-root "$RUN_ROOT")
hotplug_ms=$(ms "$t")
guest2=$(echo "$nic2" | field guest_ip)
tap2=$(echo "$nic2" | field tap)
echo "  net1: $tap2 -> guest $(echo "$nic2" | field guest_interface) $guest2 (hot-plugged at $(echo "$nic2" | field location))"
say "ping $guest2 (hot-plugged NIC, via $tap2)"
ip netns exec "$ns" ping -c 3 -W 2 "$guest2" | tail -n 2
taps=$(ip -n "$ns" -o link show type tun | awk -F': ' '{print $2}' | tr '\n' ' ')

say "running a command in a container inside the sandbox (sandbox exec)"
shared=$RUN_ROOT/sandboxes/$ID/shared
virtiofsd_pids=$(pgrep -f -- "--shared-dir=$shared" | tr '\n' ' ' || true)
[ -n "$virtiofsd_pids" ] || die "no virtiofsd serves $shared"
echo "  virtiofsd $virtiofsd_pids serves $shared (tag kataShared, guest /run/kata-containers/shared)"
t=$(now)
exec_out=$("$SHIM" sandbox exec --id "$ID" --run-root "$RUN_ROOT" --container hello -- \
    sh -c 'echo hello from a container; hostname; cat /proc/1/cmdline | tr "\0" " "; echo; ls /') ||
    die "sandbox exec failed"
exec_ms=$(ms "$t")
echo "$exec_out" | sed 's/^/  | /'
echo "$exec_out" | head -n1 | grep -qx 'hello from a container' || die "unexpected container output"
rc=0; "$SHIM" sandbox exec --id "$ID" --run-root "$RUN_ROOT" -- sh -c 'exit 7' || rc=$?
[ $rc -eq 7 ] || die "the container's exit status 7 came back as $rc"
echo "  sh -c 'exit 7' in a container: sandbox exec exited with $rc"

say "stopping the sandbox (SIGTERM to $shim_pid)"
t=$(now)
stop_sandbox
stop_ms=$(ms "$t")

say "checking that nothing is left behind"
left=()
[ -d "/proc/$vmm_pid" ] && left+=("QEMU process $vmm_pid")
pgrep -f "qemu-system.*-name sandbox-$ID" >/dev/null && left+=("a QEMU process for sandbox-$ID")
for pid in $virtiofsd_pids; do [ -d "/proc/$pid" ] && left+=("virtiofsd process $pid"); done
pgrep -f -- "--shared-dir=$shared" >/dev/null && left+=("a virtiofsd for $shared")
grep -qF " $RUN_ROOT/" /proc/self/mountinfo && left+=("mounts under $RUN_ROOT: $(awk -v r="$RUN_ROOT/" 'index($5, r) == 1 { print $5 }' /proc/self/mountinfo | tr '\n' ' ')")
ip netns list | grep -qw "$ns" && left+=("namespace $ns")
[ -e "/run/netns/$ns" ] && left+=("/run/netns/$ns")
for tap in $taps; do ip -o link show "$tap" >/dev/null 2>&1 && left+=("TAP $tap in the root namespace"); done
[ -n "$(find "$RUN_ROOT" -mindepth 2 -print -quit 2>/dev/null)" ] && left+=("run files under $RUN_ROOT")
[ -e "$READY" ] && left+=("ready file $READY")
[ ${#left[@]} -eq 0 ] || die "left behind: ${left[*]}"
echo "  no QEMU or virtiofsd process, no namespace $ns, no TAP ($taps), no mount, no run directory"

say "containerd: a private one (root, state and sockets in $WORK/containerd)"
CTD=$WORK/containerd
mkdir -p "$CTD"
cat >"$CTD/config.toml" <<EOF
version = 2
root = "$CTD/root"
state = "$CTD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$CTD/containerd.sock"
[ttrpc]
  address = "$CTD/containerd.sock.ttrpc"
EOF
# containerd finds io.containerd.kata.v2 as containerd-shim-kata-v2 on its PATH and passes
# its environment (KATA_CONF_FILE: the configuration) to the shim.
PATH=$(dirname "$SHIM"):$PATH KATA_CONF_FILE=$CONFIG containerd --config "$CTD/config.toml" \
    >"$WORK/containerd.log" 2>&1 &
containerd_pid=$!
ctr() { command ctr --address "$CTD/containerd.sock" "$@"; }
for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
ctr version >/dev/null || die "containerd did not start"
CID=demo-ctr-$$
say "ctr run --rm --runtime io.containerd.kata.v2 (root filesystem: $GUEST_DIR/rootfs)"
t=$(now)
rc=0
ctr_out=$(ctr run --rm --runtime io.containerd.kata.v2 --rootfs "$GUEST_DIR/rootfs" "$CID" \
    sh -c 'echo hello from containerd; uname -r; exit 7' </dev/null) || rc=$?
ctr_ms=$(ms "$t")
echo "$ctr_out" | sed 's/^/  | /'
echo "$ctr_out" | head -n1 | grep -qx 'hello from containerd' || die "unexpected output from ctr run"
[ $rc -eq 7 ] || die "ctr run exited with $rc, not the container's 7"
echo "  the container runs the guest's kernel ($(echo "$ctr_out" | sed -n 2p); the host's is $(uname -r)); ctr exited with 7"
kill -TERM "$containerd_pid"; wait "$containerd_pid" 2>/dev/null || true; containerd_pid=""
left=()
pgrep -f "containerd-shim-kata-v2 .*-id $CID" >/dev/null && left+=("shim of $CID")
pgrep -f "qemu-system.*-name sandbox-$CID" >/dev/null && left+=("QEMU of $CID")
[ -e "/run/netns/kata-$CID" ] && left+=("namespace kata-$CID")
[ -e "/run/kata/sandboxes/$CID" ] && left+=("run directory of $CID")
grep -qF " $CTD/" /proc/self/mountinfo && left+=("mounts under $CTD")
[ ${#left[@]} -eq 0 ] || die "left behind: ${left[*]}"
echo "  no shim, QEMU, namespace, mount or run directory left"

say "VM templates: one made once, a sandbox restored from it"
TCONFIG=$WORK/configuration-template.toml
TSTORE=$(mktemp -d /dev/shm/kata-demo-templates.XXXXXX)
sed 's/^shared_fs = "virtio-fs"/shared_fs = "none"/' "$CONFIG" >"$TCONFIG"
printf '\n[factory]\nenable_template = true\ntemplate_path = "%s"\n' "$TSTORE" >>"$TCONFIG"
t=$(now)
"$SHIM" sandbox template create --config "$TCONFIG" 2>"$WORK/template.log"
template_ms=$(ms "$t")
TID=demo-tpl-$$
t=$(now)
start_sandbox "$TID" "$TCONFIG" "$WORK/ready-tpl.json" "$WORK/shim-tpl.log"
clone_ms=$(ms "$t")
tns=$(field netns_name "$WORK/ready-tpl.json")
tguest=$(field guest_ip "$WORK/ready-tpl.json")
echo "  restored from the template, ready in $clone_ms ms: $(grep -o '"timings_ms":{[^}]*}' "$WORK/ready-tpl.json")"
ip netns exec "$tns" ping -c 1 -W 2 "$tguest" >/dev/null || die "the sandbox from the template does not answer ping"
guest_says=$("$SHIM" sandbox guest --id "$TID" --run-root "$RUN_ROOT" -- \
    sh -c 'echo "hostname $(hostname), eth0 $(cat /sys/class/net/eth0/address), clock $(date +%s)"')
echo "  the guest answers ping at $tguest and says: $guest_says (host clock $(date +%s))"
echo "$guest_says" | grep -q "hostname $TID," || die "the restored guest has not its own hostname"
stop_sandbox
"$SHIM" sandbox template delete --config "$TCONFIG" --all
rmdir "$TSTORE"
TSTORE=""
[ -e "/run/netns/$tns" ] && die "namespace $tns left"
pgrep -f "qemu-system.*-name sandbox-$TID" >/dev/null && die "QEMU of $TID left"
echo "  sandbox stopped and template deleted: no QEMU, namespace or template left"

echo
say "summary"
printf '  %-34s %6s ms\n' \
    "shim build (cargo, incremental)" "$build_ms" \
    "sandbox run -> ready (boot+agent)" "$ready_ms" \
    "ping guest eth0 (3 pings)" "$ping1_ms" \
    "hotplug NIC + guest address" "$hotplug_ms" \
    "sandbox exec (create..delete)" "$exec_ms" \
    "SIGTERM -> everything removed" "$stop_ms" \
    "ctr run --rm (VM boot..removed)" "$ctr_ms" \
    "sandbox template create" "$template_ms" \
    "sandbox run from the template" "$clone_ms" \
    "demo total" "$(ms "$t0")"
say "OK"
