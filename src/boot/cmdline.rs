//! Kernel command-line builder with defaults tuned for fast microVM boot.
//!
//! A command line is a list of kernel parameters, optionally followed by `--` and arguments
//! for init. Parameters are kept as separate words so they can be looked up, replaced and
//! removed by key; double-quoted values (`key="a b"`) stay one word, as the kernel parses them.

use std::convert::Infallible;
use std::ffi::CString;
use std::fmt;
use std::str::FromStr;

use super::BootError;
use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// The fast-boot defaults of [`KernelCmdline::default`], in order.
///
/// - `console=ttyS0`: the kernel console on the first 16550 UART, the VM's console.
/// - `reboot=k`: reboot through the i8042 keyboard-controller reset line, which the VMM turns
///   into a reset exit (the other methods — ACPI, BIOS, triple fault — are slower or absent).
/// - `panic=1`: reboot one second after a panic, so the VMM sees an exit instead of a hang.
/// - `pci=off`: the microVM has no PCI bus; skips probing for one.
/// - `nomodule`: no module loading (`modprobe`) attempts, everything is built in.
/// - `i8042.noaux` / `i8042.nokbd`: public boot-time measurements attribute about 260 ms to
///   the i8042 aux (mouse) port probe and about 500 ms to the keyboard probe.
/// - `i8042.nomux` / `i8042.dumbkbd`: skip the remaining controller probing (multiplexer
///   detection, keyboard LED/ID commands) that only costs round trips.
/// - `quiet loglevel=4`: console output over an emulated UART costs one VM exit per byte;
///   only warnings and worse are printed.
pub const DEFAULT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux \
                                i8042.nokbd i8042.nomux i8042.dumbkbd quiet loglevel=4";

/// The word separating kernel parameters from init's arguments.
const INIT_SEPARATOR: &str = "--";

/// A kernel command line: kernel parameters, then optionally `--` and init arguments.
///
/// # Example
/// ```
/// use smolvm::boot::KernelCmdline;
///
/// let mut c = KernelCmdline::new();
/// c.set("root", "/dev/vda").append("ro").remove("quiet");
/// assert_eq!(c.get("root"), Some("/dev/vda"));
/// assert!(c.to_string().ends_with("loglevel=4 root=/dev/vda ro"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    /// Kernel parameters (before `--`), one word each.
    args: Vec<String>,
    /// Init arguments; `Some` once a `--` was seen, so `a --` round-trips.
    init: Option<Vec<String>>,
}

impl Default for KernelCmdline {
    /// The fast-boot defaults ([`DEFAULT_ARGS`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::{cmdline::DEFAULT_ARGS, KernelCmdline};
    /// assert_eq!(KernelCmdline::default().to_string(), DEFAULT_ARGS);
    /// ```
    fn default() -> Self {
        KernelCmdline::parse(DEFAULT_ARGS)
    }
}

