//! The persister's MongoDB side: the three collections, their indexes, and the writes of
//! one batch. Every write here is safe to repeat (see [`super::documents`]): messages by
//! `_id`, conversations and users by a position check plus a revision check that makes
//! each document's update conditional on the revision it was folded from.

use std::collections::HashMap;

use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{Error, ErrorKind};
use mongodb::options::IndexOptions;
use mongodb::{Client, Collection, Database, IndexModel};
use tokio::task::JoinSet;

use super::documents::{scoped_id, Conversation, Message, Pos, PresenceChange, SocketEvent, User};

/// Duplicate key: the document is already there.
pub const DUPLICATE_KEY: i32 = 11000;
/// Conditional writes in flight at once.
const WRITES_IN_FLIGHT: usize = 16;
/// Rounds of re-reading documents another writer changed meanwhile (a rebalance overlap).
const CONFLICT_ROUNDS: usize = 8;

/// The persister's collections.
#[derive(Clone)]
pub struct Store {
    /// `messages`.
    pub messages: Collection<Document>,
    /// `conversations`.
    pub conversations: Collection<Document>,
    /// `users`.
    pub users: Collection<Document>,
}

/// What a batch's folds wrote.
#[derive(Debug, Default, Clone, Copy)]
pub struct Folded {
    /// Documents written.
    pub written: u64,
    /// Conditional writes that lost to another writer and were folded again.
    pub conflicts: u64,
}

/// The database named in `uri` (`mongodb://host:port/DB`).
pub async fn database(uri: &str) -> anyhow::Result<Database> {
    use anyhow::Context;
    let client = Client::with_uri_str(uri).await.context("MongoDB URI")?;
    client.default_database().context("the MongoDB URI names no database (mongodb://host:port/DB)")
}

impl Store {
    /// The collections of `db`, with their indexes created (idempotent).
    pub async fn open(db: &Database) -> Result<Store, Error> {
        let store = Store {
            messages: db.collection("messages"),
            conversations: db.collection("conversations"),
            users: db.collection("users"),
        };
        let index = |keys: Document, name: &str| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().name(name.to_string()).build())
                .build()
        };
        store
            .messages
            .create_index(index(doc! { "tenantId": 1, "conversationId": 1, "_id": -1 }, "by_conversation"))
            .await?;
        store
            .conversations
            .create_index(index(doc! { "tenantId": 1, "participants": 1, "updatedAt": -1 }, "by_participant"))
            .await?;
        store.conversations.create_index(index(doc! { "tenantId": 1, "room": 1 }, "by_room")).await?;
        store.users.create_index(index(doc! { "tenantId": 1, "userId": 1 }, "by_user")).await?;
        Ok(store)
    }

    /// Inserts `docs` unordered; documents already there (a replay) count as inserted.
    /// Returns how many were new.
    pub async fn insert_messages(&self, docs: &[Document]) -> Result<u64, Error> {
        if docs.is_empty() {
            return Ok(0);
        }
        match self.messages.insert_many(docs).ordered(false).await {
            Ok(r) => Ok(r.inserted_ids.len() as u64),
            Err(e) => match &*e.kind {
                ErrorKind::InsertMany(m)
                    if m.write_concern_error.is_none()
                        && m.write_errors
                            .as_ref()
                            .is_some_and(|w| w.iter().all(|e| e.code == DUPLICATE_KEY)) =>
                {
                    Ok((docs.len() - m.write_errors.as_ref().map_or(0, Vec::len)) as u64)
                }
                _ => Err(e),
            },
        }
    }

    /// Folds a batch's messages into their conversations.
    pub async fn fold_conversations(&self, items: &[(Message, Pos)]) -> Result<Folded, Error> {
        let (keys, by_key) = group(items, |(m, _)| scoped_id(&m.tenant, &m.conversation));
        let fold = |stored: Option<&Document>, key: &str| {
            let idx = &by_key[key];
            let (first, _) = &items[idx[0]];
            let mut c = stored
                .map(|d| {
                    Conversation::from_document(d).unwrap_or_else(|| Conversation {
                        rev: d.get_i64("rev").unwrap_or(0),
                        ..Conversation::new(&first.tenant, &first.conversation)
                    })
                })
                .unwrap_or_else(|| Conversation::new(&first.tenant, &first.conversation));
            let mut changed = false;
            for &i in idx {
                changed |= c.apply(&items[i].0, items[i].1);
            }
            changed.then(|| (c.rev, c.fields()))
        };
        conditional_writes(&self.conversations, keys, fold).await
    }

    /// Folds a batch's socket events and presence changes into their users.
    pub async fn fold_users(&self, items: &[(UserRecord, Pos)]) -> Result<Folded, Error> {
        let (keys, by_key) = group(items, |(r, _)| {
            let (t, u) = r.user();
            scoped_id(t, u)
        });
        let fold = |stored: Option<&Document>, key: &str| {
            let idx = &by_key[key];
            let (t, u) = items[idx[0]].0.user();
            let mut user = stored
                .map(|d| {
                    User::from_document(d)
                        .unwrap_or_else(|| User { rev: d.get_i64("rev").unwrap_or(0), ..User::new(t, u) })
                })
                .unwrap_or_else(|| User::new(t, u));
            let mut changed = false;
            for &i in idx {
                changed |= match &items[i].0 {
                    UserRecord::Socket(e) => user.apply_socket(e, items[i].1),
                    UserRecord::Presence(p) => user.apply_presence(p, items[i].1),
                };
            }
            changed.then(|| (user.rev, user.fields()))
        };
        conditional_writes(&self.users, keys, fold).await
    }
}

