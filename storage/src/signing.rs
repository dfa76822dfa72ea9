//! Ed25519 signatures of checkpoint manifests, and the key files that hold the keys.
//!
//! The node that commits a checkpoint signs its `MANIFEST.json` with a [`SignKey`]; a reader
//! given a [`TrustKey`] accepts only manifests whose signature verifies with it. The signature
//! is a field of the manifest itself (`signature`, the last one, next to `signer`, the public
//! key that made it), so that the commit stays one conditional PUT of one object: there is no
//! moment when a manifest is committed but its signature is not, nor a signature object
//! that outlives or precedes its manifest. It signs the exact bytes of `MANIFEST.json` with
//! the signature's 128 hex digits written as zeros, prefixed by [`SIGNING_CONTEXT`]; those
//! bytes include the file hashes and the self-checksum, so a manifest edited after signing
//! fails even when every hash in it was recomputed. Ed25519 signatures are deterministic: a
//! committer that writes the manifest again (a retried PUT) writes the same bytes.
//!
//! Key files are text (see [`SignKey::to_file_text`] and [`TrustKey::to_file_text`]):
//! comment lines starting with `#`, then one line `ed25519-secret-key <64 hex>` (the 32-byte
//! seed) or `ed25519-public-key <64 hex>` (the 32-byte public key). `tenax ckpt keygen`
//! writes the private file with mode 0600 and the public one next to it as `<file>.pub`.
//!
//! Everything here is pure except [`SignKey::generate`] (reads `/dev/urandom`) and the
//! `read_file`/[`write_key_pair`] helpers (local files).

use std::io::Read;
use std::path::{Path, PathBuf};

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};

use crate::manifest::Manifest;

/// Prefixed to the manifest bytes before signing, so that a manifest signature can never be
/// taken for a signature of anything else made with the same key.
pub const SIGNING_CONTEXT: &[u8] = b"tenax checkpoint manifest signature v1\n";
/// The JSON key of the signature, the manifest's last field.
pub const SIGNATURE_KEY: &str = "signature";
/// Hex characters of a signature (64 bytes).
pub const SIGNATURE_HEX_LEN: usize = 128;
/// Hex characters of a public key (32 bytes).
pub const PUBLIC_KEY_HEX_LEN: usize = 64;

const SECRET_TAG: &str = "ed25519-secret-key";
const PUBLIC_TAG: &str = "ed25519-public-key";

/// A private signing key (the committer's `--sign-key`). Its `Debug` shows only the public key.
#[derive(Clone)]
pub struct SignKey(SigningKey);

/// A public key that readers trust (`--trust-key`).
#[derive(Clone, PartialEq, Eq)]
pub struct TrustKey(VerifyingKey);

impl std::fmt::Debug for SignKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SignKey(public {})", self.public().id())
    }
}

impl std::fmt::Debug for TrustKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TrustKey({})", self.id())
    }
}

/// The keys a store applies to manifests: sign what this process commits, accept only what
/// verifies. Both absent (the default): manifests are written unsigned and read as before.
#[derive(Clone, Debug, Default)]
pub struct ManifestKeys {
    /// Sign every manifest this process commits.
    pub sign: Option<std::sync::Arc<SignKey>>,
    /// Refuse to verify or load a checkpoint unless its manifest is signed by this key.
    pub trust: Option<std::sync::Arc<TrustKey>>,
}

/// The key-file line `tag <hex>`, among comment and blank lines; `Err` names what is wrong.
fn key_line(text: &str, want: &str, other: &str, other_is: &str) -> Result<[u8; 32], String> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (tag, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        if tag == other {
            return Err(other_is.to_string());
        }
        if tag != want {
            return Err(format!(
                "unexpected line {line:?}; expected `{want} <64 hex digits>`"
            ));
        }
        if found.is_some() {
            return Err(format!("more than one {want} line"));
        }
        let value = value.trim();
        let bytes = hex::decode(value)
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or_else(|| format!("{want}: {value:?} is not 64 hex digits"))?;
        let mut key = [0u8; 32];
        key.copy_from_slice(&bytes);
        found = Some(key);
    }
    found.ok_or_else(|| format!("no `{want} <64 hex digits>` line"))
}

