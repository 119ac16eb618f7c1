#!/usr/bin/env bash
# What the console's browser tests use: Debian's Chromium and its WebDriver
# (chromedriver), installed with apt when missing.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    echo "==> chromium and chromedriver already installed"
else
    echo "==> installing chromium and chromium-driver with apt"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver
fi
chromium --version
chromedriver --version
