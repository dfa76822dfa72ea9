//! The etcd client flags shared by the commands that talk to etcd (`tenax daemon`,
//! `tenax status`): TLS to etcd (`--etcd-ca`, `--etcd-cert`, `--etcd-key`) and etcd's
//! username/password authentication (`--etcd-user`), and [`EtcdClientArgs::apply`], which
//! reads the files and fills an [`EtcdConfig`].
//!
//! The password never comes from a flag (a flag's value shows in `ps` and in shell
//! history): it is read from the environment variable [`PASSWORD_ENV`]
//! (`TENAX_ETCD_PASSWORD`) or from the file named by `--etcd-password-file`. Every error
//! is one line that names the flag and the file.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Result};
use tenax_cluster::etcd::{EtcdAuth, EtcdConfig, EtcdTls};

/// The environment variable that holds the etcd user's password.
pub const PASSWORD_ENV: &str = "TENAX_ETCD_PASSWORD";

/// Flags for etcd over TLS with client certificates and with authentication. All unset:
/// plain `http://` etcd without users, as before.
#[derive(clap::Args, Debug, Default, Clone, PartialEq, Eq)]
pub struct EtcdClientArgs {
    /// CA certificate (PEM) that signed etcd's server certificate; needed with https://
    /// etcd endpoints (only this CA is trusted).
    #[arg(long = "etcd-ca", env = "TENAX_ETCD_CA", value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) shown to etcd, for an etcd started with
    /// --client-cert-auth; goes with --etcd-key.
    #[arg(long = "etcd-cert", env = "TENAX_ETCD_CERT", value_name = "FILE")]
    pub etcd_cert: Option<PathBuf>,
    /// Private key (PEM) of --etcd-cert.
    #[arg(long = "etcd-key", env = "TENAX_ETCD_KEY", value_name = "FILE")]
    pub etcd_key: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled; the password comes from
    /// TENAX_ETCD_PASSWORD or --etcd-password-file (never from a flag).
    #[arg(long = "etcd-user", env = "TENAX_ETCD_USER", value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// File holding the password of --etcd-user (the whole file; one trailing newline is
    /// ignored). Instead, the password may be in TENAX_ETCD_PASSWORD.
    #[arg(long = "etcd-password-file", value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdClientArgs {
    /// Fills every field still unset from `other` (flags win over a config file).
    pub fn fill_unset(&mut self, other: EtcdClientArgs) {
        self.etcd_ca = self.etcd_ca.take().or(other.etcd_ca);
        self.etcd_cert = self.etcd_cert.take().or(other.etcd_cert);
        self.etcd_key = self.etcd_key.take().or(other.etcd_key);
        self.etcd_user = self.etcd_user.take().or(other.etcd_user);
        self.etcd_password_file = self.etcd_password_file.take().or(other.etcd_password_file);
    }

    /// Reads the files named by the flags (and [`PASSWORD_ENV`]) and sets
    /// [`EtcdConfig::tls`] and [`EtcdConfig::auth`]; leaves them as they are when no flag
    /// is given. Whether the endpoints' scheme fits (`https://` with TLS) is checked when
    /// the config is used ([`tenax_cluster::etcd::EtcdMembership::connect`]).
    ///
    /// # Errors
    /// One line naming the flag and the file: a file that cannot be read or holds no PEM
    /// certificate or key, a certificate without its key (or the reverse), a user without
    /// a password, a password without a user, or the password given twice.
    pub fn apply(&self, config: &mut EtcdConfig) -> Result<()> {
        self.apply_with_password_env(config, std::env::var_os(PASSWORD_ENV))
    }

    /// [`EtcdClientArgs::apply`] with the value of [`PASSWORD_ENV`] passed in (tests do not
    /// touch the process environment).
    fn apply_with_password_env(
        &self,
        config: &mut EtcdConfig,
        password_env: Option<OsString>,
    ) -> Result<()> {
        if let Some(tls) = self.tls()? {
            config.tls = Some(tls);
        }
        if let Some(auth) = self.auth(password_env)? {
            config.auth = Some(auth);
        }
        Ok(())
    }

