//! regcache's own pages on the proxy port (origin-form requests):
//! `/ca.crt` (the CA to trust), `/healthz`, `/metrics` (Prometheus, see
//! [`crate::metrics`]) and `/setup` (a script that makes a host trust the
//! CA: `curl -fsSL http://regcache:3128/setup | sudo sh`); the admin API
//! under `/api/v1/` ([`api`]); and the pages of the `metrics_listen`
//! address, `/metrics` and `/healthz` alone ([`handle_metrics_listen`]).

pub mod api;

use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::http::body::{self, Body};
use crate::http::error::error_response;

/// The host set-up script, with `@REGCACHE_URL@` to fill in.
const SETUP_SCRIPT: &str = include_str!("../../deploy/setup.sh");

/// Answers an origin-form request to the proxy port.
pub async fn handle<B>(app: &App, req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here",
        );
    }
    match req.uri().path() {
        "/metrics" => metrics().await,
        "/ca.crt" => {
            let mut resp = text(app.ca.cert_pem().to_string(), "application/x-pem-file");
            resp.headers_mut().insert(
                CONTENT_DISPOSITION,
                HeaderValue::from_static("attachment; filename=\"regcache-ca.crt\""),
            );
            resp
        }
        "/healthz" => text("ok\n".into(), "text/plain; charset=utf-8"),
        "/setup" => {
            let url = format!("http://{}", safe_host(req).unwrap_or_else(|| app.state.config.listen.to_string()));
            text(SETUP_SCRIPT.replace("@REGCACHE_URL@", &url), "text/x-shellscript; charset=utf-8")
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            "regcache is a proxy: set HTTPS_PROXY to this address. Pages here: /ca.crt /healthz /metrics /setup",
        ),
    }
}

/// Answers a request to the `metrics_listen` address: `/metrics` and
/// `/healthz`, nothing else.
pub async fn handle_metrics_listen<B>(req: &Request<B>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here",
        );
    }
    match req.uri().path() {
        "/metrics" => metrics().await,
        "/healthz" => text("ok\n".into(), "text/plain; charset=utf-8"),
        _ => error_response(StatusCode::NOT_FOUND, "Pages here: /metrics /healthz"),
    }
}

/// `GET /metrics`: every metric in the Prometheus text format, rendered on
/// the blocking pool (the process collector reads `/proc`).
async fn metrics() -> Response<Body> {
    match tokio::task::spawn_blocking(|| crate::metrics::get().render()).await {
        Ok(page) => text(page, crate::metrics::CONTENT_TYPE),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("cannot render the metrics: {e}"),
        ),
    }
}

/// The request's Host header if it is safe to paste into a shell script.
fn safe_host<B>(req: &Request<B>) -> Option<String> {
    let host = req.headers().get(http::header::HOST)?.to_str().ok()?;
    let safe = !host.is_empty()
        && host.len() <= 261
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b));
    safe.then(|| host.to_string())
}

fn text(content: String, content_type: &'static str) -> Response<Body> {
    let mut resp = Response::new(body::full(content));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_with_shell_metacharacters_is_not_used() {
        let req = Request::get("/setup")
            .header("host", "x;rm -rf /")
            .body(())
            .unwrap();
        assert_eq!(safe_host(&req), None);
        let req = Request::get("/setup")
            .header("host", "regcache.internal:3128")
            .body(())
            .unwrap();
        assert_eq!(safe_host(&req).as_deref(), Some("regcache.internal:3128"));
    }
}
