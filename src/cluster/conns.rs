//! The Redis connections of one connected session of the bridge, on a single Redis or
//! on a Redis Cluster (`docs/redis-cluster.md`); the rest of the bridge does not know
//! which.
//!
//! * **Single Redis**: one command connection carrying every pipelined batch, one pub/sub
//!   connection.
//! * **Redis Cluster** (the server named by `--redis` says `cluster_enabled:1`): the slot
//!   map from `CLUSTER SLOTS`, one command connection per master; a batch is split by
//!   the slot of each command's key, written to every master at once, and its replies
//!   put back in the batch's order. `MOVED` refreshes the map and sends the command to
//!   the new owner, `ASK` sends it once to the named node after `ASKING`, `TRYAGAIN` (a
//!   script's keys split by a slot migration) sends it again shortly. Channels with
//!   a hash tag (`server:{S}`, `room:{T:R}`) are sharded (`SSUBSCRIBE` on a connection to
//!   the master owning their slot); the others are classic, on one connection. When a
//!   slot moves, Redis unsubscribes its channels (`sunsubscribe`): they are subscribed
//!   again at the new owner.
//!
//! Any connection failing ends the session: the bridge reconnects (trying the configured
//! address, then every node of the last map), registers everything again and
//! resubscribes, as after a Redis restart.

use std::collections::HashMap;
use std::task::{Context, Poll};
use std::time::Duration;

use shardgate_io::resp::{self, Reply};

use super::batch::Batch;
use super::redis::RedisConn;
use super::scripts;
use crate::config::RedisUrl;

/// Slots of a Redis Cluster.
const SLOTS: usize = 16384;
/// Redirections (and `TRYAGAIN` retries) for one command before its error is its reply.
const MAX_REDIRECTS: usize = 6;
/// First wait before a command answered `TRYAGAIN` is sent again, doubled each time
/// (at most about 0.6 s in all: the bridge waits, a slot migration is rare and short).
const TRYAGAIN_DELAY: Duration = Duration::from_millis(10);

fn other(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// `host:port` of `url`.
fn addr_of(url: &RedisUrl) -> String {
    format!("{}:{}", url.host, url.port)
}

/// `url` pointed at `addr` (`host:port`), keeping its credentials.
fn at(url: &RedisUrl, addr: &str) -> std::io::Result<RedisUrl> {
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| other(format!("bad node address {addr}")))?;
    let port = port.parse().map_err(|_| other(format!("bad node address {addr}")))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    Ok(RedisUrl { host, port, ..url.clone() })
}

/// A command connection to `url`, with every script of `scripts::ALL` loaded (a failed
/// load is answered later by `NOSCRIPT` and the script sent as `EVAL`).
async fn command_conn(url: &RedisUrl, timeout: Duration) -> std::io::Result<RedisConn> {
    let mut conn = RedisConn::connect(url, timeout).await?;
    load_scripts(&mut conn).await?;
    Ok(conn)
}

async fn load_scripts(conn: &mut RedisConn) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for script in scripts::ALL {
        resp::encode_command(&["SCRIPT", "LOAD", script], &mut buf);
    }
    conn.write(&buf).await?;
    for _ in scripts::ALL {
        if let Reply::Error(e) = conn.read_reply().await? {
            tracing::warn!("SCRIPT LOAD refused: {e}");
        }
    }
    Ok(())
}

/// `EVALSHA sha ...` (as encoded in a batch) as `EVAL text ...`.
fn as_eval(command: &[u8]) -> Option<Vec<u8>> {
    let (Reply::Array(args), _) = resp::decode_reply(command).ok()?? else { return None };
    let mut args: Vec<Vec<u8>> =
        args.iter().map(|a| resp::as_bytes(a).map(<[u8]>::to_vec)).collect::<Option<_>>()?;
    if args.first().map(Vec::as_slice) != Some(b"EVALSHA") {
        return None;
    }
    args[0] = b"EVAL".to_vec();
    args[1] = scripts::text_of(&args[1])?.as_bytes().to_vec();
    let mut out = Vec::new();
    resp::encode_command(&args, &mut out);
    Some(out)
}

fn is_tryagain(r: &Reply) -> bool {
    matches!(r, Reply::Error(e) if e.starts_with("TRYAGAIN"))
}

