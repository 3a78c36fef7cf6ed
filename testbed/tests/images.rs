//! The release images, built without Docker by `testbed/images/build` (umoci and skopeo from
//! Debian, no base image pulled): each runs in a real containerd with `ctr run`, as the user the
//! Dockerfile names, with every shared library it needs; and the images say what the
//! Dockerfile's targets say (user, workdir, entrypoint, cmd, copied files).

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use regmirror_testbed::{require_tool, Containerd};

/// An image the build script made.
struct Image {
    /// Its tag in the OCI layout.
    tag: String,
    /// The name it is imported under.
    reference: String,
    archive: PathBuf,
}

struct Images {
    dir: PathBuf,
    images: BTreeMap<String, Image>,
}

impl Images {
    fn get(&self, tag: &str) -> &Image {
        self.images
            .get(tag)
            .unwrap_or_else(|| panic!("testbed/images/build made no image {tag}"))
    }

    fn layout(&self) -> PathBuf {
        self.dir.join("oci")
    }

    /// The image's config (`config` of the OCI image config), as skopeo reads it.
    fn config(&self, tag: &str) -> serde_json::Value {
        let full = skopeo_json(&[
            "inspect",
            "--config",
            &format!("oci:{}:{tag}", self.layout().display()),
        ]);
        full["config"].clone()
    }

    /// The image's files: path (without a leading `/` or `./`) → (mode, uid, contents when a
    /// regular file), read from its layers with `tar`.
    fn files(&self, tag: &str) -> BTreeMap<String, (u32, u32, Option<Vec<u8>>)> {
        let manifest = skopeo_json(&[
            "inspect",
            "--raw",
            &format!("oci:{}:{tag}", self.layout().display()),
        ]);
        let unpacked = tempfile::tempdir().unwrap();
        for layer in manifest["layers"].as_array().expect("layers") {
            let digest = layer["digest"].as_str().unwrap();
            let blob = self
                .layout()
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:"));
            ok(Command::new("tar")
                .arg("-xzf")
                .arg(&blob)
                .arg("--numeric-owner")
                .arg("-C")
                .arg(unpacked.path()));
        }
        let mut files = BTreeMap::new();
        walk(unpacked.path(), unpacked.path(), &mut files);
        files
    }
}

fn walk(root: &Path, dir: &Path, files: &mut BTreeMap<String, (u32, u32, Option<Vec<u8>>)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let name = path.strip_prefix(root).unwrap().display().to_string();
        let contents = meta.is_file().then(|| std::fs::read(&path).unwrap());
        files.insert(name, (meta.mode(), meta.uid(), contents));
        if meta.is_dir() {
            walk(root, &path, files);
        }
    }
}

fn ok(command: &mut Command) -> std::process::Output {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn skopeo_json(args: &[&str]) -> serde_json::Value {
    require_tool("skopeo");
    serde_json::from_slice(&ok(Command::new("skopeo").args(args)).stdout).unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

/// Runs the build script once per test process (it keeps its output and rebuilds only what
/// changed; a lock makes parallel processes wait for the first).
fn images() -> &'static Images {
    static IMAGES: OnceLock<Images> = OnceLock::new();
    IMAGES.get_or_init(|| {
        let dir = regmirror_testbed::run_build_script(&repo().join("testbed/images/build"));
        let listing = std::fs::read_to_string(dir.join("images.txt")).unwrap();
        let images = listing
            .lines()
            .map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                assert_eq!(fields.len(), 3, "images.txt line {line:?}");
                let image = Image {
                    tag: fields[0].into(),
                    reference: fields[1].into(),
                    archive: fields[2].into(),
                };
                (image.tag.clone(), image)
            })
            .collect();
        Images { dir, images }
    })
}

/// The release binary the images were packed from.
fn release_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    target.join("release").join(name)
}

/// One target of the Dockerfile: what it states.
#[derive(Debug, Default)]
struct Target {
    user: Option<String>,
    workdir: Option<String>,
    entrypoint: Option<Vec<String>>,
    cmd: Option<Vec<String>>,
    /// `COPY --from=build <source> <destination>`: destination → source.
    copies: BTreeMap<String, String>,
}

