//! The gateway's hot path in native code: each recorded event is written as JSON
//! into its partition's message at once, while `record()` holds it, instead of
//! being kept as a model and encoded with the rest of its batch when the batch
//! is sealed.
//!
//! Why at record time: by the time a batch is sealed, its events were recorded
//! among every other partition's (12 buffers fill side by side), so their fields
//! lie scattered in memory and encoding them then is mostly cache misses. Encoding
//! in Python at record time costs a call and a bytes object per event, which is
//! more than it saves; here an event costs one call and no Python object.
//!
//! The message is the batch format of docs/api.md#events: a JSON array of CloudEvents,
//! each what producers/events.py `encode_event` writes: absent (None) attributes
//! left out, `time` in UTC with microseconds and `Z`. Keys come in the models'
//! field order, and floats in their shortest round-trip form (ryu), which decodes
//! to the same float as orjson's, though not always in the same characters (`1e16`
//! for `1e+16`).
//!
//! It accepts only what it can write exactly: the event and data model classes it
//! was given, and str, float (finite), int (64-bit), bool, None and datetimes in
//! UTC as values. For anything else `add` returns `UNSUPPORTED` and leaves the
//! message as it was, and the gateway encodes that event in Python and appends
//! the bytes with `add_raw`, so one message keeps its events in order.
//! tests/unit/producers/test_native_encode.py compares it with `encode_events`.

use pyo3::ffi;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDateTime, PyString, PyTuple, PyType};
use std::ffi::c_int;
use std::ptr::addr_of_mut;

/// `add`/`add_raw`: the event is not in the message because the message is not
/// empty and the event would take it past `max_bytes`: seal it, then add again.
const FULL: i64 = 0;
/// `add`: this event holds a value the encoder does not write; nothing was added.
const UNSUPPORTED: i64 = -1;
/// `add`/`add_raw`: the event alone is larger than `max_bytes`; nothing was added.
const TOO_LARGE: i64 = -2;

/// One message per partition, each an open JSON array of encoded events.
#[pyclass(module = "tally_fold")]
pub struct BatchEncoder {
    /// Per partition: `[` and the events joined by `,`; the closing `]` is added
    /// by `take`. Empty: no event buffered.
    messages: Vec<Vec<u8>>,
    counts: Vec<u32>,
    max_bytes: usize,
    /// The classes written as objects: the event models, then the data models.
    models: Vec<Py<PyType>>,
    datetime: *mut ffi::PyTypeObject,
    utc: *mut ffi::PyObject,
    subject_key: Py<PyString>,
    last: usize,
}

// The raw pointers are to the datetime type and the UTC singleton, which the
// datetime module keeps alive; they are only used with the GIL held.
unsafe impl Send for BatchEncoder {}
unsafe impl Sync for BatchEncoder {}

/// The UTF-8 of a str, borrowed from it (Python caches it in the object); None for
/// lone surrogates, which are not UTF-8, so not JSON: Python then reports them.
///
/// Safety: `s` is a str that outlives the slice, the GIL is held.
unsafe fn utf8<'a>(s: *mut ffi::PyObject) -> Option<&'a str> {
    let mut size: ffi::Py_ssize_t = 0;
    let data = ffi::PyUnicode_AsUTF8AndSize(s, &mut size);
    if data.is_null() {
        ffi::PyErr_Clear();
        return None;
    }
    let bytes = std::slice::from_raw_parts(data.cast::<u8>(), size as usize);
    // Python made it from a valid str, so it is UTF-8.
    Some(std::str::from_utf8_unchecked(bytes))
}

/// Safety: `s` is a str, the GIL is held.
unsafe fn write_str(out: &mut Vec<u8>, s: *mut ffi::PyObject) -> bool {
    let Some(text) = utf8(s) else {
        return false;
    };
    crate::push_json_str(out, text);
    true
}

fn push_2(out: &mut Vec<u8>, v: u8) {
    out.push(b'0' + v / 10);
    out.push(b'0' + v % 10);
}

impl BatchEncoder {
    /// Whether `ty` is one of the model classes.
    fn is_model(&self, ty: *mut ffi::PyTypeObject) -> bool {
        self.models.iter().any(|m| m.as_ptr().cast() == ty)
    }

    /// Writes `obj`'s fields (its `__dict__`) as a JSON object; false if a value is
    /// not supported. Raw C API: a dozen values per event, and the safe wrappers'
    /// reference counting and checks cost more than the writing.
    ///
    /// Safety: `obj` is a live object, the GIL is held.
    unsafe fn write_model(&self, out: &mut Vec<u8>, obj: *mut ffi::PyObject) -> bool {
        let fields = ffi::PyObject_GenericGetDict(obj, std::ptr::null_mut());
        if fields.is_null() {
            ffi::PyErr_Clear();
            return false;
        }
        let ok = self.write_fields(out, fields);
        ffi::Py_DECREF(fields);
        ok
    }

