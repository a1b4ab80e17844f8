//! Emitting evidence: every decision, mint and refusal becomes an event on the audit stream.
//!
//! [`AuditEmitter::emit`] never waits: it puts the event in a bounded in-memory queue and
//! returns (the gateway's per-request decision records, [`AuditEmitter::emit_packed`], go to a
//! bounded ring of the emitting thread's own instead: see `Rings`). A background task drains
//! the queue and the rings in batches (up to 1024 events or whatever has accumulated) and
//! publishes each batch as **one** signed bus message (kind [`BATCH_KIND`],
//! one MAC and one stream entry for the lot), retrying with backoff until the bus accepts it.
//! Every event in a batch keeps its own id, kind, tenant and time; consumers see them
//! individually through [`expand`], and the ledger records each as its own leaf. When the queue
//! (or the thread's ring) is full — the bus has been unreachable long enough — `emit` fails,
//! and callers **fail closed** (the gateway refuses the request, the STS refuses to mint):
//! nothing is decided that cannot be recorded. On shutdown the queue and the rings are flushed.
//!
//! The window of loss is the queue's content when a process is killed (`kill -9`) before the
//! next flush (the 2 ms a batch gathers plus one publish). Graceful stops lose nothing, with
//! one bounded exception: a packed record whose thread saw the rings open at the stop but was
//! descheduled for longer than the final 2 ms gathering before pushing it (see `Rings`).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::bus::{Bus, BusAuth, Envelope, Event, streams};
use crate::error::{Error, ErrorCode, Result};
use crate::ids::{EventId, TenantId};
use crate::metrics::NAMESPACE;
use crate::shutdown::Shutdown;
use crate::time::{Micros, now_micros};

/// How long the publisher lets a batch gather after its first event.
const LINGER: Duration = Duration::from_millis(2);

/// How long an idle publisher waits before looking at the rings of packed records again even
/// if no wake-up came (see [`Rings`]: a wake-up can be missed, never an event).
const IDLE: Duration = Duration::from_millis(20);

/// The most events in one published batch.
const BATCH_MAX: usize = 1024;

/// The most events a thread's ring of packed records holds (see [`Rings`]); the publisher
/// takes them into its backlog of up to the emitter's capacity every [`LINGER`]. 4,096 slots
/// are ~1.8 MB per emitting thread, and well over 100 ms of one thread's requests.
const RING_MAX: usize = 4096;

/// Kind of a bus message that carries several audit events.
pub const BATCH_KIND: &str = "audit.batch";

/// One queued event: its body as JSON text, or a record the publisher serialises (the batch
/// is checked for UTF-8 once, by the publisher, off the caller's path).
struct Pending {
    kind: &'static str,
    tenant: Option<TenantId>,
    ts: Micros,
    body: Body,
}

/// What a queued event carries: JSON text, or a record the publisher serialises (so the
/// emitting thread — the gateway's request path — does not), boxed or packed into the slot.
#[expect(
    clippy::large_enum_variant,
    reason = "a packed record is inline on purpose: boxing it is what it avoids"
)]
enum Body {
    Json(Vec<u8>),
    Deferred(Box<dyn Record>),
    Packed(Packed),
}

/// Room for a [`Packed`] record's bytes.
pub const PACKED_MAX: usize = 384;

/// A record packed into bytes on the emitting thread and written as JSON from those bytes by
/// the publisher ([`AuditEmitter::emit_packed`]). It travels inside the queue's own slot, so
/// nothing the emitting thread allocated is freed on the publisher's: a record that owns heap
/// memory (a [`Record`] in a box, its strings) is freed there, and its blocks return to the
/// emitting thread's allocator from the other core. On the gateway's thread auditing cost ~2 µs
/// per request while records left it that way, and packing its decision record cut the
/// gateway's own CPU per request by ~3 % (bench/RESULTS.md).
pub struct Packed {
    write: fn(&[u8], &mut Vec<u8>) -> serde_json::Result<()>,
    len: u16,
    bytes: [u8; PACKED_MAX],
}

impl Packed {
    /// An empty record whose bytes `write` will turn into exactly one JSON value.
    pub fn new(write: fn(&[u8], &mut Vec<u8>) -> serde_json::Result<()>) -> Packed {
        Packed {
            write,
            len: 0,
            bytes: [0; PACKED_MAX],
        }
    }

    /// Append `b`; `false`, with nothing appended, when it does not fit.
    pub fn push(&mut self, b: &[u8]) -> bool {
        let at = usize::from(self.len);
        match at.checked_add(b.len()).and_then(|end| self.bytes.get_mut(at..end)) {
            Some(room) => {
                room.copy_from_slice(b);
                self.len += b.len() as u16;
                true
            }
            None => false,
        }
    }

    /// The bytes pushed so far.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Its JSON, as the publisher writes it.
    pub fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
        (self.write)(self.bytes(), out)
    }
}

/// A record the audit publisher serialises, off the emitting thread
/// ([`AuditEmitter::emit_record`]).
pub trait Record: Send + 'static {
    /// Append the record as exactly one JSON value to `out`.
    fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()>;
}

