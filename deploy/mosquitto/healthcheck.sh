#!/bin/sh
# Health check of the mosquitto service: the health user (it may read and write nothing) logs in
# and a SUBSCRIBE is answered
# within 4 s (mosquitto_sub -E). The third failure in a row kills the broker, so the container
# exits and `restart: unless-stopped` starts it again (docker itself never restarts an
# unhealthy container). Cost: one small C process per check.
#
# Paths and port: MRO_HEALTH_SECRET, MOSQUITTO_PORT (the container's by default; the tests set them).
secret="${MRO_HEALTH_SECRET:-/mosquitto/health/password}"
failures="${TMPDIR:-/tmp}/mro-health-failures"

if mosquitto_sub -h 127.0.0.1 -p "${MOSQUITTO_PORT:-1883}" -u mro-health -P "$(cat "$secret")" \
     -t mro/healthcheck -E -W 4 >/dev/null; then
  rm -f "$failures"
  exit 0
fi
echo failed >> "$failures"
if [ "$(wc -l < "$failures")" -ge 3 ]; then
  rm -f "$failures"
  echo "mosquitto did not answer 3 checks in a row: killing it, the container restarts"
  # kill -1 reaches every process of the container but PID 1 and this shell. Only where PID 1
  # is a container init (compose's init: true), never on a host where this file is run by hand.
  read -r init < /proc/1/comm
  case "$init" in docker-init|tini|catatonit) kill -KILL -1 ;; esac
fi
exit 1