fn is_noscript(r: &Reply) -> bool {
    matches!(r, Reply::Error(e) if e.starts_with("NOSCRIPT"))
}

/// A bulk or simple string reply as text.
fn text(r: &Reply) -> Option<&str> {
    resp::as_bytes(r).and_then(|b| std::str::from_utf8(b).ok())
}

/// A Redis Cluster's slot map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Master addresses (`host:port`).
    pub masters: Vec<String>,
    /// slot -> index in `masters`.
    owner: Vec<u16>,
    /// Every node of the map, replicas included (where to reconnect after a failure).
    pub nodes: Vec<String>,
}

impl SlotMap {
    /// Parses a `CLUSTER SLOTS` reply; `asked` is the node that answered (a node may
    /// list itself without an address). Every slot must be served.
    pub fn parse(reply: &Reply, asked: &str) -> Result<SlotMap, String> {
        let Reply::Array(ranges) = reply else { return Err(format!("CLUSTER SLOTS: unexpected {reply:?}")) };
        let mut map = SlotMap { masters: Vec::new(), owner: vec![u16::MAX; SLOTS], nodes: Vec::new() };
        for range in ranges {
            let Reply::Array(r) = range else { return Err("CLUSTER SLOTS: a range is not an array".into()) };
            let (Some(Reply::Integer(from)), Some(Reply::Integer(to))) = (r.first(), r.get(1)) else {
                return Err("CLUSTER SLOTS: a range without bounds".into());
            };
            let mut addrs = r[2..].iter().filter_map(|node| {
                let Reply::Array(n) = node else { return None };
                let host = n.first().and_then(text).filter(|h| !h.is_empty() && *h != "?");
                let Some(Reply::Integer(port)) = n.get(1) else { return None };
                Some(match host {
                    Some(h) if h.contains(':') => format!("[{h}]:{port}"),
                    Some(h) => format!("{h}:{port}"),
                    None => asked.to_string(),
                })
            });
            let master = addrs.next().ok_or("CLUSTER SLOTS: a range without a master")?;
            for a in std::iter::once(master.clone()).chain(addrs) {
                if !map.nodes.contains(&a) {
                    map.nodes.push(a);
                }
            }
            let idx = match map.masters.iter().position(|m| *m == master) {
                Some(i) => i,
                None => {
                    map.masters.push(master);
                    map.masters.len() - 1
                }
            };
            let (from, to) = (*from as usize, *to as usize);
            if from > to || to >= SLOTS {
                return Err(format!("CLUSTER SLOTS: bad range {from}-{to}"));
            }
            map.owner[from..=to].fill(idx as u16);
        }
        if let Some(slot) = map.owner.iter().position(|o| *o == u16::MAX) {
            return Err(format!("slot {slot} has no master (is the cluster complete?)"));
        }
        Ok(map)
    }

    /// The master serving `slot`.
    pub fn master(&self, slot: u16) -> &str {
        &self.masters[self.owner[slot as usize % SLOTS] as usize]
    }
}

/// The connections of one session (see the module doc).
pub struct Conns {
    url: RedisUrl,
    timeout: Duration,
    /// The slot map, on a Redis Cluster.
    map: Option<SlotMap>,
    /// Command connections by address: the one Redis, or the masters met so far.
    cmd: Vec<(String, RedisConn)>,
    /// The classic pub/sub connection (every channel on a single Redis).
    sub: RedisConn,
    /// Sharded pub/sub connections by master address.
    ssub: Vec<(String, RedisConn)>,
    /// Sharded channels subscribed, with the address they are subscribed at.
    sharded: HashMap<String, String>,
    /// Sharded channels Redis unsubscribed because their slot moved.
    moved: Vec<String>,
    /// Commands sent again after `MOVED`, `ASK` or `TRYAGAIN`, since the last look.
    pub redirects: u64,
    /// Channels subscribed again after their slot moved, since the last look.
    pub resubscribes: u64,
}

