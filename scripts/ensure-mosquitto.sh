#!/usr/bin/env bash
# Make sure the Mosquitto broker is installed (the tests start their own instances of it; the
# distribution's service is not needed).
set -euo pipefail
present() { command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; }
present && exit 0
"$(dirname "$0")/install-package.sh" mosquitto "the Mosquitto broker (2.0 or newer)"
present || { echo "strongroom: mosquitto installation did not succeed; install it by hand" >&2; exit 1; }
