//! `--generate`: the man page and the shell completion scripts, written from the clap
//! definitions themselves, so they can never disagree with `--help`.
//!
//! Both binaries take the flag (`echod --generate man`, `echod-bench --generate complete-zsh`)
//! and print the result on stdout; packaging (`ci/package.sh`) runs them to fill the Debian
//! package, and an operator who installed with `cargo install` runs them by hand. The page is
//! rendered by clap_mangen and the completions by clap_complete.
//!
//! A command with subcommands (echod-bench's modes) gets one page: after the common options a
//! MODES section names each mode, then one section per mode lists that mode's own options
//! (clap_mangen alone would point at a separate page per subcommand, which nobody installs).

use std::io::{self, Write};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Arg, Command, ValueEnum};
use clap_complete::{Generator, Shell};
use clap_mangen::roff::{bold, roman, Roff};
use clap_mangen::Man;

/// What `--generate` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Generate {
    /// The man page, in roff (`man -l -` shows it).
    Man,
    /// Completion script for bash.
    CompleteBash,
    /// Completion script for zsh.
    CompleteZsh,
    /// Completion script for fish.
    CompleteFish,
    /// Completion script for PowerShell.
    CompletePowershell,
}

/// Writes `kind` for `cmd` (the binary's whole clap definition) to `out`.
pub fn generate(kind: Generate, cmd: Command, out: &mut dyn Write) -> io::Result<()> {
    let shell = match kind {
        Generate::Man => return man_page(cmd, &page_date(), out),
        Generate::CompleteBash => Shell::Bash,
        Generate::CompleteZsh => Shell::Zsh,
        Generate::CompleteFish => Shell::Fish,
        Generate::CompletePowershell => Shell::PowerShell,
    };
    let mut cmd = cmd;
    let name = cmd.get_name().to_owned();
    cmd.set_bin_name(name);
    cmd.build();
    shell.try_generate(&cmd, out)
}

