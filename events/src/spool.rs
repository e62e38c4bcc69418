//! The on-disk spool in front of a Kafka destination: every record is
//! written here first (write-ahead), and one delivery thread produces
//! from it in order, so a broker outage and a restart look the same.
//!
//! Layout, in `<data_dir>/events-spool/<subscription id>/`:
//! - `<first seq, 20 digits>.seg`: append-only segments. A record is
//!   `len: u32 LE | crc32: u32 LE | body`, where the CRC (IEEE) covers the
//!   body and the body is `key_len: u16 LE (0xFFFF: no key) | topic_len:
//!   u16 LE | key | topic | value`. Record numbers (seq) are implicit: a
//!   segment's first seq is in its name, the rest follow in file order.
//! - `committed`: the first seq not yet delivered, as decimal text,
//!   replaced atomically (write, fsync, rename). It only moves forward
//!   after Kafka's delivery report.
//!
//! Segments wholly below `committed` are deleted. On open, a torn record
//! at the end of the last segment (a crash mid-write) is cut off; a record
//! whose CRC does not match is skipped when read, logged and counted as
//! dropped. Writes reach the OS after every batch (so a killed process
//! loses nothing it spooled) and are fsynced at least every second and on
//! every segment roll and shutdown.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufReader, Read, Write},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, atomic::Ordering},
    time::{Duration, Instant},
};

use crate::metrics::{EventMetrics, LogLimiter, add};

const HEADER: usize = 8;
/// Larger lengths are taken for garbage.
const MAX_BODY: u32 = 64 << 20;
const NO_KEY: u16 = u16::MAX;
const COMMITTED_FILE: &str = "committed";
const SYNC_EVERY: Duration = Duration::from_secs(1);
const PERSIST_EVERY: Duration = Duration::from_millis(200);

/// One spooled record: what to produce, where, with which key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Record {
    pub key: Option<String>,
    pub topic: String,
    pub value: Vec<u8>,
}

/// A record to append, its parts borrowed from whoever holds them: the
/// writer spools an event's JSON without copying it into a `Record` first.
#[derive(Clone, Copy)]
pub(crate) struct Entry<'a> {
    pub key: Option<&'a str>,
    pub topic: &'a str,
    pub value: &'a [u8],
}

impl Entry<'_> {
    fn encode_into(self, out: &mut Vec<u8>) {
        let key = self.key.map(str::as_bytes);
        let key_len = key.map_or(NO_KEY, |k| k.len().min(NO_KEY as usize - 1) as u16);
        let key = key.map_or(&[][..], |k| &k[..key_len as usize]);
        let topic = &self.topic.as_bytes()[..self.topic.len().min(u16::MAX as usize)];
        let start = out.len();
        out.extend_from_slice(&[0; HEADER]);
        out.extend_from_slice(&key_len.to_le_bytes());
        out.extend_from_slice(&(topic.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(topic);
        out.extend_from_slice(self.value);
        let body = &out[start + HEADER..];
        let len = body.len() as u32;
        let crc = crc32fast::hash(body);
        out[start..start + 4].copy_from_slice(&len.to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }
}

impl Record {
    #[cfg(test)]
    fn entry(&self) -> Entry<'_> {
        Entry {
            key: self.key.as_deref(),
            topic: &self.topic,
            value: &self.value,
        }
    }

    /// The record `body` holds; its value keeps the body's buffer (the
    /// key and topic before it are moved out of the way), not a copy.
    fn decode(mut body: Vec<u8>) -> Option<Record> {
        let raw_key_len = u16::from_le_bytes(body.get(0..2)?.try_into().ok()?);
        let topic_len = u16::from_le_bytes(body.get(2..4)?.try_into().ok()?) as usize;
        let key_len = if raw_key_len == NO_KEY {
            0
        } else {
            raw_key_len as usize
        };
        let value_at = 4 + key_len + topic_len;
        let key = match raw_key_len {
            NO_KEY => None,
            _ => Some(
                std::str::from_utf8(body.get(4..4 + key_len)?)
                    .ok()?
                    .to_owned(),
            ),
        };
        let topic = std::str::from_utf8(body.get(4 + key_len..value_at)?)
            .ok()?
            .to_owned();
        body.drain(..value_at);
        Some(Record {
            key,
            topic,
            value: body,
        })
    }

    /// Bytes this record takes in memory, for the delivery window (a
    /// value read from the spool keeps the whole record's buffer).
    pub(crate) fn size(&self) -> usize {
        self.value.capacity() + self.topic.len() + self.key.as_ref().map_or(0, String::len) + 64
    }
}

/// How much a spool may hold.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SpoolLimits {
    /// Undelivered records.
    pub events: u64,
    /// Bytes on disk, delivered records not yet deleted included.
    pub bytes: u64,
}

