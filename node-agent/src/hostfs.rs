//! Putting a rendered configuration onto the host, safely.
//!
//! The host's filesystem is reached through a root directory (the DaemonSet's host mount).
//! An apply goes through a journal:
//!
//! 1. the list of temporary files about to be written is recorded (`staging.json`);
//! 2. every new file is written next to its target as `<target>.regmirror-new`, fsynced;
//! 3. a file at a target that regmirror does not own (a hand-written registries.yaml) is
//!    backed up once under the state directory;
//! 4. the journal (`journal.json`: the new config and what to remove) is written atomically —
//!    the commit point;
//! 5. temporary files are renamed over their targets, files the old configuration owned and the
//!    new one does not are removed, and `current.json` records the new configuration.
//!
//! After a crash, [`HostFs::recover`] rolls a committed apply forward and discards an
//! uncommitted one: the host ends with the old files or the new ones, never a mix. Only files
//! in the recorded configuration are ever removed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use regmirror_core::render::RenderedConfig;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the agent keeps its state, under the host root.
pub const STATE_DIR: &str = "var/lib/regmirror";
/// Suffix of files written but not yet in place.
const STAGED_SUFFIX: &str = ".regmirror-new";

/// What can go wrong on the host.
#[derive(Debug, Error)]
pub enum HostError {
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {} is unreadable: {detail}", path.display())]
    State { path: PathBuf, detail: String },
    #[error("refusing path {0:?}: rendered paths must be absolute and stay inside the host root")]
    BadPath(String),
}

type Result<T> = std::result::Result<T, HostError>;

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> HostError + 'p {
    move |source| HostError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Files written (new or changed content or mode).
    pub written: Vec<String>,
    /// Files of the previous configuration removed.
    pub removed: Vec<String>,
    /// Files found at a target that regmirror did not own, saved once before replacing them.
    pub backed_up: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Journal {
    config: RenderedConfig,
    remove: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Staging {
    staged: Vec<PathBuf>,
}

/// The host's filesystem, seen through its root mount.
#[derive(Debug, Clone)]
pub struct HostFs {
    root: PathBuf,
}

impl HostFs {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    fn state(&self, name: &str) -> PathBuf {
        self.root.join(STATE_DIR).join(name)
    }

    /// Maps an absolute host path under the root, refusing anything that could escape it.
    fn host_path(&self, path: &str) -> Result<PathBuf> {
        let relative = Path::new(path)
            .strip_prefix("/")
            .map_err(|_| HostError::BadPath(path.to_owned()))?;
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
        {
            return Err(HostError::BadPath(path.to_owned()));
        }
        Ok(self.root.join(relative))
    }

    /// The configuration on the host now, if regmirror put one there.
    pub fn current(&self) -> Result<Option<RenderedConfig>> {
        read_json(&self.state("current.json"))
    }

    /// The last configuration that was verified on this node.
    pub fn last_good(&self) -> Result<Option<RenderedConfig>> {
        read_json(&self.state("last-good.json"))
    }

    /// Records the current configuration as verified: the one a rollback returns to.
    pub fn mark_good(&self) -> Result<()> {
        if let Some(current) = self.current()? {
            write_json_atomic(&self.state("last-good.json"), &current)?;
        }
        Ok(())
    }

    /// Finishes an apply a crash interrupted after its commit point, or discards one that
    /// crashed before it. Returns whether there was anything to do.
    pub fn recover(&self) -> Result<bool> {
        if let Some(journal) = read_json::<Journal>(&self.state("journal.json"))? {
            self.roll_forward(&journal)?;
            return Ok(true);
        }
        let Some(staging) = read_json::<Staging>(&self.state("staging.json"))? else {
            return Ok(false);
        };
        for staged in &staging.staged {
            remove_if_exists(staged)?;
        }
        remove_if_exists(&self.state("staging.json"))?;
        Ok(true)
    }

    /// Puts `config` onto the host. Safe to call again with the same config (it then writes
    /// nothing).
    pub fn apply(&self, config: &RenderedConfig) -> Result<ApplyReport> {
        self.recover()?;
        let previous = self.current()?;
        let owned = |path: &str| {
            previous
                .as_ref()
                .is_some_and(|p| p.files.contains_key(path))
        };
        let mut report = ApplyReport::default();

        // Which files change, where they go.
        let mut changes = Vec::new();
        for (path, file) in &config.files {
            let target = self.host_path(path)?;
            if on_disk_matches(&target, file.content.as_bytes(), file.mode) {
                continue;
            }
            changes.push((path.clone(), target, file));
        }
        let remove: Vec<String> = previous
            .iter()
            .flat_map(|p| p.files.keys())
            .filter(|path| !config.files.contains_key(*path))
            .cloned()
            .collect();
        for path in &remove {
            self.host_path(path)?;
        }

        // 1-2. Stage every new file beside its target.
        let staged: Vec<PathBuf> = changes
            .iter()
            .map(|(_, target, _)| staged_path(target))
            .collect();
        write_json_atomic(
            &self.state("staging.json"),
            &Staging {
                staged: staged.clone(),
            },
        )?;
        for ((_, target, file), staged) in changes.iter().zip(&staged) {
            let dir = target.parent().expect("host paths have a parent");
            fs::create_dir_all(dir).map_err(io("create directory", dir))?;
            write_file(staged, file.content.as_bytes(), file.mode)?;
        }
        crash_point("staged");

        // 3. A file regmirror does not own is saved once before it is replaced.
        for (path, target, _) in &changes {
            if target.exists() && !owned(path) {
                let backup = self.state("backup").join(path.trim_start_matches('/'));
                if !backup.exists() {
                    fs::create_dir_all(backup.parent().unwrap())
                        .map_err(io("create directory", &backup))?;
                    let content = fs::read(target).map_err(io("read", target))?;
                    write_file(&backup, &content, 0o600)?;
                    report.backed_up.push(path.clone());
                }
            }
        }

        // 4. The commit point.
        let journal = Journal {
            config: config.clone(),
            remove: remove.clone(),
        };
        write_json_atomic(&self.state("journal.json"), &journal)?;
        crash_point("journaled");

        // 5. Into place.
        self.roll_forward(&journal)?;
        report.written = changes.into_iter().map(|(path, _, _)| path).collect();
        report.removed = remove;
        Ok(report)
    }

    /// Reads a record the agent keeps in its state directory.
    pub fn read_state<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>> {
        read_json(&self.state(name))
    }

    /// Writes a record into the state directory, atomically.
    pub fn write_state<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        write_json_atomic(&self.state(name), value)
    }

    /// Puts back hand-written files regmirror backed up before replacing them, where nothing
    /// of regmirror's stands now. For a node that never had a good configuration of ours:
    /// after a failed first apply it gets its own files back. Returns the paths restored.
    pub fn restore_backups<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p String>,
    ) -> Result<Vec<String>> {
        let mut restored = Vec::new();
        for path in paths {
            let backup = self.state("backup").join(path.trim_start_matches('/'));
            let target = self.host_path(path)?;
            if !backup.is_file() || target.exists() {
                continue;
            }
            let content = fs::read(&backup).map_err(io("read", &backup))?;
            let staged = staged_path(&target);
            write_file(&staged, &content, 0o600)?;
            fs::rename(&staged, &target).map_err(io("rename into place", &target))?;
            sync_dir(target.parent().expect("host paths have a parent"))?;
            restored.push(path.clone());
        }
        Ok(restored)
    }

    /// Puts the last good configuration back. `None` when there is none.
    pub fn rollback(&self) -> Result<Option<ApplyReport>> {
        match self.last_good()? {
            Some(good) => self.apply(&good).map(Some),
            None => Ok(None),
        }
    }

    fn roll_forward(&self, journal: &Journal) -> Result<()> {
        for (i, path) in journal.config.files.keys().enumerate() {
            let target = self.host_path(path)?;
            let staged = staged_path(&target);
            if staged.exists() {
                fs::rename(&staged, &target).map_err(io("rename into place", &target))?;
                sync_dir(target.parent().unwrap())?;
            }
            if i == 0 {
                crash_point("installing");
            }
        }
        for path in &journal.remove {
            let target = self.host_path(path)?;
            remove_if_exists(&target)?;
        }
        write_json_atomic(&self.state("current.json"), &journal.config)?;
        remove_if_exists(&self.state("journal.json"))?;
        remove_if_exists(&self.state("staging.json"))?;
        sync_dir(&self.root.join(STATE_DIR))
    }
}