impl KernelCmdline {
    /// The fast-boot defaults; same as [`KernelCmdline::default`].
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::new().get("console"), Some("ttyS0"));
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty command line, for callers that want full control.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::empty().to_string(), "");
    /// ```
    pub fn empty() -> Self {
        KernelCmdline {
            args: Vec::new(),
            init: None,
        }
    }

    /// Parses a command line as written (whitespace separated, `"` quoting, `--` for init).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let c = KernelCmdline::parse(r#"root=/dev/vda msg="a b" -- single"#);
    /// assert_eq!(c.get("msg"), Some("a b"));
    /// assert_eq!(c.init_args(), ["single"]);
    /// ```
    pub fn parse(s: &str) -> Self {
        let mut c = Self::empty();
        c.append(s);
        c
    }

    /// Appends raw text (one or several words). Words after a `--` go to init.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let mut c = KernelCmdline::empty();
    /// c.append("ro rootfstype=ext4").append("-- --verbose");
    /// assert_eq!(c.to_string(), "ro rootfstype=ext4 -- --verbose");
    /// ```
    pub fn append(&mut self, args: &str) -> &mut Self {
        for word in split_words(args) {
            match &mut self.init {
                Some(init) => init.push(word.to_owned()),
                None if word == INIT_SEPARATOR => self.init = Some(Vec::new()),
                None => self.args.push(word.to_owned()),
            }
        }
        self
    }

    /// Adds one kernel parameter word before the init arguments, even if a parameter with
    /// the same key exists (e.g. one `virtio_mmio.device=...` per device).
    pub(crate) fn push_param(&mut self, word: &str) -> &mut Self {
        self.args.push(word.to_owned());
        self
    }

    /// Sets kernel parameter `key` to `value`: replaces the first `key`/`key=...` parameter
    /// and drops any later ones (so the value is unambiguous), or adds `key=value` before the
    /// init arguments. A value containing whitespace is quoted.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let mut c = KernelCmdline::parse("console=ttyS0 -- init_arg=1");
    /// c.set("console", "hvc0").set("init_arg", "2");
    /// assert_eq!(c.to_string(), "console=hvc0 init_arg=2 -- init_arg=1");
    /// ```
    pub fn set(&mut self, key: &str, value: &str) -> &mut Self {
        let arg = if value.chars().any(char::is_whitespace) && !value.starts_with('"') {
            format!("{key}=\"{value}\"")
        } else {
            format!("{key}={value}")
        };
        match self.args.iter().position(|a| key_matches(a, key)) {
            Some(first) => {
                self.args[first] = arg;
                let mut i = 0;
                self.args.retain(|a| {
                    i += 1;
                    i - 1 <= first || !key_matches(a, key)
                });
            }
            None => self.args.push(arg),
        }
        self
    }

    /// Removes every kernel parameter `key` or `key=...` (init arguments are left alone).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let mut c = KernelCmdline::parse("quiet loglevel=4 console=ttyS0");
    /// c.remove("quiet").remove("loglevel");
    /// assert_eq!(c.to_string(), "console=ttyS0");
    /// ```
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.args.retain(|a| !key_matches(a, key));
        self
    }

    /// The value of kernel parameter `key` (the last one wins, as in the kernel): `Some("")`
    /// for a bare flag, quotes stripped.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let c = KernelCmdline::parse("quiet panic=1 panic=5");
    /// assert_eq!(c.get("panic"), Some("5"));
    /// assert_eq!(c.get("quiet"), Some(""));
    /// assert_eq!(c.get("root"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<&str> {
        let arg = self.args.iter().rev().find(|a| key_matches(a, key))?;
        let value = arg.split_once('=').map_or("", |(_, v)| v);
        Some(
            value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value),
        )
    }

    /// By-value form of [`append`](Self::append), for one-expression construction.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let c = KernelCmdline::empty().with_args("ro").with("root", "/dev/vda");
    /// assert_eq!(c.to_string(), "ro root=/dev/vda");
    /// ```
    pub fn with_args(mut self, args: &str) -> Self {
        self.append(args);
        self
    }

    /// By-value form of [`set`](Self::set).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::new().with("panic", "0").get("panic"), Some("0"));
    /// ```
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.set(key, value);
        self
    }

    /// By-value form of [`remove`](Self::remove).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::new().without("quiet").get("quiet"), None);
    /// ```
    pub fn without(mut self, key: &str) -> Self {
        self.remove(key);
        self
    }

    /// The kernel parameters (before `--`), one word each.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::parse("a b=1 -- c").args(), ["a", "b=1"]);
    /// ```
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The arguments after `--`, which the kernel passes to init.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert!(KernelCmdline::new().init_args().is_empty());
    /// assert_eq!(KernelCmdline::parse("a -- b c").init_args(), ["b", "c"]);
    /// ```
    pub fn init_args(&self) -> &[String] {
        self.init.as_deref().unwrap_or(&[])
    }

    /// The NUL-terminated form written into guest memory. Fails if it contains a NUL byte or
    /// is longer than [`CMDLINE_MAX_SIZE`] including the NUL (the kernel would truncate it).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let c = KernelCmdline::parse("ro");
    /// assert_eq!(c.to_cstring().unwrap().as_bytes_with_nul(), b"ro\0");
    /// assert!(KernelCmdline::parse(&"x".repeat(4096)).to_cstring().is_err());
    /// ```
    pub fn to_cstring(&self) -> Result<CString, BootError> {
        let s = self.to_string();
        if s.len() + 1 > CMDLINE_MAX_SIZE {
            return Err(BootError::Cmdline(format!(
                "{} bytes including the terminating NUL, the limit is {CMDLINE_MAX_SIZE}",
                s.len() + 1
            )));
        }
        CString::new(s)
            .map_err(|e| BootError::Cmdline(format!("NUL byte at offset {}", e.nul_position())))
    }
}

impl fmt::Display for KernelCmdline {
    /// The command line as the kernel reads it: words joined by single spaces.
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// assert_eq!(KernelCmdline::parse("  a   b -- c ").to_string(), "a b -- c");
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let init = self.init.iter().flat_map(|init| {
            std::iter::once(INIT_SEPARATOR).chain(init.iter().map(String::as_str))
        });
        let mut first = true;
        for word in self.args.iter().map(String::as_str).chain(init) {
            if !first {
                f.write_str(" ")?;
            }
            f.write_str(word)?;
            first = false;
        }
        Ok(())
    }
}

impl FromStr for KernelCmdline {
    type Err = Infallible;

    /// Same as [`KernelCmdline::parse`]; never fails (limits are checked by
    /// [`KernelCmdline::to_cstring`]).
    ///
    /// # Example
    /// ```
    /// use smolvm::boot::KernelCmdline;
    /// let c: KernelCmdline = "console=hvc0".parse().unwrap();
    /// assert_eq!(c.get("console"), Some("hvc0"));
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self::parse(s))
    }
}

