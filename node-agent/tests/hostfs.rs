//! The agent's host writes: ownership, backups, idempotence, rollback, crash safety (by killing
//! the agent between steps), and a real containerd reading what it wrote.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use regmirror_core::render::{RenderedConfig, RenderedFile};
use regmirror_node_agent::hostfs::HostFs;

fn config(files: &[(&str, &str, u32)]) -> RenderedConfig {
    config_for("k3s", files)
}

fn config_for(flavor: &str, files: &[(&str, &str, u32)]) -> RenderedConfig {
    RenderedConfig {
        peer_registries: Vec::new(),
        flavor: flavor.into(),
        files: files
            .iter()
            .map(|(p, c, m)| {
                (
                    p.to_string(),
                    RenderedFile {
                        mode: *m,
                        content: c.to_string(),
                    },
                )
            })
            .collect(),
        restart_key: String::new(),
        parts: Default::default(),
        probes: Default::default(),
        credential_sources: Default::default(),
    }
}

fn read(root: &Path, path: &str) -> Option<String> {
    std::fs::read_to_string(root.join(path.trim_start_matches('/'))).ok()
}

fn mode(root: &Path, path: &str) -> u32 {
    std::fs::metadata(root.join(path.trim_start_matches('/')))
        .unwrap()
        .permissions()
        .mode()
        & 0o7777
}

const REGISTRIES: &str = "/etc/rancher/k3s/registries.yaml";
const HOSTS: &str = "/var/lib/rancher/k3s/agent/etc/containerd/certs.d/docker.io/hosts.toml";
const CA: &str = "/etc/rancher/k3s/regmirror-certs/m.example.com/ca.crt";

fn old() -> RenderedConfig {
    config(&[
        (REGISTRIES, "old: registries\n", 0o600),
        (HOSTS, "old hosts\n", 0o644),
        (CA, "old ca\n", 0o644),
    ])
}

fn new() -> RenderedConfig {
    config(&[
        (REGISTRIES, "new: registries\n", 0o600),
        (HOSTS, "new hosts\n", 0o644),
    ])
}

#[test]
fn apply_writes_exact_modes_and_is_idempotent() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let report = host.apply(&old()).unwrap();
    assert_eq!(report.written.len(), 3);
    assert_eq!(
        read(root.path(), REGISTRIES).as_deref(),
        Some("old: registries\n")
    );
    assert_eq!(mode(root.path(), REGISTRIES), 0o600);
    assert_eq!(mode(root.path(), CA), 0o644);
    assert_eq!(
        mode(root.path(), "/var/lib/regmirror/current.json"),
        0o600,
        "state holds credentials"
    );
    assert!(
        host.apply(&old()).unwrap().written.is_empty(),
        "nothing changed, nothing written"
    );
}

#[test]
fn only_owned_files_are_removed_and_hand_written_ones_are_backed_up_once() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let handwritten = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(handwritten.parent().unwrap()).unwrap();
    std::fs::write(&handwritten, "mirrors: {hand: written}\n").unwrap();
    let users_own = root
        .path()
        .join("var/lib/rancher/k3s/agent/etc/containerd/certs.d/quay.io/hosts.toml");
    std::fs::create_dir_all(users_own.parent().unwrap()).unwrap();
    std::fs::write(&users_own, "user's own\n").unwrap();

    let report = host.apply(&old()).unwrap();
    assert_eq!(report.backed_up, [REGISTRIES]);
    assert_eq!(
        read(
            root.path(),
            "/var/lib/regmirror/backup/etc/rancher/k3s/registries.yaml"
        )
        .as_deref(),
        Some("mirrors: {hand: written}\n")
    );

    let report = host.apply(&new()).unwrap();
    assert!(
        report.backed_up.is_empty(),
        "backed up once, and our own file is not a hand-written one"
    );
    assert_eq!(report.removed, [CA]);
    assert_eq!(read(root.path(), CA), None);
    assert_eq!(
        std::fs::read_to_string(&users_own).unwrap(),
        "user's own\n",
        "never remove what we did not write"
    );
    assert_eq!(
        read(
            root.path(),
            "/var/lib/regmirror/backup/etc/rancher/k3s/registries.yaml"
        )
        .as_deref(),
        Some("mirrors: {hand: written}\n")
    );
}

