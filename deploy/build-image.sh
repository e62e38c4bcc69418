#!/usr/bin/env bash
# Builds the postern-edge container image from deploy/Dockerfile with the
# first container builder that works on this machine: docker (a running
# daemon), podman, then buildah. Without one it says what each lacked and
# exits 3.
#
#   deploy/build-image.sh [TAG]     default TAG: postern-edge:<workspace version>
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
tag="${1:-postern-edge:$version}"
build_args=(-f deploy/Dockerfile -t "$tag" .)

tried=()
# The last line `<tool> info` printed, to say why the tool cannot build.
why() { { "$@" 2>&1 || true; } | grep -v '^[[:space:]]*$' | tail -n 1; }

for tool in docker podman buildah; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    tried+=("$tool: not installed")
  elif "$tool" info >/dev/null 2>&1; then
    echo "building $tag with $tool"
    exec "$tool" build "${build_args[@]}"
  else
    tried+=("$tool: $(why "$tool" info)")
  fi
done

echo "no container builder works on this machine:" >&2
printf '  %s\n' "${tried[@]}" >&2
exit 3
