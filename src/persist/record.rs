//! How one runtime's record is laid out over state events, pure: a head under the runtime
//! URL and, once the record no longer fits one event, parts under `<runtime>#<slot>`.
//!
//! A Matrix event must stay under 64 KiB (Synapse's `MAX_PDU_SIZE`, the canonical JSON of
//! the whole event); a runtime holding a few hundred addresses outgrows that. So:
//! - the **head** (`org.msgnode.bus.runtime`, state key = runtime URL) holds the record's
//!   scalar fields, its newest entries (the *tail*) and, when there are parts, `gen` and
//!   `parts`: the `[slot, gen]` of every part that belongs to it, in order;
//! - a **part** (`org.msgnode.bus.runtime.part`, state key `<runtime>#<slot>`) holds some of
//!   the record's entries, the `gen` it was written in and (with replicas) its `writer`.
//!
//! With replicas two of them can write one record at once (a runtime moving between them),
//! and a state event has no compare-and-set: so a part is its writer's. A head names only
//! parts its own writer wrote (a layout's part by another writer is rewritten, never kept),
//! and a load takes a part only when its `writer` is the head's (a part without one, from
//! before parts said who wrote them, is read as the head's); each writer also picks its new
//! slots from a range of its own ([`first_slot`]). Two writers interleaving their puts then
//! leave the last head with its own parts, or — their ranges meeting — a head whose parts
//! were written over, which the load counts as damaged: never a silent mix of the two.
//!
//! Writing is ordered so that a crash between any two writes leaves either the old record
//! or the new one: changed and new parts are written first, each into a slot the current
//! head does not name (never over a part it names); then the head, naming them; then the
//! slots it no longer names are emptied. A load takes the head and exactly the parts it
//! names in the generation it names; parts it does not name (a write that did not reach its
//! head, or surplus not yet emptied) are ignored, and parts without a head are orphans.
//!
//! Entries stay in their part while they live: an append goes to the head's tail and is
//! sealed into a new part once the tail is over [`TAIL_BYTES`]; a removal from a part is
//! recorded in the head (`removed`: the places gone from each part it names, as ranges),
//! and the part is not written again until the head's removals outgrow [`REMOVED_BYTES`]
//! (then the parts with the most are rewritten without them, or what is left goes back to
//! the tail when little is); a part with nothing left is dropped (its slot emptied), and
//! more than a few small parts are merged into full ones. So a write costs what it changed
//! plus a head of at most [`TAIL_BYTES`] of entries, [`REMOVED_BYTES`] of removals and its
//! list of parts — not what the record holds: a runtime allocating block after block
//! rewrites a small head and, now and then, one small part; releasing them one by one
//! rewrites the head and, now and then, empties a part. The removals are sealed with the
//! head they are in: a load takes a named part's entries less the places its head
//! removed, so an entry removed by a stored head is never read back. (A head written
//! before removals were recorded has none: it loads as before.)

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use serde_json::{json, Map, Value};

use super::store::RuntimeRecord;

/// State event type of a part of a runtime's record.
pub const PART_EVENT_TYPE: &str = "org.msgnode.bus.runtime.part";

/// Most bytes of one event's content (canonical JSON). Synapse refuses events over 65,536
/// bytes as a whole; the rest is left for the envelope (state key of up to 255 bytes plus
/// the slot, room id, sender, previous and auth events, hashes, signatures).
pub const MAX_CONTENT_BYTES: usize = 60_000;

/// Most bytes of one runtime's record over all its events (its entries as JSON): past it a
/// change is refused before anything is written.
pub const MAX_RECORD_BYTES: usize = 16 * 1024 * 1024;

/// Most parts of one record (what [`MAX_RECORD_BYTES`] needs at a quarter full each, and
/// the head's list of them fits the head).
pub const MAX_PARTS: usize = 2048;

/// A part fallen under this many bytes goes back to the tail instead of being rewritten.
const MIN_PART_BYTES: usize = MAX_CONTENT_BYTES / 4;

/// Most bytes of the head's list of entries removed from its parts: past it, the parts
/// with the most removals are rewritten without them.
pub const REMOVED_BYTES: usize = 4 * 1024;

/// Most bytes of entries the head keeps (its tail): past it the tail is sealed into a part.
/// Every write of the record rewrites its head, so this bounds what a write sends beyond
/// what it changed (with the head's list of parts, a few bytes per part). What a state
/// event costs the homeserver hardly depends on its size (Synapse: ~30–45 ms of CPU for
/// 0.5 KB and 56 KB alike, README "Performance"), but each event costs that: so the tail
/// is large enough that every part it is sealed into is over [`MIN_PART_BYTES`] (no small
/// parts to merge later) and a burst of appends is sealed into as few parts as hold it.
pub const TAIL_BYTES: usize = 32 * 1024;

/// Most parts under [`MIN_PART_BYTES`] (sealed tails, mostly) a record keeps: one more and
/// they are merged into parts as full as they go, so parts stay few while each entry is
/// rewritten only a few times (in the tail, in a small part, in a merged one).
const SMALL_PARTS: usize = 6;

/// Where `writer`'s new parts go: slots from here up, past those the head names (one range
/// per replica name, so two replicas writing one record at once pick different slots; the
/// only writer, from 1). 255 ranges of 8,192 slots (a record has at most [`MAX_PARTS`]),
/// the highest slot 7 digits, so a head's list of [`MAX_PARTS`] parts still fits it.
pub(crate) fn first_slot(writer: Option<&str>) -> u32 {
    use sha2::{Digest, Sha256};
    match writer {
        None => 1,
        Some(name) => {
            let digest = Sha256::digest(name.as_bytes());
            (u32::from(digest[0]) % 255 + 1) << 13
        }
    }
}

/// The state key of part `slot` of `runtime`'s record.
pub fn part_key(runtime: &str, slot: u32) -> String {
    format!("{runtime}#{slot}")
}

