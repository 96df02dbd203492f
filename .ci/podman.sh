#!/usr/bin/env bash
# Podman for the container tests (tests/container), idempotent: Debian's podman,
# runc and mmdebstrap when missing, and the local base image when missing.
#
#   .ci/podman.sh              install what is missing, build the base image if absent
#   CONTAINERS_CONF=.ci/containers.conf podman images    (what the tests use)
#
# No registry is reachable here, so the base image is made from Debian's packages:
# mmdebstrap (minbase + python3, python3-venv, ca-certificates) into a tarball,
# then `podman import` as localhost/debian-python:bookworm (225 MB; 30 s to 2 min,
# as fast as the mirror answers).
# The packages come from this machine's own apt sources (deb822 or one-line
# format), so the image is built from the same mirror the host uses.
# BASE_IMAGE, BASE_SUITE and BASE_SOURCES override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/debian-python:bookworm}
BASE_SUITE=${BASE_SUITE:-bookworm}
if [ -z "${BASE_SOURCES:-}" ]; then
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    if [ -s "$f" ]; then BASE_SOURCES=$f; break; fi
  done
fi
: "${BASE_SOURCES:?no apt sources found: set BASE_SOURCES to a sources.list or deb822 file}"
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/.ci/containers.conf}

missing=()
for tool in podman runc mmdebstrap; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "podman.sh: ${missing[*]} missing: apt-get install podman runc mmdebstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc mmdebstrap >/dev/null
fi

if podman image exists "$BASE_IMAGE"; then
  exit 0
fi
echo "podman.sh: building $BASE_IMAGE from Debian $BASE_SUITE (mmdebstrap)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The sources are named (a file), and stdin closed: mmdebstrap reads sources from
# a non-tty stdin otherwise.
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
  "$BASE_SUITE" "$work/base.tar" "$BASE_SOURCES" </dev/null
podman import --quiet "$work/base.tar" "$BASE_IMAGE" >/dev/null
echo "podman.sh: $BASE_IMAGE ready"