/// What the binaries' `main` calls: writes `kind` to stdout and returns the exit status. A
/// reader that stops early (`| head`) is not an error; any other write error is reported on
/// stderr with exit status 1.
pub fn print(kind: Generate, cmd: Command) -> ExitCode {
    let name = cmd.get_name().to_owned();
    let mut text = Vec::new();
    let result = generate(kind, cmd, &mut text).and_then(|()| {
        let mut stdout = io::stdout().lock();
        stdout.write_all(&text)?;
        stdout.flush()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: cannot write the --generate output: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `--generate KIND` on the process's command line, for a binary whose subcommand is otherwise
/// required (echod-bench's mode): the arguments are parsed with the subcommand made optional.
/// `None` when the flag is absent or the line does not parse that way; the binary's own parse
/// then runs and reports any usage error (a bad KIND included) as usual.
pub fn requested(cmd: Command) -> Option<Generate> {
    requested_in(cmd, std::env::args_os())
}

fn requested_in<I, T>(cmd: Command, args: I) -> Option<Generate>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let matches =
        cmd.subcommand_required(false).arg_required_else_help(false).try_get_matches_from(args).ok()?;
    matches.try_get_one::<Generate>("generate").ok().flatten().copied()
}

/// The page's date, YYYY-MM-DD: that of `SOURCE_DATE_EPOCH` when it is set (the
/// reproducible-builds convention, which `ci/package.sh` follows), else today's, in UTC.
fn page_date() -> String {
    date_of(std::env::var("SOURCE_DATE_EPOCH").ok().as_deref())
}

fn date_of(source_date_epoch: Option<&str>) -> String {
    let when = source_date_epoch
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
        .unwrap_or_else(SystemTime::now);
    let stamp = humantime::format_rfc3339_seconds(when).to_string();
    stamp.split('T').next().unwrap_or_default().to_owned()
}

fn man_page(cmd: Command, date: &str, out: &mut dyn Write) -> io::Result<()> {
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    // Every field of .TH is set: roff writes an empty one as nothing, which shifts the rest.
    let page = Man::new(cmd.clone()).date(date).manual("User Commands");
    let modes: Vec<&Command> = cmd.get_subcommands().filter(|s| !s.is_hide_set()).collect();
    if modes.is_empty() {
        return page.render(out);
    }
    // The page is put together from clap_mangen's sections, each rendered on its own and so
    // each opened by roff's preamble (how to typeset an apostrophe): written once, here.
    let mut preamble = Vec::new();
    Roff::new().to_writer(&mut preamble)?;
    let mut text = preamble.clone();
    text.extend(section(&preamble, &|w| page.render_title(w))?);
    text.extend(section(&preamble, &|w| page.render_name_section(w))?);
    text.extend(section(&preamble, &|w| page.render_synopsis_section(w))?);
    text.extend(section(&preamble, &|w| page.render_description_section(w))?);
    text.extend(section(&preamble, &|w| page.render_options_section(w))?);

    let mut list = Roff::new();
    list.control("SH", ["MODES"]);
    for mode in &modes {
        list.control("TP", []);
        list.text([bold(format!("{} {}", cmd.get_name(), mode.get_name()))]);
        if let Some(about) = mode.get_long_about().or_else(|| mode.get_about()) {
            for line in about.to_string().lines() {
                list.text([roman(line)]);
            }
        }
    }
    text.extend(section(&preamble, &|w| list.to_writer(w))?);

    for mode in &modes {
        let own: Vec<Arg> = mode
            .get_arguments()
            .filter(|a| !a.is_global_set() && !a.is_hide_set())
            .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
            .cloned()
            .collect();
        if own.is_empty() {
            continue;
        }
        let mut heading = Roff::new();
        heading.control("SH", [format!("{} OPTIONS", mode.get_name().to_uppercase()).as_str()]);
        text.extend(section(&preamble, &|w| heading.to_writer(w))?);
        // clap_mangen heads a command's options OPTIONS; these are the mode's, headed above.
        let options =
            Man::new(Command::new("mode").disable_help_flag(true).disable_version_flag(true).args(own));
        let body = section(&preamble, &|w| options.render_options_section(w))?;
        let body = body.strip_prefix(b".SH OPTIONS\n".as_slice()).ok_or_else(|| {
            io::Error::other("clap_mangen's options section does not start with .SH OPTIONS")
        })?;
        text.extend_from_slice(body);
    }

    if cmd.get_after_long_help().is_some() || cmd.get_after_help().is_some() {
        text.extend(section(&preamble, &|w| page.render_extra_section(w))?);
    }
    if cmd.get_version().is_some() || cmd.get_long_version().is_some() {
        text.extend(section(&preamble, &|w| page.render_version_section(w))?);
    }
    out.write_all(&text)
}

/// One section as `render` writes it, without roff's preamble.
fn section(preamble: &[u8], render: &dyn Fn(&mut dyn Write) -> io::Result<()>) -> io::Result<Vec<u8>> {
    let mut text = Vec::new();
    render(&mut text)?;
    match text.strip_prefix(preamble) {
        Some(body) => Ok(body.to_vec()),
        None => Err(io::Error::other("a man page section does not start with roff's preamble")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_modes() -> Command {
        Command::new("tool")
            .version("1.2.3")
            .about("Does things")
            .arg(Arg::new("target").long("target").global(true).help("Where"))
            .arg(Arg::new("generate").long("generate").help("Writes a page"))
            .subcommand(
                Command::new("ping").about("Pings").arg(Arg::new("size").long("size").help("How big")),
            )
            .subcommand(Command::new("hold").about("Holds"))
    }

    fn text(kind: Generate, cmd: Command) -> String {
        let mut out = Vec::new();
        match kind {
            Generate::Man => man_page(cmd, "2001-02-03", &mut out),
            _ => generate(kind, cmd, &mut out),
        }
        .expect("generate into memory");
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn one_page_lists_every_mode_and_its_own_options() {
        let page = text(Generate::Man, with_modes());
        assert_eq!(page.matches(".TH ").count(), 1, "{page}");
        assert!(page.contains(".TH tool 1 2001-02-03 \"tool 1.2.3\" \"User Commands\"\n"), "{page}");
        assert!(page.contains(".SH MODES"), "{page}");
        assert!(page.contains("tool ping") && page.contains("tool hold"), "{page}");
        assert!(page.contains("PING OPTIONS"), "{page}");
        assert!(!page.contains("HOLD OPTIONS"), "a mode without options gets no section:\n{page}");
        // The global flag is documented once, in the common options, not again per mode.
        assert_eq!(page.matches(".TP\n\\fB\\-\\-target").count(), 1, "{page}");
        assert!(page.contains("\\-\\-size"), "{page}");
        assert!(page.contains("v1.2.3"), "{page}");
        assert!(!page.contains("tool-ping(1)"), "no reference to pages that are not installed:\n{page}");
    }

    #[test]
    fn a_command_without_modes_is_clap_mangens_page() {
        let cmd = Command::new("plain").version("1").arg(Arg::new("x").long("x"));
        let mut expected = Vec::new();
        Man::new(cmd.clone())
            .date("2001-02-03")
            .manual("User Commands")
            .render(&mut expected)
            .expect("render");
        assert_eq!(text(Generate::Man, cmd).into_bytes(), expected);
    }

    #[test]
    fn completions_name_the_binary_and_its_flags() {
        for kind in [
            Generate::CompleteBash,
            Generate::CompleteZsh,
            Generate::CompleteFish,
            Generate::CompletePowershell,
        ] {
            let script = text(kind, with_modes());
            assert!(script.contains("tool"), "{kind:?}:\n{script}");
            assert!(script.contains("target"), "{kind:?}:\n{script}");
            assert!(script.contains("size"), "{kind:?} completes a mode's own flag:\n{script}");
        }
    }

    #[test]
    fn requested_without_the_required_mode() {
        let cmd = || {
            with_modes()
                .mut_arg("generate", |a| a.value_parser(clap::value_parser!(Generate)))
                .subcommand_required(true)
        };
        assert_eq!(requested_in(cmd(), ["tool", "--generate", "man"]), Some(Generate::Man));
        assert_eq!(
            requested_in(cmd(), ["tool", "--generate", "complete-fish", "ping"]),
            Some(Generate::CompleteFish)
        );
        assert_eq!(requested_in(cmd(), ["tool", "ping", "--size", "3"]), None);
        assert_eq!(requested_in(cmd(), ["tool", "--generate", "nonsense"]), None);
    }

    #[test]
    fn the_date_is_source_date_epochs_or_today() {
        assert_eq!(date_of(Some("981158400")), "2001-02-03");
        let today = date_of(None);
        assert_eq!(today.len(), 10, "{today}");
        assert_eq!(date_of(Some("soon")).len(), 10, "an unreadable value is ignored");
    }

    #[test]
    fn kinds_are_spelled_as_documented() {
        let names: Vec<String> = Generate::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_owned())
            .collect();
        assert_eq!(names, ["man", "complete-bash", "complete-zsh", "complete-fish", "complete-powershell"]);
    }
}
