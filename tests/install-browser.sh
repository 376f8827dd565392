#!/usr/bin/env bash
# Installs the pinned Debian packages in tests/browser-packages.txt (Chromium and ChromeDriver
# for the installers' page test), unless exactly those versions are installed already. Needs
# root (or sudo) for apt-get; nothing is downloaded from anywhere but Debian's registry.
set -euo pipefail
cd "$(dirname "$0")"
mapfile -t packages < <(grep -v '^#' browser-packages.txt | grep -v '^$')
missing=()
for spec in "${packages[@]}"; do
  name=${spec%%=*} version=${spec#*=}
  installed=$(dpkg-query -W -f='${Version}' "$name" 2>/dev/null || true)
  [ "$installed" = "$version" ] || missing+=("$spec")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
sudo=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "install-browser: need root or sudo for apt-get" >&2; exit 1; }
  sudo=(sudo)
fi
echo "==> installing ${missing[*]} (Debian packages, pinned)"
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"; then
  # A fresh machine's package lists may not know the pinned version yet.
  "${sudo[@]}" apt-get update
  "${sudo[@]}" apt-get install -y --no-install-recommends "${missing[@]}"
fi