#[derive(Debug)]
struct Segment {
    base: u64,
    /// Records in the file (corrupt ones included: they hold a seq).
    records: u64,
    bytes: u64,
}

#[derive(Debug)]
struct State {
    segments: VecDeque<Segment>,
    /// The seq the next appended record gets.
    next_seq: u64,
    /// Records below this are in the OS and may be read.
    flushed_seq: u64,
    /// Records below this are delivered.
    committed: u64,
    persisted: u64,
    last_persist: Instant,
    bytes: u64,
    /// Bumped when a failed batch is cut off the file, so a reader that
    /// buffered its bytes reopens.
    generation: u64,
}

/// The shared part of a spool: its files and counters.
#[derive(Debug)]
pub(crate) struct Spool {
    dir: PathBuf,
    limits: SpoolLimits,
    segment_bytes: u64,
    state: Mutex<State>,
    metrics: Arc<EventMetrics>,
    corrupt_log: LogLimiter,
}

/// What opening a spool found.
#[derive(Debug, Default)]
pub(crate) struct Recovery {
    /// Undelivered records from earlier runs.
    pub pending: u64,
    /// Bytes of a torn record cut off the end.
    pub truncated_bytes: u64,
}

/// Why a record was not spooled.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AppendError {
    #[error("the spool is full ({0})")]
    Full(&'static str),
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.seg"))
}

/// Result of reading a segment from the start.
struct Scan {
    records: u64,
    valid_end: u64,
    len: u64,
}

fn scan(path: &Path) -> io::Result<Scan> {
    let file = File::open(path)?;
    let len = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let mut pos = 0u64;
    let mut records = 0u64;
    let mut header = [0u8; HEADER];
    while len - pos >= HEADER as u64 {
        reader.read_exact(&mut header)?;
        let body_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
        if body_len > MAX_BODY || pos + (HEADER as u64) + u64::from(body_len) > len {
            break;
        }
        reader.seek_relative(i64::from(body_len))?;
        pos += HEADER as u64 + u64::from(body_len);
        records += 1;
    }
    Ok(Scan {
        records,
        valid_end: pos,
        len,
    })
}

fn read_committed(dir: &Path) -> Option<u64> {
    let text = fs::read_to_string(dir.join(COMMITTED_FILE)).ok()?;
    match text.trim().parse() {
        Ok(seq) => Some(seq),
        Err(_) => {
            tracing::warn!(dir = %dir.display(), "spool: unreadable committed offset; resending from the oldest segment");
            None
        }
    }
}

fn write_committed(dir: &Path, seq: u64) -> io::Result<()> {
    let tmp = dir.join(format!("{COMMITTED_FILE}.tmp"));
    let mut file = File::create(&tmp)?;
    file.write_all(format!("{seq}\n").as_bytes())?;
    file.sync_data()?;
    fs::rename(&tmp, dir.join(COMMITTED_FILE))
}

