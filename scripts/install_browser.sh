#!/usr/bin/env bash
# Install Debian's Chromium and its WebDriver (for the web viewer's browser test) when they are missing.
# Needs root (CI runs as root) and the Debian package archive; does nothing when /usr/bin/chromium exists.
# The browser test drives this system Chromium through Playwright's Python package; no browser is
# downloaded by Playwright itself.
set -euo pipefail
if [ -x /usr/bin/chromium ] && command -v chromedriver >/dev/null 2>&1; then
  echo "chromium already installed: $(/usr/bin/chromium --version 2>/dev/null || echo unknown version)"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_browser.sh: root is needed to install chromium with apt-get" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-dejavu-core
/usr/bin/chromium --version