    /// The TLS settings from `--etcd-ca`, `--etcd-cert` and `--etcd-key`, if any is given.
    fn tls(&self) -> Result<Option<EtcdTls>> {
        let ca_path = match (&self.etcd_ca, &self.etcd_cert, &self.etcd_key) {
            (None, None, None) => return Ok(None),
            (Some(ca), _, _) => ca,
            (None, _, _) => bail!(
                "--etcd-cert/--etcd-key without --etcd-ca: give the CA certificate that signed \
                 etcd's server certificate"
            ),
        };
        let ca = read("--etcd-ca", ca_path)?;
        EtcdTls::check_certificates(&ca).map_err(|e| file_error("--etcd-ca", ca_path, &e))?;
        let mut tls = EtcdTls::new(ca);
        match (&self.etcd_cert, &self.etcd_key) {
            (None, None) => {}
            (Some(cert_path), Some(key_path)) => {
                let cert = read("--etcd-cert", cert_path)?;
                EtcdTls::check_certificates(&cert)
                    .map_err(|e| file_error("--etcd-cert", cert_path, &e))?;
                let key = read("--etcd-key", key_path)?;
                EtcdTls::check_private_key(&key)
                    .map_err(|e| file_error("--etcd-key", key_path, &e))?;
                tls = tls.with_client_cert(cert, key);
            }
            (Some(cert_path), None) => bail!(
                "--etcd-cert {}: no --etcd-key: give the client certificate's private key too",
                cert_path.display()
            ),
            (None, Some(key_path)) => bail!(
                "--etcd-key {}: no --etcd-cert: give the client certificate too",
                key_path.display()
            ),
        }
        Ok(Some(tls))
    }

    /// The user and password from `--etcd-user` and the password's one source, if a user
    /// is given.
    fn auth(&self, password_env: Option<OsString>) -> Result<Option<EtcdAuth>> {
        let from_file = match &self.etcd_password_file {
            Some(path) => Some((read_password(path)?, path)),
            None => None,
        };
        let from_env = match password_env {
            Some(v) => Some(v.into_string().map_err(|_| {
                anyhow!("{PASSWORD_ENV}: not UTF-8: etcd passwords are UTF-8 text")
            })?),
            None => None,
        };
        let Some(user) = &self.etcd_user else {
            if let Some((_, path)) = from_file {
                bail!(
                    "--etcd-password-file {}: no --etcd-user: name the etcd user too",
                    path.display()
                );
            }
            // A password in the environment without a user is ignored: the variable may
            // be set for another command.
            return Ok(None);
        };
        if user.is_empty() {
            bail!("--etcd-user: empty: name the etcd user");
        }
        let password = match (from_file, from_env) {
            (Some((_, path)), Some(_)) => bail!(
                "--etcd-user {user}: the password is given twice, in {PASSWORD_ENV} and in \
                 --etcd-password-file {}: give one",
                path.display()
            ),
            (Some((pw, _)), None) => pw,
            (None, Some(pw)) if !pw.is_empty() => pw,
            (None, Some(_)) => bail!("--etcd-user {user}: {PASSWORD_ENV} is empty"),
            (None, None) => bail!(
                "--etcd-user {user}: no password: set {PASSWORD_ENV} or give \
                 --etcd-password-file FILE"
            ),
        };
        Ok(Some(EtcdAuth::new(user.clone(), password)))
    }
}

/// The whole of a file named by `flag`.
fn read(flag: &str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| file_error(flag, path, &format!("cannot read it ({e})")))
}

/// The password in `path`: the whole file, less one trailing newline.
fn read_password(path: &Path) -> Result<String> {
    const FLAG: &str = "--etcd-password-file";
    let bytes = read(FLAG, path)?;
    let text = String::from_utf8(bytes).map_err(|_| file_error(FLAG, path, "not UTF-8 text"))?;
    let password = text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text);
    if password.is_empty() {
        return Err(file_error(FLAG, path, "empty: write the password in it"));
    }
    Ok(password.to_string())
}

