//! The batch event format the bus's Matrix persistence writes: many entries (each a JSON
//! text with a consecutive sequence number) in as few events as Synapse's event size allows.
//!
//! Content is either plain `{<header>, "first_seq", "count", "messages": [entries]}` or, when
//! that exceeds [`MAX_EVENT_CONTENT`] bytes (Synapse refuses events over 65,536 bytes) or
//! the homeserver refuses it as non-canonical JSON (floats, huge integers),
//! `{<header>, "encoding": "deflate+base64", "data", "first_seq", "count"}` where `data` is
//! the base64 of the raw-deflated JSON array of entries. A batch too big for one event even
//! compressed is split into several events, in order. Entries of an event have the
//! consecutive sequence numbers `first_seq ..first_seq + count`. The transaction id of an
//! event names its writer, first sequence number, count and encoding, so a retried send is
//! idempotent. A single entry too big for an event even compressed is replaced by a
//! placeholder (`{"org.msgnode.oversize": <bytes>}`, logged), keeping the sequence gapless;
//! the inboxes refuse such a message before it is accepted ([`fits_one_event`]), so only
//! the journal's history can hold one.
//! The header fields (`node`, or `runtime` and `writer`) are the writer's: the journal and
//! the inboxes use this format with event types of their own.
//!
//! Pure: no I/O (`persist::roomlog` sends and reads these events).

use std::io::{Read, Write};

use base64::Engine as _;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

/// Largest event content msgnode writes, in bytes of JSON (Synapse's limit is 65,536 for the
/// whole event, signatures and ids included).
pub const MAX_EVENT_CONTENT: usize = 60_000;
/// The `encoding` of compressed batch events.
pub const ENCODING_DEFLATE_BASE64: &str = "deflate+base64";
/// Largest decompressed batch accepted when reading (a bound against deflate bombs).
const MAX_INFLATED: u64 = 64 * 1024 * 1024;
/// Key of the placeholder standing for an entry too big to store.
pub const OVERSIZE_KEY: &str = "org.msgnode.oversize";

/// `text` as a raw JSON value when it is JSON, else as a JSON string holding it.
pub(crate) fn raw_or_string(text: String) -> Box<RawValue> {
    if serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok() {
        if let Ok(raw) = RawValue::from_string(text.trim().to_string()) {
            return raw;
        }
    }
    tracing::warn!("bus: message is not JSON; kept as a JSON string");
    serde_json::value::to_raw_value(&text).unwrap_or_else(|_| oversize_raw(text.len()))
}

fn oversize_raw(bytes: usize) -> Box<RawValue> {
    serde_json::value::to_raw_value(&json!({ OVERSIZE_KEY: bytes }))
        .unwrap_or_else(|_| RawValue::NULL.to_owned())
}

/// One event's worth of a batch, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EncodedEvent {
    pub first_seq: u64,
    pub count: u64,
    pub compressed: bool,
    /// The event content as JSON text (at most [`MAX_EVENT_CONTENT`] bytes).
    pub content: String,
}

/// A decoded batch event.
pub(crate) struct DecodedBatch {
    pub first_seq: u64,
    pub entries: Vec<Box<RawValue>>,
}

/// Encodes `entries` (each a JSON text; consecutive sequence numbers from `first_seq`) as
/// batch events with the fields of `header`, plain when allowed and small enough, else
/// compressed, split as needed. An entry too big for any event is replaced by
/// `oversize(seq, bytes)`.
pub(crate) fn encode_batch(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: Vec<String>,
    allow_plain: bool,
    oversize: &dyn Fn(u64, usize) -> String,
) -> Vec<EncodedEvent> {
    let mut out = Vec::new();
    if entries.is_empty() {
        return out;
    }
    if allow_plain {
        if let Some(event) = plain_event(header, first_seq, &entries) {
            out.push(event);
            return out;
        }
    }
    // Split by a raw-size budget guessed from a compressed sample, then bisect what still
    // does not fit.
    let payload =
        (MAX_EVENT_CONTENT - compressed_overhead(header, first_seq, entries.len())) / 4 * 3;
    let ratio = sample_ratio(&entries).max(0.02);
    let budget = ((payload as f64 / ratio) * 0.85) as usize;
    let mut start = 0;
    let mut parts = Vec::new();
    while start < entries.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < entries.len() && (end == start || bytes + entries[end].len() < budget) {
            bytes += entries[end].len() + 1;
            end += 1;
        }
        parts.push((start, end));
        start = end;
    }
    // Process parts in order; a part that does not fit is replaced by its halves.
    parts.reverse();
    while let Some((start, end)) = parts.pop() {
        let seq = first_seq + start as u64;
        let slice = &entries[start..end];
        if allow_plain {
            if let Some(event) = plain_event(header, seq, slice) {
                out.push(event);
                continue;
            }
        }
        match compressed_event(header, seq, slice) {
            Some(event) => out.push(event),
            None if end - start > 1 => {
                let mid = start + (end - start) / 2;
                parts.push((mid, end));
                parts.push((start, mid));
            }
            None => {
                tracing::error!(
                    seq,
                    bytes = slice[0].len(),
                    "message too big for a Matrix event even compressed; stored as a placeholder"
                );
                let placeholder = vec![oversize(seq, slice[0].len())];
                if let Some(event) = plain_event(header, seq, &placeholder)
                    .or_else(|| compressed_event(header, seq, &placeholder))
                {
                    out.push(event);
                }
            }
        }
    }
    out
}

