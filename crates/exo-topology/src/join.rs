//! Joining a cluster by a short code instead of copying its 64-digit key.
//!
//! A device of the cluster opens an invitation ([`offer_key`]): it listens on a TCP port and
//! shows a code of eight digits ([`JoinCode`]). The new device connects with the same code
//! ([`fetch_key`]); both run SPAKE2 (the code is the password) and get a fresh shared key only
//! if their codes match. Each proves it with an HMAC, and the inviter then sends the cluster key
//! sealed (ChaCha20-Poly1305) under that shared key.
//!
//! What this gives: an eavesdropper learns nothing it can test codes against offline; a device
//! with a wrong code learns nothing but "wrong code", and each wrong try is one online guess
//! (one in 10^8) that the invitation counts, closing after [`MAX_WRONG_CODES`]; an invitation
//! ends after its first join, or when it expires. Nothing here is sent in clear but the
//! protocol's name, the SPAKE2 messages and the verdict.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ring::aead;
use ring::hmac;
use spake2::{Ed25519Group, Identity, Password, Spake2};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::{Error, Result};
use crate::identity::{CLUSTER_KEY_FILE, ClusterKey, write_secret};

/// The TCP port an invitation listens on unless told otherwise.
pub const INVITE_PORT: u16 = 52418;

/// Wrong codes an invitation takes before it closes.
pub const MAX_WRONG_CODES: u32 = 3;

/// What a joining device sends first: the protocol and its version.
const MAGIC: &[u8; 11] = b"exo-join/1\n";

/// How long one exchange may take, each way.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest message either side sends (a SPAKE2 message is 33 bytes, the sealed key 81).
const MAX_MESSAGE: usize = 256;

const JOINER: &[u8] = b"exo-rs join v1: joining device";
const INVITER: &[u8] = b"exo-rs join v1: inviting device";

/// What the exchange runs over: a TCP connection, or a pipe in tests.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Stream for T {}

/// The inviter's verdicts.
const ACCEPTED: u8 = 0;
const WRONG_CODE: u8 = 1;

/// A join code: eight decimal digits, shown as `1234-5678`.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinCode(String);

impl JoinCode {
    /// A new random code.
    pub fn generate() -> Self {
        JoinCode(format!("{:08}", rand::random::<u32>() % 100_000_000))
    }

    /// Reads a code as a person types it: eight digits, with or without dashes and spaces.
    pub fn parse(text: &str) -> Result<Self> {
        let digits: String = text.chars().filter(|c| !matches!(c, '-' | ' ')).collect();
        if digits.len() != 8 || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(Error::Join(format!(
                "`{text}` is not a join code: a code is eight digits, such as 1234-5678"
            )));
        }
        Ok(JoinCode(digits))
    }
}

impl std::fmt::Display for JoinCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", &self.0[..4], &self.0[4..])
    }
}

impl std::fmt::Debug for JoinCode {
    // A code is a secret while its invitation is open.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JoinCode(..)")
    }
}

/// Offers `key` on `listener` to one device that knows `code`, for at most `expires`:
/// returns the address of the device that joined. Connections that do not speak the protocol
/// are dropped; after [`MAX_WRONG_CODES`] wrong codes, or at expiry, the invitation ends with
/// an error that says which.
pub async fn offer_key(
    listener: TcpListener,
    key: &ClusterKey,
    code: &JoinCode,
    expires: Duration,
) -> Result<SocketAddr> {
    let deadline = tokio::time::Instant::now() + expires;
    let mut wrong = 0;
    loop {
        let accepted = tokio::time::timeout_at(deadline, listener.accept()).await;
        let Ok(accepted) = accepted else {
            return Err(Error::Join(format!(
                "the invitation expired after {} s without a device joining; open a new one",
                expires.as_secs()
            )));
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::debug!(error = %e, "accepting a joining device failed");
                continue;
            }
        };
        let exchange = tokio::time::timeout(STEP_TIMEOUT * 3, offer_once(stream, key, code));
        match exchange.await {
            Ok(Ok(true)) => return Ok(peer),
            Ok(Ok(false)) => {
                wrong += 1;
                tracing::warn!(%peer, wrong, "a device tried a wrong join code");
                if wrong >= MAX_WRONG_CODES {
                    return Err(Error::Join(format!(
                        "{wrong} wrong codes were tried: the invitation is closed (someone may be \
                         guessing); open a new one"
                    )));
                }
            }
            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "a joining exchange failed"),
            Err(_) => tracing::debug!(%peer, "a joining exchange timed out"),
        }
    }
}