impl Spool {
    /// Opens (or creates) the spool in `dir`, recovering from a crash.
    pub(crate) fn open(
        dir: &Path,
        limits: SpoolLimits,
        metrics: Arc<EventMetrics>,
    ) -> io::Result<(Arc<Spool>, SpoolWriter, Recovery)> {
        fs::create_dir_all(dir)?;
        let mut bases: Vec<u64> = fs::read_dir(dir)?
            .filter_map(|entry| {
                let name = entry.ok()?.file_name().into_string().ok()?;
                name.strip_suffix(".seg")?.parse().ok()
            })
            .collect();
        bases.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = VecDeque::new();
        for (i, &base) in bases.iter().enumerate() {
            let path = segment_path(dir, base);
            let scan = scan(&path)?;
            if scan.valid_end < scan.len {
                let torn = scan.len - scan.valid_end;
                if i + 1 == bases.len() {
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(scan.valid_end)?;
                    recovery.truncated_bytes += torn;
                    tracing::warn!(segment = %path.display(), bytes = torn, "spool: cut off a record torn by a crash");
                } else {
                    tracing::error!(segment = %path.display(), bytes = torn, "spool: unreadable bytes at the end of a segment are skipped");
                }
            }
            segments.push_back(Segment {
                base,
                records: scan.records,
                bytes: scan.valid_end,
            });
        }
        let next_seq = segments
            .back()
            .map(|s| s.base + s.records)
            .unwrap_or_else(|| read_committed(dir).unwrap_or(0));
        let first = segments.front().map_or(next_seq, |s| s.base);
        let committed = read_committed(dir).unwrap_or(first).clamp(first, next_seq);
        let bytes = segments.iter().map(|s| s.bytes).sum();
        let spool = Arc::new(Spool {
            dir: dir.to_path_buf(),
            limits,
            segment_bytes: (limits.bytes / 16).clamp(4 << 10, 64 << 20),
            state: Mutex::new(State {
                segments,
                next_seq,
                flushed_seq: next_seq,
                committed,
                persisted: committed,
                last_persist: Instant::now(),
                bytes,
                generation: 0,
            }),
            metrics,
            corrupt_log: LogLimiter::new(Duration::from_secs(10)),
        });
        recovery.pending = next_seq - committed;
        {
            let mut st = spool.lock();
            spool.delete_delivered(&mut st)?;
            spool.publish_gauges(&st);
        }
        let writer = SpoolWriter::open(spool.clone())?;
        Ok((spool, writer, recovery))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("spool lock")
    }

    /// Undelivered records.
    pub(crate) fn pending(&self) -> u64 {
        let st = self.lock();
        st.next_seq - st.committed
    }

    /// True when every readable record has been read up to `position`.
    pub(crate) fn caught_up(&self, position: u64) -> bool {
        position >= self.lock().flushed_seq
    }

    /// Records below `seq` are delivered: deletes what it can and
    /// persists the offset (at most every 200 ms unless `force`).
    pub(crate) fn commit(&self, seq: u64, force: bool) -> io::Result<()> {
        let mut st = self.lock();
        if seq > st.committed {
            st.committed = seq.min(st.next_seq);
            self.delete_delivered(&mut st)?;
            self.publish_gauges(&st);
        }
        if st.persisted != st.committed && (force || st.last_persist.elapsed() >= PERSIST_EVERY) {
            write_committed(&self.dir, st.committed)?;
            st.persisted = st.committed;
            st.last_persist = Instant::now();
        }
        Ok(())
    }

    fn delete_delivered(&self, st: &mut State) -> io::Result<()> {
        while st.segments.len() > 1 && st.segments[1].base <= st.committed {
            let segment = st.segments.pop_front().expect("two segments");
            match fs::remove_file(segment_path(&self.dir, segment.base)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            st.bytes -= segment.bytes;
        }
        Ok(())
    }

    fn publish_gauges(&self, st: &State) {
        self.metrics
            .spool_events
            .store(st.next_seq - st.committed, Ordering::Relaxed);
        self.metrics.spool_bytes.store(st.bytes, Ordering::Relaxed);
    }

    /// A reader from the first undelivered record.
    pub(crate) fn reader(self: &Arc<Self>) -> SpoolReader {
        let st = self.lock();
        SpoolReader {
            spool: self.clone(),
            next_seq: st.committed,
            file: None,
            generation: st.generation,
        }
    }
}

/// Appends records; owned by the pipeline's writer thread. Records of one
/// batch are written with one `write` and become readable together.
#[derive(Debug)]
pub(crate) struct SpoolWriter {
    spool: Arc<Spool>,
    file: File,
    base: u64,
    /// Bytes of the active segment that are in the file.
    file_len: u64,
    batch: Vec<u8>,
    batch_records: u64,
    unsynced: bool,
    last_sync: Instant,
}

impl SpoolWriter {
    fn open(spool: Arc<Spool>) -> io::Result<SpoolWriter> {
        let (base, file_len, reuse) = {
            let mut st = spool.lock();
            let next_seq = st.next_seq;
            // A segment whose records were all delivered is not reused, so
            // that it can be deleted.
            let delivered = st.committed == next_seq;
            match st.segments.back() {
                Some(s) if s.bytes < spool.segment_bytes && !(delivered && s.records > 0) => {
                    (s.base, s.bytes, true)
                }
                _ => {
                    st.segments.push_back(Segment {
                        base: next_seq,
                        records: 0,
                        bytes: 0,
                    });
                    (next_seq, 0, false)
                }
            }
        };
        let path = segment_path(&spool.dir, base);
        let file = if reuse {
            OpenOptions::new().append(true).open(&path)?
        } else {
            let file = File::create(&path)?;
            File::open(&spool.dir)?.sync_all()?;
            let mut st = spool.lock();
            spool.delete_delivered(&mut st)?;
            spool.publish_gauges(&st);
            file
        };
        Ok(SpoolWriter {
            spool,
            file,
            base,
            file_len,
            batch: Vec::new(),
            batch_records: 0,
            unsynced: false,
            last_sync: Instant::now(),
        })
    }

