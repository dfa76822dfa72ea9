//! PII and secret scrubbing: matches are replaced by typed placeholders.
//!
//! [`Scrubber::scrub`] runs the detectors in a fixed order (private keys, AWS keys, API
//! tokens, e-mail, credit cards, IP addresses, phone numbers, generic secrets), each over
//! the output of the previous one, and counts replacements per [`PiiKind`]. Every detector
//! is a `regex` (ASCII word boundaries, so the lazy DFA never falls back on non-ASCII text)
//! followed by a check that rejects near misses:
//!
//! - `<EMAIL>`: `local@domain.tld` with a dotted domain and an alphabetic TLD of 2+ letters.
//! - `<CREDIT_CARD>`: 13–19 digits, optionally in groups separated by one space or dash,
//!   with a card-network prefix (Visa 4, Mastercard 51–55 and 2221–2720, Amex 34/37,
//!   Discover 6011/644–649/65, JCB 35, Diners 30/36/38) and a valid Luhn check digit.
//! - `<IP>`: dotted IPv4 with four octets 0–255 without leading zeros, not part of a longer
//!   dotted run (`1.2.3.4.5` is a version, not an address); IPv6 that `std` parses with at
//!   least four non-empty groups (so `12:30:45` and `std::io` are not addresses).
//! - `<PHONE>`: an optional `+country` code, then groups of 2–4, 3–4 and 3–5 digits separated
//!   by ` `, `.` or `-` (or an area code in parentheses), 9–15 digits in all, not inside a
//!   longer run of digit groups; groups separated only by spaces count only after `+` or a
//!   parenthesised area code (`100 200 300` is a list of numbers).
//! - `<AWS_KEY>`: access key ids (`AKIA`/`ASIA`/... + 16 upper-case alphanumerics) and a
//!   40-character secret after `aws...secret...=`.
//! - `<PRIVATE_KEY>`: a PEM `-----BEGIN ... PRIVATE KEY-----` block through its END line (or
//!   through its base64 lines of 16+ characters when the END line is missing).
//! - `<TOKEN>`: GitHub (`ghp_`, `gho_`, `ghu_`, `ghs_`, `ghr_`, `github_pat_`), Slack
//!   (`xox[abposr]-`), Stripe live keys, Google API keys (`AIza`), JWTs, and a value of 16+
//!   characters after `bearer`, `token`, `api_key`, `secret`, `password` (and similar) that
//!   mixes letters and digits and has at least `min_token_entropy` bits per character.

use std::collections::BTreeMap;
use std::net::Ipv6Addr;

use regex::{Captures, Regex};
use serde::{Deserialize, Serialize};

use crate::prepare::config::ScrubConfig;

/// A kind of scrubbed value, named after its placeholder.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PiiKind {
    /// An e-mail address.
    Email,
    /// A phone number.
    Phone,
    /// An IPv4 or IPv6 address.
    Ip,
    /// A payment card number that passes the Luhn check.
    CreditCard,
    /// An AWS access key id or secret access key.
    AwsKey,
    /// A PEM private key.
    PrivateKey,
    /// An API token or other high-entropy secret.
    Token,
}

impl PiiKind {
    /// The placeholder that replaces a match, e.g. `<EMAIL>`.
    pub fn placeholder(self) -> &'static str {
        match self {
            PiiKind::Email => "<EMAIL>",
            PiiKind::Phone => "<PHONE>",
            PiiKind::Ip => "<IP>",
            PiiKind::CreditCard => "<CREDIT_CARD>",
            PiiKind::AwsKey => "<AWS_KEY>",
            PiiKind::PrivateKey => "<PRIVATE_KEY>",
            PiiKind::Token => "<TOKEN>",
        }
    }
}

/// Replacement counts per kind.
pub type ScrubCounts = BTreeMap<PiiKind, u64>;

/// The compiled detectors of one [`ScrubConfig`]; cheap to share between threads.
#[derive(Debug)]
pub struct Scrubber {
    config: ScrubConfig,
    private_key: Regex,
    aws_id: Regex,
    aws_secret: Regex,
    tokens: Regex,
    email: Regex,
    card: Regex,
    ipv4: Regex,
    ipv6: Regex,
    phone: Regex,
    generic: Regex,
}

