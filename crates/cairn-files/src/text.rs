//! Guest names shown to people.

/// `bytes` as text a terminal shows as it is: valid UTF-8 kept, except control characters and
/// backslashes, which are escaped (`\n`, `\x1b`, `\\`), like invalid bytes (`\xff`). A guest
/// cannot make a listing move the cursor or hide a name.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' => out.push_str("\\t"),
                c if c.is_control() || invisible(c) => {
                    for b in c.to_string().bytes() {
                        out.push_str(&format!("\\x{b:02x}"));
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Characters that change how the text around them looks (reordering it, or showing
/// nothing): a name holding one could pass for another name.
fn invisible(c: char) -> bool {
    matches!(c, '\u{061C}' | '\u{200B}'..='\u{200F}' | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2069}' | '\u{FEFF}')
}

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn control_characters_and_invalid_bytes_are_escaped() {
        assert_eq!(escape(b"plain name.txt"), "plain name.txt");
        assert_eq!(escape("caf\u{e9}".as_bytes()), "caf\u{e9}");
        assert_eq!(escape(b"a\x1b[2Jb"), "a\\x1b[2Jb");
        assert_eq!(escape(b"new\nline\\"), "new\\nline\\\\");
        assert_eq!(escape(b"bad\xff\xfe"), "bad\\xff\\xfe");
        assert_eq!(escape("\u{85}".as_bytes()), "\\xc2\\x85");
        // Characters that reorder or hide text: "evil\u{202E}txt.exe" must not read as
        // "evilexe.txt".
        assert_eq!(escape("evil\u{202E}txt.exe".as_bytes()), "evil\\xe2\\x80\\xaetxt.exe");
        assert_eq!(escape("a\u{200B}b".as_bytes()), "a\\xe2\\x80\\x8bb");
    }
}