/// `FLAG FILE: what`.
fn file_error(flag: &str, path: &Path, what: &str) -> anyhow::Error {
    anyhow!("{flag} {}: {what}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA certificate and a private key, PEM (made by `tenax certs init`'s code).
    fn pem_pair() -> (String, String) {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = tenax_cluster::tls::init_ca(dir.path(), 1).unwrap();
        (
            std::fs::read_to_string(cert).unwrap(),
            std::fs::read_to_string(key).unwrap(),
        )
    }

    #[test]
    fn fills_tls_and_auth_from_files_and_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let args = EtcdClientArgs {
            etcd_ca: Some(write("ca.pem", &cert)),
            etcd_cert: Some(write("client.pem", &cert)),
            etcd_key: Some(write("client-key.pem", &key)),
            etcd_user: Some("tenax".into()),
            etcd_password_file: Some(write("pw", "s3cret\n")),
        };
        let mut config = EtcdConfig::new(vec!["https://127.0.0.1:2379".into()], "job");
        args.apply_with_password_env(&mut config, None).unwrap();
        let tls = config.tls.as_ref().unwrap();
        assert_eq!(tls.ca_pem, cert.as_bytes());
        assert_eq!(tls.client_key_pem.as_deref(), Some(key.as_bytes()));
        assert_eq!(config.auth, Some(EtcdAuth::new("tenax", "s3cret")));
        assert!(!format!("{config:?}").contains("s3cret"));

        // The password from the environment instead of the file.
        let env_only = EtcdClientArgs {
            etcd_password_file: None,
            ..args.clone()
        };
        let mut config = EtcdConfig::default();
        env_only
            .apply_with_password_env(&mut config, Some("from-env".into()))
            .unwrap();
        assert_eq!(config.auth, Some(EtcdAuth::new("tenax", "from-env")));

        // No flag: the config is left alone.
        let mut config = EtcdConfig::default();
        EtcdClientArgs::default()
            .apply_with_password_env(&mut config, Some("ignored".into()))
            .unwrap();
        assert_eq!(config, EtcdConfig::default());
    }

    #[test]
    fn errors_are_one_line_and_name_the_flag_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pem_pair();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = write("ca.pem", &cert);
        let key_file = write("key.pem", &key);
        let junk = write("junk.pem", "not a certificate");
        let missing = dir.path().join("missing.pem");
        let pw = write("pw", "pw\n");
        let empty_pw = write("empty-pw", "\n");
        let base = EtcdClientArgs::default();
        let table: Vec<(EtcdClientArgs, Option<OsString>, &[&str])> = vec![
            (
                EtcdClientArgs {
                    etcd_ca: Some(missing.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-ca", "missing.pem", "cannot read"],
            ),
            (
                EtcdClientArgs {
                    etcd_ca: Some(junk.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-ca", "junk.pem", "no PEM certificate"],
            ),
            (
                EtcdClientArgs {
                    etcd_ca: Some(ca.clone()),
                    etcd_cert: Some(ca.clone()),
                    etcd_key: Some(junk.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-key", "junk.pem", "private key"],
            ),
            (
                EtcdClientArgs {
                    etcd_ca: Some(ca.clone()),
                    etcd_cert: Some(ca.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-cert", "ca.pem", "no --etcd-key"],
            ),
            (
                EtcdClientArgs {
                    etcd_cert: Some(ca.clone()),
                    etcd_key: Some(key_file.clone()),
                    ..base.clone()
                },
                None,
                &["without --etcd-ca"],
            ),
            (
                EtcdClientArgs {
                    etcd_user: Some("tenax".into()),
                    ..base.clone()
                },
                None,
                &["--etcd-user tenax", "no password", PASSWORD_ENV],
            ),
            (
                EtcdClientArgs {
                    etcd_user: Some("tenax".into()),
                    etcd_password_file: Some(pw.clone()),
                    ..base.clone()
                },
                Some("other".into()),
                &["given twice", "pw"],
            ),
            (
                EtcdClientArgs {
                    etcd_password_file: Some(pw.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-password-file", "no --etcd-user"],
            ),
            (
                EtcdClientArgs {
                    etcd_user: Some("tenax".into()),
                    etcd_password_file: Some(empty_pw.clone()),
                    ..base.clone()
                },
                None,
                &["--etcd-password-file", "empty-pw", "empty"],
            ),
        ];
        for (i, (args, env, want)) in table.into_iter().enumerate() {
            let mut config = EtcdConfig::default();
            let err = args
                .apply_with_password_env(&mut config, env)
                .unwrap_err()
                .to_string();
            assert!(!err.contains('\n'), "case {i}: not one line: {err}");
            for w in want {
                assert!(err.contains(w), "case {i}: {err:?} lacks {w:?}");
            }
            assert!(
                !err.contains("other"),
                "case {i}: the password leaked: {err}"
            );
        }
    }

    #[test]
    fn flags_win_over_the_config_file() {
        let mut flags = EtcdClientArgs {
            etcd_user: Some("flag-user".into()),
            ..EtcdClientArgs::default()
        };
        flags.fill_unset(EtcdClientArgs {
            etcd_user: Some("file-user".into()),
            etcd_ca: Some("/etc/etcd/ca.pem".into()),
            ..EtcdClientArgs::default()
        });
        assert_eq!(flags.etcd_user.as_deref(), Some("flag-user"));
        assert_eq!(flags.etcd_ca, Some(PathBuf::from("/etc/etcd/ca.pem")));
    }
}
