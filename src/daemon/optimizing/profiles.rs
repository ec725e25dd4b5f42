//! The profiles BOLT gets: [`CatalogProfiles`] writes a binary's best profile from the
//! catalog (its instrumentation profile if it has one, else its sampled one).

use std::path::Path;

use anyhow::Context;

use super::candidate::profile_numbers;
use crate::bolt::perf2bolt::fdata_samples;
use crate::bolt::{ProfileInfo, ProfileSource};
use crate::catalog::{Catalog, base};
use crate::profile::write_profile_for_bolt;

/// [`ProfileSource`] over the catalog's profile tables.
pub struct CatalogProfiles {
    pub catalog: Catalog,
    /// The fleet's merged profiles: used instead of the local one when larger or exact.
    pub fleet: Option<std::sync::Arc<crate::fleet::FleetView>>,
}

impl ProfileSource for CatalogProfiles {
    /// Called on a blocking thread by the optimizer's queue. The sample count is the
    /// profile's own-text samples, the number the maturity driver and the retry policy
    /// compare (an instrumentation-only profile counts its edge executions instead).
    fn write_fdata(&self, binary_id: i64, out: &Path) -> anyhow::Result<ProfileInfo> {
        let (bytes, own, sha256) = self.catalog.run_blocking(move |c| {
            let sha256 = base::binary_by_id(c, binary_id)?.map(|b| b.sha256);
            let mut bytes = Vec::new();
            // No local profile is fine when the fleet has one.
            let written = write_profile_for_bolt(c, binary_id, &mut bytes);
            Ok((written.map(|_| bytes), profile_numbers(c, binary_id)?.map(|p| p.samples), sha256))
        })?;
        let fleet = self.fleet.as_ref().zip(sha256);
        if let Some((view, sha)) = &fleet
            && let Some(merged) = view.profile_for_build(sha, own.unwrap_or(0))
        {
            std::fs::write(out, merged.fdata())
                .with_context(|| format!("writing the fleet profile to {}", out.display()))?;
            view.note_built_from(
                sha,
                format!(
                    "fleet: {} machines, {} samples, profile {}",
                    merged.machines.len(),
                    merged.samples,
                    &merged.digest()[..16]
                ),
            );
            return Ok(ProfileInfo { samples: merged.samples });
        }
        let bytes = bytes?;
        if let Some((view, sha)) = &fleet {
            view.note_built_from(sha, format!("local: {} samples", own.unwrap_or(0)));
        }
        std::fs::write(out, &bytes)
            .with_context(|| format!("writing the profile to {}", out.display()))?;
        let samples = own.unwrap_or_else(|| fdata_samples(&String::from_utf8_lossy(&bytes)));
        Ok(ProfileInfo { samples })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::profiles;
    use crate::elf::ElfFacts;
    use crate::identity::ContentId;

    #[test]
    fn writes_the_sampled_profile_and_counts_own_samples() {
        let catalog = Catalog::in_memory().unwrap();
        let id = catalog
            .run_blocking(|c| {
                let id =
                    base::upsert_binary(c, &ContentId::of_bytes(b"p"), 1, &ElfFacts::default(), 0)?;
                let batch = profiles::WindowBatch {
                    samples: vec![("hot".into(), 0x10, 90), ("cold".into(), 0, 5)],
                    own_samples: 100,
                    outside_samples: 20,
                    new_runs: 1,
                    ..Default::default()
                };
                profiles::add_window(c, id, 0, "cpu-clock", &batch, 1)?;
                Ok(id)
            })
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("p.fdata");
        let source = CatalogProfiles { catalog, fleet: None };
        assert_eq!(source.write_fdata(id, &out).unwrap(), ProfileInfo { samples: 100 });
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "no_lbr cpu-clock:\n1 cold 0 5\n1 hot 10 90\n"
        );
        let err = source.write_fdata(id + 1, &out).unwrap_err();
        assert!(format!("{err:#}").contains("no profile"), "{err:#}");
    }
}
