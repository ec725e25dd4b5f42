//! Carrying out control commands: resolve the NAME, record the change in the catalog,
//! log an event, and make the mount serve accordingly right away.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::catalog::{Catalog, base};
use crate::clock::Clock;
use crate::control::command::Command;
use crate::control::resolve::resolve_name;
use crate::control::{ActionError, CommandHooks, ControlActions};

/// Re-derives and applies what the mount serves for a path after its state changed.
pub type Refresh = Arc<dyn Fn(&Path) + Send + Sync>;

pub struct Actions {
    pub catalog: Catalog,
    pub clock: Arc<dyn Clock>,
    pub overlay: Vec<PathBuf>,
    pub mountpoint: PathBuf,
    pub refresh: Refresh,
    pub hooks: Option<Arc<dyn CommandHooks>>,
    /// Training commands (`train NAME`).
    pub train: Option<Arc<crate::train::Trainer>>,
}

impl ControlActions for Actions {
    fn apply(&self, command: &Command) -> Result<String, ActionError> {
        let path = resolve_name(command.name(), &self.overlay, &self.mountpoint)
            .map_err(ActionError::invalid)?;
        let text = path.to_string_lossy().into_owned();
        let now = self.clock.unix_secs();
        let done = match command {
            Command::Pin { target, .. } => {
                let pin = *target;
                self.write(move |c| base::set_pin(c, &text, Some(pin), now))?;
                format!("{} pinned to {}", path.display(), target.as_str())
            }
            Command::Unpin { .. } => {
                self.write(move |c| base::set_pin(c, &text, None, now))?;
                format!("{} unpinned", path.display())
            }
            Command::Exclude { .. } => {
                self.write(move |c| base::set_excluded(c, &text, true, now))?;
                format!("{} excluded", path.display())
            }
            Command::Include { .. } => {
                self.write(move |c| base::set_excluded(c, &text, false, now))?;
                format!("{} included", path.display())
            }
            Command::Optimize { .. } => self.hooks()?.optimize(&path)?,
            Command::Reset { .. } => self.hooks()?.reset(&path)?,
            Command::Train { .. } => match &self.train {
                Some(t) => t.train_now(&path)?,
                None => return Err(ActionError::invalid("this daemon runs without training")),
            },
        };
        let (event_path, detail) = (path.to_string_lossy().into_owned(), command.to_string());
        self.catalog.spawn("control event", move |c| {
            base::record_event(c, now, Some(&event_path), "control", &detail)
        });
        (self.refresh)(&path);
        Ok(done)
    }
}

impl Actions {
    fn write<F>(&self, f: F) -> Result<(), ActionError>
    where
        F: FnOnce(&rusqlite::Connection) -> anyhow::Result<()> + Send + 'static,
    {
        self.catalog
            .run_blocking(move |c| f(c))
            .map_err(|e| ActionError::io(format!("the catalog could not record it: {e:#}")))
    }

    fn hooks(&self) -> Result<&Arc<dyn CommandHooks>, ActionError> {
        self.hooks
            .as_ref()
            .ok_or_else(|| ActionError::invalid("this daemon runs without its optimizer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::policy::Pin;
    use std::sync::Mutex;

    #[test]
    fn commands_change_the_catalog_and_refresh_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let bin = std::fs::canonicalize(dir.path()).unwrap();
        std::fs::write(bin.join("tool"), b"x").unwrap();
        // A NAME must be something PATH lookup would run.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(bin.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let refreshed = Arc::new(Mutex::new(Vec::<PathBuf>::new()));
        let r2 = refreshed.clone();
        let catalog = Catalog::in_memory().unwrap();
        let actions = Actions {
            catalog: catalog.clone(),
            clock: Arc::new(SystemClock),
            overlay: vec![bin.clone()],
            mountpoint: "/mnt/x".into(),
            refresh: Arc::new(move |p: &Path| r2.lock().unwrap().push(p.to_path_buf())),
            hooks: None,
            train: None,
        };
        actions.apply(&Command::Exclude { name: "tool".into() }).unwrap();
        actions.apply(&Command::Pin { name: "tool".into(), target: Pin::Original }).unwrap();
        let rows = catalog.run_blocking(|c| base::controls(c)).unwrap();
        assert_eq!(rows.len(), 1);
        assert!(rows[0].excluded);
        assert_eq!(rows[0].pin, Some(Pin::Original));
        assert_eq!(refreshed.lock().unwrap().len(), 2);

        let err = actions.apply(&Command::Exclude { name: "nope".into() }).unwrap_err();
        assert_eq!(err.errno, libc::EINVAL);
        let err = actions.apply(&Command::Optimize { name: "tool".into() }).unwrap_err();
        assert!(err.message.contains("without its optimizer"));
        assert_eq!(refreshed.lock().unwrap().len(), 2, "failed commands refresh nothing");
    }
}