impl SignKey {
    /// A fresh key from the operating system's random source (`/dev/urandom`).
    pub fn generate() -> std::io::Result<SignKey> {
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut seed)?;
        Ok(SignKey::from_seed(seed))
    }

    /// The key of a 32-byte seed (tests use fixed seeds).
    pub fn from_seed(seed: [u8; 32]) -> SignKey {
        SignKey(SigningKey::from_bytes(&seed))
    }

    /// Its public half, to give to readers.
    pub fn public(&self) -> TrustKey {
        TrustKey(self.0.verifying_key())
    }

    /// Parse a private key file's text.
    pub fn parse(text: &str) -> Result<SignKey, String> {
        let seed = key_line(
            text,
            SECRET_TAG,
            PUBLIC_TAG,
            "this is a public key; signing needs the private key file that `tenax ckpt keygen --out FILE` wrote (FILE, not FILE.pub)",
        )?;
        Ok(SignKey::from_seed(seed))
    }

    /// Read a private key file (`--sign-key`); the error names the file and what to do.
    pub fn read_file(path: &Path) -> Result<SignKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!("--sign-key {}: cannot read it ({e}); create a key pair with `tenax ckpt keygen --out FILE`", path.display())
        })?;
        SignKey::parse(&text).map_err(|e| format!("--sign-key {}: {e}", path.display()))
    }

    /// The private key file's text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# tenax checkpoint signing key (ed25519): private, keep this file mode 0600\n# public key: {}\n{SECRET_TAG} {}\n",
            self.public().hex(),
            hex::encode(self.0.to_bytes())
        )
    }

    /// The hex signature of `message` (the manifest bytes with the signature zeroed).
    fn sign_hex(&self, message: &[u8]) -> String {
        let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + message.len());
        m.extend_from_slice(SIGNING_CONTEXT);
        m.extend_from_slice(message);
        hex::encode(self.0.sign(&m).to_bytes())
    }
}

impl TrustKey {
    /// The public key as 64 lowercase hex digits (the manifest's `signer`).
    pub fn hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// A short name for messages: the first 16 hex digits of the public key.
    pub fn id(&self) -> String {
        self.hex()[..16].to_string()
    }

    /// Parse a public key file's text.
    pub fn parse(text: &str) -> Result<TrustKey, String> {
        let bytes = key_line(
            text,
            PUBLIC_TAG,
            SECRET_TAG,
            "this is a private key; --trust-key takes the public key file next to it (FILE.pub)",
        )?;
        VerifyingKey::from_bytes(&bytes)
            .map(TrustKey)
            .map_err(|e| format!("{PUBLIC_TAG}: not a valid ed25519 public key ({e})"))
    }

    /// Read a public key file (`--trust-key`); the error names the file and what to do.
    pub fn read_file(path: &Path) -> Result<TrustKey, String> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!("--trust-key {}: cannot read it ({e}); pass the .pub file that `tenax ckpt keygen` wrote next to the signing key", path.display())
        })?;
        TrustKey::parse(&text).map_err(|e| format!("--trust-key {}: {e}", path.display()))
    }

    /// The public key file's text.
    pub fn to_file_text(&self) -> String {
        format!(
            "# tenax checkpoint trust key (ed25519 public key): pass it to readers as --trust-key\n{PUBLIC_TAG} {}\n",
            self.hex()
        )
    }
}

/// The first 16 hex digits of a `signer` field, for messages.
fn short(signer: &str) -> &str {
    signer.get(..16).unwrap_or(signer)
}

/// Where the signature's value sits in manifest bytes written by
/// [`Manifest::to_json_signed`]: the last `"signature": "` key, followed by 128 characters
/// and a quote. `None` when there is no such field.
pub(crate) fn signature_at(bytes: &[u8]) -> Option<usize> {
    crate::manifest::string_value_at(bytes, SIGNATURE_KEY, SIGNATURE_HEX_LEN)
}

/// Sign manifest bytes whose signature value is 128 zeros at `at`, in place.
pub(crate) fn sign_in_place(key: &SignKey, bytes: &mut [u8], at: usize) {
    let sig = key.sign_hex(bytes);
    bytes[at..at + SIGNATURE_HEX_LEN].copy_from_slice(sig.as_bytes());
}

