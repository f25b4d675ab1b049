//! The scenarios: what each one sends, which tables it needs (a table *group*, whose
//! setup SQL in `loadtest/sql/` is shared with the pgbench scripts), and the spillway
//! table config it expects (`loadtest/config/`, embedded here so the binary and the
//! scripts never disagree).
//!
//! Each scenario is a loop of *operations*; one operation is what one pgbench
//! "transaction" would be (for `orm-tx`, BEGIN/INSERT/INSERT/COMMIT; for
//! `mixed-session`, an UPDATE and the SELECT that reads it back). Throughput counts
//! operations. Every write operation reports its intended effect and whether it was
//! acknowledged, so [`verify`] can compare the final table state with it.

pub mod ops;
pub mod verify;

use serde::Serialize;

/// A named workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    PointRead,
    ReadMostly,
    JoinRead,
    WriteUpdate,
    WriteInsert,
    HotCounters,
    OrmTx,
    MixedSession,
}

/// A set of tables created and filled together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Accounts,
    Balances,
    Events,
    Counters,
    Shop,
    Orm,
    Sessions,
}

impl Scenario {
    pub const ALL: [Scenario; 8] = [
        Scenario::PointRead,
        Scenario::ReadMostly,
        Scenario::JoinRead,
        Scenario::WriteUpdate,
        Scenario::WriteInsert,
        Scenario::HotCounters,
        Scenario::OrmTx,
        Scenario::MixedSession,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::PointRead => "point-read",
            Scenario::ReadMostly => "read-mostly",
            Scenario::JoinRead => "join-read",
            Scenario::WriteUpdate => "write-update",
            Scenario::WriteInsert => "write-insert",
            Scenario::HotCounters => "hot-counters",
            Scenario::OrmTx => "orm-tx",
            Scenario::MixedSession => "mixed-session",
        }
    }

    pub fn from_name(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::PointRead => {
                "SELECT balance FROM lt_accounts WHERE id = $1, uniform random key (pgbench -S)"
            }
            Scenario::ReadMostly => {
                "95% the point read, 5% UPDATE lt_accounts SET balance = balance + $1 WHERE id = $2"
            }
            Scenario::JoinRead => {
                "a customer's orders and their lines: lt_customers ⋈ lt_orders ⋈ lt_order_lines (15 rows)"
            }
            Scenario::WriteUpdate => {
                "UPDATE lt_balances SET balance = balance + $1 WHERE id = $2, uniform random key"
            }
            Scenario::WriteInsert => {
                "INSERT INTO lt_events VALUES ($1, …) with client-generated, never reused keys"
            }
            Scenario::HotCounters => {
                "UPDATE lt_counters SET n = n + 1 WHERE id = $1 over 100 hot keys"
            }
            Scenario::OrmTx => {
                "BEGIN; INSERT INTO lt_orm_orders …; INSERT INTO lt_orm_items …; COMMIT"
            }
            Scenario::MixedSession => {
                "a user session: UPDATE its own lt_sessions row, then SELECT it back (must see its write)"
            }
        }
    }

    pub fn group(self) -> Group {
        match self {
            Scenario::PointRead | Scenario::ReadMostly => Group::Accounts,
            Scenario::JoinRead => Group::Shop,
            Scenario::WriteUpdate => Group::Balances,
            Scenario::WriteInsert => Group::Events,
            Scenario::HotCounters => Group::Counters,
            Scenario::OrmTx => Group::Orm,
            Scenario::MixedSession => Group::Sessions,
        }
    }

    /// Whether it writes, and so gets a correctness check.
    pub fn writes(self) -> bool {
        !matches!(self, Scenario::PointRead | Scenario::JoinRead)
    }

    /// The spillway table config this scenario is meant to run with (TOML).
    pub fn spillway_config(self) -> &'static str {
        self.group().spillway_config()
    }
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Accounts => "accounts",
            Group::Balances => "balances",
            Group::Events => "events",
            Group::Counters => "counters",
            Group::Shop => "shop",
            Group::Orm => "orm",
            Group::Sessions => "sessions",
        }
    }

    pub fn tables(self) -> &'static [&'static str] {
        match self {
            Group::Accounts => &["public.lt_accounts"],
            Group::Balances => &["public.lt_balances"],
            Group::Events => &["public.lt_events"],
            Group::Counters => &["public.lt_counters"],
            Group::Shop => &[
                "public.lt_customers",
                "public.lt_orders",
                "public.lt_order_lines",
            ],
            Group::Orm => &["public.lt_orm_orders", "public.lt_orm_items"],
            Group::Sessions => &["public.lt_sessions"],
        }
    }

    /// Setup SQL with the psql variable `:scale` (the pgbench scripts run it with
    /// `psql -v scale=N`).
    pub fn setup_sql(self) -> &'static str {
        match self {
            Group::Accounts => include_str!("../../sql/accounts.sql"),
            Group::Balances => include_str!("../../sql/balances.sql"),
            Group::Events => include_str!("../../sql/events.sql"),
            Group::Counters => include_str!("../../sql/counters.sql"),
            Group::Shop => include_str!("../../sql/shop.sql"),
            Group::Orm => include_str!("../../sql/orm.sql"),
            Group::Sessions => include_str!("../../sql/sessions.sql"),
        }
    }

    pub fn spillway_config(self) -> &'static str {
        match self {
            Group::Accounts => include_str!("../../config/accounts.toml"),
            Group::Balances => include_str!("../../config/balances.toml"),
            Group::Events => include_str!("../../config/events.toml"),
            Group::Counters => include_str!("../../config/counters.toml"),
            Group::Shop => include_str!("../../config/shop.toml"),
            Group::Orm => include_str!("../../config/orm.toml"),
            Group::Sessions => include_str!("../../config/sessions.toml"),
        }
    }
}

