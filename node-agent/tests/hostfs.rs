//! The agent's host writes: ownership, backups, idempotence, rollback, crash safety (by killing
//! the agent between steps), and a real containerd reading what it wrote.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use regmirror_core::render::{RenderedConfig, RenderedFile};
use regmirror_node_agent::hostfs::HostFs;

fn config(files: &[(&str, &str, u32)]) -> RenderedConfig {
    RenderedConfig {
        flavor: "k3s".into(),
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
    host.mark_good().unwrap();
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
        };
        sources.insert(SourceKind::Secret, "ns", "pull", basic);
        sources.insert(
            SourceKind::ConfigMap,
            "ns",
            "ca",
            SourceObject {
                type_: None,
                data: text(&[("ca.crt", pki.pem("ca.crt"))]),
            },
        );
        let render_for = |url: String| {
            let endpoint = Endpoint {
                url,
                auth: Some(EndpointAuth::from_secret("pull")),
                tls: Some(EndpointTls::with_ca(CaRef::from_config_map("ca"))),
            };
            let spec = RegistryMirrorSpec {
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
        host.mark_good().unwrap();

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
