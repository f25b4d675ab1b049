//! `spillway-loadtest setup`: creates and fills the tables of the chosen scenarios
//! (each table group once, dropped and recreated) and writes the spillway table
//! config they expect. Also the `scenarios` listing.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, anyhow};

use crate::cli::Mode;
use crate::progress::Progress;
use crate::scenario::{self, Group, META_SQL, Scenario};
use crate::target::Target;

/// Creates the tables of `scenarios` at `scale` through `target`.
pub async fn setup(
    target: &Target,
    scenarios: &[Scenario],
    scale: u32,
    progress: Progress,
) -> anyhow::Result<()> {
    let mut s = target.connect(Mode::Simple).await?;
    let fail = |what: &str, e: crate::wire::Fail| {
        anyhow!("target {} ({}): {what}: {e}", target.name, target.url)
    };
    s.batch(META_SQL)
        .await
        .map_err(|e| fail("creating lt_meta", e))?;
    let mut groups: Vec<Group> = Vec::new();
    for sc in scenarios {
        if !groups.contains(&sc.group()) {
            groups.push(sc.group());
        }
    }
    for g in groups {
        let started = Instant::now();
        s.batch(&scenario::setup_batch(g, scale))
            .await
            .map_err(|e| fail(&format!("setting up {}", g.tables().join(", ")), e))?;
        progress.note(&format!(
            "set up {} at scale {scale} in {:.1}s",
            g.tables().join(", "),
            started.elapsed().as_secs_f64()
        ));
    }
    Ok(())
}

/// Writes the combined table config of `scenarios` to `path`; returns it.
pub fn write_config(scenarios: &[Scenario], path: &Path) -> anyhow::Result<String> {
    let text = scenario::combined_config(scenarios);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
    Ok(text)
}

/// The `scenarios` listing.
pub fn listing() -> String {
    let mut out = String::new();
    for s in Scenario::ALL {
        let _ = writeln!(out, "{}\n  {}", s.name(), s.description());
        let _ = writeln!(out, "  tables: {}", s.group().tables().join(", "));
        let _ = writeln!(
            out,
            "  correctness check: {}",
            if s.writes() { "yes" } else { "no (reads only)" }
        );
        for line in s.spillway_config().lines().filter(|l| !l.starts_with('#')) {
            if !line.is_empty() {
                let _ = writeln!(out, "    {line}");
            }
        }
        out.push('\n');
    }
    out
}
