//! regcache's own pages on the proxy port (origin-form requests):
//! `/ca.crt` (the CA to trust), `/healthz`, `/metrics` (Prometheus, see
//! [`crate::metrics`]) and `/setup` (a script that makes a host trust the
//! CA: `curl -fsSL http://regcache:3128/setup | sudo sh`); the status page
//! at `/` for a browser ([`status`], with the admin API's access rule); the
//! admin API under `/api/v1/` ([`api`]); and the pages of the
//! `metrics_listen` address, `/metrics` and `/healthz` alone
//! ([`handle_metrics_listen`]); and those of the `mirror_tls` port,
//! `/ca.crt` and `/healthz` beside the registry API ([`handle_mirror_tls`]).

pub mod api;
pub mod status;

use std::net::SocketAddr;

use http::header::{
    HeaderValue, ACCEPT, AUTHORIZATION, CACHE_CONTROL, CONTENT_DISPOSITION, CONTENT_TYPE,
};
use http::{Method, Request, Response, StatusCode};

use crate::app::App;
use crate::http::body::{self, Body};
use crate::http::error::error_response;

/// The host set-up script, with `@REGCACHE_URL@` to fill in.
const SETUP_SCRIPT: &str = include_str!("../../deploy/setup.sh");

/// The answer to a client that does not want the status page, or to a
/// path regcache does not serve.
const HINT: &str =
    "regcache is a proxy: set HTTPS_PROXY to this address. Pages here: /ca.crt /healthz /metrics /setup";

/// Answers an origin-form request from `peer` to the proxy port.
pub async fn handle<B>(app: &App, peer: SocketAddr, req: &Request<B>) -> Response<Body> {
    if let Some(refused) = refuse_method(req) {
        return refused;
    }
    match req.uri().path() {
        "/metrics" => metrics().await,
        "/ca.crt" => ca_cert(app),
        "/healthz" => healthz(),
        "/setup" => {
            let url = format!(
                "http://{}",
                safe_host(req).unwrap_or_else(|| app.state.config.listen.to_string())
            );
            text(
                SETUP_SCRIPT.replace("@REGCACHE_URL@", &url),
                "text/x-shellscript; charset=utf-8",
            )
        }
        "/" if wants_html(req) => status_page(app, peer, req),
        _ => error_response(StatusCode::NOT_FOUND, HINT),
    }
}

/// Whether the client asks for HTML (a browser): its `Accept` names
/// `text/html`.
pub fn wants_html<B>(req: &Request<B>) -> bool {
    req.headers().get_all(ACCEPT).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.to_ascii_lowercase().contains("text/html"))
    })
}

/// `GET /` for a browser: the status page, to whom the admin API answers
/// ([`api::decide`]); a 403 page for others.
fn status_page<B>(app: &App, peer: SocketAddr, req: &Request<B>) -> Response<Body> {
    let authorization = req.headers().get(AUTHORIZATION).map(HeaderValue::as_bytes);
    let verdict = api::decide(peer.ip(), authorization, app.admin_token.as_deref());
    let html = "text/html; charset=utf-8";
    let (status, page) = match verdict {
        api::Verdict::Loopback | api::Verdict::Token => {
            (StatusCode::OK, status::render(&status::snapshot(app)))
        }
        api::Verdict::Forbidden => (
            StatusCode::FORBIDDEN,
            status::forbidden(
                "The status page shows image names, so it answers as the admin API does: \
                 loopback clients only, as no admin_token_file is set.",
            ),
        ),
        api::Verdict::Unauthorized => (
            StatusCode::FORBIDDEN,
            status::forbidden(
                "The status page shows image names, so it answers as the admin API does: \
                 loopback clients, or requests sending Authorization: Bearer with the token of admin_token_file.",
            ),
        ),
    };
    if !verdict.allowed() {
        tracing::info!(%peer, access = ?verdict, "status page refused");
    }
    let mut resp = text(page, html);
    *resp.status_mut() = status;
    resp
}

/// Answers a request to the `metrics_listen` address: `/metrics` and
/// `/healthz`, nothing else.
pub async fn handle_metrics_listen<B>(req: &Request<B>) -> Response<Body> {
    if let Some(refused) = refuse_method(req) {
        return refused;
    }
    match req.uri().path() {
        "/metrics" => metrics().await,
        "/healthz" => healthz(),
        _ => error_response(StatusCode::NOT_FOUND, "Pages here: /metrics /healthz"),
    }
}

/// Answers a request to the `mirror_tls` port that is not for the
/// registry API: `/ca.crt` and `/healthz` only. The status page and the
/// admin API stay on the proxy port, where their access rule is kept.
pub fn handle_mirror_tls<B>(app: &App, req: &Request<B>) -> Response<Body> {
    if let Some(refused) = refuse_method(req) {
        return refused;
    }
    match req.uri().path() {
        "/ca.crt" => ca_cert(app),
        "/healthz" => healthz(),
        _ => error_response(
            StatusCode::NOT_FOUND,
            "this port serves the registry API (/v2/); regcache's pages are on the proxy port",
        ),
    }
}

/// 405 for a method other than GET and HEAD.
fn refuse_method<B>(req: &Request<B>) -> Option<Response<Body>> {
    let read = req.method() == Method::GET || req.method() == Method::HEAD;
    (!read).then(|| {
        error_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served here",
        )
    })
}

/// `GET /ca.crt`: the CA certificate, as a download.
fn ca_cert(app: &App) -> Response<Body> {
    let mut resp = text(app.ca.cert_pem().to_string(), "application/x-pem-file");
    resp.headers_mut().insert(
        CONTENT_DISPOSITION,
        HeaderValue::from_static("attachment; filename=\"regcache-ca.crt\""),
    );
    resp
}

/// `GET /healthz`.
fn healthz() -> Response<Body> {
    text("ok\n".into(), "text/plain; charset=utf-8")
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
