#!/usr/bin/env bash
# Install (Debian's redis-server) and run a throwaway Redis on loopback for the gateway tests.
#
#   scripts/redis.sh install              install redis-server if it is missing
#   scripts/redis.sh start PORT [DIR]     start one on 127.0.0.1:PORT (no persistence), wait for PONG
#   scripts/redis.sh stop PORT [DIR]      stop the one started with the same PORT and DIR
#
# DIR (default: a folder under ${TMPDIR:-/tmp}) holds its pid file and log.
set -euo pipefail

install_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "redis-server is missing; install it (Debian: apt-get install redis-server)" >&2
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq redis-server >/dev/null
  # The package may start a system-wide instance on 6379; the tests never use it.
}

rundir() {
  echo "${2:-${TMPDIR:-/tmp}/secure-handler-redis-$1}"
}

start_redis() {
  local port="$1" dir
  dir="$(rundir "$@")"
  mkdir -p "$dir"
  install_redis
  redis-server --bind 127.0.0.1 --port "$port" --protected-mode yes \
    --save '' --appendonly no --dir "$dir" \
    --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
  for _ in $(seq 1 100); do
    if redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null | grep -q PONG; then
      echo "redis on 127.0.0.1:$port (pid $(cat "$dir/redis.pid"))"
      return 0
    fi
    sleep 0.1
  done
  echo "redis did not answer on 127.0.0.1:$port; see $dir/redis.log" >&2
  return 1
}

stop_redis() {
  local port="$1" dir pid
  dir="$(rundir "$@")"
  if [ -f "$dir/redis.pid" ]; then
    pid="$(cat "$dir/redis.pid")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    rm -f "$dir/redis.pid"
  fi
}

case "${1:-}" in
  install) install_redis ;;
  start) shift; start_redis "${1:?PORT}" "${2:-}" ;;
  stop) shift; stop_redis "${1:?PORT}" "${2:-}" ;;
  *) echo "usage: $0 install | start PORT [DIR] | stop PORT [DIR]" >&2; exit 2 ;;
esac
