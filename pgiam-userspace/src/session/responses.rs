//! The server's side of the conversation, matched to what was asked, without I/O.
//!
//! Every request pgiam forwarded left an [`Expect`] behind, in order. Reading the server's
//! messages against that queue tells when each statement completed and how (SQLSTATE, rows,
//! time: the completion record), which prepared statements were really created, and where the
//! server's error for a sentinel must be replaced by pgiam's refusal. Rows stream through: only
//! small control messages (ErrorResponse, CommandComplete, ParameterStatus, ReadyForQuery) are
//! held until they are complete.

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};

use super::statements::{Expect, ExpectKind};
use crate::wire::{self, BackendMessage, WireError};

/// Control messages larger than this are streamed without being read (no error pgiam would
/// rewrite is this long).
const MAX_INSPECT: usize = 1 << 20;

/// What to do with the bytes at the front of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Forward this many bytes as they are.
    Pass(usize),
    /// Forward `with` instead of the next `len` bytes.
    Replace { len: usize, with: Bytes },
    /// Nothing can be decided until more bytes arrive.
    NeedMore,
}

/// What the session learns from the server.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// The statement of a decision record finished. `sqlstate: None`: the server skipped it
    /// (an earlier message of its pipeline failed).
    Completed {
        record: String,
        sqlstate: Option<String>,
        rows: Option<u64>,
        tag: Option<String>,
        micros: u64,
    },
    /// A prepared statement pgiam expected was not created.
    NotPrepared {
        name: Vec<u8>,
        generation: u64,
    },
    StandardConformingStrings(bool),
    /// The server now reads the client's bytes in an encoding pgiam cannot split statements in
    /// (a route pgiam did not see, such as a role default): the session must end.
    UnsafeClientEncoding(String),
    /// The server now reads the client's bytes in this encoding (one pgiam can read).
    ClientEncoding(String),
}

#[derive(Default)]
pub struct Responses {
    expects: VecDeque<Expect>,
    /// An extended-protocol message failed and its Sync has not been forwarded yet: the server
    /// ignores every message until that Sync, so none of them will be answered.
    skipping: bool,
    /// Bytes of the message being streamed that are still to come.
    remaining: usize,
    /// Progress of the Query (or FunctionCall) at the front.
    done: usize,
    rows: u64,
    tag: Option<String>,
    error: Option<String>,
    /// The last ReadyForQuery said a transaction block is open (or failed).
    in_block: bool,
    /// Something was forwarded since the server's last ReadyForQuery: until the next one the
    /// server may be inside an implicit transaction (extended protocol without a Sync yet).
    unsynced: bool,
    /// The server is in copy-in mode and the client has not ended the copy yet: the Syncs it
    /// sends until then are ignored by the server, so they are owed nothing.
    copy_in: bool,
    pub events: Vec<Event>,
}

impl Responses {
    pub fn push(&mut self, e: Expect) {
        self.unsynced = true;
        if self.copy_in {
            match e.kind {
                ExpectKind::Sync => return,
                ExpectKind::CopyEnd => {
                    self.copy_in = false;
                    return;
                }
                _ => {}
            }
        }
        if self.skipping {
            if e.kind != ExpectKind::Sync {
                // The queue is empty while skipping: this is the front, answered by nothing.
                self.expects.push_front(e);
                self.complete(None, None, None);
                return;
            }
            self.skipping = false;
        }
        self.expects.push_back(e);
    }

    /// Gives back the queue's room once everything asked has been answered: an idle session
    /// holds none.
    pub fn release(&mut self) {
        if self.expects.is_empty() && self.expects.capacity() > 0 {
            self.expects = VecDeque::new();
        }
    }

    /// Between messages: a message pgiam writes itself cannot land inside one of the server's.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Everything forwarded has been answered, and the server's last word was that a
    /// transaction block is open: what is forwarded now runs inside it, and its changes are
    /// undone unless the block commits.
    pub fn idle_in_block(&self) -> bool {
        self.idle() && self.in_block
    }

    /// Requests forwarded and not answered yet.
    pub fn outstanding(&self) -> usize {
        self.expects.len()
    }

