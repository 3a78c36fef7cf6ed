//! Holds a testbed control plane for a person (see `scripts/dev-cluster`).
//!
//! `dev-cluster run <dir>` starts etcd, kube-apiserver and kube-controller-manager with their
//! files in `<dir>`, writes `<dir>/pids` once the cluster is ready, prints
//! `export KUBECONFIG=<dir>/admin.kubeconfig`, and runs until SIGTERM, SIGINT or SIGHUP, when it
//! stops the cluster. If this process is killed outright, the cluster's watchdog stops it.

use std::path::PathBuf;

use regmirror_testbed::ControlPlane;
use tokio::signal::unix::{signal, SignalKind};

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(command), Some(dir), None) = (args.next(), args.next(), args.next()) else {
        usage();
    };
    if command != "run" {
        usage();
    }
    let dir = PathBuf::from(dir);
    let plane = ControlPlane::start_in(&dir);
    let pids: String = plane.pids().iter().map(|pid| format!("{pid}\n")).collect();
    let pids_file = dir.join("pids");
    std::fs::write(dir.join("pids.new"), pids).unwrap();
    std::fs::rename(dir.join("pids.new"), &pids_file).unwrap();
    println!("export KUBECONFIG={}", plane.kubeconfig_path().display());

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let mut term = signal(SignalKind::terminate()).unwrap();
            let mut int = signal(SignalKind::interrupt()).unwrap();
            let mut hup = signal(SignalKind::hangup()).unwrap();
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {}
            }
        });
    drop(plane);
    let _ = std::fs::remove_file(pids_file);
    eprintln!("dev-cluster: stopped");
}

fn usage() -> ! {
    eprintln!("usage: dev-cluster run <dir>");
    std::process::exit(2);
}
