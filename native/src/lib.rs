//! The worker's hot path in native code: parse, check and fold a whole events
//! message in one call, and encode the folded rows as delta row parts. (The
//! gateway's, encoding events into batch messages, is in encode.rs.)
//!
//! It is the same computation as the Python reference (the models of
//! schemas/events.py through processors/decode.py, processors/rollup.py
//! `RollupBuilder`, schemas/deltas.py `_bodies`): `add_message` accepts a strict
//! subset of what the models accept, with their values, and returns None for
//! anything else, so that Python decides, and reports why. Nothing is folded or
//! remembered for a message it returns None for.
//!
//! tests/unit/processors/test_native.py compares the two on generated messages,
//! valid and broken, row for row.

use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList};
use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use std::fmt;
use std::marker::PhantomData;
use std::hash::BuildHasher;

mod encode;

const REQUEST: &str = "tally.request.v1";
const STREAM_OPENED: &str = "tally.stream.opened.v1";
const STREAM_CLOSED: &str = "tally.stream.closed.v1";
const KIND_REQUEST: u8 = 0;
const KIND_OPENED: u8 = 1;
const KIND_CLOSED: u8 = 2;
const KIND_NAMES: [&str; 3] = [REQUEST, STREAM_OPENED, STREAM_CLOSED];
/// The largest measure one event may carry (schemas/events.py `MAX_UNITS`).
const MAX_UNITS: f64 = 1e12;
/// The store's sums are UInt64: a row's larger sum goes out as several rows.
const U64_MAX: i128 = u64::MAX as i128;
/// Times are taken only in [1970, 2106): there the rollup minute of a UTC time is
/// the minute its text names (a float timestamp keeps whole seconds exact there).
const MIN_YEAR: i64 = 1970;
const MAX_YEAR: i64 = 2105;

/// Absent stays None; present (null included) is Some: `check` refuses some
/// attributes even when null, so presence must be told apart from null.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// `present` for an object: `data` must be a JSON object, as for the models.
fn present_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    Object::<T>::deserialize(d).map(|o| Some(o.0))
}

/// A struct read only from a JSON object. serde's derived structs also read a JSON
/// array, as their fields in order (`"data": [5]` would be 5 units); the models take
/// objects only, so an array sends the message to Python, which rejects it.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(PhantomData)).map(Object)
    }
}

// Borrowed strings only: a string with an escape fails to borrow, so the message
// goes to Python (rare: ids, sources and subjects need none).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEvent<'a> {
    specversion: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    id: &'a str,
    source: &'a str,
    subject: &'a str,
    time: &'a str,
    #[serde(default, borrow)]
    datacontenttype: Option<&'a str>,
    #[serde(default, borrow, deserialize_with = "present_object")]
    data: Option<RawData<'a>>,
}

/// Every attribute of the three types' data; `check` refuses those a type lacks.
/// serde refuses a repeated attribute (the models keep the last): to Python.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData<'a> {
    #[serde(default, deserialize_with = "present")]
    units: Option<Option<f64>>,
    #[serde(default, borrow, deserialize_with = "present")]
    route: Option<Option<&'a str>>,
    #[serde(default, borrow, deserialize_with = "present")]
    method: Option<Option<&'a str>>,
    #[serde(default, deserialize_with = "present")]
    status: Option<Option<i64>>,
    #[serde(default, borrow, deserialize_with = "present")]
    model: Option<Option<&'a str>>,
    #[serde(default, deserialize_with = "present")]
    latency_ms: Option<Option<f64>>,
    #[serde(default, deserialize_with = "present")]
    bytes_in: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    bytes_out: Option<Option<u64>>,
    #[serde(default, borrow, deserialize_with = "present")]
    stream_id: Option<Option<&'a str>>,
    #[serde(default, deserialize_with = "present")]
    duration_ms: Option<Option<f64>>,
    #[serde(default, borrow, deserialize_with = "present")]
    reason: Option<Option<&'a str>>,
}