impl Scrubber {
    /// Compiles the detectors.
    pub fn new(config: &ScrubConfig) -> Self {
        let re = |p: &str| Regex::new(p).expect("scrubber patterns are valid");
        Scrubber {
            config: config.clone(),
            private_key: re(
                r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----(?:(?s:.*?-----END [A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----)|(?:\s*[A-Za-z0-9+/=]{16,})*)",
            ),
            aws_id: re(
                r"(?-u:\b)(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}(?-u:\b)",
            ),
            aws_secret: re(
                r#"(?i)aws[A-Za-z0-9_.-]{0,20}(?:secret|key)[A-Za-z0-9_.-]{0,20}["']?\s*[:=]+\s*["']?([A-Za-z0-9/+]{40})(?-u:\b)"#,
            ),
            tokens: re(concat!(
                r"(?-u:\b)(?:",
                r"gh[pousr]_[A-Za-z0-9]{36,255}",
                r"|github_pat_[A-Za-z0-9_]{22,255}",
                r"|xox[abposr]-[A-Za-z0-9-]{10,}",
                r"|[sr]k_live_[A-Za-z0-9]{20,}",
                r"|AIza[0-9A-Za-z_-]{35}",
                r"|eyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}",
                r")",
            )),
            email: re(
                r"(?-u:\b)[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?-u:\b)",
            ),
            card: re(r"(?-u:\b)\d(?:[ -]?\d){12,18}(?-u:\b)"),
            ipv4: re(r"(?-u:\b)\d{1,3}(?:\.\d{1,3}){3}(?-u:\b)"),
            ipv6: re(r"(?i)(?:[0-9a-f]{0,4}:){2,7}[0-9a-f]{0,4}"),
            phone: re(
                r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|(?-u:\b)\d{2,4}[ .-])\d{3,4}[ .-]\d{3,5}(?-u:\b)",
            ),
            generic: re(
                r#"(?i)(?-u:\b)(?:bearer|authorization|api[_-]?key|access[_-]?token|auth[_-]?token|secret[_-]?key|client[_-]?secret|secret|password|passwd|token)["']?\s*[:=]?\s*["']?([A-Za-z0-9_\-./+=~]{16,})"#,
            ),
        }
    }

    /// `text` with every detected value replaced by its placeholder; counts are added to
    /// `counts`.
    pub fn scrub(&self, text: &str, counts: &mut ScrubCounts) -> String {
        let c = &self.config;
        if !c.enabled {
            return text.to_string();
        }
        let mut out = text.to_string();
        if c.private_key && out.contains("PRIVATE KEY") {
            out = replace(
                &self.private_key,
                &out,
                PiiKind::PrivateKey,
                counts,
                |_, _| true,
            );
        }
        if c.aws_key {
            out = replace(&self.aws_id, &out, PiiKind::AwsKey, counts, |_, _| true);
            out = replace_group(&self.aws_secret, &out, PiiKind::AwsKey, counts, |_| true);
        }
        if c.token {
            out = replace(&self.tokens, &out, PiiKind::Token, counts, |_, _| true);
        }
        if c.email && out.contains('@') {
            out = replace(&self.email, &out, PiiKind::Email, counts, |_, _| true);
        }
        if c.credit_card {
            out = replace(&self.card, &out, PiiKind::CreditCard, counts, |m, _| {
                is_card_number(m)
            });
        }
        if c.ip {
            out = replace(
                &self.ipv4,
                &out,
                PiiKind::Ip,
                counts,
                |m, (hay, start, end)| is_ipv4(m) && !in_dotted_run(hay, start, end),
            );
            if out.contains(':') {
                out = replace(
                    &self.ipv6,
                    &out,
                    PiiKind::Ip,
                    counts,
                    |m, (hay, start, end)| is_ipv6(m) && !touches_word(hay, start, end),
                );
            }
        }
        if c.phone {
            out = replace(
                &self.phone,
                &out,
                PiiKind::Phone,
                counts,
                |m, (hay, start, end)| is_phone(m) && !in_number_run(hay, start, end),
            );
        }
        if c.token {
            let min_entropy = c.min_token_entropy;
            out = replace_group(&self.generic, &out, PiiKind::Token, counts, |v| {
                is_secret_value(v, min_entropy)
            });
        }
        out
    }
}

