# shellcheck shell=bash
# Shared by scripts/cluster.sh and scripts/node.sh: logging, usage, the processes they start
# and the ports they pick. Source it after setting
#   LOG_TAG   prefix of every log line ("cluster", "node")
#   SELF      the sourcing script (its header comment is its usage)
#   PIDS LOGS where <component>.pid and <component>.log go
#   PROC_MARK a path every command line of ours names (so a recycled pid is never ours)

# Progress goes to stderr so that stdout carries only what a command prints for callers.
log() { printf '[%s] %s\n' "$LOG_TAG" "$*" >&2; }
die() { printf '[%s] error: %s\n' "$LOG_TAG" "$*" >&2; exit 1; }

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$SELF"
  exit 2
}

# --- processes -------------------------------------------------------------------------------

# A pid file is only trusted while that pid still runs a command naming PROC_MARK, so a recycled
# pid never gets a signal from us.
owned_pid() {
  local file="$PIDS/$1.pid" pid cmdline
  [[ -f "$file" ]] || return 1
  pid=$(<"$file")
  [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/cmdline" ]] || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline")
  [[ "$cmdline" == *"$PROC_MARK"* ]] || return 1
  printf '%s\n' "$pid"
}

start_component() {
  local name=$1
  shift
  # setsid: the process outlives the script and ignores the terminal's Ctrl-C; 9>&- keeps the
  # port lock from leaking into it.
  setsid "$@" </dev/null >"$LOGS/$name.log" 2>&1 9>&- &
  printf '%s\n' "$!" >"$PIDS/$name.pid"
}

# SIGTERM, then SIGKILL after 10 s.
stop_pid() {
  local name=$1 pid=$2 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    log "$name (pid $pid) ignored SIGTERM for 10 s, killing"
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  log "stopped $name (pid $pid)"
}

stop_component() {
  local pid
  # Never ourselves (the cluster's watchdog is this script, recorded under its own name).
  if pid=$(owned_pid "$1") && [[ "$pid" != "$$" ]]; then stop_pid "$1" "$pid"; fi
  rm -f "$PIDS/$1.pid"
}

# Start-up liveness of a component this script just forked. owned_pid is wrong here: until the
# child has exec'd its binary (slow on a loaded machine) its cmdline is still this script's,
# so it would read as dead. The pid is our own unreaped child, so it cannot have been recycled;
# an exited one is a zombie until reaped, which counts as dead.
started_alive() {
  local file="$PIDS/$1.pid" pid state
  [[ -f "$file" ]] || return 1
  pid=$(<"$file")
  kill -0 "$pid" 2>/dev/null || return 1
  state=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f1)
  [[ -n "$state" && "$state" != Z ]]
}

# --- ports -----------------------------------------------------------------------------------

port_in_use() {
  # Local address (ADDR:PORT in hex) is the second column of /proc/net/{tcp,udp}{,6}; any state
  # counts as taken (UDP too: CoreDNS). One awk, no pipe: `| grep -q` under pipefail fails when
  # grep exits early.
  awk -v port="$(printf ':%04X' "$1")" 'substr($2, length($2) - 4) == port { found = 1 } END { exit !found }' \
    /proc/net/tcp /proc/net/tcp6 /proc/net/udp /proc/net/udp6 2>/dev/null
}

declare -a CHOSEN_PORTS=()
pick_port() {
  local port tries=0
  while ((tries++ < 200)); do
    # Below the kernel's ephemeral range (32768+), so outgoing connections never hold them.
    port=$((20000 + RANDOM % 12000))
    [[ " ${CHOSEN_PORTS[*]} " == *" $port "* ]] && continue
    port_in_use "$port" && continue
    CHOSEN_PORTS+=("$port")
    printf '%s\n' "$port"
    return 0
  done
  die "no free port found in 20000-31999"
}
