//! The bus's Matrix persistence against a real Synapse (one for this test binary, started
//! by `scripts/synapse`, data on tmpfs): acting as appservice users, the journal (every
//! record readable back in order, the sequence continuing after a restart), inboxes (push,
//! take, ack, also after a restart) and the bus state (put, load, delete).
//!
//! Synapse pushes transactions to an appservice URL where nothing listens here; its retries
//! are harmless.

use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::synapse::Synapse;
use msgnode::config::JournalConfig;
use msgnode::matrix::actor::{Actor, ActorError};
use msgnode::matrix::client::Homeserver;
use msgnode::matrix::registration;
use msgnode::persist::inbox::Inbox;
use msgnode::persist::journal::Journal;
use msgnode::persist::store::{RuntimeRecord, Store};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One Synapse for this binary, owned by the one test (and so stopped and wiped when it
/// ends); the scenarios run one after another against it.
/// What the node itself queues: never refused by a share.
fn node() -> msgnode::persist::shares::Charge {
    std::sync::Arc::from(msgnode::persist::shares::NODE)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]

async fn bus_persistence_in_synapse() {
    let synapse = Synapse::start();
    actor_registers_users_creates_rooms_and_sends(&synapse).await;
    journal_stores_every_record_in_order_and_continues_after_restart(&synapse).await;
    inbox_keeps_messages_until_acked_also_across_restarts(&synapse).await;
    inbox_is_handed_over_in_pages_and_capped_per_runtime(&synapse).await;
    store_round_trips_runtimes_and_registry(&synapse).await;
}

async fn actor(synapse: &Synapse) -> Arc<Actor> {
    let registration = registration::read(&synapse.registration()).expect("registration");
    let homeserver =
        Arc::new(Homeserver::new(&synapse.url(), Duration::from_secs(60)).expect("homeserver"));
    Arc::new(Actor::new(&registration, "localhost", homeserver).expect("actor"))
}

/// A reTHINK-like message of 300–500 bytes.
fn message(i: u64) -> String {
    json!({
        "id": i,
        "type": if i.is_multiple_of(3) { "update" } else { "create" },
        "from": format!("hyperty://example.com/{:x}-{}", i % 97, i % 13),
        "to": format!("hyperty://example.com/{:x}", (i * 7) % 101),
        "body": {
            "via": "hyperty-runtime://example.com/1234/registry",
            "resource": format!("context://example.com/presence/{}", i % 50),
            "value": {"status": if i.is_multiple_of(2) { "available" } else { "busy" }, "counter": i, "ts": 1_700_000_000_000u64 + i},
            "schema": "hyperty-catalogue://catalogue.example.com/.well-known/dataschema/Context",
        },
    })
    .to_string()
}

async fn actor_registers_users_creates_rooms_and_sends(synapse: &Synapse) {
    let actor = actor(synapse).await;
    let user = actor.virtual_user("rt", "hyperty-runtime://example.com/actor-test");
    actor.ensure_user(&user).await.expect("register");
    actor.ensure_user(&user).await.expect("again: remembered");

    let sender = actor.sender().to_string();
    let room = actor
        .ensure_room("_msgnode_test.actor", &sender, "actor test")
        .await
        .expect("create");
    // A second actor (another node, or a restart) resolves the same alias.
    let other = self::actor(synapse).await;
    let again = other
        .ensure_room("_msgnode_test.actor", &sender, "actor test")
        .await
        .expect("resolve");
    assert_eq!(room, again);

    other.join(&user, &room).await.expect("join via invite");
    let first = actor
        .send_event(&user, &room, "org.msgnode.test", "t1", &json!({"n": 1}))
        .await
        .expect("send");
    let retried = actor
        .send_event(&user, &room, "org.msgnode.test", "t1", &json!({"n": 1}))
        .await
        .expect("resend");
    assert_eq!(first, retried, "same transaction, same event");

    actor
        .put_state(
            &sender,
            &room,
            "org.msgnode.test.state",
            "k",
            &json!({"v": 2}),
        )
        .await
        .expect("state");
    let state = actor.room_state(&user, &room).await.expect("room state");
    assert!(state
        .iter()
        .any(|e| e["type"] == "org.msgnode.test.state" && e["content"]["v"] == 2));

    let (events, _) = actor
        .messages(&user, &room, None, true, 50)
        .await
        .expect("messages");
    let sent: Vec<&Value> = events
        .iter()
        .filter(|e| e["type"] == "org.msgnode.test")
        .collect();
    assert_eq!(sent.len(), 1, "idempotent send stored once");

    let err = actor
        .send_event(
            "@alice:localhost",
            &room,
            "org.msgnode.test",
            "t2",
            &json!({}),
        )
        .await
        .expect_err("not ours");
    assert!(matches!(err, ActorError::Refused { .. }), "{err}");
}

async fn journal_stores_every_record_in_order_and_continues_after_restart(synapse: &Synapse) {
    let actor = actor(synapse).await;
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let journal = Journal::start(
        actor.clone(),
        JournalConfig::default(),
        shutdown.clone(),
        &tracker,
    )
    .await
    .expect("start");

    const N: u64 = 5_000;
    let start = Instant::now();
    let mut first = None;
    for i in 0..N {
        let seq = journal.record(&message(i), vec![format!("rt://{}", i % 5)], &node());
        first.get_or_insert(seq);
    }
    let accepted = start.elapsed();
    journal.flush().await;
    let stored = start.elapsed();
    let stats = journal.stats();
    eprintln!(
        "journal: {N} records accepted in {accepted:?} ({:.0}/s), all persisted in {stored:?} ({:.0}/s), {} events, {} bytes sent, {} failures",
        N as f64 / accepted.as_secs_f64(),
        N as f64 / stored.as_secs_f64(),
        stats.events_sent,
        stats.bytes_sent,
        stats.send_failures,
    );
    assert_eq!(first, Some(1));
    assert_eq!((stats.recorded, stats.persisted, stats.lag), (N, N, 0));

    let room = journal
        .reserve(&node(), message(N).len(), usize::MAX)
        .expect("room");
    let seq = journal
        .record_persisted(&message(N), vec![], room)
        .await
        .expect("persisted");
    assert_eq!(seq, N + 1);

    shutdown.cancel();
    tracker.close();
    tracker.wait().await;

    let entries = Journal::read_all(&actor).await.expect("read");
    assert_eq!(entries.len() as u64, N + 1);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry.seq, i as u64 + 1, "gapless and in order");
    }
    let m: Value = serde_json::from_str(entries[42].message.get()).expect("json");
    let want: Value = serde_json::from_str(&message(42)).expect("json");
    assert_eq!(m, want);
    assert_eq!(entries[42].to, vec!["rt://2".to_string()]);

    // A restart: a new journal on the same room continues the sequence.
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let restarted = Journal::start(
        actor.clone(),
        JournalConfig::default(),
        shutdown.clone(),
        &tracker,
    )
    .await
    .expect("restart");
    // Floats are not canonical JSON for Synapse: such a batch is stored compressed.
    let seq = restarted.record(r#"{"type":"update","body":{"value":1.5}}"#, vec![], &node());
    assert_eq!(seq, N + 2);
    let seq = restarted.record("not json", vec![], &node());
    assert_eq!(seq, N + 3);
    // Records still queued at shutdown are stored before the writer ends.
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    assert_eq!(restarted.stats().persisted, 2);
    let entries = Journal::read_all(&actor).await.expect("read");
    assert_eq!(entries.len() as u64, N + 3);
    let last: Vec<u64> = entries.iter().rev().take(2).map(|e| e.seq).collect();
    assert_eq!(last, vec![N + 3, N + 2]);
    let float: Value = serde_json::from_str(entries[(N + 1) as usize].message.get()).expect("json");
    assert_eq!(float["body"]["value"], 1.5);
    assert_eq!(entries[(N + 2) as usize].message.get(), "\"not json\"");
}

