//! A throwaway PostgreSQL server in a temporary directory, started from the locally
//! installed server binaries with `initdb` + `pg_ctl`. Used by `spillway demo` and by
//! the integration tests, so both exercise the same code.
//!
//! Binaries are found through `SPILLWAY_PG_BIN`, then `pg_ctl` on `PATH`, then the
//! newest `/usr/lib/postgresql/*/bin`. PostgreSQL refuses to run as root, so when
//! spillway runs as root every server command runs as the `postgres` user (`runuser`).
//!
//! Invariant: the server lives exactly as long as the [`ThrowawayPostgres`] value; its
//! `Drop` stops it (immediate mode) and removes the directory.

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug, thiserror::Error)]
pub enum ThrowawayError {
    #[error(
        "PostgreSQL server binaries not found: set SPILLWAY_PG_BIN to the directory holding \
         initdb and pg_ctl, or install them (Debian: apt-get install postgresql)"
    )]
    NoBinaries,
    #[error("running as root, but there is no `postgres` user to run PostgreSQL as")]
    NoPostgresUser,
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{what} failed ({status}):\n{output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ThrowawayError {
    let what = what.into();
    move |error| ThrowawayError::Io { what, error }
}

/// Settings for a server not yet started.
#[derive(Debug, Clone)]
pub struct Builder {
    superuser: String,
    conf: Vec<String>,
    hba: Vec<String>,
}

impl Default for Builder {
    fn default() -> Self {
        Self {
            superuser: "spillway".to_owned(),
            // Durability is irrelevant for a throwaway server; speed is not.
            conf: vec![
                "fsync = off".to_owned(),
                "full_page_writes = off".to_owned(),
                "synchronous_commit = off".to_owned(),
                "max_connections = 200".to_owned(),
            ],
            hba: Vec::new(),
        }
    }
}

impl Builder {
    pub fn superuser(mut self, name: &str) -> Self {
        self.superuser = name.to_owned();
        self
    }

    /// A `postgresql.conf` line, appended after the defaults (so it wins).
    pub fn conf(mut self, line: &str) -> Self {
        self.conf.push(line.to_owned());
        self
    }

    /// A `pg_hba.conf` line, placed before the default trust rules (so it wins).
    pub fn hba(mut self, line: &str) -> Self {
        self.hba.push(line.to_owned());
        self
    }

    pub fn start(self) -> Result<ThrowawayPostgres, ThrowawayError> {
        let bin = find_bin_dir().ok_or(ThrowawayError::NoBinaries)?;
        let owner = if is_root() {
            Some(postgres_ids().ok_or(ThrowawayError::NoPostgresUser)?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("spillway-pg-")
            .tempdir()
            .map_err(io("creating a temporary directory"))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(io("handing the directory to the postgres user"))?;
        }
        let data = dir.path().join("data");
        let mut pg = ThrowawayPostgres {
            bin,
            run_as_postgres: owner.is_some(),
            superuser: self.superuser,
            data,
            port: 0,
            running: false,
            dir,
        };
        let mut initdb = pg.command("initdb");
        initdb.args([
            "-D",
            path_str(&pg.data),
            "-U",
            &pg.superuser,
            "--auth=trust",
            "--no-sync",
            "--encoding=UTF8",
            "--locale=C",
        ]);
        pg.run("initdb", initdb)?;
        let mut conf = self.conf.join("\n");
        conf.push('\n');
        append(&pg.data.join("postgresql.conf"), &conf)?;
        let hba_path = pg.data.join("pg_hba.conf");
        let existing = fs::read_to_string(&hba_path).map_err(io("reading pg_hba.conf"))?;
        let mut hba = self.hba.join("\n");
        hba.push('\n');
        hba.push_str(&existing);
        fs::write(&hba_path, hba).map_err(io("writing pg_hba.conf"))?;
        // A free port can be taken between probing and binding; try a few.
        let mut last = None;
        for _ in 0..5 {
            pg.port = free_port()?;
            match pg.start() {
                Ok(()) => return Ok(pg),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ThrowawayError::NoBinaries))
    }
}

pub struct ThrowawayPostgres {
    bin: PathBuf,
    run_as_postgres: bool,
    superuser: String,
    data: PathBuf,
    port: u16,
    running: bool,
    // Dropped last: the directory outlives the server.
    dir: tempfile::TempDir,
}

impl ThrowawayPostgres {
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn superuser(&self) -> &str {
        &self.superuser
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin
    }

    /// `postgres://user@127.0.0.1:port/db?sslmode=disable`
    pub fn url(&self, user: &str, db: &str) -> String {
        format!(
            "postgres://{user}@127.0.0.1:{}/{db}?sslmode=disable",
            self.port
        )
    }

    /// (Re)starts the server on its port and waits until it accepts connections.
    pub fn start(&mut self) -> Result<(), ThrowawayError> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            path_str(self.dir.path())
        );
        let log = self.dir.path().join("postgres.log");
        let mut cmd = self.command("pg_ctl");
        cmd.args([
            "-D",
            path_str(&self.data),
            "-l",
            path_str(&log),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ]);
        match self.run("pg_ctl start", cmd) {
            Ok(_) => {
                self.running = true;
                Ok(())
            }
            Err(ThrowawayError::Command {
                what,
                status,
                output,
            }) => {
                let tail = fs::read_to_string(&log).unwrap_or_default();
                Err(ThrowawayError::Command {
                    what,
                    status,
                    output: format!("{output}\nserver log:\n{tail}"),
                })
            }
            Err(e) => Err(e),
        }
    }

    /// Stops the server (immediate mode: like a crash, no checkpoint).
    pub fn stop(&mut self) -> Result<(), ThrowawayError> {
        self.stop_in("immediate")
    }

    /// Stops the server as an operator would (fast mode: every backend gets FATAL
    /// 57P01, then a shutdown checkpoint).
    pub fn stop_fast(&mut self) -> Result<(), ThrowawayError> {
        self.stop_in("fast")
    }

    fn stop_in(&mut self, mode: &str) -> Result<(), ThrowawayError> {
        if !self.running {
            return Ok(());
        }
        let mut cmd = self.command("pg_ctl");
        cmd.args(["-D", path_str(&self.data), "-m", mode, "-w", "stop"]);
        self.run("pg_ctl stop", cmd)?;
        self.running = false;
        Ok(())
    }

    /// Runs SQL through `psql` as the superuser; returns stdout.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, ThrowawayError> {
        let port = self.port.to_string();
        let psql = self.bin.join("psql");
        // Debian keeps psql on PATH (a wrapper), not beside the server binaries.
        let mut cmd = Command::new(if psql.is_file() {
            psql
        } else {
            PathBuf::from("psql")
        });
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            &self.superuser,
            "-d",
            db,
            "-c",
            sql,
        ]);
        let out = self.run("psql", cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// A server command, run as `postgres` when spillway runs as root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.run_as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    fn run(&self, what: &str, mut cmd: Command) -> Result<Output, ThrowawayError> {
        let out = cmd
            .current_dir(self.dir.path())
            .output()
            .map_err(io(format!("starting {what}")))?;
        if out.status.success() {
            Ok(out)
        } else {
            Err(ThrowawayError::Command {
                what: what.to_owned(),
                status: out.status.to_string(),
                output: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            })
        }
    }
}

impl Drop for ThrowawayPostgres {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!(%err, "could not stop the throwaway PostgreSQL");
        }
    }
}

fn path_str(p: &Path) -> &str {
    // Temporary paths and Debian's install paths are ASCII; a non-UTF-8 path would make
    // the command fail visibly rather than silently.
    p.to_str().unwrap_or("<non-utf8 path>")
}

fn append(path: &Path, text: &str) -> Result<(), ThrowawayError> {
    use std::io::Write;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(io(format!("opening {}", path.display())))?;
    f.write_all(text.as_bytes())
        .map_err(io(format!("writing {}", path.display())))
}

fn free_port() -> Result<u16, ThrowawayError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// Where `initdb` and `pg_ctl` live.
pub fn find_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SPILLWAY_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("pg_ctl").is_file() && dir.join("initdb").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").is_file().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn is_root() -> bool {
    // The effective uid is the second field of the Uid line.
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn postgres_ids() -> Option<(u32, u32)> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let mut f = line.split(':');
        if f.next()? != "postgres" {
            return None;
        }
        let uid = f.nth(1)?.parse().ok()?;
        let gid = f.next()?.parse().ok()?;
        Some((uid, gid))
    })
}
