//! Parsing and printing byte sizes.

/// Parse a size such as `1048576`, `512K`, `64M`, `10G`, `1T`, `2GiB`, `1.5G`
/// (binary multiples, as qemu-img reads them).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "size {s:?} must start with a number, e.g. 10G or 1048576"
        ));
    }
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        "p" | "pb" | "pib" => 1 << 50,
        other => {
            return Err(format!(
                "size {s:?} has an unknown unit {other:?} (use K, M, G, T or P)"
            ))
        }
    };
    if num.contains('.') {
        let f: f64 = num
            .parse()
            .map_err(|_| format!("size {s:?} is not a number"))?;
        let v = f * mult as f64;
        if !(0.0..1.8e19).contains(&v) {
            return Err(format!("size {s:?} is out of range"));
        }
        Ok(v as u64)
    } else {
        let n: u64 = num
            .parse()
            .map_err(|_| format!("size {s:?} is not a number"))?;
        n.checked_mul(mult)
            .ok_or_else(|| format!("size {s:?} is too large"))
    }
}

/// Print bytes in a short human form: `1 GiB`, `64 KiB`, `1.5 MiB`, `512 B`.
pub fn human(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round() as u64, U[i])
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 1572864);
        assert!(parse_size("abc").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999P").is_err());
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1536 << 10), "1.50 MiB");
    }
}
