//! Whether a role may write a deferred table, answered by PostgreSQL
//! ([`super::Checks::privilege`]) and reused for [`PRIVILEGE_TTL`], so a REVOKE takes
//! effect within it.
//!
//! Invariant: an answer outlives its TTL only while PostgreSQL cannot be reached
//! ([`super::CheckError::Unreachable`]: detached sessions keep writing during an
//! outage), never after another error. Nothing can be revoked while PostgreSQL is down,
//! so the answer is at most `PRIVILEGE_TTL` older than the outage, as it would be
//! anyway.

use std::collections::HashMap;
use std::sync::MutexGuard;
use std::time::Duration;

use tokio::time::Instant;

use super::table::{DeferredTable, Verb};
use super::{CheckError, Checks, DeferError, Engine, Log};

/// How long a privilege answer is reused before it is asked again.
pub const PRIVILEGE_TTL: Duration = Duration::from_secs(5);

/// Privilege answers by (role, table, verb), with when they were asked.
pub(super) type Privileges = HashMap<(String, String, Verb), (bool, Instant)>;

impl<C: Checks, L: Log> Engine<C, L> {
    /// Whether `user` holds the privilege `verb` needs on `t`.
    pub(super) async fn permitted(
        &self,
        user: &str,
        t: &DeferredTable,
        verb: Verb,
    ) -> Result<bool, DeferError> {
        let k = (user.to_owned(), t.meta.name.clone(), verb);
        let known = self.privileges_map().get(&k).copied();
        if let Some((ok, at)) = known
            && at.elapsed() < PRIVILEGE_TTL
        {
            return Ok(ok);
        }
        let ok = match (self.checks.privilege(user, t, verb).await, known) {
            (Ok(ok), _) => ok,
            (Err(CheckError::Unreachable(e)), Some((ok, _))) => {
                tracing::debug!(
                    user, table = %t.meta.name, error = %e,
                    "privilege check unreachable; last answer stands"
                );
                return Ok(ok);
            }
            (Err(e), _) => return Err(e.into()),
        };
        self.privileges_map().insert(k, (ok, Instant::now()));
        Ok(ok)
    }

    /// The answer [`Self::permitted`] would give without asking PostgreSQL, if it has
    /// a fresh one.
    pub(super) fn permitted_now(&self, user: &str, t: &DeferredTable, verb: Verb) -> Option<bool> {
        let k = (user.to_owned(), t.meta.name.clone(), verb);
        self.privileges_map()
            .get(&k)
            .filter(|(_, at)| at.elapsed() < PRIVILEGE_TTL)
            .map(|(ok, _)| *ok)
    }

    fn privileges_map(&self) -> MutexGuard<'_, Privileges> {
        match self.privileges.lock() {
            Ok(m) => m,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}
