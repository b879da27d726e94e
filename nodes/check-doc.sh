#!/usr/bin/env bash
# Checks that docs/install-cri-o.md shows nodes/conf/crio.conf.d/10-kube-migrate.conf and
# deploy/node/criu.conf verbatim (the files the real-node harness installs), so the documented
# node setup is the tested one.
# Usage: nodes/check-doc.sh     (exit 0 = same, 1 = they differ; no root needed)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for f in nodes/conf/crio.conf.d/10-kube-migrate.conf deploy/node/criu.conf; do
  shown=$(awk -v f="$f" '$0 == "<!-- BEGIN " f " -->" {on = 1; next} $0 == "<!-- END " f " -->" {on = 0}
    on && !/^```/' docs/install-cri-o.md)
  if ! diff <(printf '%s\n' "$shown") "$f"; then
    echo "docs/install-cri-o.md and $f differ (lines above: < doc, > file)" >&2; exit 1
  fi
  echo "docs/install-cri-o.md shows $f verbatim"
done
