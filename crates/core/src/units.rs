//! Byte sizes as users write them (`64KiB`, `4G`, `1048576`: command lines and URL parameters)
//! and as they read them (`1.5 GiB`: descriptions and messages).

/// Parses a byte size: a number with an optional unit `B`, `K`/`KiB`, `M`/`MiB`, `G`/`GiB`,
/// `T`/`TiB` (all binary; `KB`, `MB`, ... are accepted as the same binary units, as `dd` users
/// expect from block sizes).
#[allow(clippy::missing_errors_doc)]
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (try 4096, 64KiB, 4GiB)"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!("unknown size unit '{other}' in '{s}' (use B, KiB, MiB, GiB or TiB)"));
        }
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("size '{s}' is too large"))
}

/// A byte count for people: `512 B`, `1.5 KiB`, `4.0 GiB`.
#[must_use]
#[allow(clippy::cast_precision_loss)] // one decimal is shown
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{bytes} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}