/// Check that `bytes` (a `MANIFEST.json` that parsed as `m`) carries a signature by `trust`
/// over exactly these bytes. The error is one reason, saying what to do, without the
/// checkpoint's name.
pub fn check_signature(bytes: &[u8], m: &Manifest, trust: &TrustKey) -> Result<(), String> {
    if m.signature.is_empty() {
        return Err(format!(
            "not signed (format v{}), but --trust-key {} accepts only manifests signed by its key: use a checkpoint saved with the matching --sign-key, or drop --trust-key to accept unsigned checkpoints",
            m.format_version,
            trust.id()
        ));
    }
    let at = signature_at(bytes)
        .filter(|&at| bytes[at..at + SIGNATURE_HEX_LEN] == *m.signature.as_bytes())
        .ok_or("the signature field is not where it is written (the manifest's last field): MANIFEST.json was altered; restore the checkpoint from a trusted copy")?;
    let mut message = Vec::with_capacity(SIGNING_CONTEXT.len() + bytes.len());
    message.extend_from_slice(SIGNING_CONTEXT);
    message.extend_from_slice(bytes);
    let start = SIGNING_CONTEXT.len() + at;
    message[start..start + SIGNATURE_HEX_LEN].fill(b'0');
    let verified = hex::decode(&m.signature)
        .ok()
        .and_then(|b| <[u8; 64]>::try_from(b).ok())
        .map(|b| Signature::from_bytes(&b))
        .is_some_and(|sig| trust.0.verify_strict(&message, &sig).is_ok());
    if verified {
        Ok(())
    } else if m.signer != trust.hex() {
        Err(format!(
            "signed by key {}, not by the trusted key {}: pass the --trust-key of the key that signed it, or restore the checkpoint from a copy signed by the trusted key",
            short(&m.signer),
            trust.id()
        ))
    } else {
        Err(format!(
            "the signature does not verify with the trusted key {}: MANIFEST.json was changed after it was signed; restore the checkpoint from a trusted copy, or use an older checkpoint",
            trust.id()
        ))
    }
}

/// `<out>.pub`: where [`write_key_pair`] puts the public key.
pub fn public_key_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// Write a fresh key pair: the private key to `out` (mode 0600, created new: an existing file
/// is never overwritten) and the public key to `<out>.pub`. Returns the public key.
pub fn write_key_pair(out: &Path) -> Result<TrustKey, String> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let public_path = public_key_path(out);
    for p in [out, public_path.as_path()] {
        if p.exists() {
            return Err(format!(
                "{} already exists; keys are never overwritten: pick another --out or remove it first",
                p.display()
            ));
        }
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("--out {}: cannot create its directory ({e})", out.display()))?;
    }
    let key = SignKey::generate()
        .map_err(|e| format!("cannot read random bytes from /dev/urandom ({e})"))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    options
        .open(out)
        .and_then(|mut f| {
            f.write_all(key.to_file_text().as_bytes())?;
            f.sync_all()
        })
        .map_err(|e| {
            format!(
                "--out {}: cannot write the private key ({e})",
                out.display()
            )
        })?;
    let public = key.public();
    std::fs::write(&public_path, public.to_file_text()).map_err(|e| {
        format!(
            "{}: cannot write the public key ({e})",
            public_path.display()
        )
    })?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_round_trip_and_refuse_the_wrong_half() {
        let key = SignKey::from_seed([7; 32]);
        let text = key.to_file_text();
        assert_eq!(SignKey::parse(&text).unwrap().public(), key.public());
        let public = key.public().to_file_text();
        assert_eq!(TrustKey::parse(&public).unwrap(), key.public());
        let err = TrustKey::parse(&text).unwrap_err();
        assert!(err.contains("private key"), "{err}");
        let err = SignKey::parse(&public).unwrap_err();
        assert!(err.contains("public key"), "{err}");
        let err = TrustKey::parse("ed25519-public-key abc\n").unwrap_err();
        assert!(err.contains("not 64 hex digits"), "{err}");
        let err = TrustKey::parse("# nothing\n").unwrap_err();
        assert!(err.contains("no `ed25519-public-key"), "{err}");
    }

    #[test]
    fn keygen_writes_a_private_file_of_mode_0600_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("keys/ckpt.key");
        let public = write_key_pair(&out).unwrap();
        let private = SignKey::read_file(&out).unwrap();
        assert_eq!(private.public(), public);
        assert_eq!(TrustKey::read_file(&public_key_path(&out)).unwrap(), public);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&out).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let err = write_key_pair(&out).unwrap_err();
        assert!(err.contains("already exists"), "{err}");
        assert_ne!(write_key_pair(&dir.path().join("other")).unwrap(), public);
    }
}