    /// Everything forwarded has been answered.
    pub fn idle(&self) -> bool {
        self.expects.is_empty() && self.remaining == 0 && !self.skipping
    }

    /// The server's last word was that a transaction block is open.
    pub fn in_block(&self) -> bool {
        self.in_block
    }

    /// Everything forwarded has been answered, and the server's last word was ReadyForQuery,
    /// idle: the session is between two transactions, implicit ones included.
    pub fn between_transactions(&self) -> bool {
        self.idle() && self.at_boundary() && !self.in_block && !self.unsynced
    }

    pub fn step(&mut self, buf: &[u8]) -> Result<Step, WireError> {
        if self.remaining > 0 {
            if buf.is_empty() {
                return Ok(Step::NeedMore);
            }
            let n = self.remaining.min(buf.len());
            self.remaining -= n;
            return Ok(Step::Pass(n));
        }
        // Backend messages are not capped: a row may legitimately be very large.
        let Some(h) = wire::peek_header(buf, usize::MAX)? else {
            return Ok(Step::NeedMore);
        };
        let inspect = matches!(h.tag, b'E' | b'C' | b'S' | b'Z') && h.total <= MAX_INSPECT;
        if inspect {
            if buf.len() < h.total {
                return Ok(Step::NeedMore);
            }
            let body = &buf[5..h.total];
            return Ok(match self.control(h.tag, body)? {
                Some(with) => Step::Replace { len: h.total, with },
                None => Step::Pass(h.total),
            });
        }
        if matches!(
            (h.tag, self.front_kind()),
            (b'1', Some(ExpectKind::Reparse)) | (b'3', Some(ExpectKind::Preclose))
        ) {
            // pgiam's own Parse or Close: its answer goes no further.
            if buf.len() < h.total {
                return Ok(Step::NeedMore);
            }
            self.complete(Some("00000"), None, None);
            return Ok(Step::Replace {
                len: h.total,
                with: Bytes::new(),
            });
        }
        self.other(h.tag);
        if buf.len() >= h.total {
            Ok(Step::Pass(h.total))
        } else {
            self.remaining = h.total - buf.len();
            Ok(Step::Pass(buf.len()))
        }
    }

    fn front_kind(&mut self) -> Option<ExpectKind> {
        // A copy's end marker at the front is owed nothing: the copy it ended is answered.
        while self
            .expects
            .front()
            .is_some_and(|e| e.kind == ExpectKind::CopyEnd)
        {
            self.expects.pop_front();
        }
        self.expects.front().map(|e| e.kind)
    }

    /// The request at the front started a COPY FROM STDIN (CopyInResponse): the Syncs the
    /// client sent after it, up to the end of the copy, are ignored by the server and owed
    /// nothing. If the copy has not ended yet, those still to come are dropped as they arrive.
    fn enter_copy_in(&mut self) {
        let mut i = 1;
        while i < self.expects.len() {
            match self.expects[i].kind {
                ExpectKind::Sync => {
                    self.expects.remove(i);
                }
                ExpectKind::CopyEnd => {
                    self.expects.remove(i);
                    return;
                }
                _ => i += 1,
            }
        }
        self.copy_in = true;
    }

    /// Ends the request at the front. `sqlstate: None` for one the server skipped.
    fn complete(&mut self, sqlstate: Option<&str>, rows: Option<u64>, tag: Option<String>) {
        let Some(e) = self.expects.pop_front() else {
            return;
        };
        let failed = sqlstate != Some("00000");
        for (index, name, generation) in e.creates {
            // In a Query, statements before the failing one ran.
            let ran = matches!(e.kind, ExpectKind::Query) && index < self.done;
            if failed && !ran {
                self.events.push(Event::NotPrepared { name, generation });
            }
        }
        if let Some(record) = e.record {
            if e.execution_follows {
                if !failed {
                    return;
                }
                // The execution it stood for will not run: this is the record's completion,
                // and the execution's skip writes none.
                for later in self.expects.iter_mut() {
                    if later.record.as_deref() == Some(record.as_str()) {
                        later.record = None;
                    }
                }
            }
            self.events.push(Event::Completed {
                record,
                sqlstate: sqlstate.map(str::to_owned),
                rows,
                tag,
                micros: e.started.elapsed().as_micros() as u64,
            });
        }
    }

