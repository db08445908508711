#!/usr/bin/env bash
# Builds the ipevent RPM from the workspace's release binaries:
#   target/rpm/ipevent-<version>-<release>.<arch>.rpm
# <version> is the workspace version in Cargo.toml ("-" becomes "~", rpm's pre-release mark);
# <release> is <commit count>.g<short hash> of HEAD, with ".dirty" when tracked files differ
# from it. The last line printed is the package's path.
#
# Needs cargo, git and rpmbuild (Debian and Ubuntu: apt-get install rpm; Fedora: rpm-build).
# Environment: CARGO (default cargo), CARGO_TARGET_DIR (default target),
# IPEVENT_RPM_NO_CARGO=1 packages the release binaries already built, without running cargo.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

die() { echo "rpm/build.sh: $*" >&2; exit 1; }

command -v rpmbuild >/dev/null || die "rpmbuild not found (Debian/Ubuntu: apt-get install rpm; Fedora: dnf install rpm-build)"

# The version of [workspace.package] in Cargo.toml.
version=$(awk '
    /^\[/ { in_ws = ($0 == "[workspace.package]") }
    in_ws && /^version[[:space:]]*=/ { gsub(/^[^"]*"|".*$/, ""); print; exit }
' Cargo.toml)
[ -n "$version" ] || die "no version in [workspace.package] of Cargo.toml"
version=${version//-/\~}

git rev-parse --git-dir >/dev/null 2>&1 || die "$root is not a git work tree: the release number comes from git"
release="$(git rev-list --count HEAD).g$(git rev-parse --short=7 HEAD)"
if ! git diff --quiet HEAD -- 2>/dev/null; then
    release="$release.dirty"
fi

target_dir=${CARGO_TARGET_DIR:-$root/target}
case $target_dir in /*) ;; *) target_dir=$root/$target_dir ;; esac
bins=(ipevent-receiver ipevent-query ipevent-api ipevent-test-client)

if [ "${IPEVENT_RPM_NO_CARGO:-}" != 1 ]; then
    echo "rpm/build.sh: cargo build --release --workspace" >&2
    "${CARGO:-cargo}" build --release --workspace
fi
for bin in "${bins[@]}"; do
    [ -x "$target_dir/release/$bin" ] || die "$target_dir/release/$bin is missing: run cargo build --release --workspace"
done

out=$target_dir/rpm
topdir=$out/rpmbuild
rm -rf "$topdir"
rm -f "$out"/ipevent-*.rpm
mkdir -p "$topdir/SOURCES" "$topdir/docs"

for bin in "${bins[@]}"; do
    cp -p "$target_dir/release/$bin" "$topdir/SOURCES/"
done
cp -p rpm/ipevent-receiver.service rpm/ipevent-api.service rpm/receiver.env rpm/api.env rpm/s3.env \
    rpm/60-ipevent.conf rpm/ipevent.sysusers "$topdir/SOURCES/"

cp -p rpm/README.md "$topdir/docs/INSTALL.md"
if [ -f README.md ]; then
    cp -p README.md "$topdir/docs/README.md"
fi
if [ -f LICENSE ]; then
    cp -p LICENSE "$topdir/docs/LICENSE"
elif [ -f /usr/share/common-licenses/Apache-2.0 ]; then
    # The workspace is Apache-2.0 (Cargo.toml); ship the licence text itself.
    cp /usr/share/common-licenses/Apache-2.0 "$topdir/docs/LICENSE"
else
    die "no LICENSE in $root and no /usr/share/common-licenses/Apache-2.0 to ship instead"
fi

echo "rpm/build.sh: rpmbuild ipevent $version-$release" >&2
rpmbuild -bb --quiet \
    --define "_topdir $topdir" \
    --define "_rpmdir $out" \
    --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
    --define "ipevent_version $version" \
    --define "ipevent_release $release" \
    --define "ipevent_docs $topdir/docs" \
    rpm/ipevent.spec >&2

arch=$(rpm --eval '%{_arch}')
rpm_path=$out/ipevent-$version-$release.$arch.rpm
[ -f "$rpm_path" ] || die "rpmbuild did not write $rpm_path"
echo "$rpm_path"