#[test]
fn rollback_restores_the_last_verified_configuration() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    assert_eq!(host.rollback().unwrap(), None, "nothing verified yet");
    host.apply(&old()).unwrap();
    host.mark_good("old").unwrap();
    host.apply(&new()).unwrap();
    host.rollback().unwrap().unwrap();
    assert_eq!(
        read(root.path(), REGISTRIES).as_deref(),
        Some("old: registries\n")
    );
    assert_eq!(read(root.path(), CA).as_deref(), Some("old ca\n"));
    assert_eq!(host.current().unwrap(), Some(old()));
}

#[test]
fn paths_outside_the_host_root_are_refused() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path().join("host"));
    for bad in ["relative/path", "/etc/../../escape", "/"] {
        assert!(host.apply(&config(&[(bad, "x", 0o644)])).is_err(), "{bad}");
    }
    assert!(!root.path().join("escape").exists());
}

/// Files of `cfg` as they are on disk: all equal, or which differ.
fn on_disk_is(root: &Path, cfg: &RenderedConfig) -> bool {
    cfg.files
        .iter()
        .all(|(p, f)| read(root, p).as_deref() == Some(f.content.as_str()))
}

#[test]
fn a_crash_at_any_step_leaves_the_old_files_or_the_new_ones_never_a_mix() {
    for (step, expect_new) in [("staged", false), ("journaled", true), ("installing", true)] {
        let root = tempfile::tempdir().unwrap();
        let host = HostFs::new(root.path());
        host.apply(&old()).unwrap();
        let new_file = root.path().join("new.json");
        std::fs::write(&new_file, serde_json::to_vec(&new()).unwrap()).unwrap();

        let killed = Command::new(env!("CARGO_BIN_EXE_regmirror-agent"))
            .arg("--root")
            .arg(root.path())
            .arg("apply")
            .arg(&new_file)
            .env("REGMIRROR_CRASH_AT", step)
            .output()
            .unwrap();
        assert!(
            !killed.status.success(),
            "{step}: the agent should have died"
        );
        // Mid-crash at `installing` the targets are a mix on disk; recovery must settle it.
        assert!(
            host.recover().unwrap(),
            "{step}: there was an interrupted apply"
        );
        let settled = if expect_new { new() } else { old() };
        assert!(
            on_disk_is(root.path(), &settled),
            "{step}: expected the {} files",
            if expect_new { "new" } else { "old" }
        );
        assert_eq!(host.current().unwrap(), Some(settled.clone()), "{step}");
        let leftovers: Vec<_> = walk(root.path())
            .into_iter()
            .filter(|p| p.ends_with(".regmirror-new"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "{step}: staged files left: {leftovers:?}"
        );
        if !expect_new {
            assert_eq!(read(root.path(), CA).as_deref(), Some("old ca\n"));
        } else {
            assert_eq!(
                read(root.path(), CA),
                None,
                "{step}: the new config no longer has the CA"
            );
        }
    }
}

fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}

/// Symbolic links planted on the host: a write through one is refused (or lands inside the
/// root, replacing the link itself), and nothing outside the root is ever touched.
mod symlinks {
    use std::os::unix::fs::symlink;
    use std::path::PathBuf;

    use regmirror_node_agent::hostfs::HostError;

    use super::*;

    /// A host root and, beside it, a directory that stands for "anywhere else on the host".
    struct Host {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
        fs: HostFs,
    }

    impl Host {
        fn new() -> Host {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let outside = dir.path().join("elsewhere");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(&outside).unwrap();
            std::fs::write(outside.join("precious"), "precious\n").unwrap();
            let fs = HostFs::new(&root);
            Host {
                _dir: dir,
                root,
                outside,
                fs,
            }
        }

        fn at(&self, path: &str) -> PathBuf {
            self.root.join(path.trim_start_matches('/'))
        }

