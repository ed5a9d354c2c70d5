#!/usr/bin/env python3
"""The markdown table of bench/run.sh.

Usage:  report.py RESULTS.tsv MISSING.txt HEADER [key=value]...

RESULTS.tsv holds one measurement a line, "KEY<TAB>VALUE", a line per round.
Times and throughputs are reduced to their median over the rounds; counts of
upstream requests to their largest value (the worst round). The key=value
arguments describe the run (sizes, client counts).
"""

import statistics
import sys

PEERS = ["regcache", "squid", "mirror", "nginx", "direct"]
COUNTS = ("coldgets.", "concgets.", "tagcold.get.", "tagcold.head.", "tagstale.get.", "tagstale.head.",
          "wan1gets.", "wancgets.", "fpheads.", "fpgets.", "fillgets.", "fillbad.", "h2none.",
          "shloopgets.", "shwangets.", "shwarmgets.")


def load(path):
    values = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.rstrip("\n").partition("\t")
            try:
                values.setdefault(key, []).append(float(value))
            except ValueError:
                pass
    out = {}
    for key, vals in values.items():
        out[key] = max(vals) if key.startswith(COUNTS) else statistics.median(vals)
    return out


def main(argv):
    results, missing_path, header = argv[1:4]
    opts = dict(a.split("=", 1) for a in argv[4:])
    v = load(results)
    with open(missing_path) as f:
        missing = [l.strip() for l in f if l.strip()]

    def g(key):
        return v.get(key)

    def ratio(a, b):
        a, b = g(a), g(b)
        if a is None or b is None or b == 0:
            return None
        return a / b

    def mib(x):
        return "—" if x is None else f"{x:,.0f}"

    def secs(x):
        if x is None:
            return "—"
        return f"{x:.3f} s" if x < 10 else f"{x:.1f} s"

    def ms(x):
        return "—" if x is None else f"{x * 1000:.2f} ms"

    def count(x):
        return "—" if x is None else f"{x:.0f}"

    def mebi(x):
        return "—" if x is None else f"{x:.1f}"

    def rx(x):
        return "?" if x is None else f"{x:.2f}×"

    def check(ok):
        return "?" if ok is None else ("✓" if ok else "✗")

    def cmp(x, pred):
        return None if x is None else pred(x)

    rows = []

    def row(figure, fmt, key, ratios="", target="", na=()):
        cells = []
        for p in PEERS:
            if p in na:
                cells.append("n/a")
            else:
                cells.append(fmt(g(f"{key}.{p}")))
        rows.append([figure] + cells + [ratios, target])

    big, conc = opts["big_mib"], opts["conc_mib"]
    n_conc, warm_conc, tags = opts["conc"], opts["warm_conc"], opts["tag_reqs"]

    # 1. warm throughput
    r_ng, r_sq, r_mi = ratio("warm.regcache", "warm.nginx"), ratio("warm.regcache", "warm.squid"), ratio("warm.regcache", "warm.mirror")
    r_tcp = ratio("warm.regcache", "tcp")
    row(
        f"1. warm {big} MiB blob over TLS, 1 connection, MiB/s",
        mib,
        "warm",
        f"regcache/nginx {rx(r_ng)}, /squid {rx(r_sq)}, /mirror {rx(r_mi)}, /tcp {rx(r_tcp)}, "
        f"/tls-ceiling {rx(ratio('warm.regcache', 'tlsceil'))}",
        f"≥ nginx {check(cmp(r_ng, lambda x: x >= 1))}, ≥ 3× squid {check(cmp(r_sq, lambda x: x >= 3))}, "
        f"≥ mirror {check(cmp(r_mi, lambda x: x >= 1))}, aim ≥ 80% tcp {check(cmp(r_tcp, lambda x: x >= 0.8))}",
    )
    # regcache --verify-reads always: every warm read hashed again.
    r_asq, r_ami = ratio("warm.regcache_always", "warm.squid"), ratio("warm.regcache_always", "warm.mirror")
    r_ang = ratio("warm.regcache_always", "warm.nginx")
    rows.append(
        ["1. the same, regcache --verify-reads always, MiB/s", mib(g("warm.regcache_always")), "", "", "", "",
         f"always/first {rx(ratio('warm.regcache_always', 'warm.regcache'))}, always/nginx {rx(r_ang)}, "
         f"/squid {rx(r_asq)}, /mirror {rx(r_ami)}",
         f"> squid {check(cmp(r_asq, lambda x: x > 1))}, > mirror {check(cmp(r_ami, lambda x: x > 1))}"]
    )
    rows.append(
        ["1. client ceilings, MiB/s", "", "", "", "", "",
         f"raw loopback TCP {mib(g('tcp'))}, bench_client TLS ceiling {mib(g('tlsceil'))}", ""]
    )
    # 2. cold
    r_cold = ratio("cold.regcache", "cold.direct")
    row(
        f"2. cold {big} MiB blob (empty cache), s",
        secs,
        "cold",
        f"regcache/direct {rx(r_cold)}, squid/direct {rx(ratio('cold.squid', 'cold.direct'))}, "
        f"mirror/direct {rx(ratio('cold.mirror', 'cold.direct'))}",
        f"≤ 1.1× direct {check(cmp(r_cold, lambda x: x <= 1.1))}",
        na=("nginx",),
    )
    cg = g("coldgets.regcache")
    row(
        "2. upstream blob GETs for that cold GET (max of rounds)",
        count,
        "coldgets",
        "",
        f"exactly 1 {check(cmp(cg, lambda x: x == 1))}",
        na=("nginx",),
    )
    # 3. concurrent cold
    r_c = ratio("conc.regcache", "conc1.regcache")
    row(
        f"3. {n_conc} concurrent clients, one cold {conc} MiB blob: wall, s",
        secs,
        "conc",
        f"÷ one cold GET of it: regcache {rx(r_c)}, squid {rx(ratio('conc.squid', 'conc1.squid'))}, "
        f"mirror {rx(ratio('conc.mirror', 'conc1.mirror'))}, direct {rx(ratio('conc.direct', 'conc1.direct'))}",
        f"≤ 1.5× one cold {check(cmp(r_c, lambda x: x <= 1.5))}",
        na=("nginx",),
    )
    row(
        f"3. one cold GET of that {conc} MiB blob, s",
        secs,
        "conc1",
        "",
        "",
        na=("nginx",),
    )
    r_w = ratio("conc.regcache", "concwarm.regcache")
    row(
        f"3. the same {n_conc} clients again, warm (delivery floor), s",
        secs,
        "concwarm",
        f"cold ÷ warm: regcache {rx(r_w)}, squid {rx(ratio('conc.squid', 'concwarm.squid'))}, "
        f"mirror {rx(ratio('conc.mirror', 'concwarm.mirror'))}",
        "",
        na=("nginx",),
    )
    ccg = g("concgets.regcache")
    row(
        f"3. upstream blob GETs for the {n_conc} clients (max of rounds)",
        count,
        "concgets",
        "",
        f"exactly 1 {check(cmp(ccg, lambda x: x == 1))}",
        na=("nginx",),
    )
    rss3 = g("rss3.regcache")
    row(
        f"3. peak RSS while the {n_conc} clients get it warm (VmHWM), MiB",
        mebi,
        "rss3",
        "",
        f"regcache < 64 MiB {check(cmp(rss3, lambda x: x < 64))}",
        na=("nginx", "direct"),
    )
    # 9 (shown after 3). the upstream behind a shaped link
    if g("wan1.direct") is not None or g("wan1.regcache") is not None:
        wan = opts.get("wan_mbit", "?")
        r_wan = ratio("wan1.regcache", "wan1.direct")
        row(
            f"9. upstream behind a {wan} Mbit/s link: one cold {conc} MiB GET, s",
            secs,
            "wan1",
            f"regcache/direct {rx(r_wan)}",
            f"≤ 1.1× direct {check(cmp(r_wan, lambda x: x <= 1.1))}",
            na=("squid", "mirror", "nginx"),
        )
        r_wc = ratio("wanc.regcache", "wan1.regcache")
        row(
            f"9. {n_conc} concurrent clients, one cold {conc} MiB blob over that link: wall, s",
            secs,
            "wanc",
            f"÷ one cold GET: regcache {rx(r_wc)}",
            f"≤ 1.5× one cold {check(cmp(r_wc, lambda x: x <= 1.5))}",
            na=("squid", "mirror", "nginx", "direct"),
        )
        g1, gc = g("wan1gets.regcache"), g("wancgets.regcache")
        ok = None if g1 is None or gc is None else (g1 == 1 and gc == 1)
        rows.append(
            [f"9. upstream blob GETs over that link: one client / {n_conc} clients (max of rounds)",
             f"{count(g1)} / {count(gc)}", "n/a", "n/a", "n/a", "n/a", "", f"exactly 1 {check(ok)}"]
        )
    # 4. concurrent warm
    row(
        f"4. {warm_conc} concurrent clients, warm {big} MiB blob: aggregate MiB/s",
        mib,
        "w20",
        f"regcache/nginx {rx(ratio('w20.regcache', 'w20.nginx'))}, /squid {rx(ratio('w20.regcache', 'w20.squid'))}, "
        f"/mirror {rx(ratio('w20.regcache', 'w20.mirror'))}",
        "",
    )
    rss = g("rss.regcache")
    row(
        "4. peak RSS during it (VmHWM), MiB",
        mebi,
        "rss",
        "",
        f"regcache < 64 MiB {check(cmp(rss, lambda x: x < 64))}",
        na=("nginx", "direct"),
    )
    # 5. tags
    def tagcell(kind):
        def fmt_peer(p):
            gv, hv = g(f"tag{kind}.get.{p}"), g(f"tag{kind}.head.{p}")
            if gv is None and hv is None:
                return "—"
            return f"{count(gv)} GET, {count(hv)} HEAD"
        return fmt_peer

    tc = g("tagcold.get.regcache")
    cells = [tagcell("cold")(p) if p in ("regcache", "squid", "mirror") else "n/a" for p in PEERS]
    rows.append(
        [f"5. {tags} concurrent GETs of a tag never seen: upstream manifest requests (max of rounds)"] + cells
        + [f"burst wall: regcache {secs(g('tagcold.wall.regcache'))}, squid {secs(g('tagcold.wall.squid'))}, "
           f"mirror {secs(g('tagcold.wall.mirror'))}",
           f"regcache ≤ 1 GET {check(cmp(tc, lambda x: x <= 1))}"]
    )
    ts = g("tagstale.head.regcache")
    cells = []
    for p in PEERS:
        if p == "squid":
            cells.append("n/a (refresh_pattern is in minutes)")
        elif p in ("regcache", "mirror"):
            cells.append(tagcell("stale")(p))
        else:
            cells.append("n/a")
    rows.append(
        [f"5. {tags} concurrent GETs of a stale tag (regcache --tag-ttl {opts['stale_ttl']}, "
         f"{int(opts['stale_ttl']) + 1} s after a GET)"] + cells
        + [f"burst wall: regcache {secs(g('tagstale.wall.regcache'))}, mirror {secs(g('tagstale.wall.mirror'))}",
           f"regcache ≤ 1 HEAD {check(cmp(ts, lambda x: x <= 1))}"]
    )
    # 6. handshakes
    hs = opts["handshakes"]
    row(
        f"6. CONNECT + TLS handshake to a new host (minting), p50 of {hs}",
        ms,
        "hsmint",
        f"new/known host: regcache {rx(ratio('hsmint.regcache', 'hsknown.regcache'))}, "
        f"squid {rx(ratio('hsmint.squid', 'hsknown.squid'))}",
        "",
        na=("mirror", "nginx", "direct"),
    )
    row(
        f"6. CONNECT + TLS handshake to a known host, p50 of {hs}",
        ms,
        "hsknown",
        "",
        "",
        na=("mirror", "nginx", "direct"),
    )
    # 7. start-up
    su = g("startup.full")
    rows.append(
        [f"7. start-up to /healthz, cache of {int(opts['entries']):,} entries", secs(su), "n/a", "n/a", "n/a", "n/a",
         f"empty cache {secs(g('startup.empty'))}; ratio {rx(ratio('startup.full', 'startup.empty'))}",
         f"< 1 s {check(cmp(su, lambda x: x < 1))}"]
    )
    # 8. skopeo
    row(
        f"8. warm skopeo copy, {opts['layers']} layers × {opts['layer_mib']} MiB, to dir:, s",
        secs,
        "skopeo",
        f"regcache/direct {rx(ratio('skopeo.regcache', 'skopeo.direct'))}, "
        f"/squid {rx(ratio('skopeo.regcache', 'skopeo.squid'))}, /mirror {rx(ratio('skopeo.regcache', 'skopeo.mirror'))}",
        "",
        na=("nginx",),
    )

    # 10. first pull of an image cached through another repository
    if any(g(k) is not None for k in ("fp.public", "fp.guarded", "fpcold.public")):
        nb = opts.get("multi_blobs", "?")
        hp, hg = g("fpheads.public"), g("fpheads.guarded")
        gp, gg = g("fpgets.public"), g("fpgets.guarded")
        rows.append(
            [f"10. first skopeo copy of an image ({nb} blobs) already cached through another repository: "
             "public / guarded, s",
             f"{secs(g('fp.public'))} / {secs(g('fp.guarded'))}", "n/a", "n/a", "n/a", "n/a",
             f"guarded/public {rx(ratio('fp.guarded', 'fp.public'))}; the cold pull that cached it: "
             f"public {secs(g('fpcold.public'))}, guarded {secs(g('fpcold.guarded'))}",
             ""]
        )
        try:
            want = int(nb)
        except ValueError:
            want = None
        ok_p = None if hp is None or gp is None else (hp == 0 and gp == 0)
        ok_g = None if hg is None or gg is None or want is None else (hg == want and gg == 0)
        rows.append(
            ["10. upstream blob HEADs (200) / GETs of that pull: public / guarded (max of rounds)",
             f"{count(hp)} / {count(gp)} · {count(hg)} / {count(gg)}", "n/a", "n/a", "n/a", "n/a",
             "guarded: the registry confirms each blob for the new repository with the client's credential",
             f"public 0 HEAD 0 GET {check(ok_p)}, guarded {nb} HEAD 0 GET {check(ok_g)}"]
        )

    # 11. CPU cost per GiB served, from each peer's own process accounting
    def cpu(x):
        return "—" if x is None else f"{x:.2f} s"

    def cheapest(key, peers):
        own = g(f"{key}.regcache")
        others = [g(f"{key}.{p}") for p in peers]
        others = [x for x in others if x is not None]
        return None if own is None or not others else own <= min(others)

    row(
        f"11. CPU per GiB served warm (user + system of the peer's processes, figure 1's GETs)",
        cpu,
        "cpuwarm",
        f"regcache/nginx {rx(ratio('cpuwarm.regcache', 'cpuwarm.nginx'))}, "
        f"/squid {rx(ratio('cpuwarm.regcache', 'cpuwarm.squid'))}, /mirror {rx(ratio('cpuwarm.regcache', 'cpuwarm.mirror'))}",
        f"regcache cheapest of the caches {check(cheapest('cpuwarm', ('squid', 'mirror')))}",
    )
    row(
        f"11. CPU per GiB served cold (figure 2's GET, fill and store included; the upstream's not)",
        cpu,
        "cpucold",
        f"regcache/squid {rx(ratio('cpucold.regcache', 'cpucold.squid'))}, "
        f"/mirror {rx(ratio('cpucold.regcache', 'cpucold.mirror'))}",
        f"regcache cheapest of the caches {check(cheapest('cpucold', ('squid', 'mirror')))}",
        na=("nginx",),
    )

    # 12. HTTP/2 against HTTP/1.1, warm
    def h2cells(key, fmt):
        cells = []
        for p in PEERS:
            if g(f"h2none.{p}"):
                cells.append("n/a (no h2)")
            else:
                cells.append(fmt(g(f"{key}.{p}")))
        return cells

    def h2ratios(num, den):
        parts = []
        for p in PEERS:
            r = ratio(f"{num}.{p}", f"{den}.{p}")
            if r is not None:
                parts.append(f"{p} {rx(r)}")
        return ", ".join(parts)

    layers = opts["layers"]
    r_one = ratio("h2one.regcache", "h1one.regcache")
    rows.append(
        [f"12. warm {big} MiB blob over HTTP/2, 1 connection ({opts['warm_n']} GETs), MiB/s"]
        + h2cells("h2one", mib)
        + [f"h2/h1: {h2ratios('h2one', 'h1one')}",
           f"regcache h2 ≥ 0.95× h1 {check(cmp(r_one, lambda x: x >= 0.95))}"]
    )
    rows.append(
        ["12. the same over HTTP/1.1, measured alongside, MiB/s"] + h2cells("h1one", mib) + ["", ""]
    )
    r_par = ratio("h2par.regcache", "h1par.regcache")
    rows.append(
        [f"12. warm: {layers} layers at once as {layers} streams on one HTTP/2 connection, MiB/s"]
        + h2cells("h2par", mib)
        + [f"h2 streams / h1 connections: {h2ratios('h2par', 'h1par')}",
           f"regcache ≥ 1× {layers} h1 connections {check(cmp(r_par, lambda x: x >= 1))}"]
    )
    rows.append(
        [f"12. the same over {layers} HTTP/1.1 connections, MiB/s"] + h2cells("h1par", mib) + ["", ""]
    )

    # 13. ctr images pull
    row(
        f"13. warm ctr images pull (containerd {opts.get('containerd', '?')}, native snapshotter), "
        f"{layers} layers × {opts['layer_mib']} MiB, s",
        secs,
        "ctr",
        f"regcache/direct {rx(ratio('ctr.regcache', 'ctr.direct'))}, "
        f"/squid {rx(ratio('ctr.regcache', 'ctr.squid'))}, /mirror {rx(ratio('ctr.regcache', 'ctr.mirror'))}",
        "",
        na=("nginx",),
    )

    # 14. concurrent cold fills of different blobs
    fills = opts.get("fills", "?")
    row(
        f"14. {fills} concurrent cold fills, {fills} different {opts.get('fill_mib', '?')} MiB blobs: wall, s",
        secs,
        "fill",
        f"regcache/direct {rx(ratio('fill.regcache', 'fill.direct'))}, "
        f"/squid {rx(ratio('fill.regcache', 'fill.squid'))}, /mirror {rx(ratio('fill.regcache', 'fill.mirror'))}",
        "",
        na=("nginx",),
    )

    def fillcell(p):
        t, b = g(f"fillgets.{p}"), g(f"fillbad.{p}")
        if t is None:
            return "—"
        return f"{count(t)} ({count(b)} blobs ≠ 1)"

    fb = g("fillbad.regcache")
    rows.append(
        [f"14. upstream GETs of those blobs: total (blobs not fetched exactly once), max of rounds"]
        + [fillcell(p) if p != "nginx" else "n/a" for p in PEERS]
        + ["", f"regcache exactly 1 per blob {check(cmp(fb, lambda x: x == 0))}"]
    )
    rf = g("rssfill.regcache")
    row(
        "14. peak RSS during the fills and their commits (VmHWM), MiB",
        mebi,
        "rssfill",
        "",
        f"regcache < 64 MiB {check(cmp(rf, lambda x: x < 64))}",
        na=("nginx", "direct"),
    )

    # 15. nodes on one S3 bucket
    sh_conc = opts.get("sh_conc", "?")
    wan = opts.get("wan_mbit", "?")
    for net, where in (("loop", "loopback"), ("wan", f"the upstream behind the {wan} Mbit/s link")):
        if net == "wan" and g("shwanskipped") is not None:
            rows.append([f"15. the same over {where}", "skipped (BENCH_SHARED_WAN=0)", "", "", "", "", "", ""])
            continue
        r_rc, r_mi = ratio(f"sh{net}.regcache", f"sh1{net}.direct"), ratio(f"sh{net}.mirror", f"sh1{net}.direct")
        target = f"≤ 1.5× one cold direct GET {check(cmp(r_rc, lambda x: x <= 1.5))}" if net == "wan" else ""
        rows.append(
            [f"15. 3 nodes on one S3 bucket, {sh_conc} clients round-robin over them, one cold {conc} MiB blob, "
             f"{where}: wall, s (direct: one cold GET)",
             secs(g(f"sh{net}.regcache")), "n/a", secs(g(f"sh{net}.mirror")), "n/a", secs(g(f"sh1{net}.direct")),
             f"÷ one cold direct GET: regcache {rx(r_rc)}, mirrors {rx(r_mi)}", target]
        )
        cg = g(f"sh{net}gets.regcache")
        rows.append(
            [f"15. upstream GETs of that blob, {where} (max of rounds)",
             count(cg), "n/a", count(g(f"sh{net}gets.mirror")), "n/a", "n/a", "",
             f"regcache exactly 1 {check(cmp(cg, lambda x: x == 1))}"]
        )
    r_sh = ratio("shwarm.regcache", "shhit.regcache")
    rows.append(
        [f"15. warm {big} MiB blob, a node with an empty cache reading it from the bucket "
         "(regcache: cache=SHARED; mirror: its only storage), 1 GET, MiB/s",
         mib(g("shwarm.regcache")), "n/a", mib(g("shwarm.mirror")), "n/a", "n/a",
         f"SHARED/HIT: regcache {rx(r_sh)}; regcache/mirror {rx(ratio('shwarm.regcache', 'shwarm.mirror'))}; "
         f"upstream blob GETs: regcache {count(g('shwarmgets.regcache'))}, mirror {count(g('shwarmgets.mirror'))}",
         ""]
    )
    rows.append(
        [f"15. the same node reading it again from its own disk (cache=HIT), {opts['warm_n']} GETs, MiB/s",
         mib(g("shhit.regcache")), "n/a", "n/a", "n/a", "n/a", "", ""]
    )

    figures = [f for f in opts.get("figures", "").split(",") if f]
    if figures:
        rows = [r for r in rows if r[0].split(".", 1)[0] in figures]

    print(header)
    print()
    print("| figure | regcache | squid | mirror | nginx | direct | ratios | target |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print()
    print(
        f"Medians of the rounds (upstream request counts: the largest). Warm: {opts['warm_n']} sequential GETs "
        "on one connection, after one untimed GET. mirror = docker-registry proxy (pull-through mirror, "
        "no interception); squid = squid-openssl, ssl-bump at step 1, blobs in cache_mem over an aufs cache_dir, "
        "collapsed_forwarding on; nginx = static file, sendfile on; direct = the upstream docker-registry. "
        f"Figure 3 delivers {n_conc}× the blob to the clients, so on loopback its wall time is bound by "
        "delivery, not by the one upstream fetch. Figure 12: bench_client's HTTP/2 announces what Go's "
        "transport does (4 MiB stream window, 1 GiB connection window, 16 KiB frames); squid does not "
        "offer h2 to its clients. Figure 13's pulls unpack the layers (the same cost for every peer). "
        "Figure 15: SeaweedFS on loopback; regcache = three nodes with --shared-store on one bucket; "
        "mirror = three docker-registry proxies whose s3 storage driver shares one bucket (redirect "
        "disabled); direct = one cold GET from the upstream, the ratios' base."
    )
    if missing:
        print()
        print("Not measured:")
        for m in missing:
            print(f"- {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
