//! HTTP/1.1 request heads and the responses shardgate writes: the WebSocket upgrade
//! (RFC 6455 section 4), the JSON errors of the Engine.IO server and the plain responses of
//! the operations endpoints (`/healthz`, `/readyz`, `/metrics`).
//!
//! Owns parsing of one request head. Never reads a body: shardgate accepts no request
//! bodies, so any request that announces one is answered and closed.

use std::fmt::Write as _;

/// Largest request head accepted, in bytes. Browsers send well under 2 KiB.
pub const MAX_HEAD: usize = 8 * 1024;
const MAX_HEADERS: usize = 48;

/// Why a request head was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HttpError {
    /// The head is not valid HTTP/1.x.
    #[error("malformed request head: {0}")]
    Malformed(String),
    /// The head grew past [`MAX_HEAD`] without ending.
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
}

/// The parts of a request head that shardgate routes on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method, e.g. `GET`.
    pub method: String,
    /// Path without the query string, e.g. `/socket.io/`.
    pub path: String,
    /// Decoded query parameters in order of appearance.
    pub query: Vec<(String, String)>,
    /// `Upgrade: websocket` was present.
    pub upgrade_websocket: bool,
    /// `Connection` header lists `upgrade`.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// Token from `Authorization: Bearer <token>`.
    pub bearer: Option<String>,
    /// `Content-Length` or `Transfer-Encoding` announced a body.
    pub has_body: bool,
    /// `Content-Length`, when present and valid.
    pub content_length: Option<usize>,
    /// A `Content-Length` that is not a number, or two that disagree.
    pub bad_length: bool,
    /// `Transfer-Encoding` was given (chunked bodies are not served).
    pub chunked: bool,
    /// The connection may carry another request after this one (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// `Origin` (browsers send it on cross-origin requests and on POSTs).
    pub origin: Option<String>,
}

impl Request {
    /// First value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The request asks for a WebSocket upgrade (RFC 6455 4.2.1).
    pub fn is_websocket_upgrade(&self) -> bool {
        self.upgrade_websocket && self.connection_upgrade && self.ws_key.is_some()
    }
}

/// Parses one request head from `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, or the request and the length of the head
/// (bytes after it belong to the next protocol layer).
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            return if buf.len() >= MAX_HEAD { Err(HttpError::TooLarge) } else { Ok(None) };
        }
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    };
    if head_len > MAX_HEAD {
        return Err(HttpError::TooLarge);
    }
    let target = req.path.unwrap_or("/");
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, parse_query(q)),
        None => (target, Vec::new()),
    };
    let mut out = Request {
        method: req.method.unwrap_or("").to_string(),
        path: path.to_string(),
        query,
        keep_alive: req.version == Some(1),
        ..Request::default()
    };
    for h in req.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket |= value.eq_ignore_ascii_case("websocket");
        } else if h.name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("upgrade") {
                    out.connection_upgrade = true;
                } else if token.eq_ignore_ascii_case("close") {
                    out.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    out.keep_alive = true;
                }
            }
        } else if h.name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("authorization") {
            let mut parts = value.splitn(2, ' ');
            if let (Some(scheme), Some(token)) = (parts.next(), parts.next()) {
                if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() {
                    out.bearer = Some(token.trim().to_string());
                }
            }
        } else if h.name.eq_ignore_ascii_case("content-length") {
            out.has_body |= value != "0";
            match value.parse::<usize>() {
                Ok(n) if out.content_length.is_none_or(|m| m == n) => out.content_length = Some(n),
                _ => out.bad_length = true,
            }
        } else if h.name.eq_ignore_ascii_case("origin") {
            out.origin = Some(value.to_string());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            out.has_body = true;
            out.chunked = true;
        }
    }
    Ok(Some((out, head_len)))
}

/// Splits and percent-decodes a query string (`a=1&b=x%20y`).
pub fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(kv), String::new()),
        })
        .collect()
}

/// Percent-decodes `s` (`+` becomes a space); invalid escapes are kept as written.
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The `101 Switching Protocols` response for a request carrying `ws_key`.
pub fn upgrade_response(ws_key: &str) -> Vec<u8> {
    let accept = tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
    )
    .into_bytes()
}

/// A complete response with a body; the connection is closed after it.
pub fn response(status: u16, content_type: &str, body: &str) -> Vec<u8> {
    response_bytes(status, content_type, body.as_bytes(), false)
}

/// A complete response with `body`; `keep_alive` leaves the connection open for the
/// client's next request (HTTP/1.1 persistent connection), otherwise it says
/// `Connection: close`.
pub fn response_bytes(status: u16, content_type: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    with_body(status, content_type, "no-store", body, keep_alive)
}