// Attribute bits of `RawData::present`, and which of them each type has.
const UNITS: u16 = 1;
const ROUTE: u16 = 1 << 1;
const METHOD: u16 = 1 << 2;
const STATUS: u16 = 1 << 3;
const MODEL: u16 = 1 << 4;
const LATENCY_MS: u16 = 1 << 5;
const BYTES_IN: u16 = 1 << 6;
const BYTES_OUT: u16 = 1 << 7;
const STREAM_ID: u16 = 1 << 8;
const DURATION_MS: u16 = 1 << 9;
const REASON: u16 = 1 << 10;
const REQUEST_ATTRS: u16 =
    UNITS | ROUTE | METHOD | STATUS | MODEL | LATENCY_MS | BYTES_IN | BYTES_OUT;
const OPENED_ATTRS: u16 = STREAM_ID | ROUTE | MODEL;
const CLOSED_ATTRS: u16 = STREAM_ID | UNITS | DURATION_MS | REASON;

impl<'a> RawData<'a> {
    /// The attributes present, null or not: a type's Struct refuses any it lacks.
    fn present(&self) -> u16 {
        let bits = [
            (self.units.is_some(), UNITS),
            (self.route.is_some(), ROUTE),
            (self.method.is_some(), METHOD),
            (self.status.is_some(), STATUS),
            (self.model.is_some(), MODEL),
            (self.latency_ms.is_some(), LATENCY_MS),
            (self.bytes_in.is_some(), BYTES_IN),
            (self.bytes_out.is_some(), BYTES_OUT),
            (self.stream_id.is_some(), STREAM_ID),
            (self.duration_ms.is_some(), DURATION_MS),
            (self.reason.is_some(), REASON),
        ];
        bits.iter()
            .filter(|(is, _)| *is)
            .fold(0, |all, (_, bit)| all | bit)
    }

    /// Itself, when it has no attribute outside `attrs` (its type's).
    fn only(&self, attrs: u16) -> Option<&Self> {
        (self.present() & !attrs == 0).then_some(self)
    }

    /// A stream's required `stream_id`.
    fn stream_id(&self) -> Option<&'a str> {
        match self.stream_id {
            Some(Some(s)) if chars_within(s, 1, 256) => Some(s),
            _ => None,
        }
    }
}

/// One checked event, in the fold's terms (`RollupBuilder.add_flat`).
struct Event<'a> {
    source: &'a str,
    id: &'a str,
    kind: u8,
    subject: &'a str,
    time_us: i64,
    minute: i64,
    route: &'a str,
    method: &'a str,
    model: &'a str,
    status: i64,
    stream_id: &'a str,
    units: f64,
    latency: f64,
    bytes_in: u64,
    bytes_out: u64,
}

/// The models' min/max_length, in characters. `lo` is 0 or 1 here, so a byte length
/// within the bounds is a character length within them.
fn chars_within(s: &str, lo: usize, hi: usize) -> bool {
    let n = s.len();
    if n >= lo && n <= hi {
        return true;
    }
    let c = s.chars().count();
    c >= lo && c <= hi
}

/// `null` and absent both as absent; a value must be a label of lo..=hi characters.
fn label(v: Option<Option<&str>>, lo: usize, hi: usize) -> Option<&str> {
    match v {
        None | Some(None) => Some(""),
        Some(Some(s)) if chars_within(s, lo, hi) => Some(s),
        Some(Some(_)) => None,
    }
}

fn measure(v: f64) -> bool {
    (0.0..=MAX_UNITS).contains(&v)
}

/// `_NativeUnits | None`: None for refused, Some(0.0) for null or absent.
fn optional_measure(v: Option<Option<f64>>) -> Option<f64> {
    match v {
        None | Some(None) => Some(0.0),
        Some(Some(x)) if measure(x) => Some(x),
        Some(Some(_)) => None,
    }
}

fn count(v: Option<Option<u64>>) -> Option<u64> {
    match v {
        None | Some(None) => Some(0),
        Some(Some(x)) if x <= i64::MAX as u64 => Some(x),
        Some(Some(_)) => None,
    }
}

