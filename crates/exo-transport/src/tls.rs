//! Mutually authenticated TLS 1.3 for every connection of the shard service.
//!
//! Every node derives the same certificate authority key (Ed25519) from the cluster
//! credential; each process makes its own key pair at start and a certificate for it signed
//! by that authority. Both ends of a connection present their certificate and accept only one
//! signed by the cluster's authority: a device without the cluster key can neither call a
//! node nor pose as one, and no secret crosses the wire (the credential itself never leaves
//! the process). TLS 1.3 without early data, so a recorded session replays to nothing.

use std::io;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PKCS_ED25519,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// The name every node's certificate carries and every client checks: membership of the
/// cluster is what a certificate proves, not a host name.
pub(crate) const SERVER_NAME: &str = "shard.exo-cluster.internal";

/// The purpose the certificate authority's key is derived for (an HMAC of the credential).
const CA_PURPOSE: &[u8] = b"exo.shard.v1 tls certificate authority";

/// The TLS settings of one process: its certificate, and the cluster's authority to check
/// the other end's against.
#[derive(Debug)]
pub(crate) struct Tls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    /// The cluster authority's certificate (the same key in every process).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) authority: CertificateDer<'static>,
}

impl Tls {
    /// Makes this process's key and certificate under the authority derived from `secret`.
    pub(crate) fn new(secret: &[u8; 32]) -> Result<Self, String> {
        let made = |what: &str, e: &dyn std::fmt::Display| format!("making {what}: {e}");
        let authority_key = authority_key(secret).map_err(|e| made("the cluster's CA key", &e))?;
        let mut authority = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| made("the cluster's CA", &e))?;
        authority.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        authority.distinguished_name = name("exo cluster authority");
        authority.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let authority = authority
            .self_signed(&authority_key)
            .map_err(|e| made("the cluster's CA", &e))?;

        let own_key =
            KeyPair::generate_for(&PKCS_ED25519).map_err(|e| made("this node's key", &e))?;
        let mut own = CertificateParams::new(vec![SERVER_NAME.to_owned()])
            .map_err(|e| made("this node's certificate", &e))?;
        own.distinguished_name = name("exo node");
        own.is_ca = IsCa::NoCa;
        own.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        own.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let own = own
            .signed_by(&own_key, &authority, &authority_key)
            .map_err(|e| made("this node's certificate", &e))?;

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots
            .add(authority.der().clone())
            .map_err(|e| made("the trust store", &e))?;
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = vec![own.der().clone()];
        let key = || PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(own_key.serialize_der()));

        let clients =
            WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), Arc::clone(&provider))
                .build()
                .map_err(|e| made("the client verifier", &e))?;
        let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| made("the server's TLS settings", &e))?
            .with_client_cert_verifier(clients)
            .with_single_cert(chain.clone(), key())
            .map_err(|e| made("the server's TLS settings", &e))?;
        server.alpn_protocols = vec![b"h2".to_vec()];

        let servers = rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::clone(&provider),
        )
        .build()
        .map_err(|e| made("the server verifier", &e))?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| made("the client's TLS settings", &e))?
            .with_webpki_verifier(servers)
            .with_client_auth_cert(chain, key())
            .map_err(|e| made("the client's TLS settings", &e))?;
        client.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Tls {
            server: Arc::new(server),
            client: Arc::new(client),
            authority: authority.der().clone(),
        })
    }

    /// The name to check the server's certificate against.
    pub(crate) fn server_name() -> ServerName<'static> {
        // A constant that is a valid DNS name.
        ServerName::try_from(SERVER_NAME).unwrap_or_else(|_| unreachable!())
    }
}

fn name(common: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common);
    name
}

/// The authority's Ed25519 key: its seed is an HMAC-SHA-256 of [`CA_PURPOSE`] keyed with the
/// credential, wrapped as PKCS#8 (RFC 8410).
fn authority_key(secret: &[u8; 32]) -> Result<KeyPair, rcgen::Error> {
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
        CA_PURPOSE,
    );
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut pkcs8 = Vec::with_capacity(48);
    pkcs8.extend_from_slice(&PREFIX);
    pkcs8.extend_from_slice(mac.as_ref());
    KeyPair::from_pkcs8_der_and_sign_algo(&PrivatePkcs8KeyDer::from(pkcs8), &PKCS_ED25519)
}

/// Says what a failed handshake means for a user: another cluster's certificate, or none.
pub(crate) fn refusal(error: &io::Error) -> Option<String> {
    let tls = error.get_ref()?.downcast_ref::<rustls::Error>()?;
    match tls {
        rustls::Error::InvalidCertificate(why) => Some(format!(
            "its certificate is not signed by this cluster's key ({why:?}): it belongs to \
             another cluster, or uses another cluster key"
        )),
        rustls::Error::NoCertificatesPresented => {
            Some("it presented no certificate (it is not a node of any cluster)".to_owned())
        }
        rustls::Error::AlertReceived(alert) => Some(format!(
            "it refused this end's certificate ({alert:?}): it uses another cluster key"
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use std::time::Duration;

    #[test]
    fn every_node_derives_the_same_authority_and_another_key_another() {
        let a = authority_key(&[7; 32]).unwrap();
        let b = authority_key(&[7; 32]).unwrap();
        let c = authority_key(&[8; 32]).unwrap();
        assert_eq!(a.public_key_raw(), b.public_key_raw());
        assert_ne!(a.public_key_raw(), c.public_key_raw());
        assert_eq!(a.public_key_raw().len(), 32);
    }

    /// Handshakes a client with `client` settings against a server with `server`'s: the
    /// client's and the server's outcomes.
    async fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
    ) -> (io::Result<()>, io::Result<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(server).accept(tcp).await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await?;
            tls.write_all(&byte).await?;
            tls.flush().await
        });
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let dialled = async {
            let mut tls = tokio_rustls::TlsConnector::from(client)
                .connect(Tls::server_name(), tcp)
                .await?;
            // TLS 1.3: a client may finish its side before the server has judged its
            // certificate; the first exchange tells.
            tls.write_all(b"x").await?;
            tls.flush().await?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.map(|_| ())
        };
        let client = tokio::time::timeout(Duration::from_secs(10), dialled)
            .await
            .unwrap();
        (client, served.await.unwrap())
    }

    #[tokio::test]
    async fn two_processes_of_one_cluster_connect_and_another_clusters_cannot() {
        // Each process makes its own key and certificate; the authority is the cluster's.
        let (a, b) = (Tls::new(&[7; 32]).unwrap(), Tls::new(&[7; 32]).unwrap());
        let (client, server) = handshake(Arc::clone(&a.server), Arc::clone(&b.client)).await;
        client.unwrap();
        server.unwrap();

        let other = Tls::new(&[8; 32]).unwrap();
        let (client, _) = handshake(Arc::clone(&a.server), Arc::clone(&other.client)).await;
        let why = refusal(&client.unwrap_err()).unwrap();
        assert!(why.contains("not signed by this cluster's key"), "{why}");
    }

    #[tokio::test]
    async fn a_client_without_a_certificate_is_refused_in_the_handshake() {
        let tls = Tls::new(&[7; 32]).unwrap();
        // It trusts the cluster's authority (it knows which node to expect) but has no key.
        let mut roots = RootCertStore::empty();
        roots.add(tls.authority.clone()).unwrap();
        let anonymous =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let (client, server) = handshake(Arc::clone(&tls.server), Arc::new(anonymous)).await;
        assert!(client.is_err());
        let why = refusal(&server.unwrap_err()).unwrap();
        assert!(why.contains("no certificate"), "{why}");
    }
}
