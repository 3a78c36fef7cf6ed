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
//!
//! Nothing here follows a symbolic link below the root. Whoever can plant a link on the host
//! (at a target, at a `.regmirror-new` file, at a backup, at any directory on the way) must not
//! redirect a write — or a read — anywhere else, inside the root or out of it. So every path is
//! walked one component at a time from the root (`openat` with `O_NOFOLLOW | O_DIRECTORY`),
//! missing directories are made with `mkdirat` (and their parent fsynced), files are created
//! with `O_CREAT | O_EXCL | O_NOFOLLOW` after `unlinkat` removed a stale one, and renamed with
//! `renameat` inside the opened directory. A link or a non-directory on the way, or a link or
//! special file where a file is read or replaced, is refused with [`HostError::Unsafe`].
//!
//! A configuration writes only under its flavor's paths ([`Flavor::owned_prefixes`]); anything
//! else (k3s's auto-deployed manifests, say) is refused before anything is written.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use regmirror_core::contract::config_secret_name;
use regmirror_core::node::Flavor;
use regmirror_core::render::RenderedConfig;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Where the agent keeps its state, under the host root.
pub const STATE_DIR: &str = "var/lib/regmirror";
/// Suffix of files written but not yet in place.
const STAGED_SUFFIX: &str = ".regmirror-new";
/// Suffix of the file beside a backup that records the original file's mode.
const MODE_SUFFIX: &str = ".regmirror-mode";
/// Mode of a restored backup whose mode was not recorded (backups of older agents).
const UNKNOWN_BACKUP_MODE: u32 = 0o600;
/// Mode of directories made for configuration files (what the runtimes' own are).
const HOST_DIR_MODE: u32 = 0o755;
/// Mode of directories made for the agent's state: it holds credentials.
const STATE_DIR_MODE: u32 = 0o700;
/// The state file of the last verified configuration.
const LAST_GOOD: &str = "last-good.json";

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
    /// Something on the host where regmirror would have to follow a link or treat a special
    /// file as its own: nothing is written through it.
    #[error("refusing {}: {what}; regmirror never writes or reads through links", path.display())]
    Unsafe { path: PathBuf, what: &'static str },
    /// A path outside what the configuration's flavor may write.
    #[error(
        "refusing path {path:?}: not among the files a {flavor} configuration may write ({})",
        describe(allowed)
    )]
    NotOwned {
        path: String,
        flavor: String,
        allowed: Vec<String>,
    },
}

fn describe(allowed: &[String]) -> String {
    if allowed.is_empty() {
        return "none".into();
    }
    let each: Vec<String> = allowed
        .iter()
        .map(|p| {
            if p.ends_with('/') {
                format!("under {p}")
            } else {
                p.clone()
            }
        })
        .collect();
    each.join(", ")
}

type Result<T> = std::result::Result<T, HostError>;

fn io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(Errno) -> HostError + 'p {
    move |errno| HostError::Io {
        op,
        path: path.to_owned(),
        source: errno.into(),
    }
}

fn std_io<'p>(op: &'static str, path: &'p Path) -> impl FnOnce(std::io::Error) -> HostError + 'p {
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

/// What [`HostFs::uninstall`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Uninstalled {
    /// regmirror's files removed.
    pub removed: Vec<String>,
    /// Hand-written files put back.
    pub restored: Vec<String>,
    /// The agent's state directory was there and is gone.
    pub state_removed: bool,
}

/// The last-good record: the configuration itself, with the name it was applied under beside
/// its fields. Kept that way so an older agent (after a downgrade) still reads it as the
/// configuration it is, and a record an older agent wrote (no name) still reads here.
#[derive(Serialize, Deserialize)]
struct LastGood {
    #[serde(
        rename = "configName",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    name: Option<String>,
    #[serde(flatten)]
    config: RenderedConfig,
}