impl Conns {
    /// Connects to the configured Redis, or the first of `known` that answers; on a
    /// Redis Cluster, to every master of its slot map.
    pub async fn open(url: &RedisUrl, known: &[String], timeout: Duration) -> std::io::Result<Conns> {
        let mut first = None;
        let mut last_err = None;
        let configured = addr_of(url);
        for addr in std::iter::once(&configured).chain(known.iter().filter(|a| **a != configured)) {
            match RedisConn::connect(&at(url, addr)?, timeout).await {
                Ok(conn) => {
                    first = Some((addr.clone(), conn));
                    break;
                }
                Err(e) => last_err = Some(e),
            }
        }
        let Some((addr, mut conn)) = first else {
            return Err(last_err.unwrap_or_else(|| other("no Redis address")));
        };
        let info = conn.call(&["INFO", "cluster"]).await?;
        let cluster = text(&info).is_some_and(|i| i.contains("cluster_enabled:1"));
        if !cluster {
            load_scripts(&mut conn).await?;
            let sub = RedisConn::connect(&at(url, &addr)?, timeout).await?;
            return Ok(Conns {
                url: url.clone(),
                timeout,
                map: None,
                cmd: vec![(addr, conn)],
                sub,
                ssub: Vec::new(),
                sharded: HashMap::new(),
                moved: Vec::new(),
                redirects: 0,
                resubscribes: 0,
            });
        }
        if url.db != 0 {
            return Err(other("a Redis Cluster has database 0 only: drop the database from --redis"));
        }
        let state = conn.call(&["CLUSTER", "INFO"]).await?;
        if !text(&state).is_some_and(|s| s.contains("cluster_state:ok")) {
            return Err(other(format!(
                "the Redis Cluster at {addr} is not serving (cluster_state is not ok)"
            )));
        }
        let map = SlotMap::parse(&conn.call(&["CLUSTER", "SLOTS"]).await?, &addr).map_err(other)?;
        load_scripts(&mut conn).await?;
        let sub_at = map.masters[0].clone();
        let mut conns = Conns {
            url: url.clone(),
            timeout,
            map: Some(map),
            cmd: vec![(addr, conn)],
            sub: RedisConn::connect(&at(url, &sub_at)?, timeout).await?,
            ssub: Vec::new(),
            sharded: HashMap::new(),
            moved: Vec::new(),
            redirects: 0,
            resubscribes: 0,
        };
        let masters = conns.map.as_ref().map(|m| m.masters.clone()).unwrap_or_default();
        for m in &masters {
            conns.cmd_conn(m).await?;
        }
        Ok(conns)
    }

    /// The slot map, on a Redis Cluster.
    pub fn map(&self) -> Option<&SlotMap> {
        self.map.as_ref()
    }

    /// Whether `channel` is a sharded channel here (a hash-tagged channel on a cluster).
    pub fn is_sharded(&self, channel: &str) -> bool {
        self.map.is_some() && channel.contains('{')
    }

    /// Index of the command connection to `addr`, connecting if needed.
    async fn cmd_conn(&mut self, addr: &str) -> std::io::Result<usize> {
        if let Some(i) = self.cmd.iter().position(|(a, _)| a == addr) {
            return Ok(i);
        }
        let conn = command_conn(&at(&self.url, addr)?, self.timeout).await?;
        self.cmd.push((addr.to_string(), conn));
        Ok(self.cmd.len() - 1)
    }

    /// Index of the sharded pub/sub connection to `addr`, connecting if needed.
    async fn ssub_conn(&mut self, addr: &str) -> std::io::Result<usize> {
        if let Some(i) = self.ssub.iter().position(|(a, _)| a == addr) {
            return Ok(i);
        }
        let conn = RedisConn::connect(&at(&self.url, addr)?, self.timeout).await?;
        self.ssub.push((addr.to_string(), conn));
        Ok(self.ssub.len() - 1)
    }

    /// Reads the slot map again.
    async fn refresh(&mut self) -> std::io::Result<()> {
        let (addr, conn) = &mut self.cmd[0];
        let reply = conn.call(&["CLUSTER", "SLOTS"]).await?;
        self.map = Some(SlotMap::parse(&reply, addr).map_err(other)?);
        Ok(())
    }