/// The indexes of `items` per document key (in batch order), and the keys in the order
/// first seen.
fn group<T>(items: &[T], key: impl Fn(&T) -> String) -> (Vec<String>, HashMap<String, Vec<usize>>) {
    let mut keys = Vec::new();
    let mut by_key: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, item) in items.iter().enumerate() {
        let k = key(item);
        if !by_key.contains_key(&k) {
            keys.push(k.clone());
        }
        by_key.entry(k).or_default().push(i);
    }
    (keys, by_key)
}

/// A record that updates a `users` document.
#[derive(Debug, Clone)]
pub enum UserRecord {
    /// From `events.socket`.
    Socket(SocketEvent),
    /// From `presence.changes`.
    Presence(PresenceChange),
}

impl UserRecord {
    fn user(&self) -> (&str, &str) {
        match self {
            UserRecord::Socket(e) => (&e.tenant, &e.user),
            UserRecord::Presence(p) => (&p.tenant, &p.user),
        }
    }
}

/// Reads the documents of `keys`, folds each (`fold(stored, key)` gives the revision it
/// folded from and the fields to `$set`, or None when nothing is new), and writes each
/// conditionally on that revision. A document another writer changed meanwhile is read
/// and folded again.
async fn conditional_writes<F>(
    coll: &Collection<Document>,
    mut keys: Vec<String>,
    fold: F,
) -> Result<Folded, Error>
where
    F: Fn(Option<&Document>, &str) -> Option<(i64, Document)>,
{
    let mut out = Folded::default();
    for _ in 0..CONFLICT_ROUNDS {
        if keys.is_empty() {
            return Ok(out);
        }
        let mut stored: HashMap<String, Document> = HashMap::new();
        let ids: Vec<Bson> = keys.iter().map(|k| Bson::String(k.clone())).collect();
        let mut cur = coll.find(doc! { "_id": { "$in": ids } }).await?;
        while cur.advance().await? {
            let d = cur.deserialize_current()?;
            if let Ok(id) = d.get_str("_id") {
                stored.insert(id.to_string(), d);
            }
        }
        let mut tasks = JoinSet::new();
        let mut lost = Vec::new();
        for key in keys.drain(..) {
            let doc = stored.get(&key);
            let Some((rev, fields)) = fold(doc, &key) else { continue };
            let exists = doc.is_some();
            let coll = coll.clone();
            if tasks.len() >= WRITES_IN_FLIGHT {
                if let Some(r) = tasks.join_next().await {
                    collect(r, &mut out, &mut lost)?;
                }
            }
            tasks.spawn(async move {
                let won = write_one(&coll, &key, exists, rev, fields).await?;
                Ok::<_, Error>((key, won))
            });
        }
        while let Some(r) = tasks.join_next().await {
            collect(r, &mut out, &mut lost)?;
        }
        out.conflicts += lost.len() as u64;
        keys = lost;
    }
    if keys.is_empty() {
        Ok(out)
    } else {
        Err(Error::custom(format!("{} documents kept changing under concurrent writers", keys.len())))
    }
}

fn collect(
    r: Result<Result<(String, bool), Error>, tokio::task::JoinError>,
    out: &mut Folded,
    lost: &mut Vec<String>,
) -> Result<(), Error> {
    let (key, won) = r.map_err(|e| Error::custom(format!("write task: {e}")))??;
    if won {
        out.written += 1;
    } else {
        lost.push(key);
    }
    Ok(())
}

/// One conditional write; false when another writer got there first.
async fn write_one(
    coll: &Collection<Document>,
    key: &str,
    exists: bool,
    rev: i64,
    fields: Document,
) -> Result<bool, Error> {
    if !exists {
        let mut d = doc! { "_id": key };
        d.extend(fields);
        return match coll.insert_one(d).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate(&e) => Ok(false),
            Err(e) => Err(e),
        };
    }
    let filter = if rev == 0 {
        doc! { "_id": key, "rev": { "$exists": false } }
    } else {
        doc! { "_id": key, "rev": rev }
    };
    let r = coll.update_one(filter, doc! { "$set": fields }).await?;
    Ok(r.matched_count == 1)
}

fn is_duplicate(e: &Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == DUPLICATE_KEY,
        _ => false,
    }
}
