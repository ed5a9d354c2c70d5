//! The proxy port: one HTTP/1.1 connection per client, whose requests are
//! CONNECT (intercepted or tunnelled), absolute-form (`GET http://host/...`,
//! forwarded), or origin-form (regcache's own pages, see [`crate::admin`]).
//!
//! hyper answers unparsable requests itself: 400 for a bad request line or
//! header, 431 when the head exceeds [`super::MAX_HEADER_BYTES`]; the
//! connection then closes and the proxy goes on serving others.
//!
//! [`crate::access`] is asked first: a client outside `allow` gets 403 and a
//! closed connection, and with `proxy_users` a request without valid proxy
//! credentials gets 407.

use std::convert::Infallible;
use std::time::Duration;

use http::uri::Scheme;
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{intercept, tunnel, ConnContext};
use crate::access;
use crate::http::body::{self, Body};
use crate::http::error::error_response;
use crate::http::log::{request_target, serve_request, LogNote};
use crate::policy::{decide_connect, decide_plain_http, Decision, PlainHttp};
use crate::registry::hosts::normalize_host;
use crate::serve::mirror::{self, MirrorRequest};
use crate::serve::{self, Origin, Target};
use crate::upstream::{connect_tcp, RelayToSelf};

/// How long a refused client may take to send its request head.
const REFUSED_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves one client connection on the proxy port.
#[tracing::instrument(name = "conn", skip_all, fields(client = %ctx.peer))]
pub async fn serve_client(ctx: ConnContext, stream: TcpStream) {
    let _open = crate::metrics::get().connection();
    let shutdown = ctx.shutdown.clone();
    let client_ip = ctx.peer.ip().to_canonical();
    if !ctx.app.access.nets.allows(client_ip) {
        crate::metrics::get().denied("allow");
        tracing::warn!(%client_ip, "client address not in allow; answering 403 and closing");
        return refuse_client(stream, shutdown).await;
    }
    // A head (and an idle keep-alive) gets client_idle_timeout in all.
    let idle = ctx.app.state.config.client_idle_timeout;
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        let peer = ctx.peer;
        async move { Ok::<_, Infallible>(serve_request(peer, req, |req| route(ctx, req)).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(idle)
        .max_buf_size(super::MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Serves one client connection on the `mirror_tls` port: TLS, then the
/// registry API (mirror and path-prefix forms), `/ca.crt` and `/healthz`.
#[tracing::instrument(name = "mirror", skip_all, fields(client = %ctx.peer))]
pub async fn serve_mirror_tls(ctx: ConnContext, stream: TcpStream, local_name: String) {
    let _open = crate::metrics::get().connection();
    let client_ip = ctx.peer.ip().to_canonical();
    if !ctx.app.access.nets.allows(client_ip) {
        crate::metrics::get().denied("allow");
        tracing::warn!(%client_ip, "client address not in allow; closing");
        return;
    }
    let fixed = ctx.app.mirror_tls.clone();
    // A minted leaf only for regcache's own names, never for any SNI asked.
    let mut own = ctx.app.state.config.mirror_names.clone();
    own.push(local_name.clone());
    let Some(tls) = intercept::accept_tls(&ctx, stream, &own, &local_name, fixed).await else {
        return;
    };
    let service_ctx = ctx.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        let ctx = service_ctx.clone();
        let peer = ctx.peer;
        async move { Ok::<_, Infallible>(serve_request(peer, req, |req| mirror_port(ctx, req)).await) }
    });
    intercept::serve_http(&ctx, tls, service).await;
}

/// Serves one connection on the `metrics_listen` address: `/metrics` and
/// `/healthz` ([`crate::admin::handle_metrics_listen`]), to any client
/// (the address itself is the operator's access rule).
#[tracing::instrument(name = "metrics", skip_all, fields(client = %ctx.peer))]
pub async fn serve_metrics_listen(ctx: ConnContext, stream: TcpStream) {
    let peer = ctx.peer;
    let service = service_fn(move |req: Request<Incoming>| async move {
        Ok::<_, Infallible>(
            serve_request(peer, req, |req| async move {
                crate::admin::handle_metrics_listen(&req).await
            })
            .await,
        )
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ctx.app.state.config.client_idle_timeout)
        .max_buf_size(super::MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = ctx.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "metrics connection ended with an error");
    }
}

/// Answers one request of a client outside `allow` with 403, then closes.
/// The head is read (briefly) so that the client hears the answer.
async fn refuse_client(stream: TcpStream, shutdown: tokio_util::sync::CancellationToken) {
    let service = service_fn(|_req| async { Ok::<_, Infallible>(access::client_refused()) });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REFUSED_READ_TIMEOUT)
        .keep_alive(false)
        .max_buf_size(super::MAX_HEADER_BYTES)
        .serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        _ = tokio::time::timeout(REFUSED_READ_TIMEOUT * 2, conn) => {}
        _ = shutdown.cancelled() => {}
    }
}

