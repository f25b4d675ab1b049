//! `.ci/setup`, the first half of both README commands, on simulated machines: what it
//! asks apt-get for on a fresh Debian machine (as root, and through `sudo -n`
//! otherwise), that it asks for nothing once everything is there, and that the driver
//! install is skipped when the pins have not changed.
//!
//! The machine is simulated, not changed: the script's file checks look under
//! `SPILLWAY_SETUP_ROOT`, and its commands come from a PATH of stubs. The stub apt-get
//! logs its arguments and "installs" a package by creating what the real one provides
//! (files under the root, commands on PATH), so a second run shows whether the checks
//! and the package list agree. No server, no network.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

struct Machine {
    dir: tempfile::TempDir,
}

/// What each stubbed package provides: files under the root, commands on PATH.
const APT_GET: &str = r#"#!/bin/sh
echo "apt-get $*" >> "$MACHINE/log"
[ "$1" = install ] || exit 0
for p in "$@"; do
  case "$p" in
    libclang-dev) mkdir -p "$SPILLWAY_SETUP_ROOT/usr/lib/llvm-14/lib"
                  touch "$SPILLWAY_SETUP_ROOT/usr/lib/llvm-14/lib/libclang.so.1" ;;
    postgresql) mkdir -p "$SPILLWAY_SETUP_ROOT/usr/lib/postgresql/15/bin"
                touch "$SPILLWAY_SETUP_ROOT/usr/lib/postgresql/15/bin/pg_ctl" \
                      "$SPILLWAY_SETUP_ROOT/usr/lib/postgresql/15/bin/initdb"
                stub psql; stub pgbench; touch "$MACHINE/postgres-user" ;;
    python3) stub python3 ;;
    python3-venv) touch "$MACHINE/venv-module" ;;
    gcc) stub cc ;;
    procps) mkdir -p "$SPILLWAY_SETUP_ROOT/usr/bin"
            touch "$SPILLWAY_SETUP_ROOT/usr/bin/kill"
            chmod +x "$SPILLWAY_SETUP_ROOT/usr/bin/kill" ;;
    ca-certificates) mkdir -p "$SPILLWAY_SETUP_ROOT/etc/ssl/certs"
                     touch "$SPILLWAY_SETUP_ROOT/etc/ssl/certs/ca-certificates.crt" ;;
    nodejs) stub node ;;
    npm) stub npm ;;
    nats-server) mkdir -p "$SPILLWAY_SETUP_ROOT/usr/sbin"
                 touch "$SPILLWAY_SETUP_ROOT/usr/sbin/nats-server"
                 chmod +x "$SPILLWAY_SETUP_ROOT/usr/sbin/nats-server" ;;
  esac
done
"#;

/// A command that does nothing, except the few the script relies on.
const STUB: &str = r#"#!/bin/sh
name=$(basename "$0")
# python3 -c is the script's check for venv, not an install step: not logged.
if [ "$name" = python3 ] && [ "$1" = -c ]; then [ -e "$MACHINE/venv-module" ]; exit; fi
echo "$name $*" >> "$MACHINE/log"
case "$name" in
  python3)
    if [ "$1" = -m ] && [ "$2" = venv ]; then
      mkdir -p "$3/bin"
      printf '#!/bin/sh\necho "pip $*" >> "%s/log"\n' "$MACHINE" > "$3/bin/pip"
      cp "$3/bin/pip" "$3/bin/python"
      chmod +x "$3/bin/pip" "$3/bin/python"
    fi ;;
  npm) mkdir -p node_modules ;;
esac
exit 0
"#;

/// `id`: `id -u` is $STUB_UID; `id postgres` succeeds once the server package is in.
const ID: &str = r#"#!/bin/sh
if [ "$1" = -u ]; then echo "$STUB_UID"; exit 0; fi
[ "$1" = postgres ] && [ -e "$MACHINE/postgres-user" ]
"#;

/// `sudo`: logged, then runs the command (as the test's own user).
const SUDO: &str = r#"#!/bin/sh
echo "sudo $*" >> "$MACHINE/log"
[ "$1" = -n ] && shift
exec "$@"
"#;

