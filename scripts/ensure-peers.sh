#!/usr/bin/env bash
# Installs the real peers the test suite drives (Debian packages), or stops with a
# clear message naming what is missing. Tests never skip because a peer is absent.
set -euo pipefail
declare -A need=(
  [qemu-img]=qemu-utils [qemu-io]=qemu-utils [qemu-nbd]=qemu-utils
  [nbdinfo]=libnbd-bin [nbdcopy]=libnbd-bin [nbdfuse]=libnbd-bin [nbdsh]=python3-libnbd
  [nbdkit]=nbdkit [fio]=fio [fusermount3]=fuse3 [openssl]=openssl
  [cc]=gcc
)
missing=()
for tool in "${!need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${need[$tool]}")
done
if ! /usr/bin/python3 -c 'import nbd' >/dev/null 2>&1; then missing+=(python3-libnbd); fi
if ! /usr/bin/python3 -c 'import lz4.block' >/dev/null 2>&1; then missing+=(python3-lz4); fi
if [ ${#missing[@]} -eq 0 ]; then exit 0; fi
mapfile -t packages < <(printf '%s\n' "${missing[@]}" | sort -u)
echo "ensure-peers: installing ${packages[*]}" >&2
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure-peers: the tests need these Debian packages and cannot install them here (not root or no apt-get): ${packages[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
