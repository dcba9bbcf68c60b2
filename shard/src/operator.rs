//! The operator endpoints: `/healthz`, `/readyz`, `/metrics` and `POST /admin/drain`.
//!
//! They are served on the public port, or, with `admin_listen` set, only on that internal
//! address (health and readiness stay on the public port too, for load balancers), so
//! clients on the public port cannot read the metrics or reach the admin endpoints. The
//! admin listener is accepted by shard 0, one request per connection.

use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use glommio::net::{TcpListener, TcpStream};
use shardgate_io::http::{self, Request};
use tracing::{info, warn};

use crate::ids::constant_time_eq;
use crate::local::Shard;
use crate::metrics::Counter;
use crate::wire::{self, HeadError};

/// The answer to an operator request, or `None` for any other path. `public`: the request
/// came to the public port.
pub(crate) fn response(shard: &Shard, req: &Request, public: bool) -> Option<Vec<u8>> {
    let shared = &shard.shared;
    let hidden = public && shared.admin_listen.is_some();
    Some(match req.path.as_str() {
        "/healthz" => http::response(200, "text/plain", "ok\n"),
        "/readyz" => {
            if shared.ready.load(Ordering::Relaxed) {
                http::response(200, "text/plain", "ready\n")
            } else {
                http::response(503, "text/plain", "not ready\n")
            }
        }
        "/metrics" | "/admin/drain" if hidden => http::response(
            404,
            "text/plain",
            "not found: operator endpoints are served on the admin address\n",
        ),
        "/metrics" => {
            let mut body = String::with_capacity(8192);
            crate::metrics::render(&shared.metrics, shared.mesh.len(), &mut body);
            body.push_str(&shared.static_metrics);
            http::response(200, "text/plain; version=0.0.4", &body)
        }
        "/admin/drain" => admin_drain(shard, req),
        _ => return None,
    })
}

/// Accepts operator connections on the admin address until cancelled.
pub(crate) async fn admin_loop(shard: Rc<Shard>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(serve_admin(shard.clone(), stream)).detach();
            }
            Err(e) => {
                warn!("admin accept failed: {e}");
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve_admin(shard: Rc<Shard>, mut stream: TcpStream) {
    let timeout = Duration::from_millis(shard.shared.config.handshake_timeout_ms);
    let mut buf = Vec::new();
    let resp = match wire::read_head(&shard, &mut stream, &mut buf, timeout).await {
        Ok((req, _)) => response(&shard, &req, false).unwrap_or_else(|| {
            http::response(404, "text/plain", "not found: /healthz /readyz /metrics /admin/drain\n")
        }),
        Err(HeadError::Bad(resp)) => resp,
        Err(_) => return,
    };
    shard.metrics().inc(Counter::HttpRequests);
    let _ = wire::write_all(&mut stream, &resp).await;
}

/// `POST /admin/drain` with `Authorization: Bearer <admin.token>`: the same drain as
/// SIGTERM (the process signals itself; the main thread runs the drain and exits).
fn admin_drain(shard: &Shard, req: &Request) -> Vec<u8> {
    let json = "application/json";
    let Some(token) = shard.shared.admin_token.as_deref() else {
        let body = "{\"code\":403,\"message\":\"admin endpoints are disabled: set admin.token\"}";
        return http::response(403, json, body);
    };
    if req.method != "POST" {
        return http::response(405, json, "{\"code\":405,\"message\":\"use POST\"}");
    }
    let given = req.bearer.as_deref().unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
        shard.metrics().inc(Counter::AuthFailures);
        let body = "{\"code\":401,\"message\":\"Authorization: Bearer <admin.token> required\"}";
        return http::response(401, json, body);
    }
    if !shard.shared.closing() {
        info!(shard = shard.id, "drain requested through /admin/drain");
        // SAFETY: kill(2) on this process; the main thread waits for SIGTERM with sigwait.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGTERM);
        }
    }
    http::response(202, json, "{\"draining\":true}")
}
