#!/usr/bin/env bash
# Start a throwaway PostgreSQL server for tests, installing Debian's postgresql first if it is missing.
#
#   scripts/start_postgres.sh [DIR]        # prints the URI: postgresql+psycopg2://postgres@127.0.0.1:PORT/ablab
#   scripts/start_postgres.sh --stop DIR   # stops it (the data stays in DIR until you delete it)
#
# Idempotent: a DIR whose server runs prints its URI again; a stopped one is started again. DIR defaults to a new
# /tmp/ablab-pg.XXXXXX; run as root, it must be reachable by user postgres (so not under a 0700 pytest tmp dir).
# The cluster (initdb + pg_ctl, run as postgres when root) listens on 127.0.0.1 at a free port and on a unix
# socket in DIR, trust authentication, one database `ablab`. The URI names psycopg2 (psycopg2-binary is in the
# test extras; SQLAlchemy 2.1 would otherwise pick psycopg 3).
# Exit codes: 0 running, 3 postgresql missing and not installable, 1 anything else.
set -euo pipefail

log() { echo "start_postgres: $*" >&2; }

pg_bin() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  [[ -n "$bin" && -x "$bin/initdb" ]] && echo "$bin"
}

as_postgres() {  # initdb and postgres refuse to run as root
  if [[ $(id -u) -eq 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

if [[ "${1:-}" == "--stop" ]]; then
  dir=${2:?usage: start_postgres.sh --stop DIR}
  bin=$(pg_bin) || { log "postgresql is not installed"; exit 1; }
  as_postgres "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >&2 || true
  exit 0
fi

bin=$(pg_bin || true)
if [[ -z "$bin" ]]; then
  log "postgresql not found; installing it with apt-get"
  if [[ $(id -u) -ne 0 ]] || ! { DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2 \
      || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >&2; }; }; then
    log "cannot install postgresql (needs root and the Debian archive)"
    exit 3
  fi
  bin=$(pg_bin) || { log "postgresql installed but initdb not found under /usr/lib/postgresql"; exit 3; }
fi

dir=${1:-$(mktemp -d /tmp/ablab-pg.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ $(id -u) -eq 0 ]]; then chown postgres "$dir"; fi

if [[ ! -f "$dir/data/PG_VERSION" ]]; then
  as_postgres "$bin/initdb" -D "$dir/data" -U postgres --auth=trust --encoding=UTF8 --no-instructions >&2
fi
if ! as_postgres "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  port=$(free_port)
  echo "$port" > "$dir/port"
  as_postgres "$bin/pg_ctl" -D "$dir/data" -l "$dir/postgres.log" -w -t 60 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off" start >&2
fi
port=$(cat "$dir/port")
if ! as_postgres "$bin/psql" -h "$dir" -p "$port" -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname='ablab'" \
    postgres | grep -q 1; then
  as_postgres "$bin/createdb" -h "$dir" -p "$port" -U postgres ablab
fi
echo "postgresql+psycopg2://postgres@127.0.0.1:$port/ablab"
