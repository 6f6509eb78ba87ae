#!/usr/bin/env bash
# Installs the real OSC peers the tests drive (liblo's oscsend/oscdump) where apt-get exists.
# Without them the OSC peer tests are skipped with a message; everything else still runs.
set -u
if command -v oscsend >/dev/null 2>&1 && command -v oscdump >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install-test-tools: no apt-get here; install liblo (oscsend/oscdump) by hand to run the OSC peer tests" >&2
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq liblo-tools >/dev/null \
  || echo "install-test-tools: could not install liblo-tools; the OSC peer tests will be skipped" >&2
exit 0
