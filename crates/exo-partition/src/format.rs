//! Human-readable quantities for explanations and error messages.

/// Bytes in binary units with one decimal: `512 B`, `3.5 MiB`, `4.1 GiB`.
pub(crate) fn bytes(value: u64) -> String {
    const UNITS: [(&str, f64); 4] = [
        ("TiB", (1u64 << 40) as f64),
        ("GiB", (1u64 << 30) as f64),
        ("MiB", (1u64 << 20) as f64),
        ("KiB", (1u64 << 10) as f64),
    ];
    let v = value as f64;
    for (unit, size) in UNITS {
        if v >= size {
            return format!("{:.1} {unit}", v / size);
        }
    }
    format!("{value} B")
}

/// A duration in seconds with a unit that keeps two or three significant digits.
pub(crate) fn time(seconds: f64) -> String {
    let s = seconds.abs();
    if s >= 1.0 {
        format!("{seconds:.2} s")
    } else if s >= 1e-3 {
        let ms = seconds * 1e3;
        if ms.abs() >= 10.0 {
            format!("{ms:.1} ms")
        } else {
            format!("{ms:.2} ms")
        }
    } else {
        format!("{:.0} µs", seconds * 1e6)
    }
}

/// A bandwidth in decimal units, as networks are quoted: `2.0 MB/s`, `1.2 GB/s`.
pub(crate) fn rate(bytes_per_s: f64) -> String {
    if bytes_per_s >= 1e9 {
        format!("{:.1} GB/s", bytes_per_s / 1e9)
    } else if bytes_per_s >= 1e6 {
        format!("{:.1} MB/s", bytes_per_s / 1e6)
    } else {
        format!("{:.0} kB/s", bytes_per_s / 1e3)
    }
}

/// `1 token`, `4096 tokens`.
pub(crate) fn plural(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("{count} {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `1st`, `2nd`, `3rd`, `4th`, ..., `11th`, `21st`.
pub(crate) fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (1, r) if r != 11 => "st",
        (2, r) if r != 12 => "nd",
        (3, r) if r != 13 => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_read_naturally() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(time(0.0123), "12.3 ms");
        assert_eq!(time(0.00123), "1.23 ms");
        assert_eq!(time(0.000_045), "45 µs");
        assert_eq!(time(2.5), "2.50 s");
        assert_eq!(rate(2e6), "2.0 MB/s");
        assert_eq!(rate(1.25e9), "1.2 GB/s");
        assert_eq!(plural(1, "token"), "1 token");
        assert_eq!(ordinal(1), "1st");
        assert_eq!(ordinal(12), "12th");
        assert_eq!(ordinal(22), "22nd");
    }
}
