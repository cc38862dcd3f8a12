#!/usr/bin/env bash
# Debian's Chromium for the browser test (tests/serve/test_serve_browser.py); part of the README's set-up.
# Does nothing when a chromium is already installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-chromium: no apt-get here; install Chromium yourself and set FEWSHOT_CHROMIUM=/path/to/chromium" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-chromium: run as root, or install it with: apt-get install -y chromium" >&2
    exit 1
  fi
fi
echo "installing Debian's chromium for the browser test (about 30 s) ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
command -v chromium