/// The Dockerfile's stages by name, with the instructions the images must agree with. Any
/// other instruction in a release target fails the parse: the check would not cover it.
fn dockerfile_targets(text: &str) -> BTreeMap<String, Target> {
    let mut targets = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instruction, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let rest = rest.trim();
        let exec_form = |what: &str| -> Vec<String> {
            serde_json::from_str(rest).unwrap_or_else(|e| {
                panic!("Dockerfile: {what} {rest} is not in exec (JSON) form: {e}")
            })
        };
        match instruction.to_ascii_uppercase().as_str() {
            "FROM" => {
                let words: Vec<&str> = rest.split_whitespace().collect();
                let name = match words.as_slice() {
                    [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                    _ => panic!("Dockerfile: every stage needs a name: FROM {rest}"),
                };
                targets.insert(name.clone(), Target::default());
                current = Some(name);
            }
            other => {
                let name = current.as_ref().expect("an instruction before FROM");
                if name == "build" {
                    continue;
                }
                let target = targets.get_mut(name).unwrap();
                match other {
                    "USER" => target.user = Some(rest.into()),
                    "WORKDIR" => target.workdir = Some(rest.into()),
                    "ENTRYPOINT" => target.entrypoint = Some(exec_form("ENTRYPOINT")),
                    "CMD" => target.cmd = Some(exec_form("CMD")),
                    "COPY" => {
                        let words: Vec<&str> = rest.split_whitespace().collect();
                        match words.as_slice() {
                            ["--from=build", source, destination] => {
                                target
                                    .copies
                                    .insert(destination.to_string(), source.to_string());
                            }
                            _ => panic!("Dockerfile ({name}): COPY {rest}: only `COPY --from=build <file> <file>` is checked against testbed/images/build"),
                        }
                    }
                    _ => panic!("Dockerfile ({name}): {line}: testbed/images/build and this test know nothing of {other}; teach them"),
                }
            }
        }
    }
    targets
}

fn strings(value: &serde_json::Value) -> Option<Vec<String>> {
    value.as_array().map(|items| {
        items
            .iter()
            .map(|s| s.as_str().unwrap().to_owned())
            .collect()
    })
}

#[test]
fn the_images_say_what_the_dockerfile_says() {
    let text = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let targets = dockerfile_targets(&text);
    let images = images();
    let pairs = [("operator", "regmirror"), ("agent", "regmirror-agent")];
    assert_eq!(
        targets
            .keys()
            .filter(|t| *t != "build")
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        pairs.iter().map(|(t, _)| *t).collect(),
        "the Dockerfile's release targets changed: testbed/images/build builds operator and agent"
    );
    let mut differences = Vec::new();
    for (target_name, tag) in pairs {
        let target = &targets[target_name];
        let config = images.config(tag);
        let files = images.files(tag);
        let mut differ = |what: &str, dockerfile: String, image: String| {
            if dockerfile != image {
                differences.push(format!(
                    "{what} of target {target_name} / image {tag}: Dockerfile {dockerfile}, testbed/images/build {image}"
                ));
            }
        };
        // Everything the release images depend on is stated, not left to the base image.
        for (what, stated) in [
            ("USER", target.user.is_some()),
            ("WORKDIR", target.workdir.is_some()),
            ("ENTRYPOINT", target.entrypoint.is_some()),
            ("CMD", target.cmd.is_some()),
        ] {
            assert!(
                stated,
                "Dockerfile target {target_name} states no {what}: the check needs it explicit"
            );
        }
        differ(
            "USER",
            format!("{:?}", target.user),
            format!("{:?}", config["User"].as_str()),
        );
        differ(
            "WORKDIR",
            format!("{:?}", target.workdir),
            format!("{:?}", config["WorkingDir"].as_str()),
        );
        differ(
            "ENTRYPOINT",
            format!("{:?}", target.entrypoint),
            format!("{:?}", strings(&config["Entrypoint"])),
        );
        differ(
            "CMD",
            format!("{:?}", target.cmd),
            format!("{:?}", strings(&config["Cmd"])),
        );
        assert!(
            !target.copies.is_empty(),
            "target {target_name} copies nothing"
        );
        for (destination, source) in &target.copies {
            let binary = source
                .strip_prefix("/src/target/release/")
                .unwrap_or_else(|| {
                    panic!("Dockerfile ({target_name}): COPY of {source}, not a release binary")
                });
            let release = std::fs::read(release_binary(binary)).unwrap();
            match files.get(destination.trim_start_matches('/')) {
                None => differ(
                    "COPY",
                    format!("{source} to {destination}"),
                    "no such file".into(),
                ),
                Some((mode, _, contents)) => {
                    differ(
                        &format!("{destination} executable"),
                        "true".into(),
                        (mode & 0o111 == 0o111).to_string(),
                    );
                    differ(
                        &format!("{destination} contents"),
                        format!("target/release/{binary}"),
                        if contents.as_deref() == Some(release.as_slice()) {
                            format!("target/release/{binary}")
                        } else {
                            "another file".into()
                        },
                    );
                }
            }
        }
    }
    assert!(
        differences.is_empty(),
        "the images and the Dockerfile differ:\n{}",
        differences.join("\n")
    );
}

