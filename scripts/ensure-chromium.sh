#!/usr/bin/env bash
# Make sure a system Chromium is installed: the dashboard's browser test drives it through
# Playwright (executable_path=/usr/bin/chromium). Playwright's own browser download is not used.
set -euo pipefail
present() { [ -x /usr/bin/chromium ] || command -v chromium >/dev/null 2>&1; }
present && exit 0
"$(dirname "$0")/install-package.sh" chromium "Chromium (the browser test looks for /usr/bin/chromium or chromium on PATH)"
present || { echo "strongroom: chromium installation did not succeed; install it by hand" >&2; exit 1; }