    unsafe fn write_fields(&self, out: &mut Vec<u8>, fields: *mut ffi::PyObject) -> bool {
        if ffi::PyDict_CheckExact(fields) == 0 {
            return false;
        }
        out.push(b'{');
        let mut pos: ffi::Py_ssize_t = 0;
        let mut key: *mut ffi::PyObject = std::ptr::null_mut();
        let mut value: *mut ffi::PyObject = std::ptr::null_mut();
        let mut first = true;
        // Borrowed references; nothing here runs Python code that could change the dict.
        while ffi::PyDict_Next(fields, &mut pos, &mut key, &mut value) != 0 {
            if value == ffi::Py_None() {
                continue; // absent, as encode_event leaves it out
            }
            if !first {
                out.push(b',');
            }
            first = false;
            if ffi::Py_TYPE(key) != addr_of_mut!(ffi::PyUnicode_Type) || !write_str(out, key) {
                return false;
            }
            out.push(b':');
            if !self.write_value(out, value) {
                return false;
            }
        }
        out.push(b'}');
        true
    }

    unsafe fn write_value(&self, out: &mut Vec<u8>, value: *mut ffi::PyObject) -> bool {
        let ty = ffi::Py_TYPE(value);
        if ty == addr_of_mut!(ffi::PyUnicode_Type) {
            return write_str(out, value);
        } else if ty == addr_of_mut!(ffi::PyFloat_Type) {
            let v = ffi::PyFloat_AS_DOUBLE(value);
            if !v.is_finite() {
                return false;
            }
            out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
        } else if ty == addr_of_mut!(ffi::PyBool_Type) {
            out.extend_from_slice(if value == ffi::Py_True() {
                b"true"
            } else {
                b"false"
            });
        } else if ty == addr_of_mut!(ffi::PyLong_Type) {
            let mut overflow: c_int = 0;
            let v = ffi::PyLong_AsLongLongAndOverflow(value, &mut overflow);
            if overflow == 0 {
                out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            } else if overflow > 0 {
                let v = ffi::PyLong_AsUnsignedLongLong(value);
                if v == u64::MAX && !ffi::PyErr_Occurred().is_null() {
                    ffi::PyErr_Clear();
                    return false;
                }
                out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
            } else {
                return false;
            }
        } else if ty == self.datetime {
            return self.write_time(out, value);
        } else if self.is_model(ty) {
            return self.write_model(out, value);
        } else {
            return false;
        }
        true
    }

    /// RFC 3339 as producers/events.py `format_time` writes it: microseconds and `Z`.
    /// Only UTC itself; Python converts other zones.
    unsafe fn write_time(&self, out: &mut Vec<u8>, t: *mut ffi::PyObject) -> bool {
        if ffi::PyDateTime_DATE_GET_TZINFO(t) != self.utc {
            return false;
        }
        let year = ffi::PyDateTime_GET_YEAR(t);
        if !(1..=9999).contains(&year) {
            return false;
        }
        out.push(b'"');
        push_2(out, (year / 100) as u8);
        push_2(out, (year % 100) as u8);
        out.push(b'-');
        push_2(out, ffi::PyDateTime_GET_MONTH(t) as u8);
        out.push(b'-');
        push_2(out, ffi::PyDateTime_GET_DAY(t) as u8);
        out.push(b'T');
        push_2(out, ffi::PyDateTime_DATE_GET_HOUR(t) as u8);
        out.push(b':');
        push_2(out, ffi::PyDateTime_DATE_GET_MINUTE(t) as u8);
        out.push(b':');
        push_2(out, ffi::PyDateTime_DATE_GET_SECOND(t) as u8);
        out.push(b'.');
        let mut digits = [b'0'; 6];
        let mut rest = ffi::PyDateTime_DATE_GET_MICROSECOND(t);
        for d in digits.iter_mut().rev() {
            *d = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        out.extend_from_slice(&digits);
        out.extend_from_slice(b"Z\"");
        true
    }

    /// The partition of the event whose fields are `fields`: murmur2 of its subject
    /// (UTF-8), made positive, modulo the partitions; None without a str subject.
    ///
    /// Safety: `fields` is a live object, the GIL is held.
    unsafe fn place(&self, fields: *mut ffi::PyObject) -> Option<usize> {
        if ffi::PyDict_CheckExact(fields) == 0 {
            return None;
        }
        let subject = ffi::PyDict_GetItemWithError(fields, self.subject_key.as_ptr());
        if subject.is_null() || ffi::Py_TYPE(subject) != addr_of_mut!(ffi::PyUnicode_Type) {
            ffi::PyErr_Clear();
            return None;
        }
        let bytes = utf8(subject)?.as_bytes();
        Some((murmur2(bytes) & 0x7FFF_FFFF) as usize % self.messages.len())
    }

    /// Appends one encoded event (`write` fills `out` past its end) to partition
    /// p's message, or takes it back out; the protocol of `add`.
    fn append(&mut self, p: usize, write: impl FnOnce(&Self, &mut Vec<u8>) -> bool) -> i64 {
        let mut out = std::mem::take(&mut self.messages[p]);
        let before = out.len();
        out.push(if before == 0 { b'[' } else { b',' });
        let written = write(self, &mut out);
        let result = if !written {
            UNSUPPORTED
        } else if out.len() < self.max_bytes {
            self.counts[p] += 1;
            i64::from(self.counts[p])
        } else if before == 0 {
            TOO_LARGE
        } else {
            FULL
        };
        if result <= 0 {
            out.truncate(before);
        }
        self.messages[p] = out;
        result
    }

    fn partition(&self, p: usize) -> PyResult<usize> {
        if p < self.messages.len() {
            Ok(p)
        } else {
            Err(pyo3::exceptions::PyIndexError::new_err(format!(
                "partition {p} out of range: the encoder has {} partitions",
                self.messages.len()
            )))
        }
    }
}

#[pymethods]
impl BatchEncoder {
    #[classattr]
    const FULL: i64 = FULL;
    #[classattr]
    const UNSUPPORTED: i64 = UNSUPPORTED;
    #[classattr]
    const TOO_LARGE: i64 = TOO_LARGE;

