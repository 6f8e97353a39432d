#!/usr/bin/env bash
# Builds an OpenWrt .ipk: a gzip'd tar of debian-binary, data.tar.gz and control.tar.gz,
# as opkg and OpenWrt's ipkg-build lay it out.
#   build-ipk.sh BINARY ARCH OUTDIR        (ARCH e.g. aarch64_generic, arm_cortex-a7)
set -euo pipefail
binary="${1:?binary}"; arch="${2:?opkg architecture}"; out="${3:?output directory}"
here="$(cd "$(dirname "$0")" && pwd)"; root="$(cd "$here/../.." && pwd)"
version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -n 1)"
# The binary must be for the package's architecture: OpenWrt has no way to run another.
case "$arch" in
    aarch64_*) want=183 ;;      # EM_AARCH64
    arm_*) want=40 ;;           # EM_ARM
    x86_64) want=62 ;;          # EM_X86_64
    *) echo "build-ipk: unknown opkg architecture $arch" >&2; exit 2 ;;
esac
[ "$(head -c 4 "$binary" | od -An -c | tr -d ' ')" = '177ELF' ] || { echo "build-ipk: $binary is not an ELF binary" >&2; exit 1; }
machine="$(od -An -t u2 -j 18 -N 2 "$binary" | tr -d ' ')"
[ "$machine" = "$want" ] || { echo "build-ipk: $binary is for ELF machine $machine, $arch needs $want; build it with cross/build.sh" >&2; exit 1; }
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mkdir -p "$work/data/usr/bin" "$work/data/etc/init.d" "$work/data/etc/securetunnel-agent" "$work/control"
install -m 0755 "$binary" "$work/data/usr/bin/securetunnel-agent"
install -m 0755 "$here/securetunnel-agent.init" "$work/data/etc/init.d/securetunnel-agent"
install -m 0600 "$root/config/agent.toml" "$work/data/etc/securetunnel-agent/agent.toml"
size="$(du -sk "$work/data" | cut -f1)"
cat > "$work/control/control" <<CONTROL
Package: securetunnel-agent
Version: $version
Source: https://github.com/securetunnel-agent/securetunnel-agent
License: MIT
Section: net
Architecture: $arch
Depends: ca-bundle
Installed-Size: $((size * 1024))
Maintainer: securetunnel-agent developers <securetunnel-agent@users.noreply.github.com>
Description: AWS IoT Secure Tunneling agent: follows the thing's tunnel notifications and
 bridges each tunnel to local TCP or Unix sockets; also a drop-in for localproxy.
CONTROL
echo /etc/securetunnel-agent/agent.toml > "$work/control/conffiles"
# The agent's own user and group (as OpenWrt's USERID packages make them: the first free id
# from 200 up, no login). The init script gives it its configuration's group at each start,
# which also covers images built offline (IPKG_INSTROOT), where ownership cannot be set.
cat > "$work/control/postinst" <<'POSTINST'
#!/bin/sh
root="${IPKG_INSTROOT:-}"
name=securetunnel-agent
free_id() { # file: the first id from 200 not in its third field
	id=200
	while cut -d: -f3 "$1" | grep -qx "$id"; do id=$((id + 1)); done
	echo "$id"
}
if ! grep -qs "^$name:" "$root/etc/group"; then
	echo "$name:x:$(free_id "$root/etc/group"):" >> "$root/etc/group"
fi
gid="$(grep -s "^$name:" "$root/etc/group" | cut -d: -f3)"
if ! grep -qs "^$name:" "$root/etc/passwd"; then
	echo "$name:x:$(free_id "$root/etc/passwd"):$gid:$name:/var/run/$name:/bin/false" >> "$root/etc/passwd"
	[ -f "$root/etc/shadow" ] && echo "$name:*:0:0:99999:7:::" >> "$root/etc/shadow"
fi
[ -n "$root" ] || /etc/init.d/securetunnel-agent enable
exit 0
POSTINST
# An upgrade leaves the running agent alone: it re-executes the new binary itself once no
# local connection is open (the upgrade may run through the tunnel it serves).
cat > "$work/control/prerm" <<'PRERM'
#!/bin/sh
[ "$1" = upgrade ] && exit 0
[ -n "$IPKG_INSTROOT" ] || { /etc/init.d/securetunnel-agent stop; /etc/init.d/securetunnel-agent disable; }
exit 0
PRERM
chmod 0755 "$work/control/postinst" "$work/control/prerm"
echo "2.0" > "$work/debian-binary"
tarflags=(--owner=0 --group=0 --numeric-owner --sort=name --mtime=@0 --format=gnu)
tar "${tarflags[@]}" -C "$work/control" -czf "$work/control.tar.gz" .
tar "${tarflags[@]}" -C "$work/data" -czf "$work/data.tar.gz" .
mkdir -p "$out"
ipk="$out/securetunnel-agent_${version}_${arch}.ipk"
tar "${tarflags[@]}" -C "$work" -czf "$ipk" ./debian-binary ./data.tar.gz ./control.tar.gz
echo "$ipk"
