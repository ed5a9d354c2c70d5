//! A real S3 server for the shared-tier tests: SeaweedFS, started (and
//! installed when missing) by `tests/e2e/seaweedfs.sh`, which knows its
//! command line and keeps every port on loopback; and a client of it
//! (`object_store`) to look at and tamper with what the tier holds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt as _, PutPayload};

use super::proxy::{regcache_command, ProxyBuilder};

/// The script that installs and starts SeaweedFS.
fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/seaweedfs.sh")
}

/// A running SeaweedFS (master, volume, filer, S3) with one bucket; killed
/// when dropped.
pub struct Seaweed {
    dir: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    access_key: String,
    secret_key: String,
    pid: Option<u32>,
    /// The bucket made at start.
    pub bucket: String,
}

impl Seaweed {
    /// Installs SeaweedFS if needed, starts it in a directory of its own,
    /// and makes `bucket`.
    pub fn start(bucket: &str) -> Seaweed {
        // Short: weed's unix sockets live in it.
        let dir = tempfile::Builder::new()
            .prefix("rcs3")
            .tempdir_in("/tmp")
            .unwrap();
        let mut s3 = Seaweed {
            dir,
            endpoint: String::new(),
            access_key: String::new(),
            secret_key: String::new(),
            pid: None,
            bucket: bucket.to_string(),
        };
        s3.launch();
        let made = s3.curl(&["-X", "PUT", &format!("{}/{bucket}", s3.endpoint)]);
        assert_eq!(made, "200", "make bucket {bucket}");
        s3
    }

    /// Starts weed on this directory (its ports and key are kept there).
    fn launch(&mut self) {
        let out = Command::new("bash")
            .arg("-c")
            .arg(
                r#". "$1" && start_seaweedfs "$2" >&2 &&
                   printf '%s\n' "$S3_ENDPOINT" "$S3_ACCESS_KEY" "$S3_SECRET_KEY" "$SEAWEEDFS_PID""#,
            )
            .arg("seaweedfs")
            .arg(script())
            .arg(self.dir.path())
            .output()
            .expect("run tests/e2e/seaweedfs.sh");
        assert!(
            out.status.success(),
            "start_seaweedfs failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "start_seaweedfs printed {text:?}");
        self.endpoint = lines[0].to_string();
        self.access_key = lines[1].to_string();
        self.secret_key = lines[2].to_string();
        self.pid = Some(lines[3].parse().expect("a pid"));
    }

    /// Kills weed (its whole session), as a crash would.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            // Wait until the S3 port no longer answers.
            for _ in 0..100 {
                if self.curl(&[&format!("{}/", self.endpoint)]) != "200" {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Starts weed again on the same data, ports and key.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// A signed request with curl: its HTTP status.
    fn curl(&self, args: &[&str]) -> String {
        let out = Command::new("curl")
            .args(["-s", "--noproxy", "*", "--max-time", "5"])
            .args(["--aws-sigv4", "aws:amz:us-east-1:s3"])
            .args(["--user", &format!("{}:{}", self.access_key, self.secret_key)])
            .args([
                "-H",
                "x-amz-content-sha256: e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            ])
            .args(["-o", "/dev/null", "-w", "%{http_code}"])
            .args(args)
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// regcache on this store: `--shared-store s3://BUCKET/PREFIX` and the
    /// AWS_* variables every S3 client reads.
    pub fn node(&self, builder: ProxyBuilder, prefix: &str) -> ProxyBuilder {
        builder
            .args(["--shared-store", &format!("s3://{}/{prefix}", self.bucket)])
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
    }

    /// A client of the bucket, to look at what the tier holds.
    pub fn client(&self) -> Arc<dyn ObjectStore> {
        // reqwest (under object_store) needs a process-wide provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_region("us-east-1")
            .with_endpoint(&self.endpoint)
            .with_access_key_id(&self.access_key)
            .with_secret_access_key(&self.secret_key)
            .with_allow_http(true)
            .build()
            .expect("an S3 client");
        Arc::new(store)
    }

    /// The object of `digest` (`sha256:…`) under `prefix`, if any.
    pub async fn object(&self, prefix: &str, digest: &str) -> Option<Bytes> {
        let got = self.client().get(&key(prefix, digest)).await.ok()?;
        got.bytes().await.ok()
    }

    /// Waits (up to 20 s) until the tier holds `want` for `digest`.
    pub async fn wait_object(&self, prefix: &str, digest: &str, want: &[u8]) {
        for _ in 0..200 {
            if self.object(prefix, digest).await.as_deref() == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("the shared tier never held the right bytes of {digest}");
    }

    /// Overwrites the object of `digest` with `bytes`, through the S3 API.
    pub async fn overwrite(&self, prefix: &str, digest: &str, bytes: Bytes) {
        self.client()
            .put(&key(prefix, digest), PutPayload::from(bytes))
            .await
            .expect("overwrite the object");
    }
}

impl Seaweed {
    /// The use marker of `digest` under `prefix`, if any.
    pub async fn marker(&self, prefix: &str, digest: &str) -> Option<ObjectMeta> {
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        let key = StorePath::from(format!("{prefix}/used/{algorithm}/{hex}"));
        self.client().head(&key).await.ok()
    }

    /// Waits (up to 10 s) until the tier holds the use marker of `digest`.
    pub async fn wait_marker(&self, prefix: &str, digest: &str) {
        for _ in 0..100 {
            if self.marker(prefix, digest).await.is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no use marker of {digest} in the shared tier");
    }

    /// Writes a lease of `digest` under `prefix` that expires (or
    /// expired) at `expires_unix_ms`, as a node would.
    pub async fn put_lease(&self, prefix: &str, digest: &str, expires_unix_ms: u64) {
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        let key = StorePath::from(format!("{prefix}/leases/{algorithm}/{hex}"));
        let body = format!(r#"{{"node":"test:1","expires_unix_ms":{expires_unix_ms}}}"#);
        self.client()
            .put(&key, PutPayload::from(body.into_bytes()))
            .await
            .expect("put a lease");
    }

    /// Whether the lease of `digest` under `prefix` exists.
    pub async fn has_lease(&self, prefix: &str, digest: &str) -> bool {
        let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
        let key = StorePath::from(format!("{prefix}/leases/{algorithm}/{hex}"));
        self.client().head(&key).await.is_ok()
    }

    /// Runs `regcache shared gc ARGS` on `s3://BUCKET/PREFIX` (at most
    /// 60 s): (exit code, stdout, stderr).
    pub fn gc(&self, prefix: &str, args: &[&str]) -> (i32, String, String) {
        let out = regcache_command()
            .args(["shared", "gc", "--shared-store"])
            .arg(format!("s3://{}/{prefix}", self.bucket))
            .args(args)
            .env("AWS_ACCESS_KEY_ID", &self.access_key)
            .env("AWS_SECRET_ACCESS_KEY", &self.secret_key)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .output()
            .expect("run regcache shared gc");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
        let _ = Command::new("bash")
            .arg("-c")
            .arg(r#". "$1" && . "$2/seaweedfs.env" && seaweedfs_remove_sockets"#)
            .arg("seaweedfs")
            .arg(script())
            .arg(self.dir.path())
            .status();
    }
}

/// The object key of `digest` under `prefix`, as regcache names it.
fn key(prefix: &str, digest: &str) -> StorePath {
    let (algorithm, hex) = digest.split_once(':').expect("algorithm:hex");
    StorePath::from(format!("{prefix}/blobs/{algorithm}/{hex}"))
}
