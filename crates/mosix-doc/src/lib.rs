//! Man pages and shell completions generated from the commands' clap definitions, so that
//! `--help`, `man` and tab completion never disagree. Used by `mosix` (`mosix completions`,
//! and the hidden `mosix __man-pages DIR` that `scripts/install.sh` runs) and by `mosixd`
//! (hidden `--man-page`, `--completions SHELL`).
//!
//! A command's examples are the lines after `Examples:` in its `after_help`; in the man
//! page they become an EXAMPLES section printed as written (no filling), as `--help`
//! shows them.

#![forbid(unsafe_code)]

use clap::Command;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

pub use clap_complete::Shell;

/// Splits a command's `after_help` into the text before `Examples:` and the example lines.
fn examples(cmd: &Command) -> (String, Vec<String>) {
    let Some(after) = cmd.get_after_help().map(|s| s.to_string()) else {
        return (String::new(), Vec::new());
    };
    match after.split_once("Examples:") {
        Some((before, ex)) => (
            before.trim().to_string(),
            ex.lines()
                .map(|l| l.strip_prefix("  ").unwrap_or(l).to_string())
                .skip_while(|l| l.trim().is_empty())
                .collect(),
        ),
        None => (after.trim().to_string(), Vec::new()),
    }
}

/// One line of text for roff: backslashes escaped, a leading `.` or `'` made literal.
fn roff_line(l: &str) -> String {
    let l = l.replace('\\', "\\e").replace('-', "\\-");
    if l.starts_with('.') || l.starts_with('\'') {
        format!("\\&{l}")
    } else {
        l
    }
}

/// Writes the man page of `cmd` in `section`: NAME, SYNOPSIS, DESCRIPTION, OPTIONS,
/// SUBCOMMANDS, NOTES (after_help text other than examples), EXAMPLES, SEE ALSO
/// (`see_also`: page names such as "mosix(1)"), VERSION.
pub fn write_man(
    cmd: Command,
    section: &str,
    see_also: &[String],
    w: &mut dyn Write,
) -> io::Result<()> {
    let (notes, ex) = examples(&cmd);
    let cmd = cmd.after_help(None::<&str>).after_long_help(None::<&str>);
    let man = clap_mangen::Man::new(cmd.clone())
        .section(section)
        .manual("MOSIX")
        .source(format!("mosix {}", cmd.get_version().unwrap_or_default()));
    man.render_title(w)?;
    man.render_name_section(w)?;
    man.render_synopsis_section(w)?;
    man.render_description_section(w)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(w)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(w)?;
    }
    if !notes.is_empty() {
        // As --help prints it: tables and lists keep their lines.
        writeln!(w, ".SH NOTES\n.nf")?;
        for l in notes.lines() {
            writeln!(w, "{}", roff_line(l))?;
        }
        writeln!(w, ".fi")?;
    }
    if !ex.is_empty() {
        writeln!(w, ".SH EXAMPLES\n.nf")?;
        for l in &ex {
            writeln!(w, "{}", roff_line(l))?;
        }
        writeln!(w, ".fi")?;
    }
    if !see_also.is_empty() {
        writeln!(w, ".SH \"SEE ALSO\"")?;
        let refs: Vec<String> = see_also
            .iter()
            .map(|s| match s.split_once('(') {
                Some((page, sec)) => format!(".BR {page} ({sec}"),
                None => format!(".BR {s}"),
            })
            .collect();
        let n = refs.len();
        for (i, r) in refs.into_iter().enumerate() {
            // .BR name (1), -- commas between the references.
            if i + 1 < n {
                writeln!(w, "{r},")?;
            } else {
                writeln!(w, "{r}")?;
            }
        }
    }
    if cmd.get_version().is_some() {
        man.render_version_section(w)?;
    }
    Ok(())
}

/// `cmd` under another program name (an argv[0] alias such as `mosrun` for `mosix run`).
pub fn renamed(cmd: Command, name: &'static str) -> Command {
    cmd.name(name).display_name(name).bin_name(name)
}

