#!/usr/bin/env bash
# Install Debian's Chromium for the browser test of the live page (tests/test_live_page.py), when it is
# missing and this is a Debian/Ubuntu machine where we are root. Idempotent; quick when installed.
# Without it the browser test skips with a message saying so. SKIP_BROWSER=1 skips this step.
set -euo pipefail

if [ "${SKIP_BROWSER:-0}" = 1 ] || command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "install-browser: chromium is missing and cannot be installed here (needs root and apt); the live page's browser test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -qq chromium >/dev/null 2>&1; then
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
fi
