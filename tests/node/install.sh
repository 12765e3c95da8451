#!/usr/bin/env bash
# Install the Node.js peer the tests run, @livekit/agents, from npm's registry into a cache kept
# between runs and keyed by version: ~/.cache/voicefleet-peers/livekit-agents-node-<version>/.
# Prints that folder (its node_modules holds the package). Nothing lands in the repository.
#   tests/node/install.sh [version]      (default: the version the tests pin)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${1:-$(cat "$here/VERSION")}"
dest="${VOICEFLEET_PEERS:-$HOME/.cache/voicefleet-peers}/livekit-agents-node-$version"

if [ -f "$dest/.installed" ]; then
  echo "$dest"
  exit 0
fi
command -v npm >/dev/null || { echo "npm not found: install Node.js 20+ and npm" >&2; exit 3; }

# Built beside the cache entry, then renamed into place: a run stopped halfway leaves no entry
# that looks complete.
mkdir -p "$(dirname "$dest")"
work="$(mktemp -d "$dest.partial.XXXXXX")"
trap 'rm -rf "$work"' EXIT
printf '{"name": "voicefleet-node-peer", "private": true, "type": "module"}\n' >"$work/package.json"
# Its peer dependencies (@livekit/rtc-node, zod) come along: npm 7+ installs peers.
(cd "$work" && npm install --no-audit --no-fund --loglevel=error "@livekit/agents@$version" >&2)
touch "$work/.installed"
if [ -e "$dest" ] && [ ! -f "$dest/.installed" ]; then rm -rf "$dest"; fi  # stale, incomplete
# rename(2) is atomic and refuses a folder that exists: when another run got there first, its
# copy (perhaps in use) stays and ours goes with the trap.
mv -T "$work" "$dest" 2>/dev/null || true
echo "$dest"
