#!/usr/bin/env bash
# Make sure a system Chromium is installed: the dashboard's browser test drives it through
# Playwright (executable_path=/usr/bin/chromium). Playwright's own browser download is not used.
set -euo pipefail
if [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; then
  exit 0
fi
echo "chromium not found; installing it with the system package manager"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "strongroom: chromium is missing and this user cannot install packages; ask an administrator to run 'apt-get install chromium' (the browser test is skipped without it)" >&2
    exit 1
  fi
fi
if command -v apt-get >/dev/null 2>&1; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  $sudo dnf install -y -q chromium
elif command -v apk >/dev/null 2>&1; then
  $sudo apk add --quiet chromium
else
  echo "strongroom: no supported package manager found; install Chromium by hand (the browser test looks for /usr/bin/chromium or chromium on PATH)" >&2
  exit 1
fi
[ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1 || {
  echo "strongroom: chromium installation did not succeed; install it by hand" >&2
  exit 1
}