/// Only the name of a last-good record, read without building the configuration.
#[derive(Deserialize)]
struct LastGoodName {
    #[serde(rename = "configName", default)]
    name: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Journal {
    config: RenderedConfig,
    remove: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Staging {
    /// Staged files, as paths under the root.
    staged: Vec<PathBuf>,
}

/// A place under the root: the directory (relative to the root) and the name in it.
#[derive(Debug, Clone)]
struct Place {
    dir: PathBuf,
    name: OsString,
}

impl Place {
    fn staged(&self) -> OsString {
        suffixed(&self.name, STAGED_SUFFIX)
    }
}

fn suffixed(name: &OsStr, suffix: &str) -> OsString {
    let mut name = name.to_owned();
    name.push(suffix);
    name
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

    fn state(&self, name: &str) -> Place {
        Place {
            dir: PathBuf::from(STATE_DIR),
            name: name.into(),
        }
    }

    /// Where the backup of the file at `place` is kept.
    fn backup(&self, place: &Place) -> Place {
        Place {
            dir: Path::new(STATE_DIR).join("backup").join(&place.dir),
            name: place.name.clone(),
        }
    }

    /// Maps an absolute host path under the root, refusing anything that could escape it or
    /// that is not written the one plain way (`//`, `.`, a trailing `/`).
    fn host_path(&self, path: &str) -> Result<Place> {
        let bad = || HostError::BadPath(path.to_owned());
        let relative = Path::new(path).strip_prefix("/").map_err(|_| bad())?;
        if relative.as_os_str().is_empty()
            || relative
                .components()
                .any(|c| !matches!(c, Component::Normal(_)))
            || relative.components().collect::<PathBuf>().as_os_str() != relative.as_os_str()
        {
            return Err(bad());
        }
        let name = relative.file_name().ok_or_else(bad)?.to_owned();
        let dir = relative.parent().unwrap_or(Path::new("")).to_owned();
        Ok(Place { dir, name })
    }

    /// Maps a path of `config` like [`Self::host_path`], and refuses it unless the config's
    /// flavor owns it. The agent's own state directory is nobody's.
    fn config_path(&self, config: &RenderedConfig, path: &str) -> Result<Place> {
        let place = self.host_path(path)?;
        let allowed = config
            .flavor
            .parse::<Flavor>()
            .map(|f| f.owned_prefixes())
            .unwrap_or_default();
        let owned = allowed.iter().any(|prefix| match prefix.strip_suffix('/') {
            Some(_) => path.len() > prefix.len() && path.starts_with(prefix.as_str()),
            None => path == prefix,
        });
        let state = format!("/{STATE_DIR}/");
        if !owned || path.starts_with(&state) {
            return Err(HostError::NotOwned {
                path: path.to_owned(),
                flavor: config.flavor.clone(),
                allowed,
            });
        }
        Ok(place)
    }

    /// Opens the root. A missing root is made when `create` (it is the agent's own
    /// configuration, the one path whose links are followed), else `None`.
    fn open_root(&self, create: bool) -> Result<Option<Dir>> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(&self.root, flags, Mode::empty()) {
            Err(Errno::NOENT) if create => {
                std::fs::create_dir_all(&self.root)
                    .map_err(std_io("create directory", &self.root))?;
                rustix::fs::open(&self.root, flags, Mode::empty())
            }
            Err(Errno::NOENT) => return Ok(None),
            other => other,
        }
        .map_err(io("open host root", &self.root))?;
        Ok(Some(Dir {
            fd,
            path: self.root.clone(),
        }))
    }

    /// Opens directory `dir` (relative to the root) without following any link. Missing
    /// directories are made with `create`'s mode; without it, a missing one is `None`.
    fn open_dir(&self, dir: &Path, create: Option<u32>) -> Result<Option<Dir>> {
        let Some(mut open) = self.open_root(create.is_some())? else {
            return Ok(None);
        };
        for component in dir.components() {
            let Component::Normal(name) = component else {
                return Err(HostError::BadPath(dir.display().to_string()));
            };
            open = match open.subdir(name, create)? {
                Some(sub) => sub,
                None => return Ok(None),
            };
        }
        Ok(Some(open))
    }

    /// The configuration on the host now, if regmirror put one there.
    pub fn current(&self) -> Result<Option<RenderedConfig>> {
        self.read_json(&self.state("current.json"))
    }

    /// The last configuration that was verified on this node.
    pub fn last_good(&self) -> Result<Option<RenderedConfig>> {
        Ok(self
            .read_json::<LastGood>(&self.state(LAST_GOOD))?
            .map(|record| record.config))
    }

    /// The name (its Secret's) of the last configuration verified on this node, as recorded
    /// when it was marked good: what the node runs.
    ///
    /// A record written by an agent that did not keep names is named once the way that agent
    /// named it, by hashing the configuration (`config_secret_name`), and rewritten with the
    /// name: the node keeps reporting the config it reported before the upgrade. Treating it
    /// as unknown instead would report a node that runs nothing, and have the operator plan
    /// for it as for a new node.
    pub fn last_good_name(&self) -> Result<Option<String>> {
        let place = self.state(LAST_GOOD);
        let Some(record) = self.read_json::<LastGoodName>(&place)? else {
            return Ok(None);
        };
        if record.name.is_some() {
            return Ok(record.name);
        }
        let Some(LastGood { config, .. }) = self.read_json::<LastGood>(&place)? else {
            return Ok(None);
        };
        let name = config_secret_name(&config);
        let named = LastGood {
            name: Some(name.clone()),
            config,
        };
        match self.write_json_atomic(&place, &named) {
            Ok(()) => {
                tracing::info!(config = %name, "named the last good configuration an older agent recorded")
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot record the last good configuration's name; it is hashed again next time")
            }
        }
        Ok(Some(name))
    }

    /// Records the current configuration, applied as `name`, as verified: the one a rollback
    /// returns to, and what [`Self::last_good_name`] says the node runs.
    pub fn mark_good(&self, name: &str) -> Result<()> {
        if let Some(config) = self.current()? {
            let record = LastGood {
                name: Some(name.to_owned()),
                config,
            };
            self.write_json_atomic(&self.state(LAST_GOOD), &record)?;
        }
        Ok(())
    }

    /// Finishes an apply a crash interrupted after its commit point, or discards one that
    /// crashed before it. Returns whether there was anything to do.
    pub fn recover(&self) -> Result<bool> {
        if let Some(journal) = self.read_json::<Journal>(&self.state("journal.json"))? {
            self.roll_forward(&journal)?;
            return Ok(true);
        }
        let Some(staging) = self.read_json::<Staging>(&self.state("staging.json"))? else {
            return Ok(false);
        };
        for staged in &staging.staged {
            // Only staged files under the root are ever removed here.
            let Some(place) = staged
                .strip_prefix(&self.root)
                .ok()
                .and_then(|relative| self.host_path(&format!("/{}", relative.display())).ok())
                .filter(|place| place.name.as_bytes().ends_with(STAGED_SUFFIX.as_bytes()))
            else {
                tracing::warn!(path = %staged.display(), "ignoring a staged file outside the host root");
                continue;
            };
            if let Some(dir) = self.open_dir(&place.dir, None)? {
                dir.remove(&place.name)?;
            }
        }
        self.remove_state("staging.json")?;
        Ok(true)
    }

    /// Puts `config` onto the host. Safe to call again with the same config (it then writes
    /// nothing).
    pub fn apply(&self, config: &RenderedConfig) -> Result<ApplyReport> {
        // Every path is checked before anything is touched.
        let places = config
            .files
            .keys()
            .map(|path| self.config_path(config, path))
            .collect::<Result<Vec<_>>>()?;
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
        for ((path, file), place) in config.files.iter().zip(places) {
            let on_disk = self.read_file(&place)?;
            let matches = on_disk.as_ref().is_some_and(|(content, mode)| {
                *mode == file.mode && content.as_slice() == file.content.as_bytes()
            });
            if !matches {
                changes.push((path.clone(), place, file, on_disk));
            }
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
            .map(|(_, place, _, _)| self.root.join(&place.dir).join(place.staged()))
            .collect();
        self.write_json_atomic(
            &self.state("staging.json"),
            &Staging {
                staged: staged.clone(),
            },
        )?;
        for (_, place, file, _) in &changes {
            let dir = self
                .open_dir(&place.dir, Some(HOST_DIR_MODE))?
                .expect("created");
            dir.create_file(&place.staged(), file.content.as_bytes(), file.mode)?;
        }
        crash_point("staged");

        // 3. A file regmirror does not own is saved once before it is replaced, with its mode.
        for (path, place, _, on_disk) in &changes {
            let Some((content, mode)) = on_disk else {
                continue;
            };
            if owned(path) {
                continue;
            }
            let backup = self.backup(place);
            let dir = self
                .open_dir(&backup.dir, Some(STATE_DIR_MODE))?
                .expect("created");
            if dir.kind(&backup.name)?.is_some() {
                dir.read(&backup.name)?; // refuses a link or special file there
                continue;
            }
            // The mode first: a backup without its record would come back 0600.
            let mode_name = suffixed(&backup.name, MODE_SUFFIX);
            dir.replace(&mode_name, format!("{mode:o}\n").as_bytes(), 0o600)?;
            dir.replace(&backup.name, content, 0o600)?;
            report.backed_up.push(path.clone());
        }

        // 4. The commit point.
        let journal = Journal {
            config: config.clone(),
            remove: remove.clone(),
        };
        self.write_json_atomic(&self.state("journal.json"), &journal)?;
        crash_point("journaled");

        // 5. Into place.
        self.roll_forward(&journal)?;
        report.written = changes.into_iter().map(|(path, ..)| path).collect();
        report.removed = remove;
        Ok(report)
    }

    /// Reads a record the agent keeps in its state directory.
    pub fn read_state<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>> {
        self.read_json(&self.state(name))
    }

    /// Writes a record into the state directory, atomically.
    pub fn write_state<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        self.write_json_atomic(&self.state(name), value)
    }

    /// Puts back hand-written files regmirror backed up before replacing them, where nothing
    /// of regmirror's stands now, with the mode they had. For a node that never had a good
    /// configuration of ours: after a failed first apply it gets its own files back. Returns
    /// the paths restored.
    pub fn restore_backups<'p>(
        &self,
        paths: impl IntoIterator<Item = &'p String>,
    ) -> Result<Vec<String>> {
        let mut restored = Vec::new();
        for path in paths {
            let place = self.host_path(path)?;
            let backup = self.backup(&place);
            let Some(backup_dir) = self.open_dir(&backup.dir, None)? else {
                continue;
            };
            let Some((content, _)) = backup_dir.read(&backup.name)? else {
                continue;
            };
            let mode = match backup_dir.read(&suffixed(&backup.name, MODE_SUFFIX))? {
                Some((text, _)) => std::str::from_utf8(&text)
                    .ok()
                    .and_then(|t| u32::from_str_radix(t.trim(), 8).ok())
                    // Permission bits only: a record never makes a file setuid.
                    .map_or(UNKNOWN_BACKUP_MODE, |m| m & 0o777),
                None => UNKNOWN_BACKUP_MODE,
            };
            let dir = self
                .open_dir(&place.dir, Some(HOST_DIR_MODE))?
                .expect("created");
            if dir.kind(&place.name)?.is_some() {
                dir.read(&place.name)?; // refuses a link or special file there
                continue;
            }
            dir.replace(&place.name, &content, mode)?;
            restored.push(path.clone());
        }
        Ok(restored)
    }

