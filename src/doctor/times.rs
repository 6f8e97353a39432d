//! The times `doctor` reads: a certificate's validity period from its DER (RFC 5280 §4.1)
//! and a server's `Date` header (RFC 9110 §5.6.7); times as UTC text. Enough to tell an
//! operator that a certificate expired or that the clock is wrong, without an X.509 or
//! date library in the device binary.

/// notBefore and notAfter, Unix seconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

/// One DER element: (tag, contents, rest).
fn element(der: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const SEQUENCE: u8 = 0x30;
const VERSION: u8 = 0xa0;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;

/// Rule (certificate validity): Certificate -> tbsCertificate -> [version], serial,
/// signature, issuer, validity { notBefore, notAfter }.
pub fn validity(der: &[u8]) -> Option<Validity> {
    let (SEQUENCE, cert, _) = element(der)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = element(cert)? else {
        return None;
    };
    if tbs.first() == Some(&VERSION) {
        tbs = element(tbs)?.2;
    }
    // serial, signature algorithm, issuer
    for _ in 0..3 {
        tbs = element(tbs)?.2;
    }
    let (SEQUENCE, period, _) = element(tbs)? else {
        return None;
    };
    let (tag, before, rest) = element(period)?;
    let not_before = time(tag, before)?;
    let (tag, after, _) = element(rest)?;
    let not_after = time(tag, after)?;
    Some(Validity {
        not_before,
        not_after,
    })
}

/// Rule (RFC 5280 §4.1.2.5): UTCTime `YYMMDDHHMMSSZ` (years 50-99 are 19xx) or
/// GeneralizedTime `YYYYMMDDHHMMSSZ`.
fn time(tag: u8, text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?.strip_suffix('Z')?;
    if !text.is_ascii() {
        return None;
    }
    let (year, rest) = match tag {
        UTC_TIME if text.len() == 12 => {
            let yy: i64 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        GENERALIZED_TIME if text.len() == 14 => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let field = |i: usize| rest.get(i..i + 2)?.parse::<i64>().ok();
    let (month, day) = (field(0)?, field(2)?);
    let (h, m, s) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Rule (HTTP date, RFC 9110 §5.6.7): the preferred form, `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(text: &str) -> Option<i64> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut parts = text.split_once(", ")?.1.split(' ');
    let day: i64 = parts.next()?.parse().ok()?;
    let month_name = parts.next()?;
    let month = MONTHS.iter().position(|m| *m == month_name)?;
    let year: i64 = parts.next()?.parse().ok()?;
    let mut hms = parts.next()?.split(':').map(|f| f.parse::<i64>().ok());
    let (h, m, s) = (hms.next()??, hms.next()??, hms.next()??);
    if parts.next() != Some("GMT") || !(1..=31).contains(&day) || h > 23 || m > 59 || s > 60 {
        return None;
    }
    let month = i64::try_from(month).ok()? + 1;
    Some(days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `2026-12-07 16:30:00 UTC`.
pub fn utc(unix: i64) -> String {
    let (y, m, d, h, mi, sec) = crate::dates::civil(unix);
    format!("{y:04}-{m:02}-{d:02} {h:02}:{mi:02}:{sec:02} UTC")
}

/// The system clock, Unix seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Rule (certificate period): what is wrong with a period at `now`, if anything.
pub fn period_problem(v: Validity, now: i64) -> Option<String> {
    if now > v.not_after {
        Some(format!(
            "expired on {}; the local clock reads {}",
            utc(v.not_after),
            utc(now)
        ))
    } else if now < v.not_before {
        Some(format!(
            "not valid before {}; the local clock reads {}",
            utc(v.not_before),
            utc(now)
        ))
    } else {
        None
    }
}

/// Rule (what to do about a certificate's period): before it starts, the clock is the
/// likely culprit (a gateway without a battery-backed clock, before NTP); after it ends,
/// the certificate.
pub fn period_fix(v: Validity, now: i64) -> &'static str {
    if now < v.not_before {
        "set the gateway's clock (timedatectl set-ntp true; on OpenWrt, enable the NTP client); if it is right, the certificate in mqtt.cert is not valid yet"
    } else {
        "renew the certificate in mqtt.cert and register the new one in AWS IoT; if the gateway's clock is wrong, set it (NTP)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_validity_is_read_from_the_der() {
        let mut params = rcgen::CertificateParams::new(vec!["gw".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2024, 2, 29);
        params.not_after = rcgen::date_time_ymd(2051, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let v = validity(cert.der()).unwrap();
        assert_eq!(utc(v.not_before), "2024-02-29 00:00:00 UTC");
        // After 2049 the time is a GeneralizedTime.
        assert_eq!(utc(v.not_after), "2051-01-01 00:00:00 UTC");
        assert_eq!(validity(&cert.der()[..40]), None);
    }

    #[test]
    fn certificate_time_forms() {
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20000301000000Z"),
            Some(951_868_800)
        );
        assert_eq!(time(UTC_TIME, b"701301000000Z"), None);
        assert_eq!(time(UTC_TIME, b"700101000000"), None);
        assert_eq!(time(UTC_TIME, "7é010100000Z".as_bytes()), None);
        assert_eq!(utc(951_868_800 - 1), "2000-02-29 23:59:59 UTC");
    }

    #[test]
    fn http_dates_in_the_preferred_form() {
        assert_eq!(
            http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(http_date("Sunday, 06-Nov-94 08:49:37 GMT"), None);
        assert_eq!(http_date("Sun, 06 Foo 1994 08:49:37 GMT"), None);
    }

    #[test]
    fn certificate_period_problems_name_the_date_and_the_clock() {
        let v = Validity {
            not_before: 100,
            not_after: 200,
        };
        assert_eq!(period_problem(v, 150), None);
        assert_eq!(period_problem(v, 200), None);
        let expired = period_problem(v, 201).unwrap();
        assert!(
            expired.starts_with("expired on 1970-01-01 00:03:20 UTC"),
            "{expired}"
        );
        assert!(
            period_problem(v, 99)
                .unwrap()
                .starts_with("not valid before")
        );
    }
}
