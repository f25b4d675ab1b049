//! The load generator's own wire client logs in with every method PostgreSQL offers
//! over plain TCP (SCRAM-SHA-256, md5, cleartext password, trust), and a wrong
//! password is a clear error naming the target. Against a throwaway PostgreSQL.

use std::process::Command;

use spillway::ops::throwaway::ThrowawayPostgres;

const BIN: &str = env!("CARGO_BIN_EXE_spillway-loadtest");

#[test]
fn logs_in_with_scram_md5_password_and_trust() {
    let pg = ThrowawayPostgres::builder()
        .hba("host all lt_scram 127.0.0.1/32 scram-sha-256")
        .hba("host all lt_md5 127.0.0.1/32 md5")
        .hba("host all lt_plain 127.0.0.1/32 password")
        .start()
        .expect("throwaway PostgreSQL");
    pg.psql(
        "postgres",
        "CREATE ROLE lt_scram SUPERUSER LOGIN PASSWORD 'sc''ram';
         SET password_encryption = 'md5';
         CREATE ROLE lt_md5 SUPERUSER LOGIN PASSWORD 'md five';
         CREATE ROLE lt_plain SUPERUSER LOGIN PASSWORD 'plain';",
    )
    .expect("roles");
    let port = pg.port();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tables.toml");
    let setup = |user_password: &str| {
        Command::new(BIN)
            .args(["setup", "--scenario", "hot-counters", "--config-out"])
            .arg(&config)
            .arg("--target")
            .arg(format!(
                "postgres://{user_password}@127.0.0.1:{port}/postgres?sslmode=disable"
            ))
            .output()
            .expect("runs")
    };
    for who in [
        "lt_scram:sc%27ram",
        "lt_md5:md%20five",
        "lt_plain:plain",
        pg.superuser(),
    ] {
        let out = setup(who);
        assert!(
            out.status.success(),
            "{who}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = setup("lt_scram:wrong");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("target setup (postgres://lt_scram:****@"),
        "{stderr}"
    );
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
}