    /// Adds a record to the current batch, or refuses it when the spool is
    /// at a limit.
    pub(crate) fn append(&mut self, entry: Entry<'_>) -> Result<(), AppendError> {
        let start = self.batch.len();
        entry.encode_into(&mut self.batch);
        let len = (self.batch.len() - start) as u64;
        let mut st = self.spool.lock();
        let limits = self.spool.limits;
        let full = if st.next_seq - st.committed >= limits.events {
            Some("spool_events")
        } else if st.bytes + len > limits.bytes {
            Some("spool_bytes")
        } else {
            None
        };
        if let Some(limit) = full {
            self.batch.truncate(start);
            return Err(AppendError::Full(limit));
        }
        st.next_seq += 1;
        st.bytes += len;
        let active = st.segments.back_mut().expect("an active segment");
        active.records += 1;
        active.bytes += len;
        self.batch_records += 1;
        self.spool.publish_gauges(&st);
        Ok(())
    }

    /// Writes the batch to the OS and makes it readable; rolls to a new
    /// segment when this one is full. On failure the batch is undone and
    /// the number of records lost is returned with the error.
    pub(crate) fn flush(&mut self) -> Result<(), (u64, io::Error)> {
        if self.batch_records > 0 {
            if let Err(e) = self.file.write_all(&self.batch) {
                return Err((self.undo_batch(), e));
            }
            self.file_len += self.batch.len() as u64;
            self.batch.clear();
            self.batch_records = 0;
            self.unsynced = true;
            let mut st = self.spool.lock();
            st.flushed_seq = st.next_seq;
        }
        let result = if self.file_len >= self.spool.segment_bytes {
            self.roll()
        } else if self.unsynced && self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync()
        } else {
            Ok(())
        };
        result.map_err(|e| (0, e))
    }

    fn undo_batch(&mut self) -> u64 {
        let lost = self.batch_records;
        let bytes = self.batch.len() as u64;
        // A partial write leaves part of the batch in the file.
        let _ = self.file.set_len(self.file_len);
        let mut st = self.spool.lock();
        st.next_seq -= lost;
        st.bytes -= bytes;
        st.generation += 1;
        let active = st.segments.back_mut().expect("an active segment");
        active.records -= lost;
        active.bytes -= bytes;
        self.spool.publish_gauges(&st);
        drop(st);
        self.batch.clear();
        self.batch_records = 0;
        lost
    }

    /// fsyncs what was written.
    pub(crate) fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    fn roll(&mut self) -> io::Result<()> {
        self.sync()?;
        let base = {
            let mut st = self.spool.lock();
            let base = st.next_seq;
            st.segments.push_back(Segment {
                base,
                records: 0,
                bytes: 0,
            });
            base
        };
        self.file = File::create(segment_path(&self.spool.dir, base))?;
        File::open(&self.spool.dir)?.sync_all()?;
        self.base = base;
        self.file_len = 0;
        Ok(())
    }
}

/// Reads records in seq order, from the first undelivered one; owned by
/// the delivery thread.
#[derive(Debug)]
pub(crate) struct SpoolReader {
    spool: Arc<Spool>,
    next_seq: u64,
    /// The open segment: its first seq, the file, and the seq at the file's position.
    file: Option<(u64, BufReader<File>, u64)>,
    generation: u64,
}

impl SpoolReader {
    /// The seq the next read returns (or waits for).
    pub(crate) fn position(&self) -> u64 {
        self.next_seq
    }