        /// Plants a link at host path `path`, to `to`.
        fn link(&self, path: &str, to: &Path) {
            let at = self.at(path);
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            symlink(to, at).unwrap();
        }

        /// The outside directory holds exactly what it was given.
        fn assert_outside_untouched(&self) {
            assert_eq!(
                walk(&self.outside),
                [self.outside.join("precious").display().to_string()],
                "something was written outside the root"
            );
            assert_eq!(
                std::fs::read_to_string(self.outside.join("precious")).unwrap(),
                "precious\n"
            );
            let meta = std::fs::metadata(self.outside.join("precious")).unwrap();
            assert_ne!(
                meta.permissions().mode() & 0o777,
                0o600,
                "chmodded through a link"
            );
        }
    }

    fn assert_refused_naming(result: Result<impl std::fmt::Debug, HostError>, path: &str) {
        let err = result.expect_err("the write should have been refused");
        let message = err.to_string();
        assert!(
            matches!(err, HostError::Unsafe { .. }),
            "expected a refusal: {message}"
        );
        assert!(message.contains(path), "{message:?} should name {path}");
        assert!(message.contains("symbolic link"), "{message}");
    }

    fn is_symlink(path: &Path) -> bool {
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }

    #[test]
    fn a_link_at_the_target_is_refused_not_followed() {
        let host = Host::new();
        // Same content and mode as the config's file: an apply that reads through the link
        // would think there is nothing to do.
        std::fs::write(host.outside.join("registries.yaml"), "old: registries\n").unwrap();
        std::fs::set_permissions(
            host.outside.join("registries.yaml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        host.link(REGISTRIES, &host.outside.join("registries.yaml"));
        assert_refused_naming(host.fs.apply(&old()), "etc/rancher/k3s/registries.yaml");
        assert!(is_symlink(&host.at(REGISTRIES)), "the link is left alone");
        assert_eq!(
            std::fs::read_to_string(host.outside.join("registries.yaml")).unwrap(),
            "old: registries\n"
        );
        std::fs::remove_file(host.outside.join("registries.yaml")).unwrap();
        host.assert_outside_untouched();
        assert_eq!(host.fs.current().unwrap(), None, "nothing was applied");
    }

    #[test]
    fn a_link_at_the_staged_path_is_replaced_inside_the_root() {
        let host = Host::new();
        let staged = format!("{REGISTRIES}.regmirror-new");
        host.link(&staged, &host.outside.join("precious"));
        host.link(
            &format!("{HOSTS}.regmirror-new"),
            &host.outside.join("new-file"),
        );
        host.fs.apply(&old()).unwrap();
        host.assert_outside_untouched();
        let target = std::fs::symlink_metadata(host.at(REGISTRIES)).unwrap();
        assert!(target.file_type().is_file(), "a regular file, in the root");
        assert_eq!(target.permissions().mode() & 0o7777, 0o600);
        assert_eq!(
            read(&host.root, REGISTRIES).as_deref(),
            Some("old: registries\n")
        );
        assert!(!host.at(&staged).exists() && !is_symlink(&host.at(&staged)));
    }

    #[test]
    fn a_link_at_an_intermediate_directory_is_refused() {
        let host = Host::new();
        host.link("/etc/rancher", &host.outside);
        assert_refused_naming(host.fs.apply(&old()), "etc/rancher");
        host.assert_outside_untouched();

        // A link deeper down, and one that stays inside the root but would carry the write
        // to a directory the flavor does not own (k3s's auto-deployed manifests).
        let host = Host::new();
        let manifests = host.at("/var/lib/rancher/k3s/server/manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        host.link("/var/lib/rancher/k3s/agent", &host.outside);
        host.link("/etc/rancher/k3s", &manifests);
        let err = host.fs.apply(&old()).unwrap_err();
        assert!(matches!(err, HostError::Unsafe { .. }), "{err}");
        assert!(walk(&manifests).is_empty(), "{:?}", walk(&manifests));
        host.assert_outside_untouched();
    }

    #[test]
    fn a_file_where_a_directory_should_be_is_refused() {
        let host = Host::new();
        std::fs::create_dir_all(host.at("/etc/rancher")).unwrap();
        std::fs::write(host.at("/etc/rancher/k3s"), "not a dir\n").unwrap();
        let err = host.fs.apply(&old()).unwrap_err();
        assert!(
            matches!(err, HostError::Unsafe { .. }) && err.to_string().contains("not a directory"),
            "{err}"
        );
    }

    #[test]
    fn a_link_at_the_backup_path_is_refused() {
        let host = Host::new();
        std::fs::create_dir_all(host.at("/etc/rancher/k3s")).unwrap();
        std::fs::write(host.at(REGISTRIES), "mirrors: {hand: written}\n").unwrap();
        let backup = "/var/lib/regmirror/backup/etc/rancher/k3s/registries.yaml";
        host.link(backup, &host.outside.join("stolen"));
        assert_refused_naming(host.fs.apply(&old()), backup.trim_start_matches('/'));
        host.assert_outside_untouched();
        host.fs.recover().unwrap();
        assert_eq!(
            read(&host.root, REGISTRIES).as_deref(),
            Some("mirrors: {hand: written}\n"),
            "the hand-written file stays"
        );

        // A link to the outside as the backup directory itself.
        let host = Host::new();
        std::fs::create_dir_all(host.at("/etc/rancher/k3s")).unwrap();
        std::fs::write(host.at(REGISTRIES), "mirrors: {hand: written}\n").unwrap();
        host.link("/var/lib/regmirror/backup", &host.outside);
        assert_refused_naming(host.fs.apply(&old()), "var/lib/regmirror/backup");
        host.assert_outside_untouched();
    }

    #[test]
    fn a_linked_backup_is_never_restored_from() {
        let host = Host::new();
        let backup = "/var/lib/regmirror/backup/etc/rancher/k3s/registries.yaml";
        // A "backup" that would copy another file of the host into registries.yaml.
        host.link(backup, &host.outside.join("precious"));
        assert_refused_naming(
            host.fs.restore_backups(&[REGISTRIES.to_owned()]),
            backup.trim_start_matches('/'),
        );
        assert_eq!(read(&host.root, REGISTRIES), None);
    }

    #[test]
    fn a_linked_state_directory_is_refused_for_writes_and_reads() {
        for linked in ["/var/lib/regmirror", "/var/lib", "/var"] {
            let host = Host::new();
            // Planted state: a config that reading through the link would take as ours.
            std::fs::write(
                host.outside.join("current.json"),
                serde_json::to_vec(&old()).unwrap(),
            )
            .unwrap();
            let state = host.outside.join("state");
            std::fs::create_dir_all(&state).unwrap();
            host.link(linked, &state);
            assert_refused_naming(host.fs.apply(&new()), linked.trim_start_matches('/'));
            assert_refused_naming(host.fs.current(), linked.trim_start_matches('/'));
            assert_refused_naming(
                host.fs.write_state("report.json", &"x"),
                linked.trim_start_matches('/'),
            );
            assert!(walk(&state).is_empty(), "{linked}: {:?}", walk(&state));
            std::fs::remove_file(host.outside.join("current.json")).unwrap();
            std::fs::remove_dir(&state).unwrap();
            host.assert_outside_untouched();
        }
    }

    #[test]
    fn a_linked_file_of_the_old_config_is_removed_as_a_link_only() {
        let host = Host::new();
        host.fs.apply(&old()).unwrap();
        // The CA file the new config drops has been swapped for a link to a host file.
        std::fs::remove_file(host.at(CA)).unwrap();
        symlink(host.outside.join("precious"), host.at(CA)).unwrap();
        host.fs.apply(&new()).unwrap();
        assert!(!is_symlink(&host.at(CA)));
        host.assert_outside_untouched();
    }

    #[test]
    fn a_backed_up_file_comes_back_with_its_own_mode() {
        let host = Host::new();
        std::fs::create_dir_all(host.at("/etc/rancher/k3s")).unwrap();
        std::fs::write(host.at(REGISTRIES), "mirrors: {hand: written}\n").unwrap();
        std::fs::set_permissions(host.at(REGISTRIES), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        let first = old();
        assert_eq!(host.fs.apply(&first).unwrap().backed_up, [REGISTRIES]);
        assert_eq!(mode(&host.root, REGISTRIES), 0o600);
        assert_eq!(
            mode(
                &host.root,
                "/var/lib/regmirror/backup/etc/rancher/k3s/registries.yaml"
            ),
            0o600,
            "the backup itself is kept private"
        );
        // The first config failed: ours are removed, the hand-written one comes back.
        host.fs.apply(&config(&[])).unwrap();
        assert_eq!(
            host.fs.restore_backups(first.files.keys()).unwrap(),
            [REGISTRIES]
        );
        assert_eq!(
            read(&host.root, REGISTRIES).as_deref(),
            Some("mirrors: {hand: written}\n")
        );
        assert_eq!(mode(&host.root, REGISTRIES), 0o640);
    }
}

/// Each flavor writes only its own files: a config naming anything else is refused whole,
/// before anything is written.
mod ownership {
    use regmirror_node_agent::hostfs::HostError;

    use super::*;

    fn assert_refused_whole(flavor: &str, bad: &str) {
        let root = tempfile::tempdir().unwrap();
        let host = HostFs::new(root.path());
        // A file the flavor does own, beside the bad one: it is not written either.
        let good = match flavor {
            "k3s" => REGISTRIES,
            "rke2" => "/etc/rancher/rke2/registries.yaml",
            "cri-o" => "/etc/containers/registries.conf.d/50-regmirror.conf",
            "containerd:/var/lib/containerd/certs.d" => {
                "/var/lib/containerd/certs.d/docker.io/hosts.toml"
            }
            _ => "/etc/containerd/certs.d/docker.io/hosts.toml",
        };
        let cfg = config_for(flavor, &[(good, "fine\n", 0o644), (bad, "evil\n", 0o644)]);
        let err = host.apply(&cfg).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, HostError::NotOwned { .. }),
            "{flavor} {bad}: {message}"
        );
        assert!(
            message.contains(bad) && message.contains(flavor),
            "{message:?} names the path and the flavor"
        );
        assert!(
            walk(root.path()).is_empty(),
            "{flavor} {bad}: nothing written, got {:?}",
            walk(root.path())
        );
    }

    #[test]
    fn k3s_manifests_are_refused_for_every_flavor() {
        for flavor in [
            "k3s",
            "rke2",
            "containerd",
            "containerd:/var/lib/containerd/certs.d",
            "cri-o",
        ] {
            assert_refused_whole(flavor, "/var/lib/rancher/k3s/server/manifests/evil.yaml");
            assert_refused_whole(flavor, "/var/lib/rancher/rke2/server/manifests/evil.yaml");
        }
    }

    #[test]
    fn each_flavor_is_confined_to_its_own_files() {
        for (flavor, bad) in [
            ("k3s", "/etc/rancher/k3s/config.yaml"),
            ("k3s", "/etc/rancher/k3s/config.yaml.d/50-evil.yaml"),
            ("k3s", "/etc/rancher/rke2/registries.yaml"),
            (
                "k3s",
                "/var/lib/rancher/k3s/agent/etc/containerd/config.toml.tmpl",
            ),
            ("k3s", "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"),
            ("k3s", "/var/lib/regmirror/current.json"),
            ("k3s", "/etc/rancher/k3s/registries.yaml.d/x"),
            ("rke2", "/etc/rancher/k3s/registries.yaml"),
            ("rke2", "/etc/rancher/rke2/config.yaml"),
            ("containerd", "/etc/containerd/config.toml"),
            (
                "containerd",
                "/etc/containerd/certs.d-evil/docker.io/hosts.toml",
            ),
            ("containerd", "/etc/containerd/certs.d/../config.toml"),
            (
                "containerd",
                "/etc/containerd/certs.d/./docker.io/hosts.toml",
            ),
            (
                "containerd",
                "/etc/containerd/certs.d//docker.io/hosts.toml",
            ),
            ("containerd", "/etc/systemd/system/evil.service"),
            (
                "containerd:/var/lib/containerd/certs.d",
                "/etc/containerd/certs.d/docker.io/hosts.toml",
            ),
            (
                "containerd:/",
                "/etc/containerd/certs.d/docker.io/hosts.toml",
            ),
            ("cri-o", "/etc/crio/crio.conf.d/00-evil.conf"),
            ("cri-o", "/etc/crio/crio.conf"),
            ("cri-o", "/etc/containers/policy.json"),
            ("cri-o", "/etc/containers/registries.conf"),
            ("cri-o", "/etc/crio/regmirror/other.json"),
            ("unknown-flavor", "/etc/rancher/k3s/registries.yaml"),
        ] {
            let root = tempfile::tempdir().unwrap();
            let host = HostFs::new(root.path());
            let err = host
                .apply(&config_for(flavor, &[(bad, "evil\n", 0o644)]))
                .expect_err(&format!("{flavor} {bad}"));
            assert!(
                matches!(err, HostError::NotOwned { .. } | HostError::BadPath(_)),
                "{flavor} {bad}: {err}"
            );
            assert!(walk(root.path()).is_empty(), "{flavor} {bad}");
        }
    }

    /// Every file the renderers produce for the examples (the golden listings under
    /// `examples/`) is one its flavor owns: applying each listing succeeds.
    #[test]
    fn every_rendered_example_file_is_allowed() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut listings = Vec::new();
        let mut dirs = vec![examples.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if dir.ends_with("expected") {
                    listings.push(path);
                }
            }
        }
        assert!(listings.len() >= 4, "{listings:?}");
        let mut files_seen = 0;
        for listing in listings {
            let flavor = listing.file_stem().unwrap().to_str().unwrap().to_owned();
            let text = std::fs::read_to_string(&listing).unwrap();
            let files: Vec<(String, u32)> = text
                .lines()
                .filter_map(|l| l.strip_prefix("==> ")?.strip_suffix(") <=="))
                .map(|l| {
                    let (path, mode) = l.split_once(" (mode ").unwrap();
                    (path.to_owned(), u32::from_str_radix(mode, 8).unwrap())
                })
                .collect();
            let entries: Vec<(&str, &str, u32)> = files
                .iter()
                .map(|(p, m)| (p.as_str(), "content\n", *m))
                .collect();
            files_seen += entries.len();
            let root = tempfile::tempdir().unwrap();
            HostFs::new(root.path())
                .apply(&config_for(&flavor, &entries))
                .unwrap_or_else(|e| panic!("{}: {e}", listing.display()));
        }
        assert!(files_seen > 20, "{files_seen}");
    }
}

