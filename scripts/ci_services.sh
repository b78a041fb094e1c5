#!/usr/bin/env bash
# Install, where missing, the system packages the slow tests use: PostgreSQL (tests/test_server.py starts its own
# throwaway cluster with scripts/start_postgres.sh) and headless Chromium with its driver (tests/test_ui.py).
#
#   bash scripts/ci_services.sh          # .ci/run calls it after `pip install -e ".[test]"`
#
# Idempotent: with everything present it only checks. It never fails the build: without root or the Debian
# archive it says what is missing, and the tests that need it skip with that reason.
set -uo pipefail

need=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [[ ${#need[@]} -eq 0 ]]; then
  echo "ci_services: postgresql, chromium and chromedriver present"
  exit 0
fi

sudo=""
if [[ $(id -u) -ne 0 ]]; then
  if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
    echo "ci_services: missing ${need[*]} and not root (no sudo): the tests that need them will skip" >&2
    exit 0
  fi
fi
install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"; }
echo "ci_services: installing ${need[*]}"
if ! install && ! { $sudo apt-get update -q && install; }; then
  echo "ci_services: could not install ${need[*]}: the tests that need them will skip" >&2
fi
exit 0
