//! The bodies of spillway's fuzz targets, one function per target, each taking the
//! fuzzer's bytes. `fuzz_targets/*.rs` hand them to libFuzzer (`cargo fuzz run NAME`);
//! `proxy/tests/fuzz_corpus.rs` replays the seed corpora (`fuzz/corpus/NAME/`) through
//! the same functions on the stable toolchain, so every finding kept as a seed stays a
//! regression test of the ordinary suite.
//!
//! Invariant of every target: the decoder under test returns an error or a value for
//! any input and never panics, loops or allocates without bound. Where a decoded value
//! can be encoded again, the target also checks the round trip.

use std::sync::OnceLock;

use bytes::BytesMut;
use spillway::protocol::{backend, frame, frontend, scram, startup};
use spillway::read::classify::{Classifier, ClassifierLimits};

/// Startup packets and message framing: the bytes a client sends first, then as
/// messages, split at arbitrary points, framed as the relay frames them.
pub fn startup(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let cut = usize::from(split).min(rest.len());
    let mut buf = BytesMut::from(&rest[..cut]);
    if let Ok(Some(packet)) = startup::parse(&mut buf)
        && let startup::StartupPacket::Startup(msg) = &packet
    {
        let _ = (msg.user(), msg.database());
        // What spillway builds for itself reads back the same.
        let params: Vec<(&str, &str)> = msg
            .params
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        if params
            .iter()
            .all(|(k, v)| !k.is_empty() && !k.contains('\0') && !v.contains('\0'))
        {
            let built = startup::StartupMessage::build(&params);
            let mut again = BytesMut::from(&built[..]);
            match startup::parse(&mut again) {
                Ok(Some(startup::StartupPacket::Startup(back))) => {
                    assert_eq!(back.params, msg.params, "startup message round trip");
                }
                other => panic!("a built startup message does not parse: {other:?}"),
            }
        }
    }
    buf.extend_from_slice(&rest[cut..]);
    let limit = 1 << 16;
    while let Ok(Some(msg)) = frame::parse(&mut buf, limit) {
        assert!(msg.len() >= frame::Header::SIZE && msg.len() <= limit);
        frontend_message(&msg);
    }
}

/// Every frontend message reader, on one message (tag, length, body).
fn frontend_message(msg: &[u8]) {
    let body = frontend::body(msg);
    match msg[0] {
        frontend::QUERY => {
            let _ = frontend::query(body);
        }
        frontend::PARSE => {
            if let Some(p) = frontend::parse(body) {
                let _ = frontend::param_type_oids(p.param_types);
                let _ = frontend::parameter_description(p.param_types);
            }
        }
        frontend::BIND => {
            if let Some(b) = frontend::bind(body) {
                let _ = frontend::bind_params(b.params_and_formats);
            }
        }
        frontend::DESCRIBE | frontend::CLOSE => {
            let _ = frontend::target(body);
        }
        frontend::EXECUTE => {
            let _ = frontend::execute(body);
        }
        b'p' => {
            let _ = frontend::sasl_initial_response(body);
        }
        _ => {}
    }
}

/// The frontend readers on one message body whose tag is the first byte; also the
/// backend readers spillway applies to PostgreSQL's answers, and SCRAM's parsers.
pub fn messages(data: &[u8]) {
    let Some((&tag, body)) = data.split_first() else {
        return;
    };
    let mut msg = vec![tag];
    let len = u32::try_from(body.len() + 4).unwrap_or(u32::MAX);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(body);
    frontend_message(&msg);
    let _ = backend::parse_error_fields(body);
    let _ = backend::prefix_is_fatal(body);
    let _ = backend::ready_for_query_status(body);
    let _ = backend::parse_backend_key_data(body);
    let _ = backend::authentication_code(body);
    let _ = backend::sasl_mechanisms(body);
    let _ = backend::parse_parameter_status(body);
    if let Ok(text) = std::str::from_utf8(body) {
        let _ = scram::Verifier::parse(text);
    }
    let verifier = scram_verifier();
    if let Ok((exchange, _server_first)) = scram::Exchange::start(verifier, body) {
        let _ = exchange.finish(body);
    }
}

fn scram_verifier() -> &'static scram::Verifier {
    static VERIFIER: OnceLock<scram::Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| scram::Verifier::from_password("fuzz"))
}

/// The classifier on arbitrary SQL text (PostgreSQL's parser, then spillway's walk of
/// its tree: kinds, tables, write shapes).
pub fn classify(data: &[u8]) {
    static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let classifier = CLASSIFIER.get_or_init(|| {
        Classifier::new(ClassifierLimits {
            max_parse_bytes: 64 << 10,
            // No memo: every input is parsed and walked.
            memo_entries: 0,
            memo_bytes: 0,
        })
    });
    let analysis = classifier.classify(sql);
    let _ = (analysis.is_cacheable_shape(), analysis.writes_anything());
}

/// Journal recovery from arbitrary segment bytes: written as the journal's one segment
/// file, then recovered as at start, in both modes (`strict` with `fsync = "always"`).
pub fn journal(data: &[u8]) {
    let Ok(dir) = tempfile::tempdir_in(scratch()) else {
        return;
    };
    let path = spillway_policies::journal::segment_path(dir.path(), 1);
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let strict = spillway_policies::journal::recover_segments(dir.path(), true);
    let lenient = spillway_policies::journal::recover_segments(dir.path(), false);
    // What a strict recovery accepts, a lenient one accepts too.
    if strict.is_ok() {
        assert!(
            lenient.is_ok(),
            "lenient recovery refused what strict accepted"
        );
    }
    // The records' own decoder on the raw bytes as well.
    let _ = spillway_policies::writes::Record::decode(data);
}

/// Where the journal target writes: memory-backed when the machine has it.
fn scratch() -> &'static std::path::Path {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        std::path::Path::new("/tmp")
    }
}

/// Config loading from arbitrary TOML text, then its validation.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = spillway::config::Config::from_toml_str(text) {
        let _ = config.validate();
        let _ = config.table_policies();
        let _ = config.backend_target();
    }
}