/// Splits on whitespace outside double quotes, like the kernel's `next_arg`.
fn split_words(s: &str) -> impl Iterator<Item = &str> {
    let mut rest = s;
    std::iter::from_fn(move || {
        rest = rest.trim_start();
        if rest.is_empty() {
            return None;
        }
        let mut in_quotes = false;
        let end = rest
            .char_indices()
            .find(|&(_, c)| {
                if c == '"' {
                    in_quotes = !in_quotes;
                }
                !in_quotes && c.is_whitespace()
            })
            .map_or(rest.len(), |(i, _)| i);
        let (word, tail) = rest.split_at(end);
        rest = tail;
        Some(word)
    })
}

/// Whether `arg` is parameter `key` (bare or `key=...`). The kernel treats `-` and `_` in
/// parameter names as the same character, so this does too.
fn key_matches(arg: &str, key: &str) -> bool {
    let name = arg.split_once('=').map_or(arg, |(k, _)| k);
    let norm = |c: char| if c == '-' { '_' } else { c };
    !key.is_empty() && name.len() == key.len() && name.chars().map(norm).eq(key.chars().map(norm))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_exact() {
        assert_eq!(
            KernelCmdline::default().to_string(),
            "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nokbd \
             i8042.nomux i8042.dumbkbd quiet loglevel=4"
        );
        assert_eq!(KernelCmdline::new(), KernelCmdline::default());
        assert_eq!(KernelCmdline::empty().to_string(), "");
    }

    #[test]
    fn set_replaces_and_dedups() {
        let mut c = KernelCmdline::parse("console=ttyS0 quiet console=tty0");
        c.set("console", "hvc0");
        assert_eq!(c.to_string(), "console=hvc0 quiet");
        c.set("quiet", "1");
        assert_eq!(c.to_string(), "console=hvc0 quiet=1");
        c.set("root", "/dev/vda");
        assert_eq!(c.to_string(), "console=hvc0 quiet=1 root=/dev/vda");
        c.set("msg", "hello world");
        assert_eq!(c.get("msg"), Some("hello world"));
        assert!(c.to_string().ends_with("msg=\"hello world\""));
    }

    #[test]
    fn remove_matches_bare_and_valued_only() {
        let mut c = KernelCmdline::parse("quiet quietly quiet=1 i8042.nokbd");
        c.remove("quiet");
        assert_eq!(c.to_string(), "quietly i8042.nokbd");
        c.remove("i8042.nokbd");
        assert_eq!(c.to_string(), "quietly");
        c.remove("absent");
        assert_eq!(c.to_string(), "quietly");
    }

    #[test]
    fn dash_and_underscore_are_equal_in_keys() {
        let mut c = KernelCmdline::parse("rcu_nocbs=1");
        assert_eq!(c.get("rcu-nocbs"), Some("1"));
        c.remove("rcu-nocbs");
        assert_eq!(c.to_string(), "");
    }

    #[test]
    fn init_separator() {
        let mut c = KernelCmdline::parse("a=1 -- a=2 -- x");
        assert_eq!(c.args(), ["a=1"]);
        assert_eq!(c.init_args(), ["a=2", "--", "x"]);
        assert_eq!(c.get("a"), Some("1"));
        c.set("b", "3").remove("a");
        assert_eq!(c.to_string(), "b=3 -- a=2 -- x");
        c.append("y");
        assert_eq!(c.to_string(), "b=3 -- a=2 -- x y");
        // A trailing separator round-trips.
        assert_eq!(KernelCmdline::parse("a --").to_string(), "a --");
    }

    #[test]
    fn quoted_values_stay_one_word() {
        let c = KernelCmdline::parse(r#"a="x y"  b"#);
        assert_eq!(c.args(), [r#"a="x y""#, "b"]);
        assert_eq!(c.get("a"), Some("x y"));
    }

    #[test]
    fn length_limit_counts_the_nul() {
        let max = "x".repeat(CMDLINE_MAX_SIZE - 1);
        let c = KernelCmdline::parse(&max);
        assert_eq!(
            c.to_cstring().unwrap().as_bytes_with_nul().len(),
            CMDLINE_MAX_SIZE
        );
        let c = KernelCmdline::parse(&format!("{max}y"));
        assert!(matches!(c.to_cstring(), Err(BootError::Cmdline(_))));
    }

    #[test]
    fn nul_is_rejected() {
        let c = KernelCmdline::parse("a\0b");
        assert!(matches!(c.to_cstring(), Err(BootError::Cmdline(m)) if m.contains("NUL")));
    }

    #[test]
    fn from_str_and_display_round_trip() {
        let s = "console=ttyS0 root=/dev/vda -- init";
        let c: KernelCmdline = s.parse().unwrap();
        assert_eq!(c.to_string(), s);
        assert_eq!(KernelCmdline::parse(&c.to_string()), c);
    }
}