/// A record too large to store: refused before anything is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TooLarge(pub String);

/// One entry of a record: what a part holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Item {
    /// An allocated address under its allocation key.
    Allocation(String, String),
    /// A subscription: resource → subscriber.
    Subscription(String, String),
    /// A foreign return route.
    Foreign(String),
    /// A claimed address.
    Claimed(String),
}

impl Item {
    /// An upper bound of what the entry adds to a part's JSON.
    fn bytes(&self) -> usize {
        match self {
            Item::Allocation(key, address) => json_len(key) + json_len(address) + 5,
            Item::Subscription(resource, address) => json_len(resource) + json_len(address) + 2,
            Item::Foreign(address) | Item::Claimed(address) => json_len(address) + 1,
        }
    }
}

/// The length of `s` as a JSON string (as serde_json and canonical JSON write it).
fn json_len(s: &str) -> usize {
    2 + s
        .chars()
        .map(|c| match c {
            '"' | '\\' | '\u{08}' | '\u{0c}' | '\n' | '\r' | '\t' => 2,
            c if (c as u32) < 0x20 => 6,
            c => c.len_utf8(),
        })
        .sum::<usize>()
}

/// The record's entries, in the record's order.
pub fn items(record: &RuntimeRecord) -> Vec<Item> {
    let mut items = Vec::new();
    for (key, addresses) in &record.allocations {
        items.extend(
            addresses
                .iter()
                .map(|a| Item::Allocation(key.clone(), a.clone())),
        );
    }
    items.extend(
        record
            .subscriptions
            .iter()
            .map(|(r, a)| Item::Subscription(r.clone(), a.clone())),
    );
    items.extend(record.foreign.iter().cloned().map(Item::Foreign));
    items.extend(record.claimed.iter().cloned().map(Item::Claimed));
    items
}

/// Adds `items` to `record`'s lists (after what it holds).
fn extend(record: &mut RuntimeRecord, items: impl IntoIterator<Item = Item>) {
    for item in items {
        match item {
            Item::Allocation(key, address) => {
                record.allocations.entry(key).or_default().push(address);
            }
            Item::Subscription(resource, address) => {
                record.subscriptions.insert(resource, address);
            }
            Item::Foreign(address) => record.foreign.push(address),
            Item::Claimed(address) => record.claimed.push(address),
        }
    }
}

/// Checks, before anything is written or changed elsewhere, that `record` can be stored:
/// no entry too big for an event of its own, and the whole within [`MAX_RECORD_BYTES`].
/// The record's entries' bytes (what [`MAX_RECORD_BYTES`] bounds).
///
/// # Errors
/// [`TooLarge`] saying which bound it is over.
pub fn check(record: &RuntimeRecord) -> Result<usize, TooLarge> {
    let total = added(&items(record))?;
    if total > MAX_RECORD_BYTES {
        return Err(TooLarge(format!(
            "the runtime's record would be {total} bytes (at most {MAX_RECORD_BYTES})"
        )));
    }
    Ok(total)
}

/// The bytes `items` add to a record, each checked against the bound of one entry (what
/// [`check`] checks of every entry, for the ones a change adds).
///
/// # Errors
/// [`TooLarge`]: an entry too big for an event of its own.
pub fn added(items: &[Item]) -> Result<usize, TooLarge> {
    let mut total = 0usize;
    for item in items {
        let bytes = item.bytes();
        if bytes > MAX_CONTENT_BYTES - 200 {
            return Err(TooLarge(format!(
                "an entry of {bytes} bytes cannot be stored (at most {} per entry)",
                MAX_CONTENT_BYTES - 200
            )));
        }
        total += bytes;
    }
    Ok(total)
}

/// One stored part: where, in which generation, what.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Part {
    /// Its slot (state key `<runtime>#<slot>`).
    pub slot: u32,
    /// The generation it was written in.
    pub gen: u64,
    /// The replica that wrote it (`None`: the only writer, or written before parts said).
    pub writer: Option<String>,
    /// Its entries, as written.
    pub items: Vec<Item>,
    /// Which of `items` (their places) the head says are removed since.
    pub removed: BTreeSet<u32>,
}

impl Part {
    /// The entries it holds now (those not removed).
    fn live(&self) -> impl Iterator<Item = &Item> {
        self.items
            .iter()
            .enumerate()
            .filter(|(i, _)| !self.removed.contains(&(*i as u32)))
            .map(|(_, item)| item)
    }

    /// The bytes of the entries it holds now.
    fn live_bytes(&self) -> usize {
        self.live().map(Item::bytes).sum()
    }

    /// The part's event content.
    pub fn content(&self) -> Value {
        let mut record = RuntimeRecord::default();
        extend(&mut record, self.items.iter().cloned());
        let mut content = to_object(&record);
        content.insert("gen".into(), json!(self.gen));
        if let Some(writer) = &self.writer {
            content.insert("writer".into(), json!(writer));
        }
        Value::Object(content)
    }
}

/// What the store knows it wrote for a runtime whose record has parts (none is kept for a
/// record that fits its head).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Layout {
    /// The generation of the head last written.
    pub gen: u64,
    /// The parts that head names, in its order.
    pub parts: Vec<Part>,
    /// Slots of this store's that may hold content the head does not account for (a write
    /// that did not reach its head, surplus not emptied yet, parts of its own another
    /// replica's head replaced): never written over, emptied after the next head.
    pub stale: BTreeSet<u32>,
    /// Slots a head of another writer named when this store last read it: never written
    /// over, and never emptied by this store — that writer may be storing a head naming them
    /// right now, and it empties its own parts when it writes again.
    pub foreign: BTreeSet<u32>,
}

