#!/usr/bin/env bash
# Install everything (if needed) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The playground's browser tests drive Debian's Chromium; without it they are skipped, saying why.
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test: installing Chromium and Noto fonts (Debian packages) for the playground's browser tests"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-noto-core fonts-noto-cjk >/dev/null; } \
      || echo "test: could not install Chromium; the browser tests will be skipped"
  else
    echo "test: no Chromium here, so the browser tests will be skipped (sudo apt-get install chromium runs them)"
  fi
fi
exec .venv/bin/python -m pytest "$@"
