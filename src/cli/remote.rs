//! `regcache cache stats|ls|rm|purge` against the regcache that holds the
//! cache: its admin API ([`crate::admin::api`]), found through the address
//! it wrote in the cache directory ([`crate::admin::api::DISCOVERY_FILE`]).
//!
//! The discovery file is read only when the index is held by another
//! process (a running regcache), so a file left by a killed regcache is
//! never believed on its own; a fresh start overwrites it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::admin::api::{self, ApiError, Images, LiveStats, Purged, Removed};

/// How long one call may take (a purge or listing of a large cache).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Why the running regcache could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The cache is held, but no discovery file says where its API is.
    #[error("a running regcache has this cache open, but {0} does not say where its admin API listens (a regcache older than this one?); stop it first")]
    NoAddress(PathBuf),
    /// The API needs a token (the peer is not loopback) and none is usable.
    #[error("the admin API at {addr} is not on loopback: set admin_token_file in the configuration ({why})")]
    NoToken {
        /// The API's address.
        addr: SocketAddr,
        /// Why no token is at hand.
        why: String,
    },
    /// The connection or the exchange failed.
    #[error("cannot reach the running regcache's admin API at {addr}: {why}")]
    Unreachable {
        /// The API's address.
        addr: SocketAddr,
        /// What failed.
        why: String,
    },
    /// The API answered with an error.
    #[error("{message}")]
    Refused {
        /// The HTTP status.
        status: StatusCode,
        /// The API's error message.
        message: String,
    },
}

/// The admin API of the regcache holding a cache.
#[derive(Debug, Clone)]
pub struct Remote {
    addr: SocketAddr,
    token: Option<String>,
}

impl Remote {
    /// The API named in `cache_dir`'s discovery file. `token` is the
    /// `admin_token_file` read (if configured), needed unless the address
    /// is loopback.
    pub fn find(
        cache_dir: &Path,
        token: Option<Result<String, String>>,
    ) -> Result<Remote, RemoteError> {
        let path = api::discovery_path(cache_dir);
        let addr = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| text.trim().parse::<SocketAddr>().ok())
            .ok_or(RemoteError::NoAddress(path))?;
        let token = match token {
            Some(Ok(token)) => Some(token),
            _ if api::is_loopback(addr.ip()) => None,
            Some(Err(why)) => return Err(RemoteError::NoToken { addr, why }),
            None => {
                return Err(RemoteError::NoToken {
                    addr,
                    why: "it is not set".into(),
                })
            }
        };
        Ok(Remote { addr, token })
    }

    /// The API's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /api/v1/stats`.
    pub fn stats(&self) -> Result<LiveStats, RemoteError> {
        self.call(Method::GET, "stats")
    }

    /// `GET /api/v1/images`.
    pub fn images(&self) -> Result<Images, RemoteError> {
        self.call(Method::GET, "images")
    }

    /// `DELETE /api/v1/images/<target>`.
    pub fn remove(&self, target: &str) -> Result<Removed, RemoteError> {
        use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
        /// Left as they are: what references and digests are made of.
        const KEEP: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'/')
            .remove(b':')
            .remove(b'.')
            .remove(b'-')
            .remove(b'_')
            .remove(b'@');
        let encoded = utf8_percent_encode(target, KEEP).to_string();
        self.call(Method::DELETE, &format!("images/{encoded}"))
    }

    /// `POST /api/v1/purge`.
    pub fn purge(&self) -> Result<Purged, RemoteError> {
        self.call(Method::POST, "purge")
    }

    /// One call, on a runtime of its own (the command line is not async).
    fn call<T: DeserializeOwned>(&self, method: Method, endpoint: &str) -> Result<T, RemoteError> {
        let unreachable = |why: String| RemoteError::Unreachable {
            addr: self.addr,
            why,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unreachable(e.to_string()))?;
        let path = format!("{}{endpoint}", api::PREFIX);
        let (status, body) = runtime
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, self.exchange(method, &path)).await
            })
            .map_err(|_| unreachable(format!("no answer within {}s", CALL_TIMEOUT.as_secs())))?
            .map_err(unreachable)?;
        if !status.is_success() {
            let message = serde_json::from_slice::<ApiError>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).trim().to_string());
            return Err(RemoteError::Refused { status, message });
        }
        serde_json::from_slice(&body).map_err(|e| unreachable(format!("unexpected answer: {e}")))
    }

    async fn exchange(&self, method: Method, path: &str) -> Result<(StatusCode, Bytes), String> {
        let tcp = tokio::net::TcpStream::connect(self.addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, self.addr.to_string());
        if let Some(token) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, body))
    }
}
