#!/usr/bin/env bash
# Headless Chromium for tests/test_report.py, which opens the run report in a real browser
# (every image must load). Debian's `chromium` package; quiet, and a no-op when present.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
chromium --version