#[test]
fn the_dockerfile_check_names_a_difference() {
    // The parser reads what the check compares: a changed USER is seen as that.
    let targets = dockerfile_targets(
        "FROM rust AS build\nRUN x\nFROM base AS operator\nCOPY --from=build /src/target/release/regmirror /usr/local/bin/regmirror\nUSER 1000:1000\nWORKDIR /w\nENTRYPOINT [\"/usr/local/bin/regmirror\"]\nCMD [\"controller\"]\n",
    );
    let operator = &targets["operator"];
    assert_eq!(operator.user.as_deref(), Some("1000:1000"));
    assert_eq!(operator.workdir.as_deref(), Some("/w"));
    assert_eq!(
        operator.entrypoint.as_deref(),
        Some(&["/usr/local/bin/regmirror".to_string()][..])
    );
    assert_eq!(
        operator.copies["/usr/local/bin/regmirror"],
        "/src/target/release/regmirror"
    );
    let unknown = std::panic::catch_unwind(|| {
        dockerfile_targets("FROM a AS build\nFROM b AS agent\nRUN apt-get install -y curl\n")
    });
    assert!(
        unknown.is_err(),
        "an instruction the check does not know must fail it"
    );
}

/// Every image's own files: the binaries' shared libraries are in it (ldd in the image's root
/// finds them all), the users the configs name exist.
#[test]
fn the_images_hold_what_their_binaries_need() {
    let images = images();
    let operator = images.files("regmirror");
    let (mode, uid, _) = operator["home/nonroot"];
    assert_eq!((uid, mode & 0o777), (65532, 0o700), "/home/nonroot");
    let passwd = String::from_utf8(operator["etc/passwd"].2.clone().unwrap()).unwrap();
    assert!(
        passwd.contains("nonroot:x:65532:65532:"),
        "operator /etc/passwd:\n{passwd}"
    );
    let agent = images.files("regmirror-agent");
    assert!(
        agent.contains_key("bin/sh") && agent.contains_key("bin/busybox"),
        "the agent image has no /bin/sh (a restart command runs with sh -c)"
    );
    let pause = images.files("pause");
    assert_eq!(
        pause.keys().collect::<Vec<_>>(),
        ["pause"],
        "the pause image holds one file"
    );
    // The pull-through cache's registry, as the operator's Deployment runs it: non-root (its
    // namespace is Pod Security restricted), `serve <config>` as arguments to the entrypoint.
    let registry = images.config("registry");
    assert_eq!(registry["User"], "65532:65532", "{registry}");
    assert_eq!(
        registry["Entrypoint"],
        serde_json::json!(["/bin/registry"]),
        "{registry}"
    );
    let files = images.files("registry");
    assert!(files.contains_key("bin/registry"), "{:?}", files.keys());
}

/// A container of an image, run with `ctr run` in the foreground.
struct Running {
    id: String,
    child: std::process::Child,
}

impl Running {
    fn start(
        containerd: &Containerd,
        image: &Image,
        id: &str,
        mounts: &[(&Path, &str)],
        args: &[&str],
    ) -> Running {
        let mut ctr = containerd.ctr();
        ctr.args(["run", "--rm"]);
        for (source, destination) in mounts {
            ctr.arg("--mount").arg(format!(
                "type=bind,src={},dst={destination},options=rbind:rw",
                source.display()
            ));
        }
        ctr.arg(&image.reference).arg(id).args(args);
        let child = ctr
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ctr run");
        Running {
            id: id.into(),
            child,
        }
    }

