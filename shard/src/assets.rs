//! What a node serves to browsers: the official Socket.IO client bundle at the path the
//! reference server uses (`/socket.io/socket.io.min.js`, vendored from the pinned npm
//! package socket.io-client 4.8.3, its MIT licence at `/socket.io/LICENSE`), the demo chat
//! page (`/demo`), and, on a development node only, tokens for it (`/demo/token`).
//!
//! Development tokens are minted only while the node runs on the built-in development
//! secret, which the configuration allows on loopback listeners only: a node with a real
//! secret or key never mints anything.

use shardgate_io::http::{self, Request};

use crate::auth::{mint_hs256, Claims};
use crate::shared::Shared;

const CLIENT_JS: &[u8] = include_bytes!("../assets/socket.io.min.js");
const CLIENT_LICENSE: &[u8] = include_bytes!("../assets/socket.io-client.LICENSE");
const DEMO_HTML: &[u8] = include_bytes!("../assets/demo.html");

/// Lifetime of a development token.
const DEV_TOKEN_SECS: u64 = 3600;

/// The answer for `req` if its path is one of the browser assets.
pub(crate) fn response(shared: &Shared, req: &Request) -> Option<Vec<u8>> {
    Some(match req.path.as_str() {
        "/socket.io/socket.io.min.js" => {
            http::static_response("application/javascript; charset=utf-8", CLIENT_JS)
        }
        "/socket.io/LICENSE" => http::static_response("text/plain; charset=utf-8", CLIENT_LICENSE),
        "/demo" | "/demo/" => http::static_response("text/html; charset=utf-8", DEMO_HTML),
        "/demo/token" => dev_token(shared, req),
        _ => return None,
    })
}

fn dev_token(shared: &Shared, req: &Request) -> Vec<u8> {
    let json = "application/json";
    let Some(secret) = shared.dev_secret.as_deref() else {
        let body = "{\"code\":403,\"message\":\"development tokens are only served by a node on the built-in development secret (loopback); paste a token from your identity provider\"}";
        return http::response(403, json, body);
    };
    let max = shared.config.max_id_len;
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= max
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    };
    let sub = req.query_param("sub").unwrap_or_default();
    let tenant = req.query_param("tenant").unwrap_or("demo");
    if !valid(sub) || !valid(tenant) {
        let body = format!(
            "{{\"code\":400,\"message\":\"sub and tenant must be 1 to {max} of A-Z a-z 0-9 - _ . @\"}}"
        );
        return http::response(400, json, &body);
    }
    let claims = Claims {
        sub: sub.to_string(),
        tenant_id: tenant.to_string(),
        permissions: None,
        exp: crate::shared::wall_ms() / 1000 + DEV_TOKEN_SECS,
    };
    let body =
        serde_json::json!({ "token": mint_hs256(secret.as_bytes(), &claims), "expiresIn": DEV_TOKEN_SECS });
    http::response(200, json, &body.to_string())
}
