//! Micro-benchmarks: opening a cache of 100,000 entries (start-up time),
//! lookups in it (entry, repository link and link facts, as cached requests make),
//! the room bookkeeping of a fill (admission and the reservation growing
//! with its writes), and the hot pure parts (route parsing, digest hashing,
//! leaf minting).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use regcache::cache::index::{Change, ContentRow, Index};
use regcache::cache::Cache;
use regcache::registry::digest::Digest;
use regcache::registry::route;

/// A cache directory whose index holds `n` entries, each linked once.
fn populated(n: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let index = Index::open(&dir.path().join("index.redb")).expect("index");
    let mut changes = Vec::with_capacity(2 * n);
    for i in 0..n {
        let digest = Digest::of(&i.to_le_bytes()).to_string();
        changes.push(Change::PutLink(format!(
            "docker.io/library/img{}@{digest}",
            i % 100
        )));
        changes.push(Change::PutContent(ContentRow {
            digest,
            size: 1000 + i as u64,
            last_access: i as u64,
            media_type: String::new(),
        }));
    }
    index.apply(&changes).expect("populate");
    dir
}

fn startup(c: &mut Criterion) {
    let dir = populated(100_000);
    let mut group = c.benchmark_group("startup");
    group.sample_size(10);
    group.bench_function("open cache with 100k entries", |b| {
        b.iter(|| {
            let cache = Cache::open(dir.path(), u64::MAX).expect("open");
            assert_eq!(cache.stats().entries, 100_000);
            black_box(cache)
        })
    });
    group.finish();

    let cache = Cache::open(dir.path(), u64::MAX).expect("open");
    let digests: Vec<Digest> = (0..1000usize)
        .map(|i| Digest::of(&(i * 97).to_le_bytes()))
        .collect();
    let mut group = c.benchmark_group("lookup in 100k entries");
    group.throughput(Throughput::Elements(digests.len() as u64));
    group.bench_function("entry by digest", |b| {
        b.iter(|| {
            for d in &digests {
                black_box(cache.get(black_box(d)));
            }
        })
    });
    group.bench_function("repository link", |b| {
        b.iter(|| {
            for (i, d) in digests.iter().enumerate() {
                let repo = format!("library/img{}", (i * 97) % 100);
                black_box(cache.is_linked("docker.io", &repo, black_box(d)));
            }
        })
    });
    // The link verdict's facts for a repository the digest is not linked to
    // (what a cross-repository request asks): one lookup by digest.
    group.bench_function("link facts (another repository)", |b| {
        b.iter(|| {
            for d in &digests {
                black_box(cache.link_facts("docker.io", "library/other", black_box(d), 0));
            }
        })
    });
    group.finish();
}

fn hot_paths(c: &mut Criterion) {
    let path = "/v2/library/alpine/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    c.bench_function("route::parse blob path", |b| {
        b.iter(|| route::parse(black_box(path)))
    });

    let data = vec![7u8; 1 << 20];
    let mut group = c.benchmark_group("digest");
    group.throughput(Throughput::Bytes(data.len() as u64));
    group.bench_function("sha256 1 MiB", |b| b.iter(|| Digest::of(black_box(&data))));
    group.finish();

    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Arc::new(regcache::tls::CertificateAuthority::create(dir.path()).expect("ca"));
    let minter = regcache::tls::LeafMinter::new(ca, 1).expect("minter");
    let mut n = 0u64;
    c.bench_function("mint a leaf certificate", |b| {
        b.iter(|| {
            n += 1;
            minter
                .server_config(&format!("host{n}.test"))
                .expect("mint")
        })
    });
}

/// What a 256 MiB fill spends on its room: one admission, then the
/// reservation covering each 64 KiB write (a lock only every step).
fn fill_room(c: &mut Criterion) {
    const BLOB: u64 = 256 << 20;
    const WRITE: u64 = 64 << 10;
    let dir = tempfile::tempdir().expect("temp dir");
    let cache = Cache::open(dir.path(), 1 << 40).expect("open");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("fill room");
    group.throughput(Throughput::Bytes(BLOB));
    group.bench_function("admit and cover 256 MiB in 64 KiB writes", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut room = cache.admit(Some(BLOB)).expect("admitted");
                let mut written = 0;
                while written < BLOB {
                    written += WRITE;
                    room.cover(black_box(written)).await.expect("room");
                }
                room
            })
        })
    });
    group.finish();
}

/// What the metrics add to each request: the access log's recording when a
/// response ends (counter, histogram, served bytes), and one upstream
/// answer. Nothing is recorded per chunk.
fn metrics_recording(c: &mut Criterion) {
    let m = regcache::metrics::get();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("record one finished blob request", |b| {
        b.iter(|| {
            m.request(
                black_box("docker.io"),
                black_box("/v2/library/alpine/blobs/sha256:0123"),
                black_box("HIT"),
                200,
                black_box(256 << 20),
                Duration::from_millis(120),
            )
        })
    });
    group.bench_function("render a scrape", |b| b.iter(|| m.render().len()));
    group.finish();
}

criterion_group!(benches, startup, hot_paths, fill_room, metrics_recording);
criterion_main!(benches);
