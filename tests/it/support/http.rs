//! HTTP through the proxy, from the client's side.
//!
//! * [`HttpClient`]: a hyper HTTP/1.1 or HTTP/2 client connection over a
//!   TLS tunnel (or plain, to the proxy port), and [`Got`], a response read
//!   to its end with the error it ended with, if any.
//! * [`raw_exchange`]: write arbitrary bytes to the proxy port and read one
//!   response back, for the malformed-input tests.
//! * Small pieces: request bodies ([`empty`], [`full`]), [`basic`]
//!   credentials, [`header_names`].

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::tls::{negotiated_alpn, peer_leaf, ClientTls};
use super::{within, STEP_TIMEOUT};

/// The error of a boxed body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body, as the clients send them.
pub type ReqBody = BoxBody<Bytes, BoxError>;
/// A response body, as the in-process servers send them.
pub type RespBody = BoxBody<Bytes, BoxError>;

/// An empty body.
pub fn empty() -> ReqBody {
    Empty::<Bytes>::new().map_err(|e| match e {}).boxed()
}

/// A body of `data`, in one piece.
pub fn full(data: impl Into<Bytes>) -> ReqBody {
    Full::new(data.into()).map_err(|e| match e {}).boxed()
}

/// Collect a whole (small) body.
pub async fn body_bytes(body: Incoming) -> Bytes {
    within("reading a response body", STEP_TIMEOUT, body.collect())
        .await
        .expect("response body failed")
        .to_bytes()
}

/// Collect a whole (small) body as text.
pub async fn body_string(body: Incoming) -> String {
    String::from_utf8_lossy(&body_bytes(body).await).into_owned()
}

/// Feeds every data chunk of `body` to `chunk`, to its end or its error.
pub async fn read_chunks(
    mut body: Incoming,
    mut chunk: impl FnMut(&[u8]),
) -> Result<(), hyper::Error> {
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            chunk(&data);
        }
    }
    Ok(())
}

/// The value of header `name` in `headers`, if present, as text.
pub fn header_text(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Header names as lowercase strings.
pub fn header_names(h: &HeaderMap) -> Vec<String> {
    h.keys()
        .map(|k: &HeaderName| k.as_str().to_owned())
        .collect()
}

/// `Basic base64(user:password)`, written out independently of the base64
/// crate regcache uses.
pub fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let data = format!("{user}:{password}").into_bytes();
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                ALPHABET[(n >> (18 - 6 * i)) as usize & 63] as char
            } else {
                '='
            });
        }
    }
    format!("Basic {out}")
}

// ---------------------------------------------------------------------------
// A response read to its end
// ---------------------------------------------------------------------------

/// A response read to its end (or to its error).
#[derive(Debug)]
pub struct Got {
    /// The status.
    pub status: StatusCode,
    /// The response headers.
    pub headers: HeaderMap,
    /// The bytes that arrived.
    pub body: Bytes,
    /// Why the body ended early, if it did.
    pub error: Option<String>,
}

impl Got {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        header_text(&self.headers, name)
    }

    /// The X-Cache header, `<none>` without one.
    pub fn x_cache(&self) -> String {
        self.header("x-cache").unwrap_or_else(|| "<none>".into())
    }

    /// The Content-Length header, if present and a number.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Status, X-Cache, challenge and the start of the body, for messages.
    pub fn brief(&self) -> String {
        format!(
            "{} X-Cache {} WWW-Authenticate {:?} body {:?}",
            self.status,
            self.x_cache(),
            self.header("www-authenticate"),
            String::from_utf8_lossy(&self.body[..self.body.len().min(200)])
        )
    }

    /// First `errors[].code` of a JSON error body.
    pub fn error_code(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        v["errors"][0]["code"].as_str().map(str::to_owned)
    }

    /// 200 with exactly `want` (a GET) or no body (a HEAD), complete.
    pub fn assert_content(&self, method: &Method, want: &[u8], what: &str) {
        assert_eq!(self.status, StatusCode::OK, "{what}: {}", self.brief());
        assert!(
            self.error.is_none(),
            "{what}: body failed after {} bytes: {:?}",
            self.body.len(),
            self.error
        );
        if *method == Method::GET {
            assert!(
                self.body[..] == want[..],
                "{what}: wrong bytes ({} bytes, want {})",
                self.body.len(),
                want.len()
            );
        }
    }

    /// 200, complete, exactly `want` (a GET), X-Cache `cache`.
    pub fn assert_served(&self, want: &[u8], cache: &str, what: &str) {
        self.assert_content(&Method::GET, want, what);
        assert_eq!(self.x_cache(), cache, "{what}: X-Cache");
    }

    /// The body never completed: an error, or fewer bytes than announced.
    pub fn assert_aborted(&self, full: &[u8], what: &str) {
        let completed_whole =
            self.error.is_none() && self.content_length().is_none_or(|l| self.body.len() >= l);
        assert!(
            !completed_whole,
            "{what}: the response completed ({} bytes, status {}, X-Cache {}) although the \
             upstream bytes were wrong; it must end with an error instead",
            self.body.len(),
            self.status,
            self.x_cache()
        );
        assert!(
            self.body.len() < full.len() || self.body[..] != full[..],
            "{what}: sanity"
        );
    }
}