impl Machine {
    /// A fresh Debian machine with Rust only: coreutils, and none of what the README
    /// commands need.
    fn fresh() -> Machine {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Machine { dir };
        std::fs::create_dir_all(m.root()).expect("root");
        std::fs::create_dir_all(m.bin()).expect("bin");
        std::fs::create_dir_all(m.drivers()).expect("drivers");
        for tool in [
            "cat",
            "sha256sum",
            "cut",
            "sort",
            "mkdir",
            "rm",
            "cp",
            "dirname",
            "env",
            "basename",
            "touch",
            "chmod",
            "printf",
        ] {
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|d| Path::new(d).join(tool))
                .find(|p| p.exists())
                .unwrap_or_else(|| panic!("{tool} on this machine"));
            std::os::unix::fs::symlink(real, m.bin().join(tool)).expect("symlink tool");
        }
        m.write_bin(
            "apt-get",
            &APT_GET.replace("stub ", &format!("{} ", m.stub_cmd())),
        );
        m.write_bin("id", ID);
        m.write_bin("stub", STUB);
        // What a working Rust toolchain brings along: a C compiler to link with (and
        // make, as build-essential has it), and the CA certificates cargo fetches
        // crates with.
        m.write_bin("cc", STUB);
        m.write_bin("make", STUB);
        let certs = m.root().join("etc/ssl/certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        std::fs::write(certs.join("ca-certificates.crt"), "").expect("ca file");
        m.put_kill();
        m
    }

    /// kill(1), from procps, which Debian's standard images have.
    fn put_kill(&self) {
        let dir = self.root().join("usr/bin");
        std::fs::create_dir_all(&dir).expect("usr/bin");
        std::fs::write(dir.join("kill"), "").expect("kill");
        std::fs::set_permissions(dir.join("kill"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod kill");
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }
    fn bin(&self) -> PathBuf {
        self.dir.path().join("bin")
    }
    fn drivers(&self) -> PathBuf {
        self.dir.path().join("drivers")
    }
    fn stub_cmd(&self) -> String {
        format!("install_stub {}", self.bin().display())
    }

    fn write_bin(&self, name: &str, body: &str) {
        let body = body.replace(
            "#!/bin/sh\n",
            "#!/bin/sh\ninstall_stub() { cp \"$1/stub\" \"$1/$2\"; }\n",
        );
        let path = self.bin().join(name);
        std::fs::write(&path, body).expect("write stub");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }

    /// Runs `.ci/setup what` as uid `uid`; its exit status and output, and the log of
    /// stub commands it ran (then cleared).
    fn setup(&self, what: &str, uid: u32) -> (bool, String, Vec<String>) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/setup");
        let out = Command::new("/bin/bash")
            .arg(&script)
            .arg(what)
            .env_clear()
            .env("PATH", self.bin())
            .env("MACHINE", self.dir.path())
            .env("SPILLWAY_SETUP_ROOT", self.root())
            .env("SPILLWAY_DRIVERS", self.drivers())
            .env("STUB_UID", uid.to_string())
            .current_dir(self.dir.path())
            .output()
            .expect("run .ci/setup");
        let log_path = self.dir.path().join("log");
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let _ = std::fs::remove_file(&log_path);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (
            out.status.success(),
            text,
            log.lines().map(str::to_owned).collect(),
        )
    }

    fn installs(log: &[String]) -> Vec<String> {
        log.iter()
            .filter_map(|l| l.strip_prefix("apt-get install -y -q --no-install-recommends "))
            .map(str::to_owned)
            .collect()
    }
}

#[test]
fn demo_on_a_fresh_machine_as_root_installs_libclang_and_postgres_once() {
    let m = Machine::fresh();
    let (ok, out, log) = m.setup("demo", 0);
    assert!(ok, "{out}");
    assert_eq!(
        log.first().map(String::as_str),
        Some("apt-get update -q"),
        "{log:?}"
    );
    assert_eq!(
        Machine::installs(&log),
        ["libclang-dev postgresql"],
        "{log:?}"
    );
    assert!(out.contains("installing libclang-dev postgresql"), "{out}");
    assert!(
        !log.iter().any(|l| l.starts_with("sudo")),
        "root needs no sudo: {log:?}"
    );
    // Nothing for the drivers: the demo does not need them.
    assert!(
        !log.iter()
            .any(|l| l.starts_with("python3") || l.starts_with("npm"))
    );

    let (ok, out, log) = m.setup("demo", 0);
    assert!(ok, "{out}");
    assert!(log.is_empty(), "a second run installs nothing: {log:?}");
}

#[test]
fn without_root_it_goes_through_sudo_without_a_prompt() {
    let m = Machine::fresh();
    m.write_bin("sudo", SUDO);
    let (ok, out, log) = m.setup("demo", 1000);
    assert!(ok, "{out}");
    assert_eq!(
        log.iter()
            .filter(|l| l.starts_with("sudo "))
            .collect::<Vec<_>>(),
        [
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get update -q",
            "sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
             --no-install-recommends libclang-dev postgresql",
        ],
        "{log:?}"
    );
    // Not root: the postgres user is not needed, so only what is missing counts.
    let (ok, _, log) = m.setup("demo", 1000);
    assert!(ok && log.is_empty(), "{log:?}");
}

#[test]
fn without_root_or_sudo_it_says_what_to_install() {
    let m = Machine::fresh();
    let (ok, out, log) = m.setup("demo", 1000);
    assert!(!ok);
    assert!(
        out.contains("apt-get install libclang-dev postgresql"),
        "{out}"
    );
    assert!(Machine::installs(&log).is_empty(), "{log:?}");
}

#[test]
fn test_installs_python_node_and_the_pinned_drivers_once() {
    let m = Machine::fresh();
    let (ok, out, log) = m.setup("test", 0);
    assert!(ok, "{out}\n{log:?}");
    assert_eq!(
        Machine::installs(&log),
        ["libclang-dev nats-server nodejs npm postgresql python3 python3-venv"],
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("pip install")
                && l.contains("proxy/tests/drivers/requirements.txt")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l.starts_with("npm ci")), "{log:?}");

