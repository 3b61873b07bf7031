//! A throw-away PKI made with `openssl`: certificate authorities, a server certificate
//! for 127.0.0.1 and client certificates, laid out as libnbd (`tls-certificates=DIR`)
//! and QEMU (`tls-creds-x509,dir=DIR`) expect a client's directory: `ca-cert.pem`,
//! `client-cert.pem`, `client-key.pem`.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `openssl ARGS` in `dir`; panics with its error output if it fails.
pub fn openssl(args: &[&str], dir: &Path) {
    let o = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("this test needs openssl: run scripts/setup.sh");
    assert!(
        o.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A certificate authority in its own directory (`ca-cert.pem`, `ca-key.pem`).
pub struct Ca {
    pub dir: PathBuf,
}

impl Ca {
    /// A new CA named `name` in `root/name`.
    pub fn new(root: &Path, name: &str) -> Ca {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "2",
                "-subj",
                &format!("/CN=mbank test CA {name}"),
            ],
            &dir,
        );
        Ca { dir }
    }

    pub fn cert(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// Issues `{prefix}-cert.pem` and `{prefix}-key.pem` into `dir`.
    fn issue(&self, dir: &Path, prefix: &str, cn: &str, ext: &str) {
        fs::create_dir_all(dir).unwrap();
        let key = format!("{prefix}-key.pem");
        let csr = format!("{prefix}.csr");
        let cert = format!("{prefix}-cert.pem");
        let extfile = format!("{prefix}.ext");
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &format!("/CN={cn}"),
            ],
            dir,
        );
        fs::write(dir.join(&extfile), ext).unwrap();
        let ca_cert = self.cert().display().to_string();
        let ca_key = self.dir.join("ca-key.pem").display().to_string();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_cert,
                "-CAkey",
                &ca_key,
                "-set_serial",
                "2",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &extfile,
            ],
            dir,
        );
    }

    /// A server certificate for 127.0.0.1 and localhost: `server-cert.pem` and
    /// `server-key.pem` in `dir`.
    pub fn server(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.issue(
            dir,
            "server",
            "127.0.0.1",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        );
        (dir.join("server-cert.pem"), dir.join("server-key.pem"))
    }

    /// A server certificate for the address `ip` (and 127.0.0.1, localhost):
    /// `server-cert.pem` and `server-key.pem` in `dir`.
    pub fn server_for(&self, dir: &Path, ip: &str) -> (PathBuf, PathBuf) {
        self.issue(
            dir,
            "server",
            ip,
            &format!(
                "subjectAltName=IP:{ip},IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
                 keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
            ),
        );
        (dir.join("server-cert.pem"), dir.join("server-key.pem"))
    }

    /// A client's directory `root/name` trusting `server_ca`, with no client certificate.
    pub fn client_dir(server_ca: &Ca, root: &Path, name: &str) -> PathBuf {
        let dir = root.join(name);
        fs::create_dir_all(&dir).unwrap();
        fs::copy(server_ca.cert(), dir.join("ca-cert.pem")).unwrap();
        dir
    }

    /// Like [`Ca::client_dir`], with a client certificate issued by this CA.
    pub fn client_dir_with_cert(&self, server_ca: &Ca, root: &Path, name: &str) -> PathBuf {
        let dir = Ca::client_dir(server_ca, root, name);
        self.issue(
            &dir,
            "client",
            name,
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=clientAuth\n",
        );
        dir
    }
}