/// The one place a response head is written: status, type, length, cache policy and,
/// unless kept alive, `Connection: close`; then `body`.
fn with_body(status: u16, content_type: &str, cache: &str, body: &[u8], keep_alive: bool) -> Vec<u8> {
    let mut head = String::with_capacity(160);
    let _ = write!(
        head,
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nCache-Control: {cache}\r\n{}\r\n",
        reason_phrase(status),
        body.len(),
        if keep_alive { "" } else { "Connection: close\r\n" },
    );
    let mut out = head.into_bytes();
    out.reserve_exact(body.len());
    out.extend_from_slice(body);
    out
}

/// An Engine.IO server error as the reference server sends it: HTTP 400 with
/// `{"code":N,"message":"..."}`, plus a `detail` that tells the operator what to change.
pub fn engineio_error(code: u8, message: &str, detail: &str) -> Vec<u8> {
    engineio_error_with(400, code, message, detail)
}

/// `resp` (a complete response) with `lines` (each ending in CRLF) added to its head.
pub fn with_headers(mut resp: Vec<u8>, lines: &str) -> Vec<u8> {
    if let Some(end) = resp.windows(2).position(|w| w == b"\r\n") {
        resp.splice(end + 2..end + 2, lines.bytes());
    }
    resp
}

/// A static asset: cacheable for a day, then the connection closes.
pub fn static_response(content_type: &str, body: &[u8]) -> Vec<u8> {
    with_body(200, content_type, "public, max-age=86400", body, false)
}

/// Like [`engineio_error`] with another HTTP status (411, 413: the POST body's length).
pub fn engineio_error_with(status: u16, code: u8, message: &str, detail: &str) -> Vec<u8> {
    let body = serde_json::json!({ "code": code, "message": message, "detail": detail });
    response(status, "application/json", &body.to_string())
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /socket.io/?EIO=4&transport=websocket&token=a%2Eb HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer tok\r\n\r\nrest";

    #[test]
    fn parses_upgrade_head() {
        let (req, n) = parse_request(UPGRADE).unwrap().unwrap();
        assert_eq!(&UPGRADE[n..], b"rest");
        assert_eq!(req.path, "/socket.io/");
        assert_eq!(req.query_param("EIO"), Some("4"));
        assert_eq!(req.query_param("transport"), Some("websocket"));
        assert_eq!(req.query_param("token"), Some("a.b"));
        assert_eq!(req.bearer.as_deref(), Some("tok"));
        assert!(req.is_websocket_upgrade());
    }

    #[test]
    fn partial_head_needs_more() {
        assert_eq!(parse_request(&UPGRADE[..40]).unwrap(), None);
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD + 10, b'a');
        assert_eq!(parse_request(&big), Err(HttpError::TooLarge));
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(parse_request(b"\x16\x03\x01 hello\r\n\r\n"), Err(HttpError::Malformed(_))));
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let r = String::from_utf8(upgrade_response("dGhlIHNhbXBsZSBub25jZQ==")).unwrap();
        assert!(r.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn percent_decoding_keeps_bad_escapes() {
        assert_eq!(percent_decode("a%20b+c%zz%4"), "a b c%zz%4");
        assert_eq!(percent_decode("%"), "%");
    }

    #[test]
    fn error_body_is_json() {
        let r = String::from_utf8(engineio_error(0, "Transport unknown", "d")).unwrap();
        assert!(r.starts_with("HTTP/1.1 400 Bad Request\r\n"));
        let body = r.split("\r\n\r\n").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["code"], 0);
    }

    #[test]
    fn persistence_and_body_length() {
        let head = |h: &str| parse_request(h.as_bytes()).unwrap().unwrap().0;
        let r = head("POST /socket.io/?EIO=4 HTTP/1.1\r\nContent-Length: 12\r\n\r\n");
        assert!(r.keep_alive && r.has_body && !r.bad_length);
        assert_eq!(r.content_length, Some(12));
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!head("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").keep_alive);
        assert!(head("POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").bad_length);
        assert!(head("POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").bad_length);
        assert!(head("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").chunked);
    }

    #[test]
    fn persistent_responses_omit_connection_close() {
        let keep = String::from_utf8(response_bytes(200, "text/plain", b"ok", true)).unwrap();
        assert!(!keep.contains("Connection: close") && keep.ends_with("\r\n\r\nok"));
        assert!(String::from_utf8(response_bytes(200, "text/plain", b"", false))
            .unwrap()
            .contains("Connection: close"));
    }

    #[test]
    fn headers_are_added_after_the_status_line() {
        let r = with_headers(response(200, "text/plain", "ok"), "Vary: Origin\r\n");
        let r = String::from_utf8(r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\nVary: Origin\r\nContent-Type: text/plain\r\n"), "{r}");
        assert!(r.ends_with("\r\n\r\nok"));
        let (req, _) =
            parse_request(b"GET / HTTP/1.1\r\nOrigin: https://app.example\r\n\r\n").unwrap().unwrap();
        assert_eq!(req.origin.as_deref(), Some("https://app.example"));
    }
}