/// Replaces whole matches that `keep` accepts (given the match and `(haystack, start,
/// end)`).
fn replace(
    re: &Regex,
    text: &str,
    kind: PiiKind,
    counts: &mut ScrubCounts,
    keep: impl Fn(&str, (&str, usize, usize)) -> bool,
) -> String {
    let mut n = 0u64;
    let out = re.replace_all(text, |caps: &Captures<'_>| {
        let m = caps.get(0).expect("group 0 always matches");
        if keep(m.as_str(), (text, m.start(), m.end())) {
            n += 1;
            kind.placeholder().to_string()
        } else {
            m.as_str().to_string()
        }
    });
    if n > 0 {
        *counts.entry(kind).or_default() += n;
    }
    out.into_owned()
}

/// Replaces capture group 1 of matches whose group 1 `keep` accepts, keeping the rest of
/// the match (the `password = ` before the value).
fn replace_group(
    re: &Regex,
    text: &str,
    kind: PiiKind,
    counts: &mut ScrubCounts,
    keep: impl Fn(&str) -> bool,
) -> String {
    let mut n = 0u64;
    let out = re.replace_all(text, |caps: &Captures<'_>| {
        let m = caps.get(0).expect("group 0 always matches");
        match caps.get(1) {
            Some(v) if keep(v.as_str()) => {
                n += 1;
                format!(
                    "{}{}{}",
                    &text[m.start()..v.start()],
                    kind.placeholder(),
                    &text[v.end()..m.end()]
                )
            }
            _ => m.as_str().to_string(),
        }
    });
    if n > 0 {
        *counts.entry(kind).or_default() += n;
    }
    out.into_owned()
}

/// A card-network prefix, a plausible length and a valid Luhn check digit; separators, if
/// any, are all the same and split the digits into groups of at least 4... or none at all.
pub fn is_card_number(m: &str) -> bool {
    let digits: Vec<u8> = m
        .bytes()
        .filter(u8::is_ascii_digit)
        .map(|b| b - b'0')
        .collect();
    let seps: Vec<u8> = m.bytes().filter(|b| !b.is_ascii_digit()).collect();
    if seps.windows(2).any(|w| w[0] != w[1]) {
        return false;
    }
    if !seps.is_empty() && m.split([' ', '-']).any(|g| g.len() < 3 || g.len() > 6) {
        return false;
    }
    let len = digits.len();
    if !(13..=19).contains(&len) {
        return false;
    }
    let prefix = |k: usize| digits[..k].iter().fold(0u32, |a, &d| a * 10 + u32::from(d));
    let network = match digits[0] {
        4 => matches!(len, 13 | 16 | 19),
        5 => (51..=55).contains(&prefix(2)) && len == 16,
        2 => (2221..=2720).contains(&prefix(4)) && len == 16,
        3 => match prefix(2) {
            34 | 37 => len == 15,
            35 => (16..=19).contains(&len),
            30 | 36 | 38 => (14..=19).contains(&len),
            _ => false,
        },
        6 => {
            (prefix(4) == 6011 || (644..=649).contains(&prefix(3)) || prefix(2) == 65)
                && (16..=19).contains(&len)
        }
        _ => false,
    };
    network && luhn(&digits)
}

/// The Luhn mod-10 check over decimal digits (the last one is the check digit).
pub fn luhn(digits: &[u8]) -> bool {
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                d
            }
        })
        .sum();
    !digits.is_empty() && sum.is_multiple_of(10)
}

fn is_ipv4(m: &str) -> bool {
    m.split('.')
        .all(|o| o.parse::<u16>().is_ok_and(|v| v <= 255) && (o == "0" || !o.starts_with('0')))
}

fn is_ipv6(m: &str) -> bool {
    let groups = m.split(':').filter(|g| !g.is_empty()).count();
    groups >= 4 && m.parse::<Ipv6Addr>().is_ok()
}

