#!/usr/bin/env bash
# The whole test suite on a fresh machine: system packages, Python test
# dependencies, then lint, types and tests. Run from anywhere; CI calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use: real Bazel 4 (offline), bubblewrap, and the
# toolchain the shim's real-project builds need (autoreconf for libyaml, CMake
# with Ninja; prlimit and unshare come with util-linux; Redis and HAProxy for
# the frontends that share their state).
packages=(bazel-bootstrap bazel-platforms bazel-rules-java bubblewrap
          gcc g++ make autoconf automake libtool cmake ninja-build util-linux
          redis-server redis-tools haproxy)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]'

ruff check .
ruff format --check .
mypy
python3 -m pytest "$@"
