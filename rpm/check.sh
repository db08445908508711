#!/usr/bin/env bash
# Checks the ipevent RPM that rpm/build.sh wrote, and the cloud-init user-data:
#   rpm/check.sh [PACKAGE.rpm]      (default: the one package in target/rpm/)
# One line per check ("ok" or "FAIL <what>: <why>"); exits non-zero when any check fails.
#
# It reads the package's metadata, file list and scriptlets; runs the scriptlets with
# recording stand-ins for systemctl, useradd & co. (so nothing on this host changes);
# installs the package into scratch roots (rpm --root, no scriptlets) and runs the installed
# binaries; verifies the units with systemd-analyze; validates the user-data with cloud-init.
#
# Needs: rpm, systemd (systemd-analyze, systemd-sysusers), cloud-init (which brings python3
# and PyYAML), curl. Debian/Ubuntu: apt-get install rpm systemd cloud-init curl
set -uo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

for tool in rpm systemd-analyze systemd-sysusers cloud-init python3 curl; do
    command -v "$tool" >/dev/null || { echo "FAIL tools: $tool not found (apt-get install rpm systemd cloud-init curl)"; exit 1; }
done

target_dir=${CARGO_TARGET_DIR:-$root/target}
case $target_dir in /*) ;; *) target_dir=$root/$target_dir ;; esac
pkg=${1:-}
if [ -z "$pkg" ]; then
    shopt -s nullglob
    found=("$target_dir"/rpm/ipevent-*.rpm)
    shopt -u nullglob
    [ ${#found[@]} -eq 1 ] || { echo "FAIL package: expected one $target_dir/rpm/ipevent-*.rpm (run rpm/build.sh), found ${#found[@]}"; exit 1; }
    pkg=${found[0]}
fi
[ -f "$pkg" ] || { echo "FAIL package: $pkg does not exist"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

failures=0
checks=0
# check DESCRIPTION FUNCTION [ARGS...]: runs the function; its output explains a failure.
check() {
    local desc=$1 out
    shift
    checks=$((checks + 1))
    if out=$("$@" 2>&1); then
        echo "ok   $desc"
    else
        failures=$((failures + 1))
        echo "FAIL $desc: $(printf '%s' "$out" | tr '\n' ' ' | cut -c1-1500)"
    fi
}

# Fails with a diff when two texts differ.
same() { # EXPECTED ACTUAL
    diff <(printf '%s\n' "$1") <(printf '%s\n' "$2") >&2
}

bins=(ipevent-receiver ipevent-query ipevent-api ipevent-test-client)
units=(ipevent-receiver.service ipevent-api.service)
cargo_version=$(awk '
    /^\[/ { in_ws = ($0 == "[workspace.package]") }
    in_ws && /^version[[:space:]]*=/ { gsub(/^[^"]*"|".*$/, ""); print; exit }
' Cargo.toml)
rpm_version=${cargo_version//-/\~}
q() { rpm -qp --qf "$1" "$pkg" 2>/dev/null; }

# --- metadata -------------------------------------------------------------------------------

check_name() {
    local nvra
    nvra=$(q '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}')
    same "$nvra.rpm" "$(basename "$pkg")" || return 1
    same "ipevent $rpm_version $(uname -m)" "$(q '%{NAME} %{VERSION} %{ARCH}')" || return 1
    # <commit count>.g<short hash>[.dirty]
    grep -Eqx '[0-9]+\.g[0-9a-f]{7,}(\.dirty)?' <<<"$(q '%{RELEASE}')" || { echo "release $(q '%{RELEASE}') is not <count>.g<hash>"; return 1; }
    if git rev-parse --git-dir >/dev/null 2>&1; then
        case $(q '%{RELEASE}') in
            "$(git rev-list --count HEAD).g$(git rev-parse --short=7 HEAD)"*) ;;
            *) echo "release $(q '%{RELEASE}') is not from HEAD"; return 1 ;;
        esac
    fi
}
check "name is ipevent-<Cargo.toml version>-<git count>.g<hash>.<arch>.rpm" check_name

check_requires() {
    local reqs
    reqs=$(q '[%{REQUIREFLAGS:deptype} %{REQUIRENAME}\n]' | grep -Ev '^(auto|rpmlib|config) |interp' | sort)
    same $'post systemd\npostun systemd\npre shadow-utils\npreun systemd' "$reqs"
}
check "requires shadow-utils for %pre and systemd for the unit scriptlets" check_requires

# --- files ----------------------------------------------------------------------------------

check_files() {
    # mode user group path, from `rpm -qlvp` (mode links user group size month day time path).
    local expected actual
    expected="drwxr-x--- root ipevent /etc/ipevent
-rw-r----- root ipevent /etc/ipevent/api.env
-rw-r----- root ipevent /etc/ipevent/receiver.env
-rw------- ipevent ipevent /etc/ipevent/s3.env
-rwxr-xr-x root root /usr/bin/ipevent-api
-rwxr-xr-x root root /usr/bin/ipevent-query
-rwxr-xr-x root root /usr/bin/ipevent-receiver
-rwxr-xr-x root root /usr/bin/ipevent-test-client
-rw-r--r-- root root /usr/lib/sysctl.d/60-ipevent.conf
-rw-r--r-- root root /usr/lib/systemd/system/ipevent-api.service
-rw-r--r-- root root /usr/lib/systemd/system/ipevent-receiver.service
-rw-r--r-- root root /usr/lib/sysusers.d/ipevent.conf
drwxr-xr-x root root /usr/share/doc/ipevent
-rw-r--r-- root root /usr/share/doc/ipevent/INSTALL.md"
    if [ -f README.md ]; then
        expected+=$'\n-rw-r--r-- root root /usr/share/doc/ipevent/README.md'
    fi
    expected+="
drwxr-xr-x root root /usr/share/licenses/ipevent
-rw-r--r-- root root /usr/share/licenses/ipevent/LICENSE
drwxr-x--- ipevent ipevent /var/lib/ipevent"
    actual=$(rpm -qlvp "$pkg" | awk '{ print $1, $3, $4, $NF }' | sort -k4)
    same "$(sort -k4 <<<"$expected")" "$actual"
}
check "rpm -qlvp: every file, its mode and owner" check_files

check_config() {
    same $'/etc/ipevent/api.env\n/etc/ipevent/receiver.env\n/etc/ipevent/s3.env' "$(rpm -qcp "$pkg" | sort)" || return 1
    # fflags: c = %config, n = noreplace.
    same $'cn /etc/ipevent/api.env\ncn /etc/ipevent/receiver.env\ncn /etc/ipevent/s3.env' \
        "$(q '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' | grep '^c' | sort -k2)"
}
check "rpm -qcp: the env files are %config(noreplace), nothing else is config" check_config

check_docs() {
    # (Here-strings, not pipes: grep -q exits early, and pipefail would blame the writer.)
    grep -qx /usr/share/doc/ipevent/INSTALL.md <<<"$(rpm -qdp "$pkg")" || { echo "INSTALL.md is not %doc"; return 1; }
    same "l /usr/share/licenses/ipevent/LICENSE" "$(q '[%{FILEFLAGS:fflags} %{FILENAMES}\n]' | grep '^l')"
}
check "docs and licence are marked %doc and %license" check_docs

# --- scriptlets -----------------------------------------------------------------------------

mkdir -p "$work/shims"
# Each stand-in records its name and arguments, then exits with $SHIM_RC (getent: $GETENT_RC).
for tool in systemctl groupadd useradd getent sysctl systemd-sysctl; do
    cat >"$work/shims/$tool" <<'EOF'
#!/bin/sh
echo "${0##*/} $*" >>"$SHIM_LOG"
[ "${0##*/}" = getent ] && exit "${GETENT_RC:-0}"
exit "${SHIM_RC:-0}"
EOF
    chmod +x "$work/shims/$tool"