fn digits(b: &[u8]) -> Option<i64> {
    let mut n: i64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        n = n * 10 + i64::from(c - b'0');
    }
    Some(n)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    // Howard Hinnant's algorithm: days since 1970-01-01 in the proleptic Gregorian calendar.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        _ if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        _ => 28,
    }
}

/// "YYYY-MM-DDTHH:MM:SS[.f{1,6}]Z" as microseconds since the epoch: the part of
/// decode.py's `_TIMES` in UTC, which `datetime.fromisoformat` reads exactly.
/// Offsets other than Z, and anything else, go to Python.
fn parse_time(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let n = b.len();
    if !(20..=27).contains(&n) || b[n - 1] != b'Z' {
        return None;
    }
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    let mut micros = 0;
    if n > 20 {
        if b[19] != b'.' || n == 21 {
            return None;
        }
        let frac = &b[20..n - 1];
        micros = digits(frac)? * 10_i64.pow(6 - frac.len() as u32);
    }
    if !(MIN_YEAR..=MAX_YEAR).contains(&year)
        || !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let days = days_from_civil(year, month, day);
    Some(((days * 24 + hour) * 60 + minute) * 60_000_000 + second * 1_000_000 + micros)
}

fn subject_ok(s: &str) -> bool {
    // schemas/events.py SUBJECT_PATTERN: ^[A-Za-z0-9_.:-]{1,128}$
    !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b':' | b'-'))
}

/// The models' rules (schemas/events.py) for one event, and the clock's bounds;
/// stricter where reading alike would cost (UTC times, no escapes, no unknown
/// attributes, the size bound of decode.py `NATIVE_MAX_EVENT_BYTES`).
fn check<'a>(e: &RawEvent<'a>, lo_us: i64, hi_us: i64) -> Option<Event<'a>> {
    if e.specversion != "1.0"
        || !chars_within(e.id, 1, 128)
        || !chars_within(e.source, 1, 256)
        || !subject_ok(e.subject)
    {
        return None;
    }
    if let Some(t) = e.datacontenttype {
        if !chars_within(t, 0, 256) {
            return None;
        }
    }
    let time_us = parse_time(e.time)?;
    if time_us < lo_us || time_us > hi_us {
        return None;
    }
    let mut ev = Event {
        source: e.source,
        id: e.id,
        kind: KIND_REQUEST,
        subject: e.subject,
        time_us,
        minute: time_us.div_euclid(60_000_000) * 60,
        route: "",
        method: "",
        model: "",
        status: 0,
        stream_id: "",
        units: 0.0,
        latency: 0.0,
        bytes_in: 0,
        bytes_out: 0,
    };
    match e.kind {
        REQUEST => {
            ev.units = 1.0;
            let Some(d) = &e.data else {
                return Some(ev);
            };
            let d = d.only(REQUEST_ATTRS)?;
            match d.units {
                None => {}
                Some(Some(u)) if measure(u) => ev.units = u,
                Some(_) => return None,
            }
            ev.route = label(d.route, 1, 256)?;
            ev.method = label(d.method, 1, 16)?;
            ev.model = label(d.model, 1, 256)?;
            ev.status = match d.status {
                None | Some(None) => 0,
                Some(Some(s)) if (100..=599).contains(&s) => s,
                Some(Some(_)) => return None,
            };
            ev.latency = optional_measure(d.latency_ms)?;
            ev.bytes_in = count(d.bytes_in)?;
            ev.bytes_out = count(d.bytes_out)?;
        }
        STREAM_OPENED => {
            ev.kind = KIND_OPENED;
            let d = e.data.as_ref()?.only(OPENED_ATTRS)?;
            ev.stream_id = d.stream_id()?;
            ev.route = label(d.route, 1, 256)?;
            ev.model = label(d.model, 1, 256)?;
        }
        STREAM_CLOSED => {
            ev.kind = KIND_CLOSED;
            let d = e.data.as_ref()?.only(CLOSED_ATTRS)?;
            ev.stream_id = d.stream_id()?;
            match d.units {
                None => {}
                Some(Some(u)) if measure(u) => ev.units = u,
                Some(_) => return None,
            }
            optional_measure(d.duration_ms)?;
            if let Some(Some(r)) = d.reason {
                if !chars_within(r, 0, 256) {
                    return None;
                }
            }
        }
        _ => return None,
    }
    Some(ev)
}