/// Whether `hay[start..end]` continues as a dotted number (`1.2.3.4.5`).
fn in_dotted_run(hay: &str, start: usize, end: usize) -> bool {
    let b = hay.as_bytes();
    let before = start >= 2 && b[start - 1] == b'.' && b[start - 2].is_ascii_digit();
    let after = end + 1 < b.len() && b[end] == b'.' && b[end + 1].is_ascii_digit();
    before || after
}

/// Whether `hay[start..end]` continues into a longer run of digit groups
/// (`4111-1111-1111-1112`, `1 2 3`), or into a word character.
fn in_number_run(hay: &str, start: usize, end: usize) -> bool {
    let b = hay.as_bytes();
    let sep = |c: u8| matches!(c, b' ' | b'.' | b'-');
    let before = start >= 1
        && (b[start - 1].is_ascii_alphanumeric()
            || (start >= 2 && sep(b[start - 1]) && b[start - 2].is_ascii_digit()));
    let after = end < b.len()
        && (b[end].is_ascii_alphanumeric()
            || (end + 1 < b.len() && sep(b[end]) && b[end + 1].is_ascii_digit()));
    before || after
}

/// Whether the match is glued to a word or more hex/colon text on either side.
fn touches_word(hay: &str, start: usize, end: usize) -> bool {
    let b = hay.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b':';
    (start > 0 && word(b[start - 1])) || (end < b.len() && word(b[end]))
}

fn is_phone(m: &str) -> bool {
    let digits = m.bytes().filter(u8::is_ascii_digit).count();
    if !(9..=15).contains(&digits) {
        return false;
    }
    let spaced_only = !m.contains(['-', '.', '(']);
    !spaced_only || m.starts_with('+')
}

/// Mixes letters and digits and has at least `min_entropy` bits per character.
fn is_secret_value(v: &str, min_entropy: f64) -> bool {
    let letters = v.bytes().any(|b| b.is_ascii_alphabetic());
    let digits = v.bytes().any(|b| b.is_ascii_digit());
    letters && digits && shannon_entropy(v) >= min_entropy
}

