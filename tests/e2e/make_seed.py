#!/usr/bin/env python3
"""Build the seed images for the end-to-end test, with no network access.

Writes an OCI image layout (https://github.com/opencontainers/image-spec/blob/main/image-layout.md)
holding three references:

  small   a single-platform image (OCI image manifest) for the host's
          architecture: three gzip layers, a valid image config with
          rootfs.diff_ids and config.Cmd.
  multi   a multi-platform image (OCI image index) with linux/amd64 and
          linux/arm64/v8 manifests (plus the host's architecture if it is
          neither). The platforms share one layer and each has one layer of
          its own.
  concurrent  a single-platform image with one 8 MiB layer that no other
          image shares, for concurrent first pulls.

Every byte is deterministic: tar members are sorted, mtime 0, uid/gid 0,
no user/group names; gzip headers carry no name and mtime 0; JSON is written
with sorted keys and no whitespace. Running the script twice gives the same
digests (run.sh checks that).

Usage:  make_seed.py OUTDIR [--json]

Prints, as shell assignments (or one JSON object with --json):
  SEED_ARCH             the host's GOARCH-style architecture
  SMALL_REF, MULTI_REF  the ref names inside the layout
  SMALL_DIGEST          digest of the small image's manifest
  MULTI_DIGEST          digest of the multi-platform index
  MULTI_HOST_DIGEST     digest of the index's manifest for the host platform
  CONCURRENT_REF, CONCURRENT_DIGEST   the same for the concurrent image
  CONCURRENT_LAYER_DIGEST             its 8 MiB layer
  PAYLOAD_DIGEST        the small image's 3 MiB layer (for direct blob GETs)
  BLOB_DIGESTS          every config and layer digest (space separated)
"""

import gzip
import hashlib
import io
import json
import os
import platform
import sys
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_NAME = "org.opencontainers.image.ref.name"

SMALL_REF = "small"
MULTI_REF = "multi"
CONCURRENT_REF = "concurrent"

GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
    "i386": "386",
}


def host_arch():
    machine = platform.machine().lower()
    return GOARCH.get(machine, machine)


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pseudo_random(seed, size):
    """Incompressible but reproducible bytes (SHA-256 in counter mode)."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def make_tar(files):
    """files: {path: bytes}; directories are created for every parent."""
    entries = {}
    for path, data in files.items():
        parts = path.strip("/").split("/")
        for i in range(1, len(parts)):
            entries.setdefault("/".join(parts[:i]) + "/", None)
        entries[path.strip("/")] = data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in sorted(entries):
            data = entries[name]
            info = tarfile.TarInfo(name.rstrip("/"))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            if data is None:
                info.type = tarfile.DIRTYPE
                info.mode = 0o755
                tar.addfile(info)
            else:
                info.type = tarfile.REGTYPE
                info.mode = 0o644
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_bytes(data):
    out = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything variable.
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return out.getvalue()


class Layout:
    def __init__(self, root):
        self.root = root
        self.blob_dir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blob_dir, exist_ok=True)
        self.blobs = []

    def put(self, data, media_type, **extra):
        digest = sha256(data)
        path = os.path.join(self.blob_dir, digest.split(":", 1)[1])
        if not os.path.exists(path):
            with open(path, "wb") as f:
                f.write(data)
        desc = {"mediaType": media_type, "digest": digest, "size": len(data)}
        desc.update(extra)
        return desc

    def layer(self, files):
        raw = make_tar(files)
        blob = gzip_bytes(raw)
        desc = self.put(blob, OCI_LAYER_GZIP)
        self.blobs.append(desc["digest"])
        return desc, sha256(raw)

    def image(self, arch, layers, variant=None, cmd=("/hello",)):
        """layers: list of (descriptor, diff_id). Returns the manifest descriptor."""
        config = {
            "architecture": arch,
            "os": "linux",
            "created": "1970-01-01T00:00:00Z",
            "config": {
                "Cmd": list(cmd),
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "WorkingDir": "/",
                "Labels": {"org.opencontainers.image.title": "regcache e2e seed"},
            },
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in layers]},
            "history": [
                {"created": "1970-01-01T00:00:00Z", "created_by": f"make_seed.py layer {i}"}
                for i in range(len(layers))
            ],
        }
        if variant:
            config["variant"] = variant
        config_desc = self.put(canonical_json(config), OCI_CONFIG)
        self.blobs.append(config_desc["digest"])
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": config_desc,
            "layers": [desc for desc, _ in layers],
        }
        platform_ = {"architecture": arch, "os": "linux"}
        if variant:
            platform_["variant"] = variant
        return self.put(canonical_json(manifest), OCI_MANIFEST), platform_

    def write_index(self, refs):
        """refs: list of (ref name, descriptor)."""
        manifests = []
        for ref, desc in refs:
            d = dict(desc)
            d["annotations"] = {REF_NAME: ref}
            manifests.append(d)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(canonical_json(index))
        with open(os.path.join(self.root, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))


def build(root):
    arch = host_arch()
    lay = Layout(root)

    base = lay.layer({
        "hello.txt": b"hello from the regcache end-to-end test\n",
        "etc/os-release": b'NAME="regcache-e2e"\nID=regcache-e2e\n',
        "etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n",
    })
    # One bigger, incompressible layer so blob bodies span many reads/frames.
    payload = lay.layer({"data/payload.bin": pseudo_random("payload", 3 * 1024 * 1024 + 123)})
    extra = lay.layer({"etc/motd": b"layer three\n", "hello.txt": b"hello, overwritten by layer three\n"})

    small, _ = lay.image(arch, [base, payload, extra])

    platforms = [("amd64", None), ("arm64", "v8")]
    if arch not in ("amd64", "arm64"):
        platforms.append((arch, None))
    children = []
    host_child = None
    for p_arch, variant in platforms:
        own = lay.layer({
            "arch.txt": f"linux/{p_arch}{'/' + variant if variant else ''}\n".encode(),
            "data/small.bin": pseudo_random("arch-" + p_arch, 64 * 1024),
        })
        desc, plat = lay.image(p_arch, [base, own], variant=variant, cmd=("/hello", p_arch))
        child = dict(desc)
        child["platform"] = plat
        children.append(child)
        if p_arch == arch:
            host_child = desc["digest"]
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    multi = lay.put(canonical_json(index), OCI_INDEX)

    # Layers no other image has, for concurrent first pulls (single flight).
    big = lay.layer({"data/big.bin": pseudo_random("concurrent", 8 * 1024 * 1024 + 7)})
    concurrent, _ = lay.image(arch, [big], cmd=("/hello", "concurrent"))

    lay.write_index([(SMALL_REF, small), (MULTI_REF, multi), (CONCURRENT_REF, concurrent)])
    return {
        "SEED_ARCH": arch,
        "SMALL_REF": SMALL_REF,
        "MULTI_REF": MULTI_REF,
        "SMALL_DIGEST": small["digest"],
        "MULTI_DIGEST": multi["digest"],
        "MULTI_HOST_DIGEST": host_child,
        "CONCURRENT_REF": CONCURRENT_REF,
        "CONCURRENT_DIGEST": concurrent["digest"],
        "CONCURRENT_LAYER_DIGEST": big[0]["digest"],
        "PAYLOAD_DIGEST": payload[0]["digest"],
        "BLOB_DIGESTS": " ".join(sorted(set(lay.blobs))),
    }


def main(argv):
    args = [a for a in argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.stderr.write(__doc__)
        return 2
    out = build(args[0])
    if "--json" in argv:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        for key, value in out.items():
            print(f"{key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