fn staged_path(target: &Path) -> PathBuf {
    let mut name = target
        .file_name()
        .expect("host paths name a file")
        .to_owned();
    name.push(STAGED_SUFFIX);
    target.with_file_name(name)
}

fn on_disk_matches(target: &Path, content: &[u8], mode: u32) -> bool {
    let same_mode = fs::metadata(target).is_ok_and(|m| m.permissions().mode() & 0o7777 == mode);
    same_mode && fs::read(target).is_ok_and(|on_disk| on_disk == content)
}

/// Writes and fsyncs a file with exactly `mode` (whatever the umask).
fn write_file(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(path)
        .map_err(io("create", path))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io("chmod", path))?;
    file.write_all(content).map_err(io("write", path))?;
    file.sync_all().map_err(io("fsync", path))
}

fn write_json_atomic<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let dir = path.parent().unwrap();
    fs::create_dir_all(dir).map_err(io("create directory", dir))?;
    let json = serde_json::to_vec(value).expect("state serializes");
    let tmp = staged_path(path);
    // State files hold rendered configurations, credentials included.
    write_file(&tmp, &json, 0o600)?;
    fs::rename(&tmp, path).map_err(io("rename into place", path))?;
    sync_dir(dir)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HostError::State {
                path: path.to_owned(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(HostError::Io {
            op: "read",
            path: path.to_owned(),
            source: e,
        }),
    }
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(HostError::Io {
            op: "remove",
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}

/// Fault injection for the crash tests: `REGMIRROR_CRASH_AT=<step>` aborts the process there,
/// as a kill or power loss would.
fn crash_point(step: &str) {
    if std::env::var("REGMIRROR_CRASH_AT").is_ok_and(|at| at == step) {
        std::process::abort();
    }
}