    /// The host pid of the container's process once it runs.
    fn pid(&mut self, containerd: &Containerd) -> u32 {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let tasks = ok(containerd.ctr().args(["tasks", "ls"]));
            let tasks = String::from_utf8_lossy(&tasks.stdout).to_string();
            let running = tasks.lines().find_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                (fields.len() == 3 && fields[0] == self.id && fields[2] == "RUNNING")
                    .then(|| fields[1].parse::<u32>().unwrap())
            });
            if let Some(pid) = running {
                return pid;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                let output = self.finish_output();
                panic!(
                    "container {} ended ({status}) before it ran:\n{output}",
                    self.id
                );
            }
            assert!(
                Instant::now() < deadline,
                "container {} is not running:\n{tasks}",
                self.id
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn finish_output(&mut self) -> String {
        let mut text = String::new();
        use std::io::Read;
        if let Some(mut out) = self.child.stdout.take() {
            out.read_to_string(&mut text).unwrap();
        }
        if let Some(mut err) = self.child.stderr.take() {
            err.read_to_string(&mut text).unwrap();
        }
        text
    }

    /// Waits (at most 30 s) for `ctr run` to end; its exit status and output.
    fn wait(mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let output = self.finish_output();
                return (status, output);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("container {} did not end within 30 s", self.id);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A field of /proc/<pid>/status, e.g. `Uid` → the real, effective, saved and fs ids.
fn proc_status(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|id| id.parse().unwrap())
        .collect()
}

fn mkfifo(path: &Path) {
    ok(Command::new("mkfifo").arg("-m").arg("0666").arg(path));
}

fn feed(fifo: &Path, content: &str) {
    // Opening blocks until the container's process opened it for reading, which it has.
    let mut writer = std::fs::OpenOptions::new().write(true).open(fifo).unwrap();
    writer.write_all(content.as_bytes()).unwrap();
}

fn containerd_with(tags: &[&str]) -> (tempfile::TempDir, Containerd) {
    let images = images();
    let dir = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&dir.path().join("containerd"));
    for tag in tags {
        containerd.import(&images.get(tag).archive);
    }
    (dir, containerd)
}

/// The image's own command (entrypoint and cmd, no arguments from here): the binary starts
/// and its subcommand asks for the arguments the chart passes through the environment; then
/// `<binary> --help` runs (ctr 1.6 replaces the whole command line when given arguments).
fn starts(containerd: &Containerd, image: &Image, binary: &str, subcommand: &str) {
    let (status, output) = Running::start(
        containerd,
        image,
        &format!("{}-default", image.tag),
        &[],
        &[],
    )
    .wait();
    assert!(
        status.code() == Some(2) && output.contains(&format!("Usage: {binary} {subcommand} --")),
        "{} with its own command: want `{binary} {subcommand}` refusing to run without its \
         arguments (exit 2), got {status}:\n{output}",
        image.reference
    );
    let path = format!("/usr/local/bin/{binary}");
    let (status, output) = Running::start(
        containerd,
        image,
        &format!("{}-help", image.tag),
        &[],
        &[&path, "--help"],
    )
    .wait();
    assert!(
        status.success() && output.contains(&format!("Usage: {binary}")),
        "{binary} --help in {} ({status}):\n{output}",
        image.reference
    );
}

