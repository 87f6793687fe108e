#!/usr/bin/env bash
# Set up a fresh machine for dsgd.
#
#   bash scripts/setup.sh          the main job: dsgd with its harness (pip, into the current Python)
#   bash scripts/setup.sh --test   that, plus the test tools and, for the asv dashboard test only,
#                                  Debian's Chromium and the JS packages that replace the page's CDN
#                                  scripts (apt-get, as root; skipped with a note otherwise: that one
#                                  test then skips)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) TEST=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option $arg (use --test for the test set-up)" >&2; exit 2 ;;
  esac
done
if [ "$TEST" = 1 ]; then EXTRAS=test; else EXTRAS=harness; fi
"$PY" -m pip install --quiet --disable-pip-version-check -e ".[$EXTRAS]"
if [ "$TEST" = 1 ]; then
  if ! command -v chromium >/dev/null 2>&1 || ! dpkg -s libjs-jquery >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         chromium libjs-jquery libghc-js-flot-data libjs-bootstrap libjs-jquery-stupidtable node-blueimp-md5 >/dev/null) \
        || echo "setup: chromium not installed; the dashboard test will skip" >&2
    else
      echo "setup: chromium needs apt-get as root; the dashboard test will skip" >&2
    fi
  fi
fi
echo "setup: ok ($EXTRAS; $("$PY" -c 'import tensorflow as tf, tf_keras; print("tensorflow", tf.__version__, "tf_keras", tf_keras.__version__)' 2>/dev/null))"
