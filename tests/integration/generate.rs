//! `--generate`: both binaries write their man page and shell completions from their clap
//! definitions, without starting anything; a bad kind is a usage error naming the flag.
//!
//! The flags a page must document are read from the binary's own `--help` (and each mode's), so
//! a flag added later is checked without touching this file.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::output_within;

const ECHOD: &str = env!("CARGO_BIN_EXE_echod");
const BENCH: &str = env!("CARGO_BIN_EXE_echod-bench");
const TIMEOUT: Duration = Duration::from_secs(30);

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `bin ARGS` to its end (bounded), with stdout and stderr read as they come.
fn run(bin: &str, args: &[&str]) -> Output {
    let child = Command::new(bin)
        .args(args)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let out = output_within(child, TIMEOUT, &format!("{bin} {args:?}"));
    let text = |bytes: Vec<u8>| String::from_utf8(bytes).expect("output is UTF-8");
    Output { code: out.status.code(), stdout: text(out.stdout), stderr: text(out.stderr) }
}

/// Runs `bin ARGS` and expects exit 0 with nothing on stderr; returns stdout.
fn generated(bin: &str, args: &[&str]) -> String {
    let out = run(bin, args);
    assert_eq!(out.code, Some(0), "{bin} {args:?} failed:\n{}", out.stderr);
    assert!(out.stderr.is_empty(), "{bin} {args:?} wrote to stderr (did it start serving?):\n{}", out.stderr);
    assert!(!out.stdout.is_empty(), "{bin} {args:?} wrote nothing");
    out.stdout
}

/// Every `--long` flag `--help` lists (the definitions' lines: two spaces, then the flag).
fn flags_in_help(help: &str) -> Vec<String> {
    let mut flags: Vec<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| l.split([' ', ',', '=', '[', '<']))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(str::to_owned)
        .collect();
    flags.dedup();
    flags
}

/// The subcommands `--help` lists under "Commands:".
fn modes_in_help(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        // A command's line starts two columns in; deeper lines continue its description.
        .filter(|l| !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| *m != "help")
        .map(str::to_owned)
        .collect()
}

/// A flag as roff writes it in a page: every `-` escaped.
fn roff(flag: &str) -> String {
    flag.replace('-', "\\-")
}

#[test]
fn echod_man_page_documents_every_flag() {
    let page = generated(ECHOD, &["--generate", "man"]);
    assert!(page.contains(".TH echod 1"), "no .TH line:\n{page}");
    assert!(page.contains(".SH NAME\nechod \\- "), "no NAME line for whatis:\n{page}");
    assert!(page.contains(&format!("echod {}", env!("CARGO_PKG_VERSION"))), "no version:\n{page}");
    let help = generated(ECHOD, &["--help"]);
    let flags = flags_in_help(&help);
    assert!(flags.len() >= 12, "too few flags read from --help: {flags:?}");
    for flag in flags {
        assert!(page.contains(&roff(&flag)), "the man page lacks {flag}:\n{page}");
    }
    for var in ["ECHOD_LISTEN", "ECHOD_SHUTDOWN_TIMEOUT"] {
        assert!(page.contains(var), "the man page lacks {var}");
    }
}

#[test]
fn echod_bench_man_page_documents_every_mode_and_flag() {
    // No mode is given: --generate needs none.
    let page = generated(BENCH, &["--generate", "man"]);
    assert!(page.contains(".TH echod-bench 1"), "no .TH line:\n{page}");
    assert_eq!(page.matches(".TH ").count(), 1, "one page:\n{page}");
    let help = generated(BENCH, &["--help"]);
    let modes = modes_in_help(&help);
    assert!(modes.iter().any(|m| m == "pingpong"), "modes read from --help: {modes:?}");
    let mut flags = flags_in_help(&help);
    for mode in &modes {
        assert!(page.contains(&format!("echod\\-bench {}", roff(mode))), "the page lacks mode {mode}");
        flags.extend(flags_in_help(&generated(BENCH, &[mode, "--help"])));
    }
    for flag in ["--target", "--generate", "--size", "--rate", "--conntrack-limit"] {
        assert!(flags.iter().any(|f| f == flag), "{flag} not read from the --help texts: {flags:?}");
    }
    for flag in flags {
        assert!(page.contains(&roff(&flag)), "the man page lacks {flag}:\n{page}");
    }
    assert!(!page.contains("echod\\-bench\\-pingpong(1)"), "points at pages that are not installed");
}

#[test]
fn completions_complete_the_flags() {
    for (bin, name, flag) in [(ECHOD, "echod", "listen"), (BENCH, "echod-bench", "target")] {
        let bash = generated(bin, &["--generate", "complete-bash"]);
        assert!(bash.contains(&format!("--{flag}")), "{name} bash:\n{bash}");
        assert!(bash.contains(&format!("complete -F _{} ", name.replace('-', "__"))), "{name} bash:\n{bash}");
        let zsh = generated(bin, &["--generate", "complete-zsh"]);
        assert!(zsh.starts_with(&format!("#compdef {name}")), "{name} zsh:\n{zsh}");
        assert!(zsh.contains(&format!("--{flag}")), "{name} zsh:\n{zsh}");
        let fish = generated(bin, &["--generate", "complete-fish"]);
        assert!(fish.contains(&format!("complete -c {name} ")), "{name} fish:\n{fish}");
        assert!(fish.contains(&format!("-l {flag}")), "{name} fish:\n{fish}");
        let ps = generated(bin, &["--generate", "complete-powershell"]);
        assert!(ps.contains("Register-ArgumentCompleter"), "{name} powershell:\n{ps}");
        assert!(ps.contains(&format!("'--{flag}'")), "{name} powershell:\n{ps}");
    }
    // The values of --generate complete too.
    let bash = generated(ECHOD, &["--generate", "complete-bash"]);
    assert!(bash.contains("complete-powershell"), "bash completes --generate's values:\n{bash}");
}

#[test]
fn a_bad_kind_is_a_usage_error_naming_the_flag() {
    for bin in [ECHOD, BENCH] {
        for args in [&["--generate", "manpage"][..], &["--generate"][..]] {
            let out = run(bin, args);
            assert_eq!(out.code, Some(2), "{bin} {args:?}: {}", out.stderr);
            assert!(
                out.stderr.contains("--generate"),
                "{bin} {args:?} should name the flag:\n{}",
                out.stderr
            );
            assert!(out.stdout.is_empty(), "{bin} {args:?} wrote to stdout:\n{}", out.stdout);
        }
    }
    let out = run(ECHOD, &["--generate", "manpage"]);
    assert!(out.stderr.contains("complete-bash"), "the error lists the kinds:\n{}", out.stderr);
}