/// One exchange with a joining device: `true` when it had the code and got the key.
async fn offer_once<S: Stream>(mut stream: S, key: &ClusterKey, code: &JoinCode) -> Result<bool> {
    let mut magic = [0u8; MAGIC.len()];
    read_exact(&mut stream, &mut magic).await?;
    if &magic != MAGIC {
        return Err(Error::Join("not the join protocol".to_owned()));
    }
    let theirs = read_message(&mut stream).await?;
    let (spake, ours) = Spake2::<Ed25519Group>::start_b(
        &Password::new(code.0.as_bytes()),
        &Identity::new(JOINER),
        &Identity::new(INVITER),
    );
    write_message(&mut stream, &ours).await?;
    let shared = spake
        .finish(&theirs)
        .map_err(|e| Error::Join(format!("the joining device's message: {e:?}")))?;
    let proof = read_message(&mut stream).await?;
    let confirm = hmac::Key::new(hmac::HMAC_SHA256, &shared);
    if hmac::verify(&confirm, JOINER, &proof).is_err() {
        write_message(&mut stream, &[WRONG_CODE]).await?;
        return Ok(false);
    }
    let mut sealed = key.bytes().to_vec();
    wrapping_key(&shared)
        .seal_in_place_append_tag(
            aead::Nonce::assume_unique_for_key([0; 12]),
            aead::Aad::from(INVITER),
            &mut sealed,
        )
        .map_err(|_| Error::Join("sealing the cluster key failed".to_owned()))?;
    let mut answer = vec![ACCEPTED];
    answer.extend_from_slice(hmac::sign(&confirm, INVITER).as_ref());
    answer.extend_from_slice(&sealed);
    write_message(&mut stream, &answer).await?;
    Ok(true)
}

/// Asks the invitation at `address` for the cluster key with `code`.
pub async fn fetch_key(address: &str, code: &JoinCode) -> Result<ClusterKey> {
    let failed = |message: String| Error::Join(format!("joining through {address}: {message}"));
    let connect = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(address)).await;
    let mut stream = match connect {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(failed(
                "no invitation is open there (it expired, was used, or closed): run `exo-node \
                 invite` on a device of the cluster and use the code it shows"
                    .to_owned(),
            ));
        }
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(_) => return Err(failed("no answer within 10 s".to_owned())),
    };
    fetch_over(&mut stream, code).await.map_err(|e| match e {
        Error::Join(message) => failed(message),
        other => other,
    })
}

