//! The one support module of regcache's integration tests.
//!
//! The pieces, in the order a test meets them:
//!
//! * [`tls`]: a throw-away certificate authority ([`tls::TestCa`], rcgen)
//!   that signs the in-process servers' certificates. Its PEM is written to a
//!   temp file and handed to regcache as `--upstream-ca`, so regcache can
//!   verify the upstream while a client that trusts only the regcache CA
//!   cannot. The one accept loop every in-process server runs
//!   ([`tls::serve`]), and the client side: a CONNECT tunnel through the
//!   proxy, TLS through it trusting only the roots it is given.
//! * [`upstream`]: an in-process origin (HTTPS or plain HTTP) that records
//!   every request and serves an echo, generated bodies of N bytes, slow
//!   bodies, an upload sink that checks every byte, hop-by-hop headers and
//!   arbitrary status codes; [`upstream::Fixture`] puts it behind a proxy.
//! * [`registry`]: an in-process OCI registry with fault knobs per path, and
//!   [`auth`]: its token service and accounts (Docker Hub's token flow, or
//!   Basic).
//! * [`proxy`]: the real `regcache` binary, spawned with a temp CA dir and a
//!   free port, ready once `/healthz` answers; killed when dropped; and
//!   [`proxy::Env`], a registry with the dirs regcache keeps between
//!   restarts.
//! * [`http`]: hyper client connections through the proxy, a response read
//!   to its end ([`http::Got`]), and raw bytes on the proxy port for the
//!   malformed-input tests.
//! * [`pattern`]: bodies checked against a fixed pseudo-random buffer whose
//!   length is a prime, so gigabyte transfers stay cheap in a debug build.

pub use rustix::process::Signal;
use rustix::process::{kill_process, Pid};

pub mod auth;
pub mod http;
pub mod pattern;
pub mod proxy;
pub mod registry;
pub mod s3;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::TcpListener as StdTcpListener;
use std::time::Duration;

/// Generous deadline for anything that should be quick.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(20);

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = StdTcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// Run `fut` with a deadline; panic with `what` when it is exceeded.
pub async fn within<T>(what: &str, limit: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Sends signal `sig` to process `pid` (one the test spawned).
pub fn send_signal(pid: u32, sig: Signal) {
    let target = i32::try_from(pid).ok().and_then(Pid::from_raw);
    let target = target.unwrap_or_else(|| panic!("{pid} is not a process id"));
    if let Err(e) = kill_process(target, sig) {
        panic!("kill({pid}, {sig:?}) failed: {e}");
    }
}