/// Writes one JSON object straight into a buffer, for records written once per request (the
/// gateway's decision and settlement records): serde's generic path escapes every key,
/// dispatches per field and formats ids and addresses through `fmt`. Keys are literals that
/// need no escaping; values are escaped as serde_json escapes them (tested).
pub struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    pub fn new(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, empty: true }
    }

    /// `"key":` (after a comma unless first). `key` is a literal with nothing to escape.
    fn key(&mut self, key: &'static str) -> &mut Vec<u8> {
        debug_assert!(!needs_escape(key), "a JSON key to escape: {key}");
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        self.out.push(b'"');
        self.out.extend_from_slice(key.as_bytes());
        self.out.extend_from_slice(b"\":");
        self.out
    }

    /// A string member.
    pub fn str(&mut self, key: &'static str, value: &str) -> &mut Self {
        let out = self.key(key);
        write_str(out, value);
        self
    }

    /// A string member, or `null`.
    pub fn opt_str(&mut self, key: &'static str, value: Option<&str>) -> &mut Self {
        match value {
            Some(v) => self.str(key, v),
            None => self.null(key),
        }
    }

    /// A member written by `Display` as a JSON string (ids, addresses), or `null`.
    pub fn opt_display(&mut self, key: &'static str, value: Option<impl std::fmt::Display>) -> &mut Self {
        use std::io::Write as _;
        match value {
            Some(v) => {
                let out = self.key(key);
                out.push(b'"');
                let at = out.len();
                let _ = write!(out, "{v}");
                if needs_escape_bytes(&out[at..]) {
                    // `Display` writes UTF-8, so this is the text itself.
                    let text = String::from_utf8_lossy(&out[at..]).into_owned();
                    out.truncate(at - 1);
                    write_str(out, &text);
                } else {
                    out.push(b'"');
                }
                self
            }
            None => self.null(key),
        }
    }

    /// An address as a JSON string (as `Display` writes it; IPv4 without the formatting
    /// machinery, which cost ~1,000 instructions per address), or `null`.
    pub fn opt_ip(&mut self, key: &'static str, value: Option<std::net::IpAddr>) -> &mut Self {
        match value {
            Some(std::net::IpAddr::V4(v4)) => {
                let out = self.key(key);
                out.push(b'"');
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        out.push(b'.');
                    }
                    if octet >= 100 {
                        out.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        out.push(b'0' + octet / 10 % 10);
                    }
                    out.push(b'0' + octet % 10);
                }
                out.push(b'"');
                self
            }
            other => self.opt_display(key, other),
        }
    }

    pub fn bool(&mut self, key: &'static str, value: bool) -> &mut Self {
        self.key(key).extend_from_slice(if value { b"true" } else { b"false" });
        self
    }

    /// An integer member.
    pub fn int(&mut self, key: &'static str, value: i64) -> &mut Self {
        // (serde_json writes integers without `fmt`'s machinery.)
        let _ = serde_json::to_writer(&mut *self.key(key), &value);
        self
    }

    /// An object member, written by `f`.
    pub fn object(&mut self, key: &'static str, f: impl FnOnce(&mut JsonObject<'_>)) -> &mut Self {
        let mut o = JsonObject::new(&mut *self.key(key));
        f(&mut o);
        o.finish();
        self
    }

    /// An array of objects, each written by `each`.
    pub fn objects<T>(
        &mut self,
        key: &'static str,
        items: &[T],
        mut each: impl FnMut(&T, &mut JsonObject<'_>),
    ) -> &mut Self {
        let out = self.key(key);
        out.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            let mut o = JsonObject::new(&mut *out);
            each(item, &mut o);
            o.finish();
        }
        out.push(b']');
        self
    }

    pub fn null(&mut self, key: &'static str) -> &mut Self {
        self.key(key).extend_from_slice(b"null");
        self
    }

    /// A member serialised by serde (for the rare, nested parts of a record).
    pub fn serde(&mut self, key: &'static str, value: &impl serde::Serialize) -> serde_json::Result<&mut Self> {
        serde_json::to_writer(&mut *self.key(key), value)?;
        Ok(self)
    }

    pub fn finish(self) {
        self.out.push(b'}');
    }
}

fn needs_escape(s: &str) -> bool {
    needs_escape_bytes(s.as_bytes())
}

fn needs_escape_bytes(b: &[u8]) -> bool {
    // Without an early exit, so the compiler checks 16 bytes at a time.
    b.iter()
        .fold(false, |found, &c| found | (c < 0x20) | (c == b'"') | (c == b'\\'))
}

/// `value` as a JSON string: copied when nothing in it needs escaping (the common case, checked
/// first), else escaped by serde_json.
fn write_str(out: &mut Vec<u8>, value: &str) {
    if needs_escape(value) {
        let _ = serde_json::to_writer(&mut *out, value);
    } else {
        out.reserve(value.len() + 2);
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    }
}

#[derive(serde::Deserialize)]
struct BatchItem {
    id: EventId,
    kind: String,
    #[serde(default)]
    tenant: Option<TenantId>,
    ts: Micros,
    body: Value,
}

#[derive(serde::Deserialize)]
struct BatchBody {
    events: Vec<BatchItem>,
}

/// The events a bus message carries: the members of a batch, or the message itself.
pub fn expand(ev: Event) -> Vec<Event> {
    if ev.kind != BATCH_KIND {
        return vec![ev];
    }
    match serde_json::from_value::<BatchBody>(ev.body.clone()) {
        Ok(b) => b
            .events
            .into_iter()
            .map(|i| Event {
                entry_id: ev.entry_id.clone(),
                id: i.id,
                stream: ev.stream.clone(),
                kind: i.kind,
                tenant: i.tenant,
                seq: None,
                ts: i.ts,
                body: i.body,
                deliveries: ev.deliveries,
            })
            .collect(),
        Err(e) => {
            tracing::warn!(entry = %ev.entry_id, error = %e, "malformed audit batch");
            Vec::new()
        }
    }
}

