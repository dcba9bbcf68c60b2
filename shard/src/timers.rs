//! The shard's timer scan, run every tick by the shard's tick task: Engine.IO pings,
//! pong and connect timeouts, forced closes of stuck flushes, typing expiry and
//! delivery-report expiry, the retirement of closed long-polling sessions that no
//! request holds, and the request to park for WebSocket tasks whose client said nothing
//! since the last tick (`websocket.rs`). One pass over the shard's connections per tick.

use crate::metrics::{CloseReason, Counter};
use crate::msg::DeliveryStatus;
use crate::session::stop_typing;
use crate::state::State;

/// One pass of the timer scan at shard time `now`; returns the number of pings queued.
pub(crate) fn tick(st: &mut State, now: u64) -> usize {
    let (interval, timeout) = (st.shared.config.ping_interval_ms, st.shared.config.ping_timeout_ms);
    let ping = st.ping.clone();
    let mut closes = Vec::new();
    let mut typing_expired = Vec::new();
    let mut retire = Vec::new();
    let mut pings = Vec::new();
    for (id, c) in st.conns.iter_mut() {
        if let Some(reason) = c.close {
            // A long-polling session no GET holds has nobody else to retire it.
            if c.detached() {
                retire.push((id, reason));
                continue;
            }
            if now >= c.close_by && !c.close_now {
                c.close_now = true;
                c.wake();
            }
            continue;
        }
        if c.connect_deadline != 0 && now >= c.connect_deadline {
            closes.push((id, CloseReason::ConnectTimeout));
            continue;
        }
        if c.pong_deadline != 0 && now >= c.pong_deadline {
            closes.push((id, CloseReason::PingTimeout));
            continue;
        }
        if now >= c.next_ping && c.pong_deadline == 0 {
            c.next_ping = now + interval;
            c.pong_deadline = now + timeout;
            pings.push(id);
        }
        // A WebSocket task whose client said nothing for a whole tick parks (`websocket.rs`).
        if c.is_websocket() && !c.parked && !std::mem::take(&mut c.heard) && !c.park {
            c.park = true;
            c.wake();
        }
        if let Some(s) = c.session.as_ref() {
            for (room, until) in &s.typing {
                if now >= *until {
                    typing_expired.push((id, room.clone()));
                }
            }
        }
    }
    let pinged = pings.len();
    for id in pings {
        st.conns.push_unbounded(id, &ping);
    }
    for (id, reason) in closes {
        crate::polling::close(st, id, reason, true, now);
    }
    for (id, reason) in retire {
        crate::session::retire(st, id, reason, now);
    }
    for (id, room) in typing_expired {
        stop_typing(st, id, &room);
    }
    for msg_id in st.pending.expired(now) {
        st.metrics().inc(Counter::ReportTimeouts);
        st.resolve(msg_id, DeliveryStatus::Sent);
    }
    pinged
}
