//! `KernelCmdline` on arbitrary text: parse, then a sequence of edits, checking after each
//! step that nothing panics and that
//! - `parse(display(c))` displays the same string whenever the displayed line is canonical
//!   (outside double quotes, words are separated by exactly one space — what `Display`
//!   writes), which a freshly parsed line always is;
//! - when every word of `c` is one well-formed word (balanced quotes, no bare whitespace),
//!   the line is canonical and `parse(display(c)) == c`;
//! - `FromStr` agrees with `parse`;
//! - `set(k, v)` then `get(k)` gives `v` back for a plain key and a quote-free value, and
//!   leaves the init arguments alone;
//! - `remove(k)` then `get(k)` gives `None`;
//! - `to_cstring` succeeds exactly when the line has no NUL and fits `CMDLINE_MAX_SIZE`, with
//!   the displayed bytes.
//!
//! Input: UTF-8 (lossily decoded), split on `\x01`. The first piece is parsed; each further
//! piece is an edit whose first character picks the operation (`s`et, `r`emove, `a`ppend,
//! anything else: `get`), with key and value separated by `\x02`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use smolvm::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use smolvm::boot::KernelCmdline;

/// A key `set` and `get` agree on: non-empty, no whitespace, `=` or `"`.
fn plain_key(k: &str) -> bool {
    !k.is_empty() && !k.chars().any(|c| c.is_whitespace() || c == '=' || c == '"')
}

/// Whether `w` parses back as exactly itself (balanced quotes, no bare whitespace).
fn one_word(w: &str) -> bool {
    w.chars().filter(|&c| c == '"').count() & 1 == 0 && KernelCmdline::parse(w).args() == [w]
}

/// Whether outside double quotes the line has no leading or trailing whitespace and only
/// single spaces between words: the form `Display` produces from well-formed words.
fn canonical(line: &str) -> bool {
    let (mut in_quotes, mut prev_space) = (false, true);
    for c in line.chars() {
        if c == '"' {
            in_quotes = !in_quotes;
        }
        let space = !in_quotes && c.is_whitespace();
        if space && (c != ' ' || prev_space) {
            return false;
        }
        prev_space = space;
    }
    !prev_space || line.is_empty()
}

fn check(c: &KernelCmdline, fresh: bool) {
    let shown = c.to_string();
    let back = KernelCmdline::parse(&shown);
    assert_eq!(shown.parse::<KernelCmdline>().unwrap(), back, "FromStr");
    if fresh {
        assert!(
            canonical(&shown),
            "parse gave a non-canonical line {shown:?}"
        );
    }
    if canonical(&shown) {
        assert_eq!(
            back.to_string(),
            shown,
            "display is not a fixed point of parse"
        );
    }
    let words_ok = c.args().iter().all(|w| one_word(w))
        && c.init_args().iter().all(|w| w == "--" || one_word(w));
    if words_ok {
        assert!(canonical(&shown), "well-formed words gave {shown:?}");
        assert_eq!(&back, c, "round trip of {shown:?}");
    }
    match c.to_cstring() {
        Ok(cs) => assert_eq!(cs.as_bytes(), shown.as_bytes()),
        Err(_) => assert!(shown.contains('\0') || shown.len() + 1 > CMDLINE_MAX_SIZE),
    }
    if !shown.contains('\0') && shown.len() < CMDLINE_MAX_SIZE {
        assert!(c.to_cstring().is_ok());
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut pieces = text.split('\x01');
    let mut c = KernelCmdline::parse(pieces.next().unwrap_or(""));
    check(&c, true);
    for edit in pieces.take(32) {
        let mut chars = edit.chars();
        let op = chars.next().unwrap_or('g');
        let (key, value) = chars
            .as_str()
            .split_once('\x02')
            .unwrap_or((chars.as_str(), ""));
        match op {
            's' => {
                let init = c.init_args().to_vec();
                c.set(key, value);
                if plain_key(key) && !value.contains('"') {
                    assert_eq!(c.get(key), Some(value), "set({key:?}, {value:?})");
                }
                assert_eq!(c.init_args(), init, "set touched the init arguments");
            }
            'r' => {
                c.remove(key);
                assert_eq!(c.get(key), None, "remove({key:?})");
            }
            'a' => {
                c.append(key);
            }
            _ => {
                let _ = c.get(key);
            }
        }
        check(&c, false);
    }
});