fn header_with(header: &Map<String, Value>, first_seq: u64, count: usize) -> Map<String, Value> {
    let mut content = header.clone();
    content.insert("first_seq".to_string(), json!(first_seq));
    content.insert("count".to_string(), json!(count));
    content
}

fn plain_event(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: &[String],
) -> Option<EncodedEvent> {
    let head = Value::Object(header_with(header, first_seq, entries.len())).to_string();
    let size = head.len() + 14 + entries.iter().map(|e| e.len() + 1).sum::<usize>();
    if size > MAX_EVENT_CONTENT {
        return None;
    }
    // `head` is a non-empty object: splice the messages array in before its closing brace.
    let mut content = String::with_capacity(size);
    content.push_str(head.strip_suffix('}').unwrap_or(&head));
    content.push_str(",\"messages\":[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            content.push(',');
        }
        content.push_str(entry);
    }
    content.push_str("]}");
    Some(EncodedEvent {
        first_seq,
        count: entries.len() as u64,
        compressed: false,
        content,
    })
}

fn compressed_overhead(header: &Map<String, Value>, first_seq: u64, count: usize) -> usize {
    let mut content = header_with(header, first_seq, count);
    content.insert("encoding".to_string(), json!(ENCODING_DEFLATE_BASE64));
    content.insert("data".to_string(), json!(""));
    Value::Object(content).to_string().len()
}

fn deflate(entries: &[String]) -> Vec<u8> {
    let mut encoder =
        flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
    // Writing into a Vec cannot fail.
    let _ = encoder.write_all(b"[");
    for (i, entry) in entries.iter().enumerate() {
        if i > 0 {
            let _ = encoder.write_all(b",");
        }
        let _ = encoder.write_all(entry.as_bytes());
    }
    let _ = encoder.write_all(b"]");
    encoder.finish().unwrap_or_default()
}

fn compressed_event(
    header: &Map<String, Value>,
    first_seq: u64,
    entries: &[String],
) -> Option<EncodedEvent> {
    let overhead = compressed_overhead(header, first_seq, entries.len());
    let deflated = deflate(entries);
    if overhead + deflated.len().div_ceil(3) * 4 > MAX_EVENT_CONTENT {
        return None;
    }
    let mut content = header_with(header, first_seq, entries.len());
    content.insert("encoding".to_string(), json!(ENCODING_DEFLATE_BASE64));
    content.insert(
        "data".to_string(),
        json!(base64::engine::general_purpose::STANDARD.encode(deflated)),
    );
    Some(EncodedEvent {
        first_seq,
        count: entries.len() as u64,
        compressed: true,
        content: Value::Object(content).to_string(),
    })
}

/// Compressed/raw size of the first ~128 KiB of `entries`.
fn sample_ratio(entries: &[String]) -> f64 {
    let mut bytes = 0;
    let mut n = 0;
    while n < entries.len() && bytes < 128 * 1024 {
        bytes += entries[n].len() + 1;
        n += 1;
    }
    let compressed = deflate(&entries[..n]).len();
    compressed as f64 / bytes.max(1) as f64
}

/// Whether `entry` (a JSON text) fits one batch event under `header` on its own, plain or
/// compressed: whether it can be stored as it is rather than as a placeholder.
pub(crate) fn fits_one_event(header: &Map<String, Value>, entry: &str) -> bool {
    let entries = [entry.to_string()];
    plain_event(header, u64::MAX, &entries).is_some()
        || compressed_event(header, u64::MAX, &entries).is_some()
}