async fn route(ctx: ConnContext, mut req: Request<Incoming>) -> Response<Body> {
    // Request bodies forwarded from here (plain-HTTP pass-through included)
    // are cut when the client stops sending.
    req.extensions_mut().insert(serve::ClientIdleTimeout(
        ctx.app.state.config.client_idle_timeout,
    ));
    if let Some(refusal) = authenticate(&ctx, &req).await {
        return refusal;
    }
    if ctx.app.access.users_for(&req).is_some() {
        // authenticate() accepted its Proxy-Authorization.
        req.extensions_mut().insert(access::ProxyUser);
    }
    if req.method() == Method::CONNECT {
        return connect(ctx, req).await;
    }
    if req.uri().scheme().is_some() {
        return absolute_form(ctx, req).await;
    }
    origin_form(ctx, req).await
}

/// Origin-form requests: the registry API (mirror and prefix forms) or
/// regcache's own pages.
async fn origin_form(ctx: ConnContext, req: Request<Incoming>) -> Response<Body> {
    let missing_host = missing_host(&req);
    if mirror::is_registry_path(req.uri().path()) && !missing_host {
        return mirror_mode(ctx, req).await;
    }
    if missing_host {
        error_response(StatusCode::BAD_REQUEST, "missing Host header")
    } else if crate::admin::api::is_api_path(req.uri().path()) {
        crate::admin::api::handle(&ctx.app, ctx.peer, &req).await
    } else {
        crate::admin::handle(&ctx.app, ctx.peer, &req).await
    }
}

/// A request on the `mirror_tls` port: the registry API (mirror and prefix
/// forms), else the few pages served there.
async fn mirror_port(ctx: ConnContext, req: Request<Incoming>) -> Response<Body> {
    if missing_host(&req) {
        error_response(StatusCode::BAD_REQUEST, "missing Host header")
    } else if mirror::is_registry_path(req.uri().path()) {
        mirror_mode(ctx, req).await
    } else {
        crate::admin::handle_mirror_tls(&ctx.app, &req)
    }
}

/// An HTTP/1.1 request without the Host header it must carry.
fn missing_host<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11 && !req.headers().contains_key(http::header::HOST)
}

/// Origin-form `/v2/…`: the registry-mirror and path-prefix endpoints.
async fn mirror_mode(ctx: ConnContext, req: Request<Incoming>) -> Response<Body> {
    match mirror::resolve(&ctx.app.state.config, req.uri()) {
        Ok(MirrorRequest::Upstream { target, path }) => {
            let (mut parts, body) = req.into_parts();
            let mut uri = parts.uri.into_parts();
            uri.path_and_query = Some(path);
            parts.uri = match http::Uri::from_parts(uri) {
                Ok(uri) => uri,
                Err(e) => return error_response(StatusCode::BAD_REQUEST, &e.to_string()),
            };
            let req = Request::from_parts(parts, body);
            serve::handle(&ctx.app.state, &target, req).await
        }
        outcome => {
            let resp = match outcome {
                Ok(_) => mirror::base_response(),
                Err(e) => {
                    tracing::info!(path = %req.uri().path(), error = %e.message, "refused a mirror request");
                    mirror::refusal(&e)
                }
            };
            let note = LogNote {
                host: Some("mirror".into()),
                ..LogNote::default()
            };
            note.on(resp)
        }
    }
}

/// With `proxy_users`, checks the request's `Proxy-Authorization`; returns
/// the 407 answer when it is missing or wrong. The log line names the reason
/// and the request, never the credential.
async fn authenticate(ctx: &ConnContext, req: &Request<Incoming>) -> Option<Response<Body>> {
    let users = ctx.app.access.users_for(req)?;
    let failure = users
        .check(req.headers().get(http::header::PROXY_AUTHORIZATION))
        .await
        .err()?;
    let (host, _) = request_target(req);
    crate::metrics::get().denied("proxy_auth");
    tracing::warn!(reason = %failure, method = %req.method(), host, "proxy authentication refused (407)");
    Some(access::auth_required())
}

