//! The MongoDB-protocol server of the persistence tests, checked for what the persister
//! relies on, through the official Rust driver: FerretDB v1 (SQLite backend) built by
//! `scripts/ferretdb/install.sh`, started on a free loopback port
//! (`tests/support/ferretdb.rs`). Where FerretDB differs from MongoDB: `docs/kafka.md`.

mod support;

use mongodb::bson::{doc, Document};
use mongodb::error::ErrorKind;
use mongodb::options::IndexOptions;
use mongodb::{Client, IndexModel};
use support::ferretdb::FerretDb;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn message(i: u32) -> Document {
    doc! { "_id": format!("m{i:04}"), "tenant": "t1", "conversation": "room:lobby", "from": "u1", "seq": i }
}

#[test]
fn ferretdb_does_what_the_persister_relies_on_and_keeps_it_across_a_kill() {
    let mut db = FerretDb::start();
    let rt = runtime();
    rt.block_on(async {
        let client = Client::with_uri_str(db.url("shardgate")).await.unwrap();
        let messages = client.database("shardgate").collection::<Document>("messages");
        // An index like the persister's (tenant + conversation + id).
        let model = IndexModel::builder()
            .keys(doc! { "tenant": 1, "conversation": 1, "_id": -1 })
            .options(IndexOptions::builder().name("by_conversation".to_string()).build())
            .build();
        messages.create_index(model).await.unwrap();

        // A replayed batch: unordered insert_many reports each duplicate `_id` as error
        // 11000 and inserts the rest.
        messages.insert_many((0..10).map(message)).await.unwrap();
        let err = messages.insert_many((5..15).map(message)).ordered(false).await.unwrap_err();
        let ErrorKind::InsertMany(e) = *err.kind else { panic!("not an insert_many error: {err}") };
        let dup: Vec<i32> = e.write_errors.unwrap_or_default().iter().map(|w| w.code).collect();
        assert_eq!(dup, vec![11000; 5], "one duplicate-key error per replayed document");
        assert_eq!(messages.count_documents(doc! {}).await.unwrap(), 15);

        // Conversation upserts that stay right when a batch is applied twice.
        let conversations = client.database("shardgate").collection::<Document>("conversations");
        for _ in 0..2 {
            conversations
                .update_one(
                    doc! { "_id": "t1|room:lobby" },
                    doc! {
                        "$setOnInsert": { "tenant": "t1", "room": "lobby" },
                        "$max": { "lastSeq": 14, "updatedAt": 1_795_000_000_000i64 },
                        "$addToSet": { "participants": "u1" },
                    },
                )
                .upsert(true)
                .await
                .unwrap();
        }
        let c = conversations.find_one(doc! { "_id": "t1|room:lobby" }).await.unwrap().unwrap();
        assert_eq!(c.get_i32("lastSeq").unwrap(), 14);
        assert_eq!(c.get_array("participants").unwrap().len(), 1);
        let n = conversations
            .update_one(doc! { "_id": "t1|room:lobby" }, doc! { "$inc": { "count": 15 } })
            .await
            .unwrap();
        assert_eq!(n.modified_count, 1);
    });

    // Data acknowledged before a SIGKILL is there after the restart.
    db.kill_and_restart();
    rt.block_on(async {
        let client = Client::with_uri_str(db.url("shardgate")).await.unwrap();
        let messages = client.database("shardgate").collection::<Document>("messages");
        assert_eq!(messages.count_documents(doc! {}).await.unwrap(), 15);
        let newest = messages
            .find_one(doc! { "tenant": "t1", "conversation": "room:lobby" })
            .sort(doc! { "_id": -1 })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(newest.get_str("_id").unwrap(), "m0014");
    });
}
