#!/bin/sh
# Mosquitto in compose (command of the mosquitto service; POSIX sh, busybox ash in the image).
#
# Starts Mosquitto with the shipped config and sends it SIGHUP whenever the password file or
# the ACL is replaced (`mro-edge devices init|add|remove` and the demo simulator rewrite them
# atomically), so Mosquitto follows device changes within about a second, as the embedded
# broker does. SIGHUP sent to the container (`docker compose kill -s SIGHUP mosquitto`) is
# passed on as soon as Mosquitto can take it; SIGTERM/SIGINT stop Mosquitto cleanly (it saves
# its persistence file).
# Every SAVE_EVERY_S seconds it sends SIGUSR1, which makes Mosquitto write its persistence file:
# mosquitto.conf saves by count (every 250 changes), which alone would leave a trickle of
# records unsaved for hours; this bounds that by time as well.
# The container exits with Mosquitto's status when Mosquitto ends, and is restarted.
#
# Paths: MOSQUITTO_CONF and MRO_AUTH_DIR (the container's by default; the tests set them).
set -u
conf="${MOSQUITTO_CONF:-/mosquitto/config/mosquitto.conf}"
auth="${MRO_AUTH_DIR:-/mosquitto/auth}"
seen="${TMPDIR:-/tmp}/mro-auth-reloaded"
save_every="${SAVE_EVERY_S:-15}"

# Mtimes compare by whole seconds in busybox `test -nt`, so the marker is set one second before
# the moment a change is seen: a file replaced in that same second still counts as newer and is
# picked up by the next turn (at worst one extra, harmless reload).
mark() { touch -d "@$(( $(date +%s) - 1 ))" "$seen"; }

# Until Mosquitto has installed its SIGHUP handler (it does so after loading its config and
# persistence file), SIGHUP would kill it: bit 1 of SigCgt in /proc/PID/status says it has.
hup_ready() {
  [ -r "/proc/$pid/status" ] || return 1
  while read -r key value; do
    if [ "$key" = "SigCgt:" ]; then
      case "$value" in *[13579bBdDfF]) return 0 ;; esac
      return 1
    fi
  done < "/proc/$pid/status"
  return 1
}

mark
mosquitto -c "$conf" &
pid=$!
pending=0
ticks=0
trap 'kill -TERM "$pid" 2>/dev/null' TERM INT
trap 'pending=1' HUP

# kill -0 fails once the shell has reaped Mosquitto (the `wait` below reaps any child).
while kill -0 "$pid" 2>/dev/null; do
  if [ "$auth/passwd" -nt "$seen" ] || [ "$auth/acl" -nt "$seen" ]; then
    mark
    pending=1
  fi
  if [ "$pending" = 1 ] && hup_ready; then
    pending=0
    kill -HUP "$pid" 2>/dev/null
  fi
  ticks=$((ticks + 1))
  if [ "$ticks" -ge "$save_every" ] && hup_ready; then
    ticks=0
    kill -USR1 "$pid" 2>/dev/null
  fi
  sleep 1 &
  wait $! 2>/dev/null
done
wait "$pid"
