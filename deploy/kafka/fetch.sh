#!/usr/bin/env bash
# Fetch the Apache Kafka broker's jars (the version pinned in deploy/kafka/pom.xml) from Maven
# Central once, into .cache/kafka-<version>/libs; later runs reuse them and print the same path.
# Prints the libs directory on stdout. A failure is one line on stderr naming what failed
# (the full Maven log stays in .cache/kafka-<version>.fetch.log) and exit 1.
# Runs as `java -cp '<libs>/*' kafka.Kafka server.properties` (tests/integration/kafka.py).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
pom="$here/pom.xml"

version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$pom")"
if [[ -z "$version" ]]; then
    echo "deploy/kafka/fetch.sh: no <kafka.version> in $pom" >&2
    exit 1
fi
cache="$root/.cache"
libs="$cache/kafka-$version/libs"
if [[ -f "$libs/.complete" ]]; then
    echo "$libs"
    exit 0
fi

for tool in java mvn flock; do
    if ! command -v "$tool" >/dev/null; then
        echo "deploy/kafka/fetch.sh: cannot fetch Apache Kafka $version: '$tool' is not installed (apt-get install default-jre-headless maven)" >&2
        exit 1
    fi
done

mkdir -p "$cache"
exec 9>"$cache/kafka-$version.lock"
flock 9  # several pytest-xdist workers may ask at once: one fetches, the others wait
if [[ -f "$libs/.complete" ]]; then
    echo "$libs"
    exit 0
fi

log="$cache/kafka-$version.fetch.log"
part="$cache/kafka-$version/libs.part"
rm -rf "$part"
if ! mvn -B -f "$pom" -Dlibs.dir="$part" dependency:copy-dependencies >"$log" 2>&1; then
    why="$(grep -m1 '^\[ERROR\]' "$log" | sed 's/^\[ERROR\] *//' || true)"
    echo "deploy/kafka/fetch.sh: cannot fetch the Apache Kafka $version broker jars from Maven Central: ${why:-mvn failed} (log: $log)" >&2
    rm -rf "$part"
    exit 1
fi
if ! compgen -G "$part/kafka_2.13-$version.jar" >/dev/null; then
    echo "deploy/kafka/fetch.sh: Maven ran but $part has no kafka_2.13-$version.jar (log: $log)" >&2
    exit 1
fi
rm -rf "$libs"
mv "$part" "$libs"
touch "$libs/.complete"
echo "$libs"
