#!/usr/bin/env bash
# Installs the Apache Kafka broker the tests run (KRaft, from Maven Central jars) into
# ~/.cache/shardgate/kafka-<version>/lib, once: the directory is reused when present.
# Prints the installation directory (lib/ and log4j2.properties).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=$(sed -n 's|.*<kafka.version>\(.*\)</kafka.version>.*|\1|p' "$here/pom.xml")
dest="${SHARDGATE_CACHE:-$HOME/.cache/shardgate}/kafka-$version"
mkdir -p "$(dirname "$dest")"
# Several test processes may ask at once: one installs, the others wait for it.
exec 9>"$dest.lock"
flock 9
if [ ! -f "$dest/ok" ]; then
  rm -rf "$dest"
  mkdir -p "$dest/lib"
  mvn -q -B -f "$here/pom.xml" dependency:copy-dependencies -DoutputDirectory="$dest/lib" >&2
  cp "$here/log4j2.properties" "$dest/"
  touch "$dest/ok"
fi
echo "$dest"
