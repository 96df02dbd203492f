#!/usr/bin/env bash
# Debian's Chromium and its driver for the browser tests (tests/e2e; Playwright
# downloads no browser here), installed only when missing.
set -euo pipefail
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  echo "browser.sh: installing Debian's chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
fi