/// `round(units * 1_000_000)` in Python: round half to even, of the product as a double.
fn to_micro(units: f64) -> i128 {
    (units * 1_000_000.0).round_ties_even() as i128
}

struct Totals {
    /// Where the row's key columns are in `Fold::heads`: as JSON, from "[" to the
    /// comma after stream_id. JSON text names a key exactly, so it is the key too.
    head: (u32, u32),
    last_us: i64,
    events: i64,
    units_micro: i128,
    latency: f64,
    bytes_in: i128,
    bytes_out: i128,
}

pub(crate) fn push_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(&mut *out, s).expect("writing to a Vec cannot fail");
}

/// processors/dedup.py's Deduplicator in native code, for the native fold: the
/// same two generations of (source, id) keys, turned by the same rules. The fold
/// admits a whole message with the clock read once (as `admit_many` does), so no
/// Python string is made for a key. tests/unit/processors/test_native.py compares
/// the two call by call.
#[pyclass(module = "tally_fold")]
struct Dedup {
    #[pyo3(get)]
    window_s: f64,
    #[pyo3(get)]
    max_keys: usize,
    clock: PyObject,
    current: HashMap<Box<str>, HashSet<Box<str>>>,
    previous: HashMap<Box<str>, HashSet<Box<str>>>,
    current_keys: usize,
    previous_keys: usize,
    opened: f64,
}

impl Dedup {
    fn seen(&self, source: &str, id: &str) -> bool {
        self.current.get(source).is_some_and(|ids| ids.contains(id))
            || self
                .previous
                .get(source)
                .is_some_and(|ids| ids.contains(id))
    }

    fn turn(&mut self, now: f64) {
        self.previous = std::mem::take(&mut self.current);
        self.previous_keys = self.current_keys;
        self.current_keys = 0;
        self.opened = now;
    }

    fn remember(&mut self, source: &str, id: &str) {
        match self.current.get_mut(source) {
            Some(ids) => {
                ids.insert(id.into());
            }
            None => {
                let mut ids = HashSet::new();
                ids.insert(id.into());
                self.current.insert(source.into(), ids);
            }
        }
        self.current_keys += 1;
    }

    /// `first_time` with the clock already read (once per message).
    fn admit(&mut self, now: f64, source: &str, id: &str) -> bool {
        if self.seen(source, id) {
            return false;
        }
        if self.current_keys >= self.max_keys || now - self.opened >= self.window_s {
            self.turn(now);
        }
        self.remember(source, id);
        true
    }

    fn now(&self, py: Python<'_>) -> PyResult<f64> {
        self.clock.call0(py)?.extract(py)
    }
}

#[pymethods]
impl Dedup {
    #[new]
    fn new(py: Python<'_>, window_s: f64, max_keys: usize, clock: PyObject) -> PyResult<Self> {
        if window_s <= 0.0 || max_keys == 0 {
            return Err(PyValueError::new_err(
                "window_s and max_keys must be positive",
            ));
        }
        let opened = clock.call0(py)?.extract(py)?;
        Ok(Self {
            window_s,
            max_keys,
            clock,
            current: HashMap::new(),
            previous: HashMap::new(),
            current_keys: 0,
            previous_keys: 0,
            opened,
        })
    }

    /// Remember the key; True when it was not seen within the window (reads the
    /// clock as Deduplicator.first_time does: to check, and again to open).
    fn first_time(&mut self, py: Python<'_>, source: &str, event_id: &str) -> PyResult<bool> {
        if self.seen(source, event_id) {
            return Ok(false);
        }
        if self.current_keys >= self.max_keys || self.now(py)? - self.opened >= self.window_s {
            let now = self.now(py)?;
            self.turn(now);
        }
        self.remember(source, event_id);
        Ok(true)
    }