    /// Runs `batch`: every command's reply, in the batch's order.
    pub async fn exec(&mut self, batch: &Batch) -> std::io::Result<Vec<Reply>> {
        let n = batch.then.len();
        let Some(map) = &self.map else {
            let conn = &mut self.cmd[0].1;
            conn.write(&batch.buf).await?;
            let mut replies = Vec::with_capacity(n);
            for _ in 0..n {
                replies.push(conn.read_reply().await?);
            }
            let addr = &self.cmd[0].0;
            let retry: Vec<(usize, String)> =
                (0..n).filter(|&i| is_noscript(&replies[i])).map(|i| (i, addr.clone())).collect();
            self.noscript(batch, &mut replies, retry).await?;
            return Ok(replies);
        };
        let mut groups: Vec<(String, bool, Vec<usize>)> = Vec::new();
        for i in 0..n {
            let addr = match batch.slots[i] {
                Some(slot) => map.master(slot),
                None => &map.masters[0],
            };
            match groups.iter_mut().find(|(a, _, _)| a == addr) {
                Some((_, _, idx)) => idx.push(i),
                None => groups.push((addr.to_string(), false, vec![i])),
            }
        }
        let mut replies = vec![Reply::Null; n];
        for round in 0..=MAX_REDIRECTS {
            self.send(batch, &groups, &mut replies).await?;
            // (index, ASKING first, node) of every command to send again.
            let mut again: Vec<(usize, bool, String)> = Vec::new();
            let mut wait = false;
            for (addr, ask, idx) in &groups {
                for &i in idx {
                    if let Some((asked, _, to)) = resp::redirection(&replies[i]) {
                        again.push((i, asked, to.to_string()));
                    } else if is_tryagain(&replies[i]) {
                        // A multi-key command on a slot being migrated, its keys split
                        // between the two nodes: the same node, a little later.
                        again.push((i, *ask, addr.clone()));
                        wait = true;
                    }
                }
            }
            if again.is_empty() || round == MAX_REDIRECTS {
                break;
            }
            if again.iter().any(|(i, ask, _)| !ask && resp::redirection(&replies[*i]).is_some()) {
                self.refresh().await?;
            }
            if wait {
                glommio::timer::sleep(TRYAGAIN_DELAY * (1 << round)).await;
            }
            self.redirects += again.len() as u64;
            groups.clear();
            for (i, ask, addr) in again {
                match groups.iter_mut().find(|(a, k, _)| *a == addr && *k == ask) {
                    Some((_, _, idx)) => idx.push(i),
                    None => groups.push((addr, ask, vec![i])),
                }
            }
        }
        let retry: Vec<(usize, String)> = match &self.map {
            Some(map) => (0..n)
                .filter(|&i| is_noscript(&replies[i]))
                .map(|i| (i, batch.slots[i].map_or(map.masters[0].as_str(), |s| map.master(s)).to_string()))
                .collect(),
            None => Vec::new(),
        };
        self.noscript(batch, &mut replies, retry).await?;
        Ok(replies)
    }

    /// Sends again, as `EVAL` with the script's text, the commands `retry` names (index,
    /// node) that Redis answered with `NOSCRIPT` (its script cache was flushed since the
    /// bridge loaded the scripts). The retried scripts run after the rest of the batch.
    async fn noscript(
        &mut self,
        batch: &Batch,
        replies: &mut [Reply],
        retry: Vec<(usize, String)>,
    ) -> std::io::Result<()> {
        let mut groups: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (i, addr) in retry {
            let Some(eval) = as_eval(batch.command(i)) else { continue };
            match groups.iter_mut().find(|(a, _, _)| *a == addr) {
                Some((_, idx, buf)) => {
                    idx.push(i);
                    buf.extend_from_slice(&eval);
                }
                None => groups.push((addr, vec![i], eval)),
            }
        }
        for (addr, idx, buf) in groups {
            let c = self.cmd_conn(&addr).await?;
            let conn = &mut self.cmd[c].1;
            conn.write(&buf).await?;
            for i in idx {
                replies[i] = conn.read_reply().await?;
            }
        }
        Ok(())
    }

