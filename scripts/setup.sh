#!/usr/bin/env bash
# Set up a fresh machine for dsgd: the package with its harness and test extras, and
# Debian's Chromium for the asv dashboard test (skipped cleanly if it cannot be installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[test]"
if { ! command -v chromium >/dev/null 2>&1 || ! dpkg -s libjs-jquery >/dev/null 2>&1; } && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  # chromium for the asv dashboard test; the JS packages replace the CDN scripts asv's page loads
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
     chromium libjs-jquery libghc-js-flot-data libjs-bootstrap libjs-jquery-stupidtable node-blueimp-md5 >/dev/null) \
    || echo "setup: chromium not installed; the dashboard test will skip" >&2
fi
echo "setup: ok ($("$PY" -c 'import tensorflow as tf, tf_keras; print("tensorflow", tf.__version__, "tf_keras", tf_keras.__version__)' 2>/dev/null))"
