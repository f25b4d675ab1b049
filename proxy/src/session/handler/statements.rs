//! The statements and portals of a session, on the client's side and on PostgreSQL's.
//!
//! Named statements are always prepared upstream (their names share PostgreSQL's
//! namespace with SQL PREPARE): they are known here once PostgreSQL confirmed their
//! Parse. The unnamed statement may be the client's alone: an extended cycle answered
//! locally parsed it only here, and it is parsed upstream before anything forwarded
//! uses it ([`Statements::take_pending_parse`]). A simple Query replaces the unnamed
//! statement and the unnamed portal on both sides, as on PostgreSQL.
//!
//! Invariant: the statement behind a portal is the one PostgreSQL bound it to (portals
//! are recorded when their Bind is forwarded), and named portals are forgotten when
//! the transaction ends.

use std::sync::Arc;

use bytes::Bytes;

use super::settings::StmtHash;
use crate::read::classify::Analysis;

/// A statement the session prepared (or asked spillway to prepare lazily).
pub struct Stmt {
    pub sql: Box<str>,
    pub param_types: Box<[u8]>,
    pub analysis: Arc<Analysis>,
    /// The client's Parse message, replayed upstream when the statement is first
    /// needed there.
    pub parse_msg: Bytes,
    /// The cache key's hash state through this statement's parts (`extended_get`).
    pub key_hash: StmtHash,
    /// The statement's part of an extended request's cache key, in one piece (so a
    /// hit compares it at once): the text and the parameter types, each after its
    /// length (four bytes, big-endian).
    pub key_part: Box<[u8]>,
}

impl Stmt {
    pub fn new(sql: &str, param_types: &[u8], analysis: Arc<Analysis>, parse_msg: Bytes) -> Self {
        let len = |n: usize| u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes();
        let mut key_part = Vec::with_capacity(8 + sql.len() + param_types.len());
        key_part.extend_from_slice(&len(sql.len()));
        key_part.extend_from_slice(sql.as_bytes());
        key_part.extend_from_slice(&len(param_types.len()));
        key_part.extend_from_slice(param_types);
        Self {
            sql: sql.into(),
            param_types: param_types.into(),
            analysis,
            parse_msg,
            key_hash: StmtHash::default(),
            key_part: key_part.into(),
        }
    }

    pub fn same_as(&self, other: &Stmt) -> bool {
        self.sql == other.sql && self.param_types == other.param_types
    }
}

/// The unnamed statement on both sides, and the unnamed portal.
pub struct Unnamed {
    /// The client's unnamed statement, when known.
    client: Option<Arc<Stmt>>,
    /// PostgreSQL's, once its ParseComplete confirmed it.
    upstream: Option<Arc<Stmt>>,
    /// The client's was answered locally and is not PostgreSQL's yet.
    pending: bool,
    /// The statement behind PostgreSQL's unnamed portal.
    portal: Option<Arc<Stmt>>,
}

impl Unnamed {
    /// After a simple Query: neither side has one spillway knows of.
    pub const NONE: Unnamed = Unnamed {
        client: None,
        upstream: None,
        pending: false,
        portal: None,
    };
}

/// The session's maps by name: keyed aHash (ADR 0029), looked up on every Bind of a
/// named statement (SipHash cost about 70 instructions a prepared hit).
type ByName = ahash::AHashMap<String, Arc<Stmt>>;

pub struct Statements {
    named: ByName,
    /// Named portals forwarded upstream in the current transaction.
    portals: ByName,
    /// Replaced whole by a simple Query (`Unnamed::NONE`), also on the hit path.
    pub unnamed: Unnamed,
}

/// What a statement becomes once PostgreSQL confirms its Parse.
pub enum Prepared {
    Named(String, Arc<Stmt>),
    Unnamed(Arc<Stmt>),
}

impl Statements {
    pub fn new() -> Self {
        Self {
            named: ByName::new(),
            portals: ByName::new(),
            unnamed: Unnamed::NONE,
        }
    }

    /// The statement a Bind or Describe names: `""` is the client's unnamed one.
    pub fn statement(&self, name: &str) -> Option<&Arc<Stmt>> {
        if name.is_empty() {
            self.unnamed.client.as_ref()
        } else {
            self.named.get(name)
        }
    }

    /// A statement PostgreSQL confirmed under `name` (never the unnamed one).
    pub fn named(&self, name: &str) -> Option<&Arc<Stmt>> {
        self.named.get(name)
    }

    /// The client's unnamed statement.
    pub fn client_unnamed(&self) -> Option<&Arc<Stmt>> {
        self.unnamed.client.as_ref()
    }

    /// The statement behind a portal PostgreSQL has.
    pub fn portal(&self, name: &str) -> Option<&Arc<Stmt>> {
        if name.is_empty() {
            self.unnamed.portal.as_ref()
        } else {
            self.portals.get(name)
        }
    }

    /// A Parse goes upstream: what PostgreSQL's ParseComplete will confirm.
    pub fn parse_forwarded(&mut self, name: &str, stmt: Arc<Stmt>) -> Prepared {
        if name.is_empty() {
            self.unnamed.client = Some(stmt.clone());
            self.unnamed.upstream = None;
            self.unnamed.pending = false;
            Prepared::Unnamed(stmt)
        } else {
            self.named.remove(name);
            Prepared::Named(name.to_owned(), stmt)
        }
    }

    /// PostgreSQL confirmed a Parse.
    pub fn confirmed(&mut self, prepared: Prepared) {
        match prepared {
            Prepared::Named(name, stmt) => {
                self.named.insert(name, stmt);
            }
            Prepared::Unnamed(stmt) => self.unnamed.upstream = Some(stmt),
        }
    }

