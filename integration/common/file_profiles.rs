//! A `ProfileSource` for tests that drive the optimizer directly: profiles are fdata files
//! the test wrote (real perf2bolt output, or hand-written no_lbr fdata), by binary id.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use optbin::bolt::perf2bolt::fdata_samples;
use optbin::bolt::{ProfileInfo, ProfileSource};

#[derive(Default)]
pub struct FileProfiles(pub Mutex<HashMap<i64, PathBuf>>);

impl ProfileSource for FileProfiles {
    fn write_fdata(&self, binary_id: i64, out: &Path) -> anyhow::Result<ProfileInfo> {
        let src = self.0.lock().unwrap().get(&binary_id).cloned();
        let src = src.ok_or_else(|| anyhow::anyhow!("no profile for {binary_id}"))?;
        std::fs::copy(&src, out)?;
        Ok(ProfileInfo { samples: fdata_samples(&std::fs::read_to_string(out)?) })
    }
}
