//! `spillway-loadtest`: the bundled load tests (SPEC §1.3). It drives named scenarios
//! against several targets (typically PostgreSQL directly and spillway in front of
//! it) in alternating rounds, A B A B …, so that drift of the machine hits every
//! target alike, and reports throughput, ratios, latency percentiles, errors by
//! SQLSTATE, spillway's own metrics, and a correctness check of what the writes left
//! behind — as Markdown, JSON and a plot.
//!
//! It also carries [`link`], a TCP relay that adds a round trip, so that the same
//! comparisons can put PostgreSQL behind a modelled network.
//!
//! It is a real client over the wire only ([`wire`], its own small client on
//! postgres-protocol, ADR 0019): it never links spillway
//! and never looks behind a target's back except through the same SQL any client
//! could send.
//!
//! It is not a benchmark harness for spillway's internals (those are criterion
//! benches), and it does not start servers: it measures the ones it is pointed at.
//!
//! Module map: [`cli`] (arguments), [`plan`] (the alternation schedule and the ratio
//! arithmetic), [`scenario`] (workloads, schemas, expected spillway config,
//! correctness checks), [`db`] (one client session in a protocol mode), [`runner`]
//! (phases, workers, deadlines), [`progress`], [`metrics`] (Prometheus text from
//! spillway), [`report`] (JSON, Markdown, plot), [`setup`], [`link`] (the link
//! emulator).

pub mod app;
pub mod cli;
pub mod db;
pub mod link;
pub mod metrics;
pub mod pgcpu;
pub mod plan;
pub mod progress;
pub mod report;
pub mod runner;
pub mod scenario;
pub mod setup;
pub mod target;
pub mod wire;
