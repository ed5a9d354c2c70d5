#!/usr/bin/env python3
"""Build the benchmark images as an OCI image layout, with no network access.

Usage:  make_images.py OUTDIR BIG_MIB CONC_MIB LAYERS LAYER_MIB [FILLS FILL_MIB]

Writes OUTDIR (an OCI image layout) holding three references:

  big     one layer of BIG_MIB MiB (an uncompressed tar of random bytes):
          the blob of the throughput, cold and warm figures
  conc    one layer of CONC_MIB MiB, for the concurrent cold figure
  multi   LAYERS layers of LAYER_MIB MiB each, for the skopeo copy figure
  fills   FILLS layers of FILL_MIB MiB each (default 20 of 1 MiB), for the
          concurrent cold fills of different blobs

Layers are uncompressed tars (application/vnd.oci.image.layer.v1.tar) of
random data, so nothing compresses them on the way and the bytes on the wire
are the blob sizes. Random, not reproducible: every run measures fresh bytes.

Prints shell assignments: BIG_DIGEST, BIG_SIZE, CONC_DIGEST, CONC_SIZE (the
layers), BIG_MANIFEST, MULTI_MANIFEST (manifest digests) and MULTI_BLOBS
(config and layer digests of multi, space separated), MULTI_LAYERS and
MULTI_LAYER_SIZE (multi's layer digests and their common size), FILL_BLOBS and
FILL_SIZE (the layers of fills and their common size).
"""

import hashlib
import json
import os
import platform
import sys
import tarfile

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MIB = 1024 * 1024

GOARCH = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}


def canonical_json(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class RandomReader:
    """A file-like object of n random bytes (read by tarfile)."""

    def __init__(self, n):
        self.left = n

    def read(self, size=-1):
        if size < 0 or size > self.left:
            size = self.left
        size = min(size, 4 * MIB)
        self.left -= size
        return os.urandom(size)


class Layout:
    def __init__(self, root):
        self.root = root
        self.blob_dir = os.path.join(root, "blobs", "sha256")
        os.makedirs(self.blob_dir, exist_ok=True)

    def put(self, data, media_type):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.blob_dir, digest[7:]), "wb") as f:
            f.write(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def random_layer(self, name, mib):
        """An uncompressed tar holding one file of mib MiB of random bytes."""
        tmp = os.path.join(self.blob_dir, ".tmp-" + name)
        with open(tmp, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
                info = tarfile.TarInfo("data/" + name + ".bin")
                info.size = mib * MIB
                info.mode = 0o644
                tar.addfile(info, RandomReader(info.size))
        h = hashlib.sha256()
        with open(tmp, "rb") as f:
            for chunk in iter(lambda: f.read(4 * MIB), b""):
                h.update(chunk)
        digest = "sha256:" + h.hexdigest()
        size = os.path.getsize(tmp)
        os.rename(tmp, os.path.join(self.blob_dir, digest[7:]))
        return {"mediaType": OCI_LAYER, "digest": digest, "size": size}

    def image(self, title, layers):
        arch = GOARCH.get(platform.machine().lower(), platform.machine().lower())
        config = {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/true"], "Labels": {"org.opencontainers.image.title": title}},
            "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
        }
        cfg = self.put(canonical_json(config), OCI_CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": cfg, "layers": layers}
        return self.put(canonical_json(manifest), OCI_MANIFEST), cfg

    def write_index(self, refs):
        manifests = []
        for ref, desc in refs:
            d = dict(desc)
            d["annotations"] = {"org.opencontainers.image.ref.name": ref}
            manifests.append(d)
        with open(os.path.join(self.root, "index.json"), "wb") as f:
            f.write(canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}))
        with open(os.path.join(self.root, "oci-layout"), "wb") as f:
            f.write(canonical_json({"imageLayoutVersion": "1.0.0"}))


def main(argv):
    if len(argv) not in (6, 8):
        sys.stderr.write(__doc__)
        return 2
    out = argv[1]
    big_mib, conc_mib, layers, layer_mib = (int(a) for a in argv[2:6])
    fills, fill_mib = (int(a) for a in argv[6:8]) if len(argv) == 8 else (20, 1)
    lay = Layout(out)
    big = lay.random_layer("big", big_mib)
    big_manifest, _ = lay.image("regcache bench big", [big])
    conc = lay.random_layer("conc", conc_mib)
    conc_manifest, _ = lay.image("regcache bench conc", [conc])
    multi_layers = [lay.random_layer(f"layer{i}", layer_mib) for i in range(layers)]
    multi_manifest, multi_cfg = lay.image("regcache bench multi", multi_layers)
    fill_layers = [lay.random_layer(f"fill{i}", fill_mib) for i in range(fills)]
    fill_manifest, _ = lay.image("regcache bench fills", fill_layers)
    lay.write_index([("big", big_manifest), ("conc", conc_manifest), ("multi", multi_manifest),
                     ("fills", fill_manifest)])
    # The clients check every body against one size.
    for group in (multi_layers, fill_layers):
        if len({l["size"] for l in group}) != 1:
            sys.stderr.write("make_images.py: layers of one image differ in size\n")
            return 1
    values = {
        "BIG_DIGEST": big["digest"],
        "BIG_SIZE": big["size"],
        "CONC_DIGEST": conc["digest"],
        "CONC_SIZE": conc["size"],
        "BIG_MANIFEST": big_manifest["digest"],
        "MULTI_MANIFEST": multi_manifest["digest"],
        "MULTI_BLOBS": " ".join([multi_cfg["digest"]] + [l["digest"] for l in multi_layers]),
        "MULTI_LAYERS": " ".join(l["digest"] for l in multi_layers),
        "MULTI_LAYER_SIZE": multi_layers[0]["size"] if multi_layers else 0,
        "FILL_BLOBS": " ".join(l["digest"] for l in fill_layers),
        "FILL_SIZE": fill_layers[0]["size"] if fill_layers else 0,
    }
    for key, value in values.items():
        print(f"{key}='{value}'")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