/// Writes man pages into `dir`: `ROOT.SECTION` for `root`, `ROOT-SUB.SECTION` for each
/// visible subcommand, and `ALIAS.SECTION` for each (alias, subcommand) pair. Returns the
/// files written.
pub fn man_pages(
    root: Command,
    aliases: &[(&'static str, &str)],
    section: &str,
    extra_see_also: &[String],
    dir: &Path,
) -> io::Result<Vec<PathBuf>> {
    let mut root = root.disable_help_subcommand(true);
    root.build();
    let name = root.get_name().to_string();
    let subs: Vec<Command> = root
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut all_pages: Vec<String> = vec![format!("{name}({section})")];
    all_pages.extend(aliases.iter().map(|(a, _)| format!("{a}({section})")));
    all_pages.extend(extra_see_also.iter().cloned());
    let mut out = Vec::new();
    let mut write = |file: String, cmd: Command, me: &str| -> io::Result<()> {
        let p = dir.join(file);
        let mut f = io::BufWriter::new(std::fs::File::create(&p)?);
        let see: Vec<String> = all_pages
            .iter()
            .filter(|s| !s.starts_with(&format!("{me}(")))
            .cloned()
            .collect();
        write_man(cmd, section, &see, &mut f)?;
        f.flush()?;
        out.push(p);
        Ok(())
    };
    write(format!("{name}.{section}"), root.clone(), &name)?;
    for sub in &subs {
        let page = format!("{name}-{}", sub.get_name());
        let cmd = sub.clone().display_name(page.clone());
        write(format!("{page}.{section}"), cmd, &page)?;
    }
    for (alias, sub) in aliases {
        let cmd = subs
            .iter()
            .find(|s| s.get_name() == *sub)
            .cloned()
            .ok_or_else(|| io::Error::other(format!("no subcommand {sub} for alias {alias}")))?;
        write(format!("{alias}.{section}"), renamed(cmd, alias), alias)?;
    }
    Ok(out)
}

/// Writes the completion script of `cmd`, run as `name`, for `shell`.
pub fn completion(shell: Shell, mut cmd: Command, name: &str, w: &mut dyn Write) {
    clap_complete::generate(shell, &mut cmd, name.to_string(), w);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn demo() -> Command {
        Command::new("demo")
            .version("1.0")
            .about("A demo")
            .subcommand(
                Command::new("run")
                    .about("Run a thing")
                    .arg(clap::Arg::new("prog").required(true))
                    .after_help(
                        "Notes first.\n\nExamples:\n  demo run -x 'a\\b'\n  .hidden start\n",
                    ),
            )
            .subcommand(Command::new("secret").hide(true))
    }

    #[test]
    fn pages_have_examples_and_aliases() {
        let d = std::env::temp_dir().join(format!("mosix-doc-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let files = man_pages(demo(), &[("drun", "run")], "1", &[], &d).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["demo.1", "demo-run.1", "drun.1"]);
        let run = std::fs::read_to_string(d.join("drun.1")).unwrap();
        assert!(
            run.contains(".SH EXAMPLES\n.nf\ndemo run \\-x 'a\\eb'\n\\&.hidden start\n"),
            "{run}"
        );
        assert!(run.contains(".SH NOTES\n.nf\nNotes first."), "{run}");
        assert!(run.contains("drun"), "{run}");
        assert!(run.contains(".BR demo (1)"), "{run}");
        let top = std::fs::read_to_string(d.join("demo.1")).unwrap();
        assert!(
            !top.contains("secret"),
            "hidden subcommands stay out: {top}"
        );
        std::fs::remove_dir_all(&d).unwrap();
        assert!(man_pages(demo(), &[("x", "nope")], "1", &[], &std::env::temp_dir()).is_err());
    }

    #[test]
    fn completions_name_the_program() {
        let mut out = Vec::new();
        completion(Shell::Bash, demo(), "demo", &mut out);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("complete -F _demo"), "{s}");
    }
}