fn batch_envelope(items: &[Pending]) -> Envelope {
    let mut body: Vec<u8> = Vec::with_capacity(
        items
            .iter()
            .map(|p| match &p.body {
                Body::Json(b) => b.len() + 128,
                Body::Deferred(_) | Body::Packed(_) => 512,
            })
            .sum::<usize>()
            + 16,
    );
    let mut id = [0u8; crate::ids::ID_TEXT_MAX];
    body.extend_from_slice(b"{\"events\":[");
    for (i, p) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        // The event's id is made here, on the publisher's thread, not by the emitter (a v7
        // id takes the clock and the random generator: the gateway's request path is spared).
        let event_id = EventId::new();
        body.extend_from_slice(b"{\"id\":\"");
        body.extend_from_slice(event_id.encode(&mut id).as_bytes());
        body.extend_from_slice(b"\",\"kind\":");
        let _ = serde_json::to_writer(&mut body, p.kind);
        if let Some(t) = p.tenant {
            body.extend_from_slice(b",\"tenant\":\"");
            body.extend_from_slice(t.encode(&mut id).as_bytes());
            body.push(b'"');
        }
        body.extend_from_slice(b",\"ts\":");
        // (serde_json writes integers without `fmt`'s machinery.)
        let _ = serde_json::to_writer(&mut body, &p.ts);
        body.extend_from_slice(b",\"body\":");
        let at = body.len();
        let written = match &p.body {
            Body::Json(b) => {
                body.extend_from_slice(b);
                Ok(())
            }
            Body::Deferred(r) => r.write_json(&mut body),
            Body::Packed(r) => r.write_json(&mut body),
        };
        if let Err(e) = written {
            // Plain data structs do not fail to serialise (nor do records packed by the code
            // that writes them); were one to, the event still stands (id, kind, time) and says
            // why its content is missing.
            body.truncate(at);
            tracing::error!(event = %event_id, kind = p.kind, error = %e, "an audit record could not be serialised");
            body.extend_from_slice(br#"{"error":"the record could not be serialised"}"#);
        }
        body.push(b'}');
    }
    body.extend_from_slice(b"]}");
    // Bodies are serde_json output or `String`s, so this is UTF-8; were it not, the invalid
    // bytes would become U+FFFD inside their JSON strings (the batch stays one JSON value).
    let body = String::from_utf8(body).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned());
    Envelope::with_body(streams::AUDIT, BATCH_KIND, None, body)
}

/// Packed records wait in rings, one per thread that emits them, instead of the shared queue:
/// pushing one is a copy into memory only that thread writes and one plain store, where the
/// queue took four atomic read-modify-writes per event (its semaphore, its tail index, the
/// slot's ready bit, the receiver's waker), the last two after the slot is written (on x86 a
/// locked instruction first waits for the slot's bytes to leave the store buffer). Each ring holds up to [`RING_MAX`] events (fewer when the emitter's capacity
/// is smaller); the publisher moves what the rings hold into its backlog of up to the capacity
/// every [`LINGER`], also while the bus is slow or refusing, and batches from there. When the
/// backlog is full, the rings fill, and pushes are refused.
///
/// Order: events from one thread stay in order; events the same task emitted from two threads
/// (a task that moved between them) may be published in either order (their times tell). Only
/// the gateway's per-request decision records travel this way (one per request); every other
/// event keeps the queue's single order.
///
/// Wake-up: a push that finds its ring empty (as far as its thread can see) wakes the
/// publisher. Without a fence on the emitting side, a push racing with the publisher's last
/// look can miss that wake-up; the publisher then finds the event within [`IDLE`].
///
/// Stop: a push looks at `closed` first; the publisher closes the rings, then lets [`LINGER`]
/// pass before every read that follows, so a push that saw them open lands before the last
/// read unless its thread was descheduled between the look and the push for longer than that.
struct Rings {
    /// Tells this emitter's rings from another's in a thread's list.
    id: u64,
    capacity: usize,
    consumers: Mutex<Vec<rtrb::Consumer<Pending>>>,
    wake: tokio::sync::Notify,
    /// Set when the publisher stops: pushes are refused from then on.
    closed: AtomicBool,
}

thread_local! {
    /// This thread's rings, one per emitter it has pushed packed records through.
    static RINGS: RefCell<Vec<(u64, rtrb::Producer<Pending>)>> = const { RefCell::new(Vec::new()) };
}

impl Rings {
    fn new(capacity: usize) -> Rings {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Rings {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            capacity,
            consumers: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    fn consumers(&self) -> MutexGuard<'_, Vec<rtrb::Consumer<Pending>>> {
        // Nothing that holds the lock can leave the list half-changed.
        self.consumers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Push onto this thread's ring (made on the thread's first push); `false`, with the event
    /// dropped, when the ring is full or the publisher has stopped.
    fn push(&self, p: Pending) -> bool {
        if self.closed.load(Ordering::Acquire) {
            return false;
        }
        // (`try_with`: a thread whose locals are being torn down has no ring.)
        let pushed = RINGS.try_with(|rings| {
            let Ok(mut rings) = rings.try_borrow_mut() else {
                return None;
            };
            let at = match rings.iter().position(|(id, _)| *id == self.id) {
                Some(at) => at,
                None => {
                    // Rings whose publisher has gone are dropped with the new one's arrival.
                    rings.retain(|(_, r)| !r.is_abandoned());
                    let (tx, rx) = rtrb::RingBuffer::new(self.capacity);
                    self.consumers().push(rx);
                    rings.push((self.id, tx));
                    rings.len() - 1
                }
            };
            let ring = &mut rings[at].1;
            let was_empty = ring.slots() == self.capacity;
            ring.push(p).ok().map(|()| was_empty)
        });
        match pushed {
            Ok(Some(was_empty)) => {
                if was_empty {
                    self.wake.notify_one();
                }
                true
            }
            _ => false,
        }
    }

    /// Whether this thread's ring has room (a thread that has none yet has).
    fn has_room(&self) -> bool {
        !self.closed.load(Ordering::Acquire)
            && RINGS
                .try_with(|rings| {
                    rings.try_borrow().is_ok_and(|rings| {
                        rings
                            .iter()
                            .find(|(id, _)| *id == self.id)
                            .is_none_or(|(_, r)| !r.is_full())
                    })
                })
                .unwrap_or(false)
    }

    fn is_empty(&self) -> bool {
        self.consumers().iter().all(|c| c.is_empty())
    }

    /// The events waiting in every ring.
    fn len(&self) -> usize {
        self.consumers().iter().map(|c| c.slots()).sum()
    }

    /// Move up to `max` events in all into `into`; rings whose thread has ended go once empty.
    /// Returns how many were moved.
    fn take(&self, into: &mut std::collections::VecDeque<Pending>, max: usize) -> usize {
        let mut taken = 0;
        self.consumers().retain_mut(|c| {
            let n = c.slots().min(max - taken);
            if let Ok(chunk) = c.read_chunk(n) {
                into.extend(chunk);
                taken += n;
            }
            !(c.is_abandoned() && c.is_empty())
        });
        taken
    }

    /// Refuse pushes from now on.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Closes the rings however the publisher ends (a dropped task too), so that no push is
/// accepted that nobody will take, and frees them.
struct CloseRings(Arc<Rings>);

impl Drop for CloseRings {
    fn drop(&mut self) {
        self.0.close();
        self.0.consumers().clear();
    }
}

/// `audit_buffer_depth`, read when scraped: the events in the queue, the rings and the
/// publisher's backlog plus those of the batch being published. Nothing on the emitting path
/// updates it (a gauge both the emitting threads and the publisher wrote moved one cache line
/// between cores on every event).
struct Depth {
    gauge: IntGauge,
    /// Weak: the registry must not keep the queue open.
    tx: mpsc::WeakSender<Pending>,
    rings: Weak<Rings>,
    backlog: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
}

impl Collector for Depth {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let queued = self.tx.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity());
        let ringed = self.rings.upgrade().map_or(0, |r| r.len());
        let held = self.backlog.load(Ordering::Relaxed) + self.in_flight.load(Ordering::Relaxed);
        self.gauge.set((queued + ringed + held) as i64);
        self.gauge.collect()
    }
}