/// The joining side of the exchange over `stream`.
async fn fetch_over<S: Stream>(stream: &mut S, code: &JoinCode) -> Result<ClusterKey> {
    let failed = |message: String| Error::Join(message);
    let (spake, ours) = Spake2::<Ed25519Group>::start_a(
        &Password::new(code.0.as_bytes()),
        &Identity::new(JOINER),
        &Identity::new(INVITER),
    );
    let mut hello = MAGIC.to_vec();
    hello.extend_from_slice(&(ours.len() as u16).to_be_bytes());
    hello.extend_from_slice(&ours);
    write_all(stream, &hello).await?;
    let theirs = read_message(stream).await?;
    let shared = spake
        .finish(&theirs)
        .map_err(|e| failed(format!("the inviting device's message: {e:?}")))?;
    let confirm = hmac::Key::new(hmac::HMAC_SHA256, &shared);
    write_message(stream, hmac::sign(&confirm, JOINER).as_ref()).await?;
    let answer = read_message(stream).await?;
    match answer.split_first() {
        Some((&ACCEPTED, rest)) if rest.len() == 32 + 32 + aead::MAX_TAG_LEN => {
            let (proof, sealed) = rest.split_at(32);
            hmac::verify(&confirm, INVITER, proof).map_err(|_| {
                failed("the inviting device could not prove it knows the code".to_owned())
            })?;
            let mut sealed = sealed.to_vec();
            let opened = wrapping_key(&shared)
                .open_in_place(
                    aead::Nonce::assume_unique_for_key([0; 12]),
                    aead::Aad::from(INVITER),
                    &mut sealed,
                )
                .map_err(|_| failed("the cluster key did not arrive intact".to_owned()))?;
            let bytes: [u8; 32] = opened
                .try_into()
                .map_err(|_| failed("the cluster key has the wrong length".to_owned()))?;
            Ok(ClusterKey::from_bytes(bytes))
        }
        Some((&WRONG_CODE, _)) => Err(failed(
            "wrong code (check the digits the inviting device shows; after a few wrong tries \
             the invitation closes)"
                .to_owned(),
        )),
        _ => Err(failed(
            "the inviting device's answer is malformed".to_owned(),
        )),
    }
}

/// Writes `key` as this device's cluster key (`home/cluster.key`), unless the device already
/// has another one and `replace` is false. Returns the file written.
pub fn save_cluster_key(home: &Path, key: &ClusterKey, replace: bool) -> Result<PathBuf> {
    let path = home.join(CLUSTER_KEY_FILE);
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(existing) = ClusterKey::parse(&text, &path.display().to_string())
    {
        if &existing == key {
            return Ok(path);
        }
        if !replace {
            return Err(Error::Join(format!(
                "this device already has the key of another cluster (fingerprint {}) in {}; \
                 pass --replace to leave that cluster for this one (fingerprint {})",
                existing.fingerprint(),
                path.display(),
                key.fingerprint()
            )));
        }
    }
    write_secret(home, &path, format!("{}\n", key.to_hex()).as_bytes())?;
    Ok(path)
}

/// The key the cluster key is sealed with: an HMAC of the SPAKE2 key for this one purpose.
fn wrapping_key(shared: &[u8]) -> aead::LessSafeKey {
    let derived = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, shared),
        b"exo-rs join v1: cluster key wrapping",
    );
    // A 32-byte key for a 32-byte algorithm: cannot fail.
    let unbound = aead::UnboundKey::new(&aead::CHACHA20_POLY1305, derived.as_ref())
        .unwrap_or_else(|_| unreachable!("ChaCha20-Poly1305 takes 32-byte keys"));
    aead::LessSafeKey::new(unbound)
}

async fn write_message<S: Stream>(stream: &mut S, bytes: &[u8]) -> Result<()> {
    let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(bytes);
    write_all(stream, &framed).await
}

async fn write_all<S: Stream>(stream: &mut S, bytes: &[u8]) -> Result<()> {
    match tokio::time::timeout(STEP_TIMEOUT, stream.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::Join(format!("sending: {e}"))),
        Err(_) => Err(Error::Join("sending timed out".to_owned())),
    }
}

async fn read_message<S: Stream>(stream: &mut S) -> Result<Vec<u8>> {
    let mut length = [0u8; 2];
    read_exact(stream, &mut length).await?;
    let length = usize::from(u16::from_be_bytes(length));
    if length > MAX_MESSAGE {
        return Err(Error::Join(format!(
            "a message of {length} bytes (at most {MAX_MESSAGE})"
        )));
    }
    let mut bytes = vec![0u8; length];
    read_exact(stream, &mut bytes).await?;
    Ok(bytes)
}