    /// Messages that need only their tag.
    fn other(&mut self, tag: u8) {
        match (tag, self.front_kind()) {
            (b'1', Some(ExpectKind::Parse))
            | (b'2', Some(ExpectKind::Bind))
            | (b'3', Some(ExpectKind::Close))
            | (b'T' | b'n', Some(ExpectKind::Describe)) => self.complete(Some("00000"), None, None),
            (b'G', Some(ExpectKind::Query | ExpectKind::Execute)) => self.enter_copy_in(),
            (b'I', Some(ExpectKind::Query)) => self.done += 1,
            (b'I', Some(ExpectKind::Execute)) => self.complete(Some("00000"), Some(0), None),
            (b's', Some(ExpectKind::Execute)) => {
                self.complete(Some("00000"), None, Some("suspended".into()))
            }
            _ => {}
        }
    }

    /// ErrorResponse, CommandComplete, ParameterStatus, ReadyForQuery; returns a replacement.
    fn control(&mut self, tag: u8, body: &[u8]) -> Result<Option<Bytes>, WireError> {
        match wire::decode_backend(tag, body)? {
            BackendMessage::ErrorResponse(fields) => {
                let code = fields.get_str(b'C').unwrap_or("XX000").to_owned();
                let Some(front) = self.expects.front() else {
                    return Ok(None);
                };
                // The sentinel's own error becomes pgiam's refusal; any other error
                // (25P02 in a failed transaction, a shutdown) is what the server would have
                // said about the statement too.
                let replacement = match &front.refused {
                    Some(e) if code == super::statements::SENTINEL_SQLSTATE => {
                        let mut b = BytesMut::new();
                        e.encode(&mut b);
                        Some(b.freeze())
                    }
                    _ => None,
                };
                let reported = if replacement.is_some() {
                    front.refused.as_ref().map(|e| e.code.to_owned())
                } else {
                    Some(code)
                };
                match front.kind {
                    ExpectKind::Query | ExpectKind::FunctionCall | ExpectKind::Sync => {
                        if self.error.is_none() {
                            self.error = reported;
                        }
                    }
                    _ => {
                        self.complete(reported.as_deref(), None, None);
                        // The server ignores everything up to the next Sync, simple Query and
                        // FunctionCall included.
                        while self.front_kind().is_some_and(|k| k != ExpectKind::Sync) {
                            self.complete(None, None, None);
                        }
                        self.skipping = self.expects.is_empty();
                    }
                }
                Ok(replacement)
            }
            BackendMessage::CommandComplete { tag } => {
                let tag = String::from_utf8_lossy(tag).into_owned();
                let rows = tag.rsplit(' ').next().and_then(|n| n.parse::<u64>().ok());
                match self.front_kind() {
                    Some(ExpectKind::Query) => {
                        self.done += 1;
                        self.rows += rows.unwrap_or(0);
                        self.tag = Some(tag);
                    }
                    Some(ExpectKind::Execute) => self.complete(Some("00000"), rows, Some(tag)),
                    _ => {}
                }
                Ok(None)
            }
            BackendMessage::ParameterStatus { name, value } => {
                if name == b"standard_conforming_strings" {
                    self.events
                        .push(Event::StandardConformingStrings(value != b"off"));
                }
                if name == b"client_encoding" {
                    let value = String::from_utf8_lossy(value);
                    if crate::sql::is_unsafe_encoding(&value) {
                        self.events
                            .push(Event::UnsafeClientEncoding(value.into_owned()));
                    } else {
                        self.events.push(Event::ClientEncoding(value.into_owned()));
                    }
                }
                Ok(None)
            }
            BackendMessage::ReadyForQuery(status) => {
                self.in_block = status != wire::TransactionStatus::Idle;
                // Ends a Query, a FunctionCall or a Sync (and anything before it, which the
                // server skipped).
                while let Some(kind) = self.front_kind() {
                    if kind.is_extended() {
                        self.complete(None, None, None);
                        continue;
                    }
                    let error = self.error.take();
                    let sqlstate = error.as_deref().unwrap_or("00000").to_owned();
                    let (rows, tag) = match kind {
                        ExpectKind::Query => (Some(self.rows), self.tag.take()),
                        _ => (None, None),
                    };
                    self.complete(Some(&sqlstate), rows, tag);
                    self.done = 0;
                    self.rows = 0;
                    self.tag = None;
                    break;
                }
                // What was forwarded after this request may have opened an implicit
                // transaction that only its own ReadyForQuery ends.
                self.unsynced = !self.expects.is_empty();
                Ok(None)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::PgError;

    fn expect(kind: ExpectKind, record: &str, refused: bool) -> Expect {
        Expect {
            kind,
            record: (!record.is_empty()).then(|| record.to_owned()),
            refused: refused
                .then(|| Box::new(PgError::error("42501", "pgiam: permission denied: x"))),
            creates: Vec::new(),
            started: std::time::Instant::now(),
            execution_follows: false,
        }
    }

    fn error(code: &'static str) -> BytesMut {
        let mut b = BytesMut::new();
        PgError::error(code, "m").encode(&mut b);
        b
    }

    fn run(r: &mut Responses, data: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = Vec::new();
        for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            let mut pos = 0;
            loop {
                match r.step(&buf[pos..]).unwrap() {
                    Step::Pass(n) => {
                        out.extend_from_slice(&buf[pos..pos + n]);
                        pos += n;
                    }
                    Step::Replace { len, with } => {
                        out.extend_from_slice(&with);
                        pos += len;
                    }
                    Step::NeedMore => break,
                }
            }
            buf.drain(..pos);
        }
        assert!(buf.is_empty());
        out
    }

    proptest::proptest! {
        /// Whatever the server sends, against whatever was forwarded, in any chunking: the
        /// matcher answers with an error or steps through, never panics, and never passes more
        /// bytes than it was given.
        #[test]
        fn the_matcher_never_panics_on_any_server_bytes(
            kinds in proptest::collection::vec(0..11usize, 0..6),
            refused in proptest::collection::vec(proptest::bool::ANY, 6),
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            chunk in 1..64usize,
        ) {
            use ExpectKind::*;
            let all = [Query, FunctionCall, Parse, Bind, Execute, Describe, Close, Sync, CopyEnd, Reparse, Preclose];
            let mut r = Responses::default();
            for (i, k) in kinds.iter().enumerate() {
                r.push(expect(all[*k], "r-1", refused[i]));
            }
            let mut buf = Vec::new();
            'feed: for piece in data.chunks(chunk) {
                buf.extend_from_slice(piece);
                let mut pos = 0;
                loop {
                    match r.step(&buf[pos..]) {
                        Ok(Step::Pass(n)) => {
                            proptest::prop_assert!(pos + n <= buf.len());
                            pos += n;
                        }
                        Ok(Step::Replace { len, .. }) => {
                            proptest::prop_assert!(pos + len <= buf.len());
                            pos += len;
                        }
                        Ok(Step::NeedMore) => break,
                        Err(_) => break 'feed,
                    }
                }
                buf.drain(..pos);
            }
        }
    }

    fn completions(r: &Responses) -> Vec<(String, Option<String>, Option<u64>)> {
        r.events
            .iter()
            .filter_map(|e| match e {
                Event::Completed {
                    record,
                    sqlstate,
                    rows,
                    ..
                } => Some((record.clone(), sqlstate.clone(), *rows)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_answered_queue_gives_its_room_back_and_a_waiting_one_keeps_it() {
        let mut r = Responses::default();
        r.push(expect(ExpectKind::Query, "q", false));
        r.push(expect(ExpectKind::Query, "r", false));
        let mut server = BytesMut::new();
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut server);
        run(&mut r, &server, 1000);
        r.release();
        assert_eq!(r.expects.len(), 1, "one still waits for its answer");
        assert!(r.expects.capacity() > 0);
        run(&mut r, &server, 1000);
        r.release();
        assert_eq!(r.expects.capacity(), 0, "an idle session holds no queue");
        r.push(expect(ExpectKind::Query, "s", false));
        run(&mut r, &server, 1000);
        assert_eq!(completions(&r).len(), 3);
    }

    /// Between two transactions only once the server has said ReadyForQuery idle after the
    /// last thing forwarded: extended-protocol messages answered without a Sync still run in
    /// an implicit transaction.
    #[test]
    fn between_transactions_waits_for_the_ready_for_query_that_follows_everything_sent() {
        let mut idle = BytesMut::new();
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut idle);
        let mut r = Responses::default();
        assert!(r.between_transactions(), "nothing sent yet");
        r.push(expect(ExpectKind::Query, "q", false));
        // A pipeline: the Query, then Parse, Bind, Execute with a Flush and no Sync.
        r.push(expect(ExpectKind::Parse, "", false));
        r.push(expect(ExpectKind::Bind, "", false));
        r.push(expect(ExpectKind::Execute, "e", false));
        let mut answers = BytesMut::new();
        wire::command_complete(b"SELECT 1", &mut answers);
        answers.extend_from_slice(&idle);
        answers.extend_from_slice(b"1\0\0\0\x042\0\0\0\x04");
        wire::command_complete(b"INSERT 0 1", &mut answers);
        run(&mut r, &answers, 1000);
        assert!(r.idle());
        assert!(
            !r.between_transactions(),
            "the implicit transaction is open"
        );
        r.push(expect(ExpectKind::Sync, "", false));
        run(&mut r, &idle, 1000);
        assert!(r.between_transactions());
        let mut in_block = BytesMut::new();
        wire::ready_for_query(wire::TransactionStatus::InTransaction, &mut in_block);
        r.push(expect(ExpectKind::Query, "b", false));
        run(
            &mut r,
            &[&b"C\0\0\0\x0aBEGIN\0"[..], &in_block].concat(),
            1000,
        );
        assert!(!r.between_transactions(), "a transaction block is open");
    }

    /// pgiam's own Parse of the client's unnamed statement: its ParseComplete never reaches
    /// the client, its error does (and the client's Bind behind it is skipped).
    #[test]
    fn a_reparse_is_answered_to_pgiam_alone_unless_it_fails() {
        for chunk in [1, 4, 1000] {
            let mut r = Responses::default();
            r.push(expect(ExpectKind::Reparse, "", false));
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "e", false));
            r.push(expect(ExpectKind::Sync, "", false));
            let mut client = BytesMut::new();
            client.extend_from_slice(b"2\0\0\0\x04");
            wire::command_complete(b"SELECT 1", &mut client);
            wire::ready_for_query(wire::TransactionStatus::Idle, &mut client);
            let server = [&b"1\0\0\0\x04"[..], &client].concat();
            assert_eq!(run(&mut r, &server, chunk), &client[..], "chunk {chunk}");
            assert_eq!(
                completions(&r),
                [("e".into(), Some("00000".into()), Some(1))]
            );
            assert!(r.idle());

            let mut r = Responses::default();
            r.push(expect(ExpectKind::Reparse, "", false));
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "e", false));
            r.push(expect(ExpectKind::Sync, "", false));
            let mut z = BytesMut::new();
            wire::ready_for_query(wire::TransactionStatus::Idle, &mut z);
            let server = [&error("42P01")[..], &z].concat();
            assert_eq!(run(&mut r, &server, chunk), server, "chunk {chunk}");
            assert_eq!(completions(&r), [("e".into(), None, None)]);
            assert!(r.idle());
        }
    }

    #[test]
    fn a_refused_message_in_a_pipeline_fails_there_and_the_rest_is_skipped() {
        for chunk in [1, 3, 7, 1000] {
            let mut r = Responses::default();
            r.push(expect(ExpectKind::Parse, "a", false));
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "b", false));
            r.push(expect(ExpectKind::Parse, "c", true));
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "d", false));
            r.push(expect(ExpectKind::Sync, "", false));
            let mut head = BytesMut::new();
            head.extend_from_slice(b"1\0\0\0\x042\0\0\0\x04");
            wire::command_complete(b"INSERT 0 1", &mut head);
            let mut z = BytesMut::new();
            wire::ready_for_query(wire::TransactionStatus::Idle, &mut z);
            let server = [
                &head[..],
                &error(crate::session::statements::SENTINEL_SQLSTATE),
                &z,
            ]
            .concat();
            let out = run(&mut r, &server, chunk);
            let mut refusal = BytesMut::new();
            PgError::error("42501", "pgiam: permission denied: x").encode(&mut refusal);
            assert_eq!(out, [&head[..], &refusal, &z].concat(), "chunk {chunk}");
            assert_eq!(
                completions(&r),
                [
                    ("a".into(), Some("00000".into()), None),
                    ("b".into(), Some("00000".into()), Some(1)),
                    ("c".into(), Some("42501".into()), None),
                    ("d".into(), None, None),
                ]
            );
            assert!(r.expects.is_empty());
        }
    }

    /// A statement run at once (its record stands for its Parse and its Execute): completed
    /// once, by its Execute's answer, or by its Parse's failure (the Execute it stood for is
    /// then skipped without a second completion).
    #[test]
    fn a_statement_run_at_once_is_completed_once() {
        let at_once = || {
            let mut r = Responses::default();
            let mut parse = expect(ExpectKind::Parse, "p", false);
            parse.execution_follows = true;
            r.push(parse);
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "p", false));
            r.push(expect(ExpectKind::Sync, "", false));
            r
        };
        let mut z = BytesMut::new();
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut z);
        let mut ran = BytesMut::new();
        ran.extend_from_slice(b"1\0\0\0\x042\0\0\0\x04");
        wire::command_complete(b"SELECT 1", &mut ran);
        for chunk in [1, 5, 1000] {
            let mut r = at_once();
            run(&mut r, &[&ran[..], &z].concat(), chunk);
            assert_eq!(
                completions(&r),
                [("p".into(), Some("00000".into()), Some(1))]
            );
            let mut r = at_once();
            run(&mut r, &[&error("42P01")[..], &z].concat(), chunk);
            assert_eq!(completions(&r), [("p".into(), Some("42P01".into()), None)]);
            assert!(r.idle());
        }
    }

    #[test]
    fn after_an_extended_error_everything_until_sync_is_skipped_even_if_it_arrives_later() {
        let mut r = Responses::default();
        r.push(expect(ExpectKind::Parse, "p", false));
        let mut server = error("42P01");
        run(&mut r, &server, 1000);
        // Sent by the client after the server's error was read: ignored by the server too.
        r.push(expect(ExpectKind::Query, "q", false));
        r.push(expect(ExpectKind::Execute, "x", false));
        r.push(expect(ExpectKind::Sync, "", false));
        r.push(expect(ExpectKind::Query, "after", false));
        server.clear();
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut server);
        wire::command_complete(b"SELECT 1", &mut server);
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut server);
        run(&mut r, &server, 1000);
        assert_eq!(
            completions(&r),
            [
                ("p".into(), Some("42P01".into()), None),
                ("q".into(), None, None),
                ("x".into(), None, None),
                ("after".into(), Some("00000".into()), Some(1)),
            ]
        );
        assert!(r.expects.is_empty());
    }

    /// tokio-postgres (and other drivers) send Bind, Execute, Sync for a COPY FROM STDIN, then
    /// the data, CopyDone, Sync. The server ignores the first Sync (it arrives in copy-in
    /// mode): one ReadyForQuery answers both. Owing one for each put every later answer one
    /// request off, and a refusal's error then reached the client as the sentinel's own.
    #[test]
    fn syncs_sent_during_a_copy_in_are_owed_nothing() {
        let copy_in = |r: &mut Responses| {
            r.push(expect(ExpectKind::Bind, "", false));
            r.push(expect(ExpectKind::Execute, "copy", false));
            r.push(expect(ExpectKind::Sync, "", false));
        };
        let copy_end = |r: &mut Responses| {
            r.push(expect(ExpectKind::CopyEnd, "", false));
            r.push(expect(ExpectKind::Sync, "", false));
        };
        let mut server = BytesMut::new();
        server.extend_from_slice(b"2\0\0\0\x04");
        server.extend_from_slice(b"G\0\0\0\x07\0\0\0");
        wire::command_complete(b"COPY 3", &mut server);
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut server);
        let mut refused = error(crate::session::statements::SENTINEL_SQLSTATE);
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut refused);

        // The copy's end is queued before the server's CopyInResponse is read, and after it.
        for end_first in [true, false] {
            let mut r = Responses::default();
            copy_in(&mut r);
            let mut out = Vec::new();
            if end_first {
                copy_end(&mut r);
                out = run(&mut r, &server, 3);
            } else {
                let split = 5 + 8;
                out.extend(run(&mut r, &server[..split], 1000));
                copy_end(&mut r);
                out.extend(run(&mut r, &server[split..], 1000));
            }
            assert_eq!(out, server.to_vec());
            assert!(
                r.expects.is_empty(),
                "end_first={end_first}: nothing more is owed"
            );
            r.push(expect(ExpectKind::Query, "q", true));
            let out = run(&mut r, &refused, 1000);
            assert!(
                String::from_utf8_lossy(&out).contains("42501"),
                "end_first={end_first}: pgiam's refusal, not the sentinel's error"
            );
            assert_eq!(
                completions(&r),
                [
                    ("copy".into(), Some("00000".into()), Some(3)),
                    ("q".into(), Some("42501".into()), Some(0)),
                ]
            );
        }
    }

    #[test]
    fn only_the_sentinels_own_error_is_rewritten() {
        let mut r = Responses::default();
        r.push(expect(ExpectKind::Query, "q", true));
        let mut server = error("25P02");
        wire::ready_for_query(wire::TransactionStatus::Failed, &mut server);
        assert_eq!(run(&mut r, &server, 1000), server.to_vec());
        assert_eq!(
            completions(&r),
            [("q".into(), Some("25P02".into()), Some(0))]
        );
    }

    #[test]
    fn a_query_counts_rows_and_forgets_what_it_did_not_prepare() {
        let mut r = Responses::default();
        let mut q = expect(ExpectKind::Query, "q", false);
        q.creates = vec![(0, b"p1".to_vec(), 1), (2, b"p2".to_vec(), 2)];
        r.push(q);
        let mut server = BytesMut::new();
        wire::command_complete(b"PREPARE", &mut server);
        wire::command_complete(b"SELECT 3", &mut server);
        server.extend_from_slice(&error("22012"));
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut server);
        // A large row streams through in pieces.
        let mut big = BytesMut::new();
        big.extend_from_slice(b"D\0\x01\0\x04");
        big.extend_from_slice(&vec![b'x'; 65536]);
        let mut all = big.clone();
        all.extend_from_slice(&server);
        assert_eq!(run(&mut r, &all, 4096), all.to_vec());
        assert_eq!(
            completions(&r),
            [("q".into(), Some("22012".into()), Some(3))]
        );
        assert!(r.events.contains(&Event::NotPrepared {
            name: b"p2".to_vec(),
            generation: 2
        }));
        assert!(!r
            .events
            .iter()
            .any(|e| matches!(e, Event::NotPrepared { name, .. } if name == b"p1")));
    }

    #[test]
    fn standard_conforming_strings_changes_are_seen_across_reads() {
        let mut b = BytesMut::new();
        wire::parameter_status(b"application_name", b"x", &mut b);
        wire::parameter_status(b"standard_conforming_strings", b"off", &mut b);
        wire::ready_for_query(wire::TransactionStatus::Idle, &mut b);
        for chunk in 1..b.len() {
            let mut r = Responses::default();
            assert_eq!(run(&mut r, &b, chunk), b.to_vec());
            assert_eq!(
                r.events,
                [Event::StandardConformingStrings(false)],
                "chunk {chunk}"
            );
            assert!(r.at_boundary());
        }
        assert!(Responses::default().step(b"Z\0\0\0\x02").is_err());
    }

    #[test]
    fn client_encodings_the_server_reports_are_told_to_the_session() {
        let mut b = BytesMut::new();
        wire::parameter_status(b"client_encoding", b"LATIN1", &mut b);
        wire::parameter_status(b"client_encoding", b"SJIS", &mut b);
        let mut r = Responses::default();
        assert_eq!(run(&mut r, &b, b.len()), b.to_vec());
        assert_eq!(
            r.events,
            [
                Event::ClientEncoding("LATIN1".into()),
                Event::UnsafeClientEncoding("SJIS".into())
            ]
        );
    }
}