/// Reads a response's body to its end, keeping an error rather than panicking.
pub async fn read_response(resp: Response<Incoming>) -> Got {
    let (parts, body) = resp.into_parts();
    let mut data = Vec::new();
    let read = read_chunks(body, |d| data.extend_from_slice(d));
    let error = within("reading a response body", STEP_TIMEOUT, read)
        .await
        .err()
        .map(|e| format!("{e:?}"));
    Got {
        status: parts.status,
        headers: parts.headers,
        body: Bytes::from(data),
        error,
    }
}

// ---------------------------------------------------------------------------
// A hyper client connection
// ---------------------------------------------------------------------------

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<ReqBody>),
    H2(hyper::client::conn::http2::SendRequest<ReqBody>),
}

/// A hyper client connection (HTTP/1.1 or HTTP/2) to one host.
pub struct HttpClient {
    sender: Sender,
    /// Host used in the Host header (h1) or :authority (h2).
    pub host: String,
    /// "https" or "http".
    scheme: &'static str,
    /// ALPN the TLS layer negotiated, if TLS.
    pub alpn: Option<String>,
    /// Leaf certificate the server presented, if TLS.
    pub peer_leaf: Option<CertificateDer<'static>>,
}

impl HttpClient {
    /// Run HTTP/2 if ALPN chose h2, HTTP/1.1 otherwise.
    pub async fn over_tls(tls: ClientTls, host: &str) -> HttpClient {
        HttpClient::try_over_tls(tls, host)
            .await
            .unwrap_or_else(|e| panic!("HTTP handshake with {host}: {e:?}"))
    }

    /// [`HttpClient::over_tls`], with the handshake's error.
    pub async fn try_over_tls(tls: ClientTls, host: &str) -> Result<HttpClient, hyper::Error> {
        let alpn = negotiated_alpn(&tls);
        let leaf = peer_leaf(&tls);
        let io = TokioIo::new(tls);
        let sender = if alpn.as_deref() == Some("h2") {
            let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Sender::H2(s)
        } else {
            let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            Sender::H1(s)
        };
        Ok(HttpClient {
            sender,
            host: host.to_owned(),
            scheme: "https",
            alpn,
            peer_leaf: Some(leaf),
        })
    }

    /// A plain HTTP/1.1 connection to the proxy port, for absolute-form
    /// requests (`host` is what goes in the Host header).
    pub async fn plain_h1(addr: SocketAddr, host: &str) -> HttpClient {
        let tcp = TcpStream::connect(addr).await.expect("connect to proxy");
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("http1 handshake");
        tokio::spawn(conn);
        HttpClient {
            sender: Sender::H1(s),
            host: host.to_owned(),
            scheme: "http",
            alpn: None,
            peer_leaf: None,
        }
    }

    /// Whether this connection speaks HTTP/2.
    pub fn is_h2(&self) -> bool {
        matches!(self.sender, Sender::H2(_))
    }

    /// A request builder for `path` on this connection's host: origin-form
    /// plus Host for HTTP/1.1, absolute URI for HTTP/2.
    pub fn builder(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        match self.sender {
            Sender::H1(_) => Request::builder()
                .method(method)
                .uri(path)
                .header("host", &self.host),
            Sender::H2(_) => Request::builder()
                .method(method)
                .version(Version::HTTP_2)
                .uri(format!("{}://{}{}", self.scheme, self.host, path)),
        }
    }

    /// A request for `path` without a body, with `headers`, as
    /// [`HttpClient::builder`] makes it.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Request<ReqBody> {
        let mut b = self.builder(method, path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(empty()).unwrap()
    }