done
for tag in PREIN POSTIN PREUN POSTUN; do
    # The one absolute path in them is routed to its stand-in as well.
    q "%{$tag}" | sed 's|/usr/lib/systemd/systemd-sysctl|systemd-sysctl|g' >"$work/$tag.sh"
done

# run_scriptlet TAG ARG [VAR=VALUE...]: runs it as rpm does (sh FILE $1) with only the
# stand-ins on PATH; prints the calls it made. Fails if the scriptlet fails.
run_scriptlet() {
    local tag=$1 arg=$2
    shift 2
    : >"$work/calls"
    env -i PATH="$work/shims" SHIM_LOG="$work/calls" "$@" /bin/sh "$work/$tag.sh" "$arg" >&2 || {
        echo "%$tag with \$1=$arg exited $? ($*)" >&2
        return 1
    }
    cat "$work/calls"
}

expect_calls() { # TAG ARG EXPECTED [VAR=VALUE...]
    local tag=$1 arg=$2 expected=$3 calls
    shift 3
    calls=$(run_scriptlet "$tag" "$arg" "$@") || return 1
    same "$expected" "$calls"
}

check_scripts_text() {
    local scripts
    scripts=$(rpm -qp --scripts "$pkg")
    for want in 'groupadd -r ipevent' 'useradd -r -g ipevent -d /var/lib/ipevent -s /sbin/nologin' \
        'systemctl daemon-reload' 'systemctl --no-reload preset' 'systemctl --no-reload disable --now' \
        'systemctl try-restart' '60-ipevent.conf'; do
        grep -qF -- "$want" <<<"$scripts" || { echo "no '$want' in the scriptlets"; return 1; }
    done
    for tag in PREIN POSTIN PREUN POSTUN; do
        sh -n "$work/$tag.sh" || { echo "%$tag is not valid sh"; return 1; }
        # Every command is guarded so that a scriptlet never fails an install.
        awk -v tag="$tag" '
            { line = line $0 }
            /\\$/ { sub(/\\$/, "", line); next }
            { l = line; line = "" }
            l ~ /^[[:space:]]*(#|$)/ { next }
            l ~ /^[[:space:]]*(if|then|else|fi)([[:space:]]|;|$)/ { next }
            l !~ /\|\| :[[:space:]]*$/ { print "%" tag ": unguarded: " l; bad = 1 }
            END { exit bad }
        ' "$work/$tag.sh" || return 1
    done
}
check "rpm -qp --scripts: user creation, daemon-reload, preset, stop on erase, restart on upgrade, all guarded" check_scripts_text

check_pre() {
    expect_calls PREIN 1 "getent group ipevent
groupadd -r ipevent
getent passwd ipevent
useradd -r -g ipevent -d /var/lib/ipevent -s /sbin/nologin -c ipevent receiver and API ipevent" GETENT_RC=2 || return 1
    # On upgrade, or when the user exists, nothing is created.
    expect_calls PREIN 2 $'getent group ipevent\ngetent passwd ipevent' GETENT_RC=0
}
check "%pre creates the ipevent group and user only when missing" check_pre

check_post() {
    expect_calls POSTIN 1 "systemctl daemon-reload
systemctl --no-reload preset ${units[*]}
systemd-sysctl 60-ipevent.conf" || return 1
    expect_calls POSTIN 2 $'systemctl daemon-reload\nsystemd-sysctl 60-ipevent.conf' || return 1
    # Without systemd-sysctl it falls back to sysctl.
    expect_calls POSTIN 2 "systemctl daemon-reload
systemd-sysctl 60-ipevent.conf
sysctl -q -p /usr/lib/sysctl.d/60-ipevent.conf" SHIM_RC=1
}
check "%post reloads units, presets them on install only, applies the sysctl" check_post

check_preun() {
    expect_calls PREUN 0 "systemctl --no-reload disable --now ${units[*]}" || return 1
    expect_calls PREUN 1 ""
}
check "%preun stops and disables both units on erase, not on upgrade" check_preun

check_postun() {
    expect_calls POSTUN 0 "systemctl daemon-reload" || return 1
    expect_calls POSTUN 1 $'systemctl daemon-reload\nsystemctl try-restart '"${units[*]}"
}
check "%postun reloads units, and restarts running ones on upgrade" check_postun

check_scripts_never_fail() {
    local tag arg
    for tag in PREIN POSTIN PREUN POSTUN; do
        for arg in 0 1 2; do
            run_scriptlet "$tag" "$arg" SHIM_RC=1 GETENT_RC=2 >/dev/null || return 1
        done
    done
}
check "every scriptlet exits 0 when every tool it calls fails" check_scripts_never_fail

# --- installed into a scratch root ----------------------------------------------------------

sroot=$work/root
rpm_root() { rpm --root "$1" --dbpath /var/lib/rpm "${@:2}"; }

check_install() {
    mkdir -p "$sroot"
    rpm_root "$sroot" -i --nodeps --noscripts "$pkg" 2>&1 | grep -v "^rpm: \|^warning: \(user\|group\) ipevent does not exist" >&2
    rpm_root "$sroot" -q ipevent >/dev/null || return 1
    # The sysusers.d file creates the user %pre would, so the owners rpm recorded resolve.
    systemd-sysusers --root="$sroot" >&2 || return 1
    same "ipevent:x:ipevent receiver and API:/var/lib/ipevent:/sbin/nologin" \
        "$(awk -F: '$1 == "ipevent" { print $1 ":" $2 ":" $5 ":" $6 ":" $7 }' "$sroot/etc/passwd")" || return 1
    rpm_root "$sroot" --setugids ipevent >&2 || return 1
    rpm_root "$sroot" -V --nodeps ipevent >&2 || { echo "rpm -V reports differences"; return 1; }
    local uid gid
    uid=$(awk -F: '$1 == "ipevent" { print $3 }' "$sroot/etc/passwd")
    gid=$(awk -F: '$1 == "ipevent" { print $3 }' "$sroot/etc/group")
    same "750 $uid:$gid" "$(stat -c '%a %u:%g' "$sroot/var/lib/ipevent")" || return 1
    same "640 0:$gid" "$(stat -c '%a %u:%g' "$sroot/etc/ipevent/receiver.env")" || return 1
    # The object store's credentials: the service user alone.
    same "600 $uid:$gid" "$(stat -c '%a %u:%g' "$sroot/etc/ipevent/s3.env")"
}
check "rpm --root --noscripts -i installs; sysusers.d user matches %pre; rpm -V clean" check_install

check_versions() {
    local bin out
    for bin in "${bins[@]}"; do
        out=$("$sroot/usr/bin/$bin" --version) || { echo "$bin --version failed"; return 1; }
        [ "$out" = "$bin $cargo_version" ] || { echo "$bin --version printed '$out', expected '$bin $cargo_version'"; return 1; }
        "$sroot/usr/bin/$bin" --help >/dev/null || { echo "$bin --help failed"; return 1; }
    done
}
check "installed binaries answer --version with the package version, and --help" check_versions

# env_vars BIN: the IPEVENT_* variables its --help lists.
# (clap prints "[env: NAME=]", or "[env: NAME]" for a hidden value.)
env_vars() { "$sroot/usr/bin/$1" --help | grep -o '\[env: IPEVENT_[A-Z_]*[]=]' | sed 's/^\[env: //; s/[]=]$//' | sort -u; }
# help_defaults BIN: "NAME DEFAULT" for each IPEVENT_* variable --help gives a default for.
# A default may hold brackets ("[::]:4002"), so the closing one is found by counting.
help_defaults() {
    "$sroot/usr/bin/$1" --help | awk '
        match($0, /\[env: IPEVENT_[A-Z_]*[]=]/) {
            name = substr($0, RSTART + 6, RLENGTH - 7)
            at = index($0, "[default: ")
            if (at == 0) next
            rest = substr($0, at + 10); depth = 1; value = ""
            for (i = 1; i <= length(rest); i++) {
                c = substr(rest, i, 1)
                if (c == "[") depth++
                if (c == "]" && --depth == 0) break
                value = value c
            }
            print name, value
        }'
}
# documented FILE: the IPEVENT_* variables set or shown (commented out) in an env file.
documented() { sed -n 's/^#\{0,1\}\(IPEVENT_[A-Z_]*\)=.*/\1/p' "$1" | sort -u; }

check_env_files() {
    local bin file vars
    for pair in ipevent-receiver:receiver.env ipevent-api:api.env; do
        bin=${pair%%:*}
        file=$sroot/etc/ipevent/${pair#*:}
        vars=$(env_vars "$bin")
        [ -n "$vars" ] || { echo "$bin --help lists no environment variables"; return 1; }
        # The unit passes --data-dir and --refuse-root, so the file explains those instead of
        # offering their variables.
        same "$(grep -vx 'IPEVENT_DATA_DIR\|IPEVENT_REFUSE_ROOT' <<<"$vars")" "$(documented "$file")" || { echo "${pair#*:} does not document exactly what $bin --help lists"; return 1; }
        grep -q -- '--data-dir /var/lib/ipevent' "$file" || { echo "${pair#*:} does not explain the data dir"; return 1; }
        grep -q -- 'IPEVENT_REFUSE_ROOT.*--refuse-root\|--refuse-root.*IPEVENT_REFUSE_ROOT' <(tr '\n' ' ' <"$file") || { echo "${pair#*:} does not explain --refuse-root"; return 1; }
        # A setting left commented out shows the default --help states.
        local name value
        while read -r name value; do
            case $name in IPEVENT_DATA_DIR | IPEVENT_REFUSE_ROOT) continue ;; esac
            grep -qxF "#$name=$value" "$file" || { echo "${pair#*:}: no line '#$name=$value' ($bin --help default)"; return 1; }
        done < <(help_defaults "$bin")
    done
}
check "receiver.env and api.env document every IPEVENT_* setting of the binaries (and its default), and only those" check_env_files

check_units_content() {
    local unit file want
    for unit in "${units[@]}"; do
        file=$sroot/usr/lib/systemd/system/$unit
        for want in User=ipevent Group=ipevent StateDirectory=ipevent Restart=on-failure \
            KillSignal=SIGTERM NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes \
            PrivateTmp=yes ProtectKernelTunables=yes CapabilityBoundingSet= \
            'RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX' LimitNOFILE=65536 \
            "EnvironmentFile=-/etc/ipevent/${unit%.service}.env" EnvironmentFile=-/etc/ipevent/s3.env \
            WantedBy=multi-user.target; do
            want=${want/ipevent-receiver.env/receiver.env}
            want=${want/ipevent-api.env/api.env}
            grep -qxF -- "$want" "$file" || { echo "$unit has no line '$want'"; return 1; }
        done
    done
    grep -qxF 'ExecStart=/usr/bin/ipevent-receiver --data-dir /var/lib/ipevent --refuse-root' \
        "$sroot/usr/lib/systemd/system/ipevent-receiver.service" || { echo "receiver ExecStart"; return 1; }
    grep -qxF 'ExecStart=/usr/bin/ipevent-api --data-dir /var/lib/ipevent --refuse-root' \
        "$sroot/usr/lib/systemd/system/ipevent-api.service" || { echo "api ExecStart"; return 1; }
    # A final flush needs time before systemd sends SIGKILL.
    local stop
    stop=$(sed -n 's/^TimeoutStopSec=\([0-9]*\)s\{0,1\}$/\1/p' "$sroot/usr/lib/systemd/system/ipevent-receiver.service")
    [ "${stop:-0}" -ge 60 ] || { echo "receiver TimeoutStopSec=${stop:-unset}, want >= 60 s"; return 1; }
}
check "units: user, state dir, restart, stop signal and timeout, hardening, env file" check_units_content

# systemd-analyze verify needs the executables to exist: verify copies of the installed units
# whose ExecStart points into the scratch root. It exits 0 on warnings, so any output fails.
mkdir -p "$work/units"
for unit in "${units[@]}"; do
    sed "s|^ExecStart=/usr/bin/|ExecStart=$sroot/usr/bin/|" "$sroot/usr/lib/systemd/system/$unit" >"$work/units/$unit" 2>/dev/null
done
check_verify() {
    local out
    grep -q "^ExecStart=$sroot/usr/bin/" "$work/units/ipevent-receiver.service" || return 1
    out=$(cd "$work/units" && systemd-analyze verify "${units[@]/#/$work/units/}" 2>&1) || { echo "$out"; return 1; }
    [ -z "$out" ] || { echo "$out"; return 1; }
}
check "systemd-analyze verify: both units, no warning" check_verify

check_security() {
    local unit
    for unit in "${units[@]}"; do
        # --threshold is in tenths: 20 = exposure 2.0 of 10 ("OK").
        systemd-analyze security --offline=yes --threshold=20 "$work/units/$unit" >/dev/null 2>&1 ||
            { systemd-analyze security --offline=yes "$work/units/$unit" 2>&1 | tail -1; return 1; }
    done
}
check "systemd-analyze security: exposure at most 2.0 for both units" check_security

check_sysctl() {
    same $'net.core.rmem_max = 33554432\nnet.core.rmem_default = 1048576' \
        "$(grep -v '^\(#\|$\)' "$sroot/usr/lib/sysctl.d/60-ipevent.conf")" || return 1
    # The keys are real ones (where /proc/sys is visible).
    if [ -r /proc/sys/net/core/rmem_max ]; then
        [ -r /proc/sys/net/core/rmem_default ] || return 1
    fi
}
check "60-ipevent.conf raises net.core.rmem_max to 32 MiB and rmem_default to 1 MiB" check_sysctl

check_noreplace() {
    # What cloud-init does: the operator's receiver.env exists before the package.
    local r=$work/root-preconfigured
    mkdir -p "$r/etc/ipevent"
    printf 'IPEVENT_THREADS=2\n' >"$r/etc/ipevent/receiver.env"
    rpm_root "$r" -i --nodeps --noscripts "$pkg" >/dev/null 2>&1
    rpm_root "$r" -q ipevent >/dev/null || { echo "install failed"; return 1; }
    same "IPEVENT_THREADS=2" "$(cat "$r/etc/ipevent/receiver.env")" || { echo "the operator's receiver.env was replaced"; return 1; }
    cmp -s "$r/etc/ipevent/receiver.env.rpmnew" "$sroot/etc/ipevent/receiver.env" || { echo "no receiver.env.rpmnew with the package's file"; return 1; }
}
check "an existing receiver.env survives installation (package copy as .rpmnew)" check_noreplace


# --- cloud-init -----------------------------------------------------------------------------

user_data=$root/cloud-init/user-data.yaml

check_cloud_schema() {
    cloud-init schema --config-file "$user_data"
}
check "cloud-init schema --config-file cloud-init/user-data.yaml" check_cloud_schema

# write_files content by path, from the user-data.
user_data_file() {
    python3 - "$user_data" "$1" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for f in doc.get("write_files", []):
    if f["path"] == sys.argv[2]:
        sys.stdout.write(f["content"])
        sys.exit(0)
sys.exit(f"no write_files entry for {sys.argv[2]}")
EOF
}

check_cloud_content() {
    grep -qx '#cloud-config' <<<"$(head -1 "$user_data")" || { echo "first line is not #cloud-config"; return 1; }
    user_data_file /usr/local/sbin/ipevent-install >"$work/ipevent-install" || return 1
    sh -n "$work/ipevent-install" || return 1
    grep -q '^IPEVENT_RPM_URL="REPLACE_WITH_IPEVENT_RPM_URL"$' "$work/ipevent-install" || { echo "no marked URL placeholder"; return 1; }
    # Left as is, the script refuses to run instead of downloading nonsense.
    if env -i PATH=/usr/bin:/bin sh "$work/ipevent-install" >/dev/null 2>&1; then echo "runs with the placeholder"; return 1; fi
    for want in 'curl -fsSL' 'dnf install -y' 'rpm -Uvh' 'sysctl --system' \
        'systemctl enable --now ipevent-receiver.service ipevent-api.service' '4002/udp' '4003/tcp'; do
        grep -qF -- "$want" "$work/ipevent-install" || { echo "install script lacks '$want'"; return 1; }
    done
    python3 -c 'import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); assert d["runcmd"] == [["/usr/local/sbin/ipevent-install"]], d["runcmd"]' "$user_data" || return 1
    # Its receiver.env sets only settings the receiver has.
    user_data_file /etc/ipevent/receiver.env >"$work/receiver.env" || return 1
    local unknown
    unknown=$(comm -23 <(documented "$work/receiver.env") <(env_vars ipevent-receiver))
    [ -z "$unknown" ] || { echo "user-data receiver.env sets unknown $unknown"; return 1; }
    [ -n "$(documented "$work/receiver.env")" ] || { echo "user-data receiver.env sets nothing"; return 1; }
}
check "user-data: install script (placeholder URL, download, install, sysctl, enable --now), receiver.env keys" check_cloud_content

check_cloud_install_run() {
    # The script as cloud-init runs it, with the placeholder set to a file:// URL of this
    # package; dnf, systemctl & co. are recording stand-ins, curl and sha256sum are real.
    local bin=$work/cloud-shims calls=$work/cloud-calls sum
    mkdir -p "$bin"
    for tool in dnf yum rpm chgrp sysctl systemctl firewall-cmd ipevent-receiver; do
        cat >"$bin/$tool" <<'EOF'
#!/bin/sh
echo "${0##*/} $*" >>"$SHIM_LOG"
[ "${0##*/}" = ipevent-receiver ] && echo "ipevent-receiver 0.0.0"
exit 0
EOF
        chmod +x "$bin/$tool"
    done
    sum=$(sha256sum "$pkg" | cut -d' ' -f1)
    sed -e "s|^IPEVENT_RPM_URL=\"REPLACE_WITH_IPEVENT_RPM_URL\"|IPEVENT_RPM_URL=\"file://$pkg\"|" \
        -e "s|^IPEVENT_RPM_SHA256=\"\"|IPEVENT_RPM_SHA256=\"$sum\"|" \
        "$work/ipevent-install" >"$work/ipevent-install-set"
    : >"$calls"
    env -i PATH="$bin:/usr/bin:/bin" SHIM_LOG="$calls" sh "$work/ipevent-install-set" >&2 || { echo "install script failed"; return 1; }
    # The download's temporary path is masked; api.env exists only on some hosts.
    same "dnf install -y TMP/ipevent.rpm
chgrp ipevent /etc/ipevent/receiver.env
sysctl --system
systemctl is-active --quiet firewalld
firewall-cmd --quiet --permanent --add-port=4002/udp --add-port=4003/tcp
firewall-cmd --quiet --reload
systemctl daemon-reload
systemctl enable --now ipevent-receiver.service ipevent-api.service
systemctl is-active ipevent-receiver.service ipevent-api.service
ipevent-receiver --version" "$(sed 's|/tmp/[^ ]*/ipevent.rpm|TMP/ipevent.rpm|; /^chgrp ipevent \/etc\/ipevent\/api.env$/d' "$calls")" || return 1
    # A package whose checksum differs is never installed.
    sed -i "s|^IPEVENT_RPM_SHA256=\".*\"|IPEVENT_RPM_SHA256=\"$(printf '0%.0s' $(seq 64))\"|" "$work/ipevent-install-set"
    : >"$calls"
    if env -i PATH="$bin:/usr/bin:/bin" SHIM_LOG="$calls" sh "$work/ipevent-install-set" >/dev/null 2>&1; then
        echo "installed a package with the wrong SHA-256"; return 1
    fi
    ! grep -q '^dnf ' "$calls" || { echo "ran dnf after a checksum mismatch"; return 1; }
}
check "user-data install script: downloads, verifies the SHA-256, installs, applies sysctl, opens ports, enables both units" check_cloud_install_run

# --- erase (last: it removes the scratch root's binaries) ------------------------------------

check_erase() {
    # The store and edited configuration outlive the package.
    echo "ipevent-store 1" >"$sroot/var/lib/ipevent/LAYOUT"
    echo "IPEVENT_ADMIN_TOKEN=abc" >>"$sroot/etc/ipevent/api.env"
    rpm_root "$sroot" -e --nodeps --noscripts ipevent >&2 || return 1
    for bin in "${bins[@]}"; do
        [ ! -e "$sroot/usr/bin/$bin" ] || { echo "$bin left behind"; return 1; }
    done
    [ -f "$sroot/var/lib/ipevent/LAYOUT" ] || { echo "erase removed the store"; return 1; }
    grep -q IPEVENT_ADMIN_TOKEN=abc "$sroot/etc/ipevent/api.env.rpmsave" || { echo "edited api.env not kept as api.env.rpmsave"; return 1; }
}
check "rpm -e removes the files, keeps the store and edited config (.rpmsave)" check_erase

echo "$((checks - failures)) passed, $failures failed"
[ "$failures" -eq 0 ]