    /// Takes regmirror off the host, as before it came: the files of the configuration on the
    /// host removed, the hand-written files it backed up before replacing them put back, and
    /// its state (records, backups, the node's key) deleted. What `regmirror-agent cleanup`
    /// runs before regmirror is uninstalled. A host without regmirror's state is left alone.
    pub fn uninstall(&self) -> Result<Uninstalled> {
        self.recover()?;
        let mut done = Uninstalled::default();
        if let Some(current) = self.current()? {
            let nothing = RenderedConfig {
                peer_registries: Vec::new(),
                flavor: current.flavor.clone(),
                files: Default::default(),
                restart_key: String::new(),
                parts: Default::default(),
                probes: Default::default(),
                credential_sources: Default::default(),
            };
            done.removed = self.apply(&nothing)?.removed;
        }
        // Every backup, also of files a configuration no longer names (mirrors deleted first).
        let backups = Path::new(STATE_DIR).join("backup");
        if let Some(dir) = self.open_dir(&backups, None)? {
            let mut paths = Vec::new();
            dir.files_below(Path::new("/"), &mut paths)?;
            paths.retain(|p| !p.ends_with(MODE_SUFFIX) && !p.ends_with(STAGED_SUFFIX));
            done.restored = self.restore_backups(paths.iter())?;
        }
        let state = Path::new(STATE_DIR);
        if let (Some(parent), Some(name)) = (state.parent(), state.file_name()) {
            if let Some(dir) = self.open_dir(state, None)? {
                dir.remove_tree()?;
                let parent = self
                    .open_dir(parent, None)?
                    .expect("the state directory's parent");
                parent.remove_dir(name)?;
                parent.sync()?;
                done.state_removed = true;
            }
        }
        Ok(done)
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
            let place = self.host_path(path)?;
            if let Some(dir) = self.open_dir(&place.dir, None)? {
                let staged = place.staged();
                match dir.kind(&staged)? {
                    Some(FileType::RegularFile) => {
                        dir.rename(&staged, &place.name)?;
                        dir.sync()?;
                    }
                    Some(_) => {
                        return Err(HostError::Unsafe {
                            path: dir.path.join(&staged),
                            what: "not a regular file",
                        })
                    }
                    None => {}
                }
            }
            if i == 0 {
                crash_point("installing");
            }
        }
        for path in &journal.remove {
            let place = self.host_path(path)?;
            if let Some(dir) = self.open_dir(&place.dir, None)? {
                if dir.remove(&place.name)? {
                    dir.sync()?;
                }
            }
        }
        self.write_json_atomic(&self.state("current.json"), &journal.config)?;
        self.remove_state("journal.json")?;
        self.remove_state("staging.json")
    }

    /// Reads the file at `place` and its permission bits; `None` when nothing is there (or a
    /// directory on the way is missing). A link or special file there, or on the way, is an
    /// error.
    fn read_file(&self, place: &Place) -> Result<Option<(Vec<u8>, u32)>> {
        match self.open_dir(&place.dir, None)? {
            Some(dir) => dir.read(&place.name),
            None => Ok(None),
        }
    }

    fn write_json_atomic<T: Serialize>(&self, place: &Place, value: &T) -> Result<()> {
        let json = serde_json::to_vec(value).expect("state serializes");
        let dir = self
            .open_dir(&place.dir, Some(STATE_DIR_MODE))?
            .expect("created");
        // State files hold rendered configurations, credentials included.
        dir.replace(&place.name, &json, 0o600)
    }

    fn read_json<T: for<'de> Deserialize<'de>>(&self, place: &Place) -> Result<Option<T>> {
        let Some((bytes, _)) = self.read_file(place)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HostError::State {
                path: self.root.join(&place.dir).join(&place.name),
                detail: e.to_string(),
            })
    }

    fn remove_state(&self, name: &str) -> Result<()> {
        let place = self.state(name);
        if let Some(dir) = self.open_dir(&place.dir, None)? {
            if dir.remove(&place.name)? {
                dir.sync()?;
            }
        }
        Ok(())
    }
}