    /// Send and wait for the response head.
    pub async fn send(&mut self, req: Request<ReqBody>) -> Response<Incoming> {
        self.send_within(req, STEP_TIMEOUT).await
    }

    /// Send and wait for the response head at most `limit`.
    pub async fn send_within(
        &mut self,
        req: Request<ReqBody>,
        limit: Duration,
    ) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        self.exchange(req, limit)
            .await
            .unwrap_or_else(|e| panic!("{what} through the proxy failed: {e:?}"))
    }

    /// [`HttpClient::send`], with the error when no response head arrived
    /// (connection or stream reset).
    pub async fn try_send(
        &mut self,
        req: Request<ReqBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        self.exchange(req, STEP_TIMEOUT).await
    }

    async fn exchange(
        &mut self,
        req: Request<ReqBody>,
        limit: Duration,
    ) -> Result<Response<Incoming>, hyper::Error> {
        let what = format!("{} {}", req.method(), req.uri());
        let fut = async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
                Sender::H2(s) => {
                    s.ready().await?;
                    s.send_request(req).await
                }
            }
        };
        within(&format!("response to {what}"), limit, fut).await
    }

    /// Clone the sender (HTTP/2 only) to run requests concurrently.
    pub fn h2_sender(&self) -> hyper::client::conn::http2::SendRequest<ReqBody> {
        match &self.sender {
            Sender::H2(s) => s.clone(),
            Sender::H1(_) => panic!("not an h2 connection"),
        }
    }

    /// `GET path` without a body.
    pub async fn get(&mut self, path: &str) -> Response<Incoming> {
        let req = self.builder(Method::GET, path).body(empty()).unwrap();
        self.send(req).await
    }
}
// ---------------------------------------------------------------------------
// Raw HTTP on the proxy port
// ---------------------------------------------------------------------------

/// One response as read by [`raw_exchange`].
#[derive(Debug)]
pub struct RawResponse {
    /// The status (0 when the status line was not HTTP).
    pub status: u16,
    /// The response head, status line included.
    pub head: String,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The value of header `name`, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

/// The status of a response head; 0 when it is not one.
pub(super) fn parse_status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// Write `request` to a fresh connection (while reading, so a server that
/// answers early is heard) and read one response: head, then a body as long as
/// Content-Length says, or until EOF if there is none.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> std::io::Result<RawResponse> {
    let stream = TcpStream::connect(addr).await?;
    let (mut rd, mut wr) = stream.into_split();
    let req = request.to_vec();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&req).await;
        let _ = wr.flush().await;
        // Keep the write half open (no FIN) until the read side is done.
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(wr);
    });
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = rd.read(&mut tmp).await?;
        if n == 0 {
            writer.abort();
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&tmp[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = parse_status(&head);
    let mut body = buf[head_end..].to_vec();
    let mut r = RawResponse {
        status,
        head,
        body: vec![],
    };
    let no_body = request.starts_with(b"HEAD ") || status == 204 || status == 304;
    match r
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        _ if no_body => body.clear(),
        Some(len) => {
            while body.len() < len {
                let n = rd.read(&mut tmp).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&tmp[..n]);
            }
            body.truncate(len);
        }
        None if r
            .header("transfer-encoding")
            .is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) =>
        {
            // Read until the terminating chunk, then decode.
            while find(&body, b"0\r\n\r\n").is_none() {
                let n = rd.read(&mut tmp).await?;
                if n == 0 {
                    break;
                }
                body.extend_from_slice(&tmp[..n]);
            }
            body = dechunk(&body);
        }
        None => {
            // Read to EOF (bounded in time by the caller).
            loop {
                match rd.read(&mut tmp).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&tmp[..n]),
                }
            }
        }
    }
    writer.abort();
    r.body = body;
    Ok(r)
}

/// Whether `needle` (not empty) occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && find(hay, needle).is_some()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(p) = find(data, b"\r\n") {
        let size_str = String::from_utf8_lossy(&data[..p]);
        let size =
            usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[p + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

/// Same as [`raw_exchange`], with a deadline.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> RawResponse {
    within(
        "raw exchange with the proxy",
        STEP_TIMEOUT,
        raw_exchange(addr, request),
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "raw exchange {:?} failed: {e}",
            String::from_utf8_lossy(&request[..request.len().min(120)])
        )
    })
}
