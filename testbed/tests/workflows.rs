//! The GitHub Actions workflows under .github/workflows pass actionlint (built from the Go
//! module proxy at the version pinned in testbed/tools/go.mod by testbed/tools/build), and the
//! release workflow publishes what the chart and the README install.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn actionlint() -> PathBuf {
    regmirror_testbed::go_tool("actionlint")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn workflows() -> Vec<PathBuf> {
    let dir = repo().join(".github/workflows");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "yml" || ext == "yaml")
        })
        .collect();
    files.sort();
    files
}

#[test]
fn every_workflow_passes_actionlint() {
    let actionlint = actionlint();
    let files = workflows();
    assert!(
        files.iter().any(|f| f.ends_with("release.yml")),
        "no release workflow in .github/workflows: {files:?}"
    );
    let output = Command::new(&actionlint)
        .arg("-no-color")
        .args(&files)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "actionlint found problems in .github/workflows ({}):\n{}",
        output.status,
        text(&output)
    );
}

#[test]
fn actionlint_finds_a_broken_workflow() {
    // The linter really reads what it is given: an unknown job key and a bad expression fail.
    let broken = "on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    step:\n      - run: echo ${{ github.no_such_thing }}\n";
    let mut child = Command::new(actionlint())
        .args(["-no-color", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(broken.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    let said = text(&output);
    assert!(
        !output.status.success() && said.contains("step"),
        "actionlint passed a broken workflow ({}):\n{said}",
        output.status
    );
}

#[test]
fn the_release_publishes_what_the_chart_and_readme_install() {
    let release = std::fs::read_to_string(repo().join(".github/workflows/release.yml")).unwrap();
    let values = std::fs::read_to_string(repo().join("charts/regmirror/values.yaml")).unwrap();
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    // The chart's default images are the ones the workflow pushes, built from the Dockerfile
    // target of the same role.
    for (image, target) in [("regmirror", "operator"), ("regmirror-agent", "agent")] {
        assert!(
            values.contains(&format!("repository: ghcr.io/regmirror/{image}\n")),
            "charts/regmirror/values.yaml does not default to ghcr.io/regmirror/{image}"
        );
        assert!(
            release.contains(&format!("- image: {image}\n            target: {target}\n")),
            "release.yml does not build {image} from the Dockerfile target {target}"
        );
    }
    assert!(release.contains("IMAGE_PREFIX: ghcr.io/regmirror\n"));
    assert!(release.contains("platforms: linux/amd64,linux/arm64\n"));
    assert!(release.contains("CHART_REPOSITORY: oci://ghcr.io/regmirror/charts\n"));
    assert!(
        readme.contains("helm install regmirror oci://ghcr.io/regmirror/charts/regmirror "),
        "README.md does not install the chart the release pushes (oci://ghcr.io/regmirror/charts/regmirror)"
    );
}
