#!/usr/bin/env bash
# Build the images with the versions pinned in images/versions.env.
#   images/build.sh operator ghcr.io/internvl-operator/operator:0.1.0
#   images/build.sh worker   ghcr.io/internvl-operator/worker:0.1.0
# The build context is the repository root; .dockerignore lets in only pyproject.toml, README.md,
# operator/ and worker/.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:?usage: images/build.sh operator|worker TAG}
tag=${2:?usage: images/build.sh operator|worker TAG}
args=()
while IFS='=' read -r key value; do
  [[ -z "$key" || "$key" == \#* ]] && continue
  args+=(--build-arg "$key=$value")
done < images/versions.env
exec docker build "${args[@]}" -f "images/$what/Dockerfile" -t "$tag" .