#[derive(Clone)]
pub struct AuditEmitter {
    tx: mpsc::Sender<Pending>,
    rings: Arc<Rings>,
    /// `audit_events_total{outcome="queued"}` and `{outcome="refused"}`, resolved once (a
    /// label lookup hashes and locks; this is on every request's path).
    queued: IntCounter,
    refused: IntCounter,
}

impl AuditEmitter {
    /// Start the publisher task. `capacity` bounds the queue, and the publisher's backlog of
    /// packed records (each thread's ring holds up to [`RING_MAX`] more).
    pub fn start(
        bus: Arc<dyn Bus>,
        auth: BusAuth,
        capacity: usize,
        registry: &Registry,
        shutdown: Shutdown,
    ) -> (AuditEmitter, tokio::task::JoinHandle<()>) {
        let capacity = capacity.max(16);
        let (tx, rx) = mpsc::channel(capacity);
        let rings = Arc::new(Rings::new(capacity.min(RING_MAX)));
        let depth = IntGauge::with_opts(
            Opts::new("audit_buffer_depth", "Audit events waiting to be published").namespace(NAMESPACE),
        )
        .expect("valid metric");
        let cap = IntGauge::with_opts(
            Opts::new(
                "audit_buffer_capacity",
                "Capacity of the audit buffer (the queue, and the backlog of packed records)",
            )
            .namespace(NAMESPACE),
        )
        .expect("valid metric");
        cap.set(capacity as i64);
        let events = IntCounterVec::new(
            Opts::new(
                "audit_events_total",
                "Audit events by outcome (queued, published, refused; packed records count as queued when the publisher takes them)",
            )
            .namespace(NAMESPACE),
            &["outcome"],
        )
        .expect("valid metric");
        let in_flight = Arc::new(AtomicUsize::new(0));
        let backlog_len = Arc::new(AtomicUsize::new(0));
        let _ = registry.register(Box::new(Depth {
            gauge: depth,
            tx: tx.downgrade(),
            rings: Arc::downgrade(&rings),
            backlog: backlog_len.clone(),
            in_flight: in_flight.clone(),
        }));
        let _ = registry.register(Box::new(cap));
        let _ = registry.register(Box::new(events.clone()));
        let queued = events.with_label_values(&["queued"]);
        let me = AuditEmitter {
            tx,
            rings: rings.clone(),
            queued: queued.clone(),
            refused: events.with_label_values(&["refused"]),
        };
        let publisher = Publisher {
            bus,
            auth,
            rings,
            backlog: std::collections::VecDeque::new(),
            backlog_len,
            capacity,
            in_flight,
            queued,
            published: events.with_label_values(&["published"]),
        };
        let task = tokio::spawn(publisher.run(rx, shutdown));
        (me, task)
    }

    /// Queue one event. Fails (callers must refuse the action) when the queue is full.
    pub fn emit(&self, kind: &'static str, tenant: Option<TenantId>, body: &Value) -> Result<()> {
        self.emit_json(kind, tenant, body.to_string())
    }

    /// Queue one event whose record writes its own JSON on the publisher's thread, not the
    /// caller's (records that own their data: the gateway's per-request decision and
    /// settlement events).
    pub fn emit_record<R: Record>(&self, kind: &'static str, tenant: Option<TenantId>, record: R) -> Result<()> {
        self.queue(kind, tenant, Body::Deferred(Box::new(record)))
    }

    /// Queue one event packed into its slot (see [`Packed`]) on this thread's ring (see
    /// [`Rings`]: events from one thread keep their order; use it only for events that need no
    /// order with others). Fails when the ring is full.
    pub fn emit_packed(&self, kind: &'static str, tenant: Option<TenantId>, record: Packed) -> Result<()> {
        let p = Pending {
            kind,
            tenant,
            ts: now_micros(),
            body: Body::Packed(record),
        };
        // (Counted as queued by the publisher when it takes them: a shared counter here is an
        // atomic read-modify-write on every request.)
        if self.rings.push(p) { Ok(()) } else { Err(self.refuse()) }
    }

    /// Queue one event whose body is already JSON text (the caller serialised it, e.g. from a
    /// struct, without building a `Value`). The text must be one JSON value.
    pub fn emit_json(&self, kind: &'static str, tenant: Option<TenantId>, body: String) -> Result<()> {
        self.queue(kind, tenant, Body::Json(body.into_bytes()))
    }

    fn queue(&self, kind: &'static str, tenant: Option<TenantId>, body: Body) -> Result<()> {
        let p = Pending {
            kind,
            tenant,
            ts: now_micros(),
            body,
        };
        match self.tx.try_send(p) {
            Ok(()) => {
                self.queued.inc();
                Ok(())
            }
            Err(_) => Err(self.refuse()),
        }
    }

