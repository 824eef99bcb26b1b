#!/usr/bin/env bash
# Install everything, build the demo index, promote it to production and serve it on port 3000.
# Needs only this repository (the demo catalogue is generated). Ctrl+C stops the server.
set -euo pipefail
cd "$(dirname "$0")"
export BENTOML_DO_NOT_TRACK=True
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m index_builder demo demo
tag=$(python3 -m index_builder build demo/catalogue.csv --eval demo/queries.csv | tail -n 1)
# --force: the demo replaces whatever your store's production stage served before, even another embedder.
python3 -m model_store promote "$tag" --stage production --note "quickstart demo" --force
exec bentoml serve service:ImageSearch --port "${PORT:-3000}"
