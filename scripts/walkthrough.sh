#!/usr/bin/env bash
# Walk-through: create a fleet, enroll devices, build a signed enclave image, seal code and a
# model, run a prediction inside the enclave, restart offline, and show refusals. Everything goes
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

step "Write the standard enclave source (runtime + its own policy, trusting this fleet's artifact signer)" \
  "$sr" enclave source "$work/enclave-src" --home "$work/home"
step "Build a signed, reproducible debug enclave image (registers its measurement in the policy)" \
  "$sr" enclave build "$work/enclave-src" --home "$work/home" --svn 1 --debug --out "$work/enclave.img"
step "Make the example ONNX model (no download)" \
  "$venv/bin/python" examples/build_model.py "$work/model.onnx"
step "Seal the example protected package (code)" \
  "$sr" artifact seal examples/protected_scorer --home "$work/home" --name scorer --version 1 --kind code --out "$work/scorer.sra"
step "Seal the model" \
  "$sr" artifact seal "$work/model.onnx" --home "$work/home" --name demo-model --version 1 --kind model --out "$work/model.sra"
step "Inspect the model artifact (signed manifest, never key material)" \
  "$sr" artifact inspect "$work/model.sra" --home "$work/home"
features='{"features": [0.5, 1, -2, 3, 0, 0.1, 4, -1, 2, 2, 0, 1, -0.5, 3, 1, 0]}'
step "Run a prediction inside the enclave (development keys from the fleet home; debug image only)" \
  "$sr" enclave run scorer:predict "$features" --bundle "$work/cam-001" --image "$work/enclave.img" \
    --state "$work/cam-001-state" --artifact "$work/model.sra" --artifact "$work/scorer.sra" --dev --dev-keys-from "$work/home"
step "Run again offline: the enclave unseals the keys it sealed to itself" \
  "$sr" enclave run scorer:predict "$features" --bundle "$work/cam-001" --image "$work/enclave.img" \
    --state "$work/cam-001-state" --artifact "$work/model.sra" --artifact "$work/scorer.sra" --dev
step "Build the production image (no --debug)" \
  "$sr" enclave build "$work/enclave-src" --home "$work/home" --svn 1 --out "$work/enclave-prod.img"
printf '\n\033[1m== On the debug-mode platform, the production enclave fails local attestation\033[0m\n'
"$sr" enclave run scorer:predict "$features" --bundle "$work/cam-002" --image "$work/enclave-prod.img" \
  --state "$work/cam-002-state" --artifact "$work/model.sra" --no-privilege-separation || echo "(exit status $?)"

printf '\n\033[1m== A bad input gives one clear line and a non-zero exit\033[0m\n'
head -c 100 "$work/model.sra" > "$work/broken.sra"
echo "\$ $sr artifact inspect $work/broken.sra"
"$sr" artifact inspect "$work/broken.sra" || echo "(exit status $?)"

printf '\nEverything is in %s\n' "$work"
printf 'Fleet policy: %s/home/policy.toml\n' "$work"
