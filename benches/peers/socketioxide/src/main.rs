//! A minimal socketioxide server speaking shardgate's chat events, so the load generator
//! can measure it side by side with shardgate (benches/peers/compare.sh).
//!
//!   PORT=3000 JWT_SECRET=... WORKERS=1 ./target/release/shardgate-peer-socketioxide
//!
//! Clients authenticate with an HS256 JWT in the CONNECT auth payload (`{token}`); `sub`
//! is the user and `tenantId` the tenant. Events, as in shardgate:
//!   join_room "room" | {room}           -> ack {ok, room}
//!   message:send {to | room, content, clientMsgId?}
//!       -> recipients (the user's sockets, or the room's members but the sender) get
//!          message:new {id, from, to | room, content, ts}; ack {id, clientMsgId, status}
//! WebSocket transport only; `WORKERS` tokio worker threads (the cores it is given).

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::{json, Value};
use socketioxide::extract::{AckSender, Data, SocketRef};
use socketioxide::handler::ConnectHandler;
use socketioxide::{SocketIo, TransportType};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Deserialize)]
struct Claims {
    sub: String,
    #[serde(rename = "tenantId")]
    tenant_id: String,
}

#[derive(Clone)]
struct Identity {
    user: String,
    tenant: String,
}

#[derive(Clone)]
struct Keys(std::sync::Arc<(DecodingKey, Validation)>);

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

async fn authenticate(s: SocketRef, Data(auth): Data<Value>) -> Result<(), String> {
    let keys = s.req_parts().extensions.get::<Keys>().cloned().ok_or("no keys")?;
    let token = auth.get("token").and_then(Value::as_str).ok_or("unauthorized")?;
    let claims = decode::<Claims>(token, &keys.0 .0, &keys.0 .1).map_err(|_| "unauthorized")?.claims;
    s.extensions.insert(Identity { user: claims.sub, tenant: claims.tenant_id });
    Ok(())
}

async fn on_connect(s: SocketRef, io: SocketIo) {
    let Some(me) = s.extensions.get::<Identity>() else {
        let _ = s.disconnect();
        return;
    };
    s.join(format!("u:{}:{}", me.tenant, me.user));

    let tenant = me.tenant.clone();
    s.on("join_room", async move |s: SocketRef, Data(arg): Data<Value>, ack: AckSender| {
        let room = match &arg {
            Value::String(r) => Some(r.clone()),
            v => v.get("room").and_then(Value::as_str).map(str::to_string),
        };
        match room.filter(|r| !r.is_empty()) {
            Some(room) => {
                s.join(format!("r:{tenant}:{room}"));
                let _ = ack.send(&json!({ "ok": true, "room": room }));
            }
            None => {
                let _ = ack.send(&json!({ "ok": false, "error": "invalid_room" }));
            }
        }
    });

    s.on("message:send", async move |s: SocketRef, Data(body): Data<Value>, ack: AckSender| {
        let content = match body.get("content") {
            Some(c) if !c.is_null() => c.clone(),
            _ => {
                let _ = ack.send(&json!({ "error": "invalid_message" }));
                return;
            }
        };
        let id = uuid::Uuid::new_v4().to_string();
        let client_msg_id = body.get("clientMsgId").cloned().unwrap_or(Value::Null);
        let (from, tenant) = (&me.user, &me.tenant);
        if let Some(room) = body.get("room").and_then(Value::as_str) {
            let key = format!("r:{tenant}:{room}");
            if !s.rooms().iter().any(|r| *r == key) {
                let _ = ack.send(&json!({ "error": "not_in_room" }));
                return;
            }
            let msg = json!({ "id": id, "from": from, "room": room, "content": content, "ts": wall_ms() });
            let _ = s.to(key).emit("message:new", &msg).await;
            let _ = ack.send(&json!({ "id": id, "clientMsgId": client_msg_id, "status": "sent" }));
        } else if let Some(to) = body.get("to").and_then(Value::as_str) {
            let msg = json!({ "id": id, "from": from, "to": to, "content": content, "ts": wall_ms() });
            let _ = io.to(format!("u:{tenant}:{to}")).emit("message:new", &msg).await;
            let _ = ack.send(&json!({ "id": id, "clientMsgId": client_msg_id, "status": "delivered" }));
        } else {
            let _ = ack.send(&json!({ "error": "invalid_message" }));
        }
    });
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let secret = std::env::var("JWT_SECRET")
        .unwrap_or_else(|_| "shardgate-dev-secret-do-not-use-in-production".to_string());
    let workers: usize = std::env::var("WORKERS").ok().and_then(|w| w.parse().ok()).unwrap_or(1).max(1);
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    let keys = Keys(std::sync::Arc::new((DecodingKey::from_secret(secret.as_bytes()), validation)));

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    rt.block_on(async move {
        let (layer, io) = SocketIo::builder().transports([TransportType::Websocket]).build_layer();
        io.ns("/", on_connect.with(authenticate));
        let app = axum::Router::new().layer(layer).layer(axum::Extension(keys));
        // PORT=0 takes a free port; the line below says which.
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        println!("socketioxide peer on {} with {workers} worker thread(s)", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}
