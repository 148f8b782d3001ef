//! `exo-node invite` and `exo-node join`: putting a device in the cluster with a short code
//! instead of copying the cluster key (the exchange is `exo_topology`'s).

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use exo_topology::{ClusterKey, INVITE_PORT, JoinCode, KeyOrigin, MAX_WRONG_CODES};

#[derive(Args, Debug)]
pub(crate) struct InviteArgs {
    /// The cluster key to hand on: 64 hexadecimal digits or the cluster's passphrase. Default:
    /// this device's ($EXO_HOME/cluster.key); on a first device, a new key is made there, which
    /// starts the cluster.
    #[arg(long, env = "EXO_CLUSTER_KEY", hide_env_values = true)]
    cluster_key: Option<String>,
    /// Where the invitation listens for the new device, only while it is open. Every interface
    /// by default, so that a device on the LAN can reach it; the code it waits for is never
    /// sent, and a device that does not know it learns nothing.
    #[arg(long, default_value_t = SocketAddr::new(IpAddr::from([0, 0, 0, 0]), INVITE_PORT))]
    listen: SocketAddr,
    /// How long the invitation stays open: seconds, or with a unit (`90s`, `10m`).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    expires: Duration,
}

#[derive(Args, Debug)]
pub(crate) struct JoinArgs {
    /// The code `exo-node invite` shows on a device of the cluster (`1234-5678`).
    code: String,
    /// The inviting device's address, as `exo-node invite` prints it (`192.168.1.5:52418`;
    /// the port may be left out).
    #[arg(long)]
    from: String,
    /// Replace a cluster key this device already has (it leaves that cluster).
    #[arg(long)]
    replace: bool,
}

/// Opens an invitation, shows its code, and waits for one device to join.
pub(crate) fn invite(args: InviteArgs) -> Result<()> {
    let home = exo_model::exo_home();
    let given = args
        .cluster_key
        .as_deref()
        .map(|k| ClusterKey::parse(k, "--cluster-key"))
        .transpose()?;
    let (key, info) = exo_topology::resolve_cluster_key(given.as_ref(), &home)?;
    if let KeyOrigin::Generated { path } = &info.origin {
        eprintln!(
            "exo-node: made a new cluster key (fingerprint {}) in {}: this device starts the cluster",
            info.fingerprint,
            path.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening for the new device on {}", args.listen))?;
        let bound = listener.local_addr()?;
        let code = JoinCode::generate();
        let ip = shown_ip(bound.ip());
        // Without a route to find it by, the user fills in this device's address.
        let shown = if ip.is_unspecified() {
            format!("<this device's address>:{}", bound.port())
        } else {
            SocketAddr::new(ip, bound.port()).to_string()
        };
        eprintln!(
            "exo-node: invitation to cluster {} open for {}; it lets in one device and closes \
             after {MAX_WRONG_CODES} wrong codes. On the new device, run:",
            info.fingerprint,
            describe(args.expires)
        );
        println!("exo-node join {code} --from {shown}");
        let joined = exo_topology::offer_key(listener, &key, &code, args.expires).await?;
        eprintln!(
            "exo-node: the device at {} joined cluster {}",
            joined.ip(),
            info.fingerprint
        );
        Ok(())
    })
}

/// Asks an invitation for the cluster key and keeps it as this device's.
pub(crate) fn join(args: JoinArgs) -> Result<()> {
    let code = JoinCode::parse(&args.code)?;
    let from = if args.from.parse::<SocketAddr>().is_ok() || args.from.contains(':') {
        args.from.clone()
    } else {
        format!("{}:{INVITE_PORT}", args.from)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let key = runtime.block_on(exo_topology::fetch_key(&from, &code))?;
    let home: PathBuf = exo_model::exo_home();
    let path = exo_topology::save_cluster_key(&home, &key, args.replace)?;
    eprintln!(
        "exo-node: this device is in cluster {}; its key is in {}. Start it with `exo-node serve`",
        key.fingerprint(),
        path.display()
    );
    Ok(())
}

/// The address to tell the new device: the one listened on, or for every interface, the one
/// this device reaches its LAN from (a routing lookup: no packet is sent).
fn shown_ip(bound: IpAddr) -> IpAddr {
    if !bound.is_unspecified() {
        return bound;
    }
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|socket| {
            socket.connect("192.0.2.1:9")?;
            socket.local_addr()
        })
        .map(|a| a.ip());
    routed.unwrap_or(bound)
}

fn describe(duration: Duration) -> String {
    let seconds = duration.as_secs();
    if seconds >= 60 && seconds.is_multiple_of(60) {
        format!("{} min", seconds / 60)
    } else {
        format!("{seconds} s")
    }
}

/// `600`, `90s`, `10m`, `1h`.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (such as 90s or 10m)"))?;
    let seconds = match unit.trim() {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        other => return Err(format!("unknown unit `{other}` (s, m or h)")),
    };
    if seconds == 0 {
        return Err("an invitation must stay open for at least a second".to_owned());
    }
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn durations_read_with_or_without_a_unit() {
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5d").is_err());
        assert_eq!(describe(Duration::from_secs(600)), "10 min");
    }
}
