#!/usr/bin/env bash
# The README's main command on a fresh install: a throw-away venv with `pip install -e .` only (no test extra,
# which would hide a missing runtime dependency), the default run shortened, both figures required.
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python -m venv "$work/venv"
"$work/venv/bin/pip" install -q --disable-pip-version-check -e .
start=$SECONDS
# The default config shortened (10 updates, its warmup; a small evaluation every 5; the train step is the default's);
# tests/test_console.py runs the same.
mapfile -t short < tests/short_default_args.txt
"$work/venv/bin/python" -m jaxpref.train --workdir="$work/run" "${short[@]}"
for f in before_after.png reward_curve.png metrics.jsonl export/model_index.json export/unet/config.json; do
  [[ -s "$work/run/$f" ]] || { echo "fresh install: the default run left no $f" >&2; exit 1; }
done
echo "fresh install: the default command (shortened) exited 0 with both figures in $((SECONDS - start))s"