    fn refuse(&self) -> Error {
        self.refused.inc();
        Error::new(
            ErrorCode::AuditUnavailable,
            "the audit pipeline cannot accept events; refusing to act unrecorded",
        )
    }

    /// Whether the queue, and this thread's ring, have room (for readiness and fail-closed
    /// checks before acting).
    pub fn has_room(&self) -> bool {
        self.tx.capacity() > 0 && self.rings.has_room()
    }
}

/// The task that publishes what the queue and the rings hold.
struct Publisher {
    bus: Arc<dyn Bus>,
    auth: BusAuth,
    rings: Arc<Rings>,
    /// Events taken from the rings, waiting for a batch: up to `capacity` (the rings are small,
    /// and are read every [`LINGER`] even while the bus refuses).
    backlog: std::collections::VecDeque<Pending>,
    backlog_len: Arc<AtomicUsize>,
    capacity: usize,
    in_flight: Arc<AtomicUsize>,
    queued: IntCounter,
    published: IntCounter,
}

impl Publisher {
    async fn run(mut self, mut rx: mpsc::Receiver<Pending>, shutdown: Shutdown) {
        let _close = CloseRings(self.rings.clone());
        let mut batch: Vec<Pending> = Vec::with_capacity(BATCH_MAX);
        // The queue has ended: stopped, or every emitter dropped (nothing new can come then,
        // but what the rings and the backlog hold is still published).
        let mut ended = false;
        loop {
            if !ended && self.backlog.is_empty() && self.rings.is_empty() {
                tokio::select! {
                    e = rx.recv() => match e {
                        Some(e) => batch.push(e),
                        None => ended = true,
                    },
                    () = self.rings.wake.notified() => {}
                    () = tokio::time::sleep(IDLE) => continue,
                    () = shutdown.wait(), if !rx.is_closed() => {
                        // Refuse what comes from now on; publish what has come.
                        rx.close();
                        self.rings.close();
                    }
                }
            }
            // Let a batch gather for a moment (never delays the emitters, which do not wait):
            // under load this turns thousands of tiny publishes a second into a few hundred.
            // After a stop it also lets a push that passed the rings' check a moment before
            // they closed land before they are read for the last time.
            tokio::time::sleep(LINGER).await;
            // Whatever arrived meanwhile, in one take: the queue's slots go back once per batch
            // (`try_recv` gave each one back on its own, locking the queue's semaphore, whose
            // cache line the emitting threads then missed). Never waits: only this task
            // receives, so a queue that is not empty stays so until it is read.
            if !rx.is_empty() {
                let room = BATCH_MAX - batch.len();
                rx.recv_many(&mut batch, room).await;
            } else if rx.is_closed() && !ended {
                // Closed and empty: `recv` says so at once.
                ended = rx.recv().await.is_none();
            }
            self.fill_backlog();
            let room = BATCH_MAX - batch.len();
            batch.extend(self.backlog.drain(..room.min(self.backlog.len())));
            self.backlog_len.store(self.backlog.len(), Ordering::Relaxed);
            if batch.is_empty() {
                if ended {
                    break;
                }
                continue;
            }
            self.publish(&mut batch, &shutdown).await;
        }
    }

    /// Move what the rings hold into the backlog, up to the capacity (beyond it the rings
    /// fill, and refuse).
    fn fill_backlog(&mut self) {
        let room = self.capacity.saturating_sub(self.backlog.len());
        if room > 0 {
            let n = self.rings.take(&mut self.backlog, room);
            self.queued.inc_by(n as u64);
            self.backlog_len.store(self.backlog.len(), Ordering::Relaxed);
        }
    }

    /// `f`, taking what the rings hold into the backlog every [`LINGER`] while it runs (a
    /// publish the bus is slow to take, or refuses, must not leave each thread only its ring).
    async fn draining<F: Future>(&mut self, f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        loop {
            tokio::select! {
                out = &mut f => return out,
                () = tokio::time::sleep(LINGER) => self.fill_backlog(),
            }
        }
    }

