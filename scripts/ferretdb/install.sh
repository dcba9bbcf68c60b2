#!/usr/bin/env bash
# FerretDB v1 (SQLite backend), the MongoDB-protocol server of the persistence tests,
# built from the Go module proxy and cached: prints the binary's path.
#
#   scripts/ferretdb/install.sh        # ~/.cache/shardgate/ferretdb-1.24.2/ferretdb
#
# The module's zip lacks build/version/version.txt, without which the binary refuses to
# start ("Invalid build/version/version.txt"): the source is copied out of the module
# cache, the version written in, and built there (about 4.5 minutes once). One install at
# a time (flock) when several test processes ask at once.
set -euo pipefail
VERSION=1.24.2
cache="${SHARDGATE_CACHE:-$HOME/.cache/shardgate}"
dest="$cache/ferretdb-$VERSION"
bin="$dest/ferretdb"
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
mkdir -p "$cache"
exec 9>"$dest.lock"
flock 9
if [ -x "$bin" ]; then echo "$bin"; exit 0; fi
export PATH="$PATH:/usr/local/go/bin"
command -v go >/dev/null || { echo "FerretDB needs the Go toolchain (go 1.22 or newer) to build" >&2; exit 1; }
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
src=$(go mod download -json "github.com/FerretDB/FerretDB@v$VERSION" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')
cp -r "$src" "$work/src"
chmod -R u+w "$work/src"
echo "v$VERSION" > "$work/src/build/version/version.txt"
mkdir -p "$dest"
(cd "$work/src" && go build -trimpath -o "$bin.tmp" ./cmd/ferretdb) >&2
mv "$bin.tmp" "$bin"
echo "$bin"