    /// Deduplicator.admit_many: remember a message's keys with the clock read once;
    /// the indices of its duplicates. Never None: native keys cost no call each.
    fn admit_many(
        &mut self,
        py: Python<'_>,
        sources: Vec<String>,
        ids: Vec<String>,
    ) -> PyResult<Vec<usize>> {
        if sources.len() != ids.len() {
            return Err(PyValueError::new_err("sources and ids differ in length"));
        }
        let now = self.now(py)?;
        let mut duplicates = Vec::new();
        for (i, (source, id)) in sources.iter().zip(&ids).enumerate() {
            if !self.admit(now, source, id) {
                duplicates.push(i);
            }
        }
        Ok(duplicates)
    }

    fn __len__(&self) -> usize {
        self.current_keys + self.previous_keys
    }
}

/// Delta rows folded from many messages, in first-seen order (as a dict keeps them).
///
/// Keys live in one arena and the table holds row numbers: no allocation per row,
/// and `clear` keeps the capacity, so a worker's next batch touches no new pages.
#[pyclass(module = "tally_fold")]
#[derive(Default)]
struct Fold {
    // Seeded per process (foldhash): keys hold what gateways send, so colliding
    // keys cannot be chosen in advance.
    hasher: DefaultHashBuilder,
    table: HashTable<u32>,
    heads: Vec<u8>,
    rows: Vec<Totals>,
    scratch: Vec<u8>,
}