    // Everything is there: no apt-get, no pip, no npm.
    let (ok, out, log) = m.setup("test", 0);
    assert!(ok, "{out}");
    assert!(log.is_empty(), "second run: {log:?}");

    // Python present but without venv (Debian's python3 alone): python3-venv only.
    std::fs::remove_file(m.dir.path().join("venv-module")).expect("remove venv");
    let (ok, _, log) = m.setup("test", 0);
    assert!(ok);
    assert_eq!(Machine::installs(&log), ["python3-venv"], "{log:?}");
}

#[test]
fn a_bare_machine_also_gets_a_c_compiler_and_ca_certificates() {
    let m = Machine::fresh();
    std::fs::remove_file(m.bin().join("cc")).expect("remove cc");
    std::fs::remove_file(m.root().join("etc/ssl/certs/ca-certificates.crt")).expect("rm ca");
    let (ok, out, log) = m.setup("demo", 0);
    assert!(ok, "{out}");
    assert_eq!(
        Machine::installs(&log),
        ["ca-certificates gcc libc6-dev libclang-dev postgresql"],
        "{log:?}"
    );
    let (ok, _, log) = m.setup("demo", 0);
    assert!(ok && log.is_empty(), "{log:?}");
    // A minimal image (debootstrap's minbase) has no kill(1), which the tests run.
    std::fs::remove_file(m.root().join("usr/bin/kill")).expect("rm kill");
    let (ok, _, log) = m.setup("demo", 0);
    assert!(ok && log.is_empty(), "the demo does not need it: {log:?}");
    let (ok, _, log) = m.setup("test", 0);
    assert!(ok);
    assert_eq!(
        Machine::installs(&log),
        ["nats-server nodejs npm procps python3 python3-venv"],
        "{log:?}"
    );
}

#[test]
fn a_changed_pin_reinstalls_that_driver_set_only() {
    let m = Machine::fresh();
    let (ok, out, _) = m.setup("test", 0);
    assert!(ok, "{out}");
    std::fs::write(m.drivers().join("venv/.stamp"), "stale\n").expect("stamp");
    let (ok, out, log) = m.setup("test", 0);
    assert!(ok, "{out}");
    assert!(
        log.iter().any(|l| l.starts_with("python3 -m venv")),
        "{log:?}"
    );
    assert!(!log.iter().any(|l| l.starts_with("npm")), "{log:?}");
    assert!(Machine::installs(&log).is_empty(), "{log:?}");
}