/// Decodes a batch event's content (plain or compressed).
pub(crate) fn decode_batch(content: &Value) -> Result<DecodedBatch, String> {
    let first_seq = content
        .get("first_seq")
        .and_then(Value::as_u64)
        .ok_or("batch without first_seq")?;
    let count = content
        .get("count")
        .and_then(Value::as_u64)
        .ok_or("batch without count")?;
    let entries: Vec<Box<RawValue>> = match content.get("encoding").and_then(Value::as_str) {
        None => content
            .get("messages")
            .and_then(Value::as_array)
            .ok_or("plain batch without messages")?
            .iter()
            .map(serde_json::value::to_raw_value)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        Some(ENCODING_DEFLATE_BASE64) => {
            let data = content
                .get("data")
                .and_then(Value::as_str)
                .ok_or("compressed batch without data")?;
            let deflated = base64::engine::general_purpose::STANDARD
                .decode(data)
                .map_err(|e| format!("batch data: {e}"))?;
            let mut json = Vec::new();
            flate2::read::DeflateDecoder::new(deflated.as_slice())
                .take(MAX_INFLATED)
                .read_to_end(&mut json)
                .map_err(|e| format!("batch data: {e}"))?;
            serde_json::from_slice(&json).map_err(|e| format!("batch data: {e}"))?
        }
        Some(other) => return Err(format!("unknown batch encoding {other:?}")),
    };
    if entries.len() as u64 != count {
        return Err(format!(
            "batch says {count} entries, holds {}",
            entries.len()
        ));
    }
    Ok(DecodedBatch { first_seq, entries })
}

/// Transaction id of a batch event: idempotent for the same first entry, count and encoding.
pub(crate) fn txn_id(prefix: &str, event: &EncodedEvent) -> String {
    format!(
        "{prefix}.{}.{}.{}",
        event.first_seq,
        event.count,
        if event.compressed { "z" } else { "p" }
    )
}

