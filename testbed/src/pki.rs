//! A throwaway PKI made with openssl: a CA, a server certificate for 127.0.0.1, a client
//! certificate for mutual TLS.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::{require_tool, run_ok};

/// PEM files of a test PKI.
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    /// Creates the CA and both certificates under `dir`.
    pub fn create(dir: &Path) -> Pki {
        require_tool("openssl");
        std::fs::create_dir_all(dir).unwrap();
        let openssl = |args: &[&str]| run_ok(Command::new("openssl").args(args).current_dir(dir));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=regmirror test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
        ]);
        for (name, cn, ext) in [
            ("server", "127.0.0.1", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"),
            ("client", "regmirror node", "extendedKeyUsage=clientAuth\nbasicConstraints=CA:FALSE\n"),
        ] {
            std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
            openssl(&["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", &format!("/CN={cn}"),
                "-keyout", &format!("{name}.key"), "-out", &format!("{name}.csr")]);
            openssl(&["x509", "-req", "-in", &format!("{name}.csr"), "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-out", &format!("{name}.crt"), "-extfile", &format!("{name}.ext")]);
        }
        Pki {
            dir: dir.to_owned(),
        }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A file's PEM text.
    pub fn pem(&self, file: &str) -> String {
        std::fs::read_to_string(self.path(file)).unwrap()
    }
}