mod with_real_containerd {
    use regmirror_core::api::{
        CaRef, Endpoint, EndpointAuth, EndpointTls, RegistryMirror, RegistryMirrorSpec,
    };
    use regmirror_core::node::Flavor;
    use regmirror_core::render::render;
    use regmirror_core::resolve::resolve;
    use regmirror_core::sources::{RefPolicy, SourceKind, SourceObject, Sources};
    use regmirror_testbed::{
        dead_port, oci_layout, push, Containerd, Pki, Registry, RegistryOptions,
    };

    use super::*;

    fn text(pairs: &[(&str, String)]) -> BTreeMap<String, Vec<u8>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone().into_bytes()))
            .collect()
    }

    /// The agent applies configs into a host root; containerd (never restarted) pulls through
    /// whatever is there now. A broken config is rolled back and the old pull path works again.
    #[test]
    fn hot_apply_then_rollback_of_a_broken_config() {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::create(&dir.path().join("pki"));
        let options = RegistryOptions {
            tls: true,
            basic_auth: Some(("puller".into(), "pa55".into())),
            client_certs: false,
        };
        let registry = Registry::start(&dir.path().join("registry"), &pki, options);
        oci_layout(&dir.path().join("image"), "v1", "hello");
        push(
            &dir.path().join("image"),
            "v1",
            &registry,
            "library/hello",
            &pki.dir,
            &dir.path().join("push"),
        );
        let upstream = format!("127.0.0.1:{}", dead_port());
        let image = format!("{upstream}/library/hello:v1");

        let mut sources = Sources::new();
        let basic = SourceObject {
            type_: Some("kubernetes.io/basic-auth".into()),
            data: text(&[("username", "puller".into()), ("password", "pa55".into())]),
            ..SourceObject::default()
        }
        // Any port of the loopback host: the broken config below points at another one.
        .allowing_hosts("127.0.0.1");
        sources.insert(SourceKind::Secret, "ns", "pull", basic);
        sources.insert(
            SourceKind::ConfigMap,
            "ns",
            "ca",
            SourceObject {
                type_: None,
                data: text(&[("ca.crt", pki.pem("ca.crt"))]),
                ..SourceObject::default()
            },
        );
        let render_for = |url: String| {
            let endpoint = Endpoint {
                url,
                auth: Some(EndpointAuth::from_secret("pull")),
                tls: Some(EndpointTls::with_ca(CaRef::from_config_map("ca"))),
            };
            let spec = RegistryMirrorSpec {
                cache: None,
                embedded_registry: false,
                registry: upstream.clone(),
                endpoints: vec![endpoint],
                rewrites: vec![],
                node_selector: None,
            };
            let resolved = resolve(
                &RegistryMirror::new("m", spec),
                &sources,
                &RefPolicy::new("ns"),
            )
            .unwrap();
            render(&[&resolved], &"containerd".parse::<Flavor>().unwrap()).unwrap()
        };

        let root = dir.path().join("host");
        let host = HostFs::new(&root);
        let hosts_dir = root.join("etc/containerd/certs.d");
        let containerd = Containerd::start(&dir.path().join("containerd"));

        host.apply(&render_for(registry.url())).unwrap();
        let pull = containerd.pull(&hosts_dir, &image);
        assert!(pull.ok, "{}", pull.output);
        host.mark_good("good").unwrap();

        host.apply(&render_for(format!("https://127.0.0.1:{}", dead_port())))
            .unwrap();
        let broken = containerd.pull(&hosts_dir, &image);
        assert!(
            !broken.ok && broken.output.contains("connection refused"),
            "{}",
            broken.output
        );

        host.rollback()
            .unwrap()
            .expect("a verified config to return to");
        let pull = containerd.pull(&hosts_dir, &image);
        assert!(pull.ok, "after rollback: {}", pull.output);
    }
}

