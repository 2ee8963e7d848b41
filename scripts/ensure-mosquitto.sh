#!/usr/bin/env bash
# Make sure the Mosquitto broker is installed (the tests start their own instances of it).
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
  exit 0
fi
echo "mosquitto not found; installing it with the system package manager"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "strongroom: mosquitto is missing and this user cannot install packages; ask an administrator to run 'apt-get install mosquitto' (or your distribution's equivalent)" >&2
    exit 1
  fi
fi
if command -v apt-get >/dev/null 2>&1; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  $sudo dnf install -y -q mosquitto
elif command -v apk >/dev/null 2>&1; then
  $sudo apk add --quiet mosquitto
elif command -v brew >/dev/null 2>&1; then
  brew install mosquitto
else
  echo "strongroom: no supported package manager found; install the Mosquitto broker (2.0 or newer) by hand" >&2
  exit 1
fi
# The distribution's service is not needed: tests start their own brokers on free ports.
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || {
  echo "strongroom: mosquitto installation did not succeed; install it by hand" >&2
  exit 1
}
