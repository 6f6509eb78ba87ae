#!/usr/bin/env bash
# Installs what the tests drive besides Python packages, where apt-get exists: liblo's
# oscsend/oscdump (the real OSC peers) and Chromium with its driver (the operator page's
# browser test). Without them those tests are skipped with a message; everything else runs.
set -u
need=""
if ! command -v oscsend >/dev/null 2>&1 || ! command -v oscdump >/dev/null 2>&1; then
  need="$need liblo-tools"
fi
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
  need="$need chromium chromium-driver"
fi
if [ -z "$need" ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: no apt-get here; install$need by hand to run the OSC peer and browser tests" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq || true
for package in $need; do
  $SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null \
    || echo "install-test-tools: could not install $package; the tests that need it will be skipped" >&2
done
exit 0
