//! `optimize NAME` (queue a build now, whatever the history says; from the previous
//! version's kept profile when the binary has none of its own yet) and `reset NAME` (forget
//! the binary's profile, measurements, variants and BOLT history, and the profile kept for
//! its next version). Both act on the content
//! now at the path; a path without an indexed binary is EINVAL with the reason.
//!
//! Called from FUSE request threads (plain threads), so the catalog is used blocking.

use std::path::Path;
use std::sync::Arc;

use super::Shared;
use super::candidate::{current_binary, profile_numbers, request, verdict};
use crate::bolt::stale::STALE_PROFILE_NUMBERS;
use crate::bolt::{OptimizeRequest, ProfileNumbers, RequestOrigin};
use crate::catalog::{base, bolt_jobs, profiles, runs};
use crate::control::ActionError;
use crate::control::CommandHooks;
use crate::identity::{ContentId, FileKey};

pub struct OptimizerHooks {
    pub shared: Arc<Shared>,
}

impl OptimizerHooks {
    /// The current content's catalog row id and facts, or EINVAL saying why there is none.
    fn indexed(
        &self,
        path: &Path,
    ) -> Result<(base::BinaryRow, Option<ProfileNumbers>, bool), ActionError> {
        let key = FileKey::of(path)
            .map_err(|e| ActionError::invalid(format!("{}: {e}", path.display())))?;
        let p = path.to_path_buf();
        let found = self
            .shared
            .catalog
            .run_blocking(move |c| {
                let Some(binary) = current_binary(c, &p, &key)? else { return Ok(None) };
                let profile = profile_numbers(c, binary.id)?;
                let excluded =
                    base::control_row(c, &p.to_string_lossy())?.is_some_and(|r| r.excluded);
                Ok(Some((binary, profile, excluded)))
            })
            .map_err(|e| ActionError::io(format!("reading the catalog: {e:#}")))?;
        found.ok_or_else(|| {
            ActionError::invalid(format!(
                "{}: not indexed yet (run it once through the mount, then retry)",
                path.display()
            ))
        })
    }
}

impl CommandHooks for OptimizerHooks {
    fn optimize(&self, path: &Path) -> Result<String, ActionError> {
        if let Some(why) = &self.shared.off {
            return Err(ActionError::invalid(format!("the optimizer is off: {why}")));
        }
        if !self.shared.config.permits(path) {
            return Err(ActionError::invalid(format!(
                "{}: left alone by the allow/deny lists of the config",
                path.display()
            )));
        }
        let (binary, profile, excluded) = self.indexed(path)?;
        if excluded {
            return Err(ActionError::invalid(format!(
                "{}: excluded by the user (`include` it first)",
                path.display()
            )));
        }
        // The facts decide first, so a stripped binary says "stripped", not "no profile".
        let v = verdict(&binary.facts, profile.as_ref(), &self.shared.applicability);
        if !v.applicability.candidate {
            return Err(ActionError::invalid(format!(
                "{}: {}",
                path.display(),
                v.applicability.reason
            )));
        }
        let content = ContentId::parse(&binary.sha256)
            .ok_or_else(|| ActionError::io("a malformed sha256 in the catalog"))?;
        // No profile of its own yet: the previous version's, if one is kept.
        let stale = match &profile {
            None => self.shared.kept_profiles.previous_version(&path.to_string_lossy(), &content),
            Some(_) => None,
        };
        let numbers = match &stale {
            Some(_) => STALE_PROFILE_NUMBERS,
            None => profile.unwrap_or_default(),
        };
        let request = request(path, binary, numbers, RequestOrigin::User)
            .map_err(|e| ActionError::io(format!("{e:#}")))?;
        let request = OptimizeRequest { stale, ..request };
        self.shared.handle.submit(request).map_err(|why| ActionError::invalid(why.0))?;
        Ok(format!("{} queued for BOLT", path.display()))
    }

    fn reset(&self, path: &Path) -> Result<String, ActionError> {
        let (binary, _, _) = self.indexed(path)?;
        let id = binary.id;
        // A job that ends after the reset would record its variant and history again.
        let status = self.shared.handle.status();
        if status.queued.iter().any(|q| q.binary_id == id)
            || status.running.iter().any(|r| r.binary_id == id)
        {
            return Err(ActionError::invalid(format!(
                "{}: a BOLT job for it is queued or running; reset it when the job has ended \
                 (see status)",
                path.display()
            )));
        }
        let retired = self
            .shared
            .catalog
            .run_blocking(move |c| {
                let tx = c.transaction()?;
                profiles::forget(&tx, id)?;
                runs::forget_binary(&tx, id)?;
                let retired = tx.execute(
                    "UPDATE variants SET state = 'retired', note = 'forgotten by reset'
                     WHERE binary_id = ?1 AND state != 'retired'",
                    [id],
                )?;
                bolt_jobs::forget(&tx, id)?;
                crate::catalog::flag_trials::forget(&tx, id)?;
                tx.commit()?;
                Ok(retired)
            })
            .map_err(|e| ActionError::io(format!("the catalog could not reset it: {e:#}")))?;
        self.collect_garbage();
        // Also the profile kept for the path's next version: a reset starts over.
        self.shared.kept_profiles.forget(&path.to_string_lossy());
        Ok(format!(
            "{}: profile, measurements, BOLT history and {retired} variant(s) forgotten",
            path.display()
        ))
    }
}

impl OptimizerHooks {
    /// Removes retired variants' files that are past the store's grace period (younger
    /// ones go at a later collection). Best effort: a failure leaves files, not errors.
    fn collect_garbage(&self) {
        let keep = match self.shared.catalog.run_blocking(|c| bolt_jobs::variants_to_keep(c)) {
            Ok(k) => k,
            Err(e) => return tracing::warn!(error = %format!("{e:#}"), "variant gc after reset"),
        };
        if let Err(e) = self.shared.store.gc(&keep) {
            tracing::warn!(error = %format!("{e:#}"), "variant gc after reset");
        }
    }
}