impl Fold {
    fn fold(&mut self, e: &Event<'_>) {
        let (units_micro, latency, time_us) = (to_micro(e.units), e.latency, e.time_us);
        let (bytes_in, bytes_out) = (i128::from(e.bytes_in), i128::from(e.bytes_out));
        let head = &mut self.scratch;
        head.clear();
        head.push(b'[');
        push_json_str(head, e.subject);
        head.push(b',');
        head.extend_from_slice(itoa::Buffer::new().format(e.minute).as_bytes());
        head.push(b',');
        push_json_str(head, KIND_NAMES[e.kind as usize]);
        for s in [e.route, e.method, e.model] {
            head.push(b',');
            push_json_str(head, s);
        }
        head.push(b',');
        head.extend_from_slice(itoa::Buffer::new().format(e.status).as_bytes());
        head.push(b',');
        push_json_str(head, e.stream_id);
        head.push(b',');
        let hash = self.hasher.hash_one(&head[..]);
        let (heads, rows) = (&self.heads, &self.rows);
        let same = |&i: &u32| {
            let (at, len) = rows[i as usize].head;
            heads[at as usize..(at + len) as usize] == head[..]
        };
        if let Some(&i) = self.table.find(hash, same) {
            let t = &mut self.rows[i as usize];
            if time_us > t.last_us {
                t.last_us = time_us;
            }
            t.events += 1;
            t.units_micro += units_micro;
            t.latency += latency;
            t.bytes_in += bytes_in;
            t.bytes_out += bytes_out;
            return;
        }
        let at = self.heads.len() as u32;
        self.heads.extend_from_slice(head);
        let i = self.rows.len() as u32;
        self.rows.push(Totals {
            head: (at, head.len() as u32),
            last_us: time_us,
            events: 1,
            units_micro,
            latency,
            bytes_in,
            bytes_out,
        });
        let (heads, rows, hasher) = (&self.heads, &self.rows, &self.hasher);
        self.table.insert_unique(hash, i, |&j| {
            let (at, len) = rows[j as usize].head;
            hasher.hash_one(&heads[at as usize..(at + len) as usize])
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn row(
        &self,
        out: &mut Vec<u8>,
        t: &Totals,
        events: i64,
        units: i128,
        latency: f64,
        bi: i128,
        bo: i128,
    ) {
        let mut ints = itoa::Buffer::new();
        let (at, len) = t.head;
        out.extend_from_slice(&self.heads[at as usize..(at + len) as usize]);
        out.extend_from_slice(ints.format(events).as_bytes());
        out.push(b',');
        out.extend_from_slice(ints.format(units).as_bytes());
        out.push(b',');
        out.extend_from_slice(ryu::Buffer::new().format_finite(latency).as_bytes());
        out.push(b',');
        out.extend_from_slice(ints.format(bi).as_bytes());
        out.push(b',');
        out.extend_from_slice(ints.format(bo).as_bytes());
        out.push(b',');
        // int(last_time.timestamp() * 1000), as RollupBuilder.wire_rows computes it.
        let ms = (t.last_us as f64 / 1e6 * 1000.0).trunc() as i64;
        out.extend_from_slice(ints.format(ms).as_bytes());
        out.extend_from_slice(b",0]");
    }
}

#[pymethods]
impl Fold {
    #[new]
    fn new() -> Self {
        Self::default()
    }

    fn __len__(&self) -> usize {
        self.rows.len()
    }

    /// Forget every row, keeping the memory for the next batch.
    fn clear(&mut self) {
        self.table.clear();
        self.heads.clear();
        self.rows.clear();
    }

    /// Parse, check and fold one events message. None when any of its events is
    /// not plainly valid and on time (nothing folded or remembered): Python's tiers
    /// decide then. Otherwise `dedup` admits each event (the clock read once);
    /// returns (requests, streams opened, streams closed, duplicates).
    #[pyo3(signature = (value, lo_us, hi_us, max_event_bytes, dedup))]
    fn add_message(
        &mut self,
        py: Python<'_>,
        value: &[u8],
        lo_us: i64,
        hi_us: i64,
        max_event_bytes: usize,
        mut dedup: PyRefMut<'_, Dedup>,
    ) -> PyResult<Option<(u64, u64, u64, u64)>> {
        let batch = value.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'[');
        let raw = if batch {
            match serde_json::from_slice::<Vec<Object<RawEvent<'_>>>>(value) {
                Ok(events) if !events.is_empty() => events,
                _ => return Ok(None),
            }
        } else if value.len() > max_event_bytes {
            return Ok(None); // a single event's limit counts the message's own bytes
        } else {
            match serde_json::from_slice::<Object<RawEvent<'_>>>(value) {
                Ok(event) => vec![event],
                Err(_) => return Ok(None),
            }
        };
        let mut events = Vec::with_capacity(raw.len());
        for Object(e) in &raw {
            match check(e, lo_us, hi_us) {
                Some(ev) => events.push(ev),
                None => return Ok(None),
            }
        }
        let now = dedup.now(py)?;
        let (mut requests, mut opened, mut closed, mut duplicates) = (0u64, 0u64, 0u64, 0u64);
        for e in &events {
            if !dedup.admit(now, e.source, e.id) {
                duplicates += 1;
                continue;
            }
            match e.kind {
                KIND_REQUEST => requests += 1,
                KIND_OPENED => opened += 1,
                _ => closed += 1,
            }
            self.fold(e);
        }
        Ok(Some((requests, opened, closed, duplicates)))
    }