#[test]
fn cleanup_leaves_the_host_as_it_was_before_regmirror() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    // A hand-written registries.yaml (0640) and someone else's hosts.toml.
    let handwritten = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(handwritten.parent().unwrap()).unwrap();
    std::fs::write(&handwritten, "mirrors: {hand: written}\n").unwrap();
    std::fs::set_permissions(&handwritten, std::fs::Permissions::from_mode(0o640)).unwrap();
    let users_own = root
        .path()
        .join("var/lib/rancher/k3s/agent/etc/containerd/certs.d/quay.io/hosts.toml");
    std::fs::create_dir_all(users_own.parent().unwrap()).unwrap();
    std::fs::write(&users_own, "user's own\n").unwrap();
    host.apply(&old()).unwrap();
    host.mark_good("old").unwrap();
    host.apply(&new()).unwrap();
    assert!(root.path().join("var/lib/regmirror").is_dir());

    let out = Command::new(env!("CARGO_BIN_EXE_regmirror-agent"))
        .arg("--root")
        .arg(root.path())
        .arg("cleanup")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("removed: {}, restored: 1, state deleted", new().files.len())
    );
    for path in new().files.keys().chain(old().files.keys()) {
        if path != REGISTRIES {
            assert_eq!(read(root.path(), path), None, "{path} is gone");
        }
    }
    assert_eq!(
        std::fs::read_to_string(&handwritten).unwrap(),
        "mirrors: {hand: written}\n",
        "the hand-written file is back"
    );
    assert_eq!(mode(root.path(), "/etc/rancher/k3s/registries.yaml"), 0o640);
    assert_eq!(std::fs::read_to_string(&users_own).unwrap(), "user's own\n");
    assert!(
        !root.path().join("var/lib/regmirror").exists(),
        "no state, backups or key left"
    );

    // A second cleanup, or one on a host regmirror never touched, does nothing.
    assert_eq!(host.uninstall().unwrap(), Default::default());
}