    /// A Bind goes upstream: `portal` is bound to `stmt` (`None`: unknown).
    pub fn bind_forwarded(&mut self, portal: &str, stmt: Option<Arc<Stmt>>) {
        if portal.is_empty() {
            self.unnamed.portal = stmt;
        } else {
            match stmt {
                Some(s) => {
                    self.portals.insert(portal.to_owned(), s);
                }
                None => {
                    self.portals.remove(portal);
                }
            }
        }
    }

    /// A Close of statement (`b'S'`) or portal `name` goes upstream, or is answered
    /// by a detached session (PostgreSQL's copy died with its backend).
    pub fn closed(&mut self, kind: u8, name: &str) {
        match (kind, name.is_empty()) {
            (b'S', true) => {
                self.unnamed.client = None;
                self.unnamed.upstream = None;
                self.unnamed.pending = false;
            }
            (b'S', false) => {
                self.named.remove(name);
            }
            (_, true) => self.unnamed.portal = None,
            (_, false) => {
                self.portals.remove(name);
            }
        }
    }

    /// SQL PREPARE or DEALLOCATE of `name` (they share the protocol's namespace).
    pub fn forget_named(&mut self, name: &str) {
        self.named.remove(name);
    }

    /// DEALLOCATE ALL or DISCARD ALL.
    pub fn forget_all(&mut self) {
        self.named.clear();
        self.portals.clear();
        self.unnamed = Unnamed::NONE;
    }

    /// An extended cycle answered locally parsed `stmt` as the unnamed statement:
    /// it is the client's now, and PostgreSQL's only once parsed there.
    pub fn parsed_locally(&mut self, stmt: Arc<Stmt>) {
        self.unnamed.pending = !self
            .unnamed
            .upstream
            .as_ref()
            .is_some_and(|u| u.same_as(&stmt));
        self.unnamed.client = Some(stmt);
    }

    /// A cycle answered locally bound the unnamed portal: PostgreSQL's is not the
    /// client's any more.
    pub fn portal_answered_locally(&mut self) {
        self.unnamed.portal = None;
    }

    /// Before a forwarded message uses the unnamed statement: the client's, if
    /// PostgreSQL must parse it first (its ParseComplete is then not the client's).
    pub fn take_pending_parse(&mut self) -> Option<Arc<Stmt>> {
        if !self.unnamed.pending {
            return None;
        }
        self.unnamed.pending = false;
        let stmt = self.unnamed.client.clone()?;
        self.unnamed.upstream = None;
        Some(stmt)
    }

    /// spillway sent a simple Query of its own: PostgreSQL's unnamed statement and
    /// portal are gone, the client's is parsed there again before its next use.
    pub fn internal_query(&mut self) {
        self.unnamed.upstream = None;
        self.unnamed.pending = self.unnamed.client.is_some();
        self.unnamed.portal = None;
    }

    /// Nothing is outstanding upstream: an injected Parse that PostgreSQL skipped (an
    /// error earlier in its cycle) was never confirmed, so it is parsed again.
    pub fn settle(&mut self) {
        let u = &mut self.unnamed;
        u.pending = match (&u.client, &u.upstream) {
            (Some(c), Some(up)) => !up.same_as(c),
            (Some(_), None) => true,
            (None, _) => false,
        };
    }

    /// The transaction ended: its portals are gone.
    pub fn transaction_ended(&mut self) {
        self.portals.clear();
        self.unnamed.portal = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(sql: &str) -> Arc<Stmt> {
        Arc::new(Stmt::new(
            sql,
            &[],
            Arc::new(crate::read::classify::analyze(sql)),
            Bytes::copy_from_slice(sql.as_bytes()),
        ))
    }

    #[test]
    fn the_unnamed_statement_on_both_sides() {
        let mut s = Statements::new();
        // Answered locally: the client's alone, parsed upstream before its next use,
        // once.
        s.parsed_locally(stmt("SELECT 1"));
        assert!(s.take_pending_parse().is_some());
        assert!(s.take_pending_parse().is_none());
        // Forwarded and confirmed: both sides agree, nothing to parse again.
        let a = stmt("SELECT 2");
        let Prepared::Unnamed(confirmed) = s.parse_forwarded("", a.clone()) else {
            panic!("unnamed");
        };
        s.confirmed(Prepared::Unnamed(confirmed));
        s.settle();
        assert!(s.take_pending_parse().is_none());
        s.parsed_locally(stmt("SELECT 2"));
        assert!(
            s.take_pending_parse().is_none(),
            "the same text is PostgreSQL's"
        );
        // spillway's own query replaces PostgreSQL's: parsed again.
        s.internal_query();
        assert!(s.take_pending_parse().is_some());
        // A simple Query replaces both, and the portal.
        s.bind_forwarded("", Some(a));
        assert!(s.portal("").is_some());
        s.unnamed = Unnamed::NONE;
        assert!(s.portal("").is_none() && s.client_unnamed().is_none());
    }

    #[test]
    fn named_statements_and_portals() {
        let mut s = Statements::new();
        let p = s.parse_forwarded("s1", stmt("SELECT 3"));
        assert!(s.named("s1").is_none(), "not before PostgreSQL confirms it");
        s.confirmed(p);
        assert!(s.statement("s1").is_some());
        s.bind_forwarded("p1", s.named("s1").cloned());
        assert!(s.portal("p1").is_some());
        s.transaction_ended();
        assert!(s.portal("p1").is_none());
        s.closed(b'S', "s1");
        assert!(s.named("s1").is_none());
        s.confirmed(Prepared::Named("s2".into(), stmt("SELECT 4")));
        s.forget_all();
        assert!(s.named("s2").is_none());
    }
}
