#!/usr/bin/env bash
# Provisioning walk-through: create a fleet, enroll devices, build a signed enclave image, seal a
# code and a model artifact, inspect them, and show what a bad input looks like. Everything goes
# into a temporary directory, which is printed at the end.
set -euo pipefail
venv=${1:-.venv}
sr="$venv/bin/strongroom"
work=$(mktemp -d -t strongroom-walkthrough.XXXXXX)
step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "${*:2}"; "${@:2}"; }

step "Create a fleet home (CA, signing keys, keystore, policy, registry)" \
  "$sr" fleet init "$work/home"
step "Enroll a device (bundle with TLS identity and simulated platform)" \
  "$sr" device enroll cam-001 --home "$work/home" --out "$work/cam-001" --firmware 1.2.0
step "Enroll a device whose platform runs in debug mode" \
  "$sr" device enroll cam-002 --home "$work/home" --out "$work/cam-002" --debug-platform

mkdir -p "$work/enclave-src" "$work/vendor"
printf 'def main():\n    return "enclave up"\n' > "$work/enclave-src/__main__.py"
printf 'def predict(x):\n    return sum(x) / len(x)  # proprietary\n' > "$work/vendor/scorer.py"
head -c 3000000 /dev/urandom > "$work/model.bin"

step "Build a signed, reproducible enclave image (registers its measurement in the policy)" \
  "$sr" enclave build "$work/enclave-src" --home "$work/home" --svn 1 --out "$work/enclave.img"
step "Seal proprietary code" \
  "$sr" artifact seal "$work/vendor/scorer.py" --home "$work/home" --name scorer --version 1 --kind code --out "$work/scorer.sra"
step "Seal a model" \
  "$sr" artifact seal "$work/model.bin" --home "$work/home" --name model --version 1 --kind model --out "$work/model.sra"
step "Inspect the model artifact (signed manifest, never key material)" \
  "$sr" artifact inspect "$work/model.sra" --home "$work/home"

printf '\n\033[1m== A bad input gives one clear line and a non-zero exit\033[0m\n'
head -c 100 "$work/model.sra" > "$work/broken.sra"
echo "\$ $sr artifact inspect $work/broken.sra"
"$sr" artifact inspect "$work/broken.sra" || echo "(exit status $?)"

printf '\nEverything is in %s\n' "$work"
printf 'Fleet policy: %s/home/policy.toml\n' "$work"