    /// `models`: the classes written as JSON objects (their `__dict__`), the event
    /// models and their data models; `max_bytes`: the largest message.
    #[new]
    fn new(
        py: Python<'_>,
        partitions: usize,
        max_bytes: usize,
        models: &Bound<'_, PyTuple>,
    ) -> PyResult<Self> {
        let models = models
            .iter()
            .map(|m| Ok(m.downcast_into::<PyType>()?.unbind()))
            .collect::<PyResult<Vec<_>>>()?;
        // Imports the datetime C API, which the raw accessors need.
        let datetime = py.get_type::<PyDateTime>().as_ptr().cast();
        let utc = pyo3::types::timezone_utc(py).as_ptr();
        if partitions == 0 {
            return Err(pyo3::exceptions::PyValueError::new_err(
                "partitions must be at least 1: pass the topic's partition count",
            ));
        }
        Ok(Self {
            messages: vec![Vec::new(); partitions],
            counts: vec![0; partitions],
            max_bytes,
            models,
            datetime,
            utc,
            subject_key: PyString::intern(py, "subject").unbind(),
            last: 0,
        })
    }

    /// Writes `event` into the message of its subject's partition (Kafka's default
    /// partitioner: producers/partitioning.py `partition_for`), which `last` then
    /// names. Returns how many events the message holds with it; 0 (FULL) when it
    /// would take a non-empty message past max_bytes; -1 (UNSUPPORTED) when it
    /// holds what only Python writes (`last` is then not set); -2 (TOO_LARGE) when
    /// it is larger than max_bytes alone. Nothing is added unless the result is
    /// positive.
    fn add(&mut self, event: &Bound<'_, PyAny>) -> PyResult<i64> {
        let event = event.as_ptr();
        // Safety: a live object (borrowed from the call), the GIL is held.
        unsafe {
            if !self.is_model(ffi::Py_TYPE(event)) {
                return Ok(UNSUPPORTED);
            }
            let fields = ffi::PyObject_GenericGetDict(event, std::ptr::null_mut());
            if fields.is_null() {
                ffi::PyErr_Clear();
                return Ok(UNSUPPORTED);
            }
            let result = match self.place(fields) {
                Some(p) => {
                    self.last = p;
                    Ok(self.append(p, |me, out| me.write_fields(out, fields)))
                }
                None => Ok(UNSUPPORTED),
            };
            ffi::Py_DECREF(fields);
            result
        }
    }

    /// The partition of the last event `add` took, or found no room for.
    #[getter]
    fn last(&self) -> usize {
        self.last
    }

    /// Appends one event Python encoded (one JSON object); the results of `add`.
    fn add_raw(&mut self, p: usize, data: &[u8]) -> PyResult<i64> {
        let p = self.partition(p)?;
        Ok(self.append(p, |_, out| {
            out.extend_from_slice(data);
            true
        }))
    }

    /// Partition p's message (a JSON array) and how many events it holds; the
    /// partition starts a new message. (b"", 0) when it holds none.
    fn take<'py>(&mut self, py: Python<'py>, p: usize) -> PyResult<(Bound<'py, PyBytes>, u32)> {
        let p = self.partition(p)?;
        let count = std::mem::take(&mut self.counts[p]);
        let message = &mut self.messages[p];
        if message.is_empty() {
            return Ok((PyBytes::new(py, b""), 0));
        }
        message.push(b']');
        let value = PyBytes::new(py, message);
        message.clear();
        Ok((value, count))
    }

    /// How many events partition p's message holds.
    fn count(&self, p: usize) -> PyResult<u32> {
        Ok(self.counts[self.partition(p)?])
    }
}

/// Kafka's `Utils.murmur2` of `data`, as an unsigned 32-bit int: what
/// producers/partitioning.py `murmur2` computes, for placing a subject the
/// gateway has not seen yet.
#[pyfunction]
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_B28C;
    const M: u32 = 0x5BD1_E995;
    let length = data.len();
    let mut h = SEED ^ (length as u32);
    let mut words = data.chunks_exact(4);
    for word in &mut words {
        let mut k = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M) ^ k;
    }
    let tail = words.remainder();
    if tail.len() == 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^ (h >> 15)
}
