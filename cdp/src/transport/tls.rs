//! Mutual TLS between the sites: each side presents a certificate signed
//! by the site CA and accepts only peers whose certificate chains to it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Errors of building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("Cannot read {0}")]
    Read(PathBuf, #[source] rustls_pki_types::pem::Error),
    /// The file holds no certificate.
    #[error("No certificate in {0}")]
    Empty(PathBuf),
    /// rustls refused the material.
    #[error("Unusable TLS material")]
    Config(#[source] rustls::Error),
    /// The CA cannot verify clients.
    #[error("Unusable CA for client verification: {0}")]
    Verifier(String),
}

/// PEM files of one site.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// This side's certificate chain.
    pub cert: PathBuf,
    /// Its private key.
    pub key: PathBuf,
    /// The CA that signs both sites' certificates.
    pub ca: PathBuf,
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let c = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Read(path.to_owned(), e))?;
    if c.is_empty() {
        return Err(TlsError::Empty(path.to_owned()));
    }
    Ok(c)
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut r = RootCertStore::empty();
    for c in certs(path)? {
        r.add(c).map_err(TlsError::Config)?;
    }
    Ok(r)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The source side (TLS client with a client certificate).
pub fn client_config(files: &TlsFiles) -> Result<Arc<ClientConfig>, TlsError> {
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Read(files.key.clone(), e))?;
    let c = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(c))
}

/// The replica side (TLS server requiring a client certificate).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Read(files.key.clone(), e))?;
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let c = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key)
        .map_err(TlsError::Config)?;
    Ok(Arc::new(c))
}

/// Errors of [`generate_pki`].
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// Key or certificate generation failed.
    #[error("Cannot generate certificates")]
    Generate(#[from] rcgen::Error),
    /// Writing a PEM file failed.
    #[error("Cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

/// Creates a site CA and two certificates signed by it in `dir`:
/// `ca.pem`, `source.pem`/`source.key` and `replica.pem`/`replica.key`
/// (the replica's for `replica_name`, which the source passes as its
/// server name). Returns the (source, replica) file sets.
pub fn generate_pki(dir: &Path, replica_name: &str) -> Result<(TlsFiles, TlsFiles), PkiError> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let write = |name: &str, pem: &str| -> Result<PathBuf, PkiError> {
        let p = dir.join(name);
        std::fs::write(&p, pem).map_err(|e| PkiError::Write(p.clone(), e))?;
        Ok(p)
    };
    std::fs::create_dir_all(dir).map_err(|e| PkiError::Write(dir.to_owned(), e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "keel CDP site CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = write("ca.pem", &ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |who: &str, san: &str| -> Result<TlsFiles, PkiError> {
        let key = KeyPair::generate()?;
        let cert = CertificateParams::new(vec![san.to_owned()])?.signed_by(&key, &issuer)?;
        Ok(TlsFiles {
            cert: write(&format!("{who}.pem"), &cert.pem())?,
            key: write(&format!("{who}.key"), &key.serialize_pem())?,
            ca: ca.clone(),
        })
    };
    let source = leaf("source", "keel-source")?;
    let replica = leaf("replica", replica_name)?;
    Ok((source, replica))
}
