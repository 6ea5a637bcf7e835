#!/usr/bin/env bash
# The browser the web UI's tests drive (tests/support/browser.py): Debian's chromium and chromium-driver,
# installed with apt-get when missing (CI runs as root). Quiet and idempotent: nothing happens when
# /usr/bin/chromium is there. Playwright drives this Chromium through executable_path; its own browser
# download (`playwright install`) is never used.
set -euo pipefail
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "The web UI's browser tests need Debian's chromium: run 'sudo apt-get install -y chromium chromium-driver'." >&2
  exit 0  # the tests that need it then say so themselves
fi
echo "Installing Debian's chromium and chromium-driver (the web UI's browser tests)"
export DEBIAN_FRONTEND=noninteractive
# apt's own notes (debconf's "delaying package configuration, since apt-utils is not installed") tell the
# user nothing: its output is kept in a log and shown only when the install fails
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  echo "Installing chromium failed (above); install it by hand: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