/// `CONNECT host:port`: intercept, tunnel or refuse.
async fn connect(ctx: ConnContext, req: Request<Incoming>) -> Response<Body> {
    let target = req
        .uri()
        .authority()
        .map(|a| (a.host().to_string(), a.port_u16()));
    let (host, port) = match target {
        Some((host, Some(port))) if !host.is_empty() => (host, port),
        _ => return error_response(StatusCode::BAD_REQUEST, "CONNECT needs a host:port target"),
    };
    match decide_connect(&ctx.app.state.config, &host, port) {
        Decision::Refuse(refusal) => {
            crate::metrics::get().refused_by_policy(refusal.rule);
            tracing::warn!(
                host,
                port,
                rule = refusal.rule,
                reason = refusal.reason,
                "CONNECT refused"
            );
            error_response(StatusCode::FORBIDDEN, refusal.reason)
        }
        Decision::Intercept => {
            let tasks = ctx.tasks.clone();
            let proxy_user = req.extensions().get::<access::ProxyUser>().copied();
            tasks.spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        intercept::serve_tunnel(ctx, upgraded, host, port, proxy_user).await
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            LogNote::cache("INTERCEPT").on(body_response(StatusCode::OK))
        }
        Decision::PassThrough => {
            let name = normalize_host(&host);
            let upstream = match connect_tcp(ctx.app.state.upstream.dialer(), &name, port).await {
                Ok(stream) => stream,
                Err(e) => {
                    if let Some(own) = RelayToSelf::in_chain(&e) {
                        crate::metrics::get().refused_by_policy(own.refusal.rule);
                        return error_response(StatusCode::FORBIDDEN, own.refusal.reason);
                    }
                    tracing::warn!(host, port, error = %e, "tunnel target unreachable");
                    return error_response(
                        StatusCode::BAD_GATEWAY,
                        &format!("cannot reach {host}:{port}: {e}"),
                    );
                }
            };
            let peer = ctx.peer;
            ctx.tasks.spawn(async move {
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => {
                        tunnel::relay(peer, format!("{host}:{port}"), upgraded, upstream).await
                    }
                    Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
                }
            });
            // The tunnel writes its own line when it closes.
            let note = LogNote {
                discard: true,
                ..LogNote::default()
            };
            note.on(body_response(StatusCode::OK))
        }
    }
}

/// `GET http://host[:port]/path`: an insecure registry is served (and
/// cached under its own `http://host:port` identity); another host is passed
/// through untouched, like a tunnel, or refused; a registry host that is not
/// an insecure registry is refused (see [`crate::policy::decide_plain_http`]).
async fn absolute_form(ctx: ConnContext, req: Request<Incoming>) -> Response<Body> {
    let authority = req.uri().authority().cloned();
    let scheme_ok = req.uri().scheme() == Some(&Scheme::HTTP);
    let (Some(authority), true) = (authority, scheme_ok) else {
        return error_response(
            StatusCode::BAD_REQUEST,
            "absolute-form requests must be http://host/...; use CONNECT for https",
        );
    };
    let port = authority.port_u16().unwrap_or(80);
    match decide_plain_http(&ctx.app.state.config, authority.host(), port) {
        PlainHttp::Refuse(refusal) => {
            crate::metrics::get().refused_by_policy(refusal.rule);
            tracing::warn!(host = %authority, rule = refusal.rule, reason = refusal.reason, "plain HTTP request refused (403)");
            error_response(StatusCode::FORBIDDEN, &refusal.to_string())
        }
        PlainHttp::InsecureRegistry => match Origin::http(authority.host(), port) {
            Ok(origin) => serve::handle(&ctx.app.state, &Target::new(origin), req).await,
            Err(e) => error_response(StatusCode::BAD_REQUEST, &e.to_string()),
        },
        PlainHttp::PassThrough => {
            let origin = Origin {
                scheme: Scheme::HTTP,
                authority,
            };
            serve::forward(&ctx.app.state.upstream.plain(), &origin, req).await
        }
    }
}

fn body_response(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = status;
    resp
}