#[test]
fn the_operator_image_runs_as_nonroot_with_its_libraries() {
    let images = images();
    let image = images.get("regmirror");
    assert_eq!(
        image.reference,
        format!("ghcr.io/regmirror/regmirror:{}", env!("CARGO_PKG_VERSION"))
    );
    let (dir, containerd) = containerd_with(&["regmirror"]);
    // Starts: the dynamic loader found every library in the image.
    starts(&containerd, image, "regmirror", "controller");

    // `regmirror validate` on a FIFO: it waits there, running as the image's user, until fed.
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::set_permissions(&input, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let fifo = input.join("mirror.yaml");
    mkfifo(&fifo);
    let mut running = Running::start(
        &containerd,
        image,
        "operator-validate",
        &[(&input, "/in")],
        &["/usr/local/bin/regmirror", "validate", "/in/mirror.yaml"],
    );
    let pid = running.pid(&containerd);
    assert_eq!(proc_status(pid, "Uid"), [65532; 4], "the operator's uids");
    assert_eq!(proc_status(pid, "Gid"), [65532; 4], "the operator's gids");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert!(
        cwd.ends_with("home/nonroot"),
        "the operator's working directory: {}",
        cwd.display()
    );
    feed(
        &fifo,
        "apiVersion: regmirror.io/v1alpha1\nkind: RegistryMirror\nmetadata:\n  name: docker-hub\nspec:\n  registry: docker.io\n  endpoints:\n    - url: https://mirror.example.com\n",
    );
    let (status, output) = running.wait();
    assert!(
        status.success(),
        "regmirror validate in the image ({status}):\n{output}"
    );
}

#[test]
fn the_agent_image_runs_as_root_with_sh_and_writes_host_files() {
    let images = images();
    let image = images.get("regmirror-agent");
    assert_eq!(
        image.reference,
        format!(
            "ghcr.io/regmirror/regmirror-agent:{}",
            env!("CARGO_PKG_VERSION")
        )
    );
    let (dir, containerd) = containerd_with(&["regmirror-agent"]);
    starts(&containerd, image, "regmirror-agent", "run");

    // `regmirror-agent --root /host apply` of a config read from a FIFO, the host root a
    // directory of this test: while it waits, its user and its sh are looked at.
    let input = dir.path().join("in");
    let host = dir.path().join("host");
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&host).unwrap();
    let fifo = input.join("config.json");
    mkfifo(&fifo);
    let mut running = Running::start(
        &containerd,
        image,
        "agent-apply",
        &[(&input, "/in"), (&host, "/host")],
        &[
            "/usr/local/bin/regmirror-agent",
            "--root",
            "/host",
            "apply",
            "/in/config.json",
        ],
    );
    let pid = running.pid(&containerd);
    assert_eq!(proc_status(pid, "Uid"), [0; 4], "the agent's uids");
    assert_eq!(proc_status(pid, "Gid"), [0; 4], "the agent's gids");
    // A restart command runs with `sh -c` in the agent's container, as its user.
    let exec = ok(containerd.ctr().args([
        "tasks",
        "exec",
        "--exec-id",
        "sh",
        "agent-apply",
        "/bin/sh",
        "-c",
        "echo uid=$(id -u) gid=$(id -g) pwd=$(pwd); command -v nsenter",
    ]));
    let said = String::from_utf8_lossy(&exec.stdout);
    assert!(
        said.starts_with("uid=0 gid=0 pwd=/\n") && said.contains("nsenter"),
        "sh in the agent image said:\n{said}"
    );
    let hosts_toml = "/etc/containerd/certs.d/docker.io/hosts.toml";
    let content = "server = \"https://registry-1.docker.io\"\n\n[host.\"https://mirror.example.com\"]\n  capabilities = [\"pull\", \"resolve\"]\n";
    let config = serde_json::json!({
        "flavor": "containerd",
        "files": {hosts_toml: {"mode": 0o644, "content": content}},
        "restartKey": "images-test",
    });
    feed(&fifo, &config.to_string());
    let (status, output) = running.wait();
    assert!(
        status.success(),
        "regmirror-agent apply in the image ({status}):\n{output}"
    );
    let written = host.join(hosts_toml.trim_start_matches('/'));
    assert_eq!(
        std::fs::read_to_string(&written)
            .unwrap_or_else(|e| panic!("{}: {e}\nagent said:\n{output}", written.display())),
        content
    );
    assert_eq!(
        std::fs::metadata(&written).unwrap().uid(),
        0,
        "owner of the written file"
    );
}

#[test]
fn the_pause_image_waits_and_stops_on_sigterm() {
    let images = images();
    let image = images.get("pause");
    let (_dir, containerd) = containerd_with(&["pause"]);
    let mut running = Running::start(&containerd, image, "pause", &[], &[]);
    // (no arguments: the image's own entrypoint, /pause)
    let pid = running.pid(&containerd);
    assert_eq!(
        proc_status(pid, "Uid"),
        [65535; 4],
        "the pause process's uids"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        running.child.try_wait().unwrap().is_none(),
        "pause ended on its own"
    );
    let sent = Instant::now();
    ok(containerd
        .ctr()
        .args(["tasks", "kill", "--signal", "SIGTERM", "pause"]));
    let (status, output) = running.wait();
    assert!(
        status.success(),
        "pause after SIGTERM ({status}):\n{output}"
    );
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "pause took {:?} to stop on SIGTERM",
        sent.elapsed()
    );
}