pub(crate) fn redo_compressed(event: &EncodedEvent) -> Result<Vec<EncodedEvent>, String> {
    let content: Value = serde_json::from_str(&event.content).map_err(|e| e.to_string())?;
    let batch = decode_batch(&content)?;
    let mut header = match content {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    for key in ["messages", "first_seq", "count", "encoding", "data"] {
        header.remove(key);
    }
    let entries = batch.entries.iter().map(|e| e.get().to_string()).collect();
    Ok(encode_batch(
        &header,
        batch.first_seq,
        entries,
        false,
        &|_, bytes| json!({ OVERSIZE_KEY: bytes }).to_string(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::hash16;

    fn message(i: u64) -> String {
        json!({
            "id": i,
            "type": "create",
            "from": format!("hyperty://example.com/{}", i % 7),
            "to": "domain://registry.example.com",
            "body": {"value": {"name": "alice", "status": "online", "counter": i * 3}},
        })
        .to_string()
    }

    fn entries(n: u64, pad: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                let mut m: Value = serde_json::from_str(&message(i)).expect("json");
                m["pad"] = json!("x".repeat(pad));
                json!({"seq": i + 10, "ts_ms": 1, "message": m, "to": ["rt://a"]}).to_string()
            })
            .collect()
    }

    fn header() -> Map<String, Value> {
        let mut header = Map::new();
        header.insert("node".to_string(), json!("n1"));
        header
    }

    fn round_trip(events: &[EncodedEvent]) -> Vec<Value> {
        let mut out = Vec::new();
        let mut next = None;
        for event in events {
            assert!(
                event.content.len() <= MAX_EVENT_CONTENT,
                "{}",
                event.content.len()
            );
            let content: Value = serde_json::from_str(&event.content).expect("json");
            assert_eq!(content["node"], "n1");
            let batch = decode_batch(&content).expect("decode");
            if let Some(next) = next {
                assert_eq!(batch.first_seq, next, "gapless, in order");
            }
            next = Some(batch.first_seq + batch.entries.len() as u64);
            out.extend(
                batch
                    .entries
                    .iter()
                    .map(|e| serde_json::from_str::<Value>(e.get()).expect("entry")),
            );
        }
        out
    }

    fn as_values(entries: &[String]) -> Vec<Value> {
        entries
            .iter()
            .map(|e| serde_json::from_str(e).expect("json"))
            .collect()
    }

    /// The placeholder of an entry too big to store (as the journal writes it).
    fn oversize(seq: u64, bytes: usize) -> String {
        json!({"seq": seq, "message": { OVERSIZE_KEY: bytes }, "to": []}).to_string()
    }

    #[test]
    fn an_entry_fits_one_event_plain_or_compressed_or_not_at_all() {
        let header = Map::new();
        let small = json!({"pad": "x".repeat(1000)}).to_string();
        let compressible = json!({"pad": "x".repeat(500_000)}).to_string();
        // Not compressible: each 4 characters stand for 3 random-looking bytes.
        let noise: String = (0..200_000u64)
            .map(|i| {
                let x = i.wrapping_mul(6_364_136_223_846_793_005).rotate_left(17) ^ (i >> 3);
                char::from(b'A' + (x % 26) as u8)
            })
            .collect();
        let noisy = json!({ "pad": noise }).to_string();
        assert!(fits_one_event(&header, &small));
        assert!(fits_one_event(&header, &compressible));
        assert!(!fits_one_event(&header, &noisy));
    }

    #[test]
    fn small_batches_are_plain() {
        let entries = entries(5, 0);
        let events = encode_batch(&header(), 10, entries.clone(), true, &oversize);
        assert_eq!(events.len(), 1);
        assert!(!events[0].compressed);
        let content: Value = serde_json::from_str(&events[0].content).expect("json");
        assert_eq!(content["first_seq"], 10);
        assert_eq!(content["count"], 5);
        assert_eq!(content["messages"][2]["seq"], 12);
        assert_eq!(round_trip(&events), as_values(&entries));
    }

    #[test]
    fn big_batches_are_compressed_and_split_in_order() {
        let entries = entries(20_000, 200);
        let raw: usize = entries.iter().map(String::len).sum();
        let events = encode_batch(&header(), 10, entries.clone(), true, &oversize);
        assert!(events.len() > 1, "{raw} raw bytes in one event?");
        assert!(events.iter().all(|e| e.compressed));
        assert_eq!(events[0].first_seq, 10);
        assert_eq!(round_trip(&events), as_values(&entries));
        // Compression pays: far fewer events than plain would need.
        assert!(
            events.len() < raw / MAX_EVENT_CONTENT / 3,
            "{} events for {raw} bytes",
            events.len()
        );
    }

    #[test]
    fn incompressible_entries_are_bisected_and_oversize_replaced() {
        // Random-looking entries compress badly: the guessed budget is too big at first.
        let noisy: Vec<String> = (0..400u64)
            .map(|i| {
                let noise: String = (0..300)
                    .map(|j| {
                        let h = hash16(&format!("{i}-{j}"));
                        h.chars().next().unwrap_or('0')
                    })
                    .collect();
                json!({"seq": i, "noise": noise, "more": hash16(&i.to_string())}).to_string()
            })
            .collect();
        let events = encode_batch(&header(), 0, noisy.clone(), false, &oversize);
        assert!(events.iter().all(|e| e.compressed));
        assert_eq!(round_trip(&events), as_values(&noisy));

        let huge: String = (0..40_000u64).map(|i| hash16(&i.to_string())).collect();
        let entries = vec![
            json!({"seq": 0}).to_string(),
            json!({"seq": 1, "message": huge}).to_string(),
            json!({"seq": 2}).to_string(),
        ];
        let events = encode_batch(&header(), 0, entries, true, &oversize);
        let back = round_trip(&events);
        assert_eq!(back.len(), 3);
        assert_eq!(back[1]["seq"], 1);
        assert!(back[1]["message"][OVERSIZE_KEY].as_u64().unwrap_or(0) > 600_000);
        assert_eq!(back[2]["seq"], 2);
    }

    #[test]
    fn txn_ids_name_first_seq_count_and_encoding() {
        let events = encode_batch(&header(), 42, entries(3, 0), true, &oversize);
        assert_eq!(txn_id("j.abc", &events[0]), "j.abc.42.3.p");
        let again = encode_batch(&header(), 42, entries(3, 0), true, &oversize);
        assert_eq!(
            txn_id("j.abc", &again[0]),
            "j.abc.42.3.p",
            "a retry is the same transaction"
        );
        let compressed = redo_compressed(&events[0]).expect("recompress");
        assert_eq!(txn_id("j.abc", &compressed[0]), "j.abc.42.3.z");
        assert_eq!(round_trip(&compressed), round_trip(&events));
    }

    #[test]
    fn malformed_batches_are_errors() {
        assert!(decode_batch(&json!({"first_seq": 1})).is_err());
        assert!(decode_batch(&json!({"first_seq": 1, "count": 2, "messages": [1]})).is_err());
        assert!(
            decode_batch(&json!({"first_seq": 1, "count": 1, "encoding": "zip", "data": ""}))
                .is_err()
        );
        assert!(decode_batch(
            &json!({"first_seq": 1, "count": 1, "encoding": ENCODING_DEFLATE_BASE64, "data": "!!"})
        )
        .is_err());
    }
}
