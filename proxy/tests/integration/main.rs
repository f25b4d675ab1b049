//! Integration tests: a real PostgreSQL (started by the test) and the real spillway
//! binary. One test binary with modules, so the suite links once. `docs`,
//! `packaging` and `setup_script` need no server: they read the operator docs and the
//! `docker/` files, and run `.ci/setup` on a simulated machine.

mod context;
mod wire;

mod admin;
mod auth_tls;
mod bad_input;
mod bad_values;
mod cache;
mod clients;
mod clock_values;
mod crash;
mod databases;
mod demo;
mod detached;
mod differential;
mod differential_stream;
mod disk_full;
mod docs;
mod drivers;
mod echo;
mod flush_apply;
mod guarded_writes;
mod held_reads;
mod held_wire;
mod key_index;
mod lifecycle;
mod link_faults;
mod metrics;
mod model;
mod nats_cluster;
mod nats_journal;
mod nats_link;
mod outage;
mod overlay;
mod packaging;
mod pipelines;
mod pool_faults;
mod pool_listen;
mod pooling;
mod protocol;
mod reload;
mod replication;
mod replication_faults;
mod reserved_keys;
mod returning;
mod row_invalidation;
mod session_defects;
mod setup_script;
mod transactions;
mod triggers;
mod upsert_returning;
mod upserts;
mod write_back;
mod write_behind;
mod write_load;
mod write_options;