    /// Fold one event the Python reference decoded (`processors.decode.Flat` values):
    /// `minute` as RollupBuilder computes it, `time_us` its time since the epoch.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (kind, subject, minute, route, method, model, status, stream_id, units, latency, bytes_in, bytes_out, time_us))]
    fn add_values(
        &mut self,
        kind: &str,
        subject: &str,
        minute: i64,
        route: &str,
        method: &str,
        model: &str,
        status: i64,
        stream_id: &str,
        units: f64,
        latency: f64,
        bytes_in: u64,
        bytes_out: u64,
        time_us: i64,
    ) -> PyResult<()> {
        let kind = match kind {
            REQUEST => KIND_REQUEST,
            STREAM_OPENED => KIND_OPENED,
            STREAM_CLOSED => KIND_CLOSED,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown event type {other:?}"
                )))
            }
        };
        let (source, id) = ("", ""); // dedup is done: the fold needs neither
        self.fold(&Event {
            source,
            id,
            kind,
            subject,
            time_us,
            minute,
            route,
            method,
            model,
            status,
            stream_id,
            units,
            latency,
            bytes_in,
            bytes_out,
        });
        Ok(())
    }

    /// The rows as delta row parts (schemas/deltas.py version 2) of at most
    /// `budget` bytes each, a lone larger row alone: [(part, rows in it)], and one
    /// empty part when there are no rows (a heartbeat), as `deltas._bodies` gives.
    fn bodies<'py>(&self, py: Python<'py>, budget: usize) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        let mut body: Vec<u8> = Vec::with_capacity(budget.min(1 << 20));
        let mut row: Vec<u8> = Vec::with_capacity(256);
        let mut count = 0usize;
        for t in &self.rows {
            // A sum beyond the store's UInt64 goes out as rows of no events carrying
            // u64::MAX each, then the rest (schemas/deltas.py `split_overflowing`).
            let (mut units, mut bytes_in, mut bytes_out) = (t.units_micro, t.bytes_in, t.bytes_out);
            loop {
                let last = units <= U64_MAX && bytes_in <= U64_MAX && bytes_out <= U64_MAX;
                row.clear();
                if last {
                    self.row(&mut row, t, t.events, units, t.latency, bytes_in, bytes_out);
                } else {
                    let part = (
                        units.min(U64_MAX),
                        bytes_in.min(U64_MAX),
                        bytes_out.min(U64_MAX),
                    );
                    self.row(&mut row, t, 0, part.0, 0.0, part.1, part.2);
                    units -= part.0;
                    bytes_in -= part.1;
                    bytes_out -= part.2;
                }
                if count > 0 && body.len() + 1 + row.len() > budget {
                    out.append((PyBytes::new(py, &body), count))?;
                    body.clear();
                    count = 0;
                }
                if count > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(&row);
                count += 1;
                if last {
                    break;
                }
            }
        }
        if count > 0 || out.is_empty() {
            out.append((PyBytes::new(py, &body), count))?;
        }
        Ok(out)
    }
}

/// The HTTP ingest's check (query_api/ingest.py): the very parse and `check` of
/// `Fold::add_message`, without folding or remembering anything. For a message whose
/// every event is plainly valid and on time: each event's subject and its bytes'
/// [start, end) in `value`, so the caller sends them on as they came. None otherwise:
/// Python's tiers decide then, and say why.
#[pyfunction]
#[pyo3(signature = (value, lo_us, hi_us, max_event_bytes))]
fn check_events(
    value: &[u8],
    lo_us: i64,
    hi_us: i64,
    max_event_bytes: usize,
) -> Option<Vec<(String, usize, usize)>> {
    let batch = value.iter().find(|c| !c.is_ascii_whitespace()) == Some(&b'[');
    let raws: Vec<&RawValue> = if batch {
        match serde_json::from_slice::<Vec<&RawValue>>(value) {
            Ok(raws) if !raws.is_empty() => raws,
            _ => return None,
        }
    } else if value.len() > max_event_bytes {
        return None; // as add_message: a single event's limit counts the message's bytes
    } else {
        vec![serde_json::from_slice::<&RawValue>(value).ok()?]
    };
    let base = value.as_ptr() as usize;
    let mut out = Vec::with_capacity(raws.len());
    for raw in raws {
        let text = raw.get();
        let Object(e) = serde_json::from_str::<Object<RawEvent<'_>>>(text).ok()?;
        check(&e, lo_us, hi_us)?;
        let start = text.as_ptr() as usize - base;
        out.push((e.subject.to_owned(), start, start + text.len()));
    }
    Some(out)
}

#[pymodule]
fn tally_fold(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Fold>()?;
    m.add_class::<Dedup>()?;
    m.add_class::<encode::BatchEncoder>()?;
    m.add_function(wrap_pyfunction!(encode::murmur2, m)?)?;
    m.add_function(wrap_pyfunction!(check_events, m)?)?;
    Ok(())
}
