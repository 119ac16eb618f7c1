#!/usr/bin/env bash
# What the user-interface tests use, installed with apt when missing:
# Debian's Chromium and its WebDriver (chromedriver) for the console's
# browser test, and tmux for the `mlctl top` terminal test
# (tests/tests/e2e/gateway.rs).
set -euo pipefail
missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
command -v tmux >/dev/null 2>&1 || missing+=(tmux)
if [ "${#missing[@]}" -eq 0 ]; then
    echo "==> chromium, chromedriver and tmux already installed"
else
    echo "==> installing ${missing[*]} with apt"
    if [ "$(id -u)" -eq 0 ]; then SUDO=(); else SUDO=(sudo); fi
    "${SUDO[@]}" apt-get update
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
fi
chromium --version
chromedriver --version
tmux -V
