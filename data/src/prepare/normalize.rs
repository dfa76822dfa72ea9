//! Unicode normalisation of a document before anything looks at it.
//!
//! [`normalize`] applies, in order: CRLF and lone CR → LF; drops a byte-order mark and
//! every control character other than tab and newline (C0, DEL, C1); Unicode NFC
//! (canonical composition, via the `unicode-normalization` crate) when asked; and trims
//! leading and trailing whitespace. ASCII text skips the NFC pass (it is already NFC).
//! Exact dedup hashes the result, so two documents that differ only in these respects
//! are duplicates.

use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// The normalised form of `text` (see the module docs).
pub fn normalize(text: &str, nfc: bool) -> String {
    if text
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) || b == b'\n' || b == b'\t')
    {
        // Plain ASCII without control characters: nothing to clean, nothing to compose.
        return text.trim().to_string();
    }
    let mut cleaned = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                cleaned.push('\n');
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
            }
            '\n' | '\t' => cleaned.push(c),
            '\u{feff}' => {}
            c if c.is_control() => {}
            c => cleaned.push(c),
        }
    }
    let composed = if nfc && is_nfc_quick(cleaned.chars()) != IsNormalized::Yes {
        cleaned.nfc().collect::<String>()
    } else {
        cleaned
    };
    composed.trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&str, bool, &str)] = &[
            ("plain text", true, "plain text"),
            ("  padded\n\n", true, "padded"),
            ("a\r\nb\rc", true, "a\nb\nc"),
            ("tab\tand\u{0}nul\u{7f}", true, "tab\tandnul"),
            ("\u{feff}bom", true, "bom"),
            // e + combining acute → é (NFC), only when asked.
            ("cafe\u{301}", true, "caf\u{e9}"),
            ("cafe\u{301}", false, "cafe\u{301}"),
            // Already composed stays as it is; compatibility forms are not folded (NFC, not NFKC).
            ("caf\u{e9} \u{fb01}", true, "caf\u{e9} \u{fb01}"),
            // Hangul jamo compose into a syllable.
            ("\u{1100}\u{1161}", true, "\u{ac00}"),
            ("c1\u{85}ctl", true, "c1ctl"),
        ];
        for &(input, nfc, want) in cases {
            assert_eq!(normalize(input, nfc), want, "{input:?} nfc={nfc}");
        }
    }
}