/// The schema `lt_meta` that records each group's scale and dataset id.
pub const META_SQL: &str = include_str!("../../sql/meta.sql");

/// The setup SQL of `group` at `scale`, as one simple-protocol batch.
pub fn setup_batch(group: Group, scale: u32) -> String {
    group.setup_sql().replace(":scale", &scale.to_string())
}

/// The combined table config of several scenarios (each group once).
pub fn combined_config(scenarios: &[Scenario]) -> String {
    let mut groups: Vec<Group> = Vec::new();
    for s in scenarios {
        if !groups.contains(&s.group()) {
            groups.push(s.group());
        }
    }
    let mut out = String::from(
        "# spillway table config expected by spillway-loadtest scenarios.\n\
         # Add to spillway.toml. Deferred policies (write-back, write-behind) need a\n\
         # spillway build that supports them; a build that does not refuses them at start.\n\n",
    );
    for g in groups {
        out.push_str(g.spillway_config());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Scenario::ALL {
            assert_eq!(Scenario::from_name(s.name()), Some(s));
            assert_eq!(
                serde_json::to_value(s).expect("serialises"),
                serde_json::Value::String(s.name().to_owned())
            );
        }
        assert_eq!(Scenario::from_name("nope"), None);
    }

    #[test]
    fn every_group_has_setup_and_config_naming_its_tables() {
        for s in Scenario::ALL {
            let g = s.group();
            let sql = setup_batch(g, 3);
            assert!(!sql.contains(":scale"), "{}", g.name());
            assert!(sql.contains(&format!("'{}', 3", g.name())), "{}", g.name());
            for t in g.tables() {
                let bare = t.trim_start_matches("public.");
                assert!(sql.contains(&format!("CREATE TABLE {bare} (")), "{t}");
                assert!(
                    g.spillway_config().contains(&format!("[tables.\"{t}\"]")),
                    "{t}"
                );
            }
        }
    }

    #[test]
    fn pgbench_scripts_and_lib_sh_follow_the_scenarios() {
        let lib = include_str!("../../pgbench/lib.sh");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pgbench/scenarios");
        for s in Scenario::ALL {
            let line = format!("    {}) echo {} ;;", s.name(), s.group().name());
            assert!(lib.contains(&line), "lib.sh lacks `{line}`");
            assert!(
                lib.contains(&format!(" {}", s.name())),
                "SCENARIOS_ALL lacks {}",
                s.name()
            );
            let script = std::fs::read_to_string(dir.join(format!("{}.sql", s.name())))
                .unwrap_or_else(|e| panic!("pgbench script of {}: {e}", s.name()));
            for t in s.group().tables() {
                let bare = t.trim_start_matches("public.");
                assert!(
                    script.contains(bare) || s == Scenario::JoinRead,
                    "{} does not use {bare}",
                    s.name()
                );
            }
        }
    }

    #[test]
    fn combined_config_lists_each_table_once() {
        let c = combined_config(&Scenario::ALL);
        assert_eq!(c.matches("[tables.\"public.lt_accounts\"]").count(), 1);
        assert!(c.contains("[tables.\"public.lt_counters\"]\npolicy = \"write-back\""));
    }
}