/// The writes that store a record, in order: `parts`, then `head`, then `empty` (slots to
/// empty), and the layout once all are done.
#[derive(Debug, Clone)]
pub struct Plan {
    /// New or rewritten parts: (slot, content).
    pub parts: Vec<(u32, Value)>,
    /// The head's content.
    pub head: Value,
    /// Slots to empty after the head.
    pub empty: Vec<u32>,
    /// What is stored once the plan is carried out (`None`: no parts).
    pub layout: Option<Layout>,
}

fn to_object(record: &RuntimeRecord) -> Map<String, Value> {
    match serde_json::to_value(record) {
        Ok(Value::Object(object)) => object,
        _ => Map::new(),
    }
}

fn content_len(content: &Value) -> usize {
    serde_json::to_vec(content).map_or(usize::MAX, |v| v.len())
}

/// The writes that take a runtime's stored record from `layout` (what its head names now;
/// `None`: its head names no parts) to `record` (not empty), with `extra` fields in the
/// head (the writer: its `writer` is also the new parts'). Parts whose entries did not
/// change are not rewritten, unless another writer wrote them.
///
/// # Errors
/// [`TooLarge`] when the record cannot be laid out within the bounds.
pub fn plan(
    layout: Option<&Layout>,
    record: &RuntimeRecord,
    extra: &Map<String, Value>,
) -> Result<Plan, TooLarge> {
    check(record)?;
    let nothing = Layout::default();
    let layout = layout.unwrap_or(&nothing);
    let writer = extra.get("writer").and_then(Value::as_str);
    // Generations only grow while a layout is known; a fresh one starts from the clock, so
    // it does not repeat an earlier write's.
    let gen = match layout.gen {
        0 => crate::clock::now_ms(),
        gen => gen + 1,
    };
    let wanted = items(record);
    let live: HashSet<&Item> = wanted.iter().collect();
    // Entries gone from a part are recorded in the head (its `removed`), not rewritten: a
    // part is rewritten only when the head's list of removals outgrows
    // [`REMOVED_BYTES`], and a part with nothing left is dropped.
    let mut kept: Vec<Part> = Vec::new();
    let mut sealed: Vec<Vec<Item>> = Vec::new();
    for part in &layout.parts {
        let mut part = part.clone();
        for (i, item) in part.items.iter().enumerate() {
            if !live.contains(item) {
                part.removed.insert(i as u32);
            }
        }
        if part.removed.len() == part.items.len() {
            continue; // nothing left: dropped
        }
        // A head names only its own writer's parts: another's is rewritten.
        if part.writer.as_deref() != writer {
            if part.live_bytes() >= MIN_PART_BYTES {
                sealed.push(part.live().cloned().collect()); // into another slot
            } // else: what is left goes back to the tail
            continue;
        }
        kept.push(part);
    }
    // Too many removals for the head: the parts with the most are rewritten (what is left
    // of each into another slot, or back to the tail when little is).
    let mut removals: usize = kept.iter().map(|p| removed_len(&p.removed)).sum();
    while removals > REMOVED_BYTES {
        let Some((at, _)) = kept.iter().enumerate().max_by_key(|(_, p)| p.removed.len()) else {
            break;
        };
        let part = kept.remove(at);
        removals -= removed_len(&part.removed);
        if part.live_bytes() >= MIN_PART_BYTES {
            sealed.push(part.live().cloned().collect()); // rewritten, into another slot
        } // else: what is left goes back to the tail
    }
    // Too many small parts: merged, as full as they go, into other slots.
    let small = |p: &Part| p.live_bytes() < MIN_PART_BYTES;
    if kept.iter().filter(|p| small(p)).count() > SMALL_PARTS {
        let merged: Vec<Item> = kept
            .iter()
            .filter(|p| small(p))
            .flat_map(|p| p.live().cloned())
            .collect();
        kept.retain(|p| !small(p));
        sealed.extend(full_chunks(&merged));
    }
    let placed: HashSet<&Item> = kept
        .iter()
        .flat_map(Part::live)
        .chain(sealed.iter().flatten())
        .collect();
    let tail: Vec<Item> = wanted
        .iter()
        .filter(|i| !placed.contains(i))
        .cloned()
        .collect();
    // Never written over now: the slots the current head names, and stale ones (which a
    // head this store did not write may name).
    let named: BTreeSet<u32> = layout
        .parts
        .iter()
        .map(|p| p.slot)
        .chain(layout.stale.iter().copied())
        .chain(layout.foreign.iter().copied())
        .collect();
    let mut rest: &[Item] = &tail;
    // The head holds the scalars and as much of the tail as fits; the rest is sealed into
    // new parts from its oldest end, each as full as it goes.
    let (head, new_parts) = loop {
        let mut free = (first_slot(writer)..).filter(|s| !named.contains(s));
        let new_parts: Vec<Part> = sealed
            .iter()
            .map(|items| Part {
                slot: free.next().unwrap_or(u32::MAX),
                gen,
                writer: writer.map(str::to_string),
                items: as_read(items),
                removed: BTreeSet::new(),
            })
            .collect();
        let head = head_content(record, rest, extra, gen, kept.iter().chain(&new_parts));
        let tail: usize = rest.iter().map(Item::bytes).sum();
        if tail <= TAIL_BYTES && content_len(&head) <= MAX_CONTENT_BYTES {
            break (head, new_parts);
        }
        if rest.is_empty() || kept.len() + sealed.len() >= MAX_PARTS {
            return Err(TooLarge(format!(
                "the runtime's record does not fit {MAX_PARTS} events"
            )));
        }
        let n = chunk_len(rest);
        sealed.push(rest[..n].to_vec());
        rest = &rest[n..];
    };
    let parts: Vec<(u32, Value)> = new_parts.iter().map(|p| (p.slot, p.content())).collect();
    if parts
        .iter()
        .any(|(_, c)| content_len(c) > MAX_CONTENT_BYTES)
    {
        return Err(TooLarge(
            "a part of the runtime's record is over the event size limit".into(),
        ));
    }
    let now: BTreeSet<u32> = kept
        .iter()
        .map(|p| p.slot)
        .chain(new_parts.iter().map(|p| p.slot))
        .collect();
    let empty: Vec<u32> = named
        .iter()
        .copied()
        .filter(|s| !now.contains(s) && !layout.foreign.contains(s))
        .collect();
    let all: Vec<Part> = kept.into_iter().chain(new_parts).collect();
    let layout = (!all.is_empty() || !layout.foreign.is_empty()).then_some(Layout {
        gen,
        parts: all,
        stale: BTreeSet::new(),
        foreign: layout.foreign.clone(),
    });
    Ok(Plan {
        parts,
        head,
        empty,
        layout,
    })
}

