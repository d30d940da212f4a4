//! Backend URLs on the command line. [`r3map::open`] opens them, through the one table of schemes
//! in the `r3map` crate; this only lists that table in the help of the arguments that take one.

use std::fmt::Write as _;

/// The long help of an argument that takes a backend URL: `intro`, then one line per scheme this
/// build opens that `wanted` keeps (its form and what it opens), then `outro` if any.
#[must_use]
pub fn help_for(intro: &str, wanted: impl Fn(&r3map::Scheme) -> bool, outro: &str) -> String {
    let mut text = format!("{intro}\n");
    for scheme in r3map::schemes().iter().filter(|s| s.available() && wanted(s)) {
        let _ = write!(text, "\n`{}`: {}.", scheme.form(), scheme.description());
    }
    if !outro.is_empty() {
        let _ = write!(text, "\n\n{outro}");
    }
    text
}

/// [`help_for`] every scheme.
#[must_use]
pub fn help(intro: &str, outro: &str) -> String {
    help_for(intro, |_| true, outro)
}

/// Whether a scheme names a backend on this host (memory, a file, a directory).
#[must_use]
pub fn is_local(scheme: &r3map::Scheme) -> bool {
    scheme.feature().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_help_lists_every_scheme_of_the_table() {
        let text = help("What to open.", "Quote it.");
        assert!(text.starts_with("What to open.\n\n`memory:SIZE`: sparse memory"), "{text}");
        assert!(text.ends_with("\n\nQuote it."), "{text}");
        for scheme in r3map::schemes() {
            assert!(
                text.contains(&format!("`{}`: ", scheme.form())),
                "{} is missing:\n{text}",
                scheme.name()
            );
        }
        let local = help_for("Where.", is_local, "");
        assert!(local.contains("`dir:///PATH") && !local.contains("nbd://"), "{local}");
    }
}