fn values(texts: &[String]) -> Vec<Value> {
    texts
        .iter()
        .map(|t| serde_json::from_str(t).expect("json"))
        .collect()
}

async fn inbox_keeps_messages_until_acked_also_across_restarts(synapse: &Synapse) {
    let actor = actor(synapse).await;
    let (a, b) = (
        "hyperty-runtime://example.com/a",
        "hyperty-runtime://example.com/b",
    );
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let inbox = Inbox::new(actor.clone(), "n1", None, shutdown.clone(), &tracker);

    let start = Instant::now();
    for i in 0..300 {
        inbox.push(a, &message(i), &node());
    }
    inbox.push(b, r#"{"for":"b","value":0.5}"#, &node());
    inbox.push(b, "not json", &node());
    let taken = inbox.take(a, usize::MAX).await.expect("take");
    eprintln!(
        "inbox: 300 messages pushed, stored and read back in {:?}",
        start.elapsed()
    );
    assert_eq!(taken.upto_of("n1"), 300);
    assert_eq!(
        values(&taken.messages),
        values(&(0..300).map(message).collect::<Vec<_>>())
    );
    let again = inbox.take(a, usize::MAX).await.expect("take again");
    assert_eq!(again, taken, "not acked: taken again");
    inbox.ack(a, &taken).await.expect("ack");
    let empty = inbox.take(a, usize::MAX).await.expect("take after ack");
    assert!(empty.messages.is_empty());
    assert_eq!(empty.upto_of("n1"), 300);

    for i in 300..305 {
        inbox.push(a, &message(i), &node());
    }
    let pending = inbox.take(a, usize::MAX).await.expect("take");
    assert_eq!(pending.upto_of("n1"), 305);
    assert_eq!(pending.messages.len(), 5);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;

    // A restart: nothing in memory, the inbox rooms still hold what was not acked.
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let inbox = Inbox::new(
        self::actor(synapse).await,
        "n1",
        None,
        shutdown.clone(),
        &tracker,
    );
    let after = inbox.take(a, usize::MAX).await.expect("take after restart");
    assert_eq!(after, pending);
    inbox.ack(a, &after).await.expect("ack");
    inbox.push(a, &message(305), &node());
    let next = inbox.take(a, usize::MAX).await.expect("take");
    assert_eq!(next.upto_of("n1"), 306, "the sequence continues");
    assert_eq!(values(&next.messages), values(&[message(305)]));
    inbox.ack(a, &next).await.expect("ack");

    // Another replica writes to the same inbox with its own sequence; a take sees both, and
    // the cursor keeps one position per writer.
    let other = Inbox::new(
        self::actor(synapse).await,
        "n2",
        None,
        shutdown.clone(),
        &tracker,
    );
    other.push(a, &message(1000), &node());
    other.push(a, &message(1001), &node());
    let _ = other.take(a, usize::MAX).await.expect("stored by n2");
    inbox.push(a, &message(306), &node());
    let mixed = inbox.take(a, usize::MAX).await.expect("take both writers");
    assert_eq!(
        values(&mixed.messages),
        values(&[message(1000), message(1001), message(306)])
    );
    assert_eq!((mixed.upto_of("n1"), mixed.upto_of("n2")), (307, 2));
    inbox.ack(a, &mixed).await.expect("ack");
    other.push(a, &message(1002), &node());
    let _ = other.take(a, usize::MAX).await.expect("stored by n2");
    let last = inbox
        .take(a, usize::MAX)
        .await
        .expect("take after n2 wrote again");
    assert_eq!(values(&last.messages), values(&[message(1002)]));
    let for_b = inbox.take(b, usize::MAX).await.expect("take b");
    assert_eq!(for_b.upto_of("n1"), 2);
    assert_eq!(for_b.messages[1], "not json");
    let float: Value = serde_json::from_str(&for_b.messages[0]).expect("json");
    assert_eq!(float["value"], 0.5);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

/// Review B7: a take read a runtime's whole inbox into memory, and an inbox in Matrix had no
/// cap. Takes are pages of bounded bytes (each acked before the next), and one runtime's
/// undelivered bytes are capped.
async fn inbox_is_handed_over_in_pages_and_capped_per_runtime(synapse: &Synapse) {
    let c = "hyperty-runtime://example.com/paged";
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let inbox = Inbox::new(actor(synapse).await, "n1", None, shutdown.clone(), &tracker);
    inbox.limit_bytes(64 * 1024 * 1024, 64 * 1024 * 1024, 50_000);
    let mut pushed = 0;
    for i in 0..200 {
        if inbox.runtime_has_room(c, message(i).len()) {
            inbox.push(c, &message(i), &node());
            pushed += 1;
        }
        if i % 40 == 39 {
            // Stored before the next ones: several batches in the room.
            let _ = inbox.take(c, 1).await.expect("take");
        }
    }
    assert!(
        pushed < 200,
        "past 50,000 bytes the runtime's inbox has no room"
    );
    let page_bytes = 8_000;
    let mut taken = Vec::new();
    loop {
        let page = inbox.take(c, page_bytes).await.expect("take a page");
        assert!(page.bytes <= page_bytes, "{} bytes in one page", page.bytes);
        assert_eq!(
            page.bytes,
            page.messages.iter().map(String::len).sum::<usize>()
        );
        taken.extend(page.messages.clone());
        inbox.ack(c, &page).await.expect("ack the page");
        if !page.more {
            break;
        }
    }
    assert_eq!(
        values(&taken),
        values(&(0..pushed).map(message).collect::<Vec<_>>()),
        "every message once, in order"
    );
    assert!(inbox.runtime_has_room(c, 50_000), "delivered: room again");
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
}

async fn store_round_trips_runtimes_and_registry(synapse: &Synapse) {
    let actor = actor(synapse).await;
    let store = Store::open(actor.clone(), None).await.expect("open");
    assert_eq!(store.load().await.expect("load empty").runtimes.len(), 0);
    let record = |n: usize| RuntimeRecord {
        user: Some("@alice:localhost".to_string()),
        allocations: std::collections::BTreeMap::from([(
            "key".to_string(),
            (0..n)
                .map(|i| format!("hyperty://example.com/{i}"))
                .collect(),
        )]),
        subscriptions: std::collections::BTreeMap::from([(
            "context://example.com/presence/1".to_string(),
            "hyperty://example.com/0".to_string(),
        )]),
        foreign: vec!["hyperty://other.example/9".to_string()],
        ..RuntimeRecord::default()
    };
    let (a, b) = (
        "hyperty-runtime://example.com/a",
        "hyperty-runtime://example.com/b",
    );
    store.put_runtime(a, &record(1)).await.expect("put a");
    store.put_runtime(b, &record(2)).await.expect("put b");
    store
        .put_registry("hyperty://example.com/0", Some(&json!({"status": "live"})))
        .await
        .expect("registry");
    store
        .put_registry("hyperty://example.com/1", Some(&json!({"load": 0.25})))
        .await
        .expect("registry with a float");

    // Concurrent puts of one runtime (issued in order 1..=8, all in flight together) end
    // with the latest stored.
    let records: Vec<RuntimeRecord> = (1..=8).map(record).collect();
    let puts = records.iter().map(|r| store.put_runtime(a, r));
    for put in futures_util::future::join_all(puts).await {
        put.expect("put");
    }

    // A restart reads it all back.
    let reopened = Store::open(self::actor(synapse).await, None)
        .await
        .expect("reopen");
    let snapshot = reopened.load().await.expect("load");
    assert_eq!(snapshot.runtimes.len(), 2);
    assert_eq!(snapshot.runtimes[a], record(8), "the latest put wins");
    assert_eq!(snapshot.runtimes[b], record(2));
    assert_eq!(
        snapshot.registry["hyperty://example.com/0"]["status"],
        "live"
    );
    assert_eq!(snapshot.registry["hyperty://example.com/1"]["load"], 0.25);

    reopened
        .put_runtime(b, &RuntimeRecord::default())
        .await
        .expect("delete");
    reopened
        .put_registry("hyperty://example.com/0", None)
        .await
        .expect("delete");
    let snapshot = store.load().await.expect("load");
    assert_eq!(snapshot.runtimes.keys().collect::<Vec<_>>(), vec![a]);
    assert_eq!(
        snapshot.registry.keys().collect::<Vec<_>>(),
        vec!["hyperty://example.com/1"]
    );
}