/// `items` in the order a load reads them back from a part (its content is a record:
/// blocks by key, subscriptions by resource): the places a head removes count in it.
fn as_read(items: &[Item]) -> Vec<Item> {
    let mut record = RuntimeRecord::default();
    extend(&mut record, items.iter().cloned());
    self::items(&record)
}

/// How many of `items` (at least one) go into one part, as full as it goes.
fn chunk_len(items: &[Item]) -> usize {
    let (mut bytes, mut n) = (0, 0);
    while n < items.len() && bytes + items[n].bytes() <= MAX_CONTENT_BYTES - 100 {
        bytes += items[n].bytes();
        n += 1;
    }
    n.max(1)
}

/// `items` cut into parts, each as full as it goes.
fn full_chunks(mut items: &[Item]) -> Vec<Vec<Item>> {
    let mut chunks = Vec::new();
    while !items.is_empty() {
        let n = chunk_len(items);
        chunks.push(items[..n].to_vec());
        items = &items[n..];
    }
    chunks
}

/// The head's content: `record`'s scalars, the `tail` entries, `extra`, and (when there
/// are any) the parts it names.
fn head_content<'a>(
    record: &RuntimeRecord,
    tail: &[Item],
    extra: &Map<String, Value>,
    gen: u64,
    parts: impl Iterator<Item = &'a Part>,
) -> Value {
    let mut head = scalars(record);
    extend(&mut head, tail.iter().cloned());
    let mut content = to_object(&head);
    for (k, v) in extra {
        content.insert(k.clone(), v.clone());
    }
    let mut list = Vec::new();
    let mut removed = Vec::new();
    for part in parts {
        list.push(json!([part.slot, part.gen]));
        if !part.removed.is_empty() {
            removed.push(json!([part.slot, ranges(&part.removed)]));
        }
    }
    if !list.is_empty() {
        content.insert("gen".into(), json!(gen));
        content.insert("parts".into(), Value::Array(list));
    }
    if !removed.is_empty() {
        content.insert("removed".into(), Value::Array(removed));
    }
    Value::Object(content)
}

/// `record` without its entries.
fn scalars(record: &RuntimeRecord) -> RuntimeRecord {
    RuntimeRecord {
        user: record.user.clone(),
        node: record.node.clone(),
        attached_ms: record.attached_ms,
        released: record.released,
        ..RuntimeRecord::default()
    }
}

