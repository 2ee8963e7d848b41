#!/usr/bin/env bash
# install-package.sh PACKAGE WHAT: install a distribution package with whatever package manager
# this machine has (as root, or with passwordless sudo); one clear line and exit 1 otherwise.
# Used by ensure-mosquitto.sh and ensure-chromium.sh, which check first whether it is needed.
set -euo pipefail
package="$1"
what="$2"
echo "$package not found; installing it with the system package manager"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "strongroom: $package is missing and this user cannot install packages; ask an administrator to run 'apt-get install $package' (or your distribution's equivalent)" >&2
    exit 1
  fi
fi
if command -v apt-get >/dev/null 2>&1; then
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$package" >/dev/null
elif command -v dnf >/dev/null 2>&1; then
  $sudo dnf install -y -q "$package"
elif command -v apk >/dev/null 2>&1; then
  $sudo apk add --quiet "$package"
elif command -v brew >/dev/null 2>&1; then
  brew install "$package"
else
  echo "strongroom: no supported package manager found; install $what by hand" >&2
  exit 1
fi