    /// The next readable record, or `None` when everything written so far
    /// has been read.
    pub(crate) fn next(&mut self) -> io::Result<Option<(u64, Record)>> {
        loop {
            let (base, end) = {
                let st = self.spool.lock();
                if self.next_seq >= st.flushed_seq {
                    return Ok(None);
                }
                if st.generation != self.generation {
                    self.generation = st.generation;
                    self.file = None;
                }
                let Some(i) = st.segments.iter().rposition(|s| s.base <= self.next_seq) else {
                    // Before the first segment (deleted underneath): skip ahead.
                    self.next_seq = st.segments.front().map_or(st.flushed_seq, |s| s.base);
                    continue;
                };
                let s = &st.segments[i];
                if self.next_seq >= s.base + s.records {
                    // The segment ended early (a torn tail): go on with the next.
                    match st.segments.get(i + 1) {
                        Some(next) => {
                            self.next_seq = next.base;
                            continue;
                        }
                        None => return Ok(None),
                    }
                }
                (s.base, s.base + s.records)
            };
            debug_assert!(self.next_seq < end);
            let reader = self.open_at(base)?;
            let mut header = [0u8; HEADER];
            reader.read_exact(&mut header)?;
            let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
            if len > MAX_BODY {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("record {} claims {len} bytes", self.next_seq),
                ));
            }
            let mut body = vec![0u8; len as usize];
            reader.read_exact(&mut body)?;
            let seq = self.next_seq;
            self.next_seq += 1;
            if let Some((_, _, at)) = self.file.as_mut() {
                *at += 1;
            }
            match (crc32fast::hash(&body) == crc)
                .then(|| Record::decode(body))
                .flatten()
            {
                Some(record) => return Ok(Some((seq, record))),
                None => {
                    add(&self.spool.metrics.dropped, 1);
                    if let Some(n) = self.spool.corrupt_log.hit() {
                        tracing::error!(spool = %self.spool.dir.display(), seq, records = n, "spool: corrupt record (CRC mismatch) skipped");
                    }
                }
            }
        }
    }

    /// The segment `base`'s file, positioned at `next_seq`.
    fn open_at(&mut self, base: u64) -> io::Result<&mut BufReader<File>> {
        let reopen = !matches!(&self.file, Some((b, _, at)) if *b == base && *at == self.next_seq);
        if reopen {
            let mut reader = BufReader::new(File::open(segment_path(&self.spool.dir, base))?);
            let mut header = [0u8; HEADER];
            for _ in base..self.next_seq {
                reader.read_exact(&mut header)?;
                let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
                reader.seek_relative(i64::from(len))?;
            }
            self.file = Some((base, reader, self.next_seq));
        }
        Ok(&mut self.file.as_mut().expect("just opened").1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "postern-spool-{tag}-{}",
            crate::event_id().trim_start_matches("ev_")
        ));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn record(i: u64) -> Record {
        Record {
            key: (!i.is_multiple_of(3)).then(|| format!("host{}.example.test", i % 2)),
            topic: "postern.test".into(),
            value: format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(100)).into_bytes(),
        }
    }

    #[test]
    fn a_body_decodes_to_its_record_and_a_cut_one_to_none() {
        for i in 0..3 {
            let mut encoded = Vec::new();
            record(i).entry().encode_into(&mut encoded);
            let body = &encoded[HEADER..];
            assert_eq!(Record::decode(body.to_vec()), Some(record(i)));
            let value_at = body.len() - record(i).value.len();
            for cut in 0..value_at {
                assert_eq!(Record::decode(body[..cut].to_vec()), None, "cut at {cut}");
            }
        }
    }

    const ROOMY: SpoolLimits = SpoolLimits {
        events: 1_000_000,
        bytes: 1 << 30,
    };

    fn open(dir: &Path, limits: SpoolLimits) -> (Arc<Spool>, SpoolWriter, Recovery) {
        Spool::open(dir, limits, Arc::default()).unwrap()
    }

    fn read_all(reader: &mut SpoolReader) -> Vec<(u64, Record)> {
        std::iter::from_fn(|| reader.next().unwrap()).collect()
    }

    #[test]
    fn records_round_trip_and_only_flushed_ones_are_readable() {
        let d = dir("roundtrip");
        let (spool, mut writer, recovery) = open(&d, ROOMY);
        assert_eq!(recovery.pending, 0);
        let mut reader = spool.reader();
        for i in 0..10 {
            writer.append(record(i).entry()).unwrap();
        }
        assert!(reader.next().unwrap().is_none(), "not flushed yet");
        writer.flush().unwrap();
        let got = read_all(&mut reader);
        assert_eq!(got.len(), 10);
        for (i, (seq, rec)) in got.into_iter().enumerate() {
            assert_eq!(seq, i as u64);
            assert_eq!(rec, record(i as u64));
        }
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn committed_offset_survives_a_restart_and_segments_are_deleted() {
        let d = dir("restart");
        // 4 KiB segments: ~30 records each.
        let small = SpoolLimits {
            events: 1_000_000,
            bytes: 64 << 10,
        };
        {
            let (spool, mut writer, _) = open(&d, small);
            for i in 0..200 {
                writer.append(record(i).entry()).unwrap();
                if i % 7 == 0 {
                    writer.flush().unwrap();
                }
            }
            writer.flush().unwrap();
            let segments_before = fs::read_dir(&d).unwrap().count();
            assert!(segments_before > 5, "{segments_before}");
            spool.commit(150, true).unwrap();
            assert!(fs::read_dir(&d).unwrap().count() < segments_before);
            assert_eq!(spool.pending(), 50);
        }
        let (spool, _writer, recovery) = open(&d, small);
        assert_eq!(recovery.pending, 50);
        let got = read_all(&mut spool.reader());
        assert_eq!(
            got.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            (150..200).collect::<Vec<_>>()
        );
        assert_eq!(got[0].1, record(150));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_cut_off_and_appending_goes_on() {
        let d = dir("torn");
        {
            let (_spool, mut writer, _) = open(&d, ROOMY);
            for i in 0..5 {
                writer.append(record(i).entry()).unwrap();
            }
            writer.flush().unwrap();
        }
        // A crash in the middle of the sixth record's write.
        let seg = segment_path(&d, 0);
        let mut partial = Vec::new();
        record(5).entry().encode_into(&mut partial);
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&partial[..partial.len() / 2]).unwrap();
        drop(f);
        let (spool, mut writer, recovery) = open(&d, ROOMY);
        assert_eq!(recovery.pending, 5);
        assert_eq!(recovery.truncated_bytes, (partial.len() / 2) as u64);
        writer.append(record(99).entry()).unwrap();
        writer.flush().unwrap();
        let got = read_all(&mut spool.reader());
        assert_eq!(got.len(), 6);
        assert_eq!(got[5], (5, record(99)));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_crc_mismatch_is_detected_skipped_and_counted() {
        let d = dir("crc");
        {
            let (_spool, mut writer, _) = open(&d, ROOMY);
            for i in 0..3 {
                writer.append(record(i).entry()).unwrap();
            }
            writer.flush().unwrap();
        }
        // Flip a byte in the middle record's value.
        let seg = segment_path(&d, 0);
        let mut bytes = fs::read(&seg).unwrap();
        let mut first = Vec::new();
        record(0).entry().encode_into(&mut first);
        let target = first.len() + HEADER + 30;
        bytes[target] ^= 0x55;
        fs::write(&seg, &bytes).unwrap();
        let metrics = Arc::new(EventMetrics::default());
        let (spool, _writer, recovery) = Spool::open(&d, ROOMY, metrics.clone()).unwrap();
        assert_eq!(recovery.pending, 3);
        let got = read_all(&mut spool.reader());
        assert_eq!(got, vec![(0, record(0)), (2, record(2))]);
        assert_eq!(metrics.dropped.load(Ordering::Relaxed), 1);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn limits_refuse_records_and_a_commit_makes_room() {
        let d = dir("limits");
        let (spool, mut writer, _) = open(
            &d,
            SpoolLimits {
                events: 10,
                bytes: 1 << 30,
            },
        );
        for i in 0..10 {
            writer.append(record(i).entry()).unwrap();
        }
        assert!(matches!(
            writer.append(record(10).entry()),
            Err(AppendError::Full("spool_events"))
        ));
        writer.flush().unwrap();
        spool.commit(4, false).unwrap();
        writer.append(record(10).entry()).unwrap();
        drop(writer);
        let d2 = dir("limits-bytes");
        let (_spool, mut writer, _) = open(
            &d2,
            SpoolLimits {
                events: 1000,
                bytes: 1000,
            },
        );
        let mut n = 0;
        while writer.append(record(n).entry()).is_ok() {
            n += 1;
        }
        assert!(n > 3 && n < 10, "{n}");
        fs::remove_dir_all(&d).unwrap();
        fs::remove_dir_all(&d2).unwrap();
    }
}