#[test]
fn cleanup_after_the_mirrors_were_deleted_still_puts_hand_written_files_back() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let handwritten = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(handwritten.parent().unwrap()).unwrap();
    std::fs::write(&handwritten, "mirrors: {hand: written}\n").unwrap();
    host.apply(&old()).unwrap();
    // Every RegistryMirror deleted: the node runs the empty configuration.
    host.apply(&config(&[])).unwrap();
    assert!(!handwritten.exists());

    let done = host.uninstall().unwrap();
    assert_eq!(done.restored, [REGISTRIES]);
    assert!(done.state_removed);
    assert_eq!(
        std::fs::read_to_string(&handwritten).unwrap(),
        "mirrors: {hand: written}\n"
    );
}

/// The status code of `GET http://<addr><path>`; `None` while nothing answers.
fn status(addr: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `cleanup --hold` on `root`; returns the process once /healthz answers.
fn hold(root: &Path) -> (std::process::Child, String) {
    let addr = format!("127.0.0.1:{}", regmirror_testbed::free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_regmirror-agent"))
        .arg("--root")
        .arg(root)
        .args(["cleanup", "--hold", "--listen", &addr])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status(&addr, "/healthz") != Some(200) {
        assert!(
            std::time::Instant::now() < deadline,
            "cleanup --hold serves /healthz"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    (child, addr)
}

fn terminate(child: std::process::Child) -> std::process::Output {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    child.wait_with_output().unwrap()
}

#[test]
fn cleanup_hold_is_ready_once_the_host_is_clean_and_stays_up_until_sigterm() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    let handwritten = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(handwritten.parent().unwrap()).unwrap();
    std::fs::write(&handwritten, "mirrors: {hand: written}\n").unwrap();
    std::fs::set_permissions(&handwritten, std::fs::Permissions::from_mode(0o640)).unwrap();
    host.apply(&old()).unwrap();

    let (child, addr) = hold(root.path());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while status(&addr, "/readyz") != Some(200) {
        assert!(std::time::Instant::now() < deadline, "Ready after cleanup");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Ready means done: the host is as before regmirror.
    assert_eq!(
        std::fs::read_to_string(&handwritten).unwrap(),
        "mirrors: {hand: written}\n"
    );
    assert_eq!(mode(root.path(), REGISTRIES), 0o640);
    assert_eq!(read(root.path(), HOSTS), None);
    assert_eq!(read(root.path(), CA), None);
    assert!(!root.path().join("var/lib/regmirror").exists());
    // It holds: still up, still Ready, a while later.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(status(&addr, "/readyz"), Some(200));

    let out = terminate(child);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("removed: {}, restored: 1, state deleted", old().files.len())
    );
}

#[test]
fn cleanup_hold_that_fails_says_why_and_stays_not_ready() {
    let root = tempfile::tempdir().unwrap();
    let host = HostFs::new(root.path());
    host.apply(&old()).unwrap();
    // A link planted where regmirror keeps its backups: cleanup refuses to go through it.
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        elsewhere.path(),
        root.path().join("var/lib/regmirror/backup"),
    )
    .unwrap();

    let (child, addr) = hold(root.path());
    for _ in 0..10 {
        assert_eq!(status(&addr, "/readyz"), Some(503), "not Ready");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(status(&addr, "/healthz"), Some(200), "alive");
    let out = terminate(child);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("cleanup failed")
            && stderr.contains("regmirror never writes or reads through links"),
        "{stderr}"
    );
    assert!(
        root.path().join("var/lib/regmirror").is_dir(),
        "the state stays for another try"
    );
}