    /// Publish `batch` as one message (retrying until the bus takes it), and empty it.
    async fn publish(&mut self, batch: &mut Vec<Pending>, shutdown: &Shutdown) {
        let n = batch.len();
        self.in_flight.store(n, Ordering::Relaxed);
        let payload = self.auth.sign(batch_envelope(batch)).to_bytes();
        batch.clear();
        let mut backoff = Duration::from_millis(20);
        loop {
            let bus = self.bus.clone();
            match self.draining(bus.publish(streams::AUDIT, payload.clone())).await {
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, events = n, "audit publish failed; retrying");
                    if shutdown.is_triggered() && backoff > Duration::from_secs(2) {
                        tracing::error!(events = n, "giving up on audit events at shutdown");
                        break;
                    }
                    self.draining(tokio::time::sleep(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
        self.in_flight.store(0, Ordering::Relaxed);
        self.published.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_objects_are_written_as_serde_writes_them() {
        use std::net::IpAddr;
        let texts = [
            "",
            "plain",
            "q\"uote",
            "back\\slash",
            "ctl\u{0}\u{1f}\n",
            "del\u{7f}",
            "é ü 🦀",
        ];
        let ips: Vec<IpAddr> = [
            "0.0.0.0",
            "9.10.99.100",
            "255.255.255.255",
            "127.0.0.1",
            "::1",
            "::ffff:10.0.0.1",
            "fd00:ec2::254",
        ]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
        for t in texts {
            for ip in &ips {
                let mut out = Vec::new();
                let mut o = JsonObject::new(&mut out);
                // Keys in sorted order, as `json!` (a sorted map here) writes them.
                o.bool("b", t.is_empty())
                    .opt_display("d", Some(t))
                    .opt_ip("ip", Some(*ip))
                    .opt_str("n", None)
                    .opt_ip("none", None)
                    .opt_str("o", Some(t))
                    .str("s", t);
                o.serde("v", &vec![t]).unwrap();
                o.int("w", -(t.len() as i64) * 1_000_000_007)
                    .objects("x", &[t, "y"], |v, o| {
                        o.str("k", v).int("l", v.len() as i64);
                    })
                    .objects::<&str>("z", &[], |_, _| {})
                    .object("zz", |o| {
                        o.object("e", |_| {}).str("m", t);
                    });
                o.finish();
                let expected = serde_json::json!({
                    "s": t, "n": null, "o": t, "ip": ip, "none": null, "d": t, "b": t.is_empty(), "v": [t],
                    "w": -(t.len() as i64) * 1_000_000_007,
                    "x": [{"k": t, "l": t.len()}, {"k": "y", "l": 1}], "z": [], "zz": {"m": t, "e": {}},
                });
                assert_eq!(
                    String::from_utf8(out).unwrap(),
                    serde_json::to_string(&expected).unwrap()
                );
            }
        }
    }

    /// A record that writes its own JSON.
    struct Settled;

    impl Record for Settled {
        fn write_json(&self, out: &mut Vec<u8>) -> serde_json::Result<()> {
            let mut o = JsonObject::new(out);
            o.serde("settled", &serde_json::json!([1, "x\"y"]))?;
            o.finish();
            Ok(())
        }
    }

    #[test]
    fn a_batch_expands_into_its_events() {
        let t = TenantId::new();
        let items = vec![
            Pending {
                kind: "decision",
                tenant: Some(t),
                ts: 5,
                body: Body::Json(br#"{"a":1}"#.to_vec()),
            },
            Pending {
                kind: "mint \"x\"",
                tenant: None,
                ts: 6,
                body: Body::Json(b"[1,2]".to_vec()),
            },
            Pending {
                kind: "metering",
                tenant: Some(t),
                ts: 7,
                body: Body::Deferred(Box::new(Settled)),
            },
            Pending {
                kind: "packed",
                tenant: None,
                ts: 8,
                body: Body::Packed(packed_pair(b"k\"ey", b"v")),
            },
            Pending {
                kind: "packed",
                tenant: None,
                ts: 9,
                // Bytes its writer refuses: the event stands, saying its content is missing.
                body: Body::Packed(packed_pair(b"", b"")),
            },
        ];
        let env = batch_envelope(&items);
        let ev = Event {
            entry_id: "1-0".into(),
            id: env.id,
            stream: env.stream.clone(),
            kind: env.kind.clone(),
            tenant: None,
            seq: None,
            ts: env.ts,
            body: serde_json::from_str(&env.body).unwrap(),
            deliveries: 1,
        };
        let out = expand(ev);
        assert_eq!(out.len(), 5);
        // Every event has its own id.
        assert!(out[0].id != out[1].id && out[1].id != out[2].id && out[0].id != out[2].id);
        assert_eq!(
            (out[0].kind.as_str(), out[0].tenant, out[0].ts),
            ("decision", Some(t), 5)
        );
        assert_eq!(out[0].body, serde_json::json!({"a": 1}));
        assert_eq!((out[1].kind.as_str(), out[1].tenant), ("mint \"x\"", None));
        assert_eq!(out[1].body, serde_json::json!([1, 2]));
        assert_eq!((out[2].kind.as_str(), out[2].ts), ("metering", 7));
        assert_eq!(out[2].body, serde_json::json!({"settled": [1, "x\"y"]}));
        assert_eq!((out[3].kind.as_str(), out[3].ts), ("packed", 8));
        assert_eq!(out[3].body, serde_json::json!({"k\"ey": "v"}));
        assert_eq!(
            out[4].body,
            serde_json::json!({"error": "the record could not be serialised"})
        );
        assert!(out.iter().all(|e| e.entry_id == "1-0"));
    }

    /// A record packed as a key and a value, one length byte each, written as `{key: value}`
    /// (an empty key is refused).
    fn packed_pair(k: &[u8], v: &[u8]) -> Packed {
        fn write(b: &[u8], out: &mut Vec<u8>) -> serde_json::Result<()> {
            let bad = || <serde_json::Error as serde::de::Error>::custom("bad pair");
            let (&kl, rest) = b.split_first().ok_or_else(bad)?;
            let (k, rest) = rest.split_at_checked(usize::from(kl)).ok_or_else(bad)?;
            let (&vl, v) = rest.split_first().ok_or_else(bad)?;
            if k.is_empty() || v.len() != usize::from(vl) {
                return Err(bad());
            }
            let (k, v) = (
                std::str::from_utf8(k).map_err(|_| bad())?,
                std::str::from_utf8(v).map_err(|_| bad())?,
            );
            serde_json::to_writer(&mut *out, &serde_json::json!({ k: v }))
        }
        let mut p = Packed::new(write);
        assert!(p.push(&[k.len() as u8]) && p.push(k) && p.push(&[v.len() as u8]) && p.push(v));
        p
    }

    #[test]
    fn packed_records_take_what_fits_and_nothing_of_what_does_not() {
        let mut p = Packed::new(|_, _| Ok(()));
        assert!(p.push(&[1; PACKED_MAX - 1]));
        assert!(!p.push(&[2, 2]), "two bytes do not fit in one");
        assert_eq!(p.bytes(), &[1; PACKED_MAX - 1][..], "nothing of what did not fit");
        assert!(p.push(&[3]));
        assert!(!p.push(&[4]));
        assert_eq!(p.bytes().len(), PACKED_MAX);
        assert_eq!(p.bytes()[PACKED_MAX - 1], 3);
    }

    /// An emitter with room for 16 events, publishing to an embedded bus that refuses every
    /// publish until told otherwise.
    async fn on_a_failing_bus() -> (
        crate::testing::BusEnv,
        Arc<crate::testing::FaultyBus>,
        Registry,
        Shutdown,
        AuditEmitter,
        tokio::task::JoinHandle<()>,
    ) {
        use crate::config::BusBackend;
        use crate::testing::{BusEnv, FaultyBus, shutdown};
        let env = BusEnv::new(BusBackend::Embedded).await.expect("an embedded bus");
        let faulty = Arc::new(FaultyBus::new(env.bus.clone()));
        faulty.fail_after(0);
        let registry = Registry::new();
        let sd = shutdown();
        let (em, task) = AuditEmitter::start(faulty.clone(), env.auth(), 16, &registry, sd.clone());
        (env, faulty, registry, sd, em, task)
    }

    /// The value of the gauge `caracal_<name>` in `registry`.
    fn gauge(registry: &Registry, name: &str) -> f64 {
        registry
            .gather()
            .iter()
            .find(|f| f.name() == format!("caracal_{name}"))
            .map(|f| f.get_metric()[0].get_gauge().get_value())
            .expect("gauge registered")
    }

    /// Every audit event on the bus so far.
    async fn on_the_bus(env: &crate::testing::BusEnv) -> Vec<Event> {
        let auth = env.auth();
        env.bus
            .read_after(streams::AUDIT, "0", 100_000, Duration::from_millis(5))
            .await
            .unwrap()
            .iter()
            .map(|e| auth.verify(streams::AUDIT, &e.id, e.payload.as_deref(), 0).unwrap())
            .flat_map(expand)
            .collect()
    }

    /// Four threads emit 1,500 events `{"t": thread, "i": n}` each (several batches' worth)
    /// through `emit` and end; every event is published once, with its own id, in its thread's
    /// order. Returns the emitter, still running, for further checks.
    async fn from_four_threads(
        emit: fn(&AuditEmitter, u8, u32) -> Result<()>,
    ) -> (
        crate::testing::BusEnv,
        Registry,
        Shutdown,
        AuditEmitter,
        tokio::task::JoinHandle<()>,
    ) {
        use crate::config::BusBackend;
        use crate::testing::{BusEnv, eventually, shutdown};
        let env = BusEnv::new(BusBackend::Embedded).await.expect("an embedded bus");
        let registry = Registry::new();
        let sd = shutdown();
        let (em, task) = AuditEmitter::start(env.bus.clone(), env.auth(), 8192, &registry, sd.clone());
        let threads: Vec<_> = (0..4u8)
            .map(|t| {
                let em = em.clone();
                std::thread::spawn(move || {
                    for i in 0..1500 {
                        emit(&em, t, i).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(
            eventually(Duration::from_secs(20), || async {
                on_the_bus(&env).await.len() >= 6000
            })
            .await,
            "every event published"
        );
        let events = on_the_bus(&env).await;
        assert_eq!(events.len(), 6000, "nothing twice");
        let mut next = [0i64; 4];
        for e in &events {
            let t = e.body["t"].as_u64().unwrap() as usize;
            assert_eq!(
                e.body["i"].as_i64().unwrap(),
                next[t],
                "thread {t}'s events in its order"
            );
            next[t] += 1;
        }
        let ids: std::collections::HashSet<_> = events.iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), 6000, "every event has its own id");
        (env, registry, sd, em, task)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn events_from_many_threads_are_published_once_each_in_each_threads_order() {
        let (env, _, sd, _em, task) =
            from_four_threads(|em, t, i| em.emit("test", None, &serde_json::json!({ "t": t, "i": i }))).await;
        sd.trigger();
        task.await.unwrap();
        env.cleanup().await;
    }

    #[tokio::test]
    async fn a_full_queue_refuses_events_until_the_bus_takes_them_and_a_stop_flushes_then_refuses() {
        use crate::testing::eventually;
        let (env, faulty, registry, sd, em, task) = on_a_failing_bus().await;
        // The bus refuses: the publisher holds the batch it took, and the queue fills up.
        em.emit("test", None, &serde_json::json!({ "i": 0 })).unwrap();
        // The depth counts it once the publisher has taken it into a batch (before, it is 0: the
        // event left the queue but the batch is still gathering).
        let depth = || gauge(&registry, "audit_buffer_depth");
        assert!(
            eventually(Duration::from_secs(5), || async {
                depth() == 1.0 && em.tx.capacity() == 16
            })
            .await
        );
        let mut accepted = 1;
        let refusal = loop {
            match em.emit("test", None, &serde_json::json!({ "i": accepted })) {
                Ok(()) => accepted += 1,
                Err(e) => break e,
            }
            assert!(accepted <= 16 + 1, "the queue holds at most its capacity");
        };
        assert_eq!(refusal.code, ErrorCode::AuditUnavailable);
        assert_eq!(accepted, 17, "the one being retried and a full queue");
        assert!(!em.has_room());
        // The bus is back: everything accepted is published, and events are taken again.
        faulty.fail_after(-1);
        assert!(eventually(Duration::from_secs(10), || async { on_the_bus(&env).await.len() == 17 }).await);
        assert!(em.has_room());
        em.emit("test", None, &serde_json::json!({ "i": 17 })).unwrap();
        em.emit_json("test", None, r#"{"i":18}"#.into()).unwrap();
        // A stop publishes what is left and refuses what comes after.
        sd.trigger();
        task.await.unwrap();
        let bodies: Vec<i64> = on_the_bus(&env)
            .await
            .iter()
            .map(|e| e.body["i"].as_i64().unwrap())
            .collect();
        assert_eq!(bodies, (0..19).collect::<Vec<_>>());
        let late = em.emit("test", None, &serde_json::json!({ "i": 19 })).unwrap_err();
        assert_eq!(late.code, ErrorCode::AuditUnavailable);
        env.cleanup().await;
    }

    #[tokio::test]
    async fn the_publisher_ends_after_flushing_the_queue_and_the_rings_when_the_last_emitter_is_dropped() {
        use crate::config::BusBackend;
        use crate::testing::{BusEnv, shutdown};
        let env = BusEnv::new(BusBackend::Embedded).await.expect("an embedded bus");
        let registry = Registry::new();
        let (em, task) = AuditEmitter::start(env.bus.clone(), env.auth(), 64, &registry, shutdown());
        let other = em.clone();
        em.emit("test", None, &serde_json::json!({ "i": 0 })).unwrap();
        em.emit_packed("test", None, packed_ti(0, 1)).unwrap();
        drop(em);
        other.emit("test", None, &serde_json::json!({ "i": 2 })).unwrap();
        other.emit_packed("test", None, packed_ti(0, 3)).unwrap();
        drop(other);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("the publisher ends")
            .unwrap();
        let mut published: Vec<i64> = on_the_bus(&env)
            .await
            .iter()
            .map(|e| e.body["i"].as_i64().unwrap())
            .collect();
        published.sort_unstable();
        assert_eq!(published, [0, 1, 2, 3], "the queue's and the ring's, each once");
        env.cleanup().await;
    }

    /// A packed record written as `{"t": t, "i": i}`.
    fn packed_ti(t: u8, i: u32) -> Packed {
        fn write(b: &[u8], out: &mut Vec<u8>) -> serde_json::Result<()> {
            let bad = || <serde_json::Error as serde::de::Error>::custom("bad record");
            let (&t, i) = b.split_first().ok_or_else(bad)?;
            let i = u32::from_le_bytes(i.try_into().map_err(|_| bad())?);
            serde_json::to_writer(&mut *out, &serde_json::json!({ "t": t, "i": i }))
        }
        let mut p = Packed::new(write);
        assert!(p.push(&[t]) && p.push(&i.to_le_bytes()));
        p
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn packed_events_from_many_threads_are_published_once_each_in_each_threads_order() {
        use crate::testing::eventually;
        let (env, registry, sd, em, task) =
            from_four_threads(|em, t, i| em.emit_packed("test", None, packed_ti(t, i))).await;
        assert!(
            eventually(Duration::from_secs(5), || async { em.rings.consumers().is_empty() }).await,
            "the rings of threads that ended are dropped once read"
        );
        let count = |outcome: &str| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == "caracal_audit_events_total")
                .and_then(|f| {
                    f.get_metric()
                        .iter()
                        .find(|m| m.get_label()[0].value() == outcome)
                        .map(|m| m.get_counter().get_value())
                })
                .unwrap_or(0.0)
        };
        assert_eq!((count("queued"), count("published")), (6000.0, 6000.0));
        sd.trigger();
        task.await.unwrap();
        env.cleanup().await;
    }

    #[tokio::test]
    async fn full_rings_refuse_packed_events_until_the_bus_takes_them_and_a_stop_flushes_then_refuses() {
        use crate::testing::eventually;
        let (env, faulty, registry, sd, em, task) = on_a_failing_bus().await;
        // The bus refuses: the publisher holds the batch it took, and this thread's ring fills.
        em.emit_packed("test", None, packed_ti(0, 0)).unwrap();
        let depth = || gauge(&registry, "audit_buffer_depth");
        assert!(
            eventually(Duration::from_secs(5), || async {
                depth() == 1.0 && em.rings.is_empty()
            })
            .await
        );
        let mut accepted = 1;
        let fill = |accepted: &mut u32| loop {
            match em.emit_packed("test", None, packed_ti(0, *accepted)) {
                Ok(()) => *accepted += 1,
                Err(e) => break e,
            }
            assert!(
                *accepted <= 1 + 16 + 16,
                "the rings and the backlog hold at most their capacity"
            );
        };
        // (This test's runtime has one thread: the publisher does not run while it fills.)
        let refusal = fill(&mut accepted);
        assert_eq!(refusal.code, ErrorCode::AuditUnavailable);
        assert_eq!(accepted, 17, "the one being retried and a full ring");
        assert!(!em.has_room());
        // While it retries, the publisher takes the ring's events into its backlog.
        assert!(eventually(Duration::from_secs(5), || async { em.rings.is_empty() }).await);
        assert!(em.has_room());
        assert_eq!(depth(), 17.0);
        fill(&mut accepted);
        assert_eq!(accepted, 33, "and the ring again, once the backlog is full");
        assert!(
            !eventually(Duration::from_millis(100), || async { em.rings.is_empty() }).await,
            "a full backlog takes nothing more"
        );
        assert!(!em.has_room());
        assert_eq!(depth(), 33.0);
        // The queue is another thing: it still takes events.
        em.emit("test", None, &serde_json::json!({ "t": 1, "i": 0 })).unwrap();
        // The bus is back: everything accepted is published, and events are taken again.
        faulty.fail_after(-1);
        assert!(eventually(Duration::from_secs(10), || async { on_the_bus(&env).await.len() == 34 }).await);
        assert!(em.has_room());
        assert_eq!(depth(), 0.0);
        em.emit_packed("test", None, packed_ti(0, 33)).unwrap();
        // A stop publishes what is left and refuses what comes after.
        sd.trigger();
        task.await.unwrap();
        let ring: Vec<i64> = on_the_bus(&env)
            .await
            .iter()
            .filter(|e| e.body["t"] == 0)
            .map(|e| e.body["i"].as_i64().unwrap())
            .collect();
        assert_eq!(ring, (0..34).collect::<Vec<_>>(), "each once, in the thread's order");
        let late = em.emit_packed("test", None, packed_ti(0, 34)).unwrap_err();
        assert_eq!(late.code, ErrorCode::AuditUnavailable);
        assert!(!em.has_room());
        env.cleanup().await;
    }

    #[tokio::test]
    async fn the_depth_gauge_counts_queued_and_in_flight_events_when_scraped() {
        use crate::testing::eventually;
        let (env, faulty, registry, sd, em, task) = on_a_failing_bus().await;
        let gauge = |name: &str| gauge(&registry, name);
        assert_eq!(gauge("audit_buffer_depth"), 0.0);
        for i in 0..5 {
            em.emit("test", None, &serde_json::json!({ "i": i })).unwrap();
        }
        // The bus refuses: the events wait, in the queue or in the batch being retried.
        assert!(eventually(Duration::from_secs(5), || async { gauge("audit_buffer_depth") == 5.0 }).await);
        faulty.fail_after(-1);
        assert!(eventually(Duration::from_secs(10), || async { gauge("audit_buffer_depth") == 0.0 }).await);
        assert_eq!(faulty.published(), 1, "one batch");
        sd.trigger();
        drop(em);
        task.await.unwrap();
        env.cleanup().await;
    }
}