async fn read_exact<S: Stream>(stream: &mut S, buf: &mut [u8]) -> Result<()> {
    match tokio::time::timeout(STEP_TIMEOUT, stream.read_exact(buf)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(Error::Join(
            "the other device closed the connection".to_owned(),
        )),
        Ok(Err(e)) => Err(Error::Join(format!("receiving: {e}"))),
        Err(_) => Err(Error::Join("no answer within 10 s".to_owned())),
    }
}

/// Each side of the exchange against bytes from an untrusted peer, for fuzzing.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// The code the seeds are made with.
    pub const CODE: &str = "1234-5678";

    fn run<T>(exchange: impl std::future::Future<Output = T>) -> Option<T> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .ok()?;
        runtime.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), exchange)
                .await
                .ok()
        })
    }

    /// Runs the inviting side of one exchange against a device that sends `bytes` and then
    /// only reads: `true` when it handed the key on.
    pub fn offer_against(bytes: &[u8]) -> bool {
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        let Ok(code) = JoinCode::parse(CODE) else {
            return false;
        };
        let key = ClusterKey::from_bytes([7; 32]);
        run(async move {
            let _ = theirs.write_all(bytes).await;
            let _ = theirs.shutdown().await;
            let outcome = offer_once(ours, &key, &code).await;
            drop(theirs);
            matches!(outcome, Ok(true))
        })
        .unwrap_or(false)
    }

    /// Runs the joining side against an inviting device that answers with `bytes`: `true`
    /// when it accepted a key.
    pub fn fetch_against(bytes: &[u8]) -> bool {
        let (mut ours, mut theirs) = tokio::io::duplex(1 << 16);
        let Ok(code) = JoinCode::parse(CODE) else {
            return false;
        };
        run(async move {
            let _ = theirs.write_all(bytes).await;
            let _ = theirs.shutdown().await;
            let outcome = fetch_over(&mut ours, &code).await;
            drop(theirs);
            outcome.is_ok()
        })
        .unwrap_or(false)
    }

    /// What each side sends in a well-formed exchange with [`CODE`]: (the joining device's
    /// bytes, the inviting device's), to seed mutations from.
    pub fn seeds() -> (Vec<u8>, Vec<u8>) {
        let password = Password::new(b"12345678");
        let (joiner, a) = Spake2::<Ed25519Group>::start_a(
            &password,
            &Identity::new(JOINER),
            &Identity::new(INVITER),
        );
        let (inviter, b) = Spake2::<Ed25519Group>::start_b(
            &password,
            &Identity::new(JOINER),
            &Identity::new(INVITER),
        );
        let frame = |bytes: &[u8]| {
            let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(bytes);
            out
        };
        let shared = joiner.finish(&b).unwrap_or_default();
        let _ = inviter.finish(&a);
        let confirm = hmac::Key::new(hmac::HMAC_SHA256, &shared);
        let mut joining = MAGIC.to_vec();
        joining.extend(frame(&a));
        joining.extend(frame(hmac::sign(&confirm, JOINER).as_ref()));
        let mut answer = vec![ACCEPTED];
        answer.extend_from_slice(hmac::sign(&confirm, INVITER).as_ref());
        answer.extend_from_slice(&[9; 32 + 16]);
        let mut inviting = frame(&b);
        inviting.extend(frame(&answer));
        (joining, inviting)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn invitation(
        code: &JoinCode,
        expires: Duration,
    ) -> (
        String,
        tokio::task::JoinHandle<Result<SocketAddr>>,
        ClusterKey,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let key = ClusterKey::generate();
        let (offered, code) = (key.clone(), code.clone());
        let task = tokio::spawn(async move { offer_key(listener, &offered, &code, expires).await });
        (address, task, key)
    }

    #[test]
    fn the_fuzzing_hooks_run_each_side_to_its_verdict() {
        let (joining, inviting) = testing::seeds();
        // The seeds are well formed, but made with other random values than each run's: the
        // inviter finds the proof wrong, the joiner the inviter's proof.
        assert!(!testing::offer_against(&joining));
        assert!(!testing::fetch_against(&inviting));
        assert!(!testing::offer_against(b""));
        assert!(!testing::fetch_against(&[0xff; 600]));
    }

    #[test]
    fn codes_read_as_people_type_them() {
        let code = JoinCode::parse("1234 5678").unwrap();
        assert_eq!(code.to_string(), "1234-5678");
        assert_eq!(JoinCode::parse("1234-5678").unwrap(), code);
        assert!(JoinCode::parse("1234-567").is_err());
        assert!(JoinCode::parse("1234-567x").is_err());
        assert_eq!(JoinCode::generate().to_string().len(), 9);
        assert_eq!(format!("{code:?}"), "JoinCode(..)");
    }

    #[tokio::test]
    async fn the_right_code_gets_the_key_and_ends_the_invitation() {
        let code = JoinCode::generate();
        let (address, task, key) = invitation(&code, Duration::from_secs(30)).await;
        let fetched = fetch_key(&address, &code).await.unwrap();
        assert_eq!(fetched, key);
        task.await.unwrap().unwrap();
        // Used once, the invitation is gone.
        let again = fetch_key(&address, &code).await.unwrap_err().to_string();
        assert!(again.contains("no invitation is open"), "{again}");
    }

    #[tokio::test]
    async fn wrong_codes_learn_nothing_and_close_the_invitation() {
        let code = JoinCode::parse("1111-2222").unwrap();
        let (address, task, _) = invitation(&code, Duration::from_secs(30)).await;
        let wrong = JoinCode::parse("1111-2223").unwrap();
        for _ in 1..MAX_WRONG_CODES {
            let e = fetch_key(&address, &wrong).await.unwrap_err().to_string();
            assert!(e.contains("wrong code"), "{e}");
        }
        // The last wrong try closes it: the right code comes too late.
        let e = fetch_key(&address, &wrong).await.unwrap_err().to_string();
        assert!(e.contains("wrong code"), "{e}");
        let closed = task.await.unwrap().unwrap_err().to_string();
        assert!(closed.contains("invitation is closed"), "{closed}");
        let e = fetch_key(&address, &code).await.unwrap_err().to_string();
        assert!(e.contains("no invitation is open"), "{e}");
    }

    #[tokio::test]
    async fn an_invitation_expires() {
        let code = JoinCode::generate();
        let (address, task, _) = invitation(&code, Duration::from_millis(300)).await;
        let expired = task.await.unwrap().unwrap_err().to_string();
        assert!(expired.contains("expired"), "{expired}");
        assert!(fetch_key(&address, &code).await.is_err());
    }

    #[tokio::test]
    async fn junk_and_silence_do_not_end_an_invitation() {
        let code = JoinCode::generate();
        let (address, task, key) = invitation(&code, Duration::from_secs(30)).await;
        let mut junk = TcpStream::connect(&address).await.unwrap();
        junk.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        drop(junk);
        let mut oversized = TcpStream::connect(&address).await.unwrap();
        oversized.write_all(MAGIC).await.unwrap();
        oversized.write_all(&u16::MAX.to_be_bytes()).await.unwrap();
        drop(oversized);
        assert_eq!(fetch_key(&address, &code).await.unwrap(), key);
        task.await.unwrap().unwrap();
    }

    #[test]
    fn a_device_keeps_its_cluster_unless_told_to_replace_it() {
        let home = tempfile::tempdir().unwrap();
        let (first, second) = (ClusterKey::generate(), ClusterKey::generate());
        let path = save_cluster_key(home.path(), &first, false).unwrap();
        assert!(save_cluster_key(home.path(), &first, false).is_ok());
        let e = save_cluster_key(home.path(), &second, false).unwrap_err();
        assert!(e.to_string().contains("--replace"), "{e}");
        save_cluster_key(home.path(), &second, true).unwrap();
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(ClusterKey::parse(&text, "test").unwrap(), second);
    }
}
