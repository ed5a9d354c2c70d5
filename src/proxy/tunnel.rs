//! Plain CONNECT tunnels: bytes relayed both ways, untouched, so the client
//! sees the destination's own certificate.

use std::net::SocketAddr;
use std::time::Instant;

use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Relays between the client's upgraded connection and `upstream` until
/// either side closes, then logs one line.
pub async fn relay(client: SocketAddr, host: String, upgraded: Upgraded, mut upstream: TcpStream) {
    let started = Instant::now();
    let mut client_io = TokioIo::new(upgraded);
    let (up, down, error) = match tokio::io::copy_bidirectional(&mut client_io, &mut upstream).await
    {
        Ok((up, down)) => (up, down, None),
        Err(e) => (0, 0, Some(e.to_string())),
    };
    tracing::info!(
        target: "regcache::access",
        client = %client,
        host = %host,
        method = "CONNECT",
        status = 200,
        bytes_up = up,
        bytes = down,
        duration_ms = started.elapsed().as_millis() as u64,
        cache = "TUNNEL",
        error = error.as_deref().unwrap_or(""),
        "tunnel closed"
    );
}
