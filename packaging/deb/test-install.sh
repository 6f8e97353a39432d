#!/usr/bin/env bash
# Installs the .deb on this machine (as root), checks what it put where, runs the binary,
# verifies the unit, then purges it and checks that nothing is left. CI runs it.
set -euo pipefail
deb="${1:?usage: test-install.sh path/to/securetunnel-agent_*.deb}"
fail() { echo "deb test: $*" >&2; exit 1; }
expect_mode() { # path mode owner:group
    local got
    got="$(stat -c '%a %U:%G' "$1")" || fail "$1 is missing"
    [ "$got" = "$2 $3" ] || fail "$1 is '$got', expected '$2 $3'"
}

# Upgrades leave the running agent alone (it re-executes itself once no local connection is
# open): postinst neither starts nor restarts it, prerm stops it only on removal.
ctl="$(mktemp -d)"; trap 'rm -rf "$ctl"' EXIT
dpkg-deb -e "$deb" "$ctl" || fail "dpkg-deb -e"
! grep -Eq 'deb-systemd-invoke|systemctl .*(start|restart)' "$ctl/postinst" || fail "postinst starts or restarts the agent"
[ "$(grep -c 'deb-systemd-invoke' "$ctl/prerm")" = "$(grep -c 'deb-systemd-invoke stop' "$ctl/prerm")" ] || fail "prerm does more than stop"
grep -B1 'deb-systemd-invoke stop' "$ctl/prerm" | grep -q '"$1" = remove' || fail "prerm stops the agent on upgrade"

dpkg -i "$deb" >/dev/null || fail "dpkg -i"
getent passwd securetunnel-agent >/dev/null || fail "system user not created"
expect_mode /usr/bin/securetunnel-agent 755 root:root
expect_mode /etc/securetunnel-agent 750 root:securetunnel-agent
expect_mode /etc/securetunnel-agent/agent.toml 640 root:securetunnel-agent
expect_mode /usr/lib/systemd/system/securetunnel-agent.service 644 root:root
grep -qx /etc/securetunnel-agent/agent.toml /var/lib/dpkg/info/securetunnel-agent.conffiles || fail "agent.toml is not a conffile"
[ -L /etc/systemd/system/multi-user.target.wants/securetunnel-agent.service ] || fail "unit not enabled"

securetunnel-agent --version | grep -q "^securetunnel-agent " || fail "--version"
# As shipped the thing name is commented out: check-config must say so and fail.
out="$(securetunnel-agent check-config 2>&1)" && fail "check-config accepted the unedited example"
echo "$out" | grep -q "thing_name" || fail "check-config did not name thing_name: $out"
# The .deb is the build with PKCS#11 (cargo-deb's features): a token key is looked for, not refused.
tok="$(mktemp)"
# No cert: it would come from the token (a missing certificate file would stop the check first).
sed -e 's/^# thing_name =/thing_name =/' -e '/^cert = /d' \
    -e 's|^key = .*|key = "pkcs11:token=gw;object=device?module-path=/usr/lib/nowhere/libtoken.so\&pin-source=file:/etc/pin"|' \
    /etc/securetunnel-agent/agent.toml > "$tok"
out="$(securetunnel-agent check-config --config "$tok" 2>&1)" && fail "check-config accepted a missing module"
rm -f "$tok"
echo "$out" | grep -q "/usr/lib/nowhere/libtoken.so does not exist" || fail "the .deb is built without PKCS#11: $out"

command -v systemd-analyze >/dev/null || fail "systemd-analyze is missing: apt-get install systemd"
systemd-analyze verify /usr/lib/systemd/system/securetunnel-agent.service || fail "systemd-analyze verify"
exposure="$(systemd-analyze security --offline=true /usr/lib/systemd/system/securetunnel-agent.service \
    | grep -o 'Overall exposure level.*' | tr -s ' ')"
echo "deb test: $exposure"
# The README's figure.
grep -Eq 'exposure level for .*: (0\.[0-9]|1\.[0-2]) ' <<< "$exposure" || fail "exposure above 1.2: $exposure"

# The operator's key, placed as the README says: it stays after purge, but the user that
# owned it is deleted, so it goes to root, readable by root only.
key=/etc/securetunnel-agent/private.pem.key
install -o securetunnel-agent -m 600 /dev/null "$key" || fail "place a key"
# A compromised agent plants a link to a file it does not own: purge must not follow it.
victim="$(mktemp)"; chown nobody:nogroup "$victim"; chmod 644 "$victim"
ln -s "$victim" /etc/securetunnel-agent/planted || fail "plant a link"
chown -h securetunnel-agent:securetunnel-agent /etc/securetunnel-agent/planted
dpkg --purge securetunnel-agent >/dev/null || fail "dpkg --purge"
expect_mode "$victim" 644 nobody:nogroup
rm -f "$victim"
[ ! -L /etc/securetunnel-agent/planted ] || fail "purge left the agent's link"
expect_mode "$key" 600 root:root
expect_mode /etc/securetunnel-agent 700 root:root
[ "$(ls -A /etc/securetunnel-agent)" = "private.pem.key" ] || fail "purge left more than the key: $(ls -A /etc/securetunnel-agent)"
rm -rf /etc/securetunnel-agent
for p in /usr/bin/securetunnel-agent /var/lib/securetunnel-agent \
         /usr/lib/systemd/system/securetunnel-agent.service \
         /etc/systemd/system/multi-user.target.wants/securetunnel-agent.service; do
    [ ! -e "$p" ] || fail "$p is left after purge"
done
! getent passwd securetunnel-agent >/dev/null || fail "system user left after purge"
! dpkg -s securetunnel-agent >/dev/null 2>&1 || fail "package still known to dpkg"
echo "deb test: install, checks and purge passed"