/// What a head names: `(slot, gen)` of its parts, in order (empty: none), and its `gen`.
pub fn named_parts(head: &Value) -> (Vec<(u32, u64)>, u64) {
    let gen = head.get("gen").and_then(Value::as_u64).unwrap_or(0);
    let parts = head
        .get("parts")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|p| {
                    let slot = u32::try_from(p.get(0)?.as_u64()?).ok()?;
                    Some((slot, p.get(1)?.as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    (parts, gen)
}

/// The places removed from each part a head names (`removed`: `[[slot, "0-99,104"], …]`).
/// Unreadable: none (a head written before removals were recorded has none).
fn removed_parts(head: &Value) -> HashMap<u32, BTreeSet<u32>> {
    let mut removed = HashMap::new();
    for entry in head
        .get("removed")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let slot = entry
            .get(0)
            .and_then(Value::as_u64)
            .and_then(|s| u32::try_from(s).ok());
        let (Some(slot), Some(text)) = (slot, entry.get(1).and_then(Value::as_str)) else {
            continue;
        };
        removed.insert(slot, parse_ranges(text));
    }
    removed
}

/// `set` as ranges: `"0-99,104"`.
fn ranges(set: &BTreeSet<u32>) -> String {
    let mut out = String::new();
    let mut iter = set.iter().copied().peekable();
    while let Some(start) = iter.next() {
        let mut end = start;
        while iter.peek() == Some(&(end + 1)) {
            end += 1;
            iter.next();
        }
        if !out.is_empty() {
            out.push(',');
        }
        match start == end {
            true => out.push_str(&start.to_string()),
            false => out.push_str(&format!("{start}-{end}")),
        }
    }
    out
}

/// What [`ranges`] wrote (pieces that do not read are skipped).
fn parse_ranges(text: &str) -> BTreeSet<u32> {
    let mut set = BTreeSet::new();
    for piece in text.split(',').filter(|p| !p.is_empty()) {
        let (start, end) = piece.split_once('-').unwrap_or((piece, piece));
        if let (Ok(start), Ok(end)) = (start.parse::<u32>(), end.parse::<u32>()) {
            // A part holds at most a few thousand entries: a range past that is damage.
            if end >= start && end - start < 1 << 16 {
                set.extend(start..=end);
            }
        }
    }
    set
}

/// The bytes `set` takes in a head (as [`ranges`] writes it, an upper bound).
fn removed_len(set: &BTreeSet<u32>) -> usize {
    if set.is_empty() {
        return 0;
    }
    ranges(set).len() + 16
}

/// Reads a part's content as its generation, writer and entries.
fn read_part(content: &Value) -> Option<(u64, Option<String>, Vec<Item>)> {
    let gen = content.get("gen")?.as_u64()?;
    let writer = content
        .get("writer")
        .and_then(Value::as_str)
        .map(str::to_string);
    let record: RuntimeRecord = serde_json::from_value(content.clone()).ok()?;
    Some((gen, writer, items(&record)))
}

/// A runtime's record from its head and the parts it names (`part(slot)`: that slot's
/// content, if any): the record, its layout when it has parts, and the slots the head names
/// that are missing, of another generation or by another writer (left out of the record).
pub fn assemble(
    head: &Value,
    mut part: impl FnMut(u32) -> Option<Value>,
) -> (RuntimeRecord, Option<Layout>, Vec<u32>) {
    let head_record: RuntimeRecord = serde_json::from_value(head.clone()).unwrap_or_default();
    let (named, gen) = named_parts(head);
    if named.is_empty() {
        return (head_record, None, Vec::new());
    }
    let head_writer = head.get("writer").and_then(Value::as_str);
    let mut record = scalars(&head_record);
    let mut parts = Vec::with_capacity(named.len());
    let mut missing = Vec::new();
    let mut removed = removed_parts(head);
    for (slot, want) in named {
        match part(slot).as_ref().and_then(read_part) {
            Some((got, writer, items))
                if got == want && writer.as_deref().is_none_or(|w| Some(w) == head_writer) =>
            {
                let part = Part {
                    slot,
                    gen: got,
                    // One written before parts said who wrote them is the head's writer's.
                    writer: writer.or_else(|| head_writer.map(str::to_string)),
                    items,
                    removed: removed.remove(&slot).unwrap_or_default(),
                };
                extend(&mut record, part.live().cloned());
                parts.push(part);
            }
            _ => missing.push(slot),
        }
    }
    extend(&mut record, items(&head_record));
    let layout = Layout {
        gen,
        parts,
        ..Layout::default()
    };
    (record, Some(layout), missing)
}

/// A state event's type, state key and content, when it has all three.
pub fn state_event(event: &Value) -> Option<(&str, &str, &Value)> {
    Some((
        event.get("type").and_then(Value::as_str)?,
        event.get("state_key").and_then(Value::as_str)?,
        event.get("content")?,
    ))
}

/// The runtimes in a room's state events (heads and parts as `GET /state` gives them):
/// each record, with its layout when it has parts or stale slots. A head whose named parts
/// are not all there (damage: the write order never leaves that) is restored from what is
/// there, and logged; parts without a live head are ignored.
pub fn load(events: &[Value]) -> Loaded {
    let mut heads: BTreeMap<String, &Value> = BTreeMap::new();
    let mut parts: HashMap<String, BTreeMap<u32, &Value>> = HashMap::new();
    for event in events {
        let Some((kind, key, content)) = state_event(event) else {
            continue;
        };
        match kind {
            super::store::RUNTIME_EVENT_TYPE => {
                heads.insert(key.to_string(), content);
            }
            PART_EVENT_TYPE if content.get("gen").is_some() => {
                if let Some((runtime, slot)) = key.rsplit_once('#') {
                    if let Ok(slot) = slot.parse::<u32>() {
                        parts
                            .entry(runtime.to_string())
                            .or_default()
                            .insert(slot, content);
                    }
                }
            }
            _ => {}
        }
    }
    let mut loaded = Loaded::default();
    for (url, head) in heads {
        let mine = parts.remove(&url).unwrap_or_default();
        let (record, layout, missing) =
            assemble(head, |slot| mine.get(&slot).map(|c| (*c).clone()));
        if !missing.is_empty() {
            tracing::error!(runtime = %url, ?missing, "store: parts the runtime's head names are missing; restored without them");
            loaded.damaged += 1;
        }
        if record.is_empty() {
            loaded.orphans += mine.len();
            continue;
        }
        let mut layout = layout.unwrap_or_else(|| Layout {
            gen: named_parts(head).1,
            ..Layout::default()
        });
        let named: BTreeSet<u32> = layout.parts.iter().map(|p| p.slot).collect();
        layout.stale = mine
            .keys()
            .copied()
            .filter(|s| !named.contains(s))
            .collect();
        if !layout.parts.is_empty() || !layout.stale.is_empty() {
            loaded.layouts.insert(url.clone(), layout);
        }
        loaded.runtimes.insert(url, record);
    }
    loaded.orphans += parts.values().map(BTreeMap::len).sum::<usize>();
    loaded
}

/// What [`load`] found.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Runtime URL → record (deleted ones left out).
    pub runtimes: BTreeMap<String, RuntimeRecord>,
    /// Runtime URL → layout, for records with parts or stale slots.
    pub layouts: HashMap<String, Layout>,
    /// Parts no live head names (ignored).
    pub orphans: usize,
    /// Heads whose named parts were not all there.
    pub damaged: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::store::RUNTIME_EVENT_TYPE;

    const RT: &str = "runtime://example.com/big";

    /// A room's state, as the writes leave it.
    #[derive(Default, Clone)]
    struct Room(BTreeMap<(String, String), Value>);

    impl Room {
        fn put(&mut self, kind: &str, key: String, content: Value) {
            self.0.insert((kind.to_string(), key), content);
        }

        /// The plan's writes in order, each a step that may be the last before a crash.
        fn steps(plan: &Plan) -> Vec<(String, String, Value)> {
            let mut steps: Vec<(String, String, Value)> = plan
                .parts
                .iter()
                .map(|(slot, c)| (PART_EVENT_TYPE.to_string(), part_key(RT, *slot), c.clone()))
                .collect();
            steps.push((
                RUNTIME_EVENT_TYPE.to_string(),
                RT.to_string(),
                plan.head.clone(),
            ));
            steps.extend(
                plan.empty
                    .iter()
                    .map(|slot| (PART_EVENT_TYPE.to_string(), part_key(RT, *slot), json!({}))),
            );
            steps
        }

        fn events(&self) -> Vec<Value> {
            self.0
                .iter()
                .map(|((kind, key), content)| {
                    json!({"type": kind, "state_key": key, "content": content})
                })
                .collect()
        }

        fn load(&self) -> Loaded {
            load(&self.events())
        }
    }

    fn record(addresses: std::ops::Range<usize>) -> RuntimeRecord {
        let mut record = RuntimeRecord {
            user: Some("@alice:example.com".into()),
            ..RuntimeRecord::default()
        };
        for i in addresses {
            record
                .allocations
                .entry(format!("{:08}", i / 3))
                .or_default()
                .push(format!("hyperty://example.com/{i:036}"));
        }
        record.subscriptions.insert(
            "context://example.com/x/changes".into(),
            "hyperty://example.com/0".into(),
        );
        record
            .claimed
            .push("hyperty-runtime://example.com/big/sm".into());
        record
    }

    fn sorted(mut record: RuntimeRecord) -> RuntimeRecord {
        record.allocations.values_mut().for_each(|b| b.sort());
        record.foreign.sort();
        record.claimed.sort();
        record
    }

    /// Carries `plan` out on `room` completely; the layout after it.
    fn apply(room: &mut Room, plan: &Plan) -> Option<Layout> {
        for (kind, key, content) in Room::steps(plan) {
            room.put(&kind, key, content);
        }
        plan.layout.clone()
    }

    #[test]
    fn a_small_record_is_one_event_and_a_big_one_is_split_under_the_limit() {
        let small = record(0..10);
        let plan = super::plan(None, &small, &Map::new()).expect("plan");
        assert!(plan.parts.is_empty() && plan.layout.is_none());
        assert_eq!(plan.head, serde_json::to_value(&small).expect("json"));

        let big = record(0..2000);
        let plan = super::plan(None, &big, &Map::new()).expect("plan");
        assert!(plan.parts.len() >= 2, "{} parts", plan.parts.len());
        for content in plan.parts.iter().map(|(_, c)| c).chain([&plan.head]) {
            assert!(
                content_len(content) <= MAX_CONTENT_BYTES,
                "{}",
                content_len(content)
            );
        }
        let mut room = Room::default();
        apply(&mut room, &plan);
        let loaded = room.load();
        assert_eq!(loaded.runtimes[RT], big, "read back as written, in order");
        assert_eq!(loaded.layouts[RT], plan.layout.expect("layout"));
    }

    #[test]
    fn appending_costs_what_was_added_not_what_the_record_holds() {
        let mut room = Room::default();
        let mut layout = apply(
            &mut room,
            &super::plan(None, &record(0..2000), &Map::new()).expect("plan"),
        );
        let (mut parts_written, mut added) = (0, 0);
        for end in (2010..6000).step_by(10) {
            let plan = super::plan(layout.as_ref(), &record(0..end), &Map::new()).expect("plan");
            assert!(
                content_len(&plan.head) <= TAIL_BYTES + 2_000,
                "a head of {} bytes",
                content_len(&plan.head)
            );
            parts_written += plan
                .parts
                .iter()
                .map(|(_, c)| content_len(c))
                .sum::<usize>();
            added += items(&record(end - 10..end))
                .iter()
                .filter(|i| matches!(i, Item::Allocation(..)))
                .map(Item::bytes)
                .sum::<usize>();
            layout = apply(&mut room, &plan);
        }
        assert!(
            parts_written <= 3 * added,
            "{parts_written} bytes of parts written for {added} bytes added"
        );
        let parts = layout.as_ref().map_or(0, |l| l.parts.len());
        assert!(
            parts <= 6000 * 80 / MIN_PART_BYTES + SMALL_PARTS + 1,
            "{parts} parts"
        );
        let loaded = room.load();
        assert_eq!(sorted(loaded.runtimes[RT].clone()), sorted(record(0..5990)));
        assert!(loaded.layouts[RT].stale.is_empty(), "merged parts emptied");
        assert_eq!(loaded.orphans, 0);
    }

    #[test]
    fn a_crash_between_any_two_writes_leaves_the_old_record_or_the_new_one() {
        let mut tombstone = record(0..0);
        tombstone.allocations.clear();
        tombstone.subscriptions.clear();
        tombstone.released = true;
        let mut shrunk = record(0..3000);
        shrunk
            .allocations
            .retain(|k, _| k.as_str() < "00000100" || k.as_str() > "00000900");
        let history = [
            record(0..1500),
            record(0..3000),
            shrunk,
            record(0..3500),
            record(0..20),
            record(0..2500),
            tombstone,
            record(0..1200),
        ];
        let mut room = Room::default();
        let mut layout: Option<Layout> = None;
        let mut old: Option<RuntimeRecord> = None;
        for new in history {
            let plan = super::plan(layout.as_ref(), &new, &Map::new()).expect("plan");
            let steps = Room::steps(&plan);
            let head_at = plan.parts.len();
            for crash_after in 0..steps.len() {
                let mut crashed = room.clone();
                for (kind, key, content) in &steps[..=crash_after] {
                    crashed.put(kind, key.clone(), content.clone());
                }
                let loaded = crashed.load();
                assert_eq!(loaded.damaged, 0);
                let got = loaded.runtimes.get(RT).cloned().map(sorted);
                let want = if crash_after >= head_at {
                    Some(sorted(new.clone()))
                } else {
                    old.clone().map(sorted)
                };
                assert!(got == want, "after write {crash_after} of {}", steps.len());
            }
            layout = apply(&mut room, &plan);
            old = Some(new);
        }
        // Every slot the last head does not name was emptied.
        let loaded = room.load();
        assert!(loaded.layouts.get(RT).is_none_or(|l| l.stale.is_empty()));
        assert_eq!(loaded.orphans, 0);
    }

    #[test]
    fn parts_the_head_does_not_name_are_ignored_and_emptied_next() {
        let mut room = Room::default();
        let layout = apply(
            &mut room,
            &super::plan(None, &record(0..2000), &Map::new()).expect("plan"),
        );
        // A write that did not reach its head: a stale extra part, and one over a slot the
        // head names written in another generation (as damage).
        let stale = Part {
            slot: 99,
            gen: 1,
            writer: None,
            items: vec![Item::Foreign("hyperty://evil.example/1".into())],
            ..Part::default()
        };
        room.put(PART_EVENT_TYPE, part_key(RT, 99), stale.content());
        let loaded = room.load();
        assert_eq!(
            loaded.runtimes[RT],
            record(0..2000),
            "the stale part is not read"
        );
        let known = &loaded.layouts[RT];
        assert_eq!(known.stale, BTreeSet::from([99]));
        let next = super::plan(Some(known), &record(0..2100), &Map::new()).expect("plan");
        assert!(next.empty.contains(&99), "emptied after the next head");
        assert!(
            next.parts.iter().all(|(slot, _)| *slot != 99),
            "never written over"
        );

        // Parts with no head (the head was deleted, or never written) are orphans.
        let mut headless = room.clone();
        headless
            .0
            .remove(&(RUNTIME_EVENT_TYPE.to_string(), RT.to_string()));
        let loaded = headless.load();
        assert!(loaded.runtimes.is_empty());
        assert!(loaded.orphans >= 2);

        // A head naming a part that is not there in its generation: restored without it,
        // and said so.
        let slot = layout.expect("layout").parts[0].slot;
        room.put(
            PART_EVENT_TYPE,
            part_key(RT, slot),
            Part {
                slot,
                gen: 12345,
                ..Part::default()
            }
            .content(),
        );
        let loaded = room.load();
        assert_eq!(loaded.damaged, 1);
        assert!(loaded.runtimes[RT].user.is_some(), "still its owner's");
    }

    fn written_by(name: &str) -> Map<String, Value> {
        Map::from_iter([("writer".to_string(), json!(name))])
    }

    /// M1: a part is its writer's. A head names only its writer's parts, a load takes only
    /// those (or parts that say no writer: records stored before parts said), and another
    /// writer's new parts go into slots of its own.
    #[test]
    fn a_part_is_its_writers_and_parts_written_before_still_load() {
        let mut room = Room::default();
        let first = super::plan(None, &record(0..2000), &written_by("a")).expect("plan");
        let layout = apply(&mut room, &first).expect("parts");
        assert!(layout
            .parts
            .iter()
            .all(|p| p.writer.as_deref() == Some("a")));
        assert_eq!(room.load().runtimes[RT], record(0..2000));

        // Stored before parts said who wrote them: loaded as they were.
        let mut old = room.clone();
        for ((kind, _), content) in old.0.iter_mut() {
            if kind == PART_EVENT_TYPE {
                content.as_object_mut().map(|c| c.remove("writer"));
            }
        }
        let loaded = old.load();
        assert_eq!(
            (loaded.damaged, &loaded.runtimes[RT]),
            (0, &record(0..2000))
        );

        // Another writer keeps none of a's parts, and writes its own elsewhere.
        let other = super::plan(Some(&layout), &record(0..2000), &written_by("b")).expect("plan");
        let a_slots: BTreeSet<u32> = layout.parts.iter().map(|p| p.slot).collect();
        let b_layout = other.layout.clone().expect("parts");
        assert!(b_layout
            .parts
            .iter()
            .all(|p| p.writer.as_deref() == Some("b")));
        assert!(b_layout.parts.iter().all(|p| !a_slots.contains(&p.slot)));
        assert!(a_slots.iter().all(|s| other.empty.contains(s)));

        // A head naming a slot that holds another writer's part of the same generation:
        // damaged, not read as its own.
        let (slot, gen) = (layout.parts[0].slot, layout.parts[0].gen);
        let foreign = Part {
            slot,
            gen,
            writer: Some("b".into()),
            items: vec![Item::Foreign("hyperty://evil.example/1".into())],
            ..Part::default()
        };
        room.put(PART_EVENT_TYPE, part_key(RT, slot), foreign.content());
        let loaded = room.load();
        assert_eq!(loaded.damaged, 1);
        assert!(!loaded.runtimes[RT]
            .foreign
            .contains(&"hyperty://evil.example/1".to_string()));
    }

    /// `record(0..n)` without the allocations whose index is in `gone`.
    fn without(n: usize, gone: impl Fn(usize) -> bool) -> RuntimeRecord {
        let mut r = record(0..n);
        for block in r.allocations.values_mut() {
            block.retain(|a| {
                let i: usize = a
                    .rsplit('/')
                    .next()
                    .and_then(|i| i.parse().ok())
                    .unwrap_or(0);
                !gone(i)
            });
        }
        r.allocations.retain(|_, b| !b.is_empty());
        r
    }

    #[test]
    fn removals_are_recorded_in_the_head_instead_of_rewriting_parts() {
        let mut room = Room::default();
        let mut layout = apply(
            &mut room,
            &super::plan(None, &record(0..6000), &Map::new()).expect("plan"),
        );
        let parts_before = layout.as_ref().map_or(0, |l| l.parts.len());
        assert!(parts_before >= 5, "{parts_before} parts");
        // Released one by one in order, then every third of what is left: each write is a
        // head (with its removals) and now and then a part emptied or rewritten.
        let (mut part_bytes, mut empties, mut writes) = (0, 0, 0);
        let mut steps: Vec<Box<dyn Fn(usize) -> bool>> = Vec::new();
        for end in (30..3000).step_by(30) {
            steps.push(Box::new(move |i| i < end));
        }
        for end in (3000..6000).step_by(90) {
            steps.push(Box::new(move |i| i < 3000 || (i % 3 == 0 && i < end)));
        }
        for gone in &steps {
            let want = without(6000, gone);
            let plan = super::plan(layout.as_ref(), &want, &Map::new()).expect("plan");
            assert!(
                content_len(&plan.head) <= TAIL_BYTES + REMOVED_BYTES + 2_000,
                "a head of {} bytes",
                content_len(&plan.head)
            );
            part_bytes += plan
                .parts
                .iter()
                .map(|(_, c)| content_len(c))
                .sum::<usize>();
            empties += plan.empty.len();
            writes += 1;
            layout = apply(&mut room, &plan);
            // What a restarted node reads: never an entry removed.
            if writes % 5 == 0 {
                let loaded = room.load();
                assert_eq!(sorted(loaded.runtimes[RT].clone()), sorted(want));
                assert_eq!(loaded.damaged, 0);
            }
        }
        // Rewritten parts are rare: far less than a part per write.
        assert!(
            part_bytes <= writes * MAX_CONTENT_BYTES / 8,
            "{part_bytes} bytes of parts over {writes} writes"
        );
        assert!(
            empties <= parts_before + writes / 8,
            "{empties} slots emptied"
        );
    }

    #[test]
    fn an_entry_removed_and_added_again_is_held_once_and_removed_for_good() {
        let mut room = Room::default();
        let big = record(0..3000);
        let gone = without(3000, |i| i == 5);
        let five = Item::Allocation(
            format!("{:08}", 5 / 3),
            format!("hyperty://example.com/{:036}", 5),
        );
        let mut layout = apply(
            &mut room,
            &super::plan(None, &big, &Map::new()).expect("plan"),
        );
        let held = |layout: &Option<Layout>| {
            layout.as_ref().map_or(0, |l| {
                l.parts
                    .iter()
                    .map(|p| p.live().filter(|i| **i == five).count())
                    .sum::<usize>()
            })
        };
        assert_eq!(held(&layout), 1, "in a part");
        let count = |room: &Room| {
            items(&room.load().runtimes[RT])
                .into_iter()
                .filter(|i| *i == five)
                .count()
        };
        layout = apply(
            &mut room,
            &super::plan(layout.as_ref(), &gone, &Map::new()).expect("plan"),
        );
        assert_eq!((held(&layout), count(&room)), (0, 0));
        layout = apply(
            &mut room,
            &super::plan(layout.as_ref(), &big, &Map::new()).expect("plan"),
        );
        assert_eq!(count(&room), 1, "held once");
        apply(
            &mut room,
            &super::plan(layout.as_ref(), &gone, &Map::new()).expect("plan"),
        );
        assert_eq!(count(&room), 0, "not resurrected");
    }

    #[test]
    fn removals_count_places_as_a_load_reads_them_whatever_order_parts_were_merged_in() {
        // Keys out of allocation order (as random allocation keys are): sealed tails and
        // merged parts hold entries in another order than their content reads back in.
        let key = |i: usize| format!("{:016x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let upto = |n: usize, gone: &dyn Fn(usize) -> bool| {
            let mut r = RuntimeRecord {
                user: Some("@alice:example.com".into()),
                ..RuntimeRecord::default()
            };
            for i in (0..n).filter(|i| !gone(*i)) {
                r.allocations
                    .insert(key(i), vec![format!("hyperty://example.com/{i:036}")]);
            }
            r
        };
        let mut room = Room::default();
        let mut layout = None;
        for n in (100..4000).step_by(100) {
            let plan = super::plan(layout.as_ref(), &upto(n, &|_| false), &Map::new());
            layout = apply(&mut room, &plan.expect("plan"));
        }
        for end in (25..4000).step_by(75) {
            let want = upto(4000 - 100, &|i| i < end);
            let plan = super::plan(layout.as_ref(), &want, &Map::new()).expect("plan");
            layout = apply(&mut room, &plan);
            let loaded = room.load();
            assert_eq!(loaded.runtimes[RT], want, "released up to {end}");
            assert_eq!(
                loaded.layouts.get(RT).map(|l| l.parts.clone()),
                layout.as_ref().map(|l| l.parts.clone())
            );
        }
    }

    #[test]
    fn removed_places_read_back_as_written() {
        for set in [
            BTreeSet::new(),
            BTreeSet::from([0]),
            BTreeSet::from([0, 1, 2, 5, 7, 8, 100]),
            (10..600).collect(),
        ] {
            assert_eq!(parse_ranges(&ranges(&set)), set);
        }
        assert_eq!(ranges(&BTreeSet::from([0, 1, 2, 5, 7, 8])), "0-2,5,7-8");
        assert_eq!(parse_ranges("x,3,9-7,1-2"), BTreeSet::from([1, 2, 3]));
        assert!(
            parse_ranges("0-4294967295").is_empty(),
            "damage is not read"
        );
    }

    #[test]
    fn too_large_is_refused_before_anything_is_written() {
        let mut huge_key = record(0..1);
        huge_key
            .allocations
            .insert("k".repeat(70_000), vec!["hyperty://example.com/x".into()]);
        assert!(check(&huge_key).is_err());
        assert!(super::plan(None, &huge_key, &Map::new()).is_err());
        let mut many = record(0..0);
        let address = format!("hyperty://example.com/{}", "a".repeat(200));
        many.allocations
            .insert("k".into(), vec![address; MAX_RECORD_BYTES / 200]);
        let refused = check(&many).expect_err("too large");
        assert!(refused.0.contains("at most"), "{refused}");
        assert!(check(&record(0..10_000)).is_ok());
    }

    #[test]
    fn json_lengths_are_exact() {
        for s in [
            "",
            "plain",
            "quote\"back\\slash",
            "ctl\u{1}\n\t",
            "ünïcødé ✓",
        ] {
            assert_eq!(
                json_len(s),
                serde_json::to_string(s).expect("json").len(),
                "{s:?}"
            );
        }
    }
}
