#!/usr/bin/env python3
"""Rewrites an nFPM-built .ipk the way OpenWrt's scripts/ipkg-build lays one out.

    ipkg-conform.py NFPM_IPK OUT_IPK

nFPM builds the package (files, modes, control fields, conffiles, maintainer scripts); this
changes only what it does unlike ipkg-build:
  - Installed-Size in bytes (ipkg-build: the size of the uncompressed data.tar; opkg divides
    it by 1024 for its free-space check), not nFPM's Debian-style KiB, which would make opkg
    think the package is 1024 times smaller than it is;
  - numeric owners only in data.tar.gz (ipkg-build's tar --numeric-owner; nFPM also writes
    the owner names "root"); the ids stay 0/0 and are checked to be;
  - the outer tar's members as ./debian-binary ./data.tar.gz ./control.tar.gz, in that order.
Contents, modes and mtimes pass through unchanged.
"""
import gzip
import io
import re
import sys
import tarfile

MEMBERS = ("debian-binary", "data.tar.gz", "control.tar.gz")


def fail(msg):
    sys.exit(f"ipkg-conform: {msg}")


def gz(data):
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as f:
        f.write(data)
    return out.getvalue()


def rewrite(tar_gz, edit=lambda info, data: data):
    """The uncompressed tar of tar_gz's members, owners numeric, each file's bytes through
    edit(info, data)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(tar_gz), mode="r:gz") as src, tarfile.open(
        fileobj=out, mode="w", format=tarfile.GNU_FORMAT
    ) as dst:
        for info in src:
            if info.uid != 0 or info.gid != 0:
                fail(f"{info.name} is owned by {info.uid}:{info.gid}, not root")
            info.uname = info.gname = ""
            data = None
            if info.isfile():
                data = edit(info, src.extractfile(info).read())
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def main(src_path, out_path):
    parts = {}
    with tarfile.open(src_path, mode="r:gz") as outer:
        for info in outer:
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name not in MEMBERS or not info.isfile():
                fail(f"{src_path}: unexpected member {info.name}")
            parts[name] = outer.extractfile(info).read()
    missing = [m for m in MEMBERS if m not in parts]
    if missing:
        fail(f"{src_path}: no {', '.join(missing)}")
    if parts["debian-binary"] != b"2.0\n":
        fail(f"{src_path}: debian-binary is {parts['debian-binary']!r}")

    data_tar = rewrite(parts["data.tar.gz"])
    parts["data.tar.gz"] = gz(data_tar)

    def control(info, data):
        if info.name not in ("./control", "control"):
            return data
        text, n = re.subn(
            r"^Installed-Size: .*$",
            f"Installed-Size: {len(data_tar)}",
            data.decode(),
            flags=re.M,
        )
        if n != 1:
            fail(f"control has {n} Installed-Size fields")
        return text.encode()

    parts["control.tar.gz"] = gz(rewrite(parts["control.tar.gz"], control))

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as dst:
        for name in MEMBERS:
            info = tarfile.TarInfo("./" + name)
            info.size, info.mode, info.mtime = len(parts[name]), 0o644, 0
            dst.addfile(info, io.BytesIO(parts[name]))
    with open(out_path, "wb") as f:
        f.write(gz(out.getvalue()))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: ipkg-conform.py NFPM_IPK OUT_IPK")
    main(sys.argv[1], sys.argv[2])
