#!/usr/bin/env bash
# Installs what the tests drive besides Python packages, where apt-get exists: liblo's
# oscsend/oscdump (the real OSC peers) and Chromium with its driver (the operator page's
# browser test), and, where npm exists, ESLint for the web pages' JavaScript into .tools/node_modules
# (gitignored; eslint.config.js requires it from there). Without them those tests are skipped with
# a message; everything else runs.
set -u
ESLINT_VERSION="10.15.0"
ESLINT_PACKAGES="eslint@$ESLINT_VERSION @eslint/js@10.0.1 globals@17.14.0"
cd "$(dirname "$0")/.."
if [ "$(.tools/node_modules/.bin/eslint --version 2>/dev/null)" = "v$ESLINT_VERSION" ]; then
  :
elif command -v npm >/dev/null 2>&1; then
  # shellcheck disable=SC2086  # the package list is meant to split
  npm install --prefix .tools --no-save --no-audit --no-fund --loglevel=error $ESLINT_PACKAGES >/dev/null \
    || echo "install-test-tools: npm could not install ESLint; the JavaScript lint test will be skipped" >&2
else
  echo "install-test-tools: no npm here; the JavaScript lint test is skipped (install Node.js and npm to run it)" >&2
fi
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