    /// Writes each group's commands to its node (after `ASKING` when asked to), then
    /// reads their replies into `replies`.
    async fn send(
        &mut self,
        batch: &Batch,
        groups: &[(String, bool, Vec<usize>)],
        replies: &mut [Reply],
    ) -> std::io::Result<()> {
        let mut conns = Vec::with_capacity(groups.len());
        for (addr, ask, idx) in groups {
            let c = self.cmd_conn(addr).await?;
            let mut buf = Vec::new();
            for &i in idx {
                if *ask {
                    resp::encode_command(&["ASKING"], &mut buf);
                }
                buf.extend_from_slice(batch.command(i));
            }
            self.cmd[c].1.write(&buf).await?;
            conns.push(c);
        }
        for (c, (_, ask, idx)) in conns.into_iter().zip(groups) {
            let conn = &mut self.cmd[c].1;
            for &i in idx {
                if *ask {
                    conn.read_reply().await?;
                }
                replies[i] = conn.read_reply().await?;
            }
        }
        Ok(())
    }

    /// Writes (un)subscriptions, `true` to subscribe; confirmations arrive as pushes.
    pub async fn subscribe(&mut self, changes: &[(bool, String)]) -> std::io::Result<()> {
        let mut classic = Vec::new();
        let mut sharded: Vec<(usize, Vec<u8>)> = Vec::new();
        for (on, ch) in changes {
            if !self.is_sharded(ch) {
                resp::encode_command(&[if *on { "SUBSCRIBE" } else { "UNSUBSCRIBE" }, ch], &mut classic);
                continue;
            }
            let addr = if *on {
                let slot = resp::key_slot(ch.as_bytes());
                let addr = self.map.as_ref().map(|m| m.master(slot).to_string()).unwrap_or_default();
                self.sharded.insert(ch.clone(), addr.clone());
                addr
            } else {
                match self.sharded.remove(ch) {
                    Some(addr) => addr,
                    None => continue,
                }
            };
            let c = self.ssub_conn(&addr).await?;
            let buf = match sharded.iter_mut().find(|(i, _)| *i == c) {
                Some((_, buf)) => buf,
                None => {
                    sharded.push((c, Vec::new()));
                    &mut sharded.last_mut().expect("just pushed").1
                }
            };
            resp::encode_command(&[if *on { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" }, ch], buf);
        }
        if !classic.is_empty() {
            self.sub.write(&classic).await?;
        }
        for (c, buf) in sharded {
            self.ssub[c].1.write(&buf).await?;
        }
        Ok(())
    }

    /// Subscribes `channels` and waits for every confirmation; every reply read meanwhile
    /// (confirmations and pushes) goes to `on_reply`.
    pub async fn subscribe_all(
        &mut self,
        channels: &[String],
        mut on_reply: impl FnMut(Reply),
    ) -> std::io::Result<()> {
        let changes: Vec<(bool, String)> = channels.iter().map(|c| (true, c.clone())).collect();
        self.subscribe(&changes).await?;
        let classic = channels.iter().filter(|c| !self.is_sharded(c)).count();
        wait_confirmed(&mut self.sub, classic, &mut on_reply).await?;
        for i in 0..self.ssub.len() {
            let addr = self.ssub[i].0.clone();
            let expect = self.sharded.values().filter(|a| **a == addr).count();
            wait_confirmed(&mut self.ssub[i].1, expect, &mut on_reply).await?;
        }
        Ok(())
    }

    /// A reply or push already received on any pub/sub connection, without waiting;
    /// `Pending` registers the task for every connection's readiness.
    pub fn poll_push(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<Reply>> {
        if let Poll::Ready(r) = self.sub.poll_reply(cx) {
            return Poll::Ready(r);
        }
        for i in 0..self.ssub.len() {
            if let Poll::Ready(r) = self.ssub[i].1.poll_reply(cx) {
                return Poll::Ready(r.map(|r| self.note_moved(r)));
            }
        }
        Poll::Pending
    }

    /// Every reply or push the kernel already holds, on every pub/sub connection.
    pub fn take_ready(&mut self, out: &mut Vec<Reply>) -> std::io::Result<()> {
        self.sub.take_ready(out)?;
        let mut sharded = Vec::new();
        for (_, conn) in &mut self.ssub {
            conn.take_ready(&mut sharded)?;
        }
        for r in sharded {
            let r = self.note_moved(r);
            out.push(r);
        }
        Ok(())
    }

    /// Notes a `sunsubscribe` of a channel still wanted (its slot moved).
    fn note_moved(&mut self, r: Reply) -> Reply {
        if let Reply::Array(a) = &r {
            if a.first().and_then(text) == Some("sunsubscribe") {
                if let Some(ch) = a.get(1).and_then(text) {
                    if self.sharded.remove(ch).is_some() {
                        self.moved.push(ch.to_string());
                    }
                }
            }
        }
        r
    }

    /// Subscribes again, at their new owners, the channels whose slot moved.
    pub async fn repair(&mut self) -> std::io::Result<()> {
        if self.moved.is_empty() {
            return Ok(());
        }
        self.refresh().await?;
        let again: Vec<(bool, String)> =
            std::mem::take(&mut self.moved).into_iter().map(|c| (true, c)).collect();
        self.resubscribes += again.len() as u64;
        self.subscribe(&again).await
    }
}

/// Reads from `conn` until `expect` subscription confirmations came.
async fn wait_confirmed(
    conn: &mut RedisConn,
    expect: usize,
    on_reply: &mut impl FnMut(Reply),
) -> std::io::Result<()> {
    let mut seen = 0;
    while seen < expect {
        let reply = conn.read_reply().await?;
        if let Reply::Array(a) = &reply {
            if matches!(a.first().and_then(text), Some("subscribe" | "ssubscribe")) {
                seen += 1;
            }
        }
        on_reply(reply);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64) -> Reply {
        Reply::Array(vec![
            Reply::BulkString(host.into()),
            Reply::Integer(port),
            Reply::BulkString(b"id".to_vec()),
        ])
    }

    fn range(from: i64, to: i64, nodes: Vec<Reply>) -> Reply {
        let mut r = vec![Reply::Integer(from), Reply::Integer(to)];
        r.extend(nodes);
        Reply::Array(r)
    }

    #[test]
    fn a_noscript_command_is_sent_again_with_the_script_text() {
        let mut b = Batch::default();
        b.cmd(&["EVAL", scripts::DOWN, "2", "k1", "k2", "p:"], super::super::batch::Then::Ignore);
        b.cmd(&["SET", "k", "v"], super::super::batch::Then::Ignore);
        assert!(b.command(0).starts_with(b"*6\r\n$7\r\nEVALSHA\r\n"));
        let eval = as_eval(b.command(0)).unwrap();
        let mut expected = Vec::new();
        resp::encode_command(&["EVAL", scripts::DOWN, "2", "k1", "k2", "p:"], &mut expected);
        assert_eq!(eval, expected);
        assert_eq!(as_eval(b.command(1)), None);
        assert!(is_noscript(&Reply::Error("NOSCRIPT No matching script.".into())));
    }

    #[test]
    fn a_slot_map_names_every_slot_s_master_and_every_node() {
        let reply = Reply::Array(vec![
            range(0, 5460, vec![node("127.0.0.1", 7000), node("127.0.0.1", 7003)]),
            range(5461, 10922, vec![node("", 7001)]),
            range(10923, 16383, vec![node("127.0.0.1", 7002)]),
        ]);
        let map = SlotMap::parse(&reply, "127.0.0.1:7001").unwrap();
        assert_eq!(map.masters, ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]);
        assert_eq!(map.nodes.len(), 4);
        assert_eq!(map.master(0), "127.0.0.1:7000");
        assert_eq!(map.master(5461), "127.0.0.1:7001");
        assert_eq!(map.master(16383), "127.0.0.1:7002");
    }

    #[test]
    fn an_incomplete_or_malformed_map_is_refused() {
        let half = Reply::Array(vec![range(0, 8000, vec![node("127.0.0.1", 7000)])]);
        assert!(SlotMap::parse(&half, "x:1").unwrap_err().contains("slot 8001"));
        let bad = Reply::Array(vec![range(9, 3, vec![node("127.0.0.1", 7000)])]);
        assert!(SlotMap::parse(&bad, "x:1").is_err());
        assert!(SlotMap::parse(&Reply::Integer(1), "x:1").is_err());
        let v6 = Reply::Array(vec![range(0, 16383, vec![node("::1", 7000)])]);
        assert_eq!(SlotMap::parse(&v6, "x:1").unwrap().masters, ["[::1]:7000"]);
        assert_eq!(at(&RedisUrl::parse("redis://h:1").unwrap(), "[::1]:7000").unwrap().host, "::1");
    }
}