/// A directory under the root, opened without following links, and where it is (for
/// messages).
struct Dir {
    fd: OwnedFd,
    path: PathBuf,
}

impl Dir {
    /// Opens (or, with `create`, makes) the directory `name` in this one. A link or anything
    /// else than a directory there is refused.
    fn subdir(&self, name: &OsStr, create: Option<u32>) -> Result<Option<Dir>> {
        let path = self.path.join(name);
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut made = false;
        loop {
            match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
                Ok(fd) => return Ok(Some(Dir { fd, path })),
                Err(Errno::NOENT) => {
                    let Some(mode) = create else {
                        return Ok(None);
                    };
                    if made {
                        return Err(io("open directory", &path)(Errno::NOENT));
                    }
                    match rustix::fs::mkdirat(&self.fd, name, Mode::from_raw_mode(mode)) {
                        // The new entry is durable only once its parent is.
                        Ok(()) => self.sync()?,
                        Err(Errno::EXIST) => {}
                        Err(e) => return Err(io("create directory", &path)(e)),
                    }
                    made = true;
                }
                Err(Errno::LOOP | Errno::NOTDIR) => {
                    return Err(self.refusal(name, "not a directory"));
                }
                Err(e) => return Err(io("open directory", &path)(e)),
            }
        }
    }

    /// What is at `name`, without following a link; `None` when nothing is.
    fn kind(&self, name: &OsStr) -> Result<Option<FileType>> {
        match rustix::fs::statat(&self.fd, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(stat) => Ok(Some(FileType::from_raw_mode(stat.st_mode))),
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(io("stat", &self.path.join(name))(e)),
        }
    }

    /// The error for `name`, which is not what it should be: a link, or `otherwise`.
    fn refusal(&self, name: &OsStr, otherwise: &'static str) -> HostError {
        let what = match self.kind(name) {
            Ok(Some(FileType::Symlink)) => "it is a symbolic link",
            _ => otherwise,
        };
        HostError::Unsafe {
            path: self.path.join(name),
            what,
        }
    }

    /// Reads the regular file `name` and its permission bits; `None` when nothing is there.
    fn read(&self, name: &OsStr) -> Result<Option<(Vec<u8>, u32)>> {
        let path = self.path.join(name);
        // Non-blocking: a FIFO planted there must not hang the agent.
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::openat(&self.fd, name, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOENT) => return Ok(None),
            Err(Errno::LOOP) => return Err(self.refusal(name, "not a regular file")),
            Err(e) => return Err(io("open", &path)(e)),
        };
        let mut file = File::from(fd);
        let meta = file.metadata().map_err(std_io("stat", &path))?;
        if !meta.file_type().is_file() {
            return Err(HostError::Unsafe {
                path,
                what: "not a regular file",
            });
        }
        let mut content = Vec::with_capacity(meta.size() as usize);
        file.read_to_end(&mut content)
            .map_err(std_io("read", &path))?;
        Ok(Some((content, meta.permissions().mode() & 0o7777)))
    }

    /// Creates the file `name` afresh (a stale one, or a link, there is removed first, never
    /// followed) with exactly `mode` whatever the umask, and fsyncs it.
    fn create_file(&self, name: &OsStr, content: &[u8], mode: u32) -> Result<()> {
        let path = self.path.join(name);
        self.remove(name)?;
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.fd, name, flags, Mode::from_raw_mode(mode))
            .map_err(io("create", &path))?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(io("chmod", &path))?;
        let mut file = File::from(fd);
        file.write_all(content).map_err(std_io("write", &path))?;
        file.sync_all().map_err(std_io("fsync", &path))
    }

    /// Atomically replaces `name` with `content`: written beside it, renamed over it, and the
    /// directory fsynced.
    fn replace(&self, name: &OsStr, content: &[u8], mode: u32) -> Result<()> {
        let staged = suffixed(name, STAGED_SUFFIX);
        self.create_file(&staged, content, mode)?;
        self.rename(&staged, name)?;
        self.sync()
    }

    fn rename(&self, from: &OsStr, to: &OsStr) -> Result<()> {
        rustix::fs::renameat(&self.fd, from, &self.fd, to)
            .map_err(io("rename into place", &self.path.join(to)))
    }

    /// Removes the entry `name` (a link itself, never what it points to). Returns whether
    /// there was one.
    fn remove(&self, name: &OsStr) -> Result<bool> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) => Ok(true),
            Err(Errno::NOENT) => Ok(false),
            Err(e) => Err(io("remove", &self.path.join(name))(e)),
        }
    }

    fn sync(&self) -> Result<()> {
        rustix::fs::fsync(&self.fd).map_err(io("fsync directory", &self.path))
    }

    /// Removes the empty directory `name`.
    fn remove_dir(&self, name: &OsStr) -> Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::REMOVEDIR) {
            Ok(()) | Err(Errno::NOENT) => Ok(()),
            Err(e) => Err(io("remove directory", &self.path.join(name))(e)),
        }
    }

    /// The paths of the regular files below this directory, each as `prefix` joined with its
    /// path from here.
    fn files_below(&self, prefix: &Path, out: &mut Vec<String>) -> Result<()> {
        for name in self.names()? {
            match self.kind(&name)? {
                Some(FileType::Directory) => {
                    if let Some(sub) = self.subdir(&name, None)? {
                        sub.files_below(&prefix.join(&name), out)?;
                    }
                }
                Some(FileType::RegularFile) => {
                    out.push(prefix.join(&name).to_string_lossy().into_owned())
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The names of the entries of this directory.
    fn names(&self) -> Result<Vec<OsString>> {
        let entries = rustix::fs::Dir::read_from(&self.fd).map_err(io("list", &self.path))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io("list", &self.path))?;
            let name = OsStr::from_bytes(entry.file_name().to_bytes()).to_owned();
            if name != "." && name != ".." {
                names.push(name);
            }
        }
        Ok(names)
    }

    /// Removes everything in this directory: subdirectories entered without following a link,
    /// links removed as links.
    fn remove_tree(&self) -> Result<()> {
        for name in self.names()? {
            if self.kind(&name)? == Some(FileType::Directory) {
                if let Some(sub) = self.subdir(&name, None)? {
                    sub.remove_tree()?;
                }
                self.remove_dir(&name)?;
            } else {
                self.remove(&name)?;
            }
        }
        Ok(())
    }
}

/// Fault injection for the crash tests: `REGMIRROR_CRASH_AT=<step>` aborts the process there,
/// as a kill or power loss would.
fn crash_point(step: &str) {
    if std::env::var("REGMIRROR_CRASH_AT").is_ok_and(|at| at == step) {
        std::process::abort();
    }
}
