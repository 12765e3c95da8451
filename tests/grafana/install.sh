#!/usr/bin/env bash
# Install Grafana's published dashboard schema (npm's @grafana/schema: the TypeScript types
# Grafana generates from its dashboard and panel schemas) and the TypeScript compiler that checks
# deploy/grafana/voicefleet.json against them, into a cache kept between runs and keyed by
# version: ~/.cache/voicefleet-peers/grafana-schema-<version>/. Prints that folder.
#   tests/grafana/install.sh [version]      (default: the version the tests pin)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-$(cat "$here/VERSION")}"
typescript=5.9.3
dest="${VOICEFLEET_PEERS:-$HOME/.cache/voicefleet-peers}/grafana-schema-$version"

if [ -f "$dest/.installed" ]; then
  echo "$dest"
  exit 0
fi
command -v npm >/dev/null || { echo "npm not found: install Node.js 20+ and npm" >&2; exit 3; }

# Built beside the cache entry, then renamed into place (as tests/node/install.sh does).
mkdir -p "$(dirname "$dest")"
work="$(mktemp -d "$dest.partial.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf '{"name": "voicefleet-grafana-schema", "private": true}\n' >"$work/package.json"
(cd "$work" && npm install --no-audit --no-fund --loglevel=error \
  "@grafana/schema@$version" "typescript@$typescript" >&2)
touch "$work/.installed"
if [ -e "$dest" ] && [ ! -f "$dest/.installed" ]; then rm -rf "$dest"; fi
mv -T "$work" "$dest" 2>/dev/null || true
echo "$dest"
