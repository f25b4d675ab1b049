//! The tracker's rules, message by message: which request each backend message
//! answers, skip-to-Sync, fills, injected Parses.

use super::*;
use spillway_policies::cache::{Deps, Lookup, ResultCache};
use std::sync::Arc;
use std::time::Duration;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&u32::try_from(body.len() + 4).expect("small").to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn feed(t: &mut Tracker, tag: u8, body: &[u8]) -> Step {
    t.on_message(tag, &msg(tag, body))
}

fn fill(cache: &Arc<ResultCache>, key: &[u8]) -> Box<Fill> {
    let Lookup::Lead(ticket) = cache.lookup(key) else {
        panic!("expected to lead");
    };
    Fill::new(ticket, Deps::default(), Duration::from_secs(60))
}

#[test]
fn captures_one_execute_among_several() {
    let cache = ResultCache::new(1 << 20, 1 << 16);
    let mut t = Tracker::default();
    t.push(Expect::Bind);
    t.push(Expect::Execute { fill: None });
    t.push(Expect::Bind);
    t.push(Expect::DescribePortal { capture: true });
    t.push(Expect::Execute {
        fill: Some(fill(&cache, b"k")),
    });
    t.push(Expect::Ready {
        sync: true,
        fill: None,
        id: 0,
    });
    for (tag, body) in [
        (b'2', &b""[..]),
        (b'D', b"first"),
        (b'C', b"SELECT 1\0"),
        (b'2', b""),
        (b'T', b"rowdesc"),
        (b'D', b"second"),
        (b'N', b"notice"),
        (b'C', b"SELECT 1\0"),
    ] {
        assert!(!feed(&mut t, tag, body).ready);
    }
    assert!(feed(&mut t, b'Z', b"I").ready);
    assert!(t.quiet);
    let hit = cache.get(b"k").expect("stored");
    assert_eq!(
        hit.row_description.as_deref(),
        Some(&msg(b'T', b"rowdesc")[..])
    );
    let mut body = msg(b'D', b"second");
    body.extend(msg(b'C', b"SELECT 1\0"));
    assert_eq!(&hit.body[..], &body[..]);
}

#[test]
fn error_skips_to_sync_and_drops_fills() {
    let cache = ResultCache::new(1 << 20, 1 << 16);
    let mut t = Tracker::default();
    t.push(Expect::Bind);
    t.push(Expect::Execute {
        fill: Some(fill(&cache, b"k")),
    });
    t.push(Expect::Ready {
        sync: true,
        fill: None,
        id: 0,
    });
    let step = feed(&mut t, b'E', b"SERROR\0");
    assert!(step.error);
    assert!(feed(&mut t, b'Z', b"I").ready);
    assert!(t.quiet);
    assert!(cache.get(b"k").is_none());
    // The waiter-less fill was abandoned: the key can be led again.
    assert!(matches!(cache.lookup(b"k"), Lookup::Lead(_)));
}

#[test]
fn error_before_sync_is_queued_skips_later_messages() {
    let mut t = Tracker::default();
    t.push(Expect::Parse {
        swallow: false,
        prepared: None,
    });
    feed(&mut t, b'E', b"SERROR\0");
    assert!(t.is_skipping());
    t.push(Expect::Bind); // PostgreSQL ignores it
    t.push(Expect::Ready {
        sync: true,
        fill: None,
        id: 0,
    });
    assert!(feed(&mut t, b'Z', b"E").ready);
    assert!(t.quiet);
}

#[test]
fn injected_parse_is_swallowed_and_confirmed() {
    let mut t = Tracker::default();
    t.push(Expect::Parse {
        swallow: true,
        prepared: None,
    });
    t.push(Expect::Parse {
        swallow: false,
        prepared: None,
    });
    assert!(feed(&mut t, b'1', b"").swallow);
    assert!(!feed(&mut t, b'1', b"").swallow);
}

#[test]
fn simple_query_fill_needs_a_single_result() {
    let cache = ResultCache::new(1 << 20, 1 << 16);
    let mut t = Tracker::default();
    t.push(Expect::Ready {
        sync: false,
        fill: Some(fill(&cache, b"q")),
        id: 0,
    });
    feed(&mut t, b'T', b"rd");
    feed(&mut t, b'D', b"row");
    feed(&mut t, b'C', b"SELECT 1\0");
    feed(&mut t, b'Z', b"I");
    assert!(cache.get(b"q").is_some());
}

#[test]
fn oversized_result_is_not_cached() {
    let cache = ResultCache::new(1 << 20, 8);
    let mut t = Tracker::default();
    t.push(Expect::Ready {
        sync: false,
        fill: Some(fill(&cache, b"q")),
        id: 0,
    });
    feed(&mut t, b'T', b"rd");
    feed(&mut t, b'D', b"a long row");
    feed(&mut t, b'C', b"SELECT 1\0");
    feed(&mut t, b'Z', b"I");
    assert!(cache.get(b"q").is_none());
}

#[test]
fn unexpected_message_desyncs() {
    let mut t = Tracker::default();
    t.push(Expect::Bind);
    feed(&mut t, b'1', b"");
    assert!(t.desynced);
    t.push(Expect::Bind);
    assert!(t.quiet, "nothing is tracked once desynced");
}

#[test]
fn a_fatal_with_nothing_outstanding_is_no_surprise() {
    let mut t = Tracker::default();
    feed(&mut t, b'E', b"SFATAL\0VFATAL\0C25P03\0Mtimeout\0\0");
    assert!(!t.desynced);
    // Any other message out of nowhere is.
    feed(&mut t, b'E', b"SERROR\0VERROR\0C42601\0Mx\0\0");
    assert!(t.desynced);
}

#[test]
fn quiet_follows_the_queue() {
    let mut t = Tracker::default();
    assert!(t.quiet);
    t.push(Expect::Parse {
        swallow: false,
        prepared: None,
    });
    assert!(!t.quiet);
    feed(&mut t, b'E', b"SERROR\0");
    assert!(!t.quiet, "skipping to the Sync");
    t.push(Expect::Ready {
        sync: true,
        fill: None,
        id: 0,
    });
    assert!(!t.quiet);
    feed(&mut t, b'Z', b"I");
    assert!(t.quiet);
}
