# Sourced by the other scripts: create .venv and install the project into it when needed.
# Reinstalls only when pyproject.toml changed (a stamp file holds its hash).

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

ensure_venv() {  # ensure_venv [EXTRA]
  local extra=${1:-}
  local python=${PYTHON:-python3}
  if [ ! -x .venv/bin/python ]; then
    echo "scripts: creating .venv with $($python --version 2>&1)" >&2
    "$python" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
  fi
  local hash
  hash=$(sha256sum pyproject.toml | cut -c1-16)
  local stamp=".venv/.installed-${extra:-base}-$hash"
  # The base install is part of every extra's: a dev install serves ./scripts/serve too.
  if [ -z "$extra" ] && compgen -G ".venv/.installed-*-$hash" >/dev/null; then return; fi
  if [ ! -f "$stamp" ]; then
    echo "scripts: installing valrun${extra:+[$extra]} into .venv" >&2
    .venv/bin/python -m pip install --quiet -e ".${extra:+[$extra]}"
    touch "$stamp"
  fi
}

ensure_chromium() {  # the browser tests drive Debian's Chromium (no browser download works here)
  if [ -x /usr/bin/chromium ]; then return; fi
  echo "scripts: installing Debian's chromium for the browser tests" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
}

ensure_wrk() {  # scripts/bench drives the servers with Debian's wrk (one C client for all runs)
  if command -v wrk >/dev/null; then return; fi
  echo "scripts: installing Debian's wrk for the benchmark" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq wrk >/dev/null
}

ensure_proxies() {  # tests/test_readme.py runs the README's nginx and Caddy configs for real
  if command -v nginx >/dev/null && command -v caddy >/dev/null; then return; fi
  echo "scripts: installing Debian's nginx and caddy for the README's proxy examples" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq nginx caddy >/dev/null
}

ensure_tzdata() {  # the zoneinfo facade serves the system's tz database (Debian's tzdata)
  if [ -f /usr/share/zoneinfo/UTC ]; then return; fi
  echo "scripts: installing Debian's tzdata for the zoneinfo facade" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq tzdata >/dev/null
}

ensure_postgres() {  # the store's tests run against a throwaway PostgreSQL (tests/pg_kit.py)
  if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then return; fi
  echo "scripts: installing Debian's postgresql for the store's tests" >&2
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
}