/// Shannon entropy of the bytes of `s`, in bits per byte.
pub fn shannon_entropy(s: &str) -> f64 {
    let mut counts = [0u32; 256];
    for b in s.bytes() {
        counts[b as usize] += 1;
    }
    let n = s.len() as f64;
    counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub(text: &str) -> (String, ScrubCounts) {
        let s = Scrubber::new(&ScrubConfig::default());
        let mut counts = ScrubCounts::new();
        let out = s.scrub(text, &mut counts);
        (out, counts)
    }

    #[test]
    fn positives() {
        let cases: &[(&str, &str, PiiKind)] = &[
            ("mail jane.doe+x@example.co.uk now", "mail <EMAIL> now", PiiKind::Email),
            ("to: a_b@mail-server.example.org.", "to: <EMAIL>.", PiiKind::Email),
            ("call 415-555-2671 today", "call <PHONE> today", PiiKind::Phone),
            ("call (415) 555-2671", "call <PHONE>", PiiKind::Phone),
            ("tel +1 415 555 2671.", "tel <PHONE>.", PiiKind::Phone),
            ("uk +44 20 7946 0958", "uk <PHONE>", PiiKind::Phone),
            ("dot 415.555.2671 x", "dot <PHONE> x", PiiKind::Phone),
            ("host 192.168.1.20 up", "host <IP> up", PiiKind::Ip),
            ("at 8.8.8.8.", "at <IP>.", PiiKind::Ip),
            ("v6 2001:db8:85a3::8a2e:370:7334 ok", "v6 <IP> ok", PiiKind::Ip),
            ("v6 fe80:0:0:0:200:f8ff:fe21:67cf", "v6 <IP>", PiiKind::Ip),
            ("card 4111 1111 1111 1111 exp", "card <CREDIT_CARD> exp", PiiKind::CreditCard),
            ("card 4111-1111-1111-1111", "card <CREDIT_CARD>", PiiKind::CreditCard),
            ("amex 378282246310005", "amex <CREDIT_CARD>", PiiKind::CreditCard),
            ("mc 5555555555554444;", "mc <CREDIT_CARD>;", PiiKind::CreditCard),
            ("key AKIAIOSFODNN7EXAMPLE here", "key <AWS_KEY> here", PiiKind::AwsKey),
            (
                "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                "aws_secret_access_key = <AWS_KEY>",
                PiiKind::AwsKey,
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA7\nabc+/=\n-----END RSA PRIVATE KEY-----\nafter",
                "<PRIVATE_KEY>\nafter",
                PiiKind::PrivateKey,
            ),
            (
                "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n",
                "<PRIVATE_KEY>\n",
                PiiKind::PrivateKey,
            ),
            (
                "export GH=ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 done",
                "export GH=<TOKEN> done",
                PiiKind::Token,
            ),
            ("slack xoxb-1234567890-abcdefghij", "slack <TOKEN>", PiiKind::Token),
            (
                "Authorization: Bearer 7fG2kL9qX4mN8pR1sT5vW3yZ",
                "Authorization: Bearer <TOKEN>",
                PiiKind::Token,
            ),
            (
                "api_key=\"a9F3kq7Lx2Mz8Pw4Rt6Yb1\"",
                "api_key=\"<TOKEN>\"",
                PiiKind::Token,
            ),
            (
                "jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
                "jwt <TOKEN>",
                PiiKind::Token,
            ),
        ];
        for &(input, want, kind) in cases {
            let (out, counts) = scrub(input);
            assert_eq!(out, want, "{input:?}");
            assert_eq!(counts.get(&kind), Some(&1), "{input:?}: {counts:?}");
            assert_eq!(counts.values().sum::<u64>(), 1, "{input:?}: {counts:?}");
        }
    }

    #[test]
    fn near_miss_negatives() {
        let cases: &[&str] = &[
            // Cards: Luhn fails, unknown prefix, too short, mixed separators.
            "order 4111 1111 1111 1112 shipped",
            "order 4111-1111-1111-1112 shipped",
            "id 1234567812345678",
            "serial 9111111111111111",
            "pin 411111111111",
            // IPs: versions and out-of-range octets, leading zeros, times, paths.
            "version 1.2.3.4.5 released",
            "build 10.0.0.1.2",
            "ratio 256.1.1.1",
            "date 01.02.03.04",
            "at 12:30:45 sharp",
            "use std::io::Read;",
            "a::b and c::d::e",
            // Phones: dates, lists, ISBNs, plain long numbers.
            "on 2023-10-15 we",
            "counts 100 200 300 units",
            "isbn 978-0-306-40615-7",
            "ts 1700000000 s",
            "in 1999 2000 3000 people",
            // E-mail: no domain dot, no local part, decorators.
            "user@localhost only",
            "@property def x",
            "ping me @jane",
            "a@b",
            // Keys and tokens: too short, lower case, no digits, low entropy, placeholders.
            "AKIA1234",
            "akiaiosfodnn7example",
            "ghp_short",
            "password: correcthorsebatterystaple",
            "api_key = YOUR_API_KEY_HERE_PLEASE",
            "token 1234567890123456789",
            "secret aaaaaaaa11111111aaaa",
            "the token economy matters",
            "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkq\n-----END PUBLIC KEY-----",
        ];
        for &input in cases {
            let (out, counts) = scrub(input);
            assert_eq!(out, input, "{input:?} was scrubbed: {counts:?}");
            assert!(counts.is_empty(), "{input:?}: {counts:?}");
        }
    }

    #[test]
    fn luhn_and_entropy() {
        assert!(luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]));
        assert!(!luhn(&[4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]));
        assert!(luhn(&[7, 9, 9, 2, 7, 3, 9, 8, 7, 1, 3]));
        assert!(!luhn(&[]));
        assert_eq!(shannon_entropy("aaaa"), 0.0);
        assert!((shannon_entropy("abcd") - 2.0).abs() < 1e-12);
    }

    #[test]
    fn disabled_kinds_are_left_alone() {
        let config = ScrubConfig {
            email: false,
            ..ScrubConfig::default()
        };
        let mut counts = ScrubCounts::new();
        let out = Scrubber::new(&config).scrub("a@example.com 8.8.8.8", &mut counts);
        assert_eq!(out, "a@example.com <IP>");
        let off = ScrubConfig {
            enabled: false,
            ..ScrubConfig::default()
        };
        assert_eq!(
            Scrubber::new(&off).scrub("a@example.com", &mut counts),
            "a@example.com"
        );
    }
}
